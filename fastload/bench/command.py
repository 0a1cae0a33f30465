"""``fastload bench``: argv -> `suite.Options` -> `suite.run`; prints the Markdown table."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

SOURCES = ("local-warm", "local-cold", "http", "s3")  # = suite.SOURCES (not imported: it is heavier)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?",
                        help="a real checkpoint: local path (every source), or an http(s):// or s3:// URL "
                             "(that source only); default: a synthetic Llama-shaped one")
    parser.add_argument("--synthetic", metavar="SIZE",
                        help="build (and cache) a Llama-shaped bf16 checkpoint of SIZE, e.g. 48MiB, 2.3GiB "
                             "(default when no SOURCE: 2.47 GB)")
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help=f"comma list of {','.join(SOURCES)} (default: all)")
    parser.add_argument("--loaders", default="",
                        help="comma list (default: all): fastload, fastload_direct, fastload_from_pretrained, "
                             "safetensors, transformers, runai, fastsafetensors, tensorizer, download_then_load; "
                             "each source's raw limit (raw_readinto, raw_direct, cat, curl) and baseline always run")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per loader, after 1 warm-up (default 3)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every loader of a row this many times, in turn, each time in a fresh "
                             "child (warm-up + --runs): spreads each loader's runs over the row's whole time "
                             "(default 1)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"),
                        help="directory for bench.jsonl, bench.md, bench.png (default ./bench-results)")
    parser.add_argument("--name", default="bench", help="file name stem of the outputs (default bench)")
    parser.add_argument("--work-dir", type=Path,
                        help="checkpoint cache and scratch (default ~/.cache/fastload/bench)")
    parser.add_argument("--http-server", choices=("auto", "nginx", "python"), default="auto",
                        help="auto: nginx when installed, else a Python Range server")
    parser.add_argument("--nginx-sendfile", choices=("on", "off", "both"), default="on",
                        help="nginx sendfile (both: two HTTP rows)")
    parser.add_argument("--quiet-wait", type=float, default=30.0,
                        help="before each loader, wait up to this many seconds for the machine to go quiet")
    parser.add_argument("--cold-settle", type=float, default=0.0, metavar="S",
                        help="cold rows: wait S seconds after each eviction, untimed, so the page cache must "
                             "take memory the host has reclaimed, as on a machine that has not just read the "
                             "files (this VM: ~2 s; default 0)")
    parser.add_argument("--fastload-config", default="{}",
                        help='JSON of extra LoadConfig kwargs, e.g. \'{"max_concurrency": 16}\'')


def options_from_args(args: argparse.Namespace):
    from ..config import parse_size
    from ..errors import ConfigError
    from .suite import DEFAULT_SIZE_GB, Options

    sources = tuple(s for s in args.sources.split(",") if s)
    if bad := sorted(set(sources) - set(SOURCES)):
        raise ConfigError(f"--sources: unknown {bad} (choose from {', '.join(SOURCES)})")
    if args.source and args.synthetic:
        raise ConfigError("give either SOURCE or --synthetic, not both")
    if args.runs < 1:
        raise ConfigError("--runs must be at least 1")
    if args.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    if args.cold_settle < 0:
        raise ConfigError("--cold-settle must not be negative")
    try:
        extra = json.loads(args.fastload_config)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--fastload-config is not JSON: {exc}") from exc
    size_gb = parse_size(args.synthetic) / 1e9 if args.synthetic else DEFAULT_SIZE_GB
    loaders = frozenset(x for x in args.loaders.split(",") if x) or None
    from .loaders import registry
    if loaders and (bad := sorted(loaders - set(registry()))):
        raise ConfigError(f"--loaders: unknown {bad} (choose from {', '.join(registry())})")
    return Options(source=args.source, size_gb=size_gb, sources=sources, loaders=loaders, runs=args.runs,
                   rounds=args.rounds, out=args.out, name=args.name, work_dir=args.work_dir,
                   http_server=args.http_server,
                   sendfile={"on": (True,), "off": (False,), "both": (True, False)}[args.nginx_sendfile],
                   quiet_wait_s=args.quiet_wait, cold_settle_s=args.cold_settle, fastload_config=extra,
                   command=command_line(args))


def command_line(args: argparse.Namespace) -> str:
    """The `fastload bench ...` that reproduces this run (options left at their defaults omitted)."""
    defaults = {"synthetic": None, "sources": ",".join(SOURCES), "loaders": "", "runs": 3, "rounds": 1,
                "out": Path("bench-results"), "name": "bench", "work_dir": None, "http_server": "auto",
                "nginx_sendfile": "on", "quiet_wait": 30.0, "cold_settle": 0.0, "fastload_config": "{}"}
    words = ["fastload", "bench"] + ([args.source] if args.source else [])
    for key, default in defaults.items():
        value = getattr(args, key)
        if value != default:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(words)


def run(args: argparse.Namespace) -> int:
    from .suite import run as run_suite

    opts = options_from_args(args)
    records = run_suite(opts)
    print((opts.out / f"{opts.name}.md").read_text())
    return 1 if any("error" in r for r in records) else 0
