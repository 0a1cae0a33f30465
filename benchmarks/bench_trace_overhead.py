"""What tracing costs: the same load with ``trace=None`` and with a ``fastload.Trace``.

    python benchmarks/bench_trace_overhead.py [--size-mb 512] [--pairs 15]

Cases (local file, warm page cache -- the fastest source, so the largest
relative overhead): direct reads at the default chunk size; direct reads at
1 MiB chunks (many chunk events) with ``Trace(otel=False)`` and with a default
``Trace()`` (which looks for an OpenTelemetry provider at the end); and a
bf16 -> fp16 conversion (staged path). Writing a Chrome trace is timed on its
own: it happens once, after the load, and only when asked for.
Runs alternate off/on after one warm-up of each, so drift on a shared machine
hits both alike; the overhead is the median of the per-pair ratios. A second,
steadier measure times the trace's own calls per chunk (record, intervals,
keyed byte count; median of 200 batches of 1000) and divides by the time a
chunk takes in the 1 MiB-chunk load.

Memory is kept comparable across runs: the script re-executes itself with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` so freed tensor memory stays
in the process (on these VMs memory handed back to the host is slow to touch
again); minor page faults per run are reported to show it worked. Process CPU
time (all threads) is reported beside wall time: on a shared machine it is
the steadier of the two. Writes ``benchmarks/results/trace_overhead.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
RESULTS = Path(__file__).resolve().parent / "results" / "trace_overhead.json"


def build_checkpoint(directory: Path, size_mb: int) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors, total, i = {}, 0, 0
    while total < size_mb * 1e6:  # Llama-ish: big matrices and a few small norms
        tensors[f"model.layers.{i}.mlp.weight"] = torch.randn(2048, 4096, generator=g).to(torch.bfloat16)
        tensors[f"model.layers.{i}.norm.weight"] = torch.randn(2048, generator=g).to(torch.bfloat16)
        total += 2048 * 4096 * 2 + 2048 * 2
        i += 1
    path = directory / "model.safetensors"
    save_file(tensors, str(path))
    return path


def timed_load(path: Path, trace, **kwargs) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds over all threads, minor page faults) of one load."""
    import fastload

    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, cpu = time.perf_counter(), time.process_time()
    out = fastload.load(path, trace=trace, **kwargs)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    del out
    return elapsed, cpu, faults


def measure_case(path: Path, pairs: int, make_trace, **kwargs) -> dict:
    timed_load(path, None, **kwargs)  # warm-up: page cache, allocator, thread pools
    timed_load(path, make_trace(), **kwargs)
    runs: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    chunks = 0
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for traced in order:
            trace = make_trace() if traced else None
            runs[traced].append(timed_load(path, trace, **kwargs))
            if traced:
                chunks = trace.summary().chunks
    off, on = [r[0] for r in runs[False]], [r[0] for r in runs[True]]
    cpu_off, cpu_on = [r[1] for r in runs[False]], [r[1] for r in runs[True]]
    ratios = [b / a - 1 for a, b in zip(off, on)]
    return {
        "chunks": chunks,
        "off_s": {"median": statistics.median(off), "min": min(off), "max": max(off)},
        "on_s": {"median": statistics.median(on), "min": min(on), "max": max(on)},
        "overhead_pct_median_of_pairs": 100 * statistics.median(ratios),
        "overhead_pct_of_medians": 100 * (statistics.median(on) / statistics.median(off) - 1),
        "overhead_pct_of_minimums": 100 * (min(on) / min(off) - 1),
        "cpu_off_s_median": statistics.median(cpu_off),
        "cpu_on_s_median": statistics.median(cpu_on),
        "cpu_overhead_pct_of_medians": 100 * (statistics.median(cpu_on) / statistics.median(cpu_off) - 1),
        "minor_faults_per_run": {"off_median": statistics.median(r[2] for r in runs[False]),
                                 "on_median": statistics.median(r[2] for r in runs[True]),
                                 "max": max(r[2] for r in runs[False] + runs[True])},
    }


def export_cost(path: Path, config, out: Path) -> dict:
    """Time writing the Chrome trace (done once, when a load with ``trace="x.json"`` ends)."""
    import fastload

    trace = fastload.Trace(otel=False)
    fastload.load(path, config=config, trace=trace)
    saves, summaries = [], []
    for _ in range(5):
        start = time.perf_counter()
        trace.save(out)
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        trace.summary()
        summaries.append(time.perf_counter() - start)
    return {"chunks": len(trace.chunks), "save_s": statistics.median(saves), "bytes": out.stat().st_size,
            "summary_s": statistics.median(summaries)}


