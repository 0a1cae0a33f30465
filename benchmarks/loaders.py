"""The loaders a benchmark row compares, all with one signature:

    loader(source: Source, info: dict) -> dict[str, torch.Tensor] | int

A loader returns the tensors it produced (the harness then touches every page)
or, for raw transfer limits that produce no tensors (curl, cat), the number of
bytes moved. `info` is a per-run dict a loader may fill with extra facts
(fastload's trace stages); it ends up in the run record.

`get(name)` returns the loader; `all_loaders()` maps every name to its loader.
Which loaders apply to which source is decided by the rows in bench_core.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Source:
    """Where one checkpoint lives; JSON-serialisable so a child process can rebuild it."""

    kind: str                      # "local" | "http" | "s3"
    root: str                      # dir path, "http://host:port/", or "s3://bucket/prefix/"
    shards: list[str]              # shard file names relative to root
    total_bytes: int               # sum of shard file sizes
    index: str = "model.safetensors.index.json"
    s3: dict = field(default_factory=dict)            # endpoint/access_key/secret_key/region
    scratch: str = ""              # dir for download_then_load temp files
    fastload_config: dict = field(default_factory=dict)  # extra LoadConfig kwargs

    def url(self, name: str) -> str:
        root = self.root if self.root.endswith("/") else self.root + "/"
        return root + name

    def local_paths(self) -> list[Path]:
        return [Path(self.root) / s for s in self.shards]

    def s3_key(self, name: str) -> tuple[str, str]:
        bucket, _, prefix = self.root.removeprefix("s3://").partition("/")
        return bucket, prefix + name

    def boto3_client(self):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.s3["endpoint"],
                            region_name=self.s3.get("region", "us-east-1"),
                            aws_access_key_id=self.s3["access_key"],
                            aws_secret_access_key=self.s3["secret_key"],
                            config=Config(s3={"addressing_style": "path"}))


def _clone_all(tensors: dict) -> dict:
    return {k: v.clone() for k, v in tensors.items()}


def _safetensors_load(paths: list[Path]) -> dict:
    from safetensors.torch import load_file
    out: dict = {}
    for p in paths:
        mapped = load_file(p)          # mmap-backed: nothing read yet
        out.update(_clone_all(mapped))  # clone forces every byte to be read
        del mapped
    return out


# --- fastload ---------------------------------------------------------------

def load_fastload(source: Source, info: dict) -> dict:
    import fastload
    kwargs = dict(source.fastload_config)
    if source.kind == "s3":
        kwargs["s3"] = fastload.S3Options(endpoint_url=source.s3["endpoint"],
                                          region=source.s3.get("region", "us-east-1"))
    config = fastload.LoadConfig(**kwargs) if kwargs else None
    root = source.root if source.root.endswith("/") else source.root + "/"
    trace = fastload.Trace() if hasattr(fastload, "Trace") else None
    out = fastload.load(root, config=config, trace=trace)
    if trace is None:
        return out
    try:
        s = trace.summary()
        info["trace"] = {"wall_s": s.wall_s, "bytes_fetched": s.bytes_fetched,
                         "stages": dict(s.stages)}
    except Exception as e:  # noqa: BLE001 - the trace is a bonus, never fail the run
        info["trace_error"] = repr(e)
    return out


# --- local baselines --------------------------------------------------------

def load_safetensors(source: Source, info: dict) -> dict:
    return _safetensors_load(source.local_paths())


def load_raw_readinto(source: Source, info: dict) -> dict:
    """Read the shard files into one preallocated buffer (one thread per file)."""
    import torch
    paths = source.local_paths()
    sizes = [p.stat().st_size for p in paths]
    buf = torch.empty(sum(sizes), dtype=torch.uint8)
    view = memoryview(buf.numpy())
    errors: list[BaseException] = []

    def read(path: Path, off: int, size: int) -> None:
        try:
            with open(path, "rb", buffering=0) as f:
                done = 0
                while done < size:
                    n = f.readinto(view[off + done: off + size])
                    if not n:
                        raise EOFError(f"{path}: short read at {done}")
                    done += n
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    threads = [threading.Thread(target=read, args=a) for a in zip(paths, offs, sizes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {"buffer": buf}


def load_cat(source: Source, info: dict) -> int:
    """`cat shard > /dev/null`, one process per shard: raw disk/page-cache read speed."""
    procs = [subprocess.Popen(["cat", str(p)], stdout=subprocess.DEVNULL)
             for p in source.local_paths()]
    if any(p.wait() for p in procs):
        raise RuntimeError("cat failed")
    return source.total_bytes


# --- network baselines ------------------------------------------------------

def _shard_urls(source: Source) -> list[str]:
    if source.kind == "s3":
        c = source.boto3_client()
        return [c.generate_presigned_url("get_object", ExpiresIn=3600,
                                         Params=dict(zip(("Bucket", "Key"), source.s3_key(s))))
                for s in source.shards]
    return [source.url(s) for s in source.shards]


def load_curl(source: Source, info: dict) -> int:
    """curl every shard to /dev/null in parallel (S3: presigned URLs)."""
    urls = _shard_urls(source)
    procs = [subprocess.Popen(["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download}", u],
                              stdout=subprocess.PIPE, text=True) for u in urls]
    got = 0
    for p in procs:
        out, _ = p.communicate()
        if p.returncode:
            raise RuntimeError(f"curl exited {p.returncode}")
        got += int(float(out))
    if got != source.total_bytes:
        raise RuntimeError(f"curl fetched {got} bytes, expected {source.total_bytes}")
    return got


async def _aiohttp_download(urls: list[str], paths: list[Path], chunk: int = 4 << 20) -> None:
    import aiohttp

    async def one(session, url: str, path: Path) -> None:
        async with session.get(url) as r:
            r.raise_for_status()
            with open(path, "wb") as f:
                async for block in r.content.iter_chunked(chunk):
                    f.write(block)

    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await asyncio.gather(*(one(s, u, p) for u, p in zip(urls, paths)))


def load_download_then_load(source: Source, info: dict) -> dict:
    """Download every shard to a temp file, then safetensors load + clone.

    HTTP: aiohttp (shards in parallel). S3: s3fs `get` of all shards.
    The temp files live in `source.scratch`; the harness deletes them untimed.
    """
    scratch = Path(source.scratch or ".")
    dl = scratch / f"dl-{os.getpid()}-{threading.get_ident()}"
    dl.mkdir(parents=True, exist_ok=True)
    paths = [dl / s for s in source.shards]
    if source.kind == "s3":
        import s3fs
        fs = s3fs.S3FileSystem(key=source.s3["access_key"], secret=source.s3["secret_key"],
                               endpoint_url=source.s3["endpoint"],
                               client_kwargs={"region_name": source.s3.get("region", "us-east-1")})
        fs.get(["/".join(source.s3_key(s)) for s in source.shards], [str(p) for p in paths])
    else:
        asyncio.run(_aiohttp_download([source.url(s) for s in source.shards], paths))
    return _safetensors_load(paths)


def all_loaders() -> dict[str, Callable[[Source, dict], object]]:
    return {
        "fastload": load_fastload,
        "safetensors": load_safetensors,
        "raw_readinto": load_raw_readinto,
        "cat": load_cat,
        "curl": load_curl,
        "download_then_load": load_download_then_load,
    }


def get(name: str) -> Callable[[Source, dict], object]:
    return all_loaders()[name]


def prepare(name: str) -> None:
    """Import what a loader needs, so import time is not in the first run."""
    mods = {"fastload": ["fastload"], "safetensors": ["safetensors.torch"],
            "download_then_load": ["aiohttp", "safetensors.torch", "s3fs", "boto3"],
            "curl": ["boto3"]}.get(name, [])
    import importlib
    for m in mods:
        try:
            importlib.import_module(m)
        except ImportError:
            pass
