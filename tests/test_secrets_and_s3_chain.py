"""Secrets stay out of every text a user can see, and S3 follows the AWS chain.

Real servers only: moto's S3 (``s3_server``), sometimes behind ``S3Front``, a
reverse proxy (the suite's ``FaultProxy``) that records every request line and
header and can answer as real S3 does where moto does not (expired presigned
URLs, a bucket in another region, real S3's error bodies).
"""

from __future__ import annotations

import json
import logging
import re
import time
import traceback
from email.utils import formatdate
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
from checkpoints import write_single
from hub_server import hub, hub_session, minilm_dir, repo_name  # noqa: F401 -- fixtures
from reliability_helpers import QUICK, assert_bit_exact, write_checkpoint
from servers import FaultProxy, Faults
from servers.http_range import Reply
from servers.proxy import _ProxyHandler

import fastload
from fastload.cli import main

SIGNATURE = "sig-SECRET-55d1e0"
TOKEN = "tok-SECRET-7f3a9c"
SESSION_TOKEN = "sts-SECRET-TOKEN-a1b2c3"
SECRET_KEY = "aws-SECRET-KEY-0b1c2d3e4f"
ACCESS_KEY_ID = "AKIAAUDITKEYID00001"
SECRETS = (SIGNATURE, TOKEN, SESSION_TOKEN, SECRET_KEY, ACCESS_KEY_ID, "SECRET")

FAIL_FAST = QUICK.replace(stall_timeout_s=0.3, retry=fastload.RetryConfig(
    max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, deadline_s=5.0))


# -- a recording front for moto -----------------------------------------------------------------------

class _FrontHandler(_ProxyHandler):
    def handle_with_faults(self) -> None:  # every request is recorded, faulted ones too
        front: S3Front = self.server.owner  # type: ignore[assignment]
        with front.lock:
            front.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        super().handle_with_faults()

    def produce(self, path, headers, body):
        front: S3Front = self.server.owner  # type: ignore[assignment]
        lowered = {k.lower(): v for k, v in headers}
        if front.hook is not None:
            reply = front.hook(self.command, self.path, lowered)
            if reply is not None:
                return reply
        return super().produce(path, headers, body)


class S3Front(FaultProxy):
    handler_class = _FrontHandler

    def __init__(self, upstream: str):
        super().__init__(upstream, Faults())
        import threading

        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.hook = None

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/")

    def requests(self, method: str | None = None, presigned: bool | None = None):
        with self.lock:
            seen = list(self.seen)
        return [(m, t, h) for m, t, h in seen if (method is None or m == method)
                and (presigned is None or ("Signature=" in t) == presigned)]


@pytest.fixture
def front(s3_server):
    with S3Front(s3_server.endpoint_url) as proxy:
        yield proxy


def s3_error(status: int, code: str, message: str, extra: str = "", headers=(), head: bool = False) -> Reply:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            f"{extra}<RequestId>4442587FB7D0A2F9</RequestId><HostId>host-id</HostId></Error>").encode()
    out = [("Content-Type", "application/xml"), ("Content-Length", str(0 if head else len(body))),
           ("x-amz-request-id", "4442587FB7D0A2F9"), ("Date", formatdate(usegmt=True)), *headers]
    return Reply(status, out, [] if head else [body])


def credential_of(target: str, headers: dict[str, str]) -> list[str]:
    """``[key id, date, region, service, aws4_request]`` of a signed request (header or presigned)."""
    query = parse_qs(urlsplit(target).query)
    if "X-Amz-Credential" in query:
        return unquote(query["X-Amz-Credential"][0]).split("/")
    if "AWSAccessKeyId" in query:  # SigV2: no region in it
        return [query["AWSAccessKeyId"][0], "", "(sigv2)", "s3", ""]
    match = re.search(r"Credential=([^,]+)", headers.get("authorization", ""))
    return match.group(1).split("/") if match else []


