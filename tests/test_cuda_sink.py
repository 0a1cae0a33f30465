"""The CUDA sink's ordering logic, on the CPU, against a fake device whose copies land late.

``LateDevice`` implements the sink's device seam (``DeviceOps``) with CPU
tensors. A copy is not performed when it is issued but only when its event
completes, a random few milliseconds later, and it then reads the source *as
it is at that moment*. If the sink released a staging buffer before the copy
from it had completed, the fetcher would refill it and the late copy would
carry the wrong bytes: the tensors would differ from safetensors' and the
snapshot taken at issue time would not match. ``CheckedPool`` also refuses to
hand out a buffer that a pending copy still reads.
"""

from __future__ import annotations

import asyncio
import gc
import random
import time
import weakref
from collections import defaultdict

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import random_tensor, write_single
from fastload.buffers import BufferPool
from fastload.errors import DeviceError
from fastload.fetch import run_plan
from fastload.pipeline import make_plan, make_request
from fastload.sinks.cuda import CudaSink
from fastload.sources import Transports

SMALL = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=128 * 1024, max_concurrency=8)


def storage_of(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class FakeEvent:
    def __init__(self, copies, ready_at: float):
        self.copies = copies
        self.snapshots = [src.clone() for _, src in copies]
        self.ready_at = ready_at
        self.completed = False
        self.waited = False


class LateDevice:
    """``DeviceOps`` on the CPU: every copy completes late, in random order across lanes."""

    lanes = 3

    def __init__(self, *, max_delay_s: float = 0.004, seed: int = 0, fail_alloc_after: int | None = None):
        self.rng = random.Random(seed)
        self.max_delay_s = max_delay_s
        self.fail_alloc_after = fail_alloc_after
        self.events: list[FakeEvent] = []
        self.writers: dict[int, list[FakeEvent]] = defaultdict(list)  # storage -> events writing it
        self.allocated: list[weakref.ref] = []
        self.violations: list[str] = []
        self.max_pending = 0

    def pending(self) -> list[FakeEvent]:
        return [e for e in self.events if not e.completed]

    def empty(self, shape, dtype) -> torch.Tensor:
        if self.fail_alloc_after is not None and len(self.allocated) >= self.fail_alloc_after:
            raise DeviceError("fake device out of memory")
        t = torch.empty(tuple(shape), dtype=dtype)
        self.allocated.append(weakref.ref(t))
        return t

    def copy_async(self, copies, lane: int) -> FakeEvent:
        assert 0 <= lane < self.lanes
        for _, src in copies:  # device memory is read only once every copy writing it has completed
            if any(not e.completed for e in self.writers.get(storage_of(src), ())):
                self.violations.append("read of device memory with a write still pending")
        event = FakeEvent(copies, time.monotonic() + self.rng.uniform(0, self.max_delay_s))
        for dst, _ in copies:
            self.writers[storage_of(dst)].append(event)
        self.events.append(event)
        self.max_pending = max(self.max_pending, len(self.pending()))
        return event

    def _complete(self, event: FakeEvent) -> None:
        if event.completed:
            return
        for (dst, src), snapshot in zip(event.copies, event.snapshots):
            if not torch.equal(src, snapshot):
                self.violations.append("a copy's source changed before the copy completed")
            dst.copy_(src)
        event.completed = True

    def done(self, event: FakeEvent) -> bool:
        if time.monotonic() >= event.ready_at:
            self._complete(event)
        return event.completed

    def wait(self, event: FakeEvent) -> None:
        event.waited = True

    def sync(self, event: FakeEvent) -> None:
        self._complete(event)

    def check_handed_out(self, name: str, t: torch.Tensor) -> None:
        for event in self.writers.get(storage_of(t), ()):
            if not (event.completed and event.waited):
                self.violations.append(f"{name} handed out before a copy into it completed and was waited on")


class CheckedPool(BufferPool):
    """A real pool that refuses to hand out a buffer a pending copy still reads."""

    def __init__(self, device: LateDevice, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = device

    async def acquire(self) -> torch.Tensor:
        buf = await super().acquire()
        for event in self.device.pending():
            if any(storage_of(src) == storage_of(buf) for _, src in event.copies):
                self.device.violations.append("buffer reused while a copy from it was pending")
        return buf


async def drive(source, device: LateDevice, *, config=SMALL, buffers: int = 2, put=None, sink_class=CudaSink,
                **kwargs):
    """What ``pipeline.produce`` does, with the CUDA sink on a fake device and a pool of ``buffers``."""
    trace = fastload.Trace()
    request = make_request(source, config=config, trace=trace, **kwargs)
    transports = Transports(config, trace)
    got: dict[str, torch.Tensor] = {}
    sink = None
    trace.begin()
    try:
        plan = await make_plan(request, transports)
        sink = sink_class(plan, device=torch.device("cuda"), dtype=request.dtype, trace=trace, ops=device)
        pool = CheckedPool(device, config.chunk_bytes, buffers, pin=True)

        def emit(indices):
            for i in indices:
                name, t = plan.tensors[i].name, sink.tensor(i)
                device.check_handed_out(name, t)
                got[name] = t
                if put is not None:
                    put(name, t)

        emit(sink.initially_complete())
        await run_plan(plan, transports=transports, sink=sink, pool=pool, trace=trace, emit=emit,
                       workers=config.max_concurrency)
        assert pool.allocated <= buffers
    finally:
        if sink is not None:
            sink.close()
        await transports.aclose()
        trace.end()
    return got, trace


def many_tensors(count: int = 300, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool, torch.uint8]
    out = {}
    for i in range(count):
        shape = rng.choice([(), (0,), (rng.randint(1, 50),), (rng.randint(1, 40), rng.randint(1, 300))])
        out[f"t{i:04d}"] = random_tensor(shape, rng.choice(dtypes), gen)
    out["big"] = random_tensor((300, 257), torch.float32, gen)  # spans several chunks
    return out


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        out = got[name]
        assert out.dtype == t.dtype and out.shape == t.shape, name
        assert torch.equal(out.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_two_buffers_never_reused_while_a_copy_is_pending(tmp_path):
    tensors = many_tensors()
    path = write_single(tmp_path / "m.safetensors", tensors)
    device = LateDevice()
    got, trace = asyncio.run(drive(str(path), device, buffers=2))
    assert device.violations == []
    assert_bit_exact(got, safetensors.torch.load_file(path))
    assert len(device.events) > 20 and device.max_pending <= 2  # at most one pending copy per buffer
    assert all(e.completed and e.waited for e in device.events)
    stages = trace.summary().stages
    assert stages["wait"] > 0 and stages["copy"] > 0  # workers did wait for buffers held by late copies


def test_the_check_catches_a_sink_that_releases_early(tmp_path):
    class EagerSink(CudaSink):
        async def _until_done(self, event):  # wrong on purpose: does not wait for the copy
            return None

    path = write_single(tmp_path / "m.safetensors", many_tensors(count=120, seed=2))
    device = LateDevice(max_delay_s=0.02)
    asyncio.run(drive(str(path), device, buffers=2, sink_class=EagerSink))
    assert any("reused" in v or "changed" in v for v in device.violations)


def test_every_dtype_and_dtype_conversion_on_the_device(all_dtypes_checkpoint):
    want = safetensors.torch.load_file(all_dtypes_checkpoint)
    device = LateDevice(seed=3)
    got, _ = asyncio.run(drive(str(all_dtypes_checkpoint), device))
    assert device.violations == []
    assert_bit_exact(got, want)

    device = LateDevice(seed=4)
    got, trace = asyncio.run(drive(str(all_dtypes_checkpoint), device, dtype=torch.float16))
    assert device.violations == []  # includes: a conversion reads a tensor only after all its copies completed
    for name, t in want.items():
        expect = t.to(torch.float16) if t.dtype.is_floating_point else t
        assert got[name].dtype == expect.dtype and got[name].shape == expect.shape, name
        assert torch.equal(got[name].view(-1).view(torch.uint8), expect.reshape(-1).view(torch.uint8)), name
    assert trace.summary().stages["convert"] > 0


def test_strided_shard_pieces_become_one_copy_per_chunk(tmp_path):
    gen = torch.Generator().manual_seed(5)
    tensors = {"w": random_tensor((64, 48), torch.float32, gen), "v": random_tensor((10, 6, 4), torch.int16, gen)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    device = LateDevice(seed=5)
    shard = fastload.Shard(1, 4, {"w": 1, "v": -1})
    got, trace = asyncio.run(drive(str(path), device, shard=shard))
    assert device.violations == []
    assert torch.equal(got["w"], tensors["w"].tensor_split(4, 1)[1])
    assert torch.equal(got["v"], tensors["v"].tensor_split(4, -1)[1])
    # 64 + 60 strided pieces, but each tensor's pieces lie back to back in the buffer and in the output
    assert trace.summary().counters["h2d_copies"] == 2


def test_device_oom_raises_and_frees_everything(tmp_path):
    path = write_single(tmp_path / "m.safetensors", many_tensors(count=100, seed=6))
    device = LateDevice(fail_alloc_after=40)
    with pytest.raises(DeviceError, match="out of memory"):
        asyncio.run(drive(str(path), device))
    gc.collect()
    assert not device.pending()  # copies in flight at the failure were waited for before memory was dropped
    assert all(ref() is None for ref in device.allocated)


class ConsumerGone(Exception):
    pass


def test_consumer_error_cancels_and_waits_for_copies_in_flight(tmp_path):
    path = write_single(tmp_path / "m.safetensors", many_tensors(count=200, seed=7))
    device = LateDevice(max_delay_s=0.01)
    seen = []

    def put(name, t):
        seen.append(name)
        if len(seen) == 5:
            raise ConsumerGone  # the consumer goes away mid-load

    with pytest.raises(ConsumerGone):
        asyncio.run(drive(str(path), device, put=put))
    gc.collect()
    assert device.violations == []
    assert not device.pending()
    assert all(ref() is None for ref in device.allocated)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_cuda_device_without_cuda_is_a_device_error(all_dtypes_checkpoint):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        fastload.load(all_dtypes_checkpoint, device="cuda")
    pool = BufferPool(1024, 2, pin=True)  # falls back to ordinary memory
    buf = asyncio.run(pool.acquire())
    assert buf.numel() == 1024 and not pool.pin
