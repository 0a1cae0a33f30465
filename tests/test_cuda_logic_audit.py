"""Audit of the CUDA sink's logic (fastload/sinks/cuda.py) on the CPU, against a fake device.

Beyond tests/test_cuda_sink.py and tests/test_cuda_ordering.py: unaligned tensor offsets (safetensors
allows any), big tensors over many chunks with conversion, many tiny tensors coalesced into one chunk,
``names=`` subsets, shards of unaligned tensors, copies completing out of order across lanes with two
staging buffers, failures in the middle (source error, a copy or an allocation that fails), ``stream()``
left early with copies pending through the public API, and the trace counters.

``FakeDevice`` (``LateDevice`` of tests/fake_device.py with a fixed latency per lane) performs a copy only
when its event completes (late, lane by lane, out of issue order) and reads its source as it is at that
moment, so a staging buffer released too early carries wrong bytes. The public API is pointed at it
by replacing ``fastload.sinks.cuda.CudaOps`` (the seam ``make_sink`` constructs) with a factory.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastload
import fastload.sinks.cuda as cuda_mod
from checkpoints import random_tensor, write_sharded, write_single
from fake_device import LateDevice, assert_bit_exact, drive
from fastload.errors import DeviceError, FastloadError

KiB = 1024
SMALL = fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=128 * KiB, max_concurrency=8)


# -- the fake device -----------------------------------------------------------------------------------------


class FakeDevice(LateDevice):
    """``LateDevice`` whose lanes each have their own latency (lane 0 slowest), so copies complete out of the
    order they were issued in."""

    def __init__(self, *, lanes: int = 4, lane_delays=(0.008, 0.0005, 0.004, 0.001), **kwargs):
        super().__init__(lanes=lanes, lane_delays=lane_delays, **kwargs)


def run(coro, bound_s: float = 8.0):
    return asyncio.run(asyncio.wait_for(coro, bound_s))


# -- checkpoints ----------------------------------------------------------------------------------------------

ST_NAME = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
for _attr, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                   ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _attr):
        ST_NAME[getattr(torch, _attr)] = _st


def write_raw(path: Path, tensors: dict[str, torch.Tensor], header_pad: int = 3) -> Path:
    """A safetensors file written by hand, tensors back to back in the given order (no alignment at all), the
    JSON header padded so that the data section starts at an odd offset."""
    entries, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        entries[name] = {"dtype": ST_NAME[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * header_pad
    if (8 + len(header)) % 2 == 0:
        header += b" "
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"".join(blobs))
    return path


def unaligned_mix(seed: int) -> dict[str, torch.Tensor]:
    """Odd-sized tensors first so every later offset is misaligned for its dtype."""
    g = torch.Generator().manual_seed(seed)
    out = {
        "pad.u8": random_tensor((3,), torch.uint8, g),
        "a.f32": random_tensor((123, 211), torch.float32, g),      # ~104 KB: spans two 64 KiB chunks
        "b.i8": random_tensor((5,), torch.int8, g),
        "c.f16": random_tensor((7, 13), torch.float16, g),
        "d.bool": random_tensor((9,), torch.bool, g),
        "e.bf16": random_tensor((401, 97), torch.bfloat16, g),     # ~78 KB
        "f.scalar64": random_tensor((), torch.float64, g),
        "g.empty": random_tensor((0, 5), torch.float32, g),
        "h.i64": random_tensor((33,), torch.int64, g),
        "i.f64": random_tensor((17, 3), torch.float64, g),
        "j.scalar16": random_tensor((), torch.float16, g),
        "k.i32": random_tensor((3, 7), torch.int32, g),
        "l.f32": random_tensor((1,), torch.float32, g),
        "m.empty_bf16": random_tensor((4, 0), torch.bfloat16, g),
    }
    if hasattr(torch, "float8_e4m3fn"):
        out["n.f8"] = random_tensor((37, 11), torch.float8_e4m3fn, g)
    out["z.f32"] = random_tensor((300, 257), torch.float32, g)  # ~308 KB: five chunks
    return out


def expected(path, dtype=None, names=None) -> dict[str, torch.Tensor]:
    ref = safetensors.torch.load_file(str(path))
    if names is not None:
        ref = {n: ref[n] for n in names}
    if dtype is not None:
        ref = {n: (t.to(dtype) if t.is_floating_point() else t) for n, t in ref.items()}
    return ref


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# -- results ---------------------------------------------------------------------------------------------------


def test_reference_file_really_is_unaligned(tmp_path):
    path = write_raw(tmp_path / "u.safetensors", unaligned_mix(0))
    plan = fastload.plan(str(path))
    size = {t.name: t.spec.dtype.itemsize for t in plan.tensors}
    misaligned = [t.name for t in plan.tensors if t.nbytes and t.spec.start % size[t.name]]
    assert {"a.f32", "z.f32", "h.i64", "i.f64"} <= set(misaligned)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_unaligned_offsets_every_dtype_bit_exact(tmp_path, dtype):
    path = write_raw(tmp_path / "u.safetensors", unaligned_mix(1))
    for _ in range(5):  # (on a loaded machine the fake's lanes can happen to finish in order: run it again)
        device = FakeDevice()
        got, trace = run(drive(str(path), device, dtype=dtype))
        assert device.violations == []
        assert_bit_exact(got, expected(path, dtype))
        assert all(e.completed and e.waited for e in device.events)
        if device.out_of_order():
            break
    assert device.out_of_order()  # the fake really did complete copies out of issue order
    counters = trace.summary().counters
    want_bytes = sum(nbytes(t) for t in safetensors.torch.load_file(str(path)).values())
    assert counters["h2d_bytes"] == want_bytes  # stored bytes cross once, whatever the output dtype


def test_big_tensor_over_many_chunks_with_conversion(tmp_path):
    g = torch.Generator().manual_seed(2)
    tensors = {"lead": random_tensor((5,), torch.uint8, g),  # the big one starts at an odd offset
               "big": random_tensor((1000, 333), torch.float32, g),   # 1.33 MB: 21 chunks of 64 KiB
               "tail": random_tensor((77,), torch.bfloat16, g)}
    path = write_raw(tmp_path / "big.safetensors", tensors)
    device = FakeDevice()
    got, trace = run(drive(str(path), device, dtype=torch.bfloat16, buffers=2))
    assert device.violations == []
    assert_bit_exact(got, expected(path, torch.bfloat16))
    plan = fastload.plan(str(path), config=SMALL)
    big_chunks = [c for c in plan.chunks if any(plan.tensors[p.tensor].name == "big" for p in c.pieces)]
    assert len(big_chunks) > 15
    counters = trace.summary().counters
    assert counters["h2d_bytes"] == sum(nbytes(t) for t in tensors.values())
    # one copy per chunk run of one tensor (the conversion is device-side, not a host-to-device copy)
    assert counters["h2d_copies"] == sum(len({p.tensor for p in c.pieces}) for c in plan.chunks)


def test_many_tiny_tensors_coalesced_into_one_chunk(tmp_path):
    g = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.bool, torch.float16, torch.int16]
    tensors = {}
    for i in range(150):
        shape = [(), (1,), (3,), (0,), (2, 3)][i % 5]
        tensors[f"t{i:03d}"] = random_tensor(shape, dtypes[i % len(dtypes)], g)
    path = write_raw(tmp_path / "tiny.safetensors", tensors)
    plan = fastload.plan(str(path), config=SMALL)
    assert len(plan.chunks) == 1
    for dtype in (None, torch.float16):
        device = FakeDevice()
        got, trace = run(drive(str(path), device, dtype=dtype))
        assert device.violations == []
        assert_bit_exact(got, expected(path, dtype))
        counters = trace.summary().counters
        nonempty = [t for t in tensors.values() if t.numel()]
        assert counters["h2d_copies"] == len(nonempty)
        assert counters["h2d_bytes"] == sum(nbytes(t) for t in nonempty)
        chunk_events = [e for e in device.events if all(d.dtype == s.dtype for d, s in e.copies)]
        assert len(chunk_events) == 1


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_names_subset_with_gaps(tmp_path, dtype):
    path = write_raw(tmp_path / "u.safetensors", unaligned_mix(4))
    all_names = list(unaligned_mix(4))
    names = all_names[1::3] + ["z.f32"]
    device = FakeDevice()
    got, trace = run(drive(str(path), device, dtype=dtype, names=names))
    assert device.violations == []
    assert_bit_exact(got, expected(path, dtype, names))
    ref = safetensors.torch.load_file(str(path))
    assert trace.summary().counters["h2d_bytes"] == sum(nbytes(ref[n]) for n in names)
    # nothing outside the chosen tensors was copied to the device
    assert sum(nbytes(s) for e in device.events for d, s in e.copies if d.dtype == s.dtype == torch.uint8) \
        == sum(nbytes(ref[n]) for n in names)


SHARD_RULES = {r"^a\.f32$": 1, r"^e\.bf16$": 0, r"^z\.f32$": 1, r"^c\.f16$": 1, r"^k\.i32$": 0, r"^i\.f64$": -1}


@pytest.mark.parametrize("world,rank", [(4, 1), (3, 2), (8, 7)])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_shard_unaligned_strided_pieces(tmp_path, world, rank, dtype):
    tensors = unaligned_mix(5)
    path = write_raw(tmp_path / "u.safetensors", tensors)
    device = FakeDevice()
    shard = fastload.Shard(rank, world, SHARD_RULES)
    got, trace = run(drive(str(path), device, dtype=dtype, shard=shard))
    assert device.violations == []
    ref = safetensors.torch.load_file(str(path))
    want = {}
    for name, t in ref.items():
        dim = shard.dim_for(name)
        if dim is not None:
            t = t.tensor_split(world, dim)[rank]
        want[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    assert_bit_exact(got, want)
    assert trace.summary().counters["h2d_bytes"] == sum(
        nbytes(t) for t in (ref[n].tensor_split(world, shard.dim_for(n))[rank] if shard.dim_for(n) is not None
                            else ref[n] for n in ref))


def test_two_buffers_heavily_reused_with_out_of_order_completion(tmp_path):
    g = torch.Generator().manual_seed(6)
    tensors = {f"w{i:02d}": random_tensor((60, 300 + i), torch.float32, g) for i in range(40)}
    path = write_raw(tmp_path / "w.safetensors", tensors)
    device = FakeDevice(lane_delays=(0.006, 0.0, 0.003, 0.0005))
    config = fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=128 * KiB, max_concurrency=16)
    got, trace = run(drive(str(path), device, config=config, buffers=2, dtype=torch.float16))
    assert device.violations == []
    assert_bit_exact(got, expected(path, torch.float16))
    chunk_events = [e for e in device.events if all(d.dtype == s.dtype for d, s in e.copies)]
    assert len(chunk_events) > 40  # each buffer reused many times
    assert device.out_of_order()
    assert {e.lane for e in chunk_events} == set(range(device.lanes))


# -- failures -----------------------------------------------------------------------------------------------


def test_source_error_midway_leaves_nothing_pending(tmp_path):
    g = torch.Generator().manual_seed(7)
    tensors = {f"w{i:02d}": random_tensor((64, 256), torch.float32, g) for i in range(30)}
    path = write_raw(tmp_path / "w.safetensors", tensors)
    size = path.stat().st_size
    device = FakeDevice(lane_delays=(0.02, 0.02, 0.02, 0.02))

    def truncate(plan):  # the file shrinks after its header was read: later reads come up short
        with open(path, "r+b") as f:
            f.truncate(size // 2)

    with pytest.raises(FastloadError) as info:
        run(drive(str(path), device, after_plan=truncate, dtype=torch.float16, buffers=3))
    assert str(path) in str(info.value)
    assert device.violations == []
    assert not device.pending(), "close() left copies unsynchronised"
    device.forget()
    assert device.leaked() == 0


@pytest.mark.parametrize("fail_at", [1, 3, 9])
def test_copy_that_raises_midway(tmp_path, fail_at):
    g = torch.Generator().manual_seed(8)
    tensors = {f"w{i:02d}": random_tensor((64, 256), torch.float32, g) for i in range(20)}
    path = write_raw(tmp_path / "w.safetensors", tensors)
    device = FakeDevice(fail_copy_at=fail_at)
    with pytest.raises(DeviceError, match="while copying"):
        run(drive(str(path), device, buffers=3))
    assert device.violations == []
    assert not device.pending()
    device.forget()
    assert device.leaked() == 0


def test_conversion_allocation_fails(tmp_path):
    """Out of device memory while allocating a converted output: a DeviceError, nothing pending, all freed."""
    g = torch.Generator().manual_seed(9)
    tensors = {f"w{i:02d}": random_tensor((64, 256), torch.float32, g) for i in range(20)}
    path = write_raw(tmp_path / "w.safetensors", tensors)
    seen = {"n": 0}

    def fail(shape, dtype, count):
        if dtype == torch.float16:
            seen["n"] += 1
            return seen["n"] == 4
        return False

    device = FakeDevice(fail_alloc=fail)
    with pytest.raises(DeviceError, match="out of memory"):
        run(drive(str(path), device, dtype=torch.float16))
    assert device.violations == []
    assert not device.pending()
    device.forget()
    assert device.leaked() == 0


# -- through the public API ----------------------------------------------------------------------------------


@pytest.fixture
def fake_cuda(monkeypatch):
    """``fastload.load(..., device="cuda")`` builds its sink's ops through ``CudaOps``: hand it a fake."""
    devices: list[FakeDevice] = []

    def factory(device, lanes=cuda_mod.COPY_STREAMS, **kwargs):
        fake = FakeDevice(**kwargs)
        devices.append(fake)
        return fake

    monkeypatch.setattr(cuda_mod, "CudaOps", factory)
    return devices


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_public_load_on_fake_cuda_bit_exact_and_counters(tmp_path, fake_cuda, dtype):
    path = write_raw(tmp_path / "u.safetensors", unaligned_mix(10))
    trace = fastload.Trace()
    seen = []
    got = fastload.load(str(path), device="cuda", dtype=dtype, config=SMALL, trace=trace,
                        progress=lambda done, total: seen.append((done, total)))
    (device,) = fake_cuda
    assert device.violations == []
    assert_bit_exact(got, expected(path, getattr(torch, dtype) if dtype else None))
    ref = safetensors.torch.load_file(str(path))
    total = sum(nbytes(t) for t in ref.values())
    assert seen and seen[-1] == (total, total)
    assert trace.summary().counters["h2d_bytes"] == total
    assert list(got) == list(ref)  # checkpoint order
    assert not device.pending()


