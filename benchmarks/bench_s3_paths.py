"""Which S3 read path is faster: presigned GETs through fastload's HTTP reader (bodies on its
threaded engine, the default, or on aiohttp), or s3fs?

The core issue asked to measure both and keep the faster. Every path reads the
same plan (same chunks, same concurrency) from the same SeaweedFS object into
preallocated tensors, alternating, in one process that keeps its freed memory
(run it through ``main`` below, which re-executes itself with the malloc
settings). Writes ``benchmarks/results/s3_paths.json``.

    .venv/bin/python benchmarks/bench_s3_paths.py [--size-gb 0.53] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
              "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.mxfast=0"}


def s3fs_load(url: str, config) -> float:
    """Read every tensor of ``url`` with s3fs ranged reads (same chunks as fastload), copy into tensors."""
    import s3fs
    import torch

    import fastload

    plan = fastload.plan(url, config=config)
    outputs = [torch.empty(t.shape, dtype=getattr(torch, t.spec.dtype.torch_name)) for t in plan.tensors]
    views = [memoryview(o.reshape(-1).view(torch.uint8).numpy()) for o in outputs]

    async def run() -> None:
        fs = s3fs.S3FileSystem(asynchronous=True)
        session = await fs.set_session()
        sem = asyncio.Semaphore(config.max_concurrency)

        async def one(chunk) -> None:
            path = plan.files[chunk.file].info.url[len("s3://"):]
            async with sem:
                data = await fs._cat_file(path, start=chunk.start, end=chunk.end)
            for p in chunk.pieces:
                at = p.src - chunk.start
                views[p.tensor][p.dst:p.dst + p.length] = data[at:at + p.length]

        await asyncio.gather(*(one(c) for c in plan.chunks))
        await session.close()

    start = time.perf_counter()
    asyncio.run(run())
    return time.perf_counter() - start


def fastload_load(url: str, config) -> float:
    import fastload

    start = time.perf_counter()
    fastload.load(url, config=config)
    return time.perf_counter() - start


def child(url: str, runs: int, nbytes: int) -> dict:
    import fastload

    config = fastload.LoadConfig()
    paths = {"fastload_presigned_threads": (fastload_load, config),
             "fastload_presigned_aiohttp": (fastload_load, config.replace(http_engine="aiohttp")),
             "s3fs_cat_file": (s3fs_load, config)}
    for fn, cfg in paths.values():  # warm-up: connections, first-touch memory
        fn(url, cfg)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(runs):  # alternate, so drift hits every path alike
        for name, (fn, cfg) in paths.items():
            times[name].append(fn(url, cfg))
    return {name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                   "gbps": nbytes / statistics.median(ts) / 1e9, "runs": ts} for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=0.53)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        url, nbytes = args.child.rsplit("|", 1)
        print(json.dumps(child(url, args.runs, int(nbytes))))
        return

    from fastload.bench.checkpoint import ensure_checkpoint
    from fastload.bench.servers import seaweedfs

    ckpt = ensure_checkpoint(args.size_gb)
    with seaweedfs() as s3:
        url = s3.upload(ckpt.dir, "paths", "ckpt/")
        env = {**os.environ, **s3.env(), **MALLOC_ENV}
        out = subprocess.run([sys.executable, __file__, "--runs", str(args.runs), "--child",
                              f"{url}|{ckpt.total_bytes}"], env=env, capture_output=True, text=True, check=True)
    result = {"checkpoint_bytes": ckpt.total_bytes, "server": "SeaweedFS (weed server -s3) on 127.0.0.1",
              "runs": args.runs, "paths": json.loads(out.stdout.strip().splitlines()[-1])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "s3_paths.json").write_text(json.dumps(result, indent=2))
    for name, r in result["paths"].items():
        print(f"{name:<28} median {r['median_s']:.3f} s  {r['gbps']:.2f} GB/s  (min {r['min_s']:.3f}, max {r['max_s']:.3f})")


if __name__ == "__main__":
    main()
