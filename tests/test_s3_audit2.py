"""Audit of the S3 source, round 2: presigned GET lifetime, region redirects, S3 error replies on HEAD/LIST/GET,
replies that ignore Range or lie about their length, objects that change, url-encoded listings, prefixes holding
only sub-prefixes, object-vs-prefix, and session tokens.

Real moto S3 (``s3_server``/``s3_bucket``) behind a fault proxy (``s3_proxy``) or a small recording front
(``_Front``, a ``FaultProxy`` subclass) that answers as real S3 does where moto does not.
"""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
from reliability_helpers import QUICK, assert_bit_exact, load_checked, private_tmp, write_checkpoint  # noqa: F401
from safetensors.torch import load_file, save_file
from servers import FaultProxy, Faults
from servers.faults import IgnoreRange
from servers.http_range import Reply
from servers.proxy import _ProxyHandler

import fastload

FAIL_FAST = QUICK.replace(stall_timeout_s=1.0, retry=fastload.RetryConfig(
    max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.05, deadline_s=5.0))


# -- helpers ------------------------------------------------------------------------------------------

def small_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"a{seed}": torch.randn(257, generator=g), f"b{seed}": torch.arange(11, dtype=torch.int32) + seed,
            f"c{seed}": torch.randn(3, 5, generator=g).to(torch.bfloat16)}


def small_file(tmp_path, seed: int = 0):
    path = tmp_path / f"s{seed}-{uuid.uuid4().hex[:6]}.safetensors"
    save_file(small_tensors(seed), str(path))
    return path, load_file(str(path))


def s3_error(status: int, code: str, message: str = "m", head: bool = False, extra=()) -> Reply:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            "<RequestId>4442587FB7D0A2F9</RequestId><HostId>h</HostId></Error>").encode()
    headers = [("Content-Type", "application/xml"), ("Content-Length", str(0 if head else len(body))),
               ("x-amz-request-id", "4442587FB7D0A2F9"), *extra]
    return Reply(status, headers, [] if head else [body])


def _credential(target: str, headers: dict[str, str]) -> list[str]:
    query = parse_qs(urlsplit(target).query)
    if "X-Amz-Credential" in query:
        return unquote(query["X-Amz-Credential"][0]).split("/")
    auth = headers.get("authorization", "")
    if "Credential=" in auth:
        return auth.split("Credential=", 1)[1].split(",", 1)[0].split("/")
    return []


def region_of(target: str, headers: dict[str, str]) -> str | None:
    parts = _credential(target, headers)
    return parts[2] if len(parts) > 2 else None


def is_presigned_get(method: str, target: str) -> bool:
    return method == "GET" and "X-Amz-Signature" in target


def is_list(method: str, target: str) -> bool:
    return method == "GET" and "list-type" in target


class _FrontHandler(_ProxyHandler):
    def handle_with_faults(self) -> None:
        front: _Front = self.server.owner  # type: ignore[assignment]
        with front.lock:
            front.seen.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        super().handle_with_faults()

    def produce(self, path, headers, body):
        front: _Front = self.server.owner  # type: ignore[assignment]
        lowered = {k.lower(): v for k, v in headers}
        if front.hook is not None:
            with front.lock:
                reply = front.hook(self.command, self.path, lowered)
            if reply is not None:
                return reply
        reply = super().produce(path, headers, body)
        if front.after is not None:
            with front.lock:
                reply = front.after(self.command, self.path, lowered, reply) or reply
        return reply


class _Front(FaultProxy):
    """A proxy in front of moto that records requests and can answer or rewrite replies."""

    handler_class = _FrontHandler

    def __init__(self, upstream: str):
        super().__init__(upstream, Faults())
        self.lock = threading.Lock()
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.hook = None  # (method, target, headers) -> Reply | None
        self.after = None  # (method, target, headers, reply) -> Reply | None

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/")

    def requests(self):
        with self.lock:
            return list(self.seen)


@pytest.fixture
def front(s3_server):
    with _Front(s3_server.endpoint_url) as proxy:
        yield proxy


