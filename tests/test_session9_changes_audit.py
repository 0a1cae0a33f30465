"""Audit of the changes made in session 9 (commits a2cab70..e2484d5 under fastload/), each pushed past its own tests.

1. ``format/index.py``: weight_map values are canonicalised. One shard spelled several ways (``./a/./b``,
   ``a//b``, ``a/b``) is one file, read once, over local, HTTP and S3; a name that ends in a ``.`` part names a
   directory as a trailing ``/`` does; ``pull`` (plain directory over HTTP, the Hub into its cache) writes the
   canonical names and the copy loads offline (transformers, and ``hf://`` with ``HF_HUB_OFFLINE``); a
   misplaced tensor is reported against the index URL, redacted, with where the tensor really is.
2. ``api.py`` / ``runner.py``: streams collected without close, Ctrl-C reaching a coroutine that iterates a
   sync stream in loops other than plain ``asyncio.run`` (uvloop, ``run_until_complete``, under
   ``asyncio.wait_for``), the last reference dropped from the stream's own thread, interpreter exit with live
   streams (a subprocess).
3. ``sources/http_threads.py`` ``_soon``: bodies of 1, 100, 65536 and 65537 bytes with Content-Length,
   chunked, trickled and cut right after the first bytes: exact, kept alive (connections counted by the
   server), and ``bytes_fetched`` what the server sent; HTTPS keep-alive.
4. ``sources/local.py``: ``direct_io`` bytes_fetched exact; ``max_open=1`` with ``direct_io``; a shard deleted
   while evicted under ``direct_io``; ``direct_io`` on tmpfs.
5. ``sources/s3.py``: a re-signed GET refused again is one retry, two attempts, and a typed error.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastload
from checkpoints import evict, llama_config, llama_like_tensors, write_sharded, write_single
from hub_server import HubServer, hub, hub_session, repo_name  # noqa: F401 -- fixtures
from reliability_helpers import (QUICK, Leaks, ScriptedHTTP, Timer, bounded, data_start, dir_source, same_bytes,
                                 sigint_after)
from servers import RangeHTTPServer
from servers.faults import HangAfter, SlowFirstByte

INDEX = "model.safetensors.index.json"
KiB, MiB = 1024, 1 << 20
CFG = QUICK


def _write_index(directory: Path, weight_map: dict[str, str]) -> None:
    (directory / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# -- 1. index: canonical shard names ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "http", "s3"])
def test_one_shard_spelled_four_ways_is_one_file_read_once(tmp_path, request, kind):
    """``./a/./b``, ``a//b``, ``a/b`` and ``./a//./b`` are one file: stat'ed and read once (its bytes counted
    once, equal to the file's size when every tensor is loaded), and the four tensors in it come out exact."""
    ck = tmp_path / "ck"
    g = torch.Generator().manual_seed(1)
    b = {f"t{i}": torch.randn(3000 + i, generator=g) for i in range(4)}
    c = {"z": torch.arange(17, dtype=torch.int16)}
    write_single(ck / "a" / "b.safetensors", b)
    write_single(ck / "c.safetensors", c)
    spellings = ["./a/./b.safetensors", "a//b.safetensors", "a/b.safetensors", "./a//./b.safetensors"]
    _write_index(ck, {f"t{i}": spellings[i] for i in range(4)} | {"z": "./c.safetensors"})
    source = dir_source(kind, ck, request)
    plan = bounded(lambda: fastload.plan(source, config=CFG))
    if kind == "http":
        request.getfixturevalue("http_server").reset()
    urls = [f.info.url for f in plan.files]
    assert sorted(u.rsplit("/", 2)[-2] + "/" + u.rsplit("/", 1)[-1] for u in urls) == \
        ["a/b.safetensors", "ck/c.safetensors"], urls
    trace = fastload.Trace(otel=False)
    got = bounded(lambda: fastload.load(source, config=CFG, trace=trace))
    for name, want in (b | c).items():
        assert same_bytes(got[name], want), name
    by_file = trace.summary().bytes_by_file
    assert len(by_file) == 3, by_file  # the index and two shards, not four spellings of one
    shard = [v for k, v in by_file.items() if k.endswith("/a/b.safetensors")]
    assert shard == [(ck / "a" / "b.safetensors").stat().st_size], by_file
    assert not any("/./" in k or "//a" in k or "a//" in k for k in by_file), by_file
    if kind == "http":
        gets = request.getfixturevalue("http_server").requests("*/a/b.safetensors")
        assert all("/./" not in r.path and "//" not in r.path for r in gets)
        assert len(gets) <= 3, [(r.path, r.range) for r in gets]  # probe, header, data


