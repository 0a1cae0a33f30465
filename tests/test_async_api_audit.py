"""Audit: fastload's async entry points (``aload``, ``apull``) and the sync calls made from running loops.

Covers what tests/test_api_concurrency_corners.py, test_cancel.py and test_process_robustness_audit.py do
not: twenty aloads on one loop with one of them cancelled, aload against the user's own default executor
(busy, slow, at interpreter exit), aload under uvloop, which thread ``progress`` runs on, aload's errors
against load's, sync calls from a coroutine whose loop cannot lend its executor, a nested ``asyncio.run`` in
a thread started from a running loop, ``stream`` driven from async code with ``asyncio.to_thread``, and
``apull`` cancelled (no partial file under its final name, the lock released, no write after the cancel).
Real servers from conftest; nothing of fastload is mocked.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from reliability_helpers import (  # noqa: F401
    QUICK,
    Leaks,
    assert_bit_exact,
    private_tmp,
    write_checkpoint,
)
from servers.faults import Hang

import fastload
from reliability_helpers import fds, wait_for_no_new_fds

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _run_bounded(coro_factory, bound_s: float = 20.0, loop_factory=None):
    """``asyncio.run(coro_factory())`` in a thread, so that a deadlock fails the test instead of hanging it."""
    box: dict = {}

    def body():
        try:
            if loop_factory is None:
                box["v"] = asyncio.run(coro_factory())
            else:
                loop = loop_factory()
                try:
                    box["v"] = loop.run_until_complete(coro_factory())
                finally:
                    loop.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            box["e"] = exc

    t = threading.Thread(target=body, name="audit-runner", daemon=True)
    t.start()
    t.join(bound_s)
    assert not t.is_alive(), f"the event loop did not finish within {bound_s} s (deadlock?)"
    if "e" in box:
        raise box["e"]
    return box["v"]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    return env


# -- many aloads on one loop ---------------------------------------------------------------------------------


def test_twenty_gathered_aloads_one_cancelled_others_exact_and_nothing_left(http_server, http_dir, s3_server,
                                                                           s3_bucket, tmp_path):
    """Twenty aloads on the caller's loop (local, HTTP on both engines, S3); one of them, stuck on a server
    that stopped answering, is cancelled: the nineteen others finish bit for bit, and afterwards no thread,
    socket or descriptor of any of them is left."""
    local, tl = write_checkpoint(tmp_path / "l.safetensors", seed=21, count=3)
    remote, tr = write_checkpoint(http_dir / "r.safetensors", seed=22, count=3)
    stuck, _ = write_checkpoint(http_dir / "stuck.safetensors", seed=23, count=3)
    s3file, ts = write_checkpoint(tmp_path / "s.safetensors", seed=24, count=3)
    s3_server.put(s3_bucket, "s.safetensors", s3file.read_bytes())
    hang = http_server.faults.hang(path="*stuck*")
    aio = QUICK.replace(http_engine="aiohttp")
    cfg = QUICK.replace(stall_timeout_s=20.0)  # the stuck load must be cancelled, not time out by itself
    jobs = ([(str(local), QUICK, tl)] * 7 + [(http_server.url_for(remote), QUICK, tr)] * 6
            + [(http_server.url_for(remote), aio, tr)] * 4 + [(f"s3://{s3_bucket}/s.safetensors", QUICK, ts)] * 2)
    fastload.load(str(local))  # lazy imports outside the leak window
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])

    async def main():
        victim = asyncio.ensure_future(fastload.aload(http_server.url_for(stuck), config=cfg))
        others = [asyncio.ensure_future(fastload.aload(src, config=c)) for src, c, _ in jobs]
        deadline = time.monotonic() + 10
        while hang.seen == 0:
            assert time.monotonic() < deadline, "the stuck load never reached the server"
            await asyncio.sleep(0.01)
        victim.cancel()
        results = await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 15)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(victim, 2)
        await asyncio.sleep(0)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return results, pending

    before = fds()
    with Leaks({http_server.port, port}) as leaks:
        results, pending = _run_bounded(main, 40)
        leaks.check(grace_s=1.5)
    assert not wait_for_no_new_fds(before)
    assert not pending, f"tasks left in the caller's loop: {pending}"
    for (src, _, want), got in zip(jobs, results):
        assert not isinstance(got, BaseException), f"{src}: {got!r}"
        assert_bit_exact(got, want)


# -- aload and the caller's default executor -----------------------------------------------------------------


@pytest.mark.parametrize("case", ["http-threads", "local-dtype", "http-dtype"])
def test_aload_does_not_wait_for_the_callers_busy_default_executor(case, http_server, http_dir, tmp_path):
    """aload 'runs in the caller's event loop'; its reads run on fastload's own pools, but a few steps
    (dtype conversion in HostSink.consume, the threaded HTTP engine's close in HttpTransport.aclose) borrow
    the caller's default executor. An application whose default executor (max_workers=1) holds a blocking
    job that waits for the loaded weights (a consumer thread handed the result) then deadlocks: the load
    waits for the pool, the pool's job for the load. Here the job gives up after 4 s, so the test ends; a
    0.1 s load must not take those 4 s. (The sync path gives its loops a private pool, runner._in_our_loop.)"""
    path, _ = write_checkpoint((tmp_path if case.startswith("local") else http_dir) / "m.safetensors", seed=31)
    source = str(path) if case.startswith("local") else http_server.url_for(path)
    dtype = torch.float16 if case.endswith("dtype") else None
    fastload.load(source, config=QUICK, dtype=dtype)  # warm-up

    async def main():
        loop = asyncio.get_running_loop()
        pool = ThreadPoolExecutor(1, thread_name_prefix="app-pool")
        loop.set_default_executor(pool)
        release = threading.Event()
        busy = loop.run_in_executor(None, release.wait, 4.0)  # the application's consumer, waiting for the weights
        await asyncio.sleep(0.05)
        start = time.monotonic()
        got = await fastload.aload(source, config=QUICK, dtype=dtype)
        seconds = time.monotonic() - start
        release.set()
        await busy
        return got, seconds

    got, seconds = _run_bounded(main, 20)
    ref = fastload.load(source, config=QUICK, dtype=dtype)
    assert_bit_exact(got, ref)
    assert seconds < 2.0, (f"aload took {seconds:.2f} s: it waited for the caller's default executor, whose one "
                           f"thread waited for the load (a deadlock, broken only by that job's 4 s timeout)")


ATEXIT_ALOAD = r"""
import asyncio, atexit, sys
import torch
import fastload

source, want_path, dtype = sys.argv[1:4]
dtype = None if dtype == "none" else getattr(torch, dtype)

@atexit.register
def on_exit():  # an async service that checks its weights as it stops
    from safetensors.torch import load_file
    try:
        got = asyncio.run(fastload.aload(source, dtype=dtype))
    except fastload.FastloadError as exc:
        print("atexit-typed", type(exc).__name__, exc, flush=True)
        return
    except BaseException as exc:
        print("atexit-bare", type(exc).__name__, exc, flush=True)
        return
    want = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
            for k, v in load_file(want_path).items()}
    ok = all(torch.equal(got[k].view(-1).view(torch.uint8), want[k].view(-1).view(torch.uint8)) for k in want)
    print("atexit-ok" if ok else "atexit-wrong", flush=True)