def via(front, config=FAIL_FAST, **s3):
    return config.replace(s3=fastload.S3Options(endpoint_url=front.endpoint, **s3))


def ok(result):
    assert not isinstance(result, Exception), f"{type(result).__name__}: {result}"
    return result


def header_value(reply: Reply, name: str) -> str | None:
    return next((v for n, v in reply.headers if n.lower() == name.lower()), None)


def with_header(reply: Reply, name: str, value: str) -> Reply:
    headers = [(n, v) for n, v in reply.headers if n.lower() != name.lower()] + [(name, value)]
    return Reply(reply.status, headers, reply.body, reply.close_delimited)


# == presigned GET lifetime ================================================================================

def _refuse_nth_presigned_get(n: int, reply_fn, times: int = 1):
    """A hook refusing presigned GETs number n, n+1, ... (``times`` of them; 1-based) with ``reply_fn()``."""
    state = {"gets": 0, "refused": []}

    def hook(method, target, headers):
        if not is_presigned_get(method, target):
            return None
        state["gets"] += 1
        if n <= state["gets"] < n + times:
            state["refused"].append((headers.get("range"), target))
            return reply_fn()
        return None

    return hook, state


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_expired_presigned_get_is_signed_again_and_the_load_succeeds(s3_server, s3_bucket, front, tmp_path, engine):
    """S3 answers an expired presigned GET with 403 AccessDenied 'Request has expired'. The README: GET URLs are
    'signed again when ... S3 refuses one it took before'. One refusal mid-load: signed again, load bit-exact."""
    file, want = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    # GETs 1-2 are the header's; the third is the first tensor chunk (a URL S3 took before).
    hook, state = _refuse_nth_presigned_get(3, lambda: s3_error(403, "AccessDenied", "Request has expired"))
    front.hook = hook
    config = via(front, FAIL_FAST.replace(http_engine=engine, max_concurrency=1))
    got, _ = load_checked(f"s3://{s3_bucket}/m.safetensors", {front.port}, config)
    assert_bit_exact(ok(got), want)
    assert len(state["refused"]) == 1
    refused_range = state["refused"][0][0]
    gets = [(t, h.get("range")) for m, t, h in front.requests() if is_presigned_get(m, t)]
    assert sum(1 for _, r in gets if r == refused_range) == 2, "the refused range is asked for once more"


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_expired_session_token_on_a_presigned_get_is_signed_again(s3_server, s3_bucket, front, tmp_path, engine):
    """Presigned URLs made with temporary credentials stop working when the session ends; S3 then answers
    400 ExpiredToken ('The provided token has expired.'; S3 error code list: HTTP 400). The README promises
    'signed again when ... S3 refuses one it took before (temporary credentials expire with their session)'."""
    file, want = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    hook, state = _refuse_nth_presigned_get(3, lambda: s3_error(400, "ExpiredToken", "The provided token has expired."))
    front.hook = hook
    config = via(front, FAIL_FAST.replace(http_engine=engine, max_concurrency=1))
    got, _ = load_checked(f"s3://{s3_bucket}/m.safetensors", {front.port}, config)
    assert_bit_exact(ok(got), want)
    assert len(state["refused"]) == 1


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_refused_again_after_signing_again_is_a_permission_error_signed_once(s3_server, s3_bucket, front, tmp_path,
                                                                              engine):
    """Refused again with a fresh URL: SourcePermissionError naming s3://bucket/key (no query), after exactly one
    new signature for that range (no loop of re-signing)."""
    file, _ = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    hook, state = _refuse_nth_presigned_get(3, lambda: s3_error(403, "AccessDenied", "Request has expired"),
                                            times=1000)
    front.hook = hook
    url = f"s3://{s3_bucket}/m.safetensors"
    config = via(front, FAIL_FAST.replace(http_engine=engine, max_concurrency=1))
    err, _ = load_checked(url, {front.port}, config)
    assert isinstance(err, fastload.SourcePermissionError), f"{type(err).__name__}: {err}"
    assert url in str(err) and "X-Amz" not in str(err)
    assert len(state["refused"]) == 2, state["refused"]
    assert state["refused"][0][0] == state["refused"][1][0]


