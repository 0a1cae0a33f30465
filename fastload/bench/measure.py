"""Measure one loader on one source, in a child process of its own.

    from fastload.bench.measure import measure
    rec = measure("fastload", source, runs=3, warmup=1, cold=False)
    rec["median_s"], rec["gbps"], rec["peak_rss_mb"], rec["runs"]

`measure` starts ONE child (`python -m fastload.bench.measure SPEC RESULT`) per
(loader, source) so memory numbers don't leak between loaders. The child gets
glibc malloc settings that keep freed memory in the process and let it be
reused (see child_env): on this VM memory handed back to the host takes ~2 s
to come back and is then re-touched at 0.5-1.8 GB/s instead of 10-20 GB/s,
which would otherwise make run 2..N depend on timing noise. The child does
`warmup` untimed runs, then `runs` timed ones; each timed span is load +
touching one byte of every 4 KiB page of the result. Cold runs evict the shard
files from the page cache first (posix_fadvise DONTNEED) and check with
mincore how much stayed resident. Peak RSS is the child's VmHWM from
/proc/self/status: `ru_maxrss` is no use here, because Linux carries the
parent's peak over into a child across fork + exec.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory holding `fastload`
PAGE = 4096
EVICTED_MAX_RESIDENT = 0.01  # eviction counts as working if <1% of pages stay cached


MALLOC_ENV = {
    "MALLOC_MMAP_MAX_": "0",                 # large blocks from the heap, never mmap/munmap
    "MALLOC_TRIM_THRESHOLD_": str(1 << 42),  # never give the heap top back to the kernel
}
# No tcache/fastbins: torch allocates with 64-byte posix_memalign, whose few-byte
# leading remainder otherwise sits in tcache, keeps the freed block from coalescing,
# and leaves it a few bytes too small for the same request next run -- the heap then
# grows by one checkpoint per run into fresh, first-touch memory.
MALLOC_TUNABLES = "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a measuring child: keep freed memory mapped, find this `fastload`."""
    env = dict(os.environ)
    env.update(MALLOC_ENV)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), MALLOC_TUNABLES]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
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


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore on a fresh mapping); None when the kernel
    will not say (files this process neither owns nor may write: mincore would call them all cached)."""
    from ..sources.local import load_libc, mincore_bytes
    libc = load_libc()
    resident = total = 0
    for p in paths:
        size = p.stat().st_size
        if not size:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            cached = mincore_bytes(libc, fd, 0, size)
        finally:
            os.close(fd)
        if cached is None:
            return None
        resident += cached
        total += (size + PAGE - 1) // PAGE * PAGE
    return resident / total


# --- how busy the machine is -------------------------------------------------

def cpu_busy_s() -> float:
    """CPU seconds all CPUs spent not idle since boot (steal included), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait_s: float, max_busy_cores: float = 0.3, window_s: float = 1.0) -> dict:
    """Wait (up to `max_wait_s`) for a `window_s` in which other work used < `max_busy_cores`."""
    t0 = time.monotonic()
    while True:
        b0 = cpu_busy_s()
        time.sleep(window_s)
        busy = (cpu_busy_s() - b0) / window_s
        waited = time.monotonic() - t0
        if busy < max_busy_cores or waited >= max_wait_s:
            return {"quiet_wait_s": waited, "busy_cores_before": busy,
                    "quiet": busy < max_busy_cores}


# --- the child --------------------------------------------------------------

def touch(result) -> int:
    """Read one byte of every 4 KiB page of the result; returns its size in bytes.

    A dict's CPU tensors are touched on as many threads as torch uses (in groups of about equal
    bytes): the raw limit's single buffer is touched by one torch op, which torch spreads over
    those threads, and a loader should not pay for returning many tensors instead of one
    (measured: 200 tensors, 2.46 GB: 12 ms on one thread, 6 ms on two; the one buffer 4 ms).
    """
    if isinstance(result, int):
        return result
    import torch
    total = 0
    pages = []
    for t in result.values():
        if t.device.type == "meta":
            raise RuntimeError(f"a meta tensor {tuple(t.shape)} holds no data: the loader did not load it")
        if t.device.type != "cpu":  # device memory: just wait for the copies
            if t.device.type == "cuda":
                torch.cuda.synchronize(t.device)
            total += t.numel() * t.element_size()
            continue
        b = t.detach().contiguous().view(-1).view(torch.uint8)
        if b.numel():
            pages.append(b)
        total += b.numel()
    groups: list[list] = [[] for _ in range(max(1, min(torch.get_num_threads(), len(pages))))]
    sizes = [0] * len(groups)
    for b in sorted(pages, key=len, reverse=True):  # largest first, each to the lightest group
        i = sizes.index(min(sizes))
        groups[i].append(b)
        sizes[i] += len(b)

    errors: list[BaseException] = []

    def read(group: list) -> None:
        try:
            for b in group:
                int(b[::PAGE].sum()) + int(b[-1])
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller
            errors.append(exc)

    helpers = [threading.Thread(target=read, args=(g,)) for g in groups[1:]]  # one thread per group
    for h in helpers:
        h.start()
    read(groups[0])
    for h in helpers:
        h.join()
    if errors:
        raise errors[0]
    return total


