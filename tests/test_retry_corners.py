"""Retries and timeouts at their corners, against real servers on 127.0.0.1.

What tests/test_faults.py and tests/test_misbehaving_servers.py do not already pin down:
Retry-After (seconds and HTTP-date, bounded by backoff_max_s), the cause a deadline
reports, connection resets (RST) mid-body on both body engines, a slow but steady
server that must not be killed, max_attempts=1 meaning no retry, exact retry counts
in the trace, time bounds, and S3 metadata statuses the README says are retried.
"""

from __future__ import annotations

import socket
import struct
import time
from email.utils import formatdate
from functools import partial
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

import pytest

import fastload
from fastload.trace import Trace
from reliability_helpers import (QUICK, Leaks, ScriptedHTTP, Timer, assert_bit_exact, data_start,  # noqa: F401
                                 load_checked, private_tmp, write_checkpoint)
from servers.faults import CutAfter, FailWith

ENGINES = ["threads", "aiohttp"]


class StallNth(CutAfter):
    """Stall after ``nbytes`` on the 3rd and 4th matching GET only."""

    def wants_to_fire(self) -> bool:
        return self.seen in (3, 4)


def retry(**kw) -> fastload.RetryConfig:
    base = dict(max_attempts=4, backoff_base_s=0.001, backoff_max_s=0.01, deadline_s=10.0)
    base.update(kw)
    return fastload.RetryConfig(**base)


# -- a small scripted ranged server: what the fault rules cannot express -------------------------

class Act:
    """How to answer one GET: a status/headers override, or a body trickled or cut by a reset."""

    def __init__(self, status: int | None = None, headers: dict | None = None, rst_after: int | None = None,
                 trickle: tuple[int, float] | None = None):
        self.status = status
        self.headers = headers or {}
        self.rst_after = rst_after  # send this many body bytes, then reset the connection (RST)
        self.trickle = trickle  # (pieces, pause): the body in this many pieces with a pause before each


