"""File sink: chunks land in files on disk (``fastload pull``).

Each file is written with ``os.pwrite`` into a temporary file that already has
its final size; a journal beside it records every chunk once its bytes are
written, so an interrupted pull resumes with exactly what is missing (chunks
arrive out of order, so "the temporary file's length" cannot say that). A
finished file is fsynced, optionally checked against its published checksum
(unless the transports already verified it as it streamed), and handed to
``on_complete``, which renames it into place: a file under its final
name is always whole.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..buffers import as_bytes_view
from ..errors import IntegrityError, TransferError
from ..integrity import verify_file
from ..plan import ChunkRead
from ..sources import ObjectInfo, Segment
from ..trace import Trace
from ..runner import in_worker
from ..safe_files import open_own, read_regular
from .base import staged_segments

Range = tuple[int, int]


@dataclass
class FileTarget:
    """One file to write: where its bytes go, what it is, and which byte ranges are already there."""

    temp: Path
    info: ObjectInfo
    checksum: str | None = None  # "sha256:<hex>": checked before ``on_complete`` when the sink verifies
    done: list[Range] = field(default_factory=list)

    @property
    def journal(self) -> Path:
        return journal_path(self.temp)

    @property
    def missing(self) -> list[Range]:
        return missing_ranges(self.info.size, self.done)


JOURNAL_SUFFIX = ".journal"
#: The ending of a partial file in the Hugging Face cache's blobs (pull's ``HubLayout``): ``*.incomplete``, as
#: huggingface_hub names its own there (``hf cache scan`` reports them, ``hf cache prune`` removes them), yet never
#: one of its names (``<id>.incomplete``).
PARTIAL = ".fastload.incomplete"


def journal_path(temp: Path) -> Path:
    """Beside its file; a partial blob's journal ends as a partial file too (see ``PARTIAL``)."""
    if temp.name.endswith(PARTIAL):
        return temp.with_name(temp.name[:-len(PARTIAL)] + ".fastload.journal.incomplete")
    return temp.with_name(temp.name + JOURNAL_SUFFIX)


def missing_ranges(size: int, done: list[Range]) -> list[Range]:
    """The complement of ``done`` in ``[0, size)``, sorted."""
    out, pos = [], 0
    for start, end in sorted(done):
        if start > pos:
            out.append((pos, start))
        pos = max(pos, end)
    if pos < size:
        out.append((pos, size))
    return out


def _header(info: ObjectInfo) -> str:
    return json.dumps({"url": info.url, "size": info.size, "etag": info.etag, "last_modified": info.last_modified},
                      sort_keys=True)


def resume_ranges(temp: Path, info: ObjectInfo) -> list[Range]:
    """Ranges a previous, interrupted write of the same object left in ``temp`` (none if anything differs)."""
    # Without a validator we cannot tell the object did not change in between. (Last-Modified, with the size,
    # is the one a read pins when there is no ETag: the same rule here.)
    if not info.etag and not info.last_modified:
        return []
    try:
        # At most a line per chunk (64 KiB or more) and a few runs' leftovers: a longer "journal" is not one.
        cap = 4096 + 48 * (info.size // (64 << 10) + 64)
        lines = read_regular(journal_path(temp), cap, follow=False).decode("utf-8").splitlines()
        st = os.lstat(temp)
        if (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_size != info.size or not lines
                or lines[0] != _header(info)):
            return []
    except (OSError, ValueError):
        return []
    done = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) == 2 and all(p.isascii() and p.isdigit() and len(p) <= 19 for p in parts):
            start, end = int(parts[0]), int(parts[1])
            if 0 <= start < end <= info.size:
                done.append((start, end))
    return done