def test_entry_ending_in_a_dot_part_names_a_directory_like_a_trailing_slash(tmp_path):
    """``"s1.safetensors/"`` is refused as naming a directory; ``"s1.safetensors/."`` names the same directory
    (``open("dir/s1.safetensors/.")`` is ENOTDIR, so transformers fails on it) but was canonicalised to the file
    ``s1.safetensors`` and loaded."""
    write_single(tmp_path / "s1.safetensors", {"a": torch.ones(4)})
    for entry in ("s1.safetensors/", "s1.safetensors/.", "./s1.safetensors/./."):
        _write_index(tmp_path, {"a": entry})
        with pytest.raises(fastload.FormatError, match="directory") as info:
            fastload.plan(tmp_path, config=CFG)
        assert entry in str(info.value), info.value


def test_misplaced_tensor_over_http_names_the_redacted_index_and_where_it_is(tmp_path, http_server, http_dir):
    """user:password@ and a ?token= query go with every file; the error for a weight_map that puts ``b`` in
    the wrong shard names the index's URL without either secret, the tensor, and the shard that holds it."""
    ck = http_dir / "ck"
    write_single(ck / "s1.safetensors", {"a": torch.ones(4)})
    write_single(ck / "s2.safetensors", {"b": torch.ones(5), "c": torch.ones(1)})
    _write_index(ck, {"a": "./s1.safetensors", "b": "./s1.safetensors", "c": "s2.safetensors"})
    base = http_server.url_for(ck).replace("http://", "http://alice:hunter2pass@") + "/?token=SECRETTOKEN123"
    with pytest.raises(fastload.FormatError) as info:
        bounded(lambda: fastload.load(base, config=CFG))
    message = str(info.value)
    assert "hunter2pass" not in message and "SECRETTOKEN123" not in message, message
    assert f"ck/{INDEX}" in message and "'b'" in message, message
    assert "s1.safetensors" in message and "ck/s2.safetensors" in message, message  # where it is said
    assert "./" not in message, message


def test_misplaced_tensor_on_s3_names_the_index_url_not_a_presigned_one(tmp_path, request):
    ck = tmp_path / "ck"
    write_single(ck / "s1.safetensors", {"a": torch.ones(4)})
    write_single(ck / "sub" / "s2.safetensors", {"b": torch.ones(5), "c": torch.ones(1)})
    _write_index(ck, {"a": "s1.safetensors", "b": "./s1.safetensors", "c": "sub//s2.safetensors"})
    source = dir_source("s3", ck, request)
    with pytest.raises(fastload.FormatError) as info:
        bounded(lambda: fastload.load(source, config=CFG))
    message = str(info.value)
    assert message.startswith(f"{source}{INDEX}"), message
    assert "X-Amz-" not in message and "Signature" not in message, message
    assert f"{source}sub/s2.safetensors" in message, message


def _llama_with_odd_spellings(directory: Path) -> dict[str, torch.Tensor]:
    tensors = llama_like_tensors(layers=1, hidden=32, intermediate=64, vocab=64, heads=4, kv_heads=2,
                                 dtype=torch.float32)
    write_sharded(directory, tensors, 2)
    index = json.loads((directory / INDEX).read_text())
    names = sorted(set(index["weight_map"].values()))
    (directory / "w").mkdir()
    shutil.move(directory / names[1], directory / "w" / names[1])
    spell = {names[0]: "./" + names[0], names[1]: "./w//" + names[1]}
    index["weight_map"] = {k: spell[v] for k, v in index["weight_map"].items()}
    (directory / INDEX).write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(llama_config(layers=1, hidden=32, intermediate=64, vocab=64,
                                                                   heads=4, kv_heads=2)))
    return tensors