def everything_said(exc, trace, caplog, extra: str = "") -> str:
    parts = [extra, json.dumps(trace.to_dict(), default=str), json.dumps(trace.to_chrome(), default=str),
             str(trace.summary())]
    parts += [r.getMessage() for r in caplog.records if not r.name.startswith(("botocore", "urllib3", "moto", "werkzeug", "boto3"))]
    if exc is not None:
        parts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
        seen, hops = exc, 0
        while seen is not None and hops < 20:
            parts += [str(seen), repr(seen), repr(vars(seen)) if hasattr(seen, "__dict__") else ""]
            seen, hops = seen.__cause__ or seen.__context__, hops + 1
    return "\n".join(parts)


def assert_clean(text: str, secrets=SECRETS) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} leaked: ...{text[max(0, text.find(secret) - 300):][:600]}..."


@pytest.fixture
def debug_logs(caplog):
    caplog.set_level(logging.DEBUG)
    return caplog


@pytest.fixture
def stored(s3_server, s3_bucket, tmp_path):
    """A checkpoint of ~1.2 MB in a fresh bucket: ``(s3 url, tensors, bucket)``."""
    file, tensors = write_checkpoint(tmp_path / "model.safetensors")
    s3_server.put(s3_bucket, "ckpt/model.safetensors", file.read_bytes())
    return f"s3://{s3_bucket}/ckpt/model.safetensors", tensors, s3_bucket


def no_env_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                 "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


DEAD = "http://127.0.0.1:9"  # discard port: nothing listens, connection refused at once


# == S3 configuration: the AWS chain, and S3Options over it ============================================

def test_endpoint_url_s3_beats_endpoint_url_and_s3options_beat_both(stored, front, monkeypatch):
    url, tensors, _ = stored
    monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", front.endpoint)  # the service-specific variable wins
    assert_bit_exact(fastload.load(url, config=QUICK), tensors)
    assert front.requests("GET", presigned=True)

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", DEAD)
    before = len(front.requests())
    config = QUICK.replace(s3=fastload.S3Options(endpoint_url=front.endpoint))  # the option wins over both
    assert_bit_exact(fastload.load(url, config=config), tensors)
    assert len(front.requests()) > before


def test_region_from_aws_default_region_and_s3options(stored, front, monkeypatch):
    url, tensors, _ = stored
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    fastload.load(url, config=QUICK)
    assert {credential_of(t, h)[2] for _, t, h in front.requests()} == {"eu-central-1"}

    front.seen.clear()
    got = fastload.load(url, config=QUICK.replace(s3=fastload.S3Options(region="sa-east-1")))
    assert_bit_exact(got, tensors)
    assert {credential_of(t, h)[2] for _, t, h in front.requests()} == {"sa-east-1"}


def test_region_from_aws_region(stored, front, monkeypatch):
    """README and issue 2: the region comes from AWS_REGION / AWS_DEFAULT_REGION. AWS_REGION alone (what
    the other AWS SDKs, Lambda and ECS set) must be honoured too."""
    url, tensors, _ = stored
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    assert_bit_exact(fastload.load(url, config=QUICK), tensors)
    assert {credential_of(t, h)[2] for _, t, h in front.requests()} == {"ap-south-1"}


def _write_profiles(tmp_path, endpoint: str):
    config = tmp_path / "aws-config"
    config.write_text(f"[profile audit]\nregion = eu-west-3\nendpoint_url = {endpoint}\n"
                      f"[profile other]\nregion = us-west-2\nendpoint_url = {endpoint}\n")
    credentials = tmp_path / "aws-credentials"
    credentials.write_text("[audit]\naws_access_key_id = AKIAPROFILEAUDIT0001\naws_secret_access_key = x1\n"
                           "[other]\naws_access_key_id = AKIAPROFILEOTHER0002\naws_secret_access_key = x2\n")
    return config, credentials


def test_aws_profile_from_config_file(stored, front, monkeypatch, tmp_path):
    url, tensors, _ = stored
    config_file, credentials = _write_profiles(tmp_path, front.endpoint)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION",
                 "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_PROFILE", "audit")
    assert_bit_exact(fastload.load(url, config=QUICK), tensors)  # endpoint, region and keys from the profile
    creds = {tuple(credential_of(t, h)[i] for i in (0, 2)) for _, t, h in front.requests()}
    assert creds == {("AKIAPROFILEAUDIT0001", "eu-west-3")}

    front.seen.clear()  # S3Options(profile=) over AWS_PROFILE
    assert_bit_exact(fastload.load(url, config=QUICK.replace(s3=fastload.S3Options(profile="other"))), tensors)
    assert {credential_of(t, h)[0] for _, t, h in front.requests()} == {"AKIAPROFILEOTHER0002"}
    assert {credential_of(t, h)[2] for _, t, h in front.requests()} == {"us-west-2"}


