"""Local files: positional reads (``os.preadv``) on a thread pool, GIL released.

Each file is opened once per load. Reads go straight into the caller's memory
(the final tensors on the CPU path); gaps between segments are skipped, so a
shard that needs only some strides of a tensor reads only those.

With ``LoadConfig(direct_io=True)``, cold bytes take another road: a range that
is mostly not in the page cache (asked with ``cachestat(2)``, or with
``mincore(2)`` before Linux 6.5) is read with ``O_DIRECT`` into a per-thread,
page-aligned scratch buffer and copied into place. The disk then DMAs into
memory without the page cache's insertion and copy: on our 2-core test VM a cold
2.46 GB checkpoint loads at 2.9-3.3 GB/s where the page cache gives 1.85-2.5.
The price, and why it is off by default: those bytes are not left in the page
cache, so the next load of the same file is cold again. Cached ranges, small
reads, filesystems without ``O_DIRECT``, and files that mincore cannot see into
(see ``mincore_bytes``) use the page cache as usual.

On the CPU path the scratch buffers are the load's memory in flight, so together
they take ``host_buffer_bytes`` (default 256 MiB: eight threads, 32 MiB reads),
or half of it when chunks are also staged (dtype conversion, GPU): the staging
pool takes the other half. The O_DIRECT descriptor is opened through
``/proc/self/fd`` of the load's own, so a file renamed over the path mid-load
is never read.
They sit 2 MiB-aligned and advised ``MADV_HUGEPAGE``: a virtio request holds at
most 254 segments, so with 4 KiB pages each request carries ~1 MiB, and our VM's
disk then gave 1.2-1.5 GB/s where huge-page buffers gave 3.2-3.5 (O_DIRECT
reads alone, nothing copied). Between 256 and 512 MiB of scratch, and 4 to 16
threads, runs differed less than the disk itself did from one minute to the
next (2.9-3.3 GB/s).

With ``LoadConfig(local_cold_readers=N)``, at most N threads read cold ranges at
once, smallest offset first (``OrderedGate``): one ordered stream is what a real
spinning disk wants. It is off by default. Our VM's virtio disk calls itself
rotational, and an earlier default trusted that and used one reader. Measured
again (2.46 GB, alternating runs): one reader gave 1.15-3.26 GB/s run to run,
and 0.61-1.54 when the page cache had to take memory the host had reclaimed
(evict, wait 4 s); four readers gave 2.72-3.02 and 1.55-3.04; ``direct_io``
2.95-3.18. Cached ranges never wait on the gate.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import heapq
import mmap
import os
import queue
import stat
import sys
import threading
from collections import OrderedDict
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlparse

import numpy as np

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None

from ..errors import (ConfigError, FastloadError, IntegrityError, SourceChangedError, SourceNotFoundError,
                      SourcePermissionError, TransferError)
from ..trace import ReadRecord, Trace
from ..runner import DaemonThreadPool, private_to_process
from .base import ObjectInfo, Segment, open_file_limit, out_of_files, out_of_files_message

IOV_MAX = 1024  # Linux's limit on buffers per preadv call
ALIGN = 4096  # O_DIRECT offset/length/address alignment (covers 512- and 4096-byte logical blocks)
DIRECT_MIN_BYTES = 1 << 20  # below this, an uncached read goes through the page cache
DIRECT_READ_BYTES = 32 << 20  # one O_DIRECT read, and so each thread's scratch, at most
HUGE_PAGE = 2 << 20  # scratch alignment, so that the whole buffer can be huge pages
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
CACHESTAT_SYSCALL = 451  # cachestat(2): the same number on every Linux architecture (new-style syscall)


PULL_LOCK = (".fastload", "pull.lock")  # a plain pull destination's lock, under its root (pull.py)
#: The plain destination a pull running in this context writes into, holding its lock: set around the pull, so
#: that its progress callback sees it (the callback runs in the pull's task).
PULLING_INTO: ContextVar[str | None] = ContextVar("fastload_pulling_into", default=None)


def check_not_pulling_into(source) -> None:
    """A load of a folder of the destination a pull in this context is writing into, from that pull's progress
    callback, would wait for the pull's lock while the pull waits for the callback: refused at once instead."""
    root = PULLING_INTO.get()
    if root is None:
        return
    for item in source if isinstance(source, (list, tuple)) else (source,):
        path = os.fspath(item) if isinstance(item, (str, os.PathLike)) else None
        if not isinstance(path, str) or "://" in path and not path.startswith("file://"):
            continue
        try:
            real = os.path.realpath(to_path(path))
        except (ValueError, SourceNotFoundError):
            continue
        if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
            raise ConfigError(f"{path} is inside the destination of the pull whose progress callback this load "
                              "runs in: it would wait for that pull for ever; load it after pull() returns")