def test_pulled_http_copy_has_canonical_names_and_transformers_loads_it_offline(tmp_path, http_server, http_dir):
    import transformers

    src = http_dir / "odd"
    tensors = _llama_with_odd_spellings(src)
    to = tmp_path / "pulled"
    bounded(lambda: fastload.pull(http_server.url_for(src) + "/", to=to, config=CFG), 30)
    files = sorted(p.relative_to(to).as_posix() for p in to.rglob("*") if p.is_file()
                   and ".fastload" not in p.parts)
    want = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert files == want, files
    model = transformers.AutoModelForCausalLM.from_pretrained(to, local_files_only=True, torch_dtype=torch.float32)
    state = model.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name
    again = fastload.load(to, config=CFG)
    assert set(again) == set(tensors) and all(same_bytes(again[n], tensors[n]) for n in tensors)


def test_hub_pull_into_the_cache_with_odd_spellings_then_hf_url_loads_offline(hub, tmp_path, monkeypatch):
    src = tmp_path / "odd"
    tensors = _llama_with_odd_spellings(src)
    repo = repo_name("odd")
    hub.add_repo(repo, src)
    path = bounded(lambda: fastload.pull(f"hf://{repo}", config=CFG), 30)
    assert (Path(path) / "w").is_dir() and not [p for p in Path(path).rglob("*") if p.name in (".", "")]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset()
    got = bounded(lambda: fastload.load(f"hf://{repo}", config=CFG))
    assert hub.log == [], [r.path for r in hub.log]
    assert set(got) == set(tensors) and all(same_bytes(got[n], tensors[n]) for n in tensors)
    model = bounded(lambda: fastload.from_pretrained(f"hf://{repo}", dtype=torch.float32, config=CFG), 60)
    assert torch.equal(model.state_dict()["lm_head.weight"], tensors["lm_head.weight"])


# -- 2. streams: collected, interrupted, outliving the interpreter ------------------------------------------------


@pytest.fixture
def slow_http(tmp_path, http_server, http_dir):
    """A ~3 MB single file over HTTP whose every request waits 0.1 s for its first byte."""
    path = write_single(http_dir / "m.safetensors",
                        {f"t{i}": torch.randn(100_000, generator=torch.Generator().manual_seed(i)) for i in range(8)})
    rule = http_server.faults._add(SlowFirstByte(pattern="*/m.safetensors", seconds=0.1))
    return http_server.url_for(path), rule, path


STREAM_CFG = fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=4 * 64 * KiB, max_concurrency=2,
                                 stall_timeout_s=1.5, connect_timeout_s=2.0,
                                 retry=fastload.RetryConfig(max_attempts=1, deadline_s=10.0))


@pytest.mark.parametrize("how", ["uvloop", "run_until_complete", "wait_for"])
def test_ctrl_c_reaches_a_coroutine_iterating_a_sync_stream(how, http_server, http_dir):
    """A coroutine iterates the sync stream (the second half of the file hangs) and the user presses Ctrl-C:
    KeyboardInterrupt at once, whatever runs the coroutine: ``uvloop.run``, a loop's ``run_until_complete``, or
    ``asyncio.run`` of a coroutine that awaits the consumer through ``asyncio.wait_for`` (a timeout around a
    step is common). Under ``wait_for`` (Python 3.11) the task cancelled by ``asyncio.run``'s handler is not the
    one iterating, and the blocked loop cannot pass it on: the Ctrl-C was lost, the load ran into its stall
    timeout and its TransferError came out."""
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    path = write_single(http_dir / "m.safetensors", {f"t{i:02d}": torch.randn(10_000) for i in range(40)})
    hang = http_server.faults._add(HangAfter(pattern="*/m.safetensors", after=4))
    first = threading.Event()
    got: list[float] = []  # when each tensor came (a failure says how far the load got)

    # (a stall timeout far past the Ctrl-C: on a loaded machine the first tensor can come late, and the hung
    # reads' timeout must not end the load before the Ctrl-C is sent)
    config = STREAM_CFG.replace(stall_timeout_s=8.0)

    async def consume():
        with fastload.stream(http_server.url_for(path), config=config) as s:
            for _ in s:
                got.append(time.monotonic())
                first.set()

    async def main():
        if how == "wait_for":
            await asyncio.wait_for(consume(), 60)
        else:
            await consume()

    sent: list[float] = []
    killer = sigint_after(first, 0.2, sent)
    with Leaks({http_server.port}) as leaks:
        with Timer() as timer:
            try:
                if how == "uvloop":
                    import uvloop
                    uvloop.run(main())
                elif how == "run_until_complete":
                    loop = asyncio.new_event_loop()
                    try:
                        loop.run_until_complete(main())
                    finally:
                        loop.close()
                else:
                    asyncio.run(main())
                outcome: BaseException | str = "finished"
            except BaseException as exc:  # noqa: BLE001 - which one is the point
                outcome = exc
        after_kill = time.monotonic() - sent[0] if sent else None
        killer.join(5)
        assert hang.fired >= 1, "the load never reached the hanging reads"
        leaks.check(grace_s=1.0)
    seen = (f"{len(got)} tensors, Ctrl-C sent {after_kill} s before the end, requests {hang.seen} "
            f"({hang.fired} hung), handler {signal.getsignal(signal.SIGINT)!r}, "
            f"blocked {signal.pthread_sigmask(signal.SIG_BLOCK, [])}")
    assert isinstance(outcome, KeyboardInterrupt), f"Ctrl-C ended in {outcome!r} after {timer.s:.1f} s; {seen}"
    assert after_kill is not None and after_kill < 1.5, f"Ctrl-C took {after_kill} s; {seen}"