def test_s3options_profile_beats_env_keys(stored, front, monkeypatch, tmp_path):
    """An explicit profile is the user's choice: it wins over AWS_ACCESS_KEY_ID in the environment."""
    url, tensors, _ = stored
    config_file, credentials = _write_profiles(tmp_path, front.endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVKEY0000000003")
    assert_bit_exact(fastload.load(url, config=QUICK.replace(s3=fastload.S3Options(profile="other"))), tensors)
    assert {credential_of(t, h)[0] for _, t, h in front.requests()} == {"AKIAPROFILEOTHER0002"}


def test_missing_profile_is_a_clear_error(stored, monkeypatch, tmp_path):
    url, _, _ = stored
    config_file, credentials = _write_profiles(tmp_path, DEAD)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    with pytest.raises(fastload.FastloadError, match="nope") as info:
        fastload.load(url, config=QUICK.replace(s3=fastload.S3Options(profile="nope")))
    assert isinstance(info.value, (fastload.ConfigError, fastload.SourcePermissionError))


def test_anonymous_access_without_any_credentials(stored, front, s3_server, monkeypatch, tmp_path):
    url, tensors, bucket = stored
    s3_server.client().put_object_acl(Bucket=bucket, Key="ckpt/model.safetensors", ACL="public-read")
    no_env_credentials(monkeypatch, tmp_path)
    config = QUICK.replace(s3=fastload.S3Options(endpoint_url=front.endpoint, anonymous=True))
    assert_bit_exact(fastload.load(url, config=config), tensors)
    seen = front.requests()
    assert seen and not any("authorization" in h or "X-Amz-" in t for _, t, h in seen)  # nothing signed
    with pytest.raises(fastload.SourcePermissionError, match="anonymous=True") as info:
        fastload.load(url, config=config.replace(s3=fastload.S3Options(endpoint_url=front.endpoint)))
    assert url in str(info.value)


def test_path_addressing_style_with_a_hostname_endpoint(stored, front):
    url, tensors, bucket = stored
    endpoint = front.endpoint.replace("127.0.0.1", "localhost")
    config = QUICK.replace(s3=fastload.S3Options(endpoint_url=endpoint, addressing_style="path"))
    assert_bit_exact(fastload.load(url, config=config), tensors)
    targets = [t for _, t, _ in front.requests()]
    assert targets and all(t.startswith(f"/{bucket}/") for t in targets)
    hosts = {h.get("host") for _, _, h in front.requests()}
    assert hosts == {f"localhost:{front.port}"}


def test_virtual_addressing_style_failure_is_a_fastload_error(stored, front):
    """addressing_style="virtual" puts the bucket into the host name (bucket.localhost does not resolve here):
    the failure is a fastload error naming the s3:// URL, never a raw botocore one."""
    url, _, _ = stored
    endpoint = front.endpoint.replace("127.0.0.1", "localhost")
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=endpoint, addressing_style="virtual"))
    with pytest.raises(fastload.FastloadError) as info:
        fastload.load(url, config=config)
    assert url in str(info.value)


def test_presigned_urls_use_sigv4_in_us_east_1(stored, front, monkeypatch):
    """Botocore presigns with legacy SigV2 (AWSAccessKeyId/Signature/Expires) in us-east-1 and other old regions
    unless signature_version="s3v4" is set. Real S3 refuses SigV2 for SSE-KMS objects ("Requests specifying
    Server Side Encryption with AWS KMS managed keys require AWS Signature Version 4"), AWS has deprecated it,
    and several S3-compatible stores never supported it. The HEAD (SigV4) succeeds and every GET then fails."""
    url, tensors, _ = stored
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)

    def kms_object(method, target, headers):  # as S3 answers for an SSE-KMS object
        if method == "HEAD":
            return None
        if "X-Amz-Algorithm=AWS4-HMAC-SHA256" not in target:
            return s3_error(400, "InvalidArgument", "Requests specifying Server Side Encryption with AWS KMS "
                            "managed keys require AWS Signature Version 4.")
        return None

    front.hook = kms_object
    for region in ("us-east-1", "us-west-2"):
        monkeypatch.setenv("AWS_DEFAULT_REGION", region)
        assert_bit_exact(fastload.load(url, config=FAIL_FAST), tensors)


