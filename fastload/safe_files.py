"""Opening the files fastload keeps beside the ones it pulls, safely in folders others can write to.

A destination or a Hugging Face cache is often shared (a world-writable ``/data/hf-cache``): another user can
leave anything at the paths of a pull's temporaries, journals, records, refs and locks beforehand. A symlink
there made the pull write outside the destination (truncating someone's file); a FIFO hung it for ever. So a
pull's own file is opened never through a symlink (``O_NOFOLLOW``), never blocking (``O_NONBLOCK``: a FIFO
opens, or fails, at once), and used only when it is a regular file of its own; a fresh one replaces whatever
stood at its path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _regular(fd: int, path: Path | str, own: bool) -> int:
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (own and st.st_nlink != 1):
            raise OSError(errno.EINVAL, "not a regular file" + (" of its own" if own else ""), str(path))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_own(path: Path | str, flags: int, *, fresh: bool) -> int:
    """A file descriptor on ``path``, one of fastload's own files: with ``fresh``, a new file in place of
    whatever is there (a directory there is an error); else the one there, if it is a regular file with no
    other name (a hard link planted there would write into another file). ``OSError`` otherwise."""
    if fresh:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return os.open(path, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o644)
    return _regular(os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC), path, own=True)


def read_regular(path: Path | str, cap: int, *, follow: bool = True) -> bytes:
    """The bytes of the regular file at ``path``, at most ``cap`` of them (``OSError`` if it is longer, or not a
    regular file: a FIFO put where a small record or ref belongs no longer hangs its reader, nor a sparse
    file of terabytes fills memory). ``follow``: through a symlink at ``path`` (to read what a link names)."""
    fd = _regular(os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC | (0 if follow else _NOFOLLOW)), path, own=False)
    with os.fdopen(fd, "rb") as f:
        if os.fstat(f.fileno()).st_size > cap:
            raise OSError(errno.EFBIG, f"larger than {cap} bytes", str(path))
        data = f.read(cap + 1)
    if len(data) > cap:
        raise OSError(errno.EFBIG, f"larger than {cap} bytes", str(path))
    return data


def own_dir(path: Path) -> Path:
    """``path`` as a real directory of its own (made if missing): a symlink planted in its place (to a folder
    elsewhere, where the pull's files would go) is removed first."""
    try:
        if stat.S_ISLNK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    path.mkdir(parents=True, exist_ok=True)
    return path
