"""Measure one loader on one source, in a child process of its own.

    from benchmarks.measure import measure
    rec = measure("fastload", source, runs=3, warmup=1, cold=False)
    rec["median_s"], rec["gbps"], rec["peak_rss_mb"], rec["runs"]

`measure` starts ONE child (`python -m benchmarks.measure SPEC RESULT`) per
(loader, source) so memory numbers don't leak between loaders. The child gets
glibc malloc settings that keep freed memory in the process (see child_env):
on this VM memory handed back to the host takes ~2 s to come back and is then
re-touched at 0.5-1.8 GB/s instead of 10-20 GB/s, which would otherwise make
run 2..N depend on timing noise. The child does `warmup` untimed runs, then
`runs` timed ones; each timed span is load + touching one byte of every 4 KiB
page of the result. Cold runs evict the shard files from the page cache first
(posix_fadvise DONTNEED) and check with mincore how much stayed resident.
"""

from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGE = 4096
EVICTED_MAX_RESIDENT = 0.01  # eviction counts as working if <1% of pages stay cached


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a measuring child: keep freed memory mapped, find `benchmarks`."""
    env = dict(os.environ)
    env.update({
        "MALLOC_MMAP_MAX_": "0",                  # large blocks from the heap, not mmap
        "MALLOC_TRIM_THRESHOLD_": str(1 << 42),   # never give the heap top back
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    })
    env.update(extra or {})
    return env


# --- page cache -------------------------------------------------------------

def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: list[Path]) -> float:
    """Fraction of the files' pages in the page cache (mincore on a fresh mapping)."""
    import numpy as np
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    resident = total = 0
    for p in paths:
        size = p.stat().st_size
        pages = (size + PAGE - 1) // PAGE
        if not pages:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap {p}")
            try:
                vec = np.zeros(pages, dtype=np.uint8)
                if libc.mincore(addr, size, vec.ctypes.data) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore {p}")
                resident += int((vec & 1).sum())
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += pages
    return resident / total


# --- the child --------------------------------------------------------------

def touch(result) -> int:
    """Read one byte of every 4 KiB page of the result; returns its size in bytes."""
    if isinstance(result, int):
        return result
    import torch
    total = 0
    for t in result.values():
        if t.device.type != "cpu":  # device memory: just wait for the copies
            if t.device.type == "cuda":
                torch.cuda.synchronize(t.device)
            total += t.numel() * t.element_size()
            continue
        b = t.detach().contiguous().view(-1).view(torch.uint8)
        if b.numel():
            int(b[::PAGE].sum()) + int(b[-1])
        total += b.numel()
    return total


def prefault(nbytes: int) -> None:
    """malloc + write + free `nbytes`, leaving that much touched memory at the heap top.

    With trimming off, the freed block stays mapped, so the next run's
    allocations land on pages that are already faulted in even when glibc
    cannot reuse last run's freed chunks: torch allocates with 64-byte
    posix_memalign, and a freed aligned block is a few bytes too small for
    the same request again, so without this each run would grow the heap
    into fresh (slow, first-touch) memory until the holes happen to coalesce.
    """
    if nbytes <= 0:
        return
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    p = libc.malloc(nbytes)
    if not p:
        raise MemoryError(f"prefault: malloc({nbytes}) failed")
    ctypes.memset(p, 1, nbytes)
    libc.free(p)


def _rusage() -> tuple[int, int]:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_minflt + c.ru_minflt, s.ru_majflt + c.ru_majflt