# == wrong credentials: SourcePermissionError naming s3://bucket/key, not retried ======================

@pytest.fixture
def iam_key(s3_server):
    """A real access key of a moto IAM user: ``(key id, secret)``."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"audit-{time.monotonic_ns()}"
    iam.create_user(UserName=name)
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.mark.parametrize("wrong", ["unknown_key", "wrong_secret"])
@pytest.mark.parametrize("shape", ["object", "prefix"])
def test_wrong_credentials_fail_at_once_naming_the_object(stored, front, iam_key, moto_auth, monkeypatch,
                                                          debug_logs, wrong, shape):
    url, _, bucket = stored
    key_id, secret = (ACCESS_KEY_ID, SECRET_KEY) if wrong == "unknown_key" else (iam_key[0], SECRET_KEY)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    source = url if shape == "object" else f"s3://{bucket}/ckpt/"
    config = QUICK.replace(s3=fastload.S3Options(endpoint_url=front.endpoint))  # 4 attempts if it were retried
    # moto checks the credentials of signed calls (the HEAD, the LIST) but fails a presigned GET with a 500 when
    # auth is on (a KeyError on the Authorization header such a GET has none of): S3 answers it as it answers
    # the HEAD, which is what this front does for it
    code = "InvalidAccessKeyId" if wrong == "unknown_key" else "SignatureDoesNotMatch"
    front.hook = lambda m, t, h: s3_error(403, code, "refused") if m == "GET" and "X-Amz-Signature" in t else None
    trace = fastload.Trace()
    with pytest.raises(fastload.SourcePermissionError) as info:
        fastload.load(source, config=config, trace=trace)
    message = str(info.value)
    assert source.rstrip("/") in message or source in message
    assert info.value.url and info.value.url.startswith(f"s3://{bucket}/")
    sent = [(m, t) for m, t, _ in front.requests()]
    # Not retried: each object's presigned GET, refused, then its HEAD, which says why (the GET's 403 may be a
    # stale signature). A prefix asks for the index, then model.safetensors: a caller without ListBucket gets
    # 403 for a missing index too, so one denial alone does not decide.
    heads = [t for m, t in sent if m == "HEAD"]
    assert len(sent) == len(set(sent)) == (2 if shape == "object" else 4), sent
    assert len(heads) == (1 if shape == "object" else 2), sent
    assert_clean(everything_said(info.value, trace, debug_logs), (SECRET_KEY, key_id))


_REAL_S3_SIGNATURE_ERROR = (
    "<AWSAccessKeyId>{key}</AWSAccessKeyId>"
    "<StringToSign>AWS4-HMAC-SHA256\n20250101T000000Z\n20250101/us-east-1/s3/aws4_request\nabc</StringToSign>"
    "<SignatureProvided>{sig}</SignatureProvided>"
    "<CanonicalRequest>GET\n/bucket\nlist-type=2&amp;X-Amz-Credential={key}%2F20250101</CanonicalRequest>")


@pytest.mark.parametrize("code", ["SignatureDoesNotMatch", "InvalidAccessKeyId"])
def test_real_s3_error_bodies_do_not_leak_the_key_through_the_chain(stored, front, monkeypatch, debug_logs, code):
    """Real S3 echoes the access key id, the string to sign and the signature in the body of these errors
    (moto does not); botocore keeps the parsed body on the ClientError that fastload chains."""
    _, _, bucket = stored
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)

    def refuse(method, target, headers):  # the LIST of an empty prefix (its HEADs find nothing: 404)
        if method == "GET" and "list-type=2" in target:
            return s3_error(403, code, "The request signature we calculated does not match the signature you "
                            "provided. Check your key and signing method.",
                            _REAL_S3_SIGNATURE_ERROR.format(key=ACCESS_KEY_ID, sig=SIGNATURE))
        return None

    front.hook = refuse
    config = QUICK.replace(s3=fastload.S3Options(endpoint_url=front.endpoint))
    source = f"s3://{bucket}/nothing-here/"
    trace = fastload.Trace()
    with pytest.raises(fastload.SourcePermissionError) as info:
        fastload.load(source, config=config, trace=trace)
    assert len([t for _, t, _ in front.requests("GET") if "list-type=2" in t]) == 1  # the LIST, not retried
    assert code in str(info.value) and source in str(info.value)
    assert_clean(everything_said(info.value, trace, debug_logs))


# == presigned URLs that expire during the load =======================================================

def _signature_of(target: str) -> str:
    query = parse_qs(urlsplit(target).query)
    return (query.get("X-Amz-Signature") or query.get("Signature") or [""])[0]


def test_presigned_url_expiring_mid_load_is_re_presigned_or_fails_clearly(stored, front, debug_logs):
    """A load longer than presign_expiry_s (a big checkpoint on a slow link; default 1 h): S3 answers 403
    AccessDenied "Request has expired" to the old URL. The load must presign again, or fail saying so."""
    url, tensors, _ = stored
    import threading

    lock, served, expired = threading.Lock(), [0], set()

    def expire_after_three(method, target, headers):
        signature = _signature_of(target)
        if method != "GET" or not signature:
            return None
        with lock:
            if signature in expired:
                return s3_error(403, "AccessDenied", "Request has expired",
                                "<X-Amz-Expires>60</X-Amz-Expires><Expires>2025-01-01T00:01:00Z</Expires>"
                                "<ServerTime>2025-01-01T00:02:00Z</ServerTime>")
            served[0] += 1
            if served[0] == 3:  # from now on every URL presigned so far has expired
                expired.update(_signature_of(t) for m, t, _ in front.requests("GET", presigned=True))
                time.sleep(1.1)  # a URL presigned from now on differs (its date does)
        return None

    front.hook = expire_after_three
    config = QUICK.replace(chunk_bytes=64 << 10, max_concurrency=2, s3=fastload.S3Options(endpoint_url=front.endpoint))
    trace = fastload.Trace()
    try:
        got = fastload.load(url, config=config, trace=trace)
    except fastload.FastloadError as exc:
        assert re.search(r"(?i)expire", str(exc)), f"not clear: {exc}"
        assert url in str(exc)
        assert_clean(everything_said(exc, trace, debug_logs))
    else:
        assert_bit_exact(got, tensors)
        assert len({_signature_of(t) for _, t, _ in front.requests("GET", presigned=True)}) > 1


# == a bucket in another region than the client's ====================================================

BUCKET_REGION = "eu-west-2"


def _as_a_bucket_in(region: str):
    """Answer as S3 does for a bucket in ``region`` to requests signed for another one."""
    def hook(method, target, headers):
        cred = credential_of(target, headers)
        signed_for = cred[2] if cred else None
        if signed_for == region or not cred:
            return None
        moved = [("x-amz-bucket-region", region)]
        if method == "HEAD":
            return s3_error(301, "PermanentRedirect", "", headers=moved, head=True)
        if signed_for == "(sigv2)":
            return s3_error(400, "InvalidRequest", "The authorization mechanism you have provided is not supported. "
                            "Please use AWS4-HMAC-SHA256.", headers=moved)
        if "X-Amz-Credential=" in target:
            return s3_error(400, "AuthorizationQueryParametersError", "Error parsing the X-Amz-Credential parameter; "
                            f"the region '{signed_for}' is wrong; expecting '{region}'",
                            f"<Region>{region}</Region>", headers=moved)
        return s3_error(400, "AuthorizationHeaderMalformed", "The authorization header is malformed; the region "
                        f"'{signed_for}' is wrong; expecting '{region}'", f"<Region>{region}</Region>", headers=moved)
    return hook


@pytest.mark.parametrize("client_region", ["us-east-1", "eu-central-1"])
def test_region_mismatch_is_followed_or_named(stored, front, monkeypatch, client_region):
    url, tensors, _ = stored
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", client_region)
    front.hook = _as_a_bucket_in(BUCKET_REGION)
    try:
        got = fastload.load(url, config=FAIL_FAST)
    except fastload.FastloadError as exc:
        assert BUCKET_REGION in str(exc) and url in str(exc), f"not clear: {exc!r}"
    else:
        assert_bit_exact(got, tensors)


def test_right_region_passes_the_region_check(stored, front, monkeypatch):
    """Control for the test above: signed for the bucket's region, the same load works."""
    url, tensors, _ = stored
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
    front.hook = _as_a_bucket_in(BUCKET_REGION)
    config = FAIL_FAST.replace(s3=fastload.S3Options(region=BUCKET_REGION))
    assert_bit_exact(fastload.load(url, config=config), tensors)