print("main-done", flush=True)
"""


@pytest.mark.parametrize("case", ["local-dtype", "http-threads"])
def test_aload_in_an_atexit_handler(case, http_server, http_dir, tmp_path):
    """``asyncio.run(fastload.aload(...))`` in an atexit handler: concurrent.futures refuses new work there
    (the caller loop's default executor included). The sync load works there (runner._in_our_loop, tested in
    test_process_robustness_audit); aload must work too, or fail with a fastload error -- never a bare
    'cannot schedule new futures after interpreter shutdown' RuntimeError."""
    path, _ = write_checkpoint(http_dir / "m.safetensors", seed=32)
    source = str(path) if case.startswith("local") else http_server.url_for(path)
    script = tmp_path / "child.py"
    script.write_text(ATEXIT_ALOAD)
    proc = subprocess.run([sys.executable, str(script), source, str(path),
                           "float16" if case.endswith("dtype") else "none"],
                          capture_output=True, text=True, timeout=60, env=_child_env(), check=False)
    out = proc.stdout + proc.stderr[-2000:]
    assert "atexit-bare" not in proc.stdout, out
    assert "atexit-ok" in proc.stdout or "atexit-typed" in proc.stdout, out


def test_sync_calls_from_a_coroutine_do_not_borrow_the_callers_executor(http_server, http_dir, tmp_path):
    """load/plan/pull called from a coroutine run on their own loop in a private thread (README): they work
    even when the caller's loop cannot lend its default executor (shut down), and other tasks of the
    caller's loop run again once the call returns."""
    path, want = write_checkpoint(http_dir / "m.safetensors", seed=33)
    url = http_server.url_for(path)

    async def main():
        loop = asyncio.get_running_loop()
        await loop.shutdown_default_executor()  # the caller's pool is gone
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        got = fastload.load(url, config=QUICK, dtype=torch.float16)
        planned = fastload.plan(url, config=QUICK)
        pulled = fastload.pull(url, to=tmp_path / "out", config=QUICK)
        before = ticks
        await asyncio.sleep(0.05)
        tick.cancel()
        return got, planned, pulled, ticks - before

    got, planned, pulled, later = _run_bounded(main, 20)
    assert_bit_exact(got, {k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in want.items()})
    assert {t.name for t in planned.tensors} == set(want)
    assert pulled.read_bytes() == path.read_bytes()
    assert later > 0, "the caller's other tasks did not run again after the sync load"


