"""LoadConfig(direct_io=True): cold local ranges through O_DIRECT, cached ones through the page cache."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import evict, write_single

MiB = 1 << 20


def direct_supported(path) -> bool:
    """O_DIRECT on this filesystem and cachestat(2) in this kernel: what the direct path needs."""
    import ctypes

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    try:
        rng, stat = (ctypes.c_uint64 * 2)(0, 4096), (ctypes.c_uint64 * 5)()
        return ctypes.CDLL(None).syscall(451, fd, ctypes.byref(rng), ctypes.byref(stat), 0) == 0
    finally:
        os.close(fd)


@pytest.fixture
def odd_checkpoint(tmp_path):
    """Tensors at unaligned offsets, some spanning several chunks, some coalesced, odd sizes."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(3, generator=g),  # 12 bytes: everything after it is unaligned
        "big": torch.randn(1_300_001, generator=g),  # ~5 MiB, split over 1 MiB chunks
        "mid": torch.randint(0, 255, (1_500_007,), generator=g, dtype=torch.uint8),
        "half": torch.randn(700_003, generator=g).to(torch.float16),
        "tail": torch.arange(17, dtype=torch.int64),
        # many small neighbours: coalesced into one multi-buffer read of more than 1 MiB
        **{f"small{i}": torch.randint(0, 255, (250_001 + i,), generator=g, dtype=torch.uint8) for i in range(8)},
    }
    return write_single(tmp_path / "odd.safetensors", tensors)