def test_a_signal_handler_slower_than_the_poll_cannot_hide_a_cancel(http_server, http_dir):
    """The sync stream, iterated from a coroutine, polls for its task's cancellation every 50 ms. A SIGINT handler
    that takes longer than what is left of one poll (asyncio's own did, on a loaded machine) cancels the task:
    the stream notices at once. Before Python 3.13, ``queue.SimpleQueue.get(timeout=)`` then waited for ever
    (its time left came out negative), and the load ran on to its stall timeout: 2 of 3 full suite runs
    failed the Ctrl-C test above that way."""
    path = write_single(http_dir / "m.safetensors", {f"t{i:02d}": torch.randn(10_000) for i in range(40)})
    http_server.faults._add(HangAfter(pattern="*/m.safetensors", after=4))
    first = threading.Event()
    sent: list[float] = []

    tasks: list[asyncio.Task] = []

    def slow_handler(signum, frame):
        until = time.monotonic() + 0.08  # past any 50 ms poll's deadline
        while time.monotonic() < until:
            pass
        for task in tasks:
            task.cancel()

    async def main():
        tasks.append(asyncio.current_task())
        with fastload.stream(http_server.url_for(path), config=STREAM_CFG.replace(stall_timeout_s=8.0)) as s:
            for _ in s:
                first.set()

    def interrupt():  # to the main thread itself: it is the one waiting in the poll
        if first.wait(10):
            for _ in range(3):
                time.sleep(0.15)
                sent.append(time.monotonic())
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    old = signal.signal(signal.SIGINT, slow_handler)  # (asyncio.run keeps a handler it did not install)
    try:
        killer = threading.Thread(target=interrupt, daemon=True)
        killer.start()
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(main())
        noticed = time.monotonic() - sent[0]
        tasks.clear()
        killer.join(5)
    finally:
        signal.signal(signal.SIGINT, old)
    assert noticed < 1.0, f"the cancel was noticed {noticed:.1f} s after the first signal"


def test_progress_callback_dropping_the_last_reference_stops_the_load(slow_http, http_server):
    """The last reference to an entered stream is dropped by its own progress callback (on the loader's
    thread): the finalizer runs there, the load stops (no request afterwards), nothing is left running, and
    nothing is reported as an unhandled error."""
    url, rule, _ = slow_http
    holder: dict = {}
    errors: list = []
    old_hook, old_unraisable = threading.excepthook, sys.unraisablehook
    threading.excepthook = lambda args: errors.append(args.exc_value)
    sys.unraisablehook = lambda u: errors.append(u.exc_value)

    def progress(done: int, total: int) -> None:
        if done:
            holder.pop("s", None)

    try:
        with Leaks({http_server.port}) as leaks:
            s = fastload.stream(url, config=STREAM_CFG, progress=progress)
            s.__enter__()
            holder["s"] = s
            del s
            deadline = time.monotonic() + 5
            while "s" in holder and time.monotonic() < deadline:
                time.sleep(0.01)
            assert "s" not in holder
            gc.collect()
            time.sleep(0.3)
            seen = rule.seen
            time.sleep(0.4)
            assert rule.seen == seen, "requests went on after the stream was collected"
            leaks.check(grace_s=1.0)
    finally:
        threading.excepthook, sys.unraisablehook = old_hook, old_unraisable
    assert not errors, errors