# -- uvloop --------------------------------------------------------------------------------------------------


def test_aload_and_apull_under_uvloop(http_server, http_dir, s3_server, s3_bucket, tmp_path):
    """uvloop is a common production loop (uvicorn): aload over local/HTTP (both engines)/S3, apull, and a
    cancelled aload work on it as on asyncio's own loop."""
    uvloop = pytest.importorskip("uvloop")
    local, tl = write_checkpoint(tmp_path / "l.safetensors", seed=41, count=3)
    remote, tr = write_checkpoint(http_dir / "r.safetensors", seed=42, count=3)
    stuck, _ = write_checkpoint(http_dir / "stuck.safetensors", seed=43, count=3)
    s3file, ts = write_checkpoint(tmp_path / "s.safetensors", seed=44, count=3)
    s3_server.put(s3_bucket, "s.safetensors", s3file.read_bytes())
    hang = http_server.faults.hang(path="*stuck*")
    url = http_server.url_for(remote)

    async def main():
        got = await asyncio.gather(
            fastload.aload(str(local), config=QUICK, dtype=torch.bfloat16),
            fastload.aload(url, config=QUICK),
            fastload.aload(url, config=QUICK.replace(http_engine="aiohttp")),
            fastload.aload(f"s3://{s3_bucket}/s.safetensors", config=QUICK))
        pulled = await fastload.apull(url, to=tmp_path / "out", config=QUICK)
        victim = asyncio.ensure_future(fastload.aload(http_server.url_for(stuck),
                                                      config=QUICK.replace(stall_timeout_s=20)))
        while hang.seen == 0:
            await asyncio.sleep(0.01)
        victim.cancel()
        start = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await victim
        return got, pulled, time.monotonic() - start

    with Leaks({http_server.port}) as leaks:
        got, pulled, cancel_s = _run_bounded(main, 30, loop_factory=uvloop.new_event_loop)
        leaks.check(grace_s=1.5)
    assert_bit_exact(got[0], {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in tl.items()})
    for g, w in zip(got[1:], (tr, tr, ts)):
        assert_bit_exact(g, w)
    assert pulled.path.read_bytes() == remote.read_bytes()
    assert cancel_s < 1.0


# -- progress ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "http"])
def test_aload_progress_runs_on_the_callers_loop_thread(kind, http_server, http_dir, tmp_path):
    """aload's ``progress(done, total)`` runs in the caller's loop thread (where an async caller may touch
    its own loop's objects without call_soon_threadsafe), counts up monotonically and ends at the total."""
    path, want = write_checkpoint((tmp_path if kind == "local" else http_dir) / "m.safetensors", seed=51)
    source = str(path) if kind == "local" else http_server.url_for(path)
    calls: list = []

    async def main():
        loop = asyncio.get_running_loop()

        def progress(done, total):
            calls.append((done, total, threading.get_ident(), _in_loop(loop)))

        got = await fastload.aload(source, config=QUICK, progress=progress, dtype=torch.float64)
        return got, threading.get_ident()

    got, loop_thread = _run_bounded(main, 20)
    assert calls
    assert {c[2] for c in calls} == {loop_thread}, "progress was called from another thread than the caller's loop"
    assert all(c[3] for c in calls)
    dones = [c[0] for c in calls]
    assert dones == sorted(dones) and dones[-1] == calls[-1][1] == sum(v.nbytes for v in want.values())
    assert_bit_exact(got, {k: (v.double() if v.is_floating_point() else v) for k, v in want.items()})


def _in_loop(loop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


# -- errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing-local", "http-404", "bad-header", "unknown-name", "bad-config",
                                  "bad-dtype", "http-403"])
