"""The CUDA path on a real device (skipped without CUDA): ``pytest -m gpu tests/test_gpu.py``."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import random_tensor, write_single
from fastload.buffers import BufferPool
from fastload.fetch import run_plan
from fastload.pipeline import make_plan, make_request
from fastload.sinks.cuda import CudaSink
from fastload.sources import Transports

pytestmark = pytest.mark.gpu

TINY = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=128 * 1024, max_concurrency=8)  # 2 buffers


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def on_gpu(path) -> dict[str, torch.Tensor]:
    """The reference: safetensors' CPU load, then moved to the GPU."""
    return {n: t.to("cuda") for n, t in safetensors.torch.load_file(path).items()}


def many_small(count: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.int8, torch.int64, torch.bool]
    return {f"t{i:05d}": random_tensor((1 + i % 37, 1 + i % 251), dtypes[i % len(dtypes)], gen)
            for i in range(count)}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    gen = torch.Generator().manual_seed(21)
    tensors = {f"w{i}": random_tensor((1024, 4096 + i), torch.bfloat16, gen) for i in range(24)}  # ~200 MB
    return write_single(tmp_path_factory.mktemp("gpu") / "big.safetensors", tensors)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 0)])
def test_every_dtype_bit_exact_vs_safetensors(all_dtypes_checkpoint, device):
    want = on_gpu(all_dtypes_checkpoint)
    got = fastload.load(all_dtypes_checkpoint, device=device)
    assert set(got) == set(want)
    for name, t in want.items():
        assert same_bytes(got[name], t), name


def test_indexed_checkpoint_and_shards_on_gpu(llama_sharded_checkpoint):
    full = {n: t.to("cuda") for n, t in fastload.load(llama_sharded_checkpoint).items()}
    got = fastload.load(llama_sharded_checkpoint, device="cuda")
    assert all(same_bytes(got[n], t) for n, t in full.items())
    rules = {r"(q|k|v|gate|up)_proj": 0, r"(o|down)_proj": 1, r"embed_tokens|lm_head": -1}
    for rank in range(3):
        shard = fastload.Shard(rank, 3, rules)
        got = fastload.load(llama_sharded_checkpoint, device="cuda", shard=shard)
        for name, t in full.items():
            dim = shard.dim_for(name)
            want = t if dim is None else t.tensor_split(3, dim)[rank].contiguous()
            assert same_bytes(got[name], want), (name, rank)


class ContendedLink:
    """Big host-to-device copies on a stream of their own, to slow fastload's copies down."""

    def __init__(self):
        self.stop = threading.Event()
        self.host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
        self.dev = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            while not self.stop.is_set():
                self.dev.copy_(self.host, non_blocking=True)
                stream.synchronize()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def test_two_buffers_many_tensors_on_a_real_device(tmp_path):
    tensors = many_small(3000, seed=22)
    path = write_single(tmp_path / "many.safetensors", tensors)
    want = on_gpu(path)
    with ContendedLink():
        got = fastload.load(path, device="cuda", config=TINY)
    for name, t in want.items():
        assert same_bytes(got[name], t), name


def test_no_buffer_is_refilled_while_its_copy_is_pending(tmp_path):
    """The same run as above, with a pool that checks every buffer it hands out against pending copies."""
    path = write_single(tmp_path / "many.safetensors", many_small(2000, seed=23))
    want = on_gpu(path)
    violations: list[str] = []

    class CheckedPool(BufferPool):
        sink: CudaSink

        async def acquire(self):
            buf = await super().acquire()
            for event, copies in list(self.sink._pending.items()):
                if not event.query() and any(src.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                                             for _, src in copies):
                    violations.append("buffer handed out while a copy from it was pending")
            return buf

    async def run():
        trace = fastload.Trace()
        request = make_request(str(path), device="cuda", config=TINY, trace=trace)
        transports = Transports(TINY, trace)
        got = {}
        try:
            plan = await make_plan(request, transports)
            sink = CudaSink(plan, device=request.device, dtype=None, trace=trace)
            pool = CheckedPool(TINY.chunk_bytes, 2, pin=True)
            pool.sink = sink

            def emit(indices):
                for i in indices:
                    got[plan.tensors[i].name] = sink.tensor(i)

            emit(sink.initially_complete())
            await run_plan(plan, transports=transports, sink=sink, pool=pool, trace=trace, emit=emit,
                           workers=TINY.max_concurrency)
            assert pool.pin and pool.allocated == 2
            sink.close()
        finally:
            await transports.aclose()
        return got

    with ContendedLink():
        got = asyncio.run(run())
    assert violations == []
    assert all(same_bytes(got[n], t) for n, t in want.items())