def test_streams_that_are_never_entered_start_nothing_and_are_collected(slow_http, http_server):
    url, rule, _ = slow_http
    import weakref

    before = {t for t in threading.enumerate()}
    refs = []
    for _ in range(20):
        s = fastload.stream(url, config=STREAM_CFG)
        refs.append(weakref.ref(s))
        del s
    gc.collect()
    assert all(r() is None for r in refs), "a stream never entered stays alive"
    assert [t.name for t in threading.enumerate() if t not in before and t.name.startswith("fastload")] == []
    assert rule.seen == 0


def test_interpreter_exit_with_live_streams_is_quick_and_quiet(slow_http, http_server):
    """A script leaves four streams behind (never entered; entered; entered and read once; iterated by a
    daemon thread) and ends: it exits at once, status 0, nothing on stderr, and no request reaches the server
    after the process is gone."""
    url, rule, _ = slow_http
    code = textwrap.dedent(f"""
        import threading, time, fastload
        cfg = fastload.LoadConfig(chunk_bytes=65536, max_concurrency=2, host_buffer_bytes=1 << 20)
        never = fastload.stream({url!r}, config=cfg)
        entered = fastload.stream({url!r}, config=cfg).__enter__()
        once = fastload.stream({url!r}, config=cfg).__enter__()
        next(iter(once))
        iterated = fastload.stream({url!r}, config=cfg).__enter__()
        threading.Thread(target=lambda: [x for x in iterated], daemon=True).start()
        time.sleep(0.3)
        print("leaving", flush=True)
    """)
    with Timer() as timer:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "leaving\n", (out.returncode, out.stdout, out.stderr[-2000:])
    assert out.stderr == "", out.stderr[-2000:]
    seen = rule.seen
    time.sleep(0.3)
    assert rule.seen == seen
    assert timer.s < 8, f"{timer.s:.1f} s"


# -- 3. threaded HTTP bodies: the first read, keep-alive ---------------------------------------------------------


class BodyServer(ScriptedHTTP):
    """Serves one file with single ranges, counting connections; ``mode`` shapes the tensor-data replies:
    ``plain`` (Content-Length), ``chunked`` (odd chunk sizes), ``trickle`` (first byte, a pause, the rest),
    ``cut`` (the first data reply sends 1 byte of its body and closes)."""

    def __init__(self, raw: bytes, mode: str, data_from: int):
        super().__init__("body-server")
        self.raw, self.mode, self.data_from = raw, mode, data_from
        self.connections = 0
        self.sent = 0
        self.cut_done = False
        owner = self
        base = self.httpd.RequestHandlerClass

        class Counting(base):
            def setup(self):
                with owner.lock:
                    owner.connections += 1
                super().setup()

        self.httpd.RequestHandlerClass = Counting

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        first, last = (int(x) for x in h.headers["Range"].removeprefix("bytes=").split("-"))
        body = self.raw[first:last + 1]
        data = first >= self.data_from
        h.send_response_only(206)
        h.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(self.raw)}")
        h.send_header("ETag", '"v1"')
        chunked = data and self.mode == "chunked"
        h.send_header("Transfer-Encoding", "chunked") if chunked else h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if data and self.mode == "cut" and not self.cut_done and len(body) > 1:
            self.cut_done = True
            h.wfile.write(body[:1])
            h.wfile.flush()
            with self.lock:
                self.sent += 1
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if chunked:
            pos, step = 0, 1
            while pos < len(body):
                part = body[pos:pos + step]
                h.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
                pos, step = pos + len(part), step * 7 + 3
            h.wfile.write(b"0\r\n\r\n")
        elif data and self.mode == "trickle":
            h.wfile.write(body[:1])
            h.wfile.flush()
            time.sleep(0.02)
            h.wfile.write(body[1:])
        else:
            h.wfile.write(body)
        h.wfile.flush()
        with self.lock:
            self.sent += len(body)


