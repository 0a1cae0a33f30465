"""Core benchmark: fastload vs safetensors / download-then-load and the raw limits.

    .venv/bin/python benchmarks/bench_core.py [--size-gb 2.47] [--runs 3]
        [--only local,http,s3] [--loaders fastload,curl,...] [--out benchmarks/results]

The issue-2 comparison, run by the harness in `fastload.bench` (the same rows
`fastload bench` measures, restricted to the core loaders: fastload,
safetensors, raw_readinto, cat, curl, download_then_load). Writes OUT/core.jsonl,
OUT/core.md and OUT/core.png. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: use this checkout's `fastload`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastload.bench.suite import Options, run  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = BENCH_DIR / "work"
GROUPS = {"local": ("local-warm", "local-cold"), "http": ("http",), "s3": ("s3",)}
CORE_LOADERS = frozenset({"fastload", "safetensors", "download_then_load"})  # + each row's raw limits


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.47, help="checkpoint size (default 2.47)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per loader (plus 1 warm-up)")
    ap.add_argument("--only", default=",".join(GROUPS), help="comma list of local,http,s3")
    ap.add_argument("--loaders", default="", help="comma list; default: the core loaders")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="where core.jsonl/core.md go")
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
    args.loaders = frozenset(x for x in args.loaders.split(",") if x) or CORE_LOADERS
    args.fastload_config = json.loads(args.fastload_config)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    return run(Options(size_gb=args.size_gb, sources=tuple(s for g in args.only for s in GROUPS[g]),
                       loaders=args.loaders, runs=args.runs, out=args.out, name="core",
                       work_dir=args.work_dir, http_server="nginx",
                       sendfile={"on": (True,), "off": (False,), "both": (True, False)}[args.sendfile],
                       quiet_wait_s=args.quiet_wait, fastload_config=args.fastload_config,
                       command=shlex.join(["python", "benchmarks/bench_core.py",
                                           *(sys.argv[1:] if argv is None else argv)])))


if __name__ == "__main__":
    main()
