"""A long-running inference service: one process making many small loads, for days.

Each test makes 40-64 loads in a row in this process, mixing ``fastload.load``, ``fastload.aload`` (under
``asyncio.run`` and inside one long-lived event loop), ``fastload.stream`` (consumed, and left early),
``fastload.plan`` and ``fastload.pull`` (into fresh destinations), over local files, the HTTP range server and moto
S3; then the same with loads that fail (missing file, 404, NoSuchKey, malformed header), and with loads made from
many short-lived threads. After a warm-up (iteration 20) and again at the end, a census of what a load could leave
behind must be unchanged: threads, non-socket descriptors, client sockets to the servers, live objects of
fastload's own types and of the event-loop / pool / session types it makes, unclosed event loops,
``weakref.finalize`` registry entries (``runner.AtExit``), ``atexit`` callbacks and the SIGINT handler; where the
in-process S3 server's own state does not muddy it, traced memory (``tracemalloc``) may only grow by noise.
Results are checked against ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures as cf
import gc
import selectors
import shutil
import signal
import socket
import threading
import time
import tracemalloc
import weakref
from collections import Counter
from pathlib import Path

import botocore.session
import pytest
import torch
from checkpoints import write_single
from reliability_helpers import QUICK_RETRY, client_sockets, fds, same_bytes
from safetensors.torch import load_file

import fastload

CHUNK = 64 * 1024
CFG = fastload.LoadConfig(chunk_bytes=CHUNK, max_concurrency=4, host_buffer_bytes=8 * CHUNK, stall_timeout_s=5.0,
                          connect_timeout_s=2.0, retry=QUICK_RETRY)
WARMUP = 20


# -- the census --------------------------------------------------------------------------------------------------


def _type_key(obj) -> str | None:
    """What the census counts ``obj`` as (None: not counted)."""
    cls = type(obj)
    module = getattr(cls, "__module__", None)
    if type(module) is not str:  # (a class whose __module__ is a descriptor)
        return None
    if module.startswith("fastload"):
        return f"{module}.{cls.__qualname__}"
    # (issubclass(type()), not isinstance: isinstance reads __class__, and torch's deprecated attributes warn)
    if issubclass(cls, asyncio.AbstractEventLoop):
        return "event loop (open)" if not obj.is_closed() else "event loop (closed, alive)"
    if issubclass(cls, (asyncio.Future, cf.Future, cf.ThreadPoolExecutor, threading.Thread, socket.socket,
                        selectors.BaseSelector)):
        return f"{module}.{cls.__qualname__}"
    if module.startswith(("aiohttp", "urllib3", "botocore.client", "botocore.session", "botocore.endpoint")) \
            and cls.__name__ in ("ClientSession", "TCPConnector", "HTTPConnectionPool", "S3", "Session",
                                 "Endpoint", "URLLib3Session"):
        return f"{module}.{cls.__qualname__}"
    return None


def _thread_is_ours(thread: threading.Thread) -> bool:
    # The in-process servers' handler threads (RangeHTTPServer's, moto's werkzeug) are not the loader's.
    return "process_request" not in thread.name


class Census:
    """What a load could leave behind, counted; ``take()`` after a collection."""

    def __init__(self, ports: set[int] = frozenset()):
        self.ports = set(ports)

    def take(self) -> dict:
        gc.collect()
        objects = Counter(key for key in map(_type_key, gc.get_objects()) if key is not None)
        # Thread objects of the servers' handlers come and go with their connections: not ours to count.
        objects.pop("threading.Thread", None)
        return {
            "threads": sorted(t.name for t in threading.enumerate() if _thread_is_ours(t)),
            "fds": sorted(fd.split(" -> ", 1)[1] for fd in fds()),
            "client sockets": len(client_sockets(self.ports)) if self.ports else 0,
            "finalize registry": len(weakref.finalize._registry),
            "atexit callbacks": atexit._ncallbacks(),
            "SIGINT handler": signal.getsignal(signal.SIGINT),
            "objects": dict(objects),
        }

    def settled(self, before: dict, seconds: float = 3.0) -> dict:
        """The census once nothing in it has grown since ``before`` (threads and sockets take a moment to go), or
        after ``seconds``."""
        deadline = time.monotonic() + seconds
        while True:
            now = self.take()
            if not grown(before, now) or time.monotonic() > deadline:
                return now
            time.sleep(0.05)


def grown(before: dict, after: dict) -> dict:
    """What ``after`` has more of than ``before`` (less is fine: a warm-up connection closed since)."""
    diff = {}
    for key, old in before.items():
        new = after[key]
        if key == "objects":
            if more := {k: (old.get(k, 0), n) for k, n in new.items() if n > old.get(k, 0)}:
                diff[key] = more
        elif isinstance(old, list):
            if extra := list((Counter(new) - Counter(old)).elements()):
                diff[key] = extra
        elif isinstance(old, int):
            if new > old:
                diff[key] = (old, new)
        elif new != old:
            diff[key] = (old, new)
    return diff


def assert_same(before: dict, after: dict, what: str) -> None:
    diff = grown(before, after)
    assert not diff, f"{what}: grew between iteration {WARMUP} and the end: {diff}"


class Traced:
    """``tracemalloc`` for the test's duration (one frame: cheap), started here unless it already runs."""

    def __enter__(self) -> Traced:
        self.started = not tracemalloc.is_tracing()
        if self.started:
            tracemalloc.start(1)
        return self

    def now(self, http_server=None) -> int:
        if http_server is not None:
            http_server.reset()  # the test server's own request log is not the loader's memory
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    def __exit__(self, *exc) -> None:
        if self.started:
            tracemalloc.stop()