SIZES = {"a_one": 1, "c_hundred": 100, "e_64k": 64 * KiB, "g_64k_plus": 64 * KiB + 1}


def _body_checkpoint(tmp_path: Path) -> tuple[bytes, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    tensors = {name: torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for name, n in SIZES.items()}
    tensors |= {pad: torch.zeros(3, dtype=torch.uint8) for pad in ("b_pad", "d_pad", "f_pad", "h_pad")}
    path = write_single(tmp_path / "m.safetensors", tensors)
    return path.read_bytes(), tensors


@pytest.mark.parametrize("mode", ["plain", "chunked", "trickle", "cut"])
def test_first_read_of_bodies_of_odd_sizes_is_exact_kept_alive_and_counted(tmp_path, mode):
    """One thread reads each tensor as its own range (1, 100, 65536, 65537 bytes; the last as two chunks):
    bit-exact, every request after the aiohttp size probe on one kept-alive connection (one more after a
    cut), and ``bytes_fetched`` is what the server put on the wire."""
    raw, tensors = _body_checkpoint(tmp_path)
    config = CFG.replace(max_concurrency=1, chunk_bytes=64 * KiB)
    with BodyServer(raw, mode, data_start(raw)) as srv:
        url = f"http://127.0.0.1:{srv.port}/m.safetensors"
        trace = fastload.Trace(otel=False)
        got = bounded(lambda: fastload.load(url, names=list(SIZES), config=config, trace=trace))
        for name in SIZES:
            assert same_bytes(got[name], tensors[name]), name
        s = trace.summary()
        assert s.bytes_fetched == srv.sent, (s.bytes_fetched, srv.sent)
        assert srv.connections <= (3 if mode == "cut" else 2), f"{srv.connections} connections"
        assert s.counters.get("retries", 0) == (1 if mode == "cut" else 0)


def test_https_bodies_are_kept_alive(tmp_path, monkeypatch):
    import trustme  # a test extra: its absence is an install error, not a skip
    import ssl

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    raw, tensors = _body_checkpoint(tmp_path)
    with RangeHTTPServer(tmp_path, tls=ctx) as server:
        url = server.url_for(tmp_path / "m.safetensors")
        assert url.startswith("https://")
        got = bounded(lambda: fastload.load(url, names=list(SIZES), config=CFG.replace(max_concurrency=1)))
        gets = [r for r in server.log if r.method == "GET"]
        assert len(gets) >= 6 and server.connections_accepted <= 2, (len(gets), server.connections_accepted)
    assert all(same_bytes(got[n], tensors[n]) for n in SIZES)


# -- 4. local: direct_io -----------------------------------------------------------------------------------------


def _cold_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(9)
    tensors = {"small": torch.randn(7, generator=g), "big": torch.randn(700_003, generator=g),
               "ints": torch.arange(300_001, dtype=torch.int64)}
    path = write_single(tmp_path / "cold.safetensors", tensors)
    evict(path)
    return path, tensors


def test_direct_io_bytes_fetched_is_exactly_the_header_and_the_tensors(tmp_path):
    """A cold file read with O_DIRECT (through aligned scratch, so the kernel reads whole blocks): the trace
    counts the bytes the load needed, once: the file's header plus every tensor, no block padding twice."""
    path, tensors = _cold_file(tmp_path)
    config = fastload.LoadConfig(chunk_bytes=2 * MiB, host_buffer_bytes=8 * MiB, direct_io=True)
    trace = fastload.Trace(otel=False)
    got = fastload.load(path, config=config, trace=trace)
    assert all(same_bytes(got[n], tensors[n]) for n in tensors)
    s = trace.summary()
    assert s.counters.get("bytes_direct", 0) >= MiB, "the O_DIRECT path did not run"
    assert s.bytes_fetched == path.stat().st_size, (s.bytes_fetched, path.stat().st_size)
    assert s.bytes_by_file == {str(path): path.stat().st_size}


def test_max_open_one_with_direct_io_reads_every_file_exactly_and_reports_a_removed_one(tmp_path):
    """Room for one file (its buffered and O_DIRECT descriptors): cold reads across three files through it are
    exact, at most two descriptors on them at once, and a file removed while closed is SourceChangedError."""
    from fastload.sources import Segment
    from fastload.sources.local import LocalTransport

    size = 3 * MiB + 321
    paths = [tmp_path / f"d{i}.bin" for i in range(3)]
    data = [os.urandom(size) for _ in paths]
    for p, d in zip(paths, data):
        p.write_bytes(d)
        evict(p)

    def open_on_paths() -> int:
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink(f"/proc/self/fd/{fd}") in {str(p) for p in paths}
            except OSError:
                pass
        return n

    trace = fastload.Trace(otel=False)
    peak = []

    async def main():
        transport = LocalTransport(2, trace, direct_io=True, direct_budget=8 * MiB, max_open=1)
        try:
            infos = [await transport.stat(str(p)) for p in paths]
            for rnd in range(2):
                for i, info in enumerate(infos):
                    buf = bytearray(2 * MiB + 77)
                    off = 4096 + 13 + rnd
                    await transport.read(info, [Segment(off, memoryview(buf))])
                    assert bytes(buf) == data[i][off:off + len(buf)], (rnd, i)
                    peak.append(open_on_paths())
                for p in paths:
                    evict(p)
            paths[0].unlink()
            buf = bytearray(2 * MiB)
            with pytest.raises(fastload.SourceChangedError, match="d0.bin"):
                await transport.read(infos[0], [Segment(0, memoryview(buf))])
        finally:
            await transport.aclose()

    asyncio.run(main())
    assert trace.summary().counters.get("bytes_direct", 0) > 0
    assert max(peak) <= 2, peak
    assert open_on_paths() == 0


def test_direct_io_on_tmpfs_counts_bytes_exactly(tmp_path):
    assert os.path.isdir("/dev/shm"), "/dev/shm (tmpfs) is expected on Linux"
    path = Path(f"/dev/shm/fastload-s9-{os.getpid()}.safetensors")
    g = torch.Generator().manual_seed(2)
    tensors = {"a": torch.randn(3, generator=g), "b": torch.randn(1_500_001, generator=g)}
    save_file(tensors, str(path))
    try:
        trace = fastload.Trace(otel=False)
        got = fastload.load(path, config=fastload.LoadConfig(chunk_bytes=2 * MiB, host_buffer_bytes=8 * MiB,
                                                              direct_io=True), trace=trace)
        assert all(same_bytes(got[n], tensors[n]) for n in tensors)
        assert trace.summary().bytes_fetched == path.stat().st_size
    finally:
        path.unlink()


# -- 5. S3: a re-signed GET ---------------------------------------------------------------------------------------


def test_s3_resigned_get_refused_again_is_one_retry_two_attempts_and_typed(tmp_path, s3_server, s3_bucket, s3_proxy):
    """S3 refuses a data GET with 403 and the re-signed one too: SourcePermissionError naming the object,
    ``retries`` is 1, the failed chunk's record says 2 attempts, as the proxy saw 2 GETs for it."""
    path = write_single(tmp_path / "m.safetensors", {"w": torch.randn(50_000), "v": torch.randn(10)})
    s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
    start = data_start(path.read_bytes())

    def refuse(done: int, total: int) -> None:
        if not done and not s3_proxy.faults.rules:
            s3_proxy.faults.fail_first(2, status=403)

    trace = fastload.Trace(otel=False)
    config = CFG.replace(max_concurrency=1, s3=fastload.S3Options(endpoint_url=s3_proxy.url))
    with pytest.raises(fastload.SourcePermissionError, match="m.safetensors"):
        bounded(lambda: fastload.load(f"s3://{s3_bucket}/m.safetensors", config=config, trace=trace,
                                      progress=refuse))
    refused = [r for r in s3_proxy.log if r.status == 403]
    assert len(refused) == 2 and all(r.range and int(r.range.split("=")[1].split("-")[0]) >= start
                                     for r in refused), [(r.status, r.range) for r in s3_proxy.log]
    s = trace.summary()
    assert s.counters.get("retries", 0) == 1, s.counters
    failed = [c for c in trace.chunks if c["failed"] is not None]
    assert [c["attempts"] for c in failed] == [2], trace.chunks
