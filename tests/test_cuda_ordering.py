"""The CUDA sink's ordering logic (CPU only), beyond tests/test_cuda_sink.py.

* ``CudaOps`` against a mocked ``torch.cuda``: the copy streams must be ordered
  after the stream the destination memory was allocated on.
* The sink (through its ``ops`` seam, with ``LateDevice`` from fake_device):
  shard slices with dtype conversion, scalars and zero-size slices; a device
  error while polling; a cancellation while a conversion is in flight; and an
  explicit call-order check (copy -> done -> release; writes done -> convert;
  every writer waited before a tensor is handed out).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest
import torch

import fastload
from checkpoints import random_tensor, write_single
from fastload.errors import DeviceError
from fastload.sinks.cuda import CudaOps, CudaSink
from fake_device import LateDevice, drive, storage_of

# -- CudaOps with a mocked torch.cuda ------------------------------------------------------------------------


class MockStream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other: "MockStream") -> None:
        self.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event: "MockEvent") -> None:
        self.log.append(("wait_event", self.name, event.recorded_on))

    def synchronize(self) -> None:
        self.log.append(("stream_sync", self.name))

    def record_event(self, event=None):
        event = event or MockEvent(self.log)
        event.record(self)
        return event


class MockEvent:
    def __init__(self, log: list, *args, **kwargs):
        self.log = log
        self.recorded_on = None

    def record(self, stream=None):
        self.recorded_on = stream.name if stream is not None else mocked_current[-1].name
        self.log.append(("record", self.recorded_on))

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.log.append(("event_sync", self.recorded_on))


mocked_current: list[MockStream] = []


class LoggedDst:
    """A destination whose ``copy_`` logs the stream it was issued on."""

    def __init__(self, log: list):
        self.log = log

    def copy_(self, src, non_blocking=False):
        self.log.append(("copy", mocked_current[-1].name))


@pytest.fixture
def mocked_cuda(monkeypatch):
    log: list = []
    default = MockStream("default", log)
    mocked_current[:] = [default]
    lanes = iter(range(100))

    @contextlib.contextmanager
    def stream_ctx(s):
        mocked_current.append(s)
        try:
            yield
        finally:
            mocked_current.pop()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: MockStream(f"lane{next(lanes)}", log))
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: mocked_current[-1])
    monkeypatch.setattr(torch.cuda, "default_stream", lambda *a, **k: default)
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: MockEvent(log, *a, **k))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: log.append(("device_sync",)))
    return log


def test_copy_stream_is_ordered_after_the_allocating_stream(mocked_cuda):
    """``empty`` allocates on the caller's current stream; the caching allocator may hand out a block whose
    previous user's kernels are still queued on that stream (stream-ordered reuse). ``copy_async`` writes
    the block on a *different* stream, so that stream must first wait for the allocating one
    (``lane.wait_stream(current)`` / an event), as torch's CUDA-semantics notes require. Without it the
    host-to-device copy can land before a still-queued kernel of the block's previous owner writes it
    (corrupted weights) or while such a kernel still reads it (corrupted user data)."""
    log = mocked_cuda
    ops = CudaOps(torch.device("cuda"), lanes=2)
    for lane in (0, 1):
        log.clear()
        ops.copy_async([(LoggedDst(log), torch.zeros(4, dtype=torch.uint8))], lane)
        lane_name = f"lane{lane}"
        first_copy = log.index(("copy", lane_name))
        before = log[:first_copy]
        ordered = (("wait_stream", lane_name, "default") in before
                   or ("wait_event", lane_name, "default") in before
                   or ("stream_sync", "default") in before or ("device_sync",) in before)
        assert ordered, (f"copy on {lane_name} issued with no ordering after the allocating (default) stream: "
                         f"{log}")


def test_tensor_waits_on_the_callers_current_stream_not_the_device(mocked_cuda):
    """``wait`` must make the caller's current stream wait (no host block, no device-wide sync)."""
    log = mocked_cuda
    ops = CudaOps(torch.device("cuda"), lanes=1)
    event = ops.copy_async([(LoggedDst(log), torch.zeros(1, dtype=torch.uint8))], 0)
    log.clear()
    ops.wait(event)
    assert log == [("wait_event", "default", "lane0")]


# -- the sink through its ops seam -------------------------------------------------------------------------

CONFIG = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=128 * 1024, max_concurrency=6)


def sharded_mix(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.scalar": random_tensor((), torch.bfloat16, gen),
        "a.w": random_tensor((97, 530), torch.float32, gen),          # split on dim 1: strided, spans chunks
        "b.w": random_tensor((3, 5), torch.bfloat16, gen),           # split on dim 0 over 4 ranks: rank 3 gets 0 rows
        "b.scalar_i": random_tensor((), torch.int64, gen),
        "c.w": random_tensor((9, 7, 501), torch.float16, gen),          # split on the last dim
        "c.bias": random_tensor((11,), torch.float32, gen),
        "d.empty": random_tensor((0, 4), torch.float32, gen),
        "e.mask": random_tensor((6, 10), torch.bool, gen),            # not float: never converted
        "f.big": random_tensor((700, 65), torch.bfloat16, gen),       # split on dim 0: contiguous, several chunks
    }


RULES = {r"^a\.w$": 1, r"^b\.w$": 0, r"^c\.w$": -1, r"^e\.mask$": 1, r"^f\.big$": 0}