def _pull_lock_over(directory: str) -> str | None:
    """The lock of a pull destination holding ``directory`` (the directory itself or a folder above it)."""
    path = os.path.abspath(directory)
    while True:
        lock = os.path.join(path, *PULL_LOCK)
        if os.path.isfile(lock):
            return lock
        if os.path.dirname(path) == path:
            return None
        path = os.path.dirname(path)


@asynccontextmanager
async def not_while_pulled(directory: str, trace: Trace):
    """Held while a load reads a local checkpoint directory's index and opens its files: a ``fastload pull``
    writing into it is waited for (polled, traced as ``lock``), and none starts meanwhile. A pull puts each file
    in place as it completes: read during one, a directory with no index yet was every shard that had landed,
    loaded as if whole, and one pulled over an older version gave shards of both. Files opened here are pinned
    (a file renamed over one later is not read in its place), so the lock is needed only until then."""
    lock = _pull_lock_over(directory) if fcntl is not None else None
    try:
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) if lock is not None else None
    except OSError:  # gone meanwhile, or not ours to read: nothing to wait for
        fd = None
    if fd is None:
        yield
        return
    try:
        with private_to_process(fd):
            with trace.span("lock"):
                while True:  # polled, so that a cancel leaves no thread blocked in flock
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.1)
                    except OSError:  # a file system without flock (ENOLCK): no pull could have locked it either
                        break
            yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def is_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory; False for anything that cannot be asked (a name too long, a NUL byte):
    what is not a directory is then opened as a file, which says what is wrong with it."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def to_path(url: str) -> Path:
    if url.startswith("file://"):
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise SourceNotFoundError(f"file URL names another host: {url}", url=url)
        # %FF: the file system's bytes, as as_uri wrote; a raw undecodable byte (an argv of a non-UTF-8 name, or
        # any non-ASCII under the C locale) arrives as a surrogate escape, which strict UTF-8 cannot encode
        raw = unquote_to_bytes(parsed.path.encode("utf-8", "surrogateescape"))
        return Path(os.fsdecode(raw))
    return Path(url)


def _os_error(exc: OSError | ValueError, url: str, byte_range: tuple[int, int] | None = None) -> Exception:
    if isinstance(exc, ValueError):  # a NUL byte in the path: no file can have that name
        return SourceNotFoundError(f"not a valid path ({exc}): {url!r}", url=url)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG) or isinstance(exc, FileNotFoundError):
        return SourceNotFoundError(f"no such file ({exc.strerror}): {url}", url=url)
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SourcePermissionError(f"permission denied: {url}", url=url)
    if out_of_files(exc):
        return TransferError(f"cannot open: {out_of_files_message()}", url=url, byte_range=byte_range)
    return TransferError(f"read failed: {exc.strerror or exc}", url=url, byte_range=byte_range)


