"""LoadConfig(direct_io=True): cold local ranges through O_DIRECT, cached ones through the page cache."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import write_single

MiB = 1 << 20


def evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # a file just written has dirty pages, which DONTNEED keeps
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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


def load_and_check(path, want, **config):
    trace = fastload.Trace()
    got = fastload.load(path, trace=trace, config=fastload.LoadConfig(chunk_bytes=2 * MiB, **config))
    for name, tensor in want.items():
        assert torch.equal(got[name].view(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name
    return trace.summary().counters.get("bytes_direct", 0)


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