@pytest.mark.parametrize("rank", [0, 3])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_shard_slices_scalars_and_empties_with_conversion(tmp_path, rank, dtype):
    tensors = sharded_mix(seed=11 + rank)
    path = write_single(tmp_path / "m.safetensors", tensors)
    device = LateDevice(seed=rank, max_delay_s=0.003)
    shard = fastload.Shard(rank, 4, RULES)
    got, trace = asyncio.run(drive(str(path), device, config=CONFIG, buffers=2, shard=shard, dtype=dtype))
    assert device.violations == []
    assert all(e.completed and e.waited for e in device.events)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        want = t
        for pattern, dim in RULES.items():
            if pattern.strip("^$").replace("\\", "") == name:
                want = t.tensor_split(4, dim)[rank]
        if dtype is not None and want.is_floating_point():
            want = want.to(dtype)
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert torch.equal(got[name].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
    if rank == 3:
        assert got["b.w"].shape == (0, 5)
    assert trace.summary().counters["h2d_copies"] > 0


class RecordingDevice(LateDevice):
    """``LateDevice`` that also logs the order of copy / done / wait / release calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.log: list[tuple] = []

    def copy_async(self, copies, lane):
        event = super().copy_async(copies, lane)
        kind = "convert" if any(d.dtype != s.dtype for d, s in copies) else "copy"
        self.log.append((kind, event, [storage_of(s) for _, s in copies], [storage_of(d) for d, _ in copies]))
        return event

    def done(self, event):
        finished = super().done(event)
        if finished:
            self.log.append(("done", event))
        return finished


def test_call_order_release_after_done_convert_after_writes(tmp_path):
    tensors = sharded_mix(seed=5)
    path = write_single(tmp_path / "m.safetensors", tensors)
    device = RecordingDevice(seed=9, max_delay_s=0.004)
    released: list = []

    class Spy(CudaSink):
        async def consume(self, chunk, buf, release):
            def spy_release():
                device.log.append(("release", storage_of(buf)))
                release()
            return await super().consume(chunk, buf, spy_release)

    got, _ = asyncio.run(drive(str(path), device, config=CONFIG, buffers=2, dtype=torch.float16, sink_class=Spy,
                               shard=fastload.Shard(1, 4, RULES)))
    assert device.violations == []
    completed: set = set()
    reading: dict[int, list] = {}  # buffer storage -> events of copies reading it
    for entry in device.log:
        if entry[0] in ("copy", "convert"):
            event, srcs = entry[1], entry[2]
            for s in srcs:
                reading.setdefault(s, []).append(event)
            if entry[0] == "convert":  # every copy that wrote the source has completed
                for s in srcs:
                    for writer in device.writers.get(s, ()):
                        if writer is not event:
                            assert writer in completed, "convert read an unfinished write"
        elif entry[0] == "done":
            completed.add(entry[1])
        elif entry[0] == "release":
            assert all(e in completed for e in reading.get(entry[1], ())), "buffer released before its copy was done"
            released.append(entry[1])
    assert released


class PollFailure(LateDevice):
    """The device fails while the sink polls a copy (e.g. an async CUDA error surfacing in ``query``)."""

    def __init__(self, fail_at: int, **kwargs):
        super().__init__(**kwargs)
        self.polls = 0
        self.fail_at = fail_at

    def done(self, event):
        self.polls += 1
        if self.polls == self.fail_at:
            raise DeviceError("fake device failure while polling")
        return super().done(event)


@pytest.mark.parametrize("fail_at", [1, 7, 40])
def test_device_error_while_polling_syncs_every_copy_and_frees(tmp_path, fail_at):
    gen = torch.Generator().manual_seed(fail_at)
    tensors = {f"t{i}": random_tensor((70, 310 + i), torch.float32, gen) for i in range(40)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    device = PollFailure(fail_at, max_delay_s=0.01, seed=fail_at)
    with pytest.raises(DeviceError, match="while polling"):
        asyncio.run(drive(str(path), device, config=CONFIG, buffers=3, dtype=torch.float16))
    gc.collect()
    assert device.violations == []
    assert not device.pending(), "close() left copies un-synchronised"
    device.forget()
    assert all(ref() is None for ref in device.allocated)


class SlowConvert(LateDevice):
    """Conversions take long: a consumer error arrives while some are in flight."""

    def copy_async(self, copies, lane):
        event = super().copy_async(copies, lane)
        if any(d.dtype != s.dtype for d, s in copies):
            event.ready_at += 0.05
        return event


def test_cancel_during_conversion_waits_for_the_conversion(tmp_path):
    gen = torch.Generator().manual_seed(3)
    tensors = {f"t{i:03d}": random_tensor((50, 400), torch.bfloat16, gen) for i in range(60)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    device = SlowConvert(max_delay_s=0.002, seed=3)
    seen = []

    class Gone(Exception):
        pass

    def put(name, t):
        seen.append(name)
        if len(seen) == 2:
            raise Gone

    with pytest.raises(Gone):
        asyncio.run(drive(str(path), device, config=CONFIG, dtype=torch.float32, put=put))
    gc.collect()
    converts = [e for e in device.events if any(d.dtype != s.dtype for d, s in e.copies)]
    assert len(converts) > 2  # conversions were in flight when the consumer went away
    assert device.violations == []
    assert not device.pending()
    device.forget()
    assert all(ref() is None for ref in device.allocated)


def test_each_tensor_is_handed_out_exactly_once(tmp_path):
    """Zero-size and scalar tensors (initially complete) and tensors completed by a chunk are each
    handed out once, never as a fresh uninitialised allocation."""
    tensors = sharded_mix(seed=8)
    path = write_single(tmp_path / "m.safetensors", tensors)
    device = LateDevice(seed=8)
    names: list[str] = []
    got, _ = asyncio.run(drive(str(path), device, config=CONFIG, put=lambda n, t: names.append(n),
                               shard=fastload.Shard(3, 4, RULES), dtype=torch.bfloat16))
    assert sorted(names) == sorted(tensors)
    assert device.violations == []