# == temporary credentials (X-Amz-Security-Token) through every surface ==============================

@pytest.fixture
def otel_spans():
    """An in-memory OpenTelemetry exporter on the process's SDK tracer provider (made once if none)."""
    from opentelemetry import trace as otel
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    provider = otel.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        otel.set_tracer_provider(TracerProvider())
        provider = otel.get_tracer_provider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


def _spans_text(exporter) -> str:
    return "\n".join(f"{s.name} {dict(s.attributes or {})} {s.status.description} {s.events}"
                     for s in exporter.get_finished_spans())


S3_FAULTS = {
    "none": lambda f: None,
    "get_503": lambda f: f.random_errors(1.0, (503,)),
    "get_403": lambda f: f.fail_first(1000, 403),
    "get_hang": lambda f: f.hang(),
    "get_cut": lambda f: f.cut_after(100, times=2),
    "get_short": lambda f: f.short_body(5),
    "get_range_ignored": lambda f: f.ignore_range(),
    "etag_changes": lambda f: f.change_etag_after(3),
}


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
@pytest.mark.parametrize("fault", sorted(S3_FAULTS))
def test_session_token_and_presigned_query_never_show(stored, front, monkeypatch, debug_logs, otel_spans,
                                                      tmp_path, engine, fault):
    url, tensors, _ = stored
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")  # SigV4: X-Amz-Credential, X-Amz-Security-Token
    S3_FAULTS[fault](front.faults)
    config = FAIL_FAST.replace(http_engine=engine, s3=fastload.S3Options(endpoint_url=front.endpoint))
    out = tmp_path / "trace.json"
    trace = fastload.Trace(str(out))
    error = None
    try:
        got = fastload.load(url, config=config, trace=trace)
    except fastload.FastloadError as exc:
        error = exc
    if fault in ("none", "get_cut", "get_short"):  # retried to success (a cut on every try: may fail)
        assert error is not None or got.keys() == tensors.keys()
    elif fault != "etag_changes":
        assert error is not None
    presigned = [t for _, t, _ in front.requests("GET", presigned=True)]
    assert presigned and all("X-Amz-Security-Token=" in t for t in presigned)  # the secrets were really there
    said = everything_said(error, trace, debug_logs, out.read_text() if out.exists() else "")
    said += _spans_text(otel_spans) + plan_text(url, config)
    assert_clean(said)