class Server(ScriptedHTTP):
    def __init__(self, raw: bytes, plan: Callable[[int, tuple[int, int] | None], Act | None]):
        super().__init__()
        self.raw = raw
        self.plan = plan
        self.log: list[tuple[float, tuple[int, int] | None, int]] = []  # (time, range, status)
        self.httpd.handle_error = lambda *a: None  # resets we make ourselves are expected

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/m.safetensors"

    def tensor_requests(self) -> list:
        start = data_start(self.raw)
        return [r for r in self.log if r[1] and r[1][0] >= start]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        import re

        m = re.fullmatch(r"bytes=(\d+)-(\d+)", h.headers.get("Range", ""))
        rng = (int(m.group(1)), min(int(m.group(2)) + 1, len(self.raw))) if m else None
        with self.lock:
            n = len(self.log)
        act = self.plan(n, rng) or Act()
        if act.status is not None:
            body = b"busy\n"
            with self.lock:
                self.log.append((time.monotonic(), rng, act.status))
            h.send_response_only(act.status)
            for k, v in act.headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        a, b = rng if rng else (0, len(self.raw))
        body = self.raw[a:b]
        with self.lock:
            self.log.append((time.monotonic(), rng, 206 if rng else 200))
        h.send_response_only(206 if rng else 200)
        h.send_header("ETag", '"v1"')
        h.send_header("Content-Length", str(len(body)))
        if rng:
            h.send_header("Content-Range", f"bytes {a}-{b - 1}/{len(self.raw)}")
        for k, v in act.headers.items():
            h.send_header(k, v)
        h.end_headers()
        try:
            if act.rst_after is not None:
                h.wfile.write(body[:act.rst_after])
                h.wfile.flush()
                time.sleep(0.05)  # let the bytes leave before the reset
                h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                h.connection.close()  # linger 0: RST, not FIN
                h.close_connection = True
                return
            if act.trickle is not None:
                pieces, pause = act.trickle
                step = -(-len(body) // pieces)
                for i in range(0, len(body), step):
                    time.sleep(pause)
                    h.wfile.write(body[i:i + step])
                    h.wfile.flush()
                return
            h.wfile.write(body)
        except OSError:
            h.close_connection = True


@pytest.fixture
def ckpt(tmp_path):
    file, tensors = write_checkpoint(tmp_path / "m.safetensors", count=2)
    return file.read_bytes(), tensors


load_checked = partial(load_checked, bound_s=8.0)  # retries with backoff: a little more time


# -- Retry-After ----------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_retry_after_seconds_is_waited_for(ckpt, engine):
    """503 + Retry-After: 1 with backoff_max_s=3: the retry waits about 1 s, not the tiny backoff."""
    raw, tensors = ckpt
    start = data_start(raw)
    fired = []

    def plan(n, rng):
        if rng and rng[0] >= start and not fired:
            fired.append(n)
            return Act(503, {"Retry-After": "1"})
        return None

    trace = Trace()
    config = QUICK.replace(http_engine=engine, retry=retry(backoff_max_s=3.0))
    with Server(raw, plan) as srv:
        got, seconds = load_checked(srv.url, {srv.port}, config, trace=trace)
        log = list(srv.log)
    assert not isinstance(got, Exception), got
    assert_bit_exact(got, tensors)
    failed = [i for i, r in enumerate(log) if r[2] == 503]
    assert len(failed) == 1
    again = [r for r in log[failed[0] + 1:] if r[1] == log[failed[0]][1]]
    assert again, "the refused range was never asked again"
    assert again[0][0] - log[failed[0]][0] >= 0.9, "Retry-After: 1 was not waited for"
    assert trace.summary().counters.get("retries") == 1


def test_retry_after_http_date_is_honoured(ckpt):
    """Retry-After may be an HTTP-date (RFC 9110 10.2.3); 429 with a date 3 s ahead must wait, not hammer."""
    raw, tensors = ckpt
    start = data_start(raw)
    fired = []

    def plan(n, rng):
        if rng and rng[0] >= start and not fired:
            fired.append(n)
            return Act(429, {"Retry-After": formatdate(time.time() + 3, usegmt=True)})
        return None

    config = QUICK.replace(retry=retry(backoff_max_s=5.0))
    with Server(raw, plan) as srv:
        got, _ = load_checked(srv.url, {srv.port}, config)
        log = list(srv.log)
    assert_bit_exact(got, tensors)
    failed = next(i for i, r in enumerate(log) if r[2] == 429)
    again = next(r for r in log[failed + 1:] if r[1] == log[failed][1])
    assert again[0] - log[failed][0] >= 1.5, (
        f"retried {again[0] - log[failed][0]:.2f} s after a 429 that asked for about 2-3 s (HTTP-date Retry-After ignored)")


def test_retry_after_beyond_backoff_max_is_bounded(ckpt):
    """Retry-After: 3600 with backoff_max_s=0.2: the load waits at most the cap, and succeeds."""
    raw, tensors = ckpt
    start = data_start(raw)
    fired = []

    def plan(n, rng):
        if rng and rng[0] >= start and len(fired) < 3:
            fired.append(n)
            return Act(503, {"Retry-After": "3600"})
        return None

    config = QUICK.replace(retry=retry(backoff_max_s=0.2))
    with Server(raw, plan) as srv:
        got, seconds = load_checked(srv.url, {srv.port}, config, bound_s=4.0)
    assert_bit_exact(got, tensors)
    assert seconds < 3.0


# -- the deadline names the real cause ----------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_deadline_error_chains_the_server_answer_not_a_phantom_attempt(ckpt, engine):
    """Every tensor GET gets 503 + Retry-After: 5; backoff_max_s=5 but deadline_s=0.8.

    The backoff sleeps until the deadline; the TransferError must still say what the server answered
    (HTTP 503, chained), and its attempts must be the requests actually made.
    """
    raw, _ = ckpt
    start = data_start(raw)

    def plan(n, rng):
        if rng and rng[0] >= start:
            return Act(503, {"Retry-After": "5"})
        return None

    config = QUICK.replace(http_engine=engine, max_concurrency=1,
                           retry=retry(max_attempts=8, backoff_max_s=5.0, deadline_s=0.8))
    with Server(raw, plan) as srv:
        err, seconds = load_checked(srv.url, {srv.port}, config)
        made = len(srv.tensor_requests())
    assert isinstance(err, fastload.TransferError), err
    assert "m.safetensors" in str(err) and err.byte_range is not None
    text = f"{err} <- {err.__cause__!r}"
    assert "503" in text, f"the last cause (HTTP 503) is lost: {text}"
    assert err.attempts == made, f"attempts={err.attempts} but the server saw {made} request(s)"


# -- connection reset mid-body, both engines ----------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cut", [0, 1, 5_000, 40_000])
def test_connection_reset_mid_body_is_retried_bit_exact(ckpt, engine, cut):
    """The first tensor GETs are reset (RST) after ``cut`` body bytes: retried, bytes exact."""
    raw, tensors = ckpt
    start = data_start(raw)
    fired = []

    def plan(n, rng):
        if rng and rng[0] >= start and rng[1] - rng[0] > cut and len(fired) < 3:
            fired.append(n)
            return Act(rst_after=cut)
        return None

    trace = Trace()
    config = QUICK.replace(http_engine=engine, retry=retry(max_attempts=4))
    with Server(raw, plan) as srv:
        got, _ = load_checked(srv.url, {srv.port}, config, trace=trace)
    assert len(fired) == 3
    assert not isinstance(got, Exception), f"{type(got).__name__}: {got}"
    assert_bit_exact(got, tensors)
    assert trace.summary().counters.get("retries", 0) >= 3


@pytest.mark.parametrize("engine", ENGINES)
def test_reset_every_time_fails_with_transfer_error_and_cause(ckpt, engine):
    raw, _ = ckpt
    start = data_start(raw)

    def plan(n, rng):
        if rng and rng[0] >= start:
            return Act(rst_after=0)
        return None

    config = QUICK.replace(http_engine=engine, retry=retry(max_attempts=3))
    with Server(raw, plan) as srv:
        err, _ = load_checked(srv.url, {srv.port}, config)
    assert isinstance(err, fastload.TransferError), err
    assert err.attempts == 3 and "m.safetensors" in str(err) and "bytes [" in str(err)
    assert err.__cause__ is not None and not isinstance(err.__cause__, fastload.FastloadError)


@pytest.mark.parametrize("engine", ENGINES)
def test_reset_mid_body_into_staged_converted_subset_leaves_no_stale_bytes(ckpt, engine):
    """names= subset, dtype conversion (staged buffers that are reused), resets mid-body: exact values."""
    import torch

    raw, tensors = ckpt
    start = data_start(raw)
    fired = []

    def plan(n, rng):
        if rng and rng[0] >= start and rng[1] - rng[0] > 3_000 and len(fired) < 4:
            fired.append(n)
            return Act(rst_after=(rng[1] - rng[0]) // 2 + 13)
        return None

    config = QUICK.replace(http_engine=engine, retry=retry(max_attempts=4))
    with Server(raw, plan) as srv:
        got, _ = load_checked(srv.url, {srv.port}, config, names=["w1", "ids"], dtype="float64")
    assert fired and not isinstance(got, Exception), got
    assert set(got) == {"w1", "ids"}
    assert torch.equal(got["w1"], tensors["w1"].to(torch.float64))
    assert torch.equal(got["ids"], tensors["ids"])


# -- stalls and slow-but-steady servers ---------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_slow_but_steady_server_is_not_killed(ckpt, engine):
    """Each tensor body arrives in 6 pieces 0.15 s apart (0.9 s per reply), stall timeout 0.5 s:
    bytes keep flowing, so nothing is retried and the load succeeds."""
    raw, tensors = ckpt
    start = data_start(raw)

    def plan(n, rng):
        if rng and rng[0] >= start:
            return Act(trickle=(6, 0.15))
        return None

    trace = Trace()
    config = QUICK.replace(http_engine=engine, stall_timeout_s=0.5, retry=retry(max_attempts=2))
    with Server(raw, plan) as srv:
        got, seconds = load_checked(srv.url, {srv.port}, config, bound_s=15.0, trace=trace)
        trickled = len(srv.tensor_requests())
    assert not isinstance(got, Exception), f"{type(got).__name__}: {got}"
    assert_bit_exact(got, tensors)
    assert not trace.summary().counters.get("retries"), "a steady reply was cut as a stall"
    assert trickled >= 1


@pytest.mark.parametrize("engine", ENGINES)
def test_stall_with_max_attempts_one_is_not_retried(http_server, http_dir, engine):
    """max_attempts=1 means no retry: a body that stalls fails after one stall timeout, one GET."""
    file, _ = write_checkpoint(http_dir / "model.safetensors", count=2)
    url = http_server.url_for(file)
    raw = file.read_bytes()
    start = data_start(raw)
    http_server.faults.stall_after(100, path="/" + url.split("/", 3)[3])
    trace = Trace()
    config = QUICK.replace(http_engine=engine, stall_timeout_s=0.3, max_concurrency=1,
                           retry=retry(max_attempts=1, backoff_max_s=0.0, backoff_base_s=0.0))
    # The 8-byte size probe is shorter than 100 bytes and goes through; the header read (longer) stalls.
    err, seconds = load_checked(url, {http_server.port}, config, trace=trace)
    assert isinstance(err, fastload.TransferError), err
    assert err.attempts == 1
    assert not trace.summary().counters.get("retries")
    assert seconds < 3.0
    assert start > 100


# -- exact retry accounting, 4xx fail fast, bounded time ----------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_retries_counter_is_exact(http_server, http_dir, engine):
    file, tensors = write_checkpoint(http_dir / "model.safetensors", count=2)
    url = http_server.url_for(file)
    rule = http_server.faults.fail_first(5, 503, path="/" + url.split("/", 3)[3])
    trace = Trace()
    config = QUICK.replace(http_engine=engine, retry=retry(max_attempts=8))
    got = fastload.load(url, config=config, trace=trace)
    assert_bit_exact(got, tensors)
    summary = trace.summary()
    assert rule.fired == 5
    assert summary.counters.get("retries") == 5
    assert "retries 5" in str(summary)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("status", [405, 409, 422, 451])
def test_other_4xx_fail_at_once(http_server, http_dir, engine, status):
    file, _ = write_checkpoint(http_dir / "model.safetensors", count=2)
    url = http_server.url_for(file)
    path = "/" + url.split("/", 3)[3]
    rule = http_server.faults._add(FailWith(pattern=path, times=None, status=status))  # from the first GET on
    trace = Trace()
    with Timer() as timer:
        with pytest.raises(fastload.TransferError, match=str(status)) as info:
            fastload.load(url, config=QUICK.replace(http_engine=engine, retry=retry(max_attempts=8, backoff_base_s=0.2,
                                                                                     backoff_max_s=0.5)),
                          trace=trace)
    assert rule.fired == 1, "a 4xx was retried"
    assert not trace.summary().counters.get("retries")
    assert info.value.url == url and timer.s < 1.0


@pytest.mark.parametrize("engine", ENGINES)
def test_exhausted_retries_take_bounded_time(http_server, http_dir, engine):
    """Always 503, max_attempts=8, backoff capped at 0.1 s: at most ~7 x 0.1 s of sleep per chunk."""
    file, _ = write_checkpoint(http_dir / "model.safetensors", count=2)
    url = http_server.url_for(file)
    http_server.faults.random_errors(1.0, (503,), path="/" + url.split("/", 3)[3])
    config = QUICK.replace(http_engine=engine, retry=retry(max_attempts=8, backoff_base_s=0.05, backoff_max_s=0.1))
    with Timer() as timer:
        with pytest.raises(fastload.TransferError, match="retries exhausted") as info:
            fastload.load(url, config=config)
    assert info.value.attempts == 8
    assert timer.s < 2.5, f"took {timer.s:.1f} s"


def test_probe_exhausted_names_its_byte_range(http_server, http_dir):
    """The size probe is a ranged GET of bytes [0, 8): its TransferError names the URL and that range."""
    file, _ = write_checkpoint(http_dir / "model.safetensors", count=2)
    url = http_server.url_for(file)
    http_server.faults.random_errors(1.0, (503,), path="/" + url.split("/", 3)[3])
    with pytest.raises(fastload.TransferError) as info:
        fastload.load(url, config=QUICK.replace(retry=retry(max_attempts=2)))
    assert info.value.url == url
    assert info.value.byte_range is not None, f"no byte range in {info.value}"


# -- S3 metadata: the statuses the README says are retried --------------------------------------

def s3_checkpoint(s3_server, bucket: str, key: str, path: Path) -> tuple[Path, dict]:
    """A two-tensor checkpoint written at ``path`` and put at ``s3://bucket/key``."""
    file, tensors = write_checkpoint(path, count=2)
    s3_server.put(bucket, key, file.read_bytes())
    return file, tensors


def through(s3_proxy, *, path_style: bool = False, **changes) -> fastload.LoadConfig:
    """QUICK with retries, reaching S3 through the fault proxy (path-style for LIST rules on ``/bucket``)."""
    s3 = fastload.S3Options(endpoint_url=s3_proxy.url, **({"addressing_style": "path"} if path_style else {}))
    return QUICK.replace(s3=s3, **{"retry": retry(), **changes})


@pytest.mark.parametrize("status", [408, 429, 503])
def test_s3_head_transient_statuses_are_retried(s3_server, s3_proxy, s3_bucket, tmp_path, status):
    """README: 408/429/5xx are retried, S3 HEAD included (asked when checksums are verified: it brings them)."""
    file, tensors = s3_checkpoint(s3_server, s3_bucket, "m.safetensors", tmp_path / "model.safetensors")
    rule = s3_proxy.faults._add(FailWith(pattern=f"/{s3_bucket}/m.safetensors", methods=frozenset({"HEAD"}),
                                         times=1, status=status))
    try:
        got = fastload.load(f"s3://{s3_bucket}/m.safetensors", config=through(s3_proxy, verify_checksums=True))
    except fastload.FastloadError as exc:
        pytest.fail(f"HEAD {status} once was not retried: {type(exc).__name__}: {exc}")
    assert_bit_exact(got, tensors)
    assert rule.fired == 1


def test_s3_head_retry_after_is_honoured(s3_server, s3_proxy, s3_bucket, tmp_path):
    """503 + Retry-After: 1 on HEAD, backoff_max_s=3: the retry waits for it (README: Retry-After honoured)."""
    file, tensors = s3_checkpoint(s3_server, s3_bucket, "m.safetensors", tmp_path / "model.safetensors")
    s3_proxy.faults._add(FailWith(pattern=f"/{s3_bucket}/m.safetensors", methods=frozenset({"HEAD"}),
                                  times=1, status=503, retry_after=1))
    with Timer() as timer:
        got = fastload.load(f"s3://{s3_bucket}/m.safetensors",
                            config=through(s3_proxy, retry=retry(backoff_max_s=3.0), verify_checksums=True))
    assert_bit_exact(got, tensors)
    assert timer.s >= 0.9, f"HEAD retried after {timer.s:.2f} s despite Retry-After: 1"


@pytest.mark.parametrize("status", [429, 500, 503])
def test_s3_first_get_transient_status_asks_the_head_instead(s3_server, s3_proxy, s3_bucket, tmp_path, status):
    """The first look at an object is a presigned GET of its first bytes, tried once: on a 429/5xx the HEAD
    asks instead (counted as a retry), and the load goes on bit-exact."""
    file, tensors = s3_checkpoint(s3_server, s3_bucket, "m.safetensors", tmp_path / "model.safetensors")
    rule = s3_proxy.faults._add(FailWith(pattern=f"/{s3_bucket}/m.safetensors", methods=frozenset({"GET"}),
                                         times=1, status=status))
    trace = fastload.Trace()
    got = fastload.load(f"s3://{s3_bucket}/m.safetensors", config=through(s3_proxy), trace=trace)
    assert_bit_exact(got, tensors)
    assert rule.fired == 1 and trace.summary().counters.get("retries") == 1
    assert [r.method for r in s3_proxy.log if r.path.endswith("/m.safetensors")][:2] == ["GET", "HEAD"]


def test_s3_list_503_is_retried(s3_server, s3_proxy, s3_bucket, tmp_path):
    """A prefix with no index is listed: a 503 on LIST is retried, then the shard loads."""
    file, tensors = s3_checkpoint(s3_server, s3_bucket, "pre/part.safetensors", tmp_path / "part.safetensors")
    rule = s3_proxy.faults._add(FailWith(pattern=f"/{s3_bucket}", times=2, status=503))
    trace = Trace()
    got = fastload.load(f"s3://{s3_bucket}/pre/", config=through(s3_proxy, path_style=True), trace=trace)
    assert_bit_exact(got, tensors)
    assert rule.fired == 2 and trace.summary().counters.get("retries", 0) >= 2


def test_s3_list_reply_cut_short_is_retried(s3_server, s3_proxy, s3_bucket, tmp_path):
    """README: bodies cut short are retried; a LIST reply that breaks off mid-XML is one."""
    file, tensors = s3_checkpoint(s3_server, s3_bucket, "pre/part.safetensors", tmp_path / "part.safetensors")
    rule = s3_proxy.faults.cut_after(60, times=1, path=f"/{s3_bucket}")
    try:
        got = fastload.load(f"s3://{s3_bucket}/pre/", config=through(s3_proxy, path_style=True))
    except fastload.FastloadError as exc:
        pytest.fail(f"a LIST reply cut once failed the load: {type(exc).__name__}: {exc!r} <- {exc.__cause__!r}")
    assert_bit_exact(got, tensors)
    assert rule.fired == 1


def test_s3_get_body_stalling_midway_is_retried(s3_server, s3_proxy, s3_bucket, tmp_path):
    """Presigned GETs through the proxy stall after 5 kB twice: cut by the stall timeout, resumed, exact."""
    file, tensors = s3_checkpoint(s3_server, s3_bucket, "m.safetensors", tmp_path / "model.safetensors")
    raw = file.read_bytes()
    # GETs 1 and 2 are the size probe and the header read (shorter than 5 kB): stall the 3rd and 4th.
    rule = s3_proxy.faults._add(StallNth(pattern=f"/{s3_bucket}/m.safetensors", nbytes=5_000, stall=True))
    trace = Trace()
    config = through(s3_proxy, stall_timeout_s=0.4)
    with Leaks({s3_proxy.port}) as leaks:
        got = fastload.load(f"s3://{s3_bucket}/m.safetensors", config=config, trace=trace)
    leaks.check(grace_s=0.5)
    assert_bit_exact(got, tensors)
    assert rule.fired == 2 and trace.summary().counters.get("retries", 0) >= 1
    assert data_start(raw) > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_chunk_attempts_in_the_trace_match_the_retries(ckpt, engine):
    """Three tensor GETs get 503 once each: the trace's chunk records carry 2 attempts for those."""
    raw, tensors = ckpt
    start = data_start(raw)
    fired = []

    def plan(n, rng):
        if rng and rng[0] >= start and len(fired) < 3 and rng not in fired:
            fired.append(rng)
            return Act(503)
        return None

    trace = Trace()
    config = QUICK.replace(http_engine=engine, retry=retry())
    with Server(raw, plan) as srv:
        got, _ = load_checked(srv.url, {srv.port}, config, trace=trace)
    assert_bit_exact(got, tensors)
    d = trace.to_dict()
    extra = sum(c["attempts"] - 1 for c in d["chunks"] if c.get("attempts"))
    assert len(fired) == 3 and extra == 3 and d["counters"].get("retries") == 3, (extra, d["counters"])
