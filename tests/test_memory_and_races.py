"""Memory bounds, backpressure, thread-safety and the local O_DIRECT path.

Real files, real fastload; memory is measured in a child process (VmHWM, reset with clear_refs).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
import threading
import weakref

import pytest
import torch
from safetensors.torch import save_file

import fastload
from checkpoints import evict
from reliability_helpers import same_bytes

MiB = 1 << 20


def o_direct_works(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


def expected(tensors: dict, dtype) -> dict:
    return {n: (t.to(dtype) if dtype is not None and t.is_floating_point() else t) for n, t in tensors.items()}


# -- a file replaced (atomic rename) mid-load must not mix versions, with direct_io either -------------------


def test_direct_io_file_renamed_over_mid_load_never_mixes_versions(tmp_path):
    """The page-cache path reads through the descriptor stat() opened, so a checkpoint saved over the path
    (write a temp file, os.replace: what trainers do) mid-load keeps the old version whole. With direct_io
    the O_DIRECT descriptor is opened lazily *by path* at the first cold read: it reads the new inode, and
    the end-of-read check looks at the old descriptor, which never changed."""
    path = tmp_path / "m.safetensors"
    newer = tmp_path / "newer.safetensors"
    save_file({"w": torch.zeros(8 * MiB, dtype=torch.uint8)}, str(path))
    save_file({"w": torch.full((8 * MiB,), 7, dtype=torch.uint8)}, str(newer))
    # Without O_DIRECT here, direct_io reads through the page cache: the same promise holds.
    path.read_bytes()  # the first chunk is in the page cache, the rest is cold
    evict(path, 2 * MiB + 4096)
    evict(newer)
    fired = []

    def progress(done, total):
        if not fired:  # after the first (cached) chunk: a new version is renamed over the path
            fired.append(done)
            os.replace(newer, path)
            evict(path)

    config = fastload.LoadConfig(chunk_bytes=2 * MiB, host_buffer_bytes=8 * MiB, max_concurrency=1, direct_io=True)
    trace = fastload.Trace()
    try:
        got = fastload.load(str(path), config=config, progress=progress, trace=trace)["w"]
    except (fastload.SourceChangedError, fastload.IntegrityError):
        return  # acceptable: a typed error
    assert fired
    values = set(torch.unique(got).tolist())
    assert len(values) == 1, (f"one tensor holds bytes of two file versions: {sorted(values)}; "
                              f"bytes_direct={trace.summary().counters.get('bytes_direct')}")


# -- in-place rewrite / truncation mid-load (local), with and without direct_io and conversion --------------


@pytest.mark.parametrize("direct", [False, True], ids=["page_cache", "direct_io"])
@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["raw", "convert"])
@pytest.mark.parametrize("action", ["truncate", "rewrite", "truncate_and_regrow"])
def test_local_file_changed_in_place_mid_load_raises(tmp_path, direct, dtype, action):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2 * MiB), "v": torch.zeros(MiB)}, str(path))  # 12 MiB
    size = path.stat().st_size
    evict(path)
    fired = []

    def progress(done, total):
        if fired:
            return
        fired.append(done)
        if action == "truncate":
            os.truncate(path, 3 * MiB)
        elif action == "truncate_and_regrow":  # same size again, the tail now zeros... and different bytes
            os.truncate(path, 3 * MiB)
            os.truncate(path, size)
        else:
            with open(path, "r+b") as f:
                f.seek(4 * MiB)
                f.write(b"\x01" * (6 * MiB))
        if direct:
            evict(path)

    config = fastload.LoadConfig(chunk_bytes=MiB, host_buffer_bytes=2 * MiB, max_concurrency=1, direct_io=direct)
    with pytest.raises((fastload.SourceChangedError, fastload.IntegrityError)):
        fastload.load(str(path), config=config, progress=progress, dtype=dtype)
    assert fired


def test_in_place_rewrite_that_keeps_mtime_is_still_detected(tmp_path):
    """Size + mtime is the whole change check: a same-size in-place rewrite whose writer sets the old
    mtime back (cp -p / rsync -t --inplace / touch -r style) goes unnoticed and the load returns bytes of
    both versions. st_ctime (and st_ino) cannot be set back by any writer."""
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2 * MiB)}, str(path))
    st = path.stat()
    fired = []

    def progress(done, total):
        if not fired:
            fired.append(done)
            with open(path, "r+b") as f:
                f.seek(4 * MiB)
                f.write(b"\x3f" * (4 * MiB - 200))
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    config = fastload.LoadConfig(chunk_bytes=MiB, host_buffer_bytes=2 * MiB, max_concurrency=1)
    try:
        got = fastload.load(str(path), config=config, progress=progress)["w"]
    except (fastload.SourceChangedError, fastload.IntegrityError):
        return
    changed = int((got != 0).sum())
    assert changed in (0, got.numel()), f"{changed} of {got.numel()} values come from the rewritten file"


# -- peak memory of staged loads --------------------------------------------------------------------------

CHILD = textwrap.dedent(r"""
    import json, os, sys, tempfile
    import torch, fastload
    from safetensors.torch import save_file

    path, budget, direct, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    warm = os.path.join(tempfile.mkdtemp(), "w.safetensors")  # import and warm every code path first
    save_file({"x": torch.ones(1000)}, warm)
    fastload.load(warm, dtype=torch.bfloat16)
    if direct:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    config = fastload.LoadConfig(chunk_bytes=budget // 2, host_buffer_bytes=budget, direct_io=direct)
    trace = fastload.Trace()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status("VmHWM")
    if mode == "load":
        out = fastload.load(path, dtype=torch.bfloat16, config=config, trace=trace)
        out_bytes = sum(t.numel() * t.element_size() for t in out.values())
    else:  # a slow stream consumer that keeps what it gets
        import time
        kept, out_bytes = [], 0
        with fastload.stream(path, dtype=torch.bfloat16, config=config, trace=trace) as s:
            for name, t in s:
                kept.append(t)
                out_bytes += t.numel() * t.element_size()
                time.sleep(0.005)
    print(json.dumps({"extra": status("VmHWM") - before - out_bytes, "out": out_bytes,
                      "direct": trace.summary().counters.get("bytes_direct", 0)}))
""")


@pytest.fixture(scope="module")
def f32_checkpoint(tmp_path_factory):
    """~128 MB of float32 in 32 tensors (converted to bf16: 64 MB of outputs)."""
    directory = tmp_path_factory.mktemp("mem")
    path = directory / "f32.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({f"t{i}": torch.randn(1_000_003 + i, generator=g) for i in range(32)}, str(path))
    yield path
    path.unlink()


@pytest.mark.parametrize("mode", [
    pytest.param(("load", False), id="load-page_cache"),
    pytest.param(("stream", False), id="slow_stream-page_cache"),
    pytest.param(("load", True), id="load-direct_io"),
])
def test_staged_conversion_peak_memory_within_budget(f32_checkpoint, tmp_path, mode):
    """Memory beyond the outputs stays within host_buffer_bytes (+16 MiB for allocator noise)."""
    kind, direct = mode  # (without O_DIRECT here, direct_io falls back to the page cache: same bound)
    budget = 64 * MiB
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = subprocess.run([sys.executable, str(script), str(f32_checkpoint), str(budget), "1" if direct else "0",
                          kind], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if direct:
        assert result["direct"] > 0, "the O_DIRECT path did not run"
    assert result["extra"] <= budget + 16 * MiB, (
        f"{result['extra'] / MiB:.1f} MiB beyond the {result['out'] / MiB:.1f} MiB of outputs; "
        f"budget {budget / MiB:.0f} MiB")


def test_stream_does_not_keep_handed_out_tensors_alive(tmp_path):
    """A stream consumer that copies each tensor into its model and drops it (the README's quickstart)
    should not pay for the whole checkpoint again: the sink keeps a reference to every output it handed
    out until the stream ends, so nothing the consumer released is freed."""
    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": torch.randn(100_000) for i in range(20)}, str(path))
    refs = []
    alive_midway = None
    config = fastload.LoadConfig(chunk_bytes=MiB, host_buffer_bytes=2 * MiB, max_concurrency=1)
    with fastload.stream(str(path), config=config) as s:
        for _, tensor in s:  # not enumerate(): it keeps its last result tuple, and the tensor in it
            refs.append(weakref.ref(tensor))
            del tensor
            gc.collect()
            if len(refs) == 11:
                alive_midway = sum(r() is not None for r in refs)
    assert alive_midway is not None
    assert alive_midway == 0, f"{alive_midway} tensors the consumer dropped are still held by the load"


# -- direct_io: bit-exact for any layout and budget; tmpfs -------------------------------------------------

LAYOUTS = {
    "tiny_below_1MiB": [7, 4093, 300_001],
    "page_multiples": [4096, MiB, 2 * MiB],
    "page_plus_minus_one": [4095, MiB + 1, 2 * MiB - 1, 4097],
    "chunk_boundaries": [MiB - 3, 3, MiB, 2 * MiB],  # tensors that start/end exactly on chunk edges
    "one_big_odd": [5 * MiB + 4095],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("budget,chunk", [(4 * MiB, 2 * MiB), (2 * MiB, MiB), (16 * MiB, 4 * MiB)],
                         ids=["scratch_smaller_than_chunk", "min_budget", "roomy"])
def test_direct_io_bit_exact_any_layout(tmp_path, layout, budget, chunk):
    g = torch.Generator().manual_seed(len(layout))
    tensors = {"lead": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8)}  # unaligned data start
    tensors |= {f"t{i}": torch.randint(0, 255, (n,), generator=g, dtype=torch.uint8)
                for i, n in enumerate(LAYOUTS[layout])}
    tensors["f32"] = torch.randn(300_001, generator=g)  # a float at an odd offset, converted below
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    for dtype in (None, torch.bfloat16):
        evict(path)
        trace = fastload.Trace()
        got = fastload.load(str(path), dtype=dtype, trace=trace, config=fastload.LoadConfig(
            chunk_bytes=chunk, host_buffer_bytes=budget, max_concurrency=4, direct_io=True))
        for name, want in expected(tensors, dtype).items():
            assert same_bytes(got[name], want), (name, dtype)
        direct = trace.summary().counters.get("bytes_direct", 0)
        # Converting stages chunks in a pool that takes half the budget, at least two chunks: the scratch
        # gets the rest, and with less than 1 MiB left the page cache reads everything.
        room = dtype is None or budget - max(2 * chunk, budget // 2) >= MiB
        if layout != "tiny_below_1MiB" and o_direct_works(path) and room:
            assert direct >= MiB, "the O_DIRECT path did not run"


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_direct_io_on_tmpfs_is_bit_exact(tmp_path):
    path = f"/dev/shm/fastload-audit-{os.getpid()}.safetensors"
    g = torch.Generator().manual_seed(5)
    tensors = {"a": torch.randn(3, generator=g), "b": torch.randint(0, 255, (5 * MiB + 3,), generator=g,
                                                                     dtype=torch.uint8)}
    save_file(tensors, path)
    try:
        for dtype in (None, torch.float16):
            got = fastload.load(path, dtype=dtype, config=fastload.LoadConfig(
                chunk_bytes=2 * MiB, host_buffer_bytes=8 * MiB, direct_io=True))
            for name, want in expected(tensors, dtype).items():
                assert same_bytes(got[name], want), name
    finally:
        os.unlink(path)


# -- concurrency: threads and asyncio tasks ---------------------------------------------------------------


@pytest.fixture
def three_files(tmp_path):
    files = {}
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        tensors = {"a": torch.randn(3, generator=g), "big": torch.randn(700_001, generator=g),
                   "h": torch.randn(300_007, generator=g).half(),
                   "i": torch.randint(0, 100, (250_001,), generator=g)}
        path = tmp_path / f"c{k}.safetensors"
        save_file(tensors, str(path))
        files[str(path)] = tensors
    return files


def test_eight_threads_same_and_different_files_direct_io_and_conversion(three_files):
    paths = list(three_files)
    for p in paths:
        evict(p)
    jobs = [(paths[i % 3] if i < 4 else paths[0], torch.bfloat16 if i % 2 else None, i % 3 != 2) for i in range(8)]
    barrier = threading.Barrier(len(jobs))
    results: dict = {}
    traces = [fastload.Trace() for _ in jobs]

    def run(i, path, dtype, direct):
        barrier.wait()
        try:
            results[i] = fastload.load(path, dtype=dtype, trace=traces[i], config=fastload.LoadConfig(
                chunk_bytes=MiB, host_buffer_bytes=2 * MiB, max_concurrency=4, direct_io=direct))
        except BaseException as exc:  # noqa: BLE001
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i, *job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    pointers = set()
    for i, (path, dtype, _) in enumerate(jobs):
        got = results[i]
        assert not isinstance(got, BaseException), f"job {i}: {got!r}"
        for name, want in expected(three_files[path], dtype).items():
            assert same_bytes(got[name], want), (i, name)
        pointers |= {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(pointers) == 8 * 4  # no two results share memory
    # (Whether O_DIRECT ran here is a race with the buffered jobs filling the cache: tested elsewhere.)
    for i, trace in enumerate(traces):  # each trace counted exactly its own load
        assert trace.summary().bytes_fetched == os.path.getsize(jobs[i][0]), i


def test_many_concurrent_aload_tasks_in_one_loop(three_files):
    paths = list(three_files)
    for p in paths:
        evict(p)

    async def main():
        return await asyncio.gather(*(
            fastload.aload(paths[i % 3], dtype=torch.float16 if i % 2 else None, config=fastload.LoadConfig(
                chunk_bytes=MiB, host_buffer_bytes=2 * MiB, max_concurrency=3, direct_io=i % 4 < 2))
            for i in range(16)))

    results = asyncio.run(main())
    for i, got in enumerate(results):
        for name, want in expected(three_files[paths[i % 3]], torch.float16 if i % 2 else None).items():
            assert same_bytes(got[name], want), (i, name)