def check_exact(got: dict, path: Path, dtype: torch.dtype | None = None) -> None:
    want = load_file(str(path))
    assert list(got) == list(want) or set(got) == set(want)
    for name, tensor in want.items():
        expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert same_bytes(got[name], expected), name


def tensors(seed: int) -> dict[str, torch.Tensor]:
    """~200 KB in several 64 KiB chunks: a float32, a float16 and an int64 tensor."""
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40_000, generator=g), "h": torch.randn(40, 50, generator=g).half(),
            "ids": torch.arange(1_000, dtype=torch.int64)}


@pytest.fixture
def ckpt(tmp_path, http_server, http_dir) -> dict:
    """The same checkpoint as a local path and an HTTP URL (and the file, for the oracle)."""
    path = write_single(tmp_path / "m.safetensors", tensors(1))
    shutil.copy(path, http_dir / "m.safetensors")
    return {"path": path, "local": str(path), "http": http_server.url_for(http_dir / "m.safetensors")}


def one_of_each(i: int, src: str, path: Path, loop: asyncio.AbstractEventLoop, pulls: Path,
                cfg: fastload.LoadConfig = CFG) -> None:
    """The ``i``-th load of the service: every entry point in turn, each result checked."""
    kind = i % 8
    if kind == 0:
        check_exact(fastload.load(src, config=cfg), path)
    elif kind == 1:  # converted: staging buffers and the worker pool
        check_exact(fastload.load(src, config=cfg, dtype=torch.float64, trace=fastload.Trace()), path, torch.float64)
    elif kind == 2:
        check_exact(asyncio.run(fastload.aload(src, config=cfg)), path)
    elif kind == 3:  # in the service's one long-lived loop
        check_exact(loop.run_until_complete(fastload.aload(src, config=cfg, dtype=torch.float32)), path,
                    torch.float32)
    elif kind == 4:
        with fastload.stream(src, config=cfg) as s:
            check_exact(dict(s), path)
    elif kind == 5:  # left after the first tensor
        with fastload.stream(src, config=cfg.replace(max_concurrency=1)) as s:
            for name, tensor in s:
                assert name in ("w", "h", "ids")
                break
    elif kind == 6:
        p = fastload.plan(src, config=cfg)
        assert [t.name for t in p.tensors] == list(load_file(str(path)))
    else:
        destination = pulls / f"pull-{i}"
        out = Path(fastload.pull(src, to=destination, config=cfg))  # (a single file's pull names the file)
        check_exact(load_file(str(out if out.is_file() else out / "m.safetensors")), path)
        shutil.rmtree(destination)


