"""HTTP and S3 servers that misbehave in ways the other suites do not cover.

Every case runs against a real server on 127.0.0.1: the shared ``RangeHTTPServer`` /
``FaultProxy`` / moto fixtures, or ``Scripted`` below, a small ranged file server
whose replies a test can rewrite per request (what the fault rules cannot express:
a gzip-encoded range, a different total size, weak ETags, odd 5xx codes). Each load
either succeeds bit-exact or raises a typed fastload error naming the URL, quickly,
leaving no thread or socket behind.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import shutil
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from typing import Callable

import pytest
import torch

import fastload
from fastload.trace import Trace
from reliability_helpers import (QUICK, Leaks, ScriptedHTTP, Timer, assert_bit_exact, data_start,  # noqa: F401
                                 load_checked, private_tmp, write_checkpoint)
from servers import FaultProxy, Faults
from servers.faults import FailWith, FaultPlan

FAST_RETRY = fastload.RetryConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, deadline_s=5.0)
CFG = QUICK.replace(retry=FAST_RETRY, stall_timeout_s=1.0)
ENGINES = ["threads", "aiohttp"]


# -- a scripted ranged file server ---------------------------------------------------------------

@dataclass
class Req:
    n: int  # 0-based index of this GET
    path: str
    range: tuple[int, int] | None  # half-open, as asked
    headers: dict


@dataclass
class Answer:
    status: int
    headers: dict
    body: bytes = b""
    chunked: bool = False  # Transfer-Encoding: chunked instead of Content-Length
    close: bool = False
    stall_after: int | None = None  # send this many body bytes, then nothing until the client leaves


class Scripted(ScriptedHTTP):
    """Serves ``files`` (path -> bytes) with single byte ranges; ``script(req, default)`` may rewrite a reply."""

    def __init__(self, files: dict[str, bytes], script: Callable[[Req, Answer], Answer] | None = None,
                 etag: str | None = '"v1"', last_modified: str | None = None):
        super().__init__()
        self.files = files
        self.script = script or (lambda req, ans: ans)
        self.etag = etag
        self.last_modified = last_modified if last_modified is not None else formatdate(1_700_000_000, usegmt=True)
        self.requests: list[Req] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def default(self, path: str, rng: tuple[int, int] | None) -> Answer:
        data = self.files.get(path)
        if data is None:
            return Answer(404, {"Content-Type": "text/plain"}, b"not found")
        common = {}
        if self.etag:
            common["ETag"] = self.etag
        if self.last_modified:
            common["Last-Modified"] = self.last_modified
        if rng is None:
            return Answer(200, common, data)
        start, end = rng
        if start >= len(data):
            return Answer(416, {**common, "Content-Range": f"bytes */{len(data)}"})
        end = min(end, len(data))
        return Answer(206, {**common, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}, data[start:end])

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", h.headers.get("Range", ""))
        rng = (int(m.group(1)), int(m.group(2)) + 1) if m else None
        path = h.path.split("?", 1)[0]
        with self.lock:
            req = Req(len(self.requests), path, rng, dict(h.headers.items()))
            self.requests.append(req)
        ans = self.script(req, self.default(path, rng))
        h.send_response_only(ans.status)
        for name, value in ans.headers.items():
            h.send_header(name, value)
        if ans.chunked:
            h.send_header("Transfer-Encoding", "chunked")
        elif "Content-Length" not in ans.headers and not ans.close:
            h.send_header("Content-Length", str(len(ans.body)))
        if ans.close:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        try:
            body = ans.body if ans.stall_after is None else ans.body[:ans.stall_after]
            if ans.chunked:
                for i in range(0, len(body), 4096):
                    piece = body[i:i + 4096]
                    h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                if ans.stall_after is None:
                    h.wfile.write(b"0\r\n\r\n")
            else:
                h.wfile.write(body)
            h.wfile.flush()
            if ans.stall_after is not None:
                h.close_connection = True
                while not self.stopping.wait(0.05):
                    try:
                        h.connection.settimeout(0)
                        if h.connection.recv(1) == b"":
                            return
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
        except OSError:
            h.close_connection = True


@pytest.fixture
def ckpt(tmp_path):
    file, tensors = write_checkpoint(tmp_path / "model.safetensors", count=3)
    return file.read_bytes(), tensors


# -- content encoding ----------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_gzip_encoded_ranged_reply_never_reaches_a_tensor(ckpt, engine):
    """A server that gzips tensor ranges despite ``Accept-Encoding: identity`` (chunked, no Content-Length).

    Content-Range is right, so only Content-Encoding tells that the body is not the bytes asked for.
    """
    raw, tensors = ckpt
    start = data_start(raw)

    def script(req: Req, ans: Answer) -> Answer:
        if ans.status == 206 and req.range[0] >= start:  # tensor bytes only; the header reads are honest
            return Answer(206, {**ans.headers, "Content-Encoding": "gzip"}, gzip.compress(ans.body), chunked=True)
        return ans

    with Scripted({"/m.safetensors": raw}, script) as srv:
        got, _ = load_checked(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    assert isinstance(got, fastload.FastloadError), "a gzip body was accepted as tensor bytes"
    assert "m.safetensors" in str(got)


@pytest.mark.parametrize("engine", ENGINES)
def test_chunked_range_that_runs_on_past_its_end_is_refused(ckpt, engine):
    """Right Content-Range, identity, chunked (no Content-Length), but the body goes on past the range:
    not the range's bytes. The threaded engine must look past the range's end to see it."""
    raw, tensors = ckpt
    start = data_start(raw)

    def script(req: Req, ans: Answer) -> Answer:
        if ans.status == 206 and req.range[0] >= start:
            return Answer(206, ans.headers, ans.body + b"trailing junk", chunked=True)
        return ans

    with Scripted({"/m.safetensors": raw}, script) as srv:
        got, _ = load_checked(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    assert isinstance(got, fastload.TransferError), got
    assert "more than" in str(got) and "m.safetensors" in str(got)


# -- status codes ------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [520, 522, 524])
def test_transient_5xx_from_a_cdn_is_retried(ckpt, status):
    """Cloudflare-style 52x answers are transient 5xx: one of them must not fail the load."""
    raw, tensors = ckpt
    start = data_start(raw)
    fired = []

    def script(req: Req, ans: Answer) -> Answer:
        if req.range and req.range[0] >= start and not fired:
            fired.append(req.n)
            return Answer(status, {"Content-Type": "text/plain"}, b"origin timed out")
        return ans

    with Scripted({"/m.safetensors": raw}, script) as srv:
        got, _ = load_checked(srv.url("/m.safetensors"), {srv.port}, CFG)
    assert fired
    assert not isinstance(got, Exception), f"{type(got).__name__}: {got}"
    assert_bit_exact(got, tensors)


def test_401_is_a_permission_error_not_retried(http_server, http_dir):
    file, _ = write_checkpoint(http_dir / "model.safetensors", count=2)
    rule = http_server.faults.fail_first(1, 401)
    trace = Trace()
    err, _ = load_checked(http_server.url_for(file), {http_server.port}, CFG, trace=trace)
    assert isinstance(err, fastload.SourcePermissionError) and isinstance(err, PermissionError), err
    assert "model.safetensors" in str(err) and rule.fired == 1
    assert not trace.summary().counters.get("retries")


def test_416_mid_load_is_source_changed(ckpt):
    """The object shrank after the headers were read: 416 for the tensor bytes."""
    raw, _ = ckpt
    start = data_start(raw)

    def script(req: Req, ans: Answer) -> Answer:
        if req.range and req.range[0] >= start:
            return Answer(416, {"ETag": '"v1"', "Content-Range": f"bytes */{start}"})
        return ans

    with Scripted({"/m.safetensors": raw}, script) as srv:
        err, _ = load_checked(srv.url("/m.safetensors"), {srv.port}, CFG)
    assert isinstance(err, fastload.SourceChangedError), err
    assert "m.safetensors" in str(err) and "bytes [" in str(err)


def test_206_naming_another_total_size_is_source_changed(ckpt):
    raw, _ = ckpt
    start = data_start(raw)

    def script(req: Req, ans: Answer) -> Answer:
        if ans.status == 206 and req.range[0] >= start:
            a, b = req.range
            return Answer(206, {**ans.headers, "Content-Range": f"bytes {a}-{b - 1}/{len(raw) + 4096}"}, ans.body)
        return ans

    with Scripted({"/m.safetensors": raw}, script) as srv:
        err, _ = load_checked(srv.url("/m.safetensors"), {srv.port}, CFG)
    assert isinstance(err, fastload.SourceChangedError), err
    assert "size changed" in str(err) and "m.safetensors" in str(err) and "bytes [" in str(err)


# -- validators ----------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("validator", ["weak_etag", "last_modified_only"])
def test_validator_change_mid_load_is_detected(ckpt, engine, validator):
    """A weak ETag (no If-Match is sent) or, without any ETag, Last-Modified changes after the headers."""
    raw, _ = ckpt
    start = data_start(raw)
    weak = validator == "weak_etag"

    def script(req: Req, ans: Answer) -> Answer:
        if req.range and req.range[0] >= start:
            if weak:
                assert "If-Match" not in req.headers
                ans.headers["ETag"] = 'W/"v2"'
            else:
                ans.headers["Last-Modified"] = formatdate(1_800_000_000, usegmt=True)
        return ans

    with Scripted({"/m.safetensors": raw}, script, etag='W/"v1"' if weak else None) as srv:
        err, _ = load_checked(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    assert isinstance(err, fastload.SourceChangedError), err
    assert "m.safetensors" in str(err)


# -- stalls ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_body_stalling_midway_hits_the_stall_timeout_and_resumes(ckpt, engine):
    """The first three big tensor reads stall after 10 kB: each is cut by the stall timeout and resumed."""
    raw, tensors = ckpt
    stalled = []

    def script(req: Req, ans: Answer) -> Answer:
        if ans.status == 206 and len(ans.body) > 20_000 and len(stalled) < 3:
            stalled.append(req.range)
            ans.stall_after = 10_000
        return ans

    trace = Trace()
    config = CFG.replace(http_engine=engine, stall_timeout_s=0.3)
    with Scripted({"/m.safetensors": raw}, script) as srv:
        got, _ = load_checked(srv.url("/m.safetensors"), {srv.port}, config, trace=trace)
    assert not isinstance(got, Exception), f"{type(got).__name__}: {got}"
    assert_bit_exact(got, tensors)
    assert len(stalled) == 3 and trace.summary().counters.get("retries", 0) >= 3


@pytest.mark.parametrize("engine", ENGINES)
def test_body_stalling_every_time_fails_with_transfer_error(ckpt, engine):
    raw, _ = ckpt
    start = data_start(raw)

    def script(req: Req, ans: Answer) -> Answer:
        if ans.status == 206 and req.range[0] >= start:
            ans.stall_after = 0  # headers, then silence
        return ans

    config = CFG.replace(http_engine=engine, stall_timeout_s=0.3)
    with Scripted({"/m.safetensors": raw}, script) as srv:
        err, _ = load_checked(srv.url("/m.safetensors"), {srv.port}, config)
    assert isinstance(err, fastload.TransferError), err
    assert "m.safetensors" in str(err) and "bytes [" in str(err) and err.attempts == FAST_RETRY.max_attempts


# -- redirects -------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_redirect_loop_fails_with_transfer_error(ckpt, engine):
    raw, _ = ckpt

    def script(req: Req, ans: Answer) -> Answer:
        return Answer(302, {"Location": "/a" if req.path == "/b" else "/b"})

    with Scripted({"/a": raw}, script) as srv:
        err, _ = load_checked(srv.url("/a"), {srv.port}, CFG.replace(http_engine=engine))
    assert isinstance(err, fastload.TransferError), err
    assert srv.url("/a") in str(err)


# -- a failed load leaves nothing running, also in the caller's event loop --------------------------

@pytest.mark.parametrize("stage", ["stat", "header"])
def test_failed_aload_leaves_no_task_socket_or_thread_in_the_callers_loop(http_server, http_dir, stage):
    """One source of a list fails fast while another is still being read (slow first byte).

    ``aload`` runs in the caller's loop, which goes on after the error: the other source's read must
    not go on (retrying, reopening a session or a thread pool) after the load has failed and closed.
    """
    good, _ = write_checkpoint(http_dir / "good.safetensors", count=2)
    if stage == "stat":
        bad_url = http_server.url_for(good).replace("good.safetensors", "absent.safetensors")  # 404
        http_server.faults.slow_first_byte(0.4, times=1, path="*/good.safetensors")  # the size probe
    else:
        bad = http_dir / "bad.safetensors"
        bad.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")  # header length far past the end
        bad_url = http_server.url_for(bad)
        http_server.faults.slow_first_byte(0.4, path="*/good.safetensors")  # every GET, header read included
    sources = [http_server.url_for(good), bad_url]
    expected = fastload.SourceNotFoundError if stage == "stat" else fastload.FormatError
    config = CFG.replace(retry=fastload.RetryConfig(max_attempts=4, backoff_base_s=0.05, backoff_max_s=0.1))

    async def main():
        with pytest.raises(expected):
            await fastload.aload(sources, config=config)
        await asyncio.sleep(0.6)  # the server logs a request when it answers: after the 0.4 s delay
        before = len(http_server.log)
        await asyncio.sleep(1.5)  # the caller's loop keeps running
        after = len(http_server.log)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return before, after, pending

    with Leaks({http_server.port}) as leaks:
        before, after, pending = asyncio.run(main())
        leaks.check(grace_s=0.5)
    assert not pending, f"tasks still running in the caller's loop after the load failed: {pending}"
    assert after == before, f"{after - before} requests after the load had failed"


def test_index_naming_a_missing_shard_is_not_found(http_server, http_dir, llama_sharded_checkpoint):
    directory = http_dir / "ckpt"
    shutil.copytree(llama_sharded_checkpoint, directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    missing = sorted(set(index["weight_map"].values()))[1]
    (directory / missing).unlink()
    err, _ = load_checked(http_server.url_for(directory) + "/", {http_server.port}, CFG)
    assert isinstance(err, fastload.SourceNotFoundError), err
    assert missing in str(err) and err.url.endswith(missing)
    assert not any(r.path.endswith(missing) and r.status == 404 and r.range is None for r in http_server.log)


# -- S3 ----------------------------------------------------------------------------------------------

class _NoEtagPlan(FaultPlan):
    def rewrite_response(self, status, headers):
        return [(n, v) for n, v in super().rewrite_response(status, headers) if n.lower() != "etag"]


class NoEtag(Faults):
    """Faults for a proxy in front of moto: an S3-compatible store that sends no ETag (HEAD and GET)."""

    def plan(self, method, path):
        plan = super().plan(method, path)
        plan.__class__ = _NoEtagPlan
        return plan


def test_s3_store_without_etag_loads(s3_server, s3_bucket, tmp_path):
    """Without an ETag the load pins Last-Modified: HEAD's (botocore datetime) and GET's (HTTP date) are
    the same instant and must compare equal."""
    file, tensors = write_checkpoint(tmp_path / "model.safetensors", count=2)
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    with FaultProxy(s3_server.endpoint_url, NoEtag()) as proxy:
        config = CFG.replace(s3=fastload.S3Options(endpoint_url=proxy.url))
        got, _ = load_checked(f"s3://{s3_bucket}/m.safetensors", {proxy.port}, config)
    assert not isinstance(got, Exception), f"{type(got).__name__}: {got}"
    assert_bit_exact(got, tensors)


def test_s3_object_overwritten_mid_load_never_mixes_versions(s3_server, s3_bucket, tmp_path):
    file, tensors = write_checkpoint(tmp_path / "model.safetensors", count=3)
    other, _ = write_checkpoint(tmp_path / "other.safetensors", seed=1, count=3)
    new_bytes = other.read_bytes()
    assert len(new_bytes) == file.stat().st_size and new_bytes != file.read_bytes()
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    done = []

    def overwrite(done_bytes, total):
        if not done:
            done.append(done_bytes)
            s3_server.put(s3_bucket, "m.safetensors", new_bytes)

    seen = {}
    with pytest.raises(fastload.SourceChangedError, match="m.safetensors"):
        with fastload.stream(f"s3://{s3_bucket}/m.safetensors", config=CFG.replace(max_concurrency=1),
                             progress=overwrite) as s:
            for name, tensor in s:
                seen[name] = tensor
    assert done
    for name, tensor in seen.items():
        assert torch.equal(tensor, tensors[name]), name


@pytest.mark.parametrize("as_dir", [False, True])
def test_s3_no_such_bucket_is_not_found(s3_server, as_dir):
    url = "s3://no-such-bucket-audit/ckpt/" if as_dir else "s3://no-such-bucket-audit/m.safetensors"
    trace = Trace()
    with Timer() as timer:
        with pytest.raises(fastload.SourceNotFoundError) as info:
            fastload.load(url, config=CFG, trace=trace)
    assert "no-such-bucket-audit" in str(info.value) and isinstance(info.value, FileNotFoundError)
    assert timer.s < 5 and not trace.summary().counters.get("retries")


def test_s3_access_denied_on_head_is_a_permission_error(s3_server, s3_proxy, s3_bucket, tmp_path):
    """A policy that denies the object denies its GETs and its HEAD: the first GET's 403, then the HEAD's, which
    decides (a GET's 403 alone may be a stale signature). Not retried."""
    file, _ = write_checkpoint(tmp_path / "model.safetensors", count=2)
    s3_server.put(s3_bucket, "m.safetensors", file.read_bytes())
    rule = s3_proxy.faults._add(FailWith(pattern=f"/{s3_bucket}/m.safetensors", methods=frozenset({"HEAD", "GET"}),
                                         status=403))
    trace = Trace()
    config = CFG.replace(s3=fastload.S3Options(endpoint_url=s3_proxy.url))
    err, _ = load_checked(f"s3://{s3_bucket}/m.safetensors", {s3_proxy.port}, config, trace=trace)
    assert isinstance(err, fastload.SourcePermissionError), err
    assert f"s3://{s3_bucket}/m.safetensors" in str(err)
    assert rule.fired == 2 and not trace.summary().counters.get("retries")
