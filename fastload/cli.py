"""The ``fastload`` command line: argv -> library calls.

Each subcommand is one ``(name, help, add_arguments, run)`` entry in
``commands()``. Errors are one clear line on stderr and a non-zero exit status;
``--debug`` shows the traceback. Environment variables are read here only,
through ``config.from_env``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NamedTuple

from .errors import FastloadError
from .redact import printable


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads or fetches."""
    parser.add_argument("--concurrency", type=int, help="ranged reads in flight at once")
    parser.add_argument("--chunk-size", help="bytes per ranged read, e.g. 16MiB")
    parser.add_argument("--direct-io", action="store_true", default=None,
                        help="read local bytes that are not in the page cache with O_DIRECT (faster cold loads)")
    parser.add_argument("--anonymous", action="store_true", default=None,
                        help="read s3:// sources without credentials (a public bucket)")


def config_from_args(args: argparse.Namespace):
    from .config import ConfigError, LoadConfig, S3Options, from_env, parse_size

    chunk = parse_size(args.chunk_size) if getattr(args, "chunk_size", None) is not None else None
    for flag, name, value in (("--concurrency", "max_concurrency", getattr(args, "concurrency", None)),
                              ("--chunk-size", "chunk_bytes", chunk)):
        try:  # a value refused on its own: the message names the flag typed, not the config field
            if value is not None:
                LoadConfig(**{name: value})
        except ConfigError as exc:
            if "two chunks" not in str(exc):  # (with host_buffer_bytes: the whole config's message says it)
                typed = args.chunk_size if flag == "--chunk-size" else value
                raise ConfigError(f"{flag} {typed}: {exc}") from None
    s3 = S3Options(anonymous=True) if getattr(args, "anonymous", None) else None
    return from_env(max_concurrency=getattr(args, "concurrency", None), chunk_bytes=chunk,
                    direct_io=getattr(args, "direct_io", None), s3=s3,
                    verify_checksums=True if getattr(args, "verify", None) else None)


# -- inspect ---------------------------------------------------------------------------------------