# -- many good loads ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["local", "http"])
def test_sixty_four_mixed_loads_leave_every_resource_flat(transport, ckpt, http_server, tmp_path):
    """64 loads of one checkpoint through every entry point in turn (load, converted load, aload under
    asyncio.run and in one long-lived loop, stream consumed and left early, plan, pull into a fresh directory):
    from iteration 20 to 64 nothing grows (threads, fds, sockets, objects, finalize registry, atexit, SIGINT
    handler), and traced memory grows by less than 1.2 KB a load (a staging buffer, a Trace or a session kept
    per load would be far more)."""
    src, path = ckpt[transport], ckpt["path"]
    census = Census({http_server.port})
    loop = asyncio.new_event_loop()
    pulls = tmp_path / "pulls"
    try:
        with Traced() as traced:
            for i in range(WARMUP):
                one_of_each(i, src, path, loop, pulls)
            before, memory_before = census.take(), traced.now(http_server)
            for i in range(WARMUP, 64):
                one_of_each(i, src, path, loop, pulls)
            after = census.settled(before)
            growth = traced.now(http_server) - memory_before
        assert_same(before, after, f"{transport} loads")
        assert growth < 72 * 1024, f"traced memory grew by {growth} bytes over 44 loads"
        # fastload's CPU work runs on pools of its own, never on the caller's default executor
        assert loop._default_executor is None
        assert asyncio.all_tasks(loop) == set()
    finally:
        loop.close()


def test_s3_loads_with_and_without_a_shared_session_leave_nothing(s3_server, s3_bucket, ckpt, tmp_path):
    """40 S3 loads through every entry point, most with a caller's botocore session (the README's advice for
    services), every eighth without one (a client made per load): no client, session, pool, socket, thread or
    exit hook is kept from one load to the next. (Traced memory is not measured: botocore's global endpoint cache, 100
    entries, and the in-process moto server's own allocations would hide fastload's.)"""
    s3_server.put(s3_bucket, "m.safetensors", ckpt["path"].read_bytes())
    src, path = f"s3://{s3_bucket}/m.safetensors", ckpt["path"]
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    shared = CFG.replace(s3=fastload.S3Options(session=botocore.session.Session()))
    census = Census({port})
    loop = asyncio.new_event_loop()
    pulls = tmp_path / "pulls"
    try:
        for i in range(40):
            if i == WARMUP:
                before = census.take()
            one_of_each(i, src, path, loop, pulls, shared if i % 8 else CFG)
        after = census.settled(before)
        assert_same(before, after, "S3 loads")
        assert loop._default_executor is None
    finally:
        loop.close()


# -- many failed loads --------------------------------------------------------------------------------------------


def _bad_header_file(path: Path) -> Path:
    """A file whose 8-byte length says 40 bytes of header, followed by 40 bytes that are not JSON."""
    path.write_bytes((40).to_bytes(8, "little") + b"{not json at all, not json at all,,,,!!}" + b"\0" * 64)
    return path