def test_cuda_conversion_counts_converted_bytes_like_the_host_sink(tmp_path, fake_cuda):
    """``Trace`` gives the ``convert`` stage its throughput from ``bytes_converted`` (trace.STAGE_BYTES); the
    host sink counts it. A device-side conversion is the same stage and must count its bytes too, or the
    summary shows a busy convert stage with no throughput."""
    g = torch.Generator().manual_seed(11)
    tensors = {f"w{i}": random_tensor((100, 200), torch.float32, g) for i in range(4)}
    tensors["ids"] = random_tensor((100,), torch.int64, g)
    path = write_single(tmp_path / "m.safetensors", tensors)
    host, dev = fastload.Trace(), fastload.Trace()
    fastload.load(str(path), dtype="bfloat16", config=SMALL, trace=host)
    fastload.load(str(path), device="cuda", dtype="bfloat16", config=SMALL, trace=dev)
    host_sum, dev_sum = host.summary(), dev.summary()
    float_bytes = sum(nbytes(t) for t in tensors.values() if t.is_floating_point())
    assert host_sum.counters.get("bytes_converted") == float_bytes
    assert dev_sum.stages.get("convert", 0) > 0
    assert dev_sum.counters.get("bytes_converted") == float_bytes
    assert dev_sum.throughput.get("convert")


