"""Bounded memory: peak RSS of a ``stream()`` with a slow consumer vs. outputs + host buffer budget.

    python benchmarks/bench_memory.py [--size-mb 384] [--delay-ms 50]

A consumer that takes longer per tensor than the loader needs to read it must
not make the loader buffer more: peak RSS should stay within

    baseline (imports, a warm-up load) + output bytes + host_buffer_bytes + a fixed overhead.

Each case runs in a child process of its own (so its peak RSS, ``VmHWM``, is that case's
peak), with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` like the other
benchmarks. The child first does a small warm-up load of the same kind (imports,
thread pools, an aiohttp session), takes its RSS as the baseline, then streams
the checkpoint, sleeping ``--delay-ms`` per tensor. Cases: local file and HTTP
(the in-process test range server), direct reads into the outputs (no staging)
and an F32 -> BF16 conversion (every chunk staged in the host buffer pool), at
two buffer budgets. Writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "memory.json"
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
MiB = 1 << 20
FIXED_OVERHEAD = 64 * MiB  # what the bound allows beyond outputs + buffers (aiohttp buffers, allocator slack)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process image's peak RSS (VmHWM). Not ``ru_maxrss``: Linux carries that over ``exec`` from
    the forked parent, so a child of a big parent would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(spec: dict) -> dict:
    import torch

    import fastload

    config = fastload.LoadConfig(chunk_bytes=spec["chunk_bytes"], host_buffer_bytes=spec["buffer_bytes"],
                                 max_concurrency=spec["concurrency"])
    dtype = getattr(torch, spec["dtype"]) if spec["dtype"] else None
    fastload.load(spec["warm_source"], dtype=dtype, config=config)  # imports, pools, sessions
    gc.collect()
    baseline, peak_before = rss_bytes(), peak_rss_bytes()
    trace = fastload.Trace()
    start = time.perf_counter()
    received = 0
    with fastload.stream(spec["source"], dtype=dtype, config=config, trace=trace) as stream:
        for _name, tensor in stream:
            received += tensor.numel() * tensor.element_size()
            del tensor
            time.sleep(spec["delay_s"])  # the slow consumer
        loaded = time.perf_counter() - start
        rss_at_end = rss_bytes()
    wall = time.perf_counter() - start
    peak = peak_rss_bytes()
    summary = trace.summary()
    return {"baseline_rss": baseline, "peak_rss": max(peak, peak_before), "rss_at_end": rss_at_end,
            "output_bytes": received, "wall_s": wall, "stream_s": loaded, "fetch_s": summary.stages.get("fetch"),
            "consumer_s": spec["delay_s"] * spec["tensors"]}


def write_checkpoint(path: Path, size_mb: int, tensors: int = 24) -> int:
    import torch
    from safetensors.torch import save_file

    numel = size_mb * MiB // 4 // tensors
    g = torch.Generator().manual_seed(0)
    save_file({f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(tensors)}, str(path))
    return tensors


def run_case(name: str, spec: dict) -> dict:
    env = {**os.environ, **MALLOC_ENV,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    grew = out["peak_rss"] - out["baseline_rss"]
    beyond_outputs = grew - out["output_bytes"]
    out.update(name=name, source=spec["kind"], dtype=spec["dtype"], buffer_bytes=spec["buffer_bytes"],
               chunk_bytes=spec["chunk_bytes"], growth=grew, beyond_outputs=beyond_outputs,
               bound=out["output_bytes"] + spec["buffer_bytes"] + FIXED_OVERHEAD,
               within_bound=grew <= out["output_bytes"] + spec["buffer_bytes"] + FIXED_OVERHEAD)
    return out


def table(rows: list[dict]) -> str:
    lines = ["case                      outputs   buffers   peak-baseline   beyond outputs   within bound   "
             "wall (consumer)", "-" * 112]
    for r in rows:
        lines.append(f"{r['name']:<24} {r['output_bytes'] / MiB:7.0f} MiB {r['buffer_bytes'] / MiB:5.0f} MiB "
                     f"{r['growth'] / MiB:11.0f} MiB {r['beyond_outputs'] / MiB:12.0f} MiB   "
                     f"{'yes' if r['within_bound'] else 'NO':>8}      {r['wall_s']:5.2f} s ({r['consumer_s']:.2f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=384)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="consumer time per tensor")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    sys.path.insert(0, str(REPO / "tests"))
    from servers import RangeHTTPServer

    with tempfile.TemporaryDirectory(prefix="fastload-bench-memory-") as tmp:
        root = Path(tmp)
        count = write_checkpoint(root / "model.safetensors", args.size_mb)
        write_checkpoint(root / "warm.safetensors", 4, tensors=4)
        rows = []
        with RangeHTTPServer(root) as server:
            where = {"local": (str(root / "model.safetensors"), str(root / "warm.safetensors")),
                     "http": (server.url_for(root / "model.safetensors"), server.url_for(root / "warm.safetensors"))}
            cases = [(kind, dtype, buffers) for kind in ("local", "http") for dtype in (None, "bfloat16")
                     for buffers in (64 * MiB, 256 * MiB) if dtype or buffers == 64 * MiB]
            for kind, dtype, buffers in cases:
                name = f"{kind}-{'bf16' if dtype else 'direct'}-{buffers // MiB}M"
                spec = {"kind": kind, "source": where[kind][0], "warm_source": where[kind][1], "dtype": dtype,
                        "buffer_bytes": buffers, "chunk_bytes": 16 * MiB, "concurrency": 8,
                        "delay_s": args.delay_ms / 1000, "tensors": count}
                rows.append(run_case(name, spec))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    meta = {"size_mb": args.size_mb, "tensors": count, "delay_ms": args.delay_ms,
            "fixed_overhead_allowed": FIXED_OVERHEAD, "python": platform.python_version(),
            "cores": os.cpu_count(), "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "cases": rows}, indent=2) + "\n")
    print()
    print(table(rows))
    print(f"\nwrote {RESULTS.relative_to(REPO)}")
    return 0 if all(r["within_bound"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