def test_pull_signs_an_expired_get_again(s3_server, s3_bucket, front, tmp_path):
    file, _ = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "ck/model.safetensors", file.read_bytes())
    hook, state = _refuse_nth_presigned_get(2, lambda: s3_error(403, "AccessDenied", "Request has expired"))
    front.hook = hook
    dest = tmp_path / "out"
    fastload.pull(f"s3://{s3_bucket}/ck/", to=dest, config=via(front, FAIL_FAST.replace(max_concurrency=1)))
    assert (dest / "model.safetensors").read_bytes() == file.read_bytes()
    assert len(state["refused"]) == 1


def test_slow_progress_callback_within_expiry_needs_no_new_signature(s3_server, s3_bucket, front, tmp_path):
    """A consumer slower than nothing but far within presign_expiry_s: every GET uses the URL signed at stat
    time (no needless re-signing, which would cost a botocore call per chunk)."""
    file, want = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    config = via(front, FAIL_FAST.replace(max_concurrency=2), presign_expiry_s=60)
    got, _ = load_checked(f"s3://{s3_bucket}/m.safetensors", {front.port}, config,
                          progress=lambda done, total: time.sleep(0.01))
    assert_bit_exact(ok(got), want)
    signatures = {parse_qs(urlsplit(t).query)["X-Amz-Signature"][0] for m, t, _ in front.requests()
                  if is_presigned_get(m, t)}
    assert len(signatures) == 1
    expires = {parse_qs(urlsplit(t).query)["X-Amz-Expires"][0] for m, t, _ in front.requests()
               if is_presigned_get(m, t)}
    assert expires == {"60"}


# == region redirects ======================================================================================

BUCKET_REGION = "eu-west-1"


def _bucket_in_another_region(front, bucket: str):
    """Answer as real S3 does for a bucket in eu-west-1 reached with requests signed for another region:
    HEAD 301 (no body) with x-amz-bucket-region; LIST 301 PermanentRedirect (XML) with the header; a presigned
    GET signed for the wrong region 400 AuthorizationQueryParametersError."""
    where = [("x-amz-bucket-region", BUCKET_REGION)]

    def hook(method, target, headers):
        if f"/{bucket}" not in target:
            return None
        region = region_of(target, headers)
        if region is None or region == BUCKET_REGION:
            return None
        if method == "HEAD":
            return s3_error(301, "PermanentRedirect", head=True, extra=where)
        if is_presigned_get(method, target):
            return s3_error(400, "AuthorizationQueryParametersError",
                            f"Error parsing the X-Amz-Credential parameter; the region '{region}' is wrong; "
                            f"expecting '{BUCKET_REGION}'", extra=where)
        return s3_error(301, "PermanentRedirect",
                        "The bucket you are attempting to access must be addressed using the specified endpoint.",
                        extra=where)

    front.hook = hook


_PROBES = {"bytes=0-7", "bytes=0-262143"}  # the ranges of a first look at an object (a .json file's: the larger)


def _get_regions(front) -> set[str | None]:
    """The regions the GETs that read an object's bytes were signed for. The first look at an object, a
    presigned GET of its first bytes, is signed for the client's region before botocore has met the bucket: it
    is refused, once per object at most, and its HEAD follows the bucket to its region."""
    gets = [(urlsplit(t).path, region_of(t, h), {k.lower(): v for k, v in h.items()}.get("range"))
            for m, t, h in front.requests() if is_presigned_get(m, t)]
    astray = [(path, rng) for path, region, rng in gets if region != BUCKET_REGION]
    assert all(rng in _PROBES for _, rng in astray), astray
    assert len(astray) == len({path for path, _ in astray}), astray
    return {region for _, region, rng in gets if rng not in _PROBES}


