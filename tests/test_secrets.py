"""Credentials, presigned query strings and Authorization headers never show up.

Not in error messages, not anywhere in a printed exception chain, not in logs
(fastload's and aiohttp's, at DEBUG), not in traces or their exports, not in
plans, not in the CLI's output -- on success and on every kind of failure.
"""

from __future__ import annotations

import json
import logging
import re
import traceback

import aiohttp
import pytest

import fastload
from fastload.cli import main
from fastload.redact import describe, redact_text, redact_url, scrub
from reliability_helpers import QUICK, private_tmp, write_checkpoint  # noqa: F401

TOKEN = "tok-SECRET-7f3a9c"  # an Authorization header value
SIGNATURE = "sig-SECRET-55d1e0"  # a presigned URL's signature
PASSWORD = "pw-SECRET-c0ffee"  # a user:password URL's password
SECRET_KEY = "aws-SECRET-KEY-0b1c2d3e4f"  # AWS secret access key
SECRETS = (TOKEN, SIGNATURE, PASSWORD, SECRET_KEY, "SECRET")

FAST_FAIL = QUICK.replace(stall_timeout_s=0.3, retry=fastload.RetryConfig(
    max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02, deadline_s=5.0))


def everything_said(exc: BaseException | None, trace: fastload.Trace, caplog, extra: str = "") -> str:
    """All the text a user or an operator could see after a load."""
    parts = [extra, caplog.text, json.dumps(trace.to_dict(), default=str), json.dumps(trace.to_chrome(), default=str),
             str(trace.summary())]
    parts += [r.getMessage() for r in caplog.records]
    if exc is not None:
        parts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
        seen = exc
        while seen is not None:  # every link of the chain, with its attributes
            parts += [str(seen), repr(seen), repr(vars(seen)) if hasattr(seen, "__dict__") else ""]
            seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked: ...{text[max(0, text.find(secret) - 200):][:400]}..."


@pytest.fixture
def debug_logs(caplog):
    caplog.set_level(logging.DEBUG)  # every logger, at DEBUG
    return caplog


@pytest.fixture
def served(http_server, http_dir):
    file, tensors = write_checkpoint(http_dir / "model.safetensors", count=2)
    return http_server.url_for(file), tensors


HTTP_FAULTS = {
    "none": lambda f: None,
    "always_503": lambda f: f.random_errors(1.0, (503,)),
    "hang": lambda f: f.hang(),
    "cut_before_body": lambda f: f.cut_after(0),
    "not_found": lambda f: f.fail_first(1, 404),
    "forbidden": lambda f: f.fail_first(1, 403),
    "range_ignored": lambda f: f.ignore_range(),
    "etag_changes": lambda f: f.change_etag_after(2),
}


@pytest.mark.parametrize("fault", sorted(HTTP_FAULTS))
def test_http_secrets_never_show(served, http_server, debug_logs, fault):
    url, _ = served
    host = url.split("//", 1)[1]
    sources = {
        "presigned": f"{url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SIGNATURE}&X-Amz-Expires=60",
        "userinfo": f"http://user:{PASSWORD}@{host}",
    }
    for kind, source in sources.items():
        http_server.faults.clear()
        HTTP_FAULTS[fault](http_server.faults)
        # A header for the presigned URL; the password URL carries its own credentials (both is a ConfigError).
        config = FAST_FAIL.replace(http_headers={"Authorization": f"Bearer {TOKEN}"} if kind == "presigned" else {})
        trace = fastload.Trace()
        error = None
        try:
            fastload.load(source, config=config, trace=trace)
            plan_text = str(fastload.plan(source, config=config)) + fastload.plan(source, config=config).to_json()
        except fastload.FastloadError as exc:
            error, plan_text = exc, ""
        if fault != "none":
            assert error is not None, f"{kind}: the fault should have failed the load"
            assert "***" in str(error) or kind == "userinfo" and "user:" not in str(error)
        assert_clean(everything_said(error, trace, debug_logs, plan_text))
    assert any(r.status for r in http_server.log) or fault == "hang"  # the server really was asked