class FileSink:
    """Writes staged chunks into their files; ``on_complete(i)`` runs (in a worker thread) once file ``i`` is whole."""

    def __init__(self, files: list[FileTarget], *, on_complete: Callable[[int], None], verify: bool,
                 trace: Trace, verified: Callable[[ObjectInfo], bool] = lambda info: False):
        self.files = files
        self.on_complete = on_complete
        self.verify = verify
        self.verified = verified  # whether the transports already checked an object as it streamed
        self.trace = trace
        self.remaining = [sum(e - s for s, e in t.missing) for t in files]
        self._fds: dict[int, tuple[int, int]] = {}  # file -> (data fd, journal fd)

    def open(self, index: int) -> None:
        """Create (or reopen, to resume) the temporary file and its journal."""
        target = self.files[index]
        fresh = not target.done
        fd = jfd = None
        try:
            target.temp.parent.mkdir(parents=True, exist_ok=True)
            fd = open_own(target.temp, os.O_WRONLY, fresh=fresh)  # (never through what others left there)
            if fresh:
                os.ftruncate(fd, target.info.size)
            jfd = open_own(target.journal, os.O_WRONLY | os.O_APPEND, fresh=fresh)
            if fresh:
                os.write(jfd, (_header(target.info) + "\n").encode())
        except OSError as exc:
            for opened in (fd, jfd):  # not ours to keep: a pull that fails here must not leak them
                if opened is not None:
                    os.close(opened)
            raise TransferError(f"cannot write {target.temp}: {exc.strerror or exc}", url=target.info.url) from exc
        self._fds[index] = (fd, jfd)

    def initially_complete(self) -> list[int]:
        return [i for i, n in enumerate(self.remaining) if n == 0]

    def staging(self, chunk: ChunkRead, buf: torch.Tensor) -> list[Segment]:
        return staged_segments(chunk, buf, as_bytes_view(buf))

    def staged(self, chunk: ChunkRead) -> bool:
        return True

    def targets(self, chunk: ChunkRead) -> list[Segment]:  # pragma: no cover - every chunk is staged
        raise NotImplementedError("the file sink stages every chunk")

    def _write(self, chunk: ChunkRead, buf: torch.Tensor) -> None:
        fd, jfd = self._fds[chunk.file]
        view, offset = as_bytes_view(buf), 0
        try:
            for piece in chunk.pieces:
                data, at = view[offset:offset + piece.length], piece.dst
                offset += piece.length
                while data:
                    n = os.pwrite(fd, data, at)
                    data, at = data[n:], at + n
            os.write(jfd, f"{chunk.start} {chunk.end}\n".encode())  # only after the bytes are in the file
        except OSError as exc:
            raise TransferError(f"write to {self.files[chunk.file].temp} failed: {exc.strerror or exc}",
                                url=self.files[chunk.file].info.url, byte_range=(chunk.start, chunk.end)) from exc

    async def consume(self, chunk: ChunkRead, buf: torch.Tensor | None, release: Callable[[], None]) -> list[int]:
        start = self.trace.now()
        try:
            await in_worker(self._write, chunk, buf)
        finally:
            release()
        self.trace.interval("copy", start, self.trace.now())
        self.trace.count("bytes_copied", chunk.nbytes)
        self.remaining[chunk.file] -= chunk.nbytes
        if self.remaining[chunk.file] == 0:
            await in_worker(self.finish, chunk.file)
            return [chunk.file]
        return []

    def finish(self, index: int) -> None:
        """Flush file ``index`` to disk, check it, hand it to ``on_complete``, drop its journal."""
        target = self.files[index]
        fd, jfd = self._fds.pop(index, (None, None))
        if fd is None:  # nothing was missing (an empty file, or a resumed one that was whole): never opened
            # Only an empty file may be made here: a temporary file that vanished is never remade as zeros.
            try:
                target.temp.parent.mkdir(parents=True, exist_ok=True)
                fd = open_own(target.temp, os.O_WRONLY, fresh=target.info.size == 0)
            except OSError as exc:
                raise TransferError(f"cannot write {target.temp}: {exc.strerror or exc}",
                                    url=target.info.url) from exc
        try:
            if jfd is None:
                os.ftruncate(fd, target.info.size)
            os.fsync(fd)  # (where a full or failing disk says so, if it did not on a write)
        except OSError as exc:
            raise TransferError(f"cannot write {target.temp}: {exc.strerror or exc}", url=target.info.url) from exc
        finally:
            os.close(fd)
            if jfd is not None:
                os.close(jfd)
        if self.verify and target.checksum and not self.verified(target.info):
            try:
                verify_file(target.temp, target.checksum, url=target.info.url)
            except IntegrityError:
                discard(target)
                raise
        self.on_complete(index)
        target.journal.unlink(missing_ok=True)

    def close(self) -> None:
        """Close what is open; temporary files and journals stay for the next pull to resume."""
        for fd, jfd in self._fds.values():
            os.close(fd)
            os.close(jfd)
        self._fds.clear()


def discard(target: FileTarget) -> None:
    """Forget a partial or bad file: the next pull starts it afresh."""
    target.temp.unlink(missing_ok=True)
    target.journal.unlink(missing_ok=True)