def plan_text(url, config) -> str:
    try:
        plan = fastload.plan(url, config=config.replace(retry=fastload.RetryConfig(max_attempts=1)))
    except fastload.FastloadError as exc:
        return str(exc)
    return str(plan) + plan.to_json()


@pytest.mark.parametrize("fault", ["none", "get_403", "head_403"])
def test_cli_hides_s3_credentials(stored, front, monkeypatch, tmp_path, capsys, fault):
    url, _, bucket = stored
    monkeypatch.setenv("AWS_ENDPOINT_URL", front.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.setenv("FASTLOAD_STALL_TIMEOUT_S", "0.3")
    if fault == "get_403":
        front.faults.fail_first(1000, 403)
    elif fault == "head_403":  # a policy that denies the object denies its HEAD and its GETs alike
        front.hook = lambda m, t, h: (s3_error(403, "AccessDenied", "Access Denied", head=m == "HEAD")
                                      if m == "HEAD" or "X-Amz-Signature" in t else None)
    out = tmp_path / "t.json"
    codes = [main(["inspect", url, "--json"]), main(["load", url, "--trace", str(out), "--json"]),
             main(["--debug", "load", url]) if fault == "none" else 0,
             main(["pull", f"s3://{bucket}/ckpt/", "--to", str(tmp_path / "pulled"), "--quiet"])]
    said = capsys.readouterr()
    text = said.out + said.err + (out.read_text() if out.exists() else "")
    text += "".join(p.name for p in tmp_path.rglob("*"))
    if fault == "none":
        assert codes == [0, 0, 0, 0], text
    else:
        assert codes[1] != 0
    assert_clean(text)


# == credentials meant for one place must not travel to another ======================================

def test_http_headers_authorization_is_not_sent_with_presigned_s3_gets(stored, front, http_server, http_dir):
    """LoadConfig.http_headers (e.g. a bearer token for an HTTP source of the same load) must not go out on S3
    tensor GETs: the token would reach the S3 host, and real S3 refuses a presigned URL that also carries an
    Authorization header (400 InvalidArgument: only one auth mechanism allowed)."""
    url, tensors, _ = stored
    extra_tensors = {"extra.weight": torch.arange(1000, dtype=torch.float32)}  # names the S3 file does not hold
    extra = write_single(http_dir / "extra.safetensors", extra_tensors)
    config = QUICK.replace(http_headers={"Authorization": f"Bearer {TOKEN}"},
                           s3=fastload.S3Options(endpoint_url=front.endpoint))

    def one_auth_mechanism(method, target, headers):
        if "Signature=" in target and "authorization" in headers:
            return s3_error(400, "InvalidArgument", "Only one auth mechanism allowed; only the X-Amz-Algorithm "
                            "query parameter, Signature query string parameter or the Authorization header "
                            "should be specified")
        return None

    front.hook = one_auth_mechanism
    got = fastload.load([http_server.url_for(extra), url], config=config)
    assert set(got) == set(tensors) | set(extra_tensors)
    leaked = [t for _, t, h in front.requests("GET") if TOKEN in h.get("authorization", "")]
    assert not leaked, f"{len(leaked)} S3 GET(s) carried the HTTP bearer token"


def test_space_in_url_does_not_leak_the_presigned_query(http_server, http_dir, debug_logs):
    """A URL with a raw space (a file name with a space, as users type it): aiohttp quotes it for the probe,
    but the threaded body reader hands it to http.client, whose InvalidURL (a ValueError, neither OSError nor
    FastloadError) escapes the load unwrapped, with the whole request target -- signature included -- in
    its message."""
    file, tensors = write_checkpoint(http_dir / "my model.safetensors", count=2)
    base = http_server.url_for(file)
    source = unquote(base) + f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SIGNATURE}"
    assert " " in source
    trace = fastload.Trace()
    try:
        got = fastload.load(source, config=FAIL_FAST, trace=trace)
    except Exception as exc:  # noqa: BLE001 -- whatever escapes is what a user sees
        assert isinstance(exc, fastload.FastloadError), f"unwrapped {type(exc).__name__}: {exc}"
        assert_clean(everything_said(exc, trace, debug_logs))
    else:
        assert_bit_exact(got, tensors)



def test_hub_http_headers_authorization_stays_with_the_hub(hub, minilm_dir):  # noqa: F811
    """README: the Hub token goes to the Hub's own host only, never to the CDN it redirects to. A token given
    as LoadConfig.http_headers (a private mirror, a proxy's auth) must not follow the CDN's presigned URLs
    either: the CDN is another origin, and http_threads drops Authorization on cross-origin redirects."""
    repo = repo_name("hdr")
    hub.add_repo(repo, minilm_dir)
    config = QUICK.replace(http_headers={"Authorization": f"Bearer {TOKEN}"})
    fastload.load(f"hf://{repo}", config=config)
    cdn_side = [auth for path, auth in hub.auth_seen if path.startswith("/lfs/")]
    assert cdn_side and not any(cdn_side), f"{sum(cdn_side)} CDN request(s) carried Authorization"