def test_aload_raises_the_same_types_as_load(case, http_server, http_dir, tmp_path):
    """aload is 'the same for async code': each bad input raises the same fastload type as load, with the
    same message."""
    good, _ = write_checkpoint(http_dir / "good.safetensors", seed=61, count=2)
    bad = http_dir / "bad.safetensors"
    bad.write_bytes((10).to_bytes(8, "little") + b"{not json}")
    kwargs: dict = {"config": QUICK}
    if case == "missing-local":
        source = str(tmp_path / "absent.safetensors")
    elif case == "http-404":
        source = http_server.url_for(http_dir / "absent.safetensors")
    elif case == "http-403":
        source = http_server.url_for(good)
        http_server.faults.fail_first(1000, 403, path="*good*")
    elif case == "bad-header":
        source = http_server.url_for(bad)
    else:
        source = str(good)
        kwargs.update({"unknown-name": {"names": ["w0", "nope"]}, "bad-config": {"config": "fast"},
                       "bad-dtype": {"dtype": "float13"}}[case])

    def outcome(fn):
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            return exc
        raise AssertionError(f"{case}: no error")

    sync = outcome(lambda: fastload.load(source, **kwargs))
    async_ = outcome(lambda: asyncio.run(fastload.aload(source, **kwargs)))
    assert isinstance(sync, fastload.FastloadError), repr(sync)
    assert type(async_) is type(sync), f"load raised {sync!r}, aload {async_!r}"
    assert str(async_) == str(sync)


# -- a nested asyncio.run, stream from async code ------------------------------------------------------------


def test_nested_asyncio_run_in_a_thread_started_from_a_running_loop(http_server, http_dir, tmp_path):
    """A coroutine hands work to a plain thread that runs ``asyncio.run(aload(...))`` and, inside that loop,
    a sync ``load`` (which then takes its private-thread path): all exact, nothing left behind."""
    local, tl = write_checkpoint(tmp_path / "l.safetensors", seed=71, count=3)
    remote, tr = write_checkpoint(http_dir / "r.safetensors", seed=72, count=3)
    url = http_server.url_for(remote)
    fastload.load(str(local))

    async def inner():
        a = await fastload.aload(url, config=QUICK)
        b = fastload.load(str(local), config=QUICK)
        c = await fastload.aload(str(local), config=QUICK.replace(http_engine="aiohttp"))
        return a, b, c

    async def outer():
        box: dict = {}
        done = asyncio.Event()
        loop = asyncio.get_running_loop()

        def worker():
            try:
                box["v"] = asyncio.run(inner())
            except BaseException as exc:  # noqa: BLE001
                box["v"] = exc
            loop.call_soon_threadsafe(done.set)

        t = threading.Thread(target=worker, name="audit-nested")
        t.start()
        await asyncio.wait_for(done.wait(), 15)
        t.join(5)
        return box["v"]

    before = fds()
    with Leaks({http_server.port}) as leaks:
        result = _run_bounded(outer, 25)
        leaks.check(grace_s=1.0)
    assert not wait_for_no_new_fds(before)
    assert not isinstance(result, BaseException), repr(result)
    assert_bit_exact(result[0], tr)
    assert_bit_exact(result[1], tl)
    assert_bit_exact(result[2], tl)


@pytest.mark.parametrize("leave_early", [False, True])
def test_stream_driven_from_async_code_with_to_thread(leave_early, http_server, http_dir):
    """``fastload.stream`` is sync; from async code each ``next`` goes through ``asyncio.to_thread`` (a
    different worker thread each time): every tensor arrives exact, and leaving early (the coroutine is
    cancelled while a ``next`` waits) closes the stream with nothing left."""
    path, want = write_checkpoint(http_dir / "m.safetensors", seed=81)
    url = http_server.url_for(path)
    slow = http_server.faults.slow_first_byte(0.05, path="*") if leave_early else None

    async def consume(got: dict):
        with fastload.stream(url, config=QUICK.replace(max_concurrency=2)) as s:
            it = iter(s)
            while True:
                item = await asyncio.to_thread(next, it, None)
                if item is None:
                    return
                got[item[0]] = item[1]

    async def main():
        got: dict = {}
        task = asyncio.ensure_future(consume(got))
        if leave_early:
            while not got:
                await asyncio.sleep(0.005)
            task.cancel()
            start = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            return got, time.monotonic() - start
        await asyncio.wait_for(task, 15)
        return got, 0.0

    with Leaks({http_server.port}) as leaks:
        got, cancel_s = _run_bounded(main, 25)
        leaks.check(grace_s=1.5)
    if leave_early:
        assert cancel_s < 1.5
        assert len(got) < len(want)
        for name, tensor in got.items():
            assert_bit_exact({name: tensor}, {name: want[name]})
        assert slow is not None and slow.seen > 0
    else:
        assert_bit_exact(got, want)


# -- apull cancelled -----------------------------------------------------------------------------------------