def test_stream_left_early_with_copies_pending(tmp_path, fake_cuda):
    g = torch.Generator().manual_seed(12)
    tensors = {f"w{i:03d}": random_tensor((64, 256), torch.float32, g) for i in range(60)}
    path = write_raw(tmp_path / "w.safetensors", tensors)
    before = set(threading.enumerate())
    config = fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=256 * KiB, max_concurrency=4)
    ref = safetensors.torch.load_file(str(path))
    kept = []
    with fastload.stream(str(path), device="cuda", dtype="float16", config=config) as s:
        for name, t in s:
            kept.append((name, t))
            if len(kept) == 3:
                break
    del s, t  # the stream object itself is checked in the next test
    (device,) = fake_cuda
    assert device.violations == []
    assert not device.pending(), "leaving the stream early left copies in flight"
    for name, t in kept:  # what was handed out is complete and correct
        assert torch.equal(t, ref[name].to(torch.float16)), name
    del t
    kept.clear()
    device.forget()
    assert device.leaked() == 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and [t for t in set(threading.enumerate()) - before if t.is_alive()]:
        time.sleep(0.05)
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]


def test_closed_stream_does_not_hold_device_tensors_it_never_handed_out(tmp_path, fake_cuda):
    """Tensors the loader completed but the consumer never took (it left the loop early) cannot be
    reached any more: iterating a closed stream raises. Yet the closed ``LoadStream`` keeps them in its
    hand-over queue for as long as the object lives (``with ... as s`` keeps ``s`` bound after the block):
    on a GPU that is device memory held by a load that is over. Closing should drop them."""
    g = torch.Generator().manual_seed(16)
    tensors = {f"w{i:03d}": random_tensor((64, 256), torch.float32, g) for i in range(12)}
    path = write_raw(tmp_path / "w.safetensors", tensors)
    config = fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=256 * KiB, max_concurrency=4)
    with fastload.stream(str(path), device="cuda", config=config) as s:
        for name, t in s:
            del t
            time.sleep(0.5)  # the loader finishes the other tensors meanwhile
            break
    with pytest.raises(RuntimeError):
        list(s)  # a closed stream hands out nothing more
    (device,) = fake_cuda
    assert not device.pending()
    device.forget()
    alive = device.leaked()
    assert alive == 0, f"{alive} device tensor(s) still held by the closed stream {s!r}"