def test_read_on_another_stream_right_after_it_is_yielded(big):
    want = on_gpu(big)
    sums, keep = {}, []
    other = torch.cuda.Stream()
    with ContendedLink(), fastload.stream(big, device="cuda", config=TINY.replace(host_buffer_bytes=1 << 20)) as s:
        for name, t in s:
            with torch.cuda.stream(other):  # no wait on the current stream: the copy must be complete already
                sums[name] = t.view(torch.int16).to(torch.int64).sum()
            keep.append(t)  # not freed (and reused by the loader) while `other` may still read it
    other.synchronize()
    for name, t in want.items():
        assert sums[name].item() == t.view(torch.int16).to(torch.int64).sum().item(), name


def test_load_under_a_caller_stream(big):
    want = on_gpu(big)
    mine = torch.cuda.Stream()
    with torch.cuda.stream(mine):
        got = fastload.load(big, device="cuda")
        checks = {n: torch.equal(got[n], t) for n, t in want.items()}  # queued on `mine`, after the event waits
    assert all(checks.values())


def converts_on_gpu(src: torch.dtype, dst: torch.dtype) -> bool:
    try:
        torch.ones(2, device="cuda").to(src).to(dst)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_dtype_conversion_on_device(all_dtypes_checkpoint, dtype):
    want = on_gpu(all_dtypes_checkpoint)
    unsupported = {n for n, t in want.items() if t.dtype.is_floating_point and not converts_on_gpu(t.dtype, dtype)}
    names = [n for n in want if n not in unsupported]
    got = fastload.load(all_dtypes_checkpoint, device="cuda", dtype=dtype, names=names)
    for name, t in want.items():
        if name not in unsupported:
            expect = t.to(dtype) if t.dtype.is_floating_point else t  # the same conversion, on the same device
            assert same_bytes(got[name], expect), name
    for name in sorted(unsupported)[:1]:  # a conversion CUDA lacks is a DeviceError, not a crash
        vector = name.split(".")[0] + ".vector_1023"
        with pytest.raises(fastload.DeviceError):
            fastload.load(all_dtypes_checkpoint, device="cuda", dtype=dtype, names=[vector])


def test_trace_shows_fetch_and_copy_overlapping(big):
    trace = fastload.Trace()
    fastload.load(big, device="cuda", trace=trace, config=fastload.LoadConfig(chunk_bytes=4 << 20))
    chunks = [c for c in trace.chunks if c.get("filled") is not None and c.get("consumed") is not None]
    fetches = [(c["requested"], c["filled"]) for c in chunks]
    overlapped = sum(1 for c in chunks if any(s < c["consumed"] and c["filled"] < e for s, e in fetches))
    assert overlapped > len(chunks) // 4
    summary = trace.summary()
    assert summary.stages["copy"] > 0 and summary.counters["h2d_bytes"] == sum(
        t.numel() * t.element_size() for t in safetensors.torch.load_file(big).values())


def test_out_of_memory_is_a_device_error_and_frees_what_was_allocated(big):
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    fraction = (torch.cuda.memory_reserved() + (64 << 20)) / total  # room for ~64 MB of the ~200 MB
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        error = None
        try:
            fastload.load(big, device="cuda")
        except fastload.DeviceError as exc:
            error = exc
        assert error is not None and "out of memory" in str(error)
        assert isinstance(error.__cause__, torch.OutOfMemoryError)
        del error
        gc.collect()
        assert torch.cuda.memory_allocated() == before
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert len(fastload.load(big, device="cuda")) == 24  # and the device is still usable


def test_missing_device_index_is_a_device_error(all_dtypes_checkpoint):
    with pytest.raises(fastload.DeviceError, match="does not exist"):
        fastload.load(all_dtypes_checkpoint, device=f"cuda:{torch.cuda.device_count()}")