def test_s3_credentials_and_presigned_urls_never_show(s3_server, s3_proxy, s3_bucket, tmp_path, debug_logs,
                                                       monkeypatch, capsys):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    file, _ = write_checkpoint(tmp_path / "model.safetensors", count=2)
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    url = f"s3://{s3_bucket}/m.safetensors"
    config = FAST_FAIL.replace(s3=fastload.S3Options(endpoint_url=s3_proxy.url))
    for setup in (lambda f: None, lambda f: f.random_errors(1.0, (503,)), lambda f: f.hang(),
                  lambda f: f.fail_first(1, 403), lambda f: f.cut_after(0)):
        s3_proxy.faults.clear()
        setup(s3_proxy.faults)
        trace = fastload.Trace()
        error = None
        try:
            fastload.load(url, config=config, trace=trace)
        except fastload.FastloadError as exc:
            error = exc
        said = everything_said(error, trace, debug_logs)
        assert SECRET_KEY not in said  # not even botocore logs the secret key
        # botocore's own DEBUG logs print request signatures (its behaviour, documented); ours never do.
        ours = everything_said(error, trace, _OnlyNotBotocore(debug_logs))
        assert_clean(ours)
        assert not re.search(r"X-Amz-Signature=(?!\*\*\*)", ours) and "AKIDTESTEXAMPLE" not in ours
    assert s3_proxy.log, "the proxy was used"


class _OnlyNotBotocore:
    """caplog's records without botocore's (whose DEBUG output includes signed request headers)."""

    def __init__(self, caplog):
        self.records = [r for r in caplog.records if not r.name.startswith(("botocore", "urllib3"))]
        self.text = "\n".join(r.getMessage() for r in self.records)


def test_authorization_header_with_password_url_is_a_config_error(served, debug_logs):
    url, _ = served
    source = f"http://user:{PASSWORD}@{url.split('//', 1)[1]}"
    config = FAST_FAIL.replace(http_headers={"Authorization": f"Bearer {TOKEN}"})
    trace = fastload.Trace()
    with pytest.raises(fastload.ConfigError, match="(?i)authorization") as info:
        fastload.load(source, config=config, trace=trace)
    assert_clean(everything_said(info.value, trace, debug_logs))


def test_cli_output_hides_presigned_query(served, capsys):
    url, _ = served
    source = f"{url}?X-Amz-Signature={SIGNATURE}"
    assert main(["inspect", source]) == 0
    assert main(["load", source]) == 0
    out = capsys.readouterr()
    assert_clean(out.out + out.err)
    assert main(["load", source + "x", "--chunk-size", "64KiB"]) in (0, 1)  # whatever happens, quietly
    out = capsys.readouterr()
    assert_clean(out.out + out.err)


# -- the redaction functions, on the exceptions aiohttp really raises ------------------------------

def test_scrub_aiohttp_exceptions_that_embed_the_url():
    presigned = f"http://h:1/k?X-Amz-Signature={SIGNATURE}&X-Amz-Credential=AKID%2F1"
    timeout = aiohttp.ConnectionTimeoutError(f"Connection timeout to host {presigned}")
    invalid = aiohttp.InvalidURL(presigned, "bad")
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    info = aiohttp.RequestInfo(URL(presigned), "GET", CIMultiDictProxy(CIMultiDict(Authorization=f"Bearer {TOKEN}")),
                               URL(presigned))
    response_error = aiohttp.ClientResponseError(info, (), status=500, message="boom")
    for exc in (timeout, invalid, response_error):
        scrub(exc)
        assert_clean(str(exc) + repr(exc) + describe(exc) + "".join(traceback.format_exception(exc)))


def test_redact_url_and_text():
    assert redact_url(f"https://u:{PASSWORD}@h/p?a={SIGNATURE}&b") == "https://u:***@h/p?a=***&b=***"
    assert redact_url("/local/path?x") == "/local/path?x" and redact_url("s3://b/k") == "s3://b/k"
    text = redact_text(f"GET http://h/p?X-Amz-Signature={SIGNATURE} Authorization: Bearer {TOKEN}")
    assert_clean(text)
    assert "http://h/p?X-Amz-Signature=***" in text