@pytest.mark.parametrize("source", ["m.safetensors", "ck/", "ck", "listed/"])
def test_load_from_a_bucket_in_another_region_signs_gets_for_it(s3_server, s3_bucket, front, tmp_path, source):
    path, want = small_file(tmp_path)
    for key in ("m.safetensors", "ck/model.safetensors", "listed/part-1.safetensors"):
        s3_server.put(s3_bucket, key, path.read_bytes())
    _bucket_in_another_region(front, s3_bucket)
    got, _ = load_checked(f"s3://{s3_bucket}/{source}", {front.port}, via(front))
    assert_bit_exact(ok(got), want)
    assert _get_regions(front) == {BUCKET_REGION}


@pytest.mark.parametrize("source", ["ck/", "ck"])
def test_pull_from_a_bucket_in_another_region_signs_gets_for_it(s3_server, s3_bucket, front, tmp_path, source):
    """``fastload pull s3://bucket/prefix/`` lists first: the LIST is the request botocore follows to the bucket's
    region (and caches), so the HEADs after it are never 'redirected'. The GETs must still be signed for the
    bucket's region."""
    p1, _ = small_file(tmp_path, seed=1)
    p2, _ = small_file(tmp_path, seed=2)
    s3_server.put(s3_bucket, "ck/model-1.safetensors", p1.read_bytes())
    s3_server.put(s3_bucket, "ck/sub/model-2.safetensors", p2.read_bytes())
    _bucket_in_another_region(front, s3_bucket)
    dest = tmp_path / "out"
    try:
        fastload.pull(f"s3://{s3_bucket}/{source}", to=dest, config=via(front))
    except fastload.FastloadError as exc:
        pytest.fail(f"{type(exc).__name__}: {exc}; GET regions {_get_regions(front)}")
    assert (dest / "model-1.safetensors").read_bytes() == p1.read_bytes()
    assert (dest / "sub" / "model-2.safetensors").read_bytes() == p2.read_bytes()
    assert _get_regions(front) == {BUCKET_REGION}


# == S3 error replies, retried ==============================================================================

@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_slowdown_on_get_honours_retry_after_and_is_bit_exact(s3_server, s3_bucket, front, tmp_path, engine):
    file, want = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    hook, state = _refuse_nth_presigned_get(
        3, lambda: s3_error(503, "SlowDown", "Please reduce your request rate.", extra=[("Retry-After", "1")]))
    front.hook = hook
    config = via(front, FAIL_FAST.replace(http_engine=engine, max_concurrency=1, retry=fastload.RetryConfig(
        max_attempts=4, backoff_base_s=0.01, backoff_max_s=3.0, deadline_s=8.0)))
    start = time.monotonic()
    got, _ = load_checked(f"s3://{s3_bucket}/m.safetensors", {front.port}, config)
    assert_bit_exact(ok(got), want)
    assert len(state["refused"]) == 1
    assert time.monotonic() - start >= 0.9, "Retry-After: 1 was not honoured"


