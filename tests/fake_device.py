"""A fake CUDA device for the CUDA sink's logic on the CPU (tests/test_cuda_sink.py, test_cuda_ordering.py,
test_cuda_logic_audit.py).

``LateDevice`` implements the sink's device seam (``DeviceOps``) with CPU tensors. A copy is not performed when
it is issued but only when its event completes (a random few milliseconds later, or after a fixed delay per
lane, so that lanes complete out of issue order), and it then reads its source *as it is at that moment*. If
the sink released a staging buffer before the copy from it had completed, the fetcher would refill it and the
late copy would carry the wrong bytes: the tensors would differ from safetensors' and the snapshot taken at
issue time would not match. ``CheckedPool`` records a buffer handed out or released while a pending copy still
reads it. Everything wrong is appended to ``device.violations``; tests assert it stays empty.
"""

from __future__ import annotations

import gc
import random
import threading
import time
import weakref
from collections import defaultdict

import torch

import fastload
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
    def __init__(self, copies, ready_at: float, lane: int, seq: int):
        self.copies = copies
        self.snapshots = [src.clone() for _, src in copies]
        self.ready_at = ready_at
        self.lane = lane
        self.seq = seq
        self.completed = False
        self.waited = False


class LateDevice:
    """``DeviceOps`` on the CPU: every copy completes late, and reads its source only when it completes.

    ``lane_delays`` fixes each lane's latency (lane 0 slowest by default in the audit's ``FakeDevice``); without
    it every copy takes a random delay up to ``max_delay_s``. ``fail_alloc(shape, dtype, n_allocated)`` and
    ``fail_copy_at`` (the n-th ``copy_async`` call, 1-based) make the device fail as a real one can."""

    def __init__(self, *, lanes: int = 3, max_delay_s: float = 0.004, seed: int = 0, lane_delays=None,
                 fail_alloc=None, fail_copy_at: int | None = None):
        self.lanes = lanes
        self.rng = random.Random(seed)
        self.max_delay_s = max_delay_s
        self.lane_delays = lane_delays
        self.fail_alloc = fail_alloc
        self.fail_copy_at = fail_copy_at
        self.events: list[FakeEvent] = []
        self.completion_order: list[int] = []
        self.writers: dict[int, list[FakeEvent]] = defaultdict(list)  # storage -> events writing it
        self.allocated: list[weakref.ref] = []
        self.violations: list[str] = []
        self.copy_calls = 0
        self.synced_pending = 0  # copies still in flight that close() had to wait for
        self.max_pending = 0
        self.lock = threading.Lock()

    def pending(self) -> list[FakeEvent]:
        return [e for e in self.events if not e.completed]

    def empty(self, shape, dtype) -> torch.Tensor:
        if self.fail_alloc is not None and self.fail_alloc(tuple(shape), dtype, len(self.allocated)):
            raise DeviceError("fake device out of memory")
        t = torch.empty(tuple(shape), dtype=dtype)
        if t.numel():
            t.reshape(-1).view(torch.uint8).fill_(0xA5)  # garbage, as fresh device memory would hold
        self.allocated.append(weakref.ref(t))
        return t

    def delay(self, lane: int) -> float:
        if self.lane_delays is not None:
            return self.lane_delays[lane % len(self.lane_delays)]
        return self.rng.uniform(0, self.max_delay_s)

    def copy_async(self, copies, lane: int) -> FakeEvent:
        self.copy_calls += 1
        if not 0 <= lane < self.lanes:
            self.violations.append(f"lane {lane} out of range")
        if self.fail_copy_at is not None and self.copy_calls == self.fail_copy_at:
            raise DeviceError("fake device failure while copying")
        for dst, src in copies:
            if dst.numel() * dst.element_size() != src.numel() * src.element_size() and dst.dtype == src.dtype:
                self.violations.append("copy between regions of different sizes")
            if any(not e.completed for e in self.writers.get(storage_of(src), ())):
                self.violations.append("read of device memory with a write still pending")
        event = FakeEvent(copies, time.monotonic() + self.delay(lane), lane, len(self.events))
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
        self.completion_order.append(event.seq)

    def done(self, event: FakeEvent) -> bool:
        if time.monotonic() >= event.ready_at:
            self._complete(event)
        return event.completed

    def wait(self, event: FakeEvent) -> None:
        event.waited = True

    def sync(self, event: FakeEvent) -> None:
        self.synced_pending += not event.completed
        self._complete(event)

    def out_of_order(self) -> bool:
        return any(b < a for a, b in zip(self.completion_order, self.completion_order[1:]))

    def check_handed_out(self, name: str, t: torch.Tensor) -> None:
        """Every copy that wrote the tensor (or wrote what a conversion read into it) completed and was waited
        on; the tensor owns exactly its own memory."""
        todo, seen = [storage_of(t)], set()
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            for event in self.writers.get(s, ()):
                if not (event.completed and event.waited):
                    self.violations.append(f"{name} handed out before a copy into it completed and was waited on")
                todo += [storage_of(src) for dst, src in event.copies if src.dtype != torch.uint8
                         or dst.dtype != torch.uint8]
        if t.numel():
            if t.storage_offset() != 0 or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                self.violations.append(f"{name} does not own exactly its memory")

    def forget(self) -> None:
        """Drop the events' (dst, src) pairs, which keep allocations alive (a conversion's are the outputs)."""
        for event in self.events:
            event.copies = event.snapshots = ()
        gc.collect()

    def leaked(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.allocated)


class CheckedPool(BufferPool):
    """A real pool that records a buffer handed out again, or released, while a pending copy still reads it."""

    def __init__(self, device: LateDevice, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.device = device

    def _read_by_pending(self, buf: torch.Tensor) -> bool:
        return any(storage_of(src) == storage_of(buf) for event in self.device.pending() for _, src in event.copies)

    async def acquire(self) -> torch.Tensor:
        buf = await super().acquire()
        if self._read_by_pending(buf):
            self.device.violations.append("buffer reused while a copy from it was pending")
        return buf

    def release(self, buf: torch.Tensor) -> None:
        if self._read_by_pending(buf):
            self.device.violations.append("buffer released while a copy from it was pending")
        super().release(buf)


async def drive(source, device: LateDevice, *, config=SMALL, buffers: int = 2, put=None, sink_class=CudaSink,
                after_plan=None, **kwargs):
    """What ``pipeline.produce`` does with the CUDA sink, on the fake device, with a checked pool of ``buffers``."""
    trace = fastload.Trace()
    request = make_request(source, config=config, trace=trace, **kwargs)
    transports = Transports(config, trace)
    got: dict[str, torch.Tensor] = {}
    sink = None
    trace.begin()
    try:
        plan = await make_plan(request, transports)
        if after_plan is not None:
            after_plan(plan)
        sink = sink_class(plan, device=torch.device("cuda"), dtype=request.dtype, trace=trace, ops=device)
        pool = CheckedPool(device, plan.chunk_bytes, buffers, pin=True)

        def emit(indices):
            for i in indices:
                name, t = plan.tensors[i].name, sink.tensor(i)
                if name in got:
                    device.violations.append(f"{name} handed out twice")
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


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        out = got[name]
        assert out.dtype == t.dtype and out.shape == t.shape, (name, out.dtype, t.dtype, out.shape, t.shape)
        assert torch.equal(out.contiguous().reshape(-1).view(torch.uint8),
                           t.contiguous().reshape(-1).view(torch.uint8)), name
