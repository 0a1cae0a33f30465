"""The loaders a benchmark row compares, all with one signature:

    loader(source: Source, info: dict) -> dict[str, torch.Tensor] | int

A loader returns the tensors it produced (the harness then touches every page)
or, for raw transfer limits that produce no tensors (curl, cat), the number of
bytes moved. `info` is a per-run dict a loader may fill with extra facts
(fastload's trace summary); it ends up in the run record.

`registry()` describes every loader (`LoaderInfo`: which source kinds it reads,
which optional packages it needs, what to note about it); `missing(info)` says
why one cannot run here (None when it can); `get(name)` returns the function.
The loaders of other projects (transformers, Run:ai Model Streamer,
fastsafetensors, tensorizer) live in `others.py`. Which loaders a row compares
is decided in `suite.py`. Nothing is imported until a loader runs.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
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
    s3: dict = field(default_factory=dict)  # endpoint/access_key/secret_key/region; {}: AWS defaults
    scratch: str = ""              # dir for download_then_load temp files
    fastload_config: dict = field(default_factory=dict)  # extra LoadConfig kwargs
    has_config: bool = False       # root holds a transformers config.json
    tensorizer: str = ""           # tensorizer's own serialised copy (path, URL or s3:// URL)
    check_root: str = ""           # a local directory with the same shard files, to check results against

    def check_paths(self) -> list[Path] | None:
        """Local copies of the shards that every result is checked against (None: none here)."""
        if self.kind == "local":
            return self.local_paths()
        return [Path(self.check_root) / s for s in self.shards] if self.check_root else None

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
        if not self.s3:  # a user's s3:// URL: the standard AWS configuration
            return boto3.client("s3")
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

def load_fastload(source: Source, info: dict, **overrides) -> dict:
    import fastload
    trace = fastload.Trace()
    out = fastload.load(_fastload_root(source), config=fastload_config(source, **overrides), trace=trace)
    record_trace(trace, info)
    return out


def load_fastload_direct(source: Source, info: dict) -> dict:
    """fastload with ``direct_io=True``: cold ranges read with O_DIRECT, around the page cache."""
    return load_fastload(source, info, direct_io=True)


def fastload_config(source: Source, **overrides):
    """The LoadConfig for `source`: its extra kwargs, and the S3 endpoint of a local server."""
    import fastload
    kwargs = {**source.fastload_config, **overrides}
    if source.kind == "s3" and source.s3:
        kwargs["s3"] = fastload.S3Options(endpoint_url=source.s3["endpoint"],
                                          region=source.s3.get("region", "us-east-1"))
    return fastload.LoadConfig(**kwargs) if kwargs else None


def _fastload_root(source: Source) -> str:
    if len(source.shards) == 1 and not source.index:
        return source.url(source.shards[0])
    return source.root if source.root.endswith("/") else source.root + "/"


def record_trace(trace, info: dict) -> None:
    """Put the parts of fastload's TraceSummary the report shows into `info["trace"]`."""
    try:
        s = trace.summary()
        info["trace"] = {"wall_s": s.wall_s, "bytes_fetched": s.bytes_fetched,
                         "stages": dict(s.stages), "breakdown": dict(s.breakdown),
                         "bottleneck": s.bottleneck, "chunks": s.chunks,
                         "chunk_latency": dict(s.chunk_latency),
                         "throughput_gbps": s.throughput_gbps}
    except Exception as e:  # noqa: BLE001 - the trace is a bonus, never fail the run
        info["trace_error"] = repr(e)


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