def child_main(spec_path: str, result_path: str) -> None:
    from benchmarks import loaders
    spec = json.loads(Path(spec_path).read_text())
    source = loaders.Source(**spec["source"])
    loader = loaders.get(spec["loader"])
    import torch  # noqa: F401 - imported before the baseline RSS is taken
    loaders.prepare(spec["loader"])
    paths = source.local_paths() if source.kind == "local" else []
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    runs = []
    first_peak = 0
    for i in range(spec["warmup"] + spec["runs"]):
        rec: dict = {"warmup": i < spec["warmup"]}
        if i > 0:
            first_peak = first_peak or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            prefault(spec.get("prefault_bytes", 0))
        if spec["cold"] and paths:
            evict(paths)
            rec["resident_after_evict"] = resident_fraction(paths)
        gc.collect()
        info: dict = {}
        flt0, maj0 = _rusage()
        t0 = time.perf_counter()
        out = loader(source, info)
        nbytes = touch(out)
        wall = time.perf_counter() - t0
        flt1, maj1 = _rusage()
        del out
        gc.collect()
        if source.scratch:
            shutil.rmtree(source.scratch, ignore_errors=True)
        rec.update(wall_s=wall, bytes=nbytes, gbps=source.total_bytes / wall / 1e9,
                   minflt=flt1 - flt0, majflt=maj1 - maj0, info=info)
        runs.append(rec)
        print(f"  {spec['loader']} run {i}{' (warm-up)' if rec['warmup'] else ''}: "
              f"{wall:.3f}s {rec['gbps']:.2f} GB/s", file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(result_path).write_text(json.dumps({"runs": runs, "base_rss": base_rss,
                                             "first_run_peak_rss": first_peak or peak,
                                             "peak_rss": peak}))


# --- the parent -------------------------------------------------------------

def summarize(runs: list[dict], total_bytes: int) -> dict:
    timed = [r for r in runs if not r["warmup"]] or runs
    walls = [r["wall_s"] for r in timed]
    med = statistics.median(walls)
    out = {"median_s": med, "min_s": min(walls), "max_s": max(walls),
           "gbps": total_bytes / med / 1e9, "gbps_min": total_bytes / max(walls) / 1e9,
           "gbps_max": total_bytes / min(walls) / 1e9,
           "minflt": int(statistics.median(r["minflt"] for r in timed)),
           "majflt": int(statistics.median(r["majflt"] for r in timed))}
    res = [r["resident_after_evict"] for r in runs if "resident_after_evict" in r]
    if res:
        out["resident_after_evict_max"] = max(res)
        out["evicted"] = max(res) < EVICTED_MAX_RESIDENT
    return out


def measure(loader: str, source, *, runs: int = 3, warmup: int = 1, cold: bool = False,
            env: dict[str, str] | None = None, timeout: float = 1200.0,
            prefault_bytes: int | None = None) -> dict:
    """Run `loader` on `source` in a fresh child; returns a record (with "error" on failure).

    `prefault_bytes` (default 1.25x the checkpoint + 256 MiB) is touched at the
    heap top before every run after the first; see `prefault`.
    """
    if prefault_bytes is None:
        prefault_bytes = int(source.total_bytes * 1.25) + (256 << 20)
    record = {"loader": loader, "source": source.kind, "root": source.root, "cold": cold,
              "bytes": source.total_bytes, "runs_requested": runs, "warmup": warmup}
    with tempfile.TemporaryDirectory(prefix="bench-measure-") as tmp:
        spec, result, log = (Path(tmp) / n for n in ("spec.json", "result.json", "child.log"))
        spec.write_text(json.dumps({"loader": loader, "source": asdict(source), "runs": runs,
                                    "warmup": warmup, "cold": cold,
                                    "prefault_bytes": prefault_bytes}))
        t0 = time.perf_counter()
        try:
            with open(log, "w") as err:
                proc = subprocess.run([sys.executable, "-m", "benchmarks.measure", str(spec),
                                       str(result)], cwd=REPO_ROOT, env=child_env(env),
                                      stderr=err, stdout=err, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        record["child_s"] = time.perf_counter() - t0
        if rc != 0 or not result.exists():
            lines = log.read_text(errors="replace").strip().splitlines()
            record["error"] = f"child exit {rc}: " + (lines[-1] if lines else "no output")
            record["log_tail"] = "\n".join(lines[-15:])
            return record
        data = json.loads(result.read_text())
    record["runs"] = data["runs"]
    record["base_rss_mb"] = data["base_rss"] / 1e6
    record["peak_rss_mb"] = data["first_run_peak_rss"] / 1e6  # one load in a fresh process
    record["child_peak_rss_mb"] = data["peak_rss"] / 1e6       # incl. prefault + later runs
    record["first_run_s"] = data["runs"][0]["wall_s"]
    record.update(summarize(data["runs"], source.total_bytes))
    return record


if __name__ == "__main__":
    child_main(*sys.argv[1:3])