def check_result(result, source) -> None:
    """Untimed, after every run: the loader really returned the checkpoint, or the run is an error.

    Names, shapes and dtypes of every tensor, and the bytes of its first and last rows, against
    ``safetensors`` reading the local copy of the shards; a raw limit's buffer against the files'
    bytes at its start, middle and end; a byte count against the files' sizes. A loader that returned
    less, other or unread data would otherwise be timed as a fast load of the whole checkpoint.
    """
    import torch

    paths = source.check_paths()
    if isinstance(result, int):
        if result != source.total_bytes:
            raise RuntimeError(f"result check: {result} bytes moved, the files hold {source.total_bytes}")
        return
    if paths is None:
        return  # a checkpoint behind a URL, with no local copy to compare with
    if set(result) == {"buffer"}:  # a raw limit: the files' bytes back to back
        buf = result["buffer"].view(-1).view(torch.uint8)
        if buf.numel() != source.total_bytes:
            raise RuntimeError(f"result check: a {buf.numel()}-byte buffer for {source.total_bytes} bytes of files")
        at = 0
        for path in paths:
            size = path.stat().st_size
            with open(path, "rb") as f:
                for off in {0, size // 2, max(0, size - 65536)}:
                    f.seek(off)
                    want = f.read(65536)
                    if bytes(buf[at + off:at + off + len(want)].numpy()) != want:
                        raise RuntimeError(f"result check: the buffer differs from {path.name} at byte {off}")
            at += size
        return
    from safetensors import safe_open

    names: set[str] = set()
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                names.add(name)
                got = result.get(name)
                if got is None:
                    continue
                ref = f.get_slice(name)
                shape = tuple(ref.get_shape())
                if tuple(got.shape) != shape:
                    raise RuntimeError(f"result check: {name} has shape {tuple(got.shape)}, the file {shape}")
                rows = [f.get_tensor(name)] if len(shape) == 0 or shape[0] <= 2 else [ref[0:1], ref[-1:]]
                mine = [got] if len(rows) == 1 else [got[0:1], got[-1:]]
                for a, b in zip((t.detach().cpu() for t in mine), rows):
                    if a.dtype != b.dtype:
                        raise RuntimeError(f"result check: {name} is {a.dtype}, the file holds {b.dtype}")
                    if a.numel() and not a.contiguous().view(-1).view(torch.uint8).equal(
                            b.contiguous().view(-1).view(torch.uint8)):
                        raise RuntimeError(f"result check: {name} differs from the file's bytes")
    if missing := sorted(names - set(result)):
        raise RuntimeError(f"result check: {len(missing)} of {len(names)} tensors missing, e.g. {missing[:3]}")
    if extra := sorted(set(result) - names):
        raise RuntimeError(f"result check: {len(extra)} tensors not in the checkpoint, e.g. {extra[:3]}")


def prefault(nbytes: int) -> None:
    """malloc + write + free `nbytes`, leaving that much touched memory at the heap top.

    Even with the tunables above, glibc carves small requests out of last
    run's freed blocks, so the same large request may not fit there again and
    comes from the heap top -- fresh, first-touch memory. With trimming off the
    freed prefault block stays mapped, so every run lands on pages already
    faulted in. It inflates the child's later RSS by up to `nbytes`, which is
    why the reported peak RSS is the one after the warm-up (before any prefault).
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


def proc_status_bytes(field: str) -> int:
    """A kB field of /proc/self/status (VmHWM: peak RSS of this process image; VmRSS: now) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _rusage() -> tuple[int, int, float]:
    """(minor faults, major faults, CPU seconds) of this process and its waited-for children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (s.ru_minflt + c.ru_minflt, s.ru_majflt + c.ru_majflt,
            s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime)


def child_main(spec_path: str, result_path: str) -> None:
    from fastload.bench import loaders
    spec = json.loads(Path(spec_path).read_text())
    source = loaders.Source(**spec["source"])
    loader = loaders.get(spec["loader"])
    import torch  # noqa: F401 - imported before the baseline RSS is taken
    loaders.prepare(spec["loader"])
    paths = source.local_paths() if source.kind == "local" else []
    if paths and spec["loader"] == "tensorizer" and source.tensorizer:
        paths.append(Path(source.tensorizer))  # it reads its own copy: evict that too
    base_rss = proc_status_bytes("VmRSS")
    runs = []
    first_peak = 0
    for i in range(spec["warmup"] + spec["runs"]):
        rec: dict = {"warmup": i < spec["warmup"]}
        if i > 0:
            prefault(spec.get("prefault_bytes", 0))
        if spec["cold"] and paths:
            evict(paths)
            rec["resident_after_evict"] = resident_fraction(paths)
            time.sleep(spec.get("cold_settle_s", 0.0))  # untimed: see measure()
        elif paths:  # a warm run must find the files cached (the prefault above could push pages out)
            rec["resident_before"] = resident_fraction(paths)
        gc.collect()
        info: dict = {}
        flt0, maj0, cpu0 = _rusage()
        busy0 = cpu_busy_s()
        t0 = time.perf_counter()
        out = loader(source, info)
        nbytes = touch(out)
        wall = time.perf_counter() - t0
        busy1 = cpu_busy_s()
        flt1, maj1, cpu1 = _rusage()
        if i == 0:  # the peak of one load in a fresh process: before the check, which maps the files
            first_peak = proc_status_bytes("VmHWM")
        check_result(out, source)
        del out
        gc.collect()
        if source.scratch:
            shutil.rmtree(source.scratch, ignore_errors=True)
        rec.update(wall_s=wall, bytes=nbytes, gbps=source.total_bytes / wall / 1e9,
                   minflt=flt1 - flt0, majflt=maj1 - maj0, cpu_s=cpu1 - cpu0,
                   others_cpu_s=max(0.0, busy1 - busy0 - (cpu1 - cpu0)), info=info)
        runs.append(rec)
        print(f"  {spec['loader']} run {i}{' (warm-up)' if rec['warmup'] else ''}: "
              f"{wall:.3f}s {rec['gbps']:.2f} GB/s", file=sys.stderr, flush=True)
    peak = proc_status_bytes("VmHWM")
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
           "majflt": int(statistics.median(r["majflt"] for r in timed)),
           "cpu_s": statistics.median(r["cpu_s"] for r in timed),
           "others_cpu_s": statistics.median(r["others_cpu_s"] for r in timed)}
    res = [r["resident_after_evict"] for r in runs if "resident_after_evict" in r]
    if res:  # None: the kernel would not say (see resident_fraction)
        out["resident_after_evict_max"] = None if None in res else max(res)
        out["evicted"] = None if None in res else max(res) < EVICTED_MAX_RESIDENT
    if warm := [r["resident_before"] for r in timed if "resident_before" in r]:
        out["resident_before_min"] = None if None in warm else min(warm)
        out["cached"] = None if None in warm else min(warm) > 1 - EVICTED_MAX_RESIDENT
    return out


def measure(loader: str, source, *, runs: int = 3, warmup: int = 1, cold: bool = False,
            env: dict[str, str] | None = None, timeout: float = 1200.0,
            prefault_bytes: int | None = None, quiet_wait_s: float = 0.0, cold_settle_s: float = 0.0) -> dict:
    """Run `loader` on `source` in a fresh child; returns a record (with "error" on failure).

    `prefault_bytes` (default 1.25x the checkpoint + 256 MiB; 0 turns it off) is
    touched at the heap top before every run after the first; see `prefault`.
    `quiet_wait_s` > 0 first waits up to that long for the machine to go quiet.
    `cold_settle_s` > 0 waits that long after each eviction: on this VM the freed page-cache
    memory then goes back to the host, and the cold read has to take fresh memory for its page
    cache, as on a machine that has not just read the files (right after eviction it reuses them).
    """
    if prefault_bytes is None:
        prefault_bytes = int(source.total_bytes * 1.25) + (256 << 20)
    record = {"loader": loader, "source": source.kind, "root": source.root, "cold": cold,
              "cold_settle_s": cold_settle_s if cold else 0.0,
              "bytes": source.total_bytes, "runs_requested": runs, "warmup": warmup}
    with tempfile.TemporaryDirectory(prefix="bench-measure-") as tmp:
        spec, result, log = (Path(tmp) / n for n in ("spec.json", "result.json", "child.log"))
        spec.write_text(json.dumps({"loader": loader, "source": asdict(source), "runs": runs,
                                    "warmup": warmup, "cold": cold, "cold_settle_s": cold_settle_s,
                                    "prefault_bytes": prefault_bytes}))
        if quiet_wait_s > 0:
            record.update(wait_quiet(quiet_wait_s))
        record["loadavg_before"] = os.getloadavg()[0]
        t0 = time.perf_counter()
        try:
            with open(log, "w") as err:
                proc = subprocess.run([sys.executable, "-m", "fastload.bench.measure", str(spec),
                                       str(result)], env=child_env(env),
                                      stderr=err, stdout=err, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        record["child_s"] = time.perf_counter() - t0
        record["loadavg_after"] = os.getloadavg()[0]
        if rc != 0 or not result.exists():
            lines = log.read_text(errors="replace").strip().splitlines()
            record["error"] = f"child exit {rc}: " + (lines[-1] if lines else "no output")
            record["log_tail"] = "\n".join(lines[-15:])
            return record
        data = json.loads(result.read_text())
    record["runs"] = data["runs"]
    record["base_rss_mb"] = data["base_rss"] / 1e6
    # VmHWM after the warm-up: one load in a fresh process, before any prefault
    record["peak_rss_mb"] = data["first_run_peak_rss"] / 1e6
    record["child_peak_rss_mb"] = data["peak_rss"] / 1e6  # whole child, incl. prefault
    record["first_run_s"] = data["runs"][0]["wall_s"]
    record.update(summarize(data["runs"], source.total_bytes))
    return record


if __name__ == "__main__":
    child_main(*sys.argv[1:3])