@pytest.mark.parametrize("verify", [False, True])
def test_slowdown_on_head_and_list_is_retried(s3_server, s3_bucket, front, tmp_path, verify):
    """SlowDown on the first look at each object (a presigned GET of its first bytes, tried once: the HEAD asks
    then; with checksums verified only the HEAD, which brings them), on the HEAD and on the LIST: the HEAD and
    the LIST retried, the load bit-exact."""
    p1, w1 = small_file(tmp_path, seed=1)
    p2, w2 = small_file(tmp_path, seed=2)
    s3_server.put(s3_bucket, "ck/x-1.safetensors", p1.read_bytes())
    s3_server.put(s3_bucket, "ck/x-2.safetensors", p2.read_bytes())
    counts = {"HEAD": 0, "PROBE": 0, "LIST": 0}

    def hook(method, target, headers):
        probe = not verify and is_presigned_get(method, target) and "/x-" in target \
            and {k.lower(): v for k, v in headers.items()}.get("range") in _PROBES
        kind = "HEAD" if method == "HEAD" else "LIST" if is_list(method, target) else "PROBE" if probe else None
        if kind and counts[kind] < 2:
            counts[kind] += 1
            return s3_error(503, "SlowDown", "Please reduce your request rate.", head=kind == "HEAD",
                            extra=[("Retry-After", "0")])
        return None

    front.hook = hook
    got, _ = load_checked(f"s3://{s3_bucket}/ck/", {front.port}, via(front, FAIL_FAST.replace(verify_checksums=verify)))
    assert_bit_exact(ok(got), {**w1, **w2})
    assert counts == {"HEAD": 2, "PROBE": 0 if verify else 2, "LIST": 2}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_slowdown_on_every_head_ends_in_transfer_error_naming_the_url(s3_server, s3_bucket, front, tmp_path,
                                                                      method):
    """Every first look refused with SlowDown (the probe GET; the HEAD with verify_checksums): a TransferError
    naming the object once the retries are spent."""
    path, _ = small_file(tmp_path)
    s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
    front.hook = lambda m, t, h: s3_error(503, "SlowDown", head=m == "HEAD") if m == method else None
    url = f"s3://{s3_bucket}/m.safetensors"
    err, _ = load_checked(url, {front.port}, via(front, FAIL_FAST.replace(verify_checksums=method == "HEAD")))
    assert isinstance(err, fastload.TransferError), f"{type(err).__name__}: {err}"
    assert url in str(err)


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_internal_error_with_xml_body_on_chunk_gets_is_retried_bit_exact(s3_server, s3_bucket, front, tmp_path,
                                                                         engine):
    """500 InternalError with its XML body on several chunk GETs: retried; the error body left on a kept-alive
    connection must never be read as the next reply's bytes."""
    file, want = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    state = {"gets": 0, "failed": set()}

    def hook(method, target, headers):
        # The first GET of each range from the third on fails (at most 8): every range's retry then succeeds.
        # (Failing every odd GET could starve one range: two in flight can alternate so that one draws only odd
        # numbers, and its retries ran out under xdist.)
        if is_presigned_get(method, target):
            state["gets"] += 1
            key = {k.lower(): v for k, v in headers.items()}.get("range")
            if state["gets"] >= 3 and key not in state["failed"] and len(state["failed"]) < 8:
                state["failed"].add(key)
                return s3_error(500, "InternalError", "We encountered an internal error. Please try again.")
        return None

    front.hook = hook
    config = via(front, FAIL_FAST.replace(http_engine=engine, max_concurrency=2))
    got, _ = load_checked(f"s3://{s3_bucket}/m.safetensors", {front.port}, config)
    assert_bit_exact(ok(got), want)
    assert len(state["failed"]) >= 3, state  # the faults did fire, on several chunks


# == replies that ignore Range or lie ======================================================================