def load_raw_direct(source: Source, info: dict, threads: int = 4, block: int = 64 << 20) -> int:
    """Every shard read with O_DIRECT into per-thread scratch, 4 x 64 MiB in flight, nothing copied out.

    The disk's own limit: no page cache, no copy into tensors. A cold loader that goes around the
    page cache (Run:ai, fastload's direct_io) is measured against this, not against `cat`. The
    scratch comes from numpy, which asks for transparent huge pages: with 4 KiB pages a virtio
    disk's 254-segment limit cuts each request to ~1 MiB, and this VM then reads at 1.2-1.5
    instead of 3.2-3.5 GB/s.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    paths = source.local_paths()
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC) for p in paths]
    local = threading.local()

    def read(job: tuple[int, int, int]) -> int:
        fd, off, want = job
        scratch = getattr(local, "scratch", None)
        if scratch is None:
            raw = np.empty(block + 4096, dtype=np.uint8)
            scratch = local.scratch = raw[(-raw.ctypes.data) % 4096:][:block]  # O_DIRECT wants page alignment
        got = os.preadv(fd, [scratch], off)
        if got != want:
            raise EOFError(f"short O_DIRECT read at {off}: {got} of {want} bytes")
        return got

    try:
        jobs = [(fd, off, min(block, size - off))
                for fd, size in zip(fds, (p.stat().st_size for p in paths)) for off in range(0, size, block)]
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(read, jobs))
    finally:
        for fd in fds:
            os.close(fd)


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
                               client_kwargs={"region_name": source.s3.get("region", "us-east-1")}
                               ) if source.s3 else s3fs.S3FileSystem()
        fs.get(["/".join(source.s3_key(s)) for s in source.shards], [str(p) for p in paths])
    else:
        asyncio.run(_aiohttp_download([source.url(s) for s in source.shards], paths))
    return _safetensors_load(paths)


@dataclass(frozen=True)
class LoaderInfo:
    """What the harness needs to know about one loader."""

    name: str
    target: str                    # "module:function" in fastload.bench
    kinds: tuple[str, ...]         # source kinds it reads: "local", "http", "s3"
    requires: tuple[str, ...] = () # modules that must be importable
    install: str = ""              # how to get them
    model_dir: bool = False        # needs a transformers model directory (config.json)
    note: str = ""                 # shown under the table
    imports: tuple[str, ...] = ()  # imported before the first run (not timed)

    def func(self) -> Callable[[Source, dict], object]:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


_ALL = ("local", "http", "s3")
_HERE = "fastload.bench.loaders:"
_OTHERS = "fastload.bench.others:"


def registry() -> dict[str, LoaderInfo]:
    infos = [
        LoaderInfo("fastload", _HERE + "load_fastload", _ALL, imports=("fastload",)),
        LoaderInfo("fastload_direct", _HERE + "load_fastload_direct", ("local",), imports=("fastload",),
                   note="fastload with LoadConfig(direct_io=True): cold ranges go around the page cache "
                        "(off by default: nothing is left cached for the next load)"),
        LoaderInfo("fastload_from_pretrained", _OTHERS + "load_fastload_from_pretrained", _ALL,
                   ("transformers",), "pip install 'fastload[transformers]'", model_dir=True,
                   note="fastload.from_pretrained: model built by transformers, weights streamed",
                   imports=("fastload", "transformers")),
        LoaderInfo("safetensors", _HERE + "load_safetensors", ("local",),
                   note="safetensors.torch.load_file, every tensor cloned (materialised)",
                   imports=("safetensors.torch",)),
        LoaderInfo("transformers", _OTHERS + "load_transformers", ("local",), ("transformers",),
                   "pip install transformers", model_dir=True,
                   note="AutoModelForCausalLM.from_pretrained(dir, dtype='auto'); transformers 5 leaves "
                        "the weights as views of its mmap of the files (no copy when the dtype matches), so "
                        "warm it only maps page-cache pages and can beat the raw read; RSS counts those pages",
                   imports=("transformers",)),
        LoaderInfo("runai", _OTHERS + "load_runai", ("local", "s3"), ("runai_model_streamer",),
                   "pip install runai-model-streamer runai-model-streamer-s3",
                   note="Run:ai Model Streamer SafetensorsStreamer, default settings (0.17 reads local files with "
                        "O_DIRECT through io_uring: no page cache, so warm is no faster than cold)",
                   imports=("runai_model_streamer",)),
        LoaderInfo("fastsafetensors", _OTHERS + "load_fastsafetensors", ("local",),
                   ("fastsafetensors",), "pip install fastsafetensors",
                   note="fastsafe_open(device='cpu', nogds=True): no GPU here, so no GDS",
                   imports=("fastsafetensors",)),
        LoaderInfo("tensorizer", _OTHERS + "load_tensorizer", _ALL, ("tensorizer",),
                   "pip install tensorizer",
                   note="reads its own serialised copy (model.tensors, made once and cached)",
                   imports=("tensorizer",)),
        LoaderInfo("download_then_load", _HERE + "load_download_then_load", ("http", "s3"),
                   note="aiohttp (HTTP) / s3fs.get (S3) to temp files, then safetensors + clone",
                   imports=("aiohttp", "safetensors.torch", "s3fs", "boto3")),
        LoaderInfo("raw_readinto", _HERE + "load_raw_readinto", ("local",)),
        LoaderInfo("cat", _HERE + "load_cat", ("local",)),
        LoaderInfo("raw_direct", _HERE + "load_raw_direct", ("local",),
                   note="raw limit of the disk: O_DIRECT reads, 4 x 64 MiB in flight, into scratch (no page "
                        "cache, no copy); what a cold loader that goes around the page cache can reach"),
        LoaderInfo("curl", _HERE + "load_curl", ("http", "s3"), imports=("boto3",)),
    ]
    return {i.name: i for i in infos}


def direct_io_refused(path: Path) -> str | None:
    """Why `path` cannot be read with O_DIRECT here (not Linux, or a filesystem such as tmpfs), or None."""
    if not hasattr(os, "O_DIRECT"):
        return "this platform has no O_DIRECT"
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC))
    except OSError as exc:
        return f"O_DIRECT refused on {path}: {exc.strerror}"
    return None


def missing(info: LoaderInfo) -> str | None:
    """Why `info` cannot run in this environment, or None."""
    for module in info.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{module} is not installed ({info.install or 'pip install ' + module})"
    return None


def all_loaders() -> dict[str, Callable[[Source, dict], object]]:
    return {name: info.func() for name, info in registry().items()}


def get(name: str) -> Callable[[Source, dict], object]:
    return registry()[name].func()


def prepare(name: str) -> None:
    """Import what a loader needs, so import time is not in the first run."""
    for m in registry()[name].imports:
        try:
            importlib.import_module(m)
        except ImportError:
            pass
