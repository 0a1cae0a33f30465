"""The ``fastload`` command line: argv -> library calls.

Each subcommand is one ``(name, help, add_arguments, run)`` entry in
``commands()``. Errors are one clear line on stderr and a non-zero exit status;
``--debug`` shows the traceback. Environment variables are read here only,
through ``config.from_env``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NamedTuple

from .errors import FastloadError


class Command(NamedTuple):
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads or fetches."""
    parser.add_argument("--concurrency", type=int, help="ranged reads in flight at once")
    parser.add_argument("--chunk-size", help="bytes per ranged read, e.g. 16MiB")


def config_from_args(args: argparse.Namespace):
    from .config import from_env, parse_size

    chunk = parse_size(args.chunk_size) if getattr(args, "chunk_size", None) else None
    return from_env(max_concurrency=getattr(args, "concurrency", None), chunk_bytes=chunk)


# -- inspect ---------------------------------------------------------------------------------------

def _inspect_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="path, file://, http(s)://, s3:// or hf:// source")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_config_arguments(parser)


def _inspect(args: argparse.Namespace) -> int:
    from .api import plan

    p = plan(args.source, config=config_from_args(args))
    print(p.to_json(indent=2) if args.json else p)
    return 0


def commands() -> list[Command]:
    return [
        Command("inspect", "print what a load would fetch (headers only)", _inspect_args, _inspect),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastload", description="Fast, explainable LLM cold starts.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands():
        p = sub.add_parser(command.name, help=command.help)
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args)
    except KeyboardInterrupt:
        print("fastload: interrupted", file=sys.stderr)
        return 130
    except FastloadError as exc:
        if args.debug:
            raise
        print(f"fastload: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