class _HangAfter(Hang):
    """Answer the first ``after`` matching requests, then hang."""

    def __init__(self, pattern: str, after: int):
        super().__init__(pattern=pattern)
        self.after = after

    def wants_to_fire(self) -> bool:
        return self.seen > self.after


def test_cancelled_apull_leaves_no_final_file_and_releases_the_lock(http_server, http_dir, tmp_path):
    """An apull cancelled mid-transfer (the server stopped answering) returns at once, leaves no file under
    its final name, and releases the destination's lock: a second apull into the same place starts at once
    and ends with the file whole, bit for bit."""
    path, _ = write_checkpoint(http_dir / "model.safetensors", seed=91, count=8)
    url = http_server.url_for(path)
    out = tmp_path / "out"
    rule = http_server.faults._add(_HangAfter("*model*", 6))
    cfg = QUICK.replace(stall_timeout_s=20.0, max_concurrency=2)

    async def main():
        task = asyncio.ensure_future(fastload.apull(url, to=out, config=cfg))
        deadline = time.monotonic() + 10
        while rule.fired == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        task.cancel()
        start = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        cancel_s = time.monotonic() - start
        final_after_cancel = (out / "model.safetensors").exists()
        http_server.faults.clear()
        trace = fastload.Trace()
        start = time.monotonic()
        result = await asyncio.wait_for(fastload.apull(url, to=out, config=QUICK, trace=trace), 10)
        return cancel_s, final_after_cancel, result, time.monotonic() - start, trace

    with Leaks({http_server.port}) as leaks:
        cancel_s, final_after_cancel, result, second_s, trace = _run_bounded(main, 30)
        leaks.check(grace_s=1.5)
    assert cancel_s < 2.0, f"cancel took {cancel_s:.2f} s"
    assert not final_after_cancel, "a cancelled pull left its file under the final name"
    assert result.path.read_bytes() == path.read_bytes()
    lock_s = trace.summary().stages.get("lock", 0.0)
    assert lock_s < 1.0, f"the second pull waited {lock_s:.2f} s for the cancelled one's lock"
    assert second_s < 8.0, f"the second pull took {second_s:.2f} s"


def test_apull_cancelled_while_flushing_then_pulled_again_keeps_the_file_whole(http_server, http_dir, tmp_path,
                                                                                monkeypatch):
    """An apull is cancelled while its last file is being flushed (a slow fsync). If the cancel returned and
    released the lock with the flush still running, the next pull into the same place would put the whole file
    in place, and the cancelled pull's flush, running on after that, would find its temporary file gone
    (renamed by the second pull), create an empty one, size it with zeros and rename it over the good file,
    with a record that makes every later pull call it complete. The cancel must wait for the flush."""
    from fastload.sinks.file import FileSink

    path, _ = write_checkpoint(http_dir / "model.safetensors", seed=93, count=2)
    url = http_server.url_for(path)
    out = tmp_path / "out"
    one_chunk = QUICK.replace(chunk_bytes=1 << 20, host_buffer_bytes=2 << 20, max_concurrency=1)
    finish_started = threading.Event()
    original = FileSink.finish

    def slow_finish(self, index):
        if not finish_started.is_set():  # the first pull's flush only
            finish_started.set()
            time.sleep(1.5)
        return original(self, index)

    monkeypatch.setattr(FileSink, "finish", slow_finish)

    async def main():
        task = asyncio.ensure_future(fastload.apull(url, to=out, config=one_chunk))
        deadline = time.monotonic() + 10
        while not finish_started.is_set():
            assert time.monotonic() < deadline, "the pull never got to flush its file"
            await asyncio.sleep(0.005)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        start = time.monotonic()
        fastload.pull(url, to=out, config=QUICK)  # another pull into the same place (its own loop and pool)
        second_s = time.monotonic() - start
        whole_after_second = (out / "model.safetensors").read_bytes() == path.read_bytes()
        await asyncio.sleep(2.0)  # whatever the cancelled pull still had on its way has run by now
        return second_s, whole_after_second

    second_s, whole_after_second = _run_bounded(main, 25)
    assert whole_after_second, f"the second pull ({second_s:.2f} s) did not leave the file whole"
    final = out / "model.safetensors"
    got = final.read_bytes()
    third = fastload.pull(url, to=out, config=QUICK)  # a later pull must end with the right bytes too
    healed = third.read_bytes() == path.read_bytes()
    assert got == path.read_bytes(), (
        f"after the cancelled pull's late flush the file under its final name is wrong "
        f"({sum(1 for b in got if b == 0)} of {len(got)} bytes zero); a third pull "
        f"{'fetched it again' if healed else 'took it for complete and left it so'}")
    assert healed