@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_s3_endpoint_that_never_honours_range_fails_at_once(s3_server, s3_bucket, s3_proxy, tmp_path, engine):
    """Every GET answered 200 with the whole object (a gateway stripping Range). README: 'A server that never
    honours Range fails at once with TransferError; one that ignores it now and then is retried.' With the
    default retry policy (8 attempts, backoff up to 10 s) retrying it takes ~10 s or more per chunk."""
    file, _ = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    s3_proxy.faults.ignore_range(path=f"/{s3_bucket}/*")
    url = f"s3://{s3_bucket}/m.safetensors"
    config = fastload.LoadConfig(http_engine=engine, stall_timeout_s=2.0, connect_timeout_s=2.0,
                                 retry=fastload.RetryConfig(deadline_s=7.0),  # the default policy, bounded
                                 s3=fastload.S3Options(endpoint_url=s3_proxy.url.rstrip("/")))
    err, took = load_checked(url, {s3_proxy.port}, config, bound_s=9.5)
    assert isinstance(err, fastload.TransferError), f"{type(err).__name__}: {err}"
    assert url in str(err) and "X-Amz" not in str(err)
    gets = [r for r in s3_proxy.log if r.method == "GET"]
    assert len(gets) <= 2, f"{len(gets)} GETs answered 200 before giving up ({took:.1f} s)"


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_one_reply_without_range_is_retried_bit_exact(s3_server, s3_bucket, s3_proxy, tmp_path, engine):
    file, want = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    config = QUICK.replace(http_engine=engine, s3=fastload.S3Options(endpoint_url=s3_proxy.url.rstrip("/")))
    state = {"n": 0}

    class ThirdGet(IgnoreRange):  # the first GETs are the header's: strip Range from a chunk GET
        def wants_to_fire(self):
            state["n"] += 1
            return state["n"] == 3

    rule = s3_proxy.faults._add(ThirdGet(pattern=f"/{s3_bucket}/*"))
    got, _ = load_checked(f"s3://{s3_bucket}/m.safetensors", {s3_proxy.port}, config)
    assert_bit_exact(ok(got), want)
    assert rule.fired == 1


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_content_length_smaller_than_the_body_once_is_retried_bit_exact(s3_server, s3_bucket, front, tmp_path,
                                                                        engine):
    """A chunk reply declaring Content-Length one less than the range while the full range follows: refused
    before use, retried; the stray byte must not poison the next reply on a kept-alive connection."""
    file, want = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    state = {"gets": 0, "lied": 0}

    def after(method, target, headers, reply):
        if not is_presigned_get(method, target) or reply.status != 206:
            return None
        state["gets"] += 1
        if state["gets"] in (3, 5):
            state["lied"] += 1
            return with_header(reply, "Content-Length", str(int(header_value(reply, "Content-Length")) - 1))
        return None

    front.after = after
    config = via(front, FAIL_FAST.replace(http_engine=engine, max_concurrency=2))
    got, _ = load_checked(f"s3://{s3_bucket}/m.safetensors", {front.port}, config)
    assert_bit_exact(ok(got), want)
    assert state["lied"] == 2


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_content_length_lie_on_every_reply_is_a_transfer_error_with_range(s3_server, s3_bucket, front, tmp_path,
                                                                          engine):
    file, _ = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())

    def after(method, target, headers, reply):
        if is_presigned_get(method, target) and reply.status == 206:
            return with_header(reply, "Content-Length", str(int(header_value(reply, "Content-Length")) + 1))
        return None

    front.after = after
    url = f"s3://{s3_bucket}/m.safetensors"
    err, _ = load_checked(url, {front.port}, via(front, FAIL_FAST.replace(http_engine=engine)))
    assert isinstance(err, (fastload.TransferError, fastload.IntegrityError)), f"{type(err).__name__}: {err}"
    assert url in str(err) and err.byte_range is not None


# == objects that change between HEAD and GET ==============================================================

@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_etag_changed_after_head_is_source_changed_never_mixed(s3_server, s3_bucket, s3_proxy, tmp_path, engine):
    file, want = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    s3_proxy.faults.change_etag_after(1, path=f"/{s3_bucket}/m.safetensors")  # the HEAD sees the old one
    url = f"s3://{s3_bucket}/m.safetensors"
    config = FAIL_FAST.replace(http_engine=engine, s3=fastload.S3Options(endpoint_url=s3_proxy.url.rstrip("/")))
    with pytest.raises(fastload.SourceChangedError) as info:
        with fastload.stream(url, config=config) as s:
            for name, tensor in s:
                raise AssertionError(f"a tensor of a changed object was handed out: {name}")
    assert url in str(info.value)


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_etag_changed_by_a_store_ignoring_if_match_is_source_changed(s3_server, s3_bucket, front, tmp_path, engine):
    """An S3-compatible store that ignores If-Match but reports the new ETag on a chunk GET: SourceChangedError,
    and no tensor from the mixed bytes."""
    file, want = write_checkpoint(tmp_path / "m.safetensors")
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    state = {"gets": 0}

    def after(method, target, headers, reply):
        if is_presigned_get(method, target):
            state["gets"] += 1
            if state["gets"] >= 4:
                return with_header(reply, "ETag", '"0123456789abcdef0123456789abcdef"')
        return None

    front.after = after
    url = f"s3://{s3_bucket}/m.safetensors"
    seen = {}
    with pytest.raises(fastload.SourceChangedError) as info:
        with fastload.stream(url, config=via(front, FAIL_FAST.replace(http_engine=engine, max_concurrency=1))) as s:
            for name, tensor in s:
                seen[name] = tensor
    assert url in str(info.value)
    for name, tensor in seen.items():
        assert torch.equal(tensor, want[name]), name


