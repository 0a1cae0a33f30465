"""The CUDA sink's ordering logic, on the CPU, against a fake device whose copies land late.

``LateDevice`` (tests/fake_device.py) performs a copy only when its event completes, a random few
milliseconds later, reading the source as it is then: a staging buffer released too early carries
wrong bytes, and ``CheckedPool`` records a buffer reused while a pending copy still reads it.
"""

from __future__ import annotations

import asyncio
import gc
import random

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import random_tensor, write_single
from fake_device import LateDevice, assert_bit_exact, drive
from fastload.buffers import BufferPool
from fastload.errors import DeviceError
from fastload.sinks.cuda import CudaSink


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


def test_two_buffers_never_reused_while_a_copy_is_pending(tmp_path):
    tensors = many_tensors()
    path = write_single(tmp_path / "m.safetensors", tensors)
    device = LateDevice()
    got, trace = asyncio.run(drive(str(path), device, buffers=2))
    assert device.violations == []
    assert_bit_exact(got, safetensors.torch.load_file(path))
    assert len(device.events) > 12 and device.max_pending <= 2  # at most one pending copy per buffer
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
    device = LateDevice(fail_alloc=lambda shape, dtype, allocated: allocated >= 40)
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
