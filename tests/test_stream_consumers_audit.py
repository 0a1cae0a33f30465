"""Audit: ``fastload.stream`` as consumers really use it.

A slow consumer (sleeps per tensor, a generator pipeline over the stream) with ``names=``, ``dtype=`` and
``shard=`` over local disk, HTTP and S3: every tensor bit-exact against ``safetensors`` and the staging
buffers in flight within ``host_buffer_bytes`` (measured from the trace's chunk events). A consumer that
moves each tensor elsewhere and drops it: the storages are freed while the stream, its trace, and (after a
failure) its error are still alive. Misuse in one thread: two iterators of one stream, entering a stream that
is open, ``next`` after ``StopIteration``, ``zip`` of two streams. A stream abandoned without its ``with``
exit, both inside a consumer generator and as a bare entered stream. Ctrl-C (a real SIGINT to this process)
while iterating over HTTP, in plain sync code and in a coroutine under ``asyncio.run`` (as in a notebook or
an async service). An error in the middle of a stream (a shard answering 404, an S3 shard replaced mid-load):
the tensors before it are exact, the error is typed, names the URL, comes out of the ``for`` statement and
again on every later iteration, and nothing is left behind.

Only what the rest of the suite does not already cover (see test_cancel.py, test_contract.py,
test_api_concurrency_corners.py, test_memory_and_races.py, test_process_robustness_audit.py).
"""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from checkpoints import llama_like_tensors, write_sharded, write_single
from reliability_helpers import Leaks, Timer, assert_bit_exact, bounded, same_bytes, sigint_after
from servers.faults import FailWith, HangAfter, SlowFirstByte
from torch.multiprocessing.reductions import StorageWeakRef

import fastload

CHUNK = 64 * 1024
CONFIG = fastload.LoadConfig(chunk_bytes=CHUNK, host_buffer_bytes=4 * CHUNK, max_concurrency=4,
                             stall_timeout_s=5.0, connect_timeout_s=2.0,
                             retry=fastload.RetryConfig(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.05,
                                                        deadline_s=10.0))
SHARD_RULES = {r"(q|k|v)_proj\.weight$": 0, r"(o|down)_proj\.weight$": 1}


@dataclass(eq=False)
class FailAfter(FailWith):
    """Answer the first ``after`` matching requests (size probe and header), then fail with ``status``."""

    after: int = 2

    def wants_to_fire(self) -> bool:
        return self.seen > self.after