def load_and_check(path, want, counter="bytes_direct", **config) -> int:
    """Load bit-exact in 2 MiB chunks; return the trace counter (bytes read direct, by default)."""
    trace = fastload.Trace()
    got = fastload.load(path, trace=trace, config=fastload.LoadConfig(chunk_bytes=2 * MiB, **config))
    for name, tensor in want.items():
        assert torch.equal(got[name].view(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    return trace.summary().counters.get(counter, 0)


def test_cold_file_is_read_direct_and_bit_exact(odd_checkpoint):
    want = {k: v.clone() for k, v in safetensors.torch.load_file(odd_checkpoint).items()}
    evict(odd_checkpoint)
    direct = load_and_check(odd_checkpoint, want, direct_io=True)
    if direct_supported(odd_checkpoint):
        assert direct >= 3 * MiB  # the large ranges went through O_DIRECT
    else:  # tmpfs and friends: the page cache serves everything, still bit-exact
        assert direct == 0


def test_cached_file_keeps_the_page_cache(odd_checkpoint):
    want = safetensors.torch.load_file(odd_checkpoint)  # reads it: now it is in the page cache
    assert load_and_check(odd_checkpoint, want, direct_io=True) == 0


def test_direct_io_is_off_by_default(odd_checkpoint):
    want = {k: v.clone() for k, v in safetensors.torch.load_file(odd_checkpoint).items()}
    evict(odd_checkpoint)
    assert load_and_check(odd_checkpoint, want) == 0


# -- cold reads in one ordered stream, when asked (LoadConfig.local_cold_readers) -------------------------


def gated_bytes(path, want, **config) -> int:
    return load_and_check(path, want, counter="bytes_cold_gated", **config)


def test_cold_ranges_pass_the_gate_and_cached_ones_do_not(odd_checkpoint):
    want = {k: v.clone() for k, v in safetensors.torch.load_file(odd_checkpoint).items()}
    evict(odd_checkpoint)
    cold = gated_bytes(odd_checkpoint, want, local_cold_readers=1)
    if direct_supported(odd_checkpoint):  # cachestat: cold ranges are recognised
        # At least the first range; later ones may already be in the page cache by the time they are
        # asked about (the kernel's readahead of the first read runs ahead of the other threads). A range may
        # end up to 7 bytes short of the chunk size (chunks are filled across tensors, cut at whole elements).
        assert cold >= MiB - 7
    else:
        assert cold == 0
    assert gated_bytes(odd_checkpoint, want, local_cold_readers=1) == 0  # the first load left it cached


def test_ordered_gate_admits_the_smallest_waiting_key_first():
    import threading
    import time

    from fastload.sources.local import OrderedGate

    gate = OrderedGate(1)
    order, inside, most = [], [0], [0]
    lock = threading.Lock()

    def enter(key):
        with gate.hold((key,)):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                order.append(key)
            time.sleep(0.002)
            with lock:
                inside[0] -= 1

    with gate.hold((-1,)):  # hold it while the others queue up in scrambled order
        threads = [threading.Thread(target=enter, args=(k,)) for k in (5, 3, 9, 1, 7, 2)]
        for t in threads:
            t.start()
            time.sleep(0.005)
        deadline = time.monotonic() + 5
        while len(gate._waiting) < len(threads) and time.monotonic() < deadline:
            time.sleep(0.001)
    for t in threads:
        t.join(5)
    assert order == [1, 2, 3, 5, 7, 9] and most[0] == 1


def test_stat_opens_the_file_and_brings_the_length_prefix(tmp_path):
    """One trip to the pool gives size, etag and the header length; reads then use that same open file,
    so a file renamed over the path after the header was read cannot mix versions into the load."""
    import asyncio

    from fastload.sources import Segment
    from fastload.sources.local import LocalTransport

    path = write_single(tmp_path / "m.safetensors", {"w": torch.arange(64, dtype=torch.float32)})
    original = path.read_bytes()
    newer = write_single(tmp_path / "newer.safetensors", {"w": torch.zeros(80, dtype=torch.float32)})

    async def go():
        transport = LocalTransport(2, fastload.Trace())
        try:
            info = await transport.stat(str(path))
            assert (info.size, info.prefix) == (len(original), original[:8])
            os.replace(newer, path)
            tail = bytearray(256)
            await transport.read(info, [Segment(len(original) - 256, memoryview(tail))])
            return bytes(tail)
        finally:
            await transport.aclose()

    assert asyncio.run(go()) == original[-256:]
    with pytest.raises(fastload.SourceNotFoundError, match="not a regular file.*/dev/null"):
        fastload.load("/dev/null")


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_direct_scratch_fills_the_buffer_budget_in_huge_page_advised_buffers():
    """The O_DIRECT scratch is the load's memory in flight: at most one buffer per thread, all within
    host_buffer_bytes (or the share a staging pool leaves it), 2 MiB-aligned and advised MADV_HUGEPAGE
    (4 KiB pages cut a virtio request to ~1 MiB, which halved the disk's speed on our VM)."""
    from pathlib import Path

    from fastload.sources.local import LocalTransport

    sizes = {}
    for budget in (128 * MiB, 256 * MiB, 512 * MiB):
        transport = LocalTransport(4, fastload.Trace(), direct_io=True, direct_budget=budget)
        sizes[budget] = transport.threads, transport._scratch_count, transport._scratch_bytes
        transport._pool.shutdown()
    assert {b: t for b, (t, _, _) in sizes.items()} == {128 * MiB: 4, 256 * MiB: 8, 512 * MiB: 16}
    assert all(n == t and n * s <= b for b, (t, n, s) in sizes.items())
    small = LocalTransport(4, fastload.Trace(), direct_io=True, direct_budget=2 * MiB)  # two buffers, not four
    assert (small._scratch_count, small._scratch_count * small._scratch_bytes <= 2 * MiB) == (2, True)
    small.set_direct_budget(MiB - 1)  # no room left by a staging pool: the page cache reads everything
    assert not small._direct
    small._pool.shutdown()
    assert LocalTransport(4, fastload.Trace()).threads == 4  # the page cache's reads keep local_threads

    if not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        return  # no THP in this kernel: the advice is ignored, reads still work
    # numpy advises huge pages for large arrays itself, unless told not to: the child tells it not to,
    # so what it sees is fastload's own advice.
    code = """
import os, re, sys
from pathlib import Path
import fastload
from fastload.sources.local import LocalTransport
transport = LocalTransport(4, fastload.Trace(), direct_io=True)
scratch = transport._new_scratch()
address = scratch.ctypes.data
assert address % (2 << 20) == 0 and len(scratch) >= 32 << 20, (address, len(scratch))
flags = None
for line in Path("/proc/self/smaps").read_text().splitlines():
    if m := re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line):
        inside = int(m[1], 16) <= address < int(m[2], 16)
    elif line.startswith("VmFlags:") and inside:
        flags = line.split()[1:]
        break
print("hg" in (flags or []))
transport._pool.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"  # VM_HUGEPAGE on the scratch's mapping: the kernel took the advice


def test_without_cachestat_mincore_finds_the_cold_ranges(odd_checkpoint, monkeypatch):
    """Kernels before 6.5 (Amazon Linux 2023 runs 6.1) have no cachestat(2): mincore(2) on a mapping
    of the range must then tell cold from cached, or direct_io would silently do nothing there."""
    import asyncio

    from fastload.sources.local import LocalTransport

    want = {k: v.clone() for k, v in safetensors.torch.load_file(odd_checkpoint).items()}
    size = odd_checkpoint.stat().st_size
    ranges = (0, size), (12_345, 3 * MiB), (size - 5000, 5000)

    async def probes():
        transport = LocalTransport(2, fastload.Trace(), direct_io=True)
        try:
            info = await transport.stat(str(odd_checkpoint))
            fd = transport._fds[info.url]
            return [(transport._mincore(fd, off, n), transport._cachestat(fd, off, n)) for off, n in ranges]
        finally:
            await transport.aclose()

    for (mincore, cachestat), (_, n) in zip(asyncio.run(probes()), ranges):  # cached: the probes agree
        assert mincore >= n and (cachestat is None or abs(mincore - cachestat) <= 2 * 4096)
    evict(odd_checkpoint)
    for mincore, cachestat in asyncio.run(probes()):  # stat() read 8 bytes: readahead may keep a few pages
        assert mincore <= 256 * 1024 and (cachestat is None or abs(mincore - cachestat) <= 2 * 4096)

    monkeypatch.setattr(LocalTransport, "_cachestat", lambda self, fd, offset, length: None)  # an old kernel
    direct = load_and_check(odd_checkpoint, want, direct_io=True)
    if direct_supported(odd_checkpoint):
        assert direct >= 3 * MiB  # the cold ranges went through O_DIRECT, found by mincore
    odd_checkpoint.read_bytes()  # through the page cache (a direct load leaves nothing there)
    assert load_and_check(odd_checkpoint, want, direct_io=True) == 0  # cached: mincore says so