def _count(text: str) -> int:
    """A whole number >= 0, for argparse."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _inspect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="path, file://, http(s)://, s3:// or hf:// source")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--top", type=_count, default=10, help="how many of the largest tensors to list (default 10)")
    parser.add_argument("--all", action="store_true", help="also list every tensor")
    add_config_arguments(parser)


def _inspect(args: argparse.Namespace) -> int:
    from .api import plan
    from .describe import describe

    p = plan(args.source, config=config_from_args(args))
    print(p.to_json(indent=2) if args.json else describe(p, top=args.top, every_tensor=args.all))
    return 0


# -- pull ------------------------------------------------------------------------------------------

def _pull_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="hf://org/name[@rev], s3:// prefix, http(s):// base URL, path, or one file")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--to", metavar="DIR", help="a plain directory (default for non-hf sources: ./<name>)")
    where.add_argument("--cache-dir", metavar="DIR", help="hf:// only: the hub cache (default HF_HUB_CACHE)")
    parser.add_argument("--revision", help="hf:// only: branch, tag or commit (default main)")
    parser.add_argument("--verify", action="store_true", help="check the sha256 the source publishes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    add_config_arguments(parser)


def _pull(args: argparse.Namespace) -> int:
    from . import runner
    from .describe import human_bytes
    from .pull import apull

    bar = None
    show = not args.quiet and sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                       desc="pull", dynamic_ncols=True)
        else:
            bar.update(done - bar.n)

    try:
        result = runner.run(lambda: apull(args.source, to=args.to, cache_dir=args.cache_dir, revision=args.revision,
                                          config=config_from_args(args), progress=progress if show else None,
                                          verify=args.verify))
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        removed = f", {len(result.removed)} removed (gone from the source)" if result.removed else ""
        print(f"{len(result.fetched)} file(s) fetched ({human_bytes(result.bytes_fetched)}), "
              f"{len(result.present)} already complete{removed}", file=sys.stderr)
    print(printable(str(result.path)))
    return 0


# -- load ------------------------------------------------------------------------------------------

def _load_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="path, file://, http(s)://, s3:// or hf:// source")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--dtype", help="convert floating-point tensors, e.g. bfloat16")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="load only these tensors")
    parser.add_argument("--trace", metavar="OUT.json", help="write a Chrome trace (Perfetto, chrome://tracing)")
    parser.add_argument("--json", action="store_true", help="print the trace summary as JSON")
    parser.add_argument("--verify", action="store_true",
                        help="check each file whole against the sha256 its source publishes, as it streams")
    add_config_arguments(parser)


def _load(args: argparse.Namespace) -> int:
    import json
    from collections import Counter

    from .api import load
    from .redact import redact_url
    from .trace import Trace

    if args.trace is not None:  # (--trace "" too: refused before the load, by Trace)
        args.trace = os.path.expanduser(args.trace)  # (a shell leaves --trace=~/t.json as it is)
    trace = Trace(args.trace)
    tensors = load(args.source, device=args.device, dtype=args.dtype, names=args.names,
                   config=config_from_args(args), trace=trace)
    summary = trace.summary()
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
        kinds = ", ".join(f"{n} {d}" for d, n in dtypes.most_common())
        print(f"loaded {len(tensors)} tensor(s), {nbytes / 1e6:.1f} MB ({kinds or 'none'}) onto {args.device} "
              f"from {printable(redact_url(args.source))}")
        print(summary.table())
    if args.trace:
        print(f"trace written to {printable(args.trace)}", file=sys.stderr)
    return 0


# -- bench -----------------------------------------------------------------------------------------

def _bench_args(parser: argparse.ArgumentParser) -> None:
    from .bench.command import add_arguments

    add_arguments(parser)


def _bench(args: argparse.Namespace) -> int:
    from .bench.command import run

    return run(args)


def commands() -> list[Command]:
    return [
        Command("bench", "benchmark fastload against the other loaders on local disk, HTTP and S3", _bench_args,
                _bench),
        Command("inspect", "print what a load would fetch (headers only)", _inspect_args, _inspect),
        Command("load", "load a checkpoint and show where the time went", _load_args, _load),
        Command("pull", "pre-stage a model directory on local disk (hf:// into the hub cache)", _pull_args,
                _pull),
    ]


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastload", description="Fast, explainable LLM cold starts.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"fastload {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands():
        p = sub.add_parser(command.name, help=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def _own_streams() -> bool:
    """Make stdout and stderr safe to write, as a command line tool's are: names any checkpoint may hold are
    escaped where the terminal's encoding cannot show them (``PYTHONIOENCODING=ascii``, a latin-1 locale) instead
    of ending in UnicodeEncodeError; a closed stderr (``2>&-``) swallows messages instead of Python sending
    ``print(file=None)`` to stdout, among the machine-readable output. False if stdout is closed (``>&-``)."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    return sys.stdout is not None


def _drop_unwritable_stdout() -> None:
    """After an error: if what stdout holds cannot be written (a full disk, ``> /dev/full``), let it go, so that
    the interpreter's flush at exit does not fail a second time, with a traceback and status 120."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not _own_streams():
        print("fastload: error: stdout is closed", file=sys.stderr)
        return 1
    try:
        status = args._run(args)
        sys.stdout.flush()  # here, not at exit: a reader that left (| true) is then a BrokenPipeError we handle
        return status
    except KeyboardInterrupt:
        print("fastload: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (| head): no message, the status of a tool SIGPIPE ended
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail too
        return 128 + 13
    except (FastloadError, OSError) as exc:  # OSError: e.g. a destination that cannot be written
        if args.debug:
            raise
        print(f"fastload: error: {printable(str(exc))}", file=sys.stderr)  # one line, whatever a file name holds
        _drop_unwritable_stdout()
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