# == listings: url-encoded keys, sub-prefixes only, object and prefix ======================================

ENCODED_KEYS = ["p/a%20b.safetensors", "p/c+d e.safetensors", "p/ünï 模型.safetensors", "p/x%2By+.safetensors"]


def test_url_encoded_listing_round_trips_keys_into_load_and_pull(s3_server, s3_bucket, front, tmp_path):
    want = {}
    for i, key in enumerate(ENCODED_KEYS):
        path, tensors = small_file(tmp_path, seed=i)
        s3_server.put(s3_bucket, key, path.read_bytes())
        want.update(tensors)
    got, _ = load_checked(f"s3://{s3_bucket}/p/", {front.port}, via(front))
    assert_bit_exact(ok(got), want)
    lists = [t for m, t, _ in front.requests() if is_list(m, t)]
    assert lists and all("encoding-type=url" in t for t in lists), lists
    dest = tmp_path / "out"
    fastload.pull(f"s3://{s3_bucket}/p/", to=dest, config=via(front))
    names = sorted(p.name for p in dest.iterdir() if not p.name.startswith("."))
    assert names == sorted(k.split("/", 1)[1] for k in ENCODED_KEYS)


@pytest.mark.parametrize("suffix", ["/", ""])
def test_prefix_with_only_sub_prefixes_is_not_found_naming_it(s3_server, s3_bucket, tmp_path, suffix):
    path, _ = small_file(tmp_path)
    s3_server.put(s3_bucket, "models/a/model.safetensors", path.read_bytes())
    s3_server.put(s3_bucket, "models/b/model.safetensors", path.read_bytes())
    url = f"s3://{s3_bucket}/models{suffix}"
    err, _ = load_checked(url, set(), FAIL_FAST)
    assert isinstance(err, fastload.SourceNotFoundError), f"{type(err).__name__}: {err}"
    assert f"s3://{s3_bucket}/models" in str(err)


def test_key_that_is_both_an_object_and_a_prefix_is_the_object_in_load_plan_and_pull(s3_server, s3_bucket, tmp_path):
    """README: 'An S3 key without a file extension is that object when it exists, else the prefix'."""
    obj, want = small_file(tmp_path, seed=1)
    other, _ = small_file(tmp_path, seed=2)
    s3_server.put(s3_bucket, "ck", obj.read_bytes())
    s3_server.put(s3_bucket, "ck/model.safetensors", other.read_bytes())
    url = f"s3://{s3_bucket}/ck"
    assert_bit_exact(fastload.load(url, config=FAIL_FAST), want)
    assert {t.name for t in fastload.plan(url, config=FAIL_FAST).tensors} == set(want)
    dest = tmp_path / "out"
    fastload.pull(url, to=dest, config=FAIL_FAST)
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()
                   and not p.relative_to(dest).as_posix().startswith("."))
    assert files == ["ck"]
    assert (dest / "ck").read_bytes() == obj.read_bytes()


# == credentials ===========================================================================================

def test_session_token_goes_with_head_list_and_presigned_get(s3_server, s3_bucket, front, tmp_path, monkeypatch):
    token = "FQoGZXIvYXdzEAudit2SessionToken//+=="
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAAUDITTEMPORARY01")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "temp-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    p1, w1 = small_file(tmp_path, seed=1)
    s3_server.put(s3_bucket, "ck/x-1.safetensors", p1.read_bytes())
    got, _ = load_checked(f"s3://{s3_bucket}/ck/", {front.port}, via(front))
    assert_bit_exact(ok(got), w1)
    seen = front.requests()
    assert seen
    for method, target, headers in seen:
        if is_presigned_get(method, target):
            assert parse_qs(urlsplit(target).query).get("X-Amz-Security-Token") == [token], target
        else:
            assert headers.get("x-amz-security-token") == token, (method, target)
    assert any(is_presigned_get(m, t) for m, t, _ in seen) and any(is_list(m, t) for m, t, _ in seen)
    assert all(_credential(t, h)[0] == "ASIAAUDITTEMPORARY01" for m, t, h in seen)