def call_costs(batches: int = 200, per_batch: int = 1000) -> dict:
    """Seconds per trace call, in batches the size of a large load (a fresh Trace per batch)."""
    from fastload.plan import ChunkRead
    from fastload.trace import ReadRecord, Trace

    chunk = ChunkRead(0, 0, 0, 1 << 20, ())

    def per_call(body) -> float:
        times = []
        for _ in range(batches):
            trace = Trace(otel=False)
            start = time.perf_counter()
            body(trace)
            times.append(time.perf_counter() - start)
        return statistics.median(times) / per_batch

    def counts(trace):
        for _ in range(per_batch):
            trace.count("bytes_fetched", 65536, key="http://host/model.safetensors")

    def intervals(trace):
        for _ in range(per_batch):
            trace.interval("fetch", 1.0, 2.0)

    def chunk_records(trace):  # what fetch.py and a transport do per chunk when tracing is on
        now = trace.now
        for _ in range(per_batch):
            record = ReadRecord(chunk, "u", 0, 0.0, now())
            record.started, record.attempts = now(), 1
            record.first_byte = now()
            record.requested, record.filled, record.consumed = 0.0, 0.0, now()
            record.staged = False
            trace.add_read(record)

    costs = {"count_keyed_s": per_call(counts), "interval_s": per_call(intervals),
             "chunk_record_s": per_call(chunk_records)}
    trace = Trace(otel=False)
    chunk_records(trace)
    intervals(trace)
    start = time.perf_counter()
    trace.summary()
    costs["summary_of_1000_chunks_s"] = time.perf_counter() - start
    return costs


def main() -> int:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    import fastload

    with tempfile.TemporaryDirectory(prefix="fastload-trace-bench-") as tmp:
        path = build_checkpoint(Path(tmp), args.size_mb)
        size = path.stat().st_size
        small = fastload.LoadConfig(chunk_bytes=1 << 20)
        no_otel = lambda: fastload.Trace(otel=False)  # noqa: E731
        cases = {  # name: (what the trace is, load arguments)
            "local_direct_16MiB_chunks": (no_otel, {}),
            "local_direct_1MiB_chunks": (no_otel, {"config": small}),
            "local_direct_1MiB_chunks_otel_api_noop": (fastload.Trace, {"config": small}),
            "local_bf16_to_fp16_16MiB_chunks": (no_otel, {"dtype": torch.float16}),
        }
        results = {}
        for name, (make_trace, kwargs) in cases.items():
            results[name] = measure_case(path, args.pairs, make_trace, **kwargs)
            r = results[name]
            print(f"{name:40} chunks {r['chunks']:5d}  off {r['off_s']['median']:.3f} s  on {r['on_s']['median']:.3f}"
                  f" s  wall {r['overhead_pct_median_of_pairs']:+.2f}% (pairs) "
                  f"{r['overhead_pct_of_minimums']:+.2f}% (minimums)  CPU {r['cpu_overhead_pct_of_medians']:+.2f}%")
        export = export_cost(path, small, Path(tmp) / "trace.json")
        print(f"Chrome trace export of {export['chunks']} chunks: {export['save_s'] * 1e3:.1f} ms "
              f"({export['bytes'] / 1e6:.2f} MB), summary {export['summary_s'] * 1e3:.1f} ms")
    costs = call_costs()
    per_chunk = costs["chunk_record_s"] + 2 * costs["interval_s"] + costs["count_keyed_s"]
    worst = results["local_direct_1MiB_chunks"]
    bound = 100 * per_chunk * worst["chunks"] / worst["off_s"]["median"]
    print(f"per-chunk trace calls ~{per_chunk * 1e6:.2f} us -> {bound:.3f}% of the 1 MiB-chunk load "
          f"(calls only, no contention)")
    report = {
        "what": "fastload.load with trace=None vs trace=fastload.Trace(), local file in page cache",
        "command": f"python benchmarks/bench_trace_overhead.py --size-mb {args.size_mb} --pairs {args.pairs}",
        "checkpoint_bytes": size,
        "pairs": args.pairs,
        "malloc_env": MALLOC_ENV,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "fastload": fastload.__version__,
                    "opentelemetry_api_installed": importlib.util.find_spec("opentelemetry") is not None},
        "cases": results,
        "call_costs": costs,
        "export": export,
        "per_chunk_trace_cost_s": per_chunk,
        "calls_bound_pct_of_1MiB_chunk_load": bound,
        "budget_pct": 2.0,
        "load_average_1_5_15_min_at_end": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