def test_sixty_eight_failed_loads_leak_nothing(tmp_path, http_server, http_dir):
    """A service retrying sources that fail: a missing file, an HTTP 404, a malformed header (local and HTTP),
    through load, aload (asyncio.run and a long-lived loop), stream, plan and pull (of the missing ones: pull
    copies bytes, it does not parse them), 68 times, keeping the last error as a service does. Every failure is
    typed; from iteration 20 on nothing grows, traced memory included."""
    bad = _bad_header_file(tmp_path / "bad.safetensors")
    shutil.copy(bad, http_dir / "bad.safetensors")
    sources = [(str(tmp_path / "absent.safetensors"), fastload.SourceNotFoundError),
               (http_server.url_for(http_dir) + "/absent.safetensors", fastload.SourceNotFoundError),
               (str(bad), fastload.FormatError),
               (http_server.url_for(http_dir / "bad.safetensors"), fastload.FormatError)]
    census = Census({http_server.port})
    loop = asyncio.new_event_loop()
    last_error = None

    def fail(i: int) -> BaseException:
        src, expected = sources[i % len(sources)]
        kind = (i // len(sources)) % 6
        with pytest.raises(expected) as caught:
            if kind == 0:
                fastload.load(src, config=CFG)
            elif kind == 1:
                asyncio.run(fastload.aload(src, config=CFG))
            elif kind == 2:
                loop.run_until_complete(fastload.aload(src, config=CFG, dtype=torch.float16))
            elif kind == 3:
                with fastload.stream(src, config=CFG) as s:
                    list(s)
            elif kind == 4:
                fastload.plan(src, config=CFG)
            elif expected is fastload.SourceNotFoundError:
                fastload.pull(src, to=tmp_path / f"pull-{i}", config=CFG)
            else:
                fastload.load(src, config=CFG, names=["w"])
        return caught.value

    try:
        with Traced() as traced:
            for i in range(WARMUP):
                last_error = fail(i)
            before, memory_before = census.take(), traced.now(http_server)
            # Ending on the source and entry point iteration 19 failed with (they repeat every 24): the error kept
            # holds the caller's frame, and with it what that frame held (a closed stream, say) at both ends alike.
            for i in range(WARMUP, 68):
                last_error = fail(i)
            after = census.settled(before)
            growth = traced.now(http_server) - memory_before
        assert isinstance(last_error, fastload.FastloadError)
        assert_same(before, after, "failed loads")
        assert growth < 64 * 1024, f"traced memory grew by {growth} bytes over 48 failed loads"
        assert loop._default_executor is None
    finally:
        loop.close()


def test_s3_no_such_key_and_no_such_bucket_many_times_leak_nothing(s3_server, s3_bucket):
    """40 S3 loads of a key that is not there (and of a bucket that is not there), by load, aload, stream and
    plan, with a shared botocore session (every eighth without): typed errors, and nothing kept from one to the
    next."""
    shared = CFG.replace(s3=fastload.S3Options(session=botocore.session.Session()))
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    census = Census({port})
    sources = [f"s3://{s3_bucket}/absent.safetensors", "s3://no-such-bucket-for-fastload-tests/m.safetensors"]

    def fail(i: int) -> None:
        src, config = sources[i % 2], shared if i % 8 else CFG
        with pytest.raises(fastload.SourceNotFoundError):
            kind = (i // 2) % 4
            if kind == 0:
                fastload.load(src, config=config)
            elif kind == 1:
                asyncio.run(fastload.aload(src, config=config))
            elif kind == 2:
                with fastload.stream(src, config=config) as s:
                    list(s)
            else:
                fastload.plan(src, config=config)

    for i in range(40):
        if i == WARMUP:
            before = census.take()
        fail(i)
    assert_same(before, census.settled(before), "failed S3 loads")


# -- many short-lived threads ------------------------------------------------------------------------------------


def test_loads_from_fifty_two_short_lived_threads_leave_nothing(ckpt, http_server, tmp_path):
    """A request handler per thread: 52 threads, four at a time, each making one load of a kind (local or HTTP,
    every entry point) and ending. Each thread's loop and pools go with it; from the 20th on nothing grows."""
    census = Census({http_server.port})
    pulls = tmp_path / "pulls"
    errors: list = []

    def body(i: int) -> None:
        loop = asyncio.new_event_loop()  # a thread's own loop, as a worker thread of a service would make
        try:
            one_of_each(i, ckpt["local" if i % 2 else "http"], ckpt["path"], loop, pulls)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append((i, exc))
        finally:
            loop.close()

    def round_of_four(start: int) -> None:
        threads = [threading.Thread(target=body, args=(i,), name=f"service-request-{i}")
                   for i in range(start, start + 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a load hung"

    with Traced() as traced:
        for start in range(0, WARMUP, 4):
            round_of_four(start)
        before, memory_before = census.take(), traced.now(http_server)
        for start in range(WARMUP, 52, 4):
            round_of_four(start)
        after = census.settled(before)
        growth = traced.now(http_server) - memory_before
    assert not errors, errors[:3]
    assert_same(before, after, "loads from short-lived threads")
    assert growth < 96 * 1024, f"traced memory grew by {growth} bytes over 32 loads in 32 threads"


# -- one long-lived event loop -----------------------------------------------------------------------------------


def test_one_event_loop_serving_sixty_requests_stays_clean(ckpt, http_server):
    """An async server: one loop, one long main task, 60 requests (aload, a sync load called from the coroutine,
    a stream iterated in the coroutine and one left early), local and HTTP. Afterwards the loop holds no task,
    no pending callback or timer of fastload's, no default executor and no async generator, and the process
    nothing more than after request 20."""
    census = Census({http_server.port})
    path = ckpt["path"]
    snapshots: dict = {}

    async def request(i: int) -> None:
        src = ckpt["local" if i % 2 else "http"]
        kind = (i // 2) % 4
        if kind == 0:
            check_exact(await fastload.aload(src, config=CFG), path)
        elif kind == 1:
            check_exact(fastload.load(src, config=CFG, dtype=torch.float64), path, torch.float64)
        elif kind == 2:
            with fastload.stream(src, config=CFG) as s:
                check_exact(dict(s), path)
        else:
            with fastload.stream(src, config=CFG.replace(max_concurrency=1)) as s:
                next(iter(s))

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for i in range(60):
            if i == WARMUP:
                await asyncio.sleep(0.05)  # (as below: the last sleep's future stays alive in asyncio)
                snapshots["before"] = census.take()
                snapshots["scheduled"] = len(loop._scheduled)
            await request(i)
        await asyncio.sleep(0.05)  # callbacks a load left (CancelWatch's) run now
        snapshots["tasks"] = asyncio.all_tasks() - {asyncio.current_task()}
        snapshots["ready"] = len(loop._ready)
        snapshots["scheduled after"] = len(loop._scheduled)
        snapshots["executor"] = loop._default_executor
        snapshots["asyncgens"] = len(loop._asyncgens)
        snapshots["after"] = census.settled(snapshots["before"])

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()
    assert snapshots["tasks"] == set()
    assert snapshots["ready"] == 0
    assert snapshots["scheduled after"] <= snapshots["scheduled"]
    assert snapshots["executor"] is None
    assert snapshots["asyncgens"] == 0
    assert_same(snapshots["before"], snapshots["after"], "requests in one loop")


def test_aload_by_host_name_does_not_need_the_callers_default_executor(ckpt, http_server):
    """A service's loop whose default executor (one thread) is busy waiting for the weights, e.g. a
    ``run_in_executor(None, wait_for_model)``: the README says fastload's work never runs on the caller's
    default executor, for exactly that reason (it would deadlock). An ``aload`` of ``http://localhost:...`` must
    therefore finish while that thread is still blocked (a load takes milliseconds here; the thread is held
    1.5 s)."""
    url = ckpt["http"].replace("127.0.0.1", "localhost")
    result: dict = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="service-default"))
        loaded = threading.Event()
        waiter = loop.run_in_executor(None, loaded.wait, 1.5)  # the service waits for its weights
        started = time.monotonic()
        try:
            result["state"] = await asyncio.wait_for(fastload.aload(url, config=CFG), 6.0)
        finally:
            result["seconds"] = time.monotonic() - started
            loaded.set()
            await waiter

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
        loop.run_until_complete(loop.shutdown_default_executor())
    finally:
        loop.close()
    check_exact(result["state"], ckpt["path"])
    assert result["seconds"] < 1.0, (
        f"aload of a host name waited {result['seconds']:.1f} s for the caller's busy default executor")