def test_stream_consumer_gets_each_tensor_once_after_its_events(tmp_path, fake_cuda):
    path = write_raw(tmp_path / "u.safetensors", unaligned_mix(13))
    names = []
    with fastload.stream(str(path), device="cuda", dtype="bfloat16", config=SMALL,
                         shard=fastload.Shard(1, 3, SHARD_RULES)) as s:
        for name, t in s:
            names.append(name)
            (device,) = fake_cuda
            device.check_handed_out(name, t)
    assert sorted(names) == sorted(unaligned_mix(13))
    assert fake_cuda[0].violations == []


def test_only_empty_tensors_with_conversion(tmp_path, fake_cuda):
    g = torch.Generator().manual_seed(14)
    tensors = {"a": random_tensor((0,), torch.float32, g), "b": random_tensor((3, 0), torch.bfloat16, g),
               "c": random_tensor((0, 2, 2), torch.int64, g), "d": random_tensor((0,), torch.bool, g)}
    path = write_single(tmp_path / "e.safetensors", tensors)
    got = fastload.load(str(path), device="cuda", dtype=torch.float16, config=SMALL)
    assert_bit_exact(got, expected(path, torch.float16))


def test_index_shards_names_across_files_with_conversion(tmp_path):
    g = torch.Generator().manual_seed(15)
    tensors = {f"layer{i}.w": random_tensor((50, 129 + i), [torch.float32, torch.bfloat16, torch.int32][i % 3], g)
               for i in range(12)}
    directory = write_sharded(tmp_path / "ckpt", tensors, 4)
    names = ["layer11.w", "layer0.w", "layer5.w", "layer7.w", "layer2.w"]
    device = FakeDevice()
    got, trace = run(drive(str(directory), device, dtype=torch.float16, names=names,
                           shard=fastload.Shard(1, 2, {r"layer[05]": 1, r"layer7": 0})))
    assert device.violations == []
    want = {}
    for n in names:
        t = tensors[n]
        dim = {"layer0.w": 1, "layer5.w": 1, "layer7.w": 0}.get(n)
        if dim is not None:
            t = t.tensor_split(2, dim)[1]
        want[n] = t.to(torch.float16) if t.is_floating_point() else t
    assert_bit_exact(got, want)


def test_cudaops_wait_failure_is_a_device_error(monkeypatch):
    """Every other ``CudaOps`` call turns a CUDA ``RuntimeError`` into ``DeviceError`` (README: third-party
    exceptions are chained, never leaked; ``DeviceError`` is the CUDA failure). ``wait`` runs when a tensor
    is handed out, and ``cudaStreamWaitEvent`` reports an earlier asynchronous error like any other call."""

    class BrokenStream:
        def wait_event(self, event):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: BrokenStream())
    ops = cuda_mod.CudaOps.__new__(cuda_mod.CudaOps)  # its __init__ needs a real device
    ops.device, ops.lanes, ops.streams = torch.device("cuda", 0), 1, []
    with pytest.raises(DeviceError) as info:
        ops.wait(object())
    assert isinstance(info.value.__cause__, RuntimeError)
