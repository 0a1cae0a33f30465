"""What every transport offers, and the values passed between it and the fetcher.

Byte ranges are half-open ``[start, end)`` everywhere. A *read* fills a list of
``Segment``s: each names an absolute file offset and a writable memoryview; the
segments are sorted and do not overlap, and the bytes between them (gaps) are
not wanted. Transports that can skip gaps (local files) do; streaming
transports read across them and discard the gap bytes.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    """One object as first seen by the load; later reads are pinned to it."""

    url: str  # what users and messages see (never holds credentials)
    size: int
    etag: str | None = None
    last_modified: str | None = None
    fetch_url: str | None = field(default=None, repr=False)  # what is requested (a presigned URL): never shown
    checksum: str | None = None  # a published checksum ("sha256:<hex>"), when the source has one
    # The object's first bytes, when finding its size brought them (HTTP's ranged probe): a request saved.
    prefix: bytes = field(default=b"", repr=False)


class Segment(NamedTuple):
    offset: int  # absolute offset in the object
    view: memoryview  # writable, 1-D, unsigned bytes

    @property
    def end(self) -> int:
        return self.offset + len(self.view)


def span_of(segments: list[Segment]) -> tuple[int, int]:
    return segments[0].offset, segments[-1].end


def http_range(start: int, end: int) -> str:
    """The one place a half-open range becomes an HTTP ``Range`` header value."""
    if end <= start:
        raise ValueError(f"empty range [{start}, {end})")
    return f"bytes={start}-{end - 1}"


class Transport(Protocol):
    """One per scheme per load; created inside the load's event loop."""

    async def stat(self, url: str) -> ObjectInfo: ...

    async def read(self, info: ObjectInfo, segments: list[Segment], record=None) -> int:
        """Fill every segment; return the bytes taken from the source (gaps included).

        ``record`` (a ``trace.ReadRecord``, or None when tracing is off) is where the transport
        notes when it started, when the first byte arrived and how many attempts it made.
        """
        ...

    async def list(self, url: str) -> list[str] | None:
        """URLs of the objects directly under a directory/prefix URL; None if the scheme cannot list."""
        ...

    async def aclose(self) -> None: ...


async def read_bytes(transport: Transport, info: ObjectInfo, start: int, end: int) -> bytes:
    """A small read into fresh memory (headers, index files)."""
    buf = bytearray(end - start)
    if end > start:
        await transport.read(info, [Segment(start, memoryview(buf))])
    return bytes(buf)


def open_file_limit() -> int | str:
    """This process's soft limit on open files (``ulimit -n``), or "?" where it cannot be read."""
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return "?"


def out_of_files(exc: BaseException) -> bool:
    """Whether ``exc`` (or the OSError aiohttp's connector error keeps) is EMFILE/ENFILE: no retry mends it
    while the load itself holds the descriptors."""
    err = getattr(exc, "os_error", None) or exc
    return isinstance(err, OSError) and err.errno in (errno.EMFILE, errno.ENFILE)


def unresolvable(exc: BaseException) -> bool:
    """Whether ``exc``, or what it came from, is a name lookup's "no such host" (EAI_NONAME, EAI_NODATA): the
    DNS's answer, not a failure of the moment (EAI_AGAIN). Retrying it spent the whole retry budget, 6-16 s,
    on a typo in the host name; curl gives up at once."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, socket.gaierror) and exc.errno in _NO_SUCH_NAME:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def out_of_files_message() -> str:
    return (f"too many open files (this process may open {open_file_limit()}): raise `ulimit -n` or lower "
            f"max_concurrency")
