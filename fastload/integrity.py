"""Published whole-object checksums, verified while a load streams.

Where a source publishes a checksum (S3 additional checksums, ``ChecksumSHA256``
of single-part uploads; an HTTP ``Repr-Digest: sha-256=...``; the Hub's sha256
of LFS files) it lands in ``ObjectInfo.checksum`` as ``"sha256:<hex>"``.

A whole-object hash needs the bytes in order, but chunks complete in any
order. :class:`StreamingVerifier` hashes each read as soon as every byte before
it has been hashed: an earlier read still in flight makes a later one wait,
with its bytes where they already are (the output tensor, or the staging
buffer it has not released yet), so there is no copy and no second pass. The
cost, with ``LoadConfig(verify_checksums=True)``:

* one SHA-256 pass over every byte of every verified file (about 1.4 GB/s
  per core on the reference VM; hashlib releases the GIL, so it runs beside
  the reads on a worker thread), done in order per file: a file cannot load
  faster than one core hashes it;
* head-of-line waits: a slow chunk holds back the hashing of the ones after
  it, and their workers wait with it (at most ``max_concurrency`` chunks run
  ahead of the hash).

Only files read whole can be verified. A load with ``names=`` or ``shard=``
that skips bytes of a file leaves that file unverified (counted as
``checksums_skipped`` in the trace); verified files count as
``checksums_verified``. ``pull`` writes whole files and can also check a file
afterwards with :func:`verify_file`. A mismatch raises ``IntegrityError``: from
``load`` before anything is returned; from a ``stream()`` at the end, after
earlier tensors were handed out (treat them as unverified until it finishes).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
from typing import Any

from .errors import IntegrityError
from .sources.base import ObjectInfo, Segment
from .trace import Trace
from .runner import in_worker

ALGORITHMS = {"sha256": "sha256"}  # checksum prefix -> hashlib name
_HASH_IN_THREAD = 1 << 20  # hash views this large on a worker thread (GIL released)


def checksum_from_base64(value: str | None, algorithm: str = "sha256") -> str | None:
    """``ChecksumSHA256``-style base64 digest -> ``"sha256:<hex>"`` (None if absent or malformed)."""
    if not value:
        return None
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(raw) != hashlib.new(ALGORITHMS[algorithm]).digest_size:
        return None
    return f"{algorithm}:{raw.hex()}"


def checksum_from_repr_digest(header: str | None) -> str | None:
    """RFC 9530 ``Repr-Digest: sha-256=:<base64>:`` -> ``"sha256:<hex>"`` (None if absent)."""
    if not header:
        return None
    found = None
    for item in header.split(","):  # a dictionary (RFC 8941): a key given twice keeps its last value
        name, _, value = item.strip().partition("=")
        if name.strip().lower() == "sha-256":
            found = value.strip()
    return checksum_from_base64(found[1:-1]) if found and len(found) > 1 and found[0] == found[-1] == ":" else None


def parse_checksum(checksum: str) -> tuple[str, str]:
    """``"sha256:<hex>"`` -> ``("sha256", "<hex>")``; ValueError for anything else."""
    algorithm, _, digest = checksum.partition(":")
    if algorithm not in ALGORITHMS or not digest:
        raise ValueError(f"unsupported checksum {checksum[:20]!r} (expected sha256:<hex>)")
    bytes.fromhex(digest)
    return algorithm, digest.lower()


GIT_BLOB = "git-blob"  # checksum prefix of a git object id (the Hub's id of files not stored in LFS)


def verify_file(path: str | os.PathLike, checksum: str, *, url: str | None = None,
                block: int = 8 << 20) -> None:
    """Hash a whole local file (one sequential pass) and compare; ``IntegrityError`` on mismatch.

    ``checksum`` is ``"sha256:<hex>"`` or ``"git-blob:<hex>"`` (see :func:`git_blob_id`)."""
    if checksum.startswith(GIT_BLOB + ":"):
        algorithm, want = GIT_BLOB, checksum.partition(":")[2].lower()
        got = git_blob_id(path, block)
    else:
        algorithm, want = parse_checksum(checksum)
        got = _file_digest(path, hashlib.new(ALGORITHMS[algorithm]), block)
    if got != want:
        raise IntegrityError(f"{algorithm} mismatch: published {want}, got {got}", url=url or os.fspath(path),
                             byte_range=(0, os.path.getsize(path)))


def git_blob_id(path: str | os.PathLike, block: int = 8 << 20) -> str:
    """The git object id of a file's content (``sha1("blob <size>\\0" + content)``): what the Hub publishes
    for files not stored in LFS."""
    return _file_digest(path, hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode()), block)


def _file_digest(path: str | os.PathLike, h: Any, block: int) -> str:
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class StreamingVerifier:
    """Hashes one object's reads in offset order as they arrive, in any order; checks at the end.

    ``feed`` returns once this read's bytes are hashed (waiting, if ``wait`` is on,
    for earlier reads still in flight); the read that completes the object
    compares the digest and raises ``IntegrityError`` on a mismatch.
    """

    def __init__(self, info: ObjectInfo, checksum: str, trace: Trace):
        self.info = info
        self.algorithm, self.expected = parse_checksum(checksum)
        self.trace = trace
        self._hash = hashlib.new(ALGORITHMS[self.algorithm])
        self._pos = 0  # every byte before this has been hashed
        self._waiters: dict[int, list[asyncio.Future]] = {}
        self._lock = asyncio.Lock()
        self.wait = False  # may an out-of-order read wait? Only once the whole object is known to be read
        self.active = True
        self.verified = False
        self.why_not: str | None = None

    def abandon(self, why: str) -> None:
        """Stop verifying (the object will not be read whole); releases every waiting read."""
        if self.active:
            self.active = False
            self.why_not = why
            self.trace.count("checksums_skipped")
            self._wake(all_waiters=True)

    def _wake(self, all_waiters: bool = False) -> None:
        for offset in [o for o in self._waiters if all_waiters or o <= self._pos]:
            for future in self._waiters.pop(offset):
                if not future.done():
                    future.set_result(None)

    async def feed(self, segments: list[Segment]) -> None:
        if not self.active or not segments:
            return
        start = segments[0].offset
        if start > self._pos:
            if not self.wait:
                self.abandon("read out of order before the load knew it reads the whole object")
                return
            future = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(start, []).append(future)
            await future
        async with self._lock:
            for seg in segments:
                if not self.active:
                    return
                if seg.offset > self._pos:  # bytes skipped inside one read: not read whole
                    self.abandon("a read skipped bytes")
                    return
                skip = self._pos - seg.offset
                if skip >= len(seg.view):
                    continue  # already hashed (a re-read)
                view = seg.view[skip:] if skip else seg.view
                if len(view) >= _HASH_IN_THREAD:
                    await in_worker(self._hash.update, view)
                else:
                    self._hash.update(view)
                self._pos = seg.end
            self._wake()
            if self._pos >= self.info.size and self.active:
                self._finish()

    def _finish(self) -> None:
        self.active = False
        got = self._hash.hexdigest()
        if got != self.expected:
            self.trace.count("checksum_mismatches")
            raise IntegrityError(f"{self.algorithm} mismatch: published {self.expected}, got {got}",
                                 url=self.info.url, byte_range=(0, self.info.size))
        self.verified = True
        self.trace.count("checksums_verified")


class VerifyingTransport:
    """A transport whose reads of checksummed objects are fed to their verifiers."""

    def __init__(self, inner: Any, verification: "Verification"):
        self.inner = inner
        self.verification = verification

    async def read(self, info: ObjectInfo, segments: list[Segment], record=None) -> int:
        n = await (self.inner.read(info, segments) if record is None
                   else self.inner.read(info, segments, record=record))
        verifier = self.verification.verifier(info)
        if verifier is not None:
            await verifier.feed(segments)
        return n

    def __getattr__(self, name: str) -> Any:  # stat, list, aclose, and anything a transport adds
        return getattr(self.inner, name)


class Verification:
    """The verifiers of one load, one per checksummed object, keyed by URL."""

    def __init__(self, trace: Trace):
        self.trace = trace
        self._verifiers: dict[str, StreamingVerifier | None] = {}
        self._wrapped: dict[int, VerifyingTransport] = {}

    def wrap(self, transport: Any) -> VerifyingTransport:
        wrapped = self._wrapped.get(id(transport))
        if wrapped is None or wrapped.inner is not transport:
            wrapped = self._wrapped[id(transport)] = VerifyingTransport(transport, self)
        return wrapped

    def verifier(self, info: ObjectInfo) -> StreamingVerifier | None:
        if info.url not in self._verifiers:
            verifier = None
            if info.checksum:
                try:
                    verifier = StreamingVerifier(info, info.checksum, self.trace)
                except ValueError:
                    self.trace.count("checksums_unsupported")
            self._verifiers[info.url] = verifier
        return self._verifiers[info.url]

    def expect(self, plan) -> None:
        """Told the plan: verify the files it reads whole, let their reads wait their turn; skip the rest.
        A file an earlier read already hashed whole (``pull`` reads an index to list, then fetches it) is
        hashed again: what the plan writes is what must match."""
        for index, planned in enumerate(plan.files):
            earlier = self._verifiers.get(planned.info.url)
            if earlier is not None and earlier.verified:
                del self._verifiers[planned.info.url]
            verifier = self.verifier(planned.info)
            if verifier is None or not verifier.active:
                continue
            if reads_whole(plan, index):
                verifier.wait = True
            else:
                verifier.abandon("the load reads only part of the object")

    def verified(self) -> list[str]:
        return [url for url, v in self._verifiers.items() if v is not None and v.verified]


def reads_whole(plan, file: int) -> bool:
    """True when the plan's pieces cover the data section of ``file`` without a gap."""
    planned = plan.files[file]
    spans = sorted((src, src + p.length) for c in plan.chunks if c.file == file for p in c.pieces
                   for src in p.row_starts())
    pos = planned.data_start
    for start, end in spans:
        if start > pos:
            return False
        pos = max(pos, end)
    return pos >= planned.info.size


__all__ = ["StreamingVerifier", "Verification", "VerifyingTransport", "checksum_from_base64",
           "checksum_from_repr_digest", "parse_checksum", "reads_whole", "verify_file"]
