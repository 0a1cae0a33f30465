"""Audit: fastload used from many threads and event loops at once, as an inference server does.

``fastload/runner.py`` is the one module that starts loops and threads (each sync call's loop, a private loop
thread inside a running loop, a stream's thread, the per-call worker pools). Beyond the existing concurrency
tests this covers: a load started from a progress callback (a task created inside an ``aload``, which inherits
its context and with it the caller's worker pool); a coroutine that cancels a task of its own between a
stream's items; a consumer racing ``close()`` on a stream whose load already finished; a stream created,
entered, iterated and closed in four different threads; four threads iterating one stream; streams in
``ThreadPoolExecutor`` workers when the executor is shut down with ``cancel_futures=True``; ``load`` in
``asyncio.to_thread`` and ``aload`` under ``asyncio.timeout`` (3.11) expiring; several loops in several threads
sharing one ``Trace`` and one ``LoadConfig`` with one of them timed out; loads under a debug-mode and a uvloop
event loop policy; 50 short loads in threads at once (threads, fds, ``weakref.finalize`` registry and live
fastload objects must not grow); which thread a progress callback runs on and that it is never entered twice
at once. Every result is checked bit for bit against ``safetensors.torch.load_file``.

Real servers from conftest; nothing of fastload is mocked.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import json
import logging
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
import uvloop
from checkpoints import write_single
from reliability_helpers import (
    QUICK,
    Leaks,
    bounded,
    fds,
    wait_for_no_new_fds,
    write_checkpoint,
)
from safetensors.torch import load_file
from servers import RangeHTTPServer

import fastload

# -- helpers ----------------------------------------------------------------------------------------------


def exact(got: dict, path: Path, dtype: torch.dtype | None = None) -> None:
    """``got`` is bit for bit what safetensors loads from ``path`` (converted by torch when ``dtype``)."""
    want = load_file(str(path))
    assert set(got) == set(want), f"names differ: {sorted(set(got) ^ set(want))}"
    for name, w in want.items():
        if dtype is not None and w.is_floating_point():
            w = w.to(dtype)
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g.reshape(-1).view(torch.uint8), w.contiguous().reshape(-1).view(torch.uint8)), name


def exact_items(items: list, path: Path) -> None:
    """Pairs handed out by a stream: each name at most once, each tensor bit-exact."""
    want = load_file(str(path))
    names = [n for n, _ in items]
    assert len(names) == len(set(names)), "a tensor was handed out twice"
    exact_subset = {n: t for n, t in items}
    for name, tensor in exact_subset.items():
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), want[name].reshape(-1).view(torch.uint8)), name


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fastload")]


def wait_until(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.fixture
def pair(http_server, http_dir, tmp_path):
    """A local and an HTTP checkpoint: {"local": (source, path), "http": (source, path)}."""
    local, _ = write_checkpoint(tmp_path / "local.safetensors", seed=31, count=4)
    remote, _ = write_checkpoint(http_dir / "remote.safetensors", seed=32, count=5)
    return {"local": (str(local), local), "http": (http_server.url_for(remote), remote)}


# -- a load started from inside another load's context ----------------------------------------------------


@pytest.mark.parametrize("how", ["aload-dtype-local", "aload-http", "to_thread-load"])
def test_load_started_from_a_progress_callback_outlives_the_first_load(how, tmp_path):
    """An async server prefetches the next model once the current one starts arriving: the ``progress``
    callback of one ``aload`` creates a task that loads another checkpoint (``aload``, or the sync ``load`` via
    ``asyncio.to_thread``). The task is created inside the first load's context, so it inherits fastload's
    per-call worker pool (``runner._WORKERS``). The first load used to end and shut that pool down under the
    second, which failed with a bare ``RuntimeError: cannot schedule new futures after shutdown``.
    Both loads must succeed and be exact. (A server of this test's own: the failing HTTP load leaves its
    threaded connections open, which must not count against the other tests' leak checks.)"""
    first_path, _ = write_checkpoint(tmp_path / "first.safetensors", seed=21, count=2)
    second_path, _ = write_checkpoint(tmp_path / "second.safetensors", seed=22, count=6)
    config = QUICK.replace(max_concurrency=1)

    async def main(server):
        if how == "aload-dtype-local":
            make = lambda: fastload.aload(str(second_path), config=config, dtype=torch.float64)
        elif how == "aload-http":
            make = lambda: fastload.aload(server.url_for(second_path), config=config)
        else:
            make = lambda: asyncio.to_thread(
                fastload.load, str(second_path), config=config, dtype=torch.float64)
        prefetch: list[asyncio.Task] = []

        def progress(done, total):
            if not prefetch:
                prefetch.append(asyncio.get_running_loop().create_task(make()))

        got = await fastload.aload(str(first_path), config=QUICK, progress=progress)
        return got, await prefetch[0]

    with RangeHTTPServer(tmp_path) as server:
        got, prefetched = bounded(lambda: asyncio.run(main(server)), 20)
    exact(got, first_path)
    exact(prefetched, second_path, dtype=None if how == "aload-http" else torch.float64)


# -- a coroutine consuming a stream ----------------------------------------------------------------------


def test_stream_in_a_coroutine_survives_the_coroutine_cancelling_its_own_helper_task(http_server, http_dir):
    """A handler iterates a stream from a coroutine and, when the first tensor arrives, cancels a helper task
    of its own (a heartbeat, a 'still loading' notifier) without awaiting in between. Nothing cancelled the
    handler: it must get every tensor. (The stream's Ctrl-C watch, ``runner.CancelWatch``, used to count any
    task whose ``cancelling()`` rose as a Ctrl-C, and closed the stream.)"""
    path, _ = write_checkpoint(http_dir / "slow.safetensors", seed=41, count=6)
    http_server.faults.slow_first_byte(0.1, path="*slow*")

    async def handler():
        heartbeat = asyncio.ensure_future(asyncio.sleep(100))
        await asyncio.sleep(0)
        got = {}
        with fastload.stream(http_server.url_for(path), config=QUICK.replace(max_concurrency=1)) as s:
            for name, tensor in s:
                got[name] = tensor
                if not heartbeat.done():
                    heartbeat.cancel()  # the first tensor is here: the heartbeat may stop
        return got

    def run():
        try:
            return asyncio.run(handler())
        except asyncio.CancelledError as exc:  # (a BaseException: reported, not left to kill the thread)
            return exc

    with Leaks({http_server.port}) as leaks:
        got = bounded(run, 20)
        leaks.check(grace_s=1.0)
    assert not isinstance(got, BaseException), (
        "the stream was closed and CancelledError raised because the handler cancelled an unrelated task")
    exact(got, path)


# -- streams across threads ------------------------------------------------------------------------------


def test_consumer_racing_close_never_ends_normally_with_tensors_missing(tmp_path):
    """The load has finished and every tensor waits in the stream's queue; a consumer thread is draining it
    when another thread (a watchdog, a shutdown hook) closes the stream. The consumer may get all tensors, or
    be told the stream was closed before its end; it must never see an ordinary end of iteration with
    tensors missing (a silently partial state dict). ``ThreadedStream.close`` used to drain the queue without
    any coordination with a concurrent ``iterate``: a consumer that took the end marker ``(_DONE, None)`` after
    close() had dropped tensors ended normally (in 40-50 % of repetitions) and marked the stream finished."""
    n = 1000
    path = write_single(tmp_path / "many.safetensors", {f"t{i}": torch.full((2,), i, dtype=torch.int32)
                                                        for i in range(n)})
    bad = []
    for rep in range(12):
        end, got = _consume_while_closing(path)
        exact_items(got, path)
        if end == "normal" and len(got) != n:
            bad.append((rep, len(got)))
        elif end != "normal":
            assert "closed" in str(end)
    assert not bad, (f"the consumer's loop ended normally with tensors missing (rep, received of {n}): {bad}: "
                     "a stream closed under it looked like a complete load")


def _consume_while_closing(path: Path) -> tuple:
    """Load ``path`` fully into a stream, then iterate it in a thread while this one closes it: (end, items)."""
    loaded = threading.Event()
    s = fastload.stream(str(path), progress=lambda done, total: done == total and loaded.set())
    before = set(threading.enumerate())
    s.__enter__()
    ours = [t for t in stream_threads() if t not in before]
    assert ours, "the stream started no thread of its own"
    assert loaded.wait(10)
    wait_until(lambda: not any(t.is_alive() for t in ours))  # producer done: items and end marker queued
    got: list = []
    outcome: dict = {}
    start = threading.Barrier(2)

    def consume():
        it = iter(s)
        start.wait()
        try:
            got.extend(it)
            outcome["end"] = "normal"
        except RuntimeError as exc:
            outcome["end"] = exc

    consumer = threading.Thread(target=consume)
    consumer.start()
    start.wait()
    s.close()
    consumer.join(10)
    assert not consumer.is_alive()
    return outcome["end"], got


def test_stream_created_entered_iterated_and_closed_in_four_threads(http_server, http_dir):
    """One stream, four threads: made in the first, entered in the second, iterated in the third, closed in the
    fourth. Read to its end this way it is exact; closed by the fourth thread while the third pauses, the third
    is then told it was closed (not a normal end), a new iteration is refused, and nothing is left running."""
    path, _ = write_checkpoint(http_dir / "four.safetensors", seed=51, count=6)
    url = http_server.url_for(path)

    def in_thread(fn):
        box: dict = {}

        def body():
            try:
                box["v"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed back
                box["v"] = exc
        t = threading.Thread(target=body)
        t.start()
        t.join(15)
        assert not t.is_alive()
        if isinstance(box["v"], BaseException):
            raise box["v"]
        return box["v"]

    with Leaks({http_server.port}) as leaks:
        s = in_thread(lambda: fastload.stream(url, config=QUICK))
        in_thread(s.__enter__)
        got = in_thread(lambda: dict(s))
        in_thread(s.close)
        exact(got, path)
        assert s.plan is not None and len(s.plan.tensors) == len(got)

        http_server.faults.slow_first_byte(0.15, path="*four*")
        s = in_thread(lambda: fastload.stream(url, config=QUICK.replace(max_concurrency=1)))
        in_thread(s.__enter__)
        paused, resume = threading.Event(), threading.Event()
        items, outcome = [], {}

        def consume():
            try:
                for item in s:
                    items.append(item)
                    if len(items) == 1:
                        paused.set()
                        resume.wait(10)
                outcome["end"] = "normal"
            except RuntimeError as exc:
                outcome["end"] = exc

        consumer = threading.Thread(target=consume)
        consumer.start()
        assert paused.wait(10)
        in_thread(s.close)
        resume.set()
        consumer.join(10)
        assert not consumer.is_alive()
        leaks.check(grace_s=1.0)
    assert outcome["end"] != "normal" and "closed" in str(outcome["end"]), outcome
    exact_items(items, path)
    with pytest.raises(RuntimeError, match="closed before its load finished"):
        list(s)


@pytest.mark.parametrize("kind", ["local", "http"])
def test_four_threads_iterate_one_stream_each_tensor_once(kind, http_server, http_dir, tmp_path):
    """The runner promises that several threads may iterate one stream, each item going to one of them and every
    one of them seeing the end. Four do: every tensor arrives exactly once over all of them, bit-exact, and each
    of the four ends normally."""
    g = torch.Generator().manual_seed(61)
    tensors = {f"t{i}": torch.randn(50 + 13 * i, generator=g) for i in range(200)}
    path = write_single((http_dir if kind == "http" else tmp_path) / "shared.safetensors", tensors)
    source = http_server.url_for(path) if kind == "http" else str(path)
    per: dict = {k: [] for k in range(4)}
    ends: dict = {}
    with fastload.stream(source, config=QUICK) as s:
        go = threading.Barrier(4)

        def consume(k):
            it = iter(s)
            go.wait()
            try:
                for item in it:
                    per[k].append(item)
                ends[k] = "normal"
            except BaseException as exc:  # noqa: BLE001 - reported below
                ends[k] = exc

        threads = [threading.Thread(target=consume, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert not any(t.is_alive() for t in threads)
    assert ends == dict.fromkeys(range(4), "normal"), ends
    items = [item for k in range(4) for item in per[k]]
    assert len(items) == len(tensors)
    exact(dict(items), path)


def test_streams_in_executor_workers_survive_shutdown_with_cancel_futures(http_server, http_dir):
    """Eight stream jobs on a four-worker ``ThreadPoolExecutor``; mid-load the executor is shut down with
    ``wait=False, cancel_futures=True`` (a server stopping). The four running streams finish exact, the four
    queued jobs are cancelled without starting, and afterwards no thread, socket or fd of the loads is left."""
    path, _ = write_checkpoint(http_dir / "pool.safetensors", seed=71, count=6)
    url = http_server.url_for(path)
    http_server.faults.slow_first_byte(0.05, path="*pool*")
    started = threading.Semaphore(0)

    def job():
        got = {}
        with fastload.stream(url, config=QUICK.replace(max_concurrency=2)) as s:
            started.release()
            for name, tensor in s:
                got[name] = tensor
        return got

    before = fds()
    with Leaks({http_server.port}) as leaks:
        pool = cf.ThreadPoolExecutor(4, thread_name_prefix="audit-pool")
        futures = [pool.submit(job) for _ in range(8)]
        for _ in range(4):
            assert started.acquire(timeout=10)
        pool.shutdown(wait=False, cancel_futures=True)
        assert [f.cancelled() for f in futures] == [False] * 4 + [True] * 4
        for f in futures[:4]:
            exact(f.result(timeout=20), path)
        pool.shutdown(wait=True)
        leaks.check(grace_s=1.0)
    assert not wait_for_no_new_fds(before)


# -- timeouts around loads in other threads ------------------------------------------------------------


def test_load_in_to_thread_under_asyncio_timeout_runs_to_its_end(http_server, http_dir):
    """``asyncio.timeout`` expiring around ``asyncio.to_thread(fastload.load, ...)`` cancels only the await: the
    load itself cannot be stopped (no fastload code sees the cancel) and runs on in the executor thread to an
    exact result; ``asyncio.run`` then waits for it at shutdown. (Async code should use ``aload``.) Afterwards
    nothing is left. With ``aload`` instead, the same timeout stops the load at once (TimeoutError, < 1 s)."""
    path, _ = write_checkpoint(http_dir / "tt.safetensors", seed=81, count=6)
    url = http_server.url_for(path)
    http_server.faults.slow_first_byte(0.1, path="*tt*")
    config = QUICK.replace(max_concurrency=1, chunk_bytes=256 * 1024, host_buffer_bytes=1 << 20)
    box: dict = {}

    def blocking():
        box["result"] = fastload.load(url, config=config)
        box["ended"] = time.monotonic()

    async def main():
        timed_out = None
        box["began"] = time.monotonic()
        try:
            async with asyncio.timeout(0.2):
                await asyncio.to_thread(blocking)
        except TimeoutError:
            timed_out = time.monotonic()
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await fastload.aload(url, config=config)
        return timed_out, time.monotonic() - start

    with Leaks({http_server.port}) as leaks:
        timed_out, aload_s = bounded(lambda: asyncio.run(main()), 20)
        leaks.check(grace_s=1.0)
    assert timed_out is not None, "the to_thread load finished before the timeout: the test proved nothing"
    assert box["ended"] > timed_out, "the load did not run on after the timeout"
    exact(box["result"], path)
    # at once: well before the time the same load took to run to its end (both stretch on a loaded machine; a
    # fixed 1 s was past under the full suite)
    whole = box["ended"] - box["began"]
    assert aload_s < max(1.0, 0.5 * whole), f"aload under asyncio.timeout(0.2) took {aload_s:.2f} s to stop " \
        f"(the whole load: {whole:.2f} s)"


def test_loops_in_threads_share_one_trace_and_config_one_timed_out(pair, http_server, http_dir):
    """Three threads, each its own event loop, gather ``aload`` of a local and an HTTP checkpoint with the same
    ``Trace`` and ``LoadConfig``; a fourth loop's ``aload`` of a hanging URL is timed out by ``asyncio.timeout``.
    Every result is exact; the shared trace counts exactly one cancelled load, no error, and per file the bytes
    of three loads each (as one load of it alone records)."""
    hang_path, _ = write_checkpoint(http_dir / "hang.safetensors", seed=91, count=2)
    http_server.faults.hang(path="*hang*")
    config = QUICK
    alone = {}
    for src, _ in pair.values():
        t = fastload.Trace()
        fastload.load(src, config=config, trace=t)
        alone.update(t.summary().bytes_by_file)
    shared = fastload.Trace()
    results: dict = {}
    go = threading.Barrier(4)

    def loader(k):
        async def main():
            return await asyncio.gather(*(fastload.aload(src, config=config, trace=shared)
                                          for src, _ in pair.values()))
        go.wait()
        results[k] = asyncio.run(main())

    def timed_out():
        async def main():
            try:
                async with asyncio.timeout(0.3):
                    await fastload.aload(http_server.url_for(hang_path), config=config, trace=shared)
            except TimeoutError:
                return "timeout"
        go.wait()
        results["hang"] = asyncio.run(main())

    threads = [threading.Thread(target=loader, args=(k,)) for k in range(3)] + [threading.Thread(target=timed_out)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert results["hang"] == "timeout"
    for k in range(3):
        for got, (_, path) in zip(results[k], pair.values()):
            exact(got, path)
    summary = shared.summary()
    assert summary.counters.get("cancelled") == 1, summary.counters
    assert summary.errors == ()
    for key, n in alone.items():
        assert summary.bytes_by_file.get(key) == 3 * n, (key, summary.bytes_by_file)


# -- event loop policies ---------------------------------------------------------------------------------


class _DebugPolicy(asyncio.DefaultEventLoopPolicy):
    """Every new loop in debug mode: asyncio then raises on a non-thread-safe call from a foreign thread
    (``call_soon``, a future completed from a worker) and reports never-retrieved errors and unawaited work."""

    def __init__(self, problems: list):
        super().__init__()
        self.problems = problems

    def new_event_loop(self):
        loop = super().new_event_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = 60.0  # slow callbacks are not the point
        loop.set_exception_handler(lambda _loop, ctx: self.problems.append(ctx.get("message")))
        return loop


class _Collect(logging.Handler):
    def __init__(self, into: list):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record):
        self.into.append(record.getMessage())


@pytest.mark.parametrize("policy", ["debug", "uvloop"])
def test_every_entry_point_under_a_custom_event_loop_policy(policy, pair, http_server):
    """A process-wide event loop policy is in force (a debug policy that makes asyncio check thread-safety, or
    uvloop's): sync ``load`` in the main thread and in a worker thread, ``stream``, ``aload`` and a sync load
    made inside a running loop, both HTTP engines, with conversion. All exact; with the debug policy asyncio
    reports nothing (no call from a wrong thread, no exception never retrieved)."""
    problems: list = []
    handler = _Collect(problems)
    logging.getLogger("asyncio").addHandler(handler)
    asyncio.set_event_loop_policy(_DebugPolicy(problems) if policy == "debug" else uvloop.EventLoopPolicy())
    try:
        loops = []
        for engine in ("threads", "aiohttp"):
            config = QUICK.replace(http_engine=engine)
            for src, path in pair.values():
                exact(fastload.load(src, config=config, dtype=torch.float64), path, torch.float64)
                exact(bounded(lambda s=src, c=config: fastload.load(s, config=c), 15), path)
                with fastload.stream(src, config=config, dtype=torch.bfloat16) as s:
                    exact(dict(s), path, torch.bfloat16)

                async def main(s=src, c=config):
                    loops.append(type(asyncio.get_running_loop()))
                    return await fastload.aload(s, config=c), fastload.load(s, config=c)

                for got in asyncio.run(main()):
                    exact(got, path)
    finally:
        asyncio.set_event_loop_policy(None)
        logging.getLogger("asyncio").removeHandler(handler)
    assert not problems, problems
    if policy == "uvloop":
        assert set(loops) == {uvloop.Loop}


# -- many short loads ------------------------------------------------------------------------------------


_FASTLOAD_TYPES = ("DaemonThreadPool", "ThreadedStream", "LoadStream", "CancelWatch", "AtExit", "Trace",
                   "_UnixSelectorEventLoop", "ClientSession", "TCPConnector", "BufferPool")


def _live_objects() -> dict:
    gc.collect()
    counts = dict.fromkeys(_FASTLOAD_TYPES, 0)
    for obj in gc.get_objects():
        name = type(obj).__name__
        if name in counts:
            counts[name] += 1
    return counts


def test_fifty_short_loads_in_threads_at_once_leave_nothing_growing(pair, http_server):
    """Fifty threads start short loads together, ten of each: sync ``load`` over HTTP, local with conversion,
    a stream, ``asyncio.run(aload)``, and a sync load inside a running loop. Done twice: the second batch
    leaves the threads, fds, ``weakref.finalize`` registry and live fastload objects (pools, loops, streams,
    sessions) where the first left them, and every result is exact."""
    (local, local_path), (url, url_path) = pair["local"], pair["http"]

    def one(k):
        kind = k % 5
        if kind == 0:
            return fastload.load(url, config=QUICK)
        if kind == 1:
            return fastload.load(local, config=QUICK, dtype=torch.float64)
        if kind == 2:
            with fastload.stream(url, config=QUICK.replace(http_engine="aiohttp")) as s:
                return dict(s)
        if kind == 3:
            return asyncio.run(fastload.aload(local, config=QUICK))

        async def inside():
            return fastload.load(url, config=QUICK)
        return asyncio.run(inside())

    def batch():
        results: dict = {}
        go = threading.Barrier(50)

        def body(k):
            go.wait()
            try:
                results[k] = one(k)
            except BaseException as exc:  # noqa: BLE001 - reported below
                results[k] = exc
        threads = [threading.Thread(target=body, args=(k,)) for k in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a load hung"
        return results

    first = batch()
    del first
    time.sleep(0.2)
    threads_before, fds_before = threading.active_count(), fds()
    registry_before, objects_before = len(weakref.finalize._registry), _live_objects()
    results = batch()
    for k, got in results.items():
        assert not isinstance(got, BaseException), f"load {k}: {got!r}"
        kind = k % 5
        if kind == 1:
            exact(got, local_path, torch.float64)
        else:
            exact(got, local_path if kind == 3 else url_path)
    del results, got
    wait_until(lambda: threading.active_count() <= threads_before, 5)
    assert not wait_for_no_new_fds(fds_before, grace_s=2.0)
    assert len(weakref.finalize._registry) == registry_before
    assert _live_objects() == objects_before


# -- progress callbacks and threads ----------------------------------------------------------------------


def test_progress_is_never_entered_twice_at_once_and_stays_on_one_thread(pair, http_server):
    """Where does ``progress`` run? (The README does not say.) Observed: on the thread running the load's loop:
    the caller's own thread for a sync load with no loop running, a private thread for a sync load inside a
    running loop and for a stream, the loop's thread for ``aload``. Whatever the thread, a callback written
    without locks must be safe: for each load, across both HTTP engines and while other loads run, its calls
    come from one thread, never overlap, count up and end at the total."""
    records: dict = {}

    def make_progress(key):
        calls, gate = records.setdefault(key, {"calls": [], "overlap": 0}), threading.Lock()

        def progress(done, total):
            if not gate.acquire(blocking=False):
                calls["overlap"] += 1
                return
            try:
                calls["calls"].append((done, total, threading.get_ident()))
                time.sleep(0.0005)  # widen the window an overlap would need
            finally:
                gate.release()
        return progress

    def sync_plain(key, src, cfg):
        return fastload.load(src, config=cfg, progress=make_progress(key)), threading.get_ident()

    def sync_in_loop(key, src, cfg):
        async def main():
            return fastload.load(src, config=cfg, progress=make_progress(key))
        return asyncio.run(main()), threading.get_ident()

    def streamed(key, src, cfg):
        with fastload.stream(src, config=cfg, progress=make_progress(key)) as s:
            return dict(s), threading.get_ident()

    def in_aload(key, src, cfg):
        return asyncio.run(fastload.aload(src, config=cfg, progress=make_progress(key))), threading.get_ident()

    ways = {"plain": sync_plain, "in_loop": sync_in_loop, "stream": streamed, "aload": in_aload}
    jobs = [(way, kind, engine) for way in ways for kind in pair for engine in ("threads", "aiohttp")]
    out: dict = {}

    def body(job):
        way, kind, engine = job
        out[job] = ways[way](job, pair[kind][0], QUICK.replace(http_engine=engine, max_concurrency=4))

    threads = [threading.Thread(target=body, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    for job in jobs:
        got, caller = out[job]
        exact(got, pair[job[1]][1])
        rec = records[job]
        assert rec["overlap"] == 0, f"{job}: progress entered while it was running"
        dones = [d for d, _, _ in rec["calls"]]
        assert dones == sorted(dones) and dones[-1] == rec["calls"][-1][1], job
        threads_seen = {tid for _, _, tid in rec["calls"]}
        assert len(threads_seen) == 1, f"{job}: progress called from {len(threads_seen)} threads"
        if job[0] in ("plain", "aload"):
            assert threads_seen == {caller}, f"{job}: progress not on the caller's thread"
        else:
            assert caller not in threads_seen, job



FIRST_NETWORK_LOAD = """
import asyncio, importlib.abc, json, sys, threading

where = {}

class Watch(importlib.abc.MetaPathFinder):  # notes the thread each network module is first imported on
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("aiohttp", "botocore") or name in ("fastload.sources.http",
                                                                        "fastload.sources.s3"):
            where.setdefault(name, threading.current_thread().name)
        return None

sys.meta_path.insert(0, Watch())
import fastload

async def main():
    config = fastload.LoadConfig(s3=fastload.S3Options(endpoint_url=sys.argv[3]))
    got = await fastload.aload(sys.argv[1], config=config)
    got.update(await fastload.aload(sys.argv[2], config=config))
    return sorted(got)

print(json.dumps({"names": asyncio.run(main()), "where": where}))
"""


def test_the_first_network_load_of_a_process_imports_aiohttp_and_botocore_off_the_callers_loop(
        http_server, s3_server, s3_bucket, tmp_path):
    """aiohttp and botocore take 0.1-0.3 s to import (over a second on a busy machine). The first ``aload`` of an
    HTTP or S3 source in a process imported them in the caller's event loop, which stood still meanwhile (debug
    mode: a slow callback). They are imported on worker threads now: none on the loop's thread."""
    path, _ = write_checkpoint(tmp_path / "m.safetensors", count=2)
    http_path = Path(http_server.root) / "first-network-load.safetensors"
    http_path.write_bytes(path.read_bytes())
    s3_server.put(s3_bucket, "first.safetensors", path.read_bytes())
    script = tmp_path / "first_network_load.py"
    script.write_text(FIRST_NETWORK_LOAD)
    done = subprocess.run([sys.executable, str(script), http_server.url_for(http_path),
                           f"s3://{s3_bucket}/first.safetensors", s3_server.endpoint_url], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["names"], report
    assert {"aiohttp", "botocore", "fastload.sources.http", "fastload.sources.s3"} <= set(report["where"]), report
    on_the_loop = {name: thread for name, thread in report["where"].items() if thread == "MainThread"}
    assert not on_the_loop, f"imported on the event loop's thread: {on_the_loop}"


_POOL_CANNOT_START = r'''
import threading
from fastload.runner import DaemonThreadPool

pool = DaemonThreadPool(2, "fastload-test")
ran = []
threading.stack_size(1 << 45)  # no address space holds such a stack: Thread.start raises
try:
    pool.submit(ran.append, "refused")
    error = None
except RuntimeError as exc:
    error = str(exc)
threading.stack_size(0)
pool.submit(ran.append, "later").result(10)
counted = len(pool._threads)
pool.shutdown(wait=True)
print(repr((error is not None, ran, counted)))
'''


def test_a_pool_job_whose_thread_cannot_start_is_refused_and_never_run_later():
    """``DaemonThreadPool.submit`` that cannot start its worker raises to the caller, who takes the job as not
    run: it must not stay queued for the next worker (it ran after its caller had given up on it), and the
    thread that never started must not be counted (it took a place among ``max_workers``)."""
    done = subprocess.run([sys.executable, "-c", _POOL_CANNOT_START], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(True, ['later'], 1)", done


def test_jobs_submitted_one_after_another_run_on_one_thread():
    """The next job, submitted the moment the last one's result is out (a load's probe, then its header, then
    its data), finds the thread that ran the last one free: it used to start another thread (a thread-local HTTP
    connection: a new connection, its handshakes before the first byte) whenever it won the race against the
    worker marking itself idle. Also through an event loop, as loads submit them."""
    from fastload.runner import DaemonThreadPool

    pool = DaemonThreadPool(8, "fastload-test")
    try:
        for i in range(300):
            assert pool.submit(lambda n: n * 2, i).result(10) == 2 * i
        assert len(pool._threads) == 1

        async def in_turn():
            loop = asyncio.get_running_loop()
            for i in range(300):
                assert await loop.run_in_executor(pool, lambda n: n + 1, i) == i + 1

        asyncio.run(in_turn())
        assert len(pool._threads) == 1
        # the race made certain: the next job submitted from the last one's done callback (which runs in the
        # worker, inside set_result), the way a result handed to another thread can come back at once
        chained = []

        def then(future):
            chained.append(future.result())
            if len(chained) < 20:
                pool.submit(len, chained).add_done_callback(then)

        pool.submit(len, chained).add_done_callback(then)
        deadline = time.monotonic() + 10
        while len(chained) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert chained == list(range(20)) and len(pool._threads) == 1, (chained, len(pool._threads))
        with pytest.raises(ZeroDivisionError):  # an error is handed over the same way, and frees the thread too
            pool.submit(lambda: 1 / 0).result(10)
        assert pool.submit(int, "7").result(10) == 7 and len(pool._threads) == 1
    finally:
        pool.shutdown(wait=True)
