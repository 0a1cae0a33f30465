"""Local files: positional reads (``os.preadv``) on a thread pool, GIL released.

Each file is opened once per load. Reads go straight into the caller's memory
(the final tensors on the CPU path); gaps between segments are skipped, so a
shard that needs only some strides of a tensor reads only those.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..errors import IntegrityError, SourceChangedError, SourceNotFoundError, SourcePermissionError, TransferError
from ..trace import ReadRecord, Trace
from .base import ObjectInfo, Segment

IOV_MAX = 1024  # Linux's limit on buffers per preadv call


def to_path(url: str) -> Path:
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise SourceNotFoundError(f"file URL names another host: {url}", url=url)
        return Path(unquote(parsed.path))
    return Path(url)


def _os_error(exc: OSError, url: str, byte_range: tuple[int, int] | None = None) -> Exception:
    if exc.errno == errno.ENOENT or isinstance(exc, FileNotFoundError):
        return SourceNotFoundError(f"no such file: {url}", url=url)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SourcePermissionError(f"permission denied: {url}", url=url)
    return TransferError(f"read failed: {exc.strerror or exc}", url=url, byte_range=byte_range)


def _runs(segments: list[Segment]) -> list[list[Segment]]:
    """Group segments into runs of adjacent ones (one preadv each), at most IOV_MAX long."""
    runs: list[list[Segment]] = []
    for seg in segments:
        if runs and runs[-1][-1].end == seg.offset and len(runs[-1]) < IOV_MAX:
            runs[-1].append(seg)
        else:
            runs.append([seg])
    return runs


class LocalTransport:
    def __init__(self, threads: int, trace: Trace):
        self.trace = trace
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastload-pread")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    async def stat(self, url: str) -> ObjectInfo:
        path = to_path(url)
        try:
            st = await asyncio.get_running_loop().run_in_executor(self._pool, os.stat, path)
        except OSError as exc:
            raise _os_error(exc, url) from exc
        if not os.path.isfile(path):
            raise SourceNotFoundError(f"not a regular file: {url}", url=url)
        return ObjectInfo(url=url, size=st.st_size, etag=f"{st.st_size}-{st.st_mtime_ns}")

    def _fd(self, info: ObjectInfo) -> int:
        with self._lock:
            fd = self._fds.get(info.url)
            if fd is None:
                try:
                    fd = os.open(to_path(info.url), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:
                    raise _os_error(exc, info.url) from exc
                st = os.fstat(fd)
                if f"{st.st_size}-{st.st_mtime_ns}" != info.etag:
                    os.close(fd)
                    raise SourceChangedError("file changed since it was first read", url=info.url)
                self._fds[info.url] = fd
            return fd

    def _read_blocking(self, info: ObjectInfo, segments: list[Segment], record: ReadRecord | None = None) -> int:
        if record is not None:
            record.started, record.attempts = self.trace.now(), 1
        fd = self._fd(info)
        total = 0
        for run in _runs(segments):
            views = [seg.view for seg in run]
            offset = run[0].offset
            want = sum(len(v) for v in views)
            got = 0
            while got < want:
                try:
                    n = os.preadv(fd, views, offset + got)
                except OSError as exc:
                    raise _os_error(exc, info.url, (offset, offset + want)) from exc
                if n == 0:
                    _check_unchanged(fd, info, (offset, offset + want))
                    raise IntegrityError(f"file ended early after {got} of {want} bytes (truncated?)",
                                         url=info.url, byte_range=(offset, offset + want))
                if record is not None and record.first_byte is None:
                    record.first_byte = self.trace.now()
                got += n
                views = _advance(views, n)
            total += want
        # A file rewritten in place mid-load must not mix versions (a replaced file keeps our inode).
        _check_unchanged(fd, info, (segments[0].offset, segments[-1].end))
        self.trace.count("bytes_fetched", total, key=info.url)
        return total

    async def read(self, info: ObjectInfo, segments: list[Segment], record: ReadRecord | None = None) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._read_blocking, info, segments,
                                                                record)

    async def list(self, url: str) -> list[str] | None:
        path = to_path(url)
        if not path.is_dir():
            return None
        return [str(p) for p in sorted(path.iterdir()) if p.is_file()]

    async def aclose(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)


def _check_unchanged(fd: int, info: ObjectInfo, byte_range: tuple[int, int]) -> None:
    st = os.fstat(fd)
    if f"{st.st_size}-{st.st_mtime_ns}" != info.etag:
        raise SourceChangedError("file changed during the load (size or modification time)", url=info.url,
                                 byte_range=byte_range)


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """Drop the first ``n`` bytes from a list of views (after a short preadv)."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:] if n else v)
        n = 0
    return out
