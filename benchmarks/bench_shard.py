"""What a tensor-parallel rank's share costs next to loading the whole checkpoint.

    python benchmarks/bench_shard.py [--size-mb 512] [--world 8] [--runs 7]

A Llama-70B-like layer mix at a smaller size: o_proj-like (8192 x 1024) and
down_proj-like (1024 x 7168) bf16 matrices, in one local file, warm page cache.
Cases, each timed as the median of ``--runs`` after one warm-up, in turn so
that drift on a shared machine hits them alike:

- ``whole``: the full checkpoint (the baseline);
- ``dim0``: one rank's rows (contiguous: a read per rank share);
- ``dim1``: one rank's columns (row-parallel layers): rows of 256 B (o_proj)
  and 1.8 KB (down_proj), 2 KB and 14 KB apart: read as whole spans, rows
  picked out by one strided copy per piece;
- ``dim1 wide``: the same on 1024 x 131072 matrices, whose rows lie 256 KiB
  apart: read row by row, straight into the output.

Reported: seconds, GB/s of the rank's bytes, bytes read (trace), and the ratio
to the whole load. Before the strided pieces (one Python object, one read and
one memoryview per row) ``dim1`` was 5-13x slower than ``whole`` in the
audit that found it. Re-executes itself with glibc settings that keep freed
memory in the process (see benchmarks/README.md). Writes
``benchmarks/results/shard.json`` and ``shard.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
RESULTS = Path(__file__).resolve().parent / "results"


def build(directory: Path, size_mb: int, wide: bool) -> Path:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    shapes = [(1024, 131072)] if wide else [(8192, 1024), (1024, 7168)]
    tensors, total, i = {}, 0, 0
    while total < size_mb * 1e6:
        for rows, cols in shapes:
            tensors[f"model.layers.{i}.proj{len(tensors)}.weight"] = (
                torch.randn(rows, cols, generator=g).to(torch.bfloat16))
            total += rows * cols * 2
        i += 1
    path = directory / ("wide.safetensors" if wide else "model.safetensors")
    save_file(tensors, str(path))
    return path


def run(args: argparse.Namespace) -> dict:
    import fastload

    results: dict = {"cases": {}}
    with tempfile.TemporaryDirectory(prefix="fastload-bench-shard-") as tmp:
        narrow = build(Path(tmp), args.size_mb, wide=False)
        wide = build(Path(tmp), args.size_mb, wide=True)
        cases = {
            "whole": (narrow, None),
            "dim0": (narrow, fastload.Shard(args.world - 1, args.world, {"proj": 0})),
            "dim1": (narrow, fastload.Shard(args.world - 1, args.world, {"proj": 1})),
            "whole wide": (wide, None),
            "dim1 wide": (wide, fastload.Shard(args.world - 1, args.world, {"proj": 1})),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        info: dict[str, dict] = {}
        for round_ in range(args.runs + 1):  # the first round warms page cache and allocator
            for name, (path, shard) in cases.items():
                trace = fastload.Trace(otel=False)
                start = time.perf_counter()
                out = fastload.load(path, shard=shard, trace=trace)
                seconds = time.perf_counter() - start
                if round_:
                    times[name].append(seconds)
                info[name] = {"output_bytes": sum(t.nbytes for t in out.values()),
                              "bytes_fetched": trace.summary().bytes_fetched, "chunks": len(trace.chunks)}
                del out
        for name in cases:
            median = statistics.median(times[name])
            base = statistics.median(times["whole wide" if "wide" in name else "whole"])
            results["cases"][name] = {**info[name], "median_s": median, "runs_s": times[name],
                                      "gbps": info[name]["output_bytes"] / median / 1e9,
                                      "x_whole": median / base}
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "fastload": fastload.__version__}
    results["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    return results


def markdown(results: dict) -> str:
    lines = [f"# Tensor-parallel shares, rank {results['args']['world'] - 1} of {results['args']['world']}",
             "", f"{results['machine']}", "",
             "| case | median s | GB/s (rank's bytes) | bytes read | reads | x whole |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, c in results["cases"].items():
        lines.append(f"| {name} | {c['median_s']:.4f} | {c['gbps']:.2f} | {c['bytes_fetched']:,} | {c['chunks']} | "
                     f"{c['x_whole']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):  # keep freed memory in the process
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **MALLOC_ENV}))
    out: Path = args.out
    results = run(args)
    results["args"]["out"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shard.json").write_text(json.dumps(results, indent=1))
    (out / "shard.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
