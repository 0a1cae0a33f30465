"""The one GPU check: the GPU tests and a local-file-to-GPU throughput benchmark, in under 8 minutes.

    benchmarks/gpu_check.sh                  # from the repo root, on a machine with CUDA
    python3 benchmarks/gpu_check.py --out results.json [--size-gb 4] [--runs 3] [--skip-tests]
    python3 benchmarks/gpu_check.py --cpu-dry-run --size-gb 0.3   # checks the script itself, no GPU

Steps, each skipped once the time budget (7.5 min) is close to spent, no network needed:
  1. pytest tests/test_gpu.py tests/test_cuda_sink.py (the gpu tests and the CPU ordering tests)
  2. a Llama-shaped bf16 checkpoint (benchmarks/checkpoint.py), read once so the page cache is warm
  3. pinned host-to-device bandwidth: one 1 GiB copy, and 16 MiB copies round-robin over 4 streams
  4. fastload.load(device="cuda") under a few configs, with trace stages and the fetch/copy overlap
  5. safetensors.torch.load_file(device="cuda"), shard by shard
  6. fastload to the CPU (the host-side read ceiling on this machine)
  7. many small tensors (MoE-like): fastload vs safetensors, copies issued per second, and a micro-benchmark
     of per-tensor copies vs one H2D plus one batched on-device scatter (the csrc/README.md question)
Results: one JSON file (--out) and the same table in Markdown, printed and written beside it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `fastload` and `benchmarks` importable
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import fastload  # noqa: E402
from fastload.bench.checkpoint import ensure_checkpoint  # noqa: E402
from fastload.trace import union_seconds  # noqa: E402

WORK_DIR = REPO / "benchmarks" / "work"
BUDGET_S = 450.0
MiB = 1 << 20
CONFIGS = {  # name -> LoadConfig overrides
    "default": {},
    "threads16": {"local_threads": 16, "max_concurrency": 32},
    "chunk64M": {"chunk_bytes": 64 * MiB, "host_buffer_bytes": 1024 * MiB, "local_threads": 16,
                 "max_concurrency": 32},
}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, runs: int, warmup: int = 1) -> dict:
    """Median/best seconds of ``fn()`` (results dropped before the next run)."""
    times, extra = [], {}
    for i in range(warmup + runs):
        gc.collect()
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        elapsed = time.perf_counter() - start
        if isinstance(out, tuple):
            out, extra = out
        del out
        if i >= warmup:
            times.append(elapsed)
    return {"runs_s": times, "median_s": statistics.median(times), "best_s": min(times), **extra}


# -- steps -------------------------------------------------------------------------------------------------


def run_tests(timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={junit}",
               "tests/test_gpu.py", "tests/test_cuda_sink.py"]
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            output, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output, rc = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMED OUT after {timeout:.0f} s", -1
        result = {"command": " ".join(cmd[2:]), "returncode": rc, "seconds": time.monotonic() - start,
                  "output_tail": output[-4000:]}
        if junit.exists():
            cases = ET.parse(junit).getroot().iter("testcase")
            outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
            for case in cases:
                name = f"{case.get('classname')}::{case.get('name')}"
                kind = ("failed" if case.find("failure") is not None or case.find("error") is not None
                        else "skipped" if case.find("skipped") is not None else "passed")
                outcomes[kind].append(name)
            result.update({k: len(v) for k, v in outcomes.items()}, failures=outcomes["failed"],
                          skipped_tests=outcomes["skipped"])
    return result


def warm(paths: list[Path]) -> float:
    start, total = time.perf_counter(), 0
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while chunk := f.read(64 * MiB):
                total += len(chunk)
    return total / (time.perf_counter() - start) / 1e9


def pinned_h2d(nbytes: int = 1 << 30, runs: int = 5) -> dict:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(7)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    one = timed(lambda: dev.copy_(host, non_blocking=True), "cuda", runs)
    streams = [torch.cuda.Stream() for _ in range(4)]
    step = 16 * MiB

    def chunked():
        for i, at in enumerate(range(0, nbytes, step)):
            with torch.cuda.stream(streams[i % 4]):
                dev[at:at + step].copy_(host[at:at + step], non_blocking=True)
        for s in streams:
            s.synchronize()

    many = timed(chunked, "cuda", runs)
    del host, dev
    return {"bytes": nbytes, "one_copy_gbps": nbytes / one["best_s"] / 1e9,
            "chunked_4_streams_gbps": nbytes / many["best_s"] / 1e9,
            "gbps": nbytes / min(one["best_s"], many["best_s"]) / 1e9}


def overlap(trace: fastload.Trace) -> dict:
    chunks = [c for c in trace.chunks if c.get("filled") is not None and c.get("consumed") is not None]
    fetch = [(c["requested"], c["filled"]) for c in chunks]
    copy = [(c["filled"], c["consumed"]) for c in chunks]
    f, c, both = union_seconds(fetch), union_seconds(copy), union_seconds(fetch + copy)
    return {"fetch_s": f, "copy_s": c, "fetch_and_copy_s": f + c - both,
            "copy_share_overlapped": (f + c - both) / c if c else 0.0}


def fastload_run(source, device: str, config: fastload.LoadConfig, runs: int, nbytes: int) -> dict:
    last: dict = {}

    def once():
        trace = fastload.Trace()
        out = fastload.load(source, device=device, config=config, trace=trace)
        last["trace"] = trace
        return out

    result = timed(once, device, runs)
    summary = last["trace"].summary()
    result.update(gbps=nbytes / result["median_s"] / 1e9, best_gbps=nbytes / result["best_s"] / 1e9,
                  stages={k: round(v, 4) for k, v in summary.stages.items()},
                  counters={k: v for k, v in summary.counters.items() if isinstance(v, (int, float))},
                  overlap=overlap(last["trace"]))
    return result


def safetensors_run(files: list[Path], device: str, runs: int, nbytes: int) -> dict:
    from safetensors.torch import load_file

    def once():
        out = {}
        for f in files:
            out.update(load_file(str(f), device=device))
        return out

    result = timed(once, device, runs)
    result.update(gbps=nbytes / result["median_s"] / 1e9, best_gbps=nbytes / result["best_s"] / 1e9)
    return result


def scatter_microbench(pieces: int = 1024, piece_bytes: int = 16 * 1024, rounds: int = 20) -> dict:
    """One staged 16 MiB chunk of small tensors to the GPU: per-tensor copies vs one H2D + one batched scatter."""
    host = torch.empty(pieces * piece_bytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(3)
    dsts = [torch.empty(piece_bytes, dtype=torch.uint8, device="cuda") for _ in range(pieces)]
    srcs = [host[i * piece_bytes:(i + 1) * piece_bytes] for i in range(pieces)]
    stage = torch.empty_like(host, device="cuda")
    stage_views = [stage[i * piece_bytes:(i + 1) * piece_bytes] for i in range(pieces)]

    def per_tensor():
        for _ in range(rounds):
            for d, s in zip(dsts, srcs):
                d.copy_(s, non_blocking=True)

    def staged_scatter():
        for _ in range(rounds):
            stage.copy_(host, non_blocking=True)
            torch._foreach_copy_(dsts, stage_views)

    nbytes = rounds * pieces * piece_bytes
    out = {"pieces": pieces, "piece_bytes": piece_bytes}
    for name, fn in (("per_tensor_copy", per_tensor), ("h2d_then_foreach_copy", staged_scatter)):
        r = timed(fn, "cuda", 3)
        out[name] = {"gbps": nbytes / r["median_s"] / 1e9, "copies_per_s": rounds * pieces / r["median_s"]}
    return out


def many_small_checkpoint(work: Path, count: int, shape: tuple[int, int]) -> Path:
    from safetensors.torch import save_file

    path = work / f"moe-{count}x{shape[0]}x{shape[1]}.safetensors"
    if not path.exists():
        gen = torch.Generator().manual_seed(0)
        tensors = {f"model.layers.{i // 256}.mlp.experts.{i % 256}.w": torch.randn(shape, generator=gen)
                   .to(torch.bfloat16) for i in range(count)}
        save_file(tensors, str(path) + ".partial")
        os.replace(str(path) + ".partial", path)
    return path


# -- report ------------------------------------------------------------------------------------------------


def table(results: dict) -> str:
    rows = ["| what | GB/s (median) | best | vs pinned H2D | notes |", "| --- | ---: | ---: | ---: | --- |"]
    h2d = results.get("pinned_h2d", {}).get("gbps")

    def row(name: str, r: dict | None, notes: str = "") -> None:
        if not r:
            return
        share = f"{r['gbps'] / h2d * 100:.0f}%" if h2d else "-"
        rows.append(f"| {name} | {r['gbps']:.2f} | {r['best_gbps']:.2f} | {share} | {notes} |")

    if h2d:
        p = results["pinned_h2d"]
        rows.append(f"| pinned H2D (1 copy / 16 MiB x 4 streams) | {h2d:.2f} | {h2d:.2f} | 100% | "
                    f"{p['one_copy_gbps']:.1f} / {p['chunked_4_streams_gbps']:.1f} |")
    for name, r in results.get("fastload", {}).items():
        ov = r["overlap"]
        row(f"fastload {results['device']} ({name})", r,
            f"copy overlapped with fetch {ov['copy_share_overlapped'] * 100:.0f}%; "
            f"{r['counters'].get('h2d_copies', 0)} copies")
    row(f"safetensors load_file(device={results['device']})", results.get("safetensors"))
    row("fastload cpu (host read ceiling)", results.get("fastload_cpu"))
    moe = results.get("many_small", {})
    row(f"many small: fastload ({moe.get('tensors')} tensors)", moe.get("fastload"),
        f"{moe.get('copies_per_s', 0):.0f} copies/s" if moe else "")
    row("many small: safetensors", moe.get("safetensors"))
    scatter = results.get("scatter_microbench")
    for name in ("per_tensor_copy", "h2d_then_foreach_copy") if scatter else ():
        r = scatter[name]
        share = f"{r['gbps'] / h2d * 100:.0f}%" if h2d else "-"
        rows.append(f"| 16 MiB of {scatter['piece_bytes'] // 1024} KiB tensors: {name} | {r['gbps']:.2f} | - | "
                    f"{share} | {r['copies_per_s']:.0f} tensors/s |")
    tests = results.get("tests")
    lines = [f"GPU check on {results.get('gpu', 'no GPU')} - torch {results['torch']}, "
             f"checkpoint {results.get('checkpoint_gb', 0):.2f} GB (page cache warm)", ""] + rows
    if tests:
        lines += ["", f"tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
                      f"{tests.get('skipped', 0)} skipped (rc {tests['returncode']}, {tests['seconds']:.0f} s)"]
        lines += [f"  FAILED {name}" for name in tests.get("failures", [])]
    goal = results.get("goal")
    if goal:
        lines += ["", f"goal (>= 80% of pinned H2D end to end): {goal}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    ap.add_argument("--size-gb", type=float, default=4.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--small-tensors", type=int, default=20000)
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the steps on the CPU (checks this script)")
    ap.add_argument("--work-dir", type=Path, default=WORK_DIR)
    args = ap.parse_args(argv)
    budget = Budget(BUDGET_S)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (use --cpu-dry-run to check the script)", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu_dry_run else "cuda"
    results: dict = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
                     "python": platform.python_version(), "cpus": os.cpu_count(), "started": time.time()}
    if device == "cuda":
        results["gpu"] = torch.cuda.get_device_name(0)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=2, default=str))
        args.out.with_suffix(".md").write_text(table(results) + "\n")

    def step(name: str, need_s: float, fn) -> None:
        if budget.left() < need_s:
            results.setdefault("skipped_steps", []).append(f"{name} (time budget)")
            return
        print(f"[{BUDGET_S - budget.left():6.1f} s] {name} ...", flush=True)
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - record the failure, keep the other steps
            results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        save()

    if not args.skip_tests:
        step("tests", 60, lambda: results.__setitem__("tests", run_tests(min(240.0, budget.left() - 150))))

    ckpt_box: dict = {}

    def checkpoint() -> None:
        ckpt = ckpt_box["ckpt"] = ensure_checkpoint(args.size_gb, args.work_dir)
        results.update(checkpoint=str(ckpt.dir), checkpoint_gb=ckpt.total_bytes / 1e9,
                       page_cache_read_gbps=warm(ckpt.files))

    step("checkpoint", 60, checkpoint)
    if device == "cuda":
        step("pinned_h2d", 20, lambda: results.__setitem__("pinned_h2d", pinned_h2d()))
    if "ckpt" in ckpt_box:
        ckpt = ckpt_box["ckpt"]
        nbytes = ckpt.tensor_bytes
        results["fastload"] = {}
        for name, overrides in CONFIGS.items():
            config = fastload.LoadConfig(**overrides)
            step(f"fastload:{name}", 30, lambda c=config, n=name: results["fastload"].__setitem__(
                n, {**fastload_run(ckpt.dir, device, c, args.runs, nbytes), "config": CONFIGS[n]}))
        step("safetensors", 40, lambda: results.__setitem__(
            "safetensors", safetensors_run(ckpt.files, device, args.runs, nbytes)))
        if device == "cuda":
            step("fastload_cpu", 30, lambda: results.__setitem__(
                "fastload_cpu", fastload_run(ckpt.dir, "cpu", fastload.LoadConfig(**CONFIGS["threads16"]),
                                             args.runs, nbytes)))

    def many_small() -> None:
        path = many_small_checkpoint(args.work_dir, args.small_tensors, (64, 128))
        nbytes = args.small_tensors * 64 * 128 * 2
        warm([path])
        fl = fastload_run(path, device, fastload.LoadConfig(), args.runs, nbytes)
        st = safetensors_run([path], device, args.runs, nbytes)
        results["many_small"] = {"tensors": args.small_tensors, "bytes": nbytes, "fastload": fl, "safetensors": st,
                                 "copies_per_s": fl["counters"].get("h2d_copies", 0) / fl["median_s"]}

    step("many_small", 45, many_small)
    if device == "cuda":
        step("scatter_microbench", 20, lambda: results.__setitem__("scatter_microbench", scatter_microbench()))
    best = max((r["gbps"] for r in results.get("fastload", {}).values()), default=None)
    h2d = results.get("pinned_h2d", {}).get("gbps")
    if best and h2d:
        results["goal"] = f"{'MET' if best >= 0.8 * h2d else 'NOT MET'}: best fastload {best:.1f} GB/s = " \
                          f"{best / h2d * 100:.0f}% of {h2d:.1f} GB/s"
    results["seconds"] = BUDGET_S - budget.left()
    save()
    print(table(results))
    print(f"\nresults: {args.out} and {args.out.with_suffix('.md')}")
    tests = results.get("tests", {})
    return 1 if tests.get("returncode") not in (None, 0) or results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