def max_open_files() -> int:
    """How many shard descriptors a load keeps open: a quarter of the open-file limit (sockets, the pool's
    and the caller's files need the rest), between 8 and 512."""
    limit = open_file_limit()
    return 512 if not isinstance(limit, int) or limit < 0 else max(8, min(512, limit // 4))


def _runs(segments: list[Segment]) -> list[list[Segment]]:
    """Group segments into runs of adjacent ones (one preadv each), at most IOV_MAX long."""
    runs: list[list[Segment]] = []
    for seg in segments:
        if runs and runs[-1][-1].end == seg.offset and len(runs[-1]) < IOV_MAX:
            runs[-1].append(seg)
        else:
            runs.append([seg])
    return runs


class OrderedGate:
    """At most ``n`` holders at once; among waiters, the smallest key goes first.

    With ``n == 1``, cold reads pass one at a time in file order, so a spinning disk sees one
    sequential stream; a plain semaphore would wake waiters in any order.
    """

    def __init__(self, n: int):
        self._cond = threading.Condition()
        self._free = n
        self._waiting: list[tuple] = []

    @contextmanager
    def hold(self, key: tuple):
        with self._cond:
            heapq.heappush(self._waiting, key)
            while self._free == 0 or self._waiting[0] != key:
                self._cond.wait()
            heapq.heappop(self._waiting)
            self._free -= 1
        try:
            yield
        finally:
            with self._cond:
                self._free += 1
                self._cond.notify_all()


class LocalTransport:
    def __init__(self, threads: int, trace: Trace, *, direct_io: bool = False, direct_budget: int = 256 << 20,
                 cold_readers: int | None = None, max_open: int | None = None):
        self.trace = trace
        self._direct = direct_io and hasattr(os, "O_DIRECT") and sys.platform == "linux"
        if self._direct:  # one scratch buffer per thread, together the budget (see the module docstring)
            threads = max(threads, direct_budget // DIRECT_READ_BYTES)
        self.threads = threads
        self._pool = DaemonThreadPool(threads, "fastload-pread")  # works in atexit handlers too (see runner)
        self._fds: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._users: dict[str, int] = {}  # threads holding a file's descriptors: those are never closed
        self._opening = 0  # opens under way: each has a place kept for it under the limit
        # With direct_io a file may hold a second (O_DIRECT) descriptor: both count against the limit.
        self._max_fds = max(1, (max_open or max_open_files()) // (2 if self._direct else 1))
        # When set, uncached ranges are read by at most this many threads at once (see OrderedGate).
        self._cold_readers = cold_readers
        self._gate = OrderedGate(cold_readers or 1)
        self._has_cachestat: bool | None = None
        self._direct_fds: dict[str, int | None] = {}  # None: this file cannot be read with O_DIRECT
        self._scratch_free: queue.SimpleQueue = queue.SimpleQueue()  # aligned buffers not in use
        self._scratch_made = 0
        self.set_direct_budget(direct_budget)
        self._libc = None  # for cachestat(2), mincore(2) and madvise(2), loaded on first use
        self._lock = threading.Lock()

    async def stat(self, url: str) -> ObjectInfo:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._stat_blocking, url)

    def _stat_blocking(self, url: str) -> ObjectInfo:
        """Open the file for the load and read its first 8 bytes (a safetensors header's length) in the
        same trip to the pool, as the HTTP size probe does: the header then needs one read, not two."""
        path = to_path(url)
        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except (OSError, ValueError) as exc:
            raise _os_error(exc, url) from exc
        if not regular:
            raise SourceNotFoundError(f"not a regular file: {url}", url=url)
        try:
            with self._held(url) as fd:
                st = os.fstat(fd)
                # an index or other JSON file is read whole later: no prefix for it
                prefix = b"" if url.endswith(".json") else os.pread(fd, min(8, st.st_size), 0)
        except OSError as exc:
            raise _os_error(exc, url) from exc
        self.trace.count("bytes_fetched", len(prefix), key=url)
        return ObjectInfo(url=url, size=st.st_size, etag=_etag(st), prefix=prefix)

    @contextmanager
    def _held(self, url: str, etag: str | None = None):
        """The load's descriptor for ``url``, kept open while held. Opened on first use; at most ``_max_fds``
        stay open (a 1000-shard index under ``ulimit -n 1024``): the least recently used one that no thread
        holds is closed, and a file opened again must still be what ``etag`` pinned (else
        SourceChangedError: a file renamed over ours is not read in its place)."""
        with self._lock:
            fd = self._fds.get(url)
            if fd is not None:
                self._fds.move_to_end(url)
            self._users[url] = self._users.get(url, 0) + 1
        try:
            if fd is None:
                try:
                    fd = self._open(url)
                except FileNotFoundError as exc:
                    if etag is None:
                        raise
                    raise SourceChangedError("file removed since it was first read", url=url) from exc
                if etag is not None and _changed(os.fstat(fd), etag):
                    raise SourceChangedError("file changed since it was first read", url=url)
            yield fd
        finally:
            with self._lock:
                self._users[url] -= 1
                if not self._users[url]:
                    del self._users[url]

    def _open(self, url: str) -> int:
        # Room is made before the open, counting the opens under way: closing after it let every thread opening at
        # that instant add one over the limit (a load under ulimit -n 64 held 19 where it should hold 16).
        with self._lock:
            self._opening += 1
            idle = [u for u in self._fds if u not in self._users]
            for old in idle[:max(0, len(self._fds) + self._opening - self._max_fds)]:
                os.close(self._fds.pop(old))
                direct = self._direct_fds.pop(old, None)
                if direct is not None:
                    os.close(direct)
        try:
            # O_NONBLOCK: a path swapped for a FIFO after the stat fails its reads instead of hanging the open (no
            # effect on regular files).
            fd = os.open(to_path(url), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
        except BaseException:
            with self._lock:
                self._opening -= 1
            raise
        with self._lock:  # (the place kept becomes the descriptor in one step: no instant where it counts for none)
            self._opening -= 1
            if url in self._fds:  # another thread opened it meanwhile: one descriptor per file
                os.close(fd)
                return self._fds[url]
            self._fds[url] = fd
            return fd

    def _direct_fd(self, info: ObjectInfo, fd: int) -> int | None:
        """An O_DIRECT descriptor of the very file the load pinned (``fd``, held by the caller): opened through
        ``/proc/self/fd`` (by path, a file renamed over ours since would be read), and checked to be the same
        inode."""
        with self._lock:
            if info.url not in self._direct_fds:
                flags = os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0)
                try:
                    dfd = os.open(f"/proc/self/fd/{fd}", flags)
                except OSError:  # EINVAL: the filesystem has no O_DIRECT (tmpfs); no /proc: the page cache
                    dfd = None
                if dfd is not None:
                    mine, theirs = os.fstat(fd), os.fstat(dfd)
                    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
                        os.close(dfd)
                        dfd = None
                self._direct_fds[info.url] = dfd
            return self._direct_fds[info.url]

    def set_direct_budget(self, nbytes: int) -> None:
        """The O_DIRECT scratch's memory: at most ``nbytes`` in all (the load's buffer budget, or the share
        of it the staging pool leaves). Before the first direct read only; with less than
        ``DIRECT_MIN_BYTES`` there is no room for it, and the page cache reads everything."""
        if nbytes < DIRECT_MIN_BYTES:
            self._direct = False
        count = max(1, min(self.threads, nbytes // DIRECT_MIN_BYTES))
        size = min(DIRECT_READ_BYTES, max(DIRECT_MIN_BYTES, nbytes // count) - 2 * ALIGN) // ALIGN * ALIGN
        # room in each to round a read's start down and its end up
        self._scratch_count, self._scratch_bytes = count, size + 2 * ALIGN

    @contextmanager
    def _aligned_scratch(self):
        """Lend one scratch buffer (made on first need, at most ``_scratch_count``; a thread waits for one)."""
        try:
            buf = self._scratch_free.get_nowait()
        except queue.Empty:
            with self._lock:
                make = self._scratch_made < self._scratch_count
                self._scratch_made += make
            buf = self._new_scratch() if make else self._scratch_free.get()
        try:
            yield buf
        finally:
            self._scratch_free.put(buf)

    def _new_scratch(self) -> np.ndarray:
        raw = np.empty(self._scratch_bytes + HUGE_PAGE, dtype=np.uint8)
        skip = (-raw.ctypes.data) % HUGE_PAGE
        buf = raw[skip:skip + self._scratch_bytes]
        # Before the first touch, so the pages are faulted in huge. Only advice: with THP off
        # (or numpy's own advice off) the reads still work, in more, smaller requests.
        self._libc_handle().madvise(ctypes.c_void_p(buf.ctypes.data),
                                    ctypes.c_size_t(len(buf) // HUGE_PAGE * HUGE_PAGE), MADV_HUGEPAGE)
        return buf

    def _libc_handle(self) -> ctypes.CDLL:
        if self._libc is None:
            self._libc = load_libc()
        return self._libc

    def _mostly_uncached(self, fd: int, offset: int, length: int) -> bool | None:
        """True when less than half of the range is in the page cache; None when the kernel cannot say.

        ``cachestat(2)`` asks (Linux >= 6.5); older kernels, such as Amazon Linux 2023's 6.1, get
        ``mincore(2)`` on a mapping of the range. (A ``preadv(RWF_NOWAIT)`` probe would be simpler,
        but measured here it starts disk I/O of its own and halves what an O_DIRECT read then gets.)
        """
        cached = None
        if self._has_cachestat is not False:
            cached = self._cachestat(fd, offset, length)
            self._has_cachestat = cached is not None
        if cached is None:
            cached = self._mincore(fd, offset, length)
        return None if cached is None else cached * 2 < length

    def _mincore(self, fd: int, offset: int, length: int) -> int | None:
        """``mincore_bytes`` for kernels without cachestat. Its cost, ~0.4 ms per 64 MiB range here,
        made a warm ``direct_io`` load of 2.46 GB 12 % slower than with cachestat (16.5 vs 18.8 GB/s);
        cold loads were level (3.06 vs 3.12)."""
        return mincore_bytes(self._libc_handle(), fd, offset, length)

    def _cachestat(self, fd: int, offset: int, length: int) -> int | None:
        """Bytes of ``[offset, offset + length)`` in the page cache, or None without cachestat(2)."""
        rng = (ctypes.c_uint64 * 2)(offset, length)
        counts = (ctypes.c_uint64 * 5)()  # struct cachestat: nr_cache first
        if self._libc_handle().syscall(CACHESTAT_SYSCALL, fd, ctypes.byref(rng), ctypes.byref(counts), 0) != 0:
            return None
        return counts[0] * mmap.PAGESIZE

    def _read_direct(self, dfd: int, info: ObjectInfo, views: list[memoryview], offset: int, want: int,
                     record: ReadRecord | None) -> int:
        """Read ``want`` bytes at ``offset`` with O_DIRECT through the aligned scratch buffer into ``views``."""
        done = 0
        with self._aligned_scratch() as scratch:
            while done < want:
                pos = offset + done
                lead = pos % ALIGN
                length = min(lead + want - done + ALIGN - 1, len(scratch)) // ALIGN * ALIGN
                try:
                    got = os.preadv(dfd, [scratch[:length]], pos - lead)
                except OSError as exc:
                    if exc.errno == errno.EINVAL:  # alignment refused: the page cache reads the rest
                        self._direct = False
                        break
                    raise _os_error(exc, info.url, (offset, offset + want)) from exc
                usable = min(got - lead, want - done)
                if usable <= 0:
                    raise IntegrityError(f"file ended early after {done} of {want} bytes (truncated?)",
                                         url=info.url, byte_range=(offset, offset + want))
                src = scratch[lead:lead + usable]
                taken = 0
                for view in views:  # scatter into the destination views (numpy copies without the GIL)
                    n = min(len(view), usable - taken)
                    np.copyto(np.frombuffer(view, dtype=np.uint8, count=n), src[taken:taken + n])
                    taken += n
                    if taken == usable:
                        break
                views = _advance(views, usable)
                done += usable
                self.trace.count("bytes_fetched", usable, key=info.url)
        if record is not None and done and record.first_byte is None:
            record.first_byte = self.trace.now()
        self.trace.count("bytes_direct", done)
        return done

    def _read_blocking(self, info: ObjectInfo, segments: list[Segment], record: ReadRecord | None = None) -> int:
        if record is not None:
            record.started, record.attempts = self.trace.now(), 1
        try:
            with self._held(info.url, info.etag) as fd:
                return self._read_held(fd, info, segments, record)
        except OSError as exc:  # opening it again (after its descriptor was closed for another file's)
            if isinstance(exc, FastloadError):
                raise
            raise _os_error(exc, info.url) from exc

    def _read_held(self, fd: int, info: ObjectInfo, segments: list[Segment], record: ReadRecord | None) -> int:
        total = 0
        for run in _runs(segments):
            views = [seg.view for seg in run]
            offset = run[0].offset
            want = sum(len(v) for v in views)
            got = 0
            cold = False
            # (a chunk cut at whole elements may end a few bytes short of the chunk size: still a full read)
            if want + ALIGN > DIRECT_MIN_BYTES and (self._direct or self._cold_readers):
                cold = self._mostly_uncached(fd, offset, want) is True
            if cold and self._direct:
                dfd = self._direct_fd(info, fd)
                if dfd is not None:
                    got = self._read_direct(dfd, info, views, offset, want, record)
                    views = _advance(views, got)
                    cold = False
            if cold and self._cold_readers:
                with self._gate.hold((info.url, offset)):  # smallest offset first
                    self.trace.count("bytes_cold_gated", want)
                    self._preadv_all(fd, info, views, offset + got, want - got, record)
            else:
                self._preadv_all(fd, info, views, offset + got, want - got, record)
            total += want
        # A file rewritten in place mid-load must not mix versions (a replaced file keeps our inode).
        _check_unchanged(fd, info, (segments[0].offset, segments[-1].end))
        return total

    def _preadv_all(self, fd: int, info: ObjectInfo, views: list[memoryview], offset: int, want: int,
                    record: ReadRecord | None) -> None:
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
            self.trace.count("bytes_fetched", n, key=info.url)  # as read: a load that fails later read them too
            got += n
            views = _advance(views, n)

    async def read(self, info: ObjectInfo, segments: list[Segment], record: ReadRecord | None = None) -> int:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._read_blocking, info, segments,
                                                                record)

    async def list(self, url: str) -> list[str] | None:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._list_blocking, url)

    def _list_blocking(self, url: str) -> list[str] | None:
        """The regular files in the directory (not sub-directories, FIFOs or devices). A dangling link stays
        in: the shard it names is missing, and its stat says so (dropping it would load part of a checkpoint
        as the whole)."""
        path = to_path(url)
        try:
            if not path.is_dir():
                return None
            return [str(p) for p in sorted(path.iterdir()) if p.is_file() or (p.is_symlink() and not p.exists())]
        except OSError as exc:
            raise _os_error(exc, url) from exc

    async def aclose(self) -> None:
        try:
            self._pool.shutdown(wait=True, cancel_futures=True)
        finally:  # (a second Ctrl-C can land in the join: the descriptors are closed all the same)
            self._scratch_free = queue.SimpleQueue()  # the scratch buffers go with the load
            with self._lock:
                fds = list(self._fds.values()) + [fd for fd in self._direct_fds.values() if fd is not None]
                self._fds, self._direct_fds = OrderedDict(), {}
            for fd in fds:
                os.close(fd)


def load_libc() -> ctypes.CDLL:
    """The C library, with the prototypes of what fastload calls in it (mmap returns a 64-bit address,
    not ctypes' default int)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    return libc


def mincore_bytes(libc: ctypes.CDLL, fd: int, offset: int, length: int) -> int | None:
    """Bytes of ``[offset, offset + length)`` of an open file in the page cache, whole pages counted,
    by mincore(2) on a mapping of the range; None if it cannot be mapped or asked.

    Since Linux 5.0 mincore answers only for files this process owns or may write (or with
    CAP_FOWNER); for any other it would report every page cached, so this says None (cannot tell),
    and ``direct_io`` reads such a file through the page cache, as without it.
    """
    if not _mincore_sees(fd):
        return None
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    size = offset + length - start
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        pages = np.empty((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE, dtype=np.uint8)
        if libc.mincore(addr, size, pages.ctypes.data) != 0:
            return None
        return int(np.count_nonzero(pages[(offset - start) // mmap.PAGESIZE:] & 1)) * mmap.PAGESIZE
    finally:
        libc.munmap(addr, size)


def _mincore_sees(fd: int) -> bool:
    """Whether mincore(2) tells the truth about this file: the kernel's ``can_do_mincore`` (owner,
    CAP_FOWNER, which root has, or write permission)."""
    return os.geteuid() in (0, os.fstat(fd).st_uid) or os.access(f"/proc/self/fd/{fd}", os.W_OK)


def _etag(st: os.stat_result) -> str:
    """What a load pins of a local file: size, mtime, inode and ctime (see ``_changed``)."""
    return f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}-{st.st_ctime_ns}"


def _changed(st: os.stat_result, etag: str | None) -> bool:
    """Whether the open file is no longer what ``etag`` pinned. The change time catches a rewrite in place
    that set the old mtime back (``cp -p``, ``rsync --inplace -t``); but unlinking bumps it too, and a file
    renamed over ours (the usual atomic save) leaves our descriptor on intact old bytes: once the file
    has no name left, only size, mtime and inode count."""
    pinned = _etag(st)
    if st.st_nlink == 0 and etag is not None:
        return pinned.rsplit("-", 1)[0] != etag.rsplit("-", 1)[0]
    return pinned != etag


def _check_unchanged(fd: int, info: ObjectInfo, byte_range: tuple[int, int]) -> None:
    if _changed(os.fstat(fd), info.etag):
        raise SourceChangedError("file changed during the load (size, modification or change time)",
                                 url=info.url, byte_range=byte_range)


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