@dataclass(eq=False)
class SlowData(SlowFirstByte):
    """Delay every read of a shard after the first ``after`` (size probe and header) of the two shards."""

    after: int = 4

    def wants_to_fire(self) -> bool:
        return self.seen > self.after


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A llama-like float32 checkpoint (~2 MB) in 2 shards plus its index, and the reference tensors."""
    tensors = llama_like_tensors(layers=2, hidden=128, intermediate=384, vocab=512, dtype=torch.float32, seed=3)
    directory = write_sharded(tmp_path_factory.mktemp("stream-consumers") / "ck", tensors, 2)
    ref = {}
    for shard in sorted(directory.glob("*.safetensors")):
        ref |= safetensors.torch.load_file(str(shard))
    assert set(ref) == set(tensors)
    return directory, ref


def source_for(kind: str, directory: Path, request) -> tuple[str, set[int]]:
    """The checkpoint directory as a source over ``kind``, and the server ports a load talks to."""
    if kind == "local":
        return str(directory), set()
    if kind == "http":
        server = request.getfixturevalue("http_server")
        target = request.getfixturevalue("http_dir") / directory.name
        target.mkdir()
        for file in directory.iterdir():
            (target / file.name).write_bytes(file.read_bytes())
        return server.url_for(target) + "/", {server.port}
    s3 = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    s3.upload_dir(bucket, "ck", directory)
    return f"s3://{bucket}/ck/", {int(s3.endpoint_url.rsplit(":", 1)[1].strip("/"))}


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    depth = peak = 0
    for _, delta in events:
        depth += delta
        peak = max(peak, depth)
    return peak


# -- a slow consumer with names=, dtype=, shard=, through a generator pipeline ------------------------------

@pytest.mark.parametrize("kind", ["local", "http", "s3"])
def test_slow_pipeline_consumer_with_names_dtype_shard_is_exact_and_staging_stays_in_budget(kind, ckpt, request):
    """``dict((n, t.float()) for n, t in s)`` over a stream that converts to float16 and takes rank 1 of 2 of a
    subset, with a consumer that sleeps on every tensor: each tensor arrives once, exactly
    ``full.tensor_split(2, dim)[1].to(float16)``; no more staged reads are in flight at once than
    ``host_buffer_bytes`` holds buffers."""
    directory, ref = ckpt
    source, ports = source_for(kind, directory, request)
    names = [n for n in ref if ".layers.1." in n or n == "model.embed_tokens.weight"]
    shard = fastload.Shard(1, 2, SHARD_RULES)
    trace = fastload.Trace()
    seen: list[str] = []
    with Leaks(ports) as leaks:
        with fastload.stream(source, names=names, dtype="float16", shard=shard, config=CONFIG, trace=trace) as s:
            def slow():
                for name, tensor in s:
                    seen.append(name)
                    time.sleep(0.003)
                    yield name, tensor
            pipeline = ((n, t, t.float()) for n, t in slow())  # a consumer's generator pipeline
            results = {n: (t, f) for n, t, f in pipeline}
            plan = s.plan
        leaks.check(grace_s=1.0)
    assert sorted(seen) == sorted(names) and len(seen) == len(set(seen))
    for name in names:
        full = ref[name]
        dim = shard.dim_for(name)
        want = (full if dim is None else full.tensor_split(2, dim)[1]).contiguous().to(torch.float16)
        assert same_bytes(results[name][0], want), name
        assert same_bytes(results[name][1], want.float()), name
    staged = [(c["requested"], c["filled"]) for c in trace.chunks if c["staged"] and c["filled"] is not None]
    assert staged, "with dtype= every chunk is staged: the trace shows none"
    buffers = max(2, CONFIG.host_buffer_bytes // plan.chunk_bytes)
    assert max_overlap(staged) <= buffers, (max_overlap(staged), buffers)
    assert not trace.summary().errors


# -- tensors the consumer drops are freed ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["http", "s3"])
def test_tensors_moved_out_and_dropped_are_freed_while_stream_and_trace_live(kind, ckpt, request):
    """The README's quickstart consumer: copy each tensor into the model, drop it. Over the network and with a
    conversion (staged reads), every storage handed out is freed as soon as the consumer lets it go: midway,
    at the end of the loop, and after the ``with`` block, while the stream object and its trace still live."""
    directory, ref = ckpt
    source, _ = source_for(kind, directory, request)
    model = {n: torch.empty_like(t, dtype=torch.bfloat16) for n, t in ref.items()}
    refs: list[StorageWeakRef] = []
    trace = fastload.Trace()
    midway = None
    s = fastload.stream(source, dtype=torch.bfloat16, config=CONFIG, trace=trace)
    with s:
        for name, tensor in s:
            model[name].copy_(tensor)
            refs.append(StorageWeakRef(tensor.untyped_storage()))
            del tensor
            if len(refs) == len(ref) // 2:
                gc.collect()
                midway = sum(not r.expired() for r in refs)
        gc.collect()
        at_end = sum(not r.expired() for r in refs)
    gc.collect()
    after = sum(not r.expired() for r in refs)
    assert len(refs) == len(ref)
    assert (midway, at_end, after) == (0, 0, 0), "storages the consumer dropped are still held by the load"
    for name, tensor in ref.items():
        assert same_bytes(model[name], tensor.to(torch.bfloat16)), name
    assert s.plan is not None and trace.summary().bytes_fetched > 0


# -- misuse in one thread ----------------------------------------------------------------------------------

def test_two_iterators_of_one_stream_in_one_thread_share_it_and_reentry_is_refused(ckpt):
    """``a, b = iter(s), iter(s)`` advanced alternately: every tensor goes to exactly one of them; entering
    the open stream again raises and leaves it working; ``next`` after ``StopIteration`` raises it again; a
    new iteration of the finished stream is empty, inside and after the ``with``."""
    directory, ref = ckpt

    def run():
        got: dict = {}
        with fastload.stream(directory, config=CONFIG) as s:
            with pytest.raises(RuntimeError, match="runs once"):
                s.__enter__()
            a, b = iter(s), iter(s)
            live = [a, b]
            while live:
                for it in list(live):
                    try:
                        name, tensor = next(it)
                    except StopIteration:
                        live.remove(it)
                        with pytest.raises(StopIteration):
                            next(it)
                        continue
                    assert name not in got
                    got[name] = tensor
            assert list(s) == []
        assert list(s) == []
        return got

    assert_bit_exact(bounded(run, 20), ref)


@pytest.mark.parametrize("kind", ["local", "http"])
def test_zip_of_two_streams_then_the_longer_one_is_closed_unfinished(kind, ckpt, tmp_path, request):
    """``for (na, ta), (nb, tb) in zip(a, b)``: the pairs are exact; ``zip`` stops with the shorter stream, so
    the longer one leaves its ``with`` unfinished: iterating it afterwards must say so (never end quietly, as
    if its few tensors were the whole load), and nothing is left running."""
    directory, ref = ckpt
    source, ports = source_for(kind, directory, request)
    short = {"a": torch.arange(3.0), "b": torch.arange(4, dtype=torch.int32)}
    short_path = write_single(tmp_path / "short.safetensors", short)
    pairs = []

    def run():
        with fastload.stream(source, config=CONFIG) as big, fastload.stream(short_path, config=CONFIG) as small:
            for (nb, tb), (ns, ts) in zip(big, small):
                pairs.append((nb, tb, ns, ts))
        return big

    with Leaks(ports) as leaks:
        big = bounded(run, 20)
        leaks.check(grace_s=1.0)
    assert len(pairs) == 2
    for nb, tb, ns, ts in pairs:
        assert same_bytes(tb, ref[nb]) and same_bytes(ts, short[ns])
    with pytest.raises(RuntimeError, match="closed before"):
        list(big)


# -- abandoned streams -------------------------------------------------------------------------------------

def _slow_http(http_server, directory, request) -> tuple[str, object]:
    source, _ = source_for("http", directory, request)
    return source, http_server.faults._add(SlowData(pattern="*/model-0000?-of-00002.safetensors", seconds=0.1))


def test_consumer_generator_dropped_half_read_closes_its_stream(ckpt, http_server, request):
    """``def weights(): with fastload.stream(src) as s: yield from s``, read once and dropped: the generator's
    finalizer leaves the ``with`` block, which stops the load: no request after that, no thread, no socket."""
    directory, _ = ckpt
    source, slow = _slow_http(http_server, directory, request)
    config = CONFIG.replace(max_concurrency=2)

    def weights():
        with fastload.stream(source, config=config) as s:
            yield from s

    with Leaks({http_server.port}) as leaks:
        gen = weights()
        _, tensor = next(gen)
        del gen, tensor
        gc.collect()
        time.sleep(0.3)
        requests = slow.seen
        time.sleep(0.5)
        assert slow.seen == requests, "requests went out after the consumer's generator was dropped"
        leaks.check(grace_s=0.5)


def test_entered_stream_dropped_without_close_stops_after_gc(ckpt, http_server, request):
    """A stream entered by hand (``s.__enter__()``, as a framework's setup hook does), read once, and dropped
    without ``close()``: nobody can ever read its other tensors, yet the load goes on downloading the whole
    checkpoint into memory, with its thread and sockets, until it ends by itself (it keeps itself alive: the
    producer's closure refers to the stream). After ``gc.collect()`` the load should stop, like a file object
    that is closed when collected."""
    directory, _ = ckpt
    source, slow = _slow_http(http_server, directory, request)
    config = CONFIG.replace(max_concurrency=2)

    def open_read_once_and_forget():
        s = fastload.stream(source, config=config)
        s.__enter__()
        next(iter(s))

    with Leaks({http_server.port}) as leaks:
        open_read_once_and_forget()
        gc.collect()
        time.sleep(0.3)
        requests = slow.seen
        time.sleep(0.5)
        later = slow.seen
        threads = [t.name for t in leaks.new_threads()]
        try:
            assert later == requests, (
                f"{later - requests} requests went out 0.3-0.8 s after the stream was dropped and collected; "
                f"threads still running: {threads}")
            leaks.check(grace_s=0.5)
        finally:
            _wait_load_gone(leaks, 20.0)  # the abandoned load ends by itself: leave nothing to the next test


def _wait_load_gone(leaks: Leaks, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while [t for t in leaks.new_threads() if t.name.startswith("fastload")] or leaks.sockets():
        assert time.monotonic() < deadline, "the abandoned load never ended"
        time.sleep(0.05)


# -- Ctrl-C ------------------------------------------------------------------------------------------------

def test_sigint_while_iterating_an_http_stream_then_the_next_stream_works(ckpt, http_server, request):
    """A real SIGINT to this process while the main thread waits in the ``for`` over an HTTP stream whose
    second shard hangs: KeyboardInterrupt comes out of the loop at once, the ``with`` exit leaves no thread or
    socket, and the same stream opened again (server healthy) gives every tensor exactly."""
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    directory, ref = ckpt
    source, _ = source_for("http", directory, request)
    hang = http_server.faults._add(HangAfter(pattern="*00002-of-00002*", after=2))
    first = threading.Event()
    got = []
    with Leaks({http_server.port}) as leaks:
        sent: list[float] = []
        killer = sigint_after(first, 0.2, sent)
        with pytest.raises(KeyboardInterrupt), fastload.stream(source, config=CONFIG) as s:
            for name, _ in s:
                got.append(name)
                first.set()
        took = time.monotonic() - sent[0]
        killer.join(5)
        assert hang.fired >= 1, "the load never reached the hanging shard"
        assert took < 2.0, f"KeyboardInterrupt took {took:.1f} s"
        leaks.check(grace_s=1.0)
    http_server.faults.clear()
    with fastload.stream(source, config=CONFIG) as s:
        again = dict(s)
    assert_bit_exact(again, ref)


def test_sigint_while_a_coroutine_iterates_a_stream_under_asyncio_run(ckpt, http_server, request):
    """``asyncio.run(main())`` whose coroutine iterates the sync ``fastload.stream`` (README: sync calls work
    inside a running event loop) over HTTP, and Ctrl-C. ``asyncio.run``'s SIGINT handler only cancels the main
    task; ``fastload.load`` notices that (runner.run polls the task's ``cancelling()``), the stream does not:
    the consumer stays blocked in the queue until the hung read times out, and then the load's TransferError
    comes out instead of KeyboardInterrupt (the Ctrl-C is lost)."""
    assert threading.current_thread() is threading.main_thread()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    directory, _ = ckpt
    source, _ = source_for("http", directory, request)
    hang = http_server.faults._add(HangAfter(pattern="*00002-of-00002*", after=2))
    config = CONFIG.replace(stall_timeout_s=1.5, retry=fastload.RetryConfig(max_attempts=1, deadline_s=10.0))
    first = threading.Event()

    async def main():
        with fastload.stream(source, config=config) as s:
            for _ in s:
                first.set()

    with Leaks({http_server.port}) as leaks:
        sent: list[float] = []
        killer = sigint_after(first, 0.2, sent)
        with Timer() as timer:
            try:
                asyncio.run(main())
                outcome: BaseException | str = "finished"
            except BaseException as exc:  # noqa: BLE001 - which exception is the point
                outcome = exc
        took = time.monotonic() - sent[0] if sent else None
        killer.join(5)
        assert hang.fired >= 1, "the load never reached the hanging shard"
        leaks.check(grace_s=1.0)
    assert isinstance(outcome, KeyboardInterrupt), f"Ctrl-C ended in {outcome!r} after {timer.s:.1f} s"
    assert took is not None and took < 1.5, f"Ctrl-C took {took} s to stop the stream"


# -- an error in the middle of a stream --------------------------------------------------------------------

def _consume_until_error(source: str, config, progress=None):
    """Iterate; returns (tensors got, the error, whether code after the loop ran, the stream)."""
    got: dict = {}
    box: dict = {"after_loop": False}

    def run():
        s = fastload.stream(source, config=config, progress=progress)
        box["stream"] = s
        with s:
            try:
                for name, tensor in s:
                    got[name] = tensor
                    del name, tensor  # the traceback keeps this frame: it must not keep the last tensor
            except fastload.FastloadError as exc:
                box["error"] = exc
                raise
            box["after_loop"] = True

    with pytest.raises(fastload.FastloadError) as info:
        bounded(run, 20)
    assert box.get("error") is info.value, "the error did not come out of the for statement"
    return got, info.value, box["after_loop"], box["stream"]


@pytest.mark.parametrize("status,error", [(404, fastload.SourceNotFoundError), (500, fastload.TransferError)])
def test_http_shard_failing_mid_stream(status, error, ckpt, http_server, request):
    """Shard 2's header is read, then every read of its tensors fails: the first shard's tensors come out
    exact, then the typed error naming shard 2's URL, from the ``for``; iterating the stream again (inside and
    after the ``with``) raises it again rather than ending as if complete; the tensors handed out are freed
    once the consumer drops them even while it keeps the error."""
    directory, ref = ckpt
    source, ports = source_for("http", directory, request)
    http_server.faults._add(FailAfter(pattern="*00002-of-00002*", after=2, status=status))
    with Leaks(ports) as leaks:
        got, err, after_loop, s = _consume_until_error(source, CONFIG)
        leaks.check(grace_s=1.0)
    assert isinstance(err, error), repr(err)
    assert "model-00002-of-00002.safetensors" in str(err) and source in str(err)
    assert not after_loop
    first = set(safetensors.torch.load_file(str(directory / "model-00001-of-00002.safetensors")))
    assert got and set(got) <= first
    assert all(same_bytes(got[name], ref[name]) for name in got)
    with pytest.raises(error):
        list(s)
    refs = [StorageWeakRef(t.untyped_storage()) for t in got.values()]
    got.clear()
    gc.collect()
    assert all(r.expired() for r in refs), "a failed stream's error keeps the tensors it handed out alive"
    del err


def test_s3_shard_replaced_mid_stream_is_a_source_changed_error_naming_it(ckpt, s3_server, request):
    """Shard 2 is overwritten with a corrupted copy once the first chunk has landed (from the progress callback,
    so deterministically before shard 2's reads): ``SourceChangedError`` naming ``s3://bucket/key`` comes out
    of the ``for``; the first shard's tensors are exact; no corrupted tensor is ever handed out."""
    directory, ref = ckpt
    source, ports = source_for("s3", directory, request)
    bucket = source.split("/")[2]
    shard2 = directory / "model-00002-of-00002.safetensors"
    raw = shard2.read_bytes()
    corrupt = raw[:-256] + bytes(256)
    replaced = []

    def progress(done, total):
        if done and not replaced:
            replaced.append(done)
            s3_server.put(bucket, "ck/model-00002-of-00002.safetensors", corrupt)

    config = CONFIG.replace(max_concurrency=1)
    with Leaks(ports) as leaks:
        got, err, after_loop, _ = _consume_until_error(source, config, progress)
        leaks.check(grace_s=1.0)
    assert replaced
    assert isinstance(err, fastload.SourceChangedError), repr(err)
    assert f"s3://{bucket}/ck/model-00002-of-00002.safetensors" in str(err)
    assert "X-Amz-" not in str(err)
    assert not after_loop
    first = set(safetensors.torch.load_file(str(directory / "model-00001-of-00002.safetensors")))
    assert got and set(got) <= first
    for name, tensor in got.items():
        assert same_bytes(tensor, ref[name]), name
