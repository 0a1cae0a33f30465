"""``fastload pull``: pre-stage a model directory on local disk with the loader's own fetcher.

What is pulled:

* ``hf://org/name[@revision][/folder]`` -- the files of that commit, as the Hub
  lists them, into the Hugging Face cache layout (``models--org--name/blobs/<id>``,
  ``snapshots/<commit>/<path>`` as relative symlinks into ``blobs``,
  ``refs/<revision>``), so that ``transformers`` and ``huggingface_hub`` find them
  offline; or, with ``to``, into a plain directory.
* an ``s3://`` prefix or a local directory -- every file under it, recursively.
* an ``http(s)://`` base URL (HTTP cannot list) -- the shard index and its shards
  (or ``model.safetensors``) and those of the standard model files that exist.
* a single file URL -- that file.

Hidden files are skipped, and so are weights in other formats (``*.bin``,
``*.h5``, ``*.onnx`` ...) when the source has safetensors weights.

Every file is cut into ``chunk_bytes`` ranges and fetched by ``fetch.run_plan``
-- the transports, retries, bounded concurrency and buffer pool of a load --
into a :class:`~fastload.sinks.file.FileSink`. Files appear under their final
names only when whole (temporary name, fsync, rename). A file already present
and complete (same size, and the same ETag or content id the source publishes)
is not fetched again; an interrupted pull resumes the chunks that are missing.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import stat
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.parse import unquote, urlsplit

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: pulls into one destination are not serialised there
    fcntl = None

from .buffers import BufferPool
from .config import LoadConfig
from .errors import (ConfigError, FastloadError, FormatError, IntegrityError, SourceChangedError, SourceNotFoundError,
                     SourcePermissionError, TransferError)
from .fetch import run_plan
from .format import DTYPES, INDEX_NAME, SINGLE_NAME, TensorSpec, parse_index
from .integrity import GIT_BLOB, verify_file
from .pipeline import check_progress
from .plan import ChunkRead, LoadPlan, PlannedFile, PlannedTensor, Piece, chunk_size
from .redact import printable, redact_url
from .resolve import join, parent, read_index
from . import runner
from .runner import gather, in_worker, own_workers
from .safe_files import open_own, own_dir, read_regular
from .sinks.file import JOURNAL_SUFFIX, PARTIAL, FileSink, FileTarget, discard, journal_path, resume_ranges
from .sources import ObjectInfo, Transports, normalize_url, read_bytes, scheme_of
from .sources.hub_refs import (HubSettings, cached_snapshot, check_revision, parse_hub_url, pull_record,
                               repo_cache_dir, with_revision)
from .sources.local import PULL_LOCK, PULLING_INTO, _os_error, to_path
from .trace import Trace, as_trace

#: Model files besides the weights that a plain HTTP base URL is probed for.
STANDARD_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
)
#: Weights in other formats: skipped when the source has safetensors weights.
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".ot", ".onnx", ".onnx_data", ".tflite",
                 ".pb", ".mlmodel", ".gguf", ".npz", ".keras")
#: A URL whose last segment ends like this names a file; anything else names a directory.
FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja", ".md", ".py", ".yaml", ".yml", ".tiktoken",
                 ".gguf") + OTHER_WEIGHTS
META_DIR = PULL_LOCK[0]  # ".fastload": the pull's lock, temporaries and records
INCOMPLETE = PARTIAL  # a file being written: a blob, a snapshot's link, a record
INDEX_SUFFIX = ".safetensors.index.json"
RECORD_BYTES = 1 << 20  # a pull's record of one file or one commit's folders is far smaller  # model.safetensors.index.json, and diffusers' and adapters' names


@dataclass(frozen=True)
class Entry:
    """One file to pull: where it lands (``rel``), where it comes from, and what the listing said about it."""

    rel: str
    url: str
    size: int | None = None
    etag: str | None = None  # a content id published by the listing (Hub blob id / sha256)
    sha256: str | None = None
    info: ObjectInfo | None = None


@dataclass(frozen=True)
class PullResult:
    path: Path  # the pulled directory (or file)
    fetched: tuple[str, ...]  # files written by this pull
    present: tuple[str, ...]  # files that were already there, complete
    bytes_fetched: int
    total_bytes: int
    removed: tuple[str, ...] = ()  # files an earlier pull of this source wrote that the source no longer has


def _published(e: Entry) -> str | None:
    """The checksum a pulled file is checked against: its source's, the Hub's sha256 of an LFS file, or the
    Hub's git object id of any other (the listing's content id, ``etag``, is set for Hub files only)."""
    if e.info is not None and e.info.checksum:
        return e.info.checksum
    if e.sha256:
        return f"sha256:{e.sha256}"
    return f"{GIT_BLOB}:{e.etag}" if e.etag else None


def _path_of(url: str) -> str:
    """What names the file or folder: an HTTP(S) URL's path (its query is a token, not part of the name);
    anything else as it is (an S3 key may hold '?')."""
    return urlsplit(url).path if scheme_of(url) == "http" else url


def _names_file(url: str) -> bool:
    path = _path_of(url)
    return not path.endswith("/") and path.rsplit("/", 1)[-1].endswith(FILE_SUFFIXES)


def _check_paths(entries: list[Entry], source: str) -> list[Entry]:
    """A listing names files inside the destination, never around it (a hostile listing could try)."""
    for e in entries:
        parts = e.rel.split("/")
        if (not e.rel or "\\" in e.rel or "\x00" in e.rel or any(p in ("", ".", "..") for p in parts)
                or (len(e.rel) > 1 and e.rel[1] == ":")):
            raise FormatError(f"{source}: refusing to write {e.rel!r}: not a plain relative path")
    return entries


def _skip_other_formats(entries: list[Entry]) -> list[Entry]:
    visible = [e for e in entries if not any(p.startswith(".") for p in e.rel.split("/"))]
    if any(e.rel.endswith(".safetensors") for e in visible):
        visible = [e for e in visible if not e.rel.endswith(OTHER_WEIGHTS)]
    return visible


# -- listing ---------------------------------------------------------------------------------------


async def _list_local(url: str, skip: Path | None = None) -> list[Entry]:
    """The files under ``url``, but not under ``skip`` (the destination, when it lies inside the source)."""
    root = Path(os.path.abspath(to_path(url)))  # one spelling of the source: a later pull finds it the same
    try:
        mode = os.stat(root).st_mode
    except (OSError, ValueError) as exc:
        raise _os_error(exc, url) from None
    if stat.S_ISREG(mode):
        return [Entry(root.name, str(root))]
    if not stat.S_ISDIR(mode):
        raise SourceNotFoundError(f"not a file or directory: {url}", url=url)
    # Walked and copied from where its links point now, once: a release link switched mid-pull (current -> v2)
    # must not give the first files of one release and the rest of the other (resolve.py's ``_pinned``).
    # The records keep the name given (``_source_id``): a switch is then a new version of the same source.
    real = Path(os.path.realpath(root))

    def walk() -> list[Entry]:
        out = []
        skipped = os.path.realpath(skip) if skip is not None else None
        for folder, dirs, files in os.walk(real):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and os.path.realpath(os.path.join(folder, d)) != skipped)
            for name in sorted(files):
                path = Path(folder) / name
                out.append(Entry(path.relative_to(real).as_posix(), str(path)))
        return out

    return await in_worker(walk)


async def _list_s3(url: str, transports: Transports) -> list[Entry]:
    from .sources.s3 import split_url

    bucket, key = split_url(url)
    if key and _names_file(url):
        return [Entry(key.rsplit("/", 1)[-1], url)]
    if key and not key.endswith("/"):  # that object when it exists, else the prefix (as a load reads it)
        try:
            info = await transports.for_url(url).stat(url)
        except (SourceNotFoundError, SourcePermissionError):  # 403: a missing key without ListBucket
            pass
        else:
            return [Entry(key.rsplit("/", 1)[-1], url, info.size, info=info)]
    prefix = key if not key or key.endswith("/") else key + "/"
    start = len(f"s3://{bucket}/{prefix}")
    objects = await transports.for_url(url).objects(url, recursive=True)
    # What the listing says of each object is what a HEAD would (size, ETag, Last-Modified): taken as its info,
    # one request per file fewer before the bytes; not when checksums are verified (only a HEAD has them)
    trusted = not transports.config.verify_checksums
    out = [Entry(o.url[start:], o.url, o.size, info=o if trusted else None) for o in objects]
    if not out:
        raise SourceNotFoundError(f"nothing under {url}", url=url)
    return out


async def _stat_or_none(transports: Transports, url: str) -> ObjectInfo | None:
    try:
        return await transports.for_url(url).stat(url)
    except SourceNotFoundError:
        return None


async def _list_http(url: str, transports: Transports) -> list[Entry]:
    if _names_file(url):
        info = await transports.for_url(url).stat(url)
        return [Entry(unquote(_path_of(url).rsplit("/", 1)[-1]), url, info.size, info=info)]
    base = join(url, "")  # a query string (a token) goes with every file
    names = [INDEX_NAME, SINGLE_NAME, *STANDARD_FILES]
    infos = dict(zip(names, await gather(_stat_or_none(transports, join(base, n)) for n in names)))
    index = infos[INDEX_NAME]
    if index is not None:  # the index names the weights; a stray model.safetensors beside it is not one
        raw = await read_bytes(transports.for_url(index.url), index, 0, index.size)
        shards = parse_index(raw, url=index.url).files
        infos.pop(SINGLE_NAME)
        infos.update(zip(shards, await gather(transports.for_url(join(base, s)).stat(join(base, s)) for s in shards)))
    entries = [Entry(name, join(base, name), info.size, info=info) for name, info in infos.items() if info is not None]
    if not any(e.rel.endswith(".safetensors") for e in entries):
        raise SourceNotFoundError(f"no {INDEX_NAME} or {SINGLE_NAME} under {base} (HTTP sources cannot be listed)",
                                  url=url)
    return entries


async def _list_hub(url: str, transports: Transports) -> tuple[str, list[Entry]]:
    ref = parse_hub_url(url)
    info = await transports.for_url(url).repo_info(ref)
    if not ref.is_dir:
        found = [f for f in info.files if f.path == ref.path]
        if not found:
            raise SourceNotFoundError(f"no file {ref.path!r} in {ref.url(revision=info.commit)}", url=url)
        prefix = ref.path.rsplit("/", 1)[0] + "/" if "/" in ref.path else ""
    else:
        prefix = ref.path
        found = [f for f in info.files if f.path.startswith(prefix)]
    if any(f.blob is None or f.size is None for f in found):
        raise FormatError(f"{ref.url(revision=info.commit)}: the Hub's listing lacks file sizes or blob ids")
    return info.commit, [Entry(f.path[len(prefix):], ref.url(f.path, info.commit), f.size, f.blob, f.sha256)
                         for f in found]


async def _check_shards(entries: list[Entry], listed: list[Entry], transports: Transports) -> list[Entry]:
    """Each shard index among ``entries`` (``*.safetensors.index.json``) names only files the source has
    (``listed``: all of them, hidden files and other formats too): the folder pulled would otherwise look whole and
    fail its first load. Read before anything is written. Returns ``entries`` with the indexes' ``info`` filled (so
    they are not looked up twice), and with the files an index names that the filters had left out."""
    have = {e.rel: e for e in listed}

    async def check(e: Entry) -> tuple[Entry, list[Entry]]:
        if not e.rel.endswith(INDEX_SUFFIX):
            return e, []
        e = e if e.info is not None else _with_info(e, await transports.for_url(e.url).stat(e.url))
        index, info = await read_index(transports, e.info)
        e = replace(e, info=info)  # (its copy is written from the bytes read here)
        folder = e.rel.rpartition("/")[0]
        named = [posixpath.join(folder, name) for name in index.files]
        lacking = sorted(name for name, rel in zip(index.files, named) if rel not in have)
        if lacking:
            url = join(parent(e.url), lacking[0])
            raise SourceNotFoundError(f"{e.info.url} names {len(lacking)} shard file(s) the source lacks: "
                                      f"{', '.join(map(repr, lacking[:5]))}{' ...' if len(lacking) > 5 else ''}",
                                      url=redact_url(url))
        return e, [have[rel] for rel in named]

    checked = await gather(check(e) for e in entries)
    kept = {e.rel for e in entries}
    extra = {n.rel: n for _, named in checked for n in named if n.rel not in kept}
    return [e for e, _ in checked] + list(extra.values())


# -- layouts: where files go -----------------------------------------------------------------------


def _source_id(source: str, single: bool) -> str:
    """What names a pull's source across pulls: a local path made absolute, an HTTP URL without its secrets (a
    rotated token is the same source), an ``hf://`` URL without its revision (a new revision replaces the old);
    a folder with or without its trailing ``/`` is one source."""
    scheme = scheme_of(source)
    if scheme == "local":
        return os.path.abspath(to_path(source))
    if scheme == "hf":
        ref = parse_hub_url(source)
        return f"hf://{ref.repo_id}/{ref.path}"
    if not single:
        source = join(source, "") if scheme == "http" else source if source.endswith("/") else source + "/"
    return redact_url(source)


def _collides(rel: str, at_source: set[str]) -> bool:
    """Whether a file at ``rel`` stands where the source now has a folder, or inside one of its files' places."""
    parents = {rel[:i] for i in range(len(rel)) if rel[i] == "/"}
    return any(other.startswith(rel + "/") for other in at_source) or bool(parents & at_source)


class PlainLayout:
    """A plain directory; ``.fastload/`` inside it keeps unfinished files and what each finished one was."""

    def __init__(self, root: Path):
        self.root = self.dest = root
        self.lock = root.joinpath(*PULL_LOCK)  # (readers wait for it: sources/local.not_while_pulled)
        self.source = ""  # the pull's source (``_source_id``), set once the listing says what it names

    def temp(self, e: Entry) -> Path:
        return self.root / META_DIR / "incomplete" / e.rel

    def _meta(self, e: Entry) -> Path:
        return self.root / META_DIR / "meta" / (e.rel + ".json")

    def _record(self, e: Entry, info: ObjectInfo | None) -> dict:
        etag = e.etag or (info.etag if info else None)  # Last-Modified only where there is no ETag (nor content id)
        # The URL without its secrets: the record stays in the folder (images, shares), and a rotated token
        # names the same file.
        return {"url": redact_url(e.url), "size": info.size if info else e.size, "etag": etag,
                "last_modified": None if etag or info is None else info.last_modified}

    def needs_stat(self, e: Entry) -> bool:
        return e.etag is None or e.size is None

    def present(self, e: Entry, info: ObjectInfo | None, verify: bool = False) -> bool:
        record = self._record(e, info)
        if record["etag"] is None and record["last_modified"] is None:
            return False  # nothing says the file did not change: fetch it again
        try:
            saved = json.loads(read_regular(self._meta(e), RECORD_BYTES, follow=False))
            st = (self.root / e.rel).stat()
        except (OSError, ValueError):
            return False
        if not isinstance(saved, dict):
            return False
        same = (saved.get("source") == record and st.st_size == record["size"]
                and saved.get("mtime_ns") == st.st_mtime_ns)
        checksum = _published(e if info is None else Entry(e.rel, e.url, e.size, e.etag, e.sha256, info))
        if not same or (verify and checksum and not _holds(self.root / e.rel, checksum)):
            return False
        if "pulled_from" not in saved:  # written by an older fastload: this source now answers for it
            _write_atomic(self._meta(e), json.dumps({**saved, "pulled_from": self.source}, sort_keys=True))
        return True

    def complete(self, e: Entry, info: ObjectInfo) -> None:
        final, temp = self.root / e.rel, self.temp(e)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, final)
        _remove_empty(temp.parents[:e.rel.count("/")])
        # Written once the file is in place: its inode and change time, which no one can set back, tell a
        # later prune that the file is still the one pulled (a crash before this only costs a fetch again).
        st = final.stat()
        meta = {"source": self._record(e, info), "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
                "ctime_ns": st.st_ctime_ns, "pulled_from": self.source}
        _write_atomic(self._meta(e), json.dumps(meta, sort_keys=True))

    def prepare(self) -> None:
        """The pull's own folders are real ones: a link planted in their place sent temporaries elsewhere."""
        for folder in ("", "incomplete", "meta"):
            own_dir(self.root / META_DIR / folder)

    def finish(self, entries: Sequence[Entry], single: bool) -> Path:
        return self.root / entries[0].rel if single else self.root

    def _inside(self, rel: str) -> bool:
        """No folder between the root and ``rel`` is a link: removing ``rel`` removes nothing elsewhere."""
        folder = self.root
        for part in rel.split("/")[:-1]:
            folder = folder / part
            try:
                if not stat.S_ISDIR(folder.lstat().st_mode):
                    return False
            except OSError:
                return False
        return True

    def prune(self, at_source: set[str], blocking_only: bool = False) -> tuple[str, ...]:
        """Remove what an earlier pull of this same source wrote and the source no longer has, where the file is
        still as that pull left it (same size, mtime, inode and change time): a checkpoint that moved from
        index + shards to one ``model.safetensors`` must not leave the old index behind, which a load would
        prefer. Files of other sources, and files changed since they were pulled, stay; so do this pull's own
        unfinished files of names the source dropped. ``blocking_only``: only files where the source now has a
        folder, or inside what is now a file (before the fetch, which they would stand in the way of)."""
        records = self.root / META_DIR / "meta"
        removed = []
        for meta in sorted(records.rglob("*.json")) if records.is_dir() else ():
            rel = meta.relative_to(records).as_posix()[:-len(".json")]
            if rel in at_source or (blocking_only and not _collides(rel, at_source)):
                continue
            final = self.root / rel
            try:
                saved = json.loads(read_regular(meta, RECORD_BYTES, follow=False))
                st = final.lstat()
            except (OSError, ValueError):
                continue
            source = saved.get("source") if isinstance(saved, dict) else None
            if (not isinstance(source, dict) or saved.get("pulled_from") != self.source
                    or not stat.S_ISREG(st.st_mode) or not self._inside(rel)
                    or (saved.get("mtime_ns"), saved.get("ino"), saved.get("ctime_ns"), source.get("size"))
                    != (st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_size)):
                continue
            final.unlink()
            meta.unlink()
            removed.append(rel)
            depth = rel.count("/")
            _remove_empty(final.parents[:depth])
            _remove_empty(meta.parents[:depth])
        if not blocking_only:
            self._drop_unfinished(at_source)
        return tuple(removed)

    def _drop_unfinished(self, at_source: set[str]) -> None:
        """This folder's unfinished downloads (and their journals) of names the source no longer has."""
        unfinished = self.root / META_DIR / "incomplete"
        for temp in sorted(unfinished.rglob("*"), reverse=True) if unfinished.is_dir() else ():
            rel = temp.relative_to(unfinished).as_posix()
            name = rel.removesuffix(JOURNAL_SUFFIX)
            try:
                if temp.is_dir() and not temp.is_symlink():
                    temp.rmdir()  # only when empty
                elif name not in at_source and rel not in at_source:
                    temp.unlink()
            except OSError:
                pass


def _drop_leftovers(temps: Sequence[Path]) -> None:
    """The temporary files and journals of files already whole under their final names (best effort)."""
    for temp in temps:
        for path in (temp, journal_path(temp)):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove these folders, innermost first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


class HubLayout:
    """The Hugging Face cache: blobs named by content id, a snapshot of symlinks per commit, refs."""

    def __init__(self, cache_dir: Path, repo_id: str, commit: str, revision: str | None, subpath: str):
        self.repo = self.dest = repo_cache_dir(cache_dir, repo_id)
        self.commit, self.revision, self.subpath = commit, revision, subpath
        # huggingface_hub keeps its download locks here too; one lock file per repository for our pulls
        self.lock = Path(cache_dir) / ".locks" / self.repo.name / "fastload-pull.lock"

    def blob(self, e: Entry) -> Path:
        return self.repo / "blobs" / e.etag

    def temp(self, e: Entry) -> Path:
        return self.repo / "blobs" / (e.etag + INCOMPLETE)

    def needs_stat(self, e: Entry) -> bool:
        return False

    def present(self, e: Entry, info: ObjectInfo | None, verify: bool = False) -> bool:
        try:  # a regular file, as pulls and huggingface_hub leave them (a FIFO of an empty file's size hung readers)
            st = self.blob(e).lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_size != e.size:
                return False
        except OSError:
            return False
        return not verify or _holds(self.blob(e), _published(e))  # named by its sha256 (LFS) or git id

    def complete(self, e: Entry, info: ObjectInfo) -> None:
        os.replace(self.temp(e), self.blob(e))

    def prepare(self) -> None:
        """``snapshots/`` exists from the start: a cache holding only the blobs of an interrupted pull is one
        that ``hf cache scan`` reads (and ``hf cache delete`` cleans). The commit's own folder is made by
        ``finish``: huggingface_hub takes an existing one for a whole download (``snapshot_download`` of a
        commit, offline), and an interrupted pull's empty one was returned as the model."""
        own_dir(self.repo / "snapshots")

    def finish(self, entries: Sequence[Entry], single: bool) -> Path:
        snapshot = own_dir(self.repo / "snapshots" / self.commit)  # (links made in a folder linked elsewhere...)
        for e in entries:
            link = snapshot / self.subpath / e.rel
            link.parent.mkdir(parents=True, exist_ok=True)
            target = os.path.relpath(self.blob(e), link.parent)
            if not (link.is_symlink() and os.readlink(link) == target):
                tmp = link.with_name(link.name + INCOMPLETE)
                tmp.unlink(missing_ok=True)
                os.symlink(target, tmp)
                os.replace(tmp, link)
        if self.revision and self.revision != self.commit:
            _write_atomic(self.repo / "refs" / check_revision(self.revision, str(self.repo)), self.commit)
        if not single:  # what an offline load or pull of this folder finds complete (hub_refs.cached_snapshot)
            record = pull_record(self.repo, self.commit)
            try:
                folders = json.loads(read_regular(record, RECORD_BYTES, follow=False))
            except (OSError, ValueError):
                folders = {}
            folders = folders if isinstance(folders, dict) else {}
            folders[self.subpath.strip("/")] = sorted(e.rel for e in entries)
            _write_atomic(record, json.dumps(folders, sort_keys=True))
        return snapshot / self.subpath / entries[0].rel if single else snapshot / self.subpath

    def prune(self, at_source: set[str], blocking_only: bool = False) -> tuple[str, ...]:
        return ()  # a snapshot is one commit's: a file the next commit drops is not in its snapshot


def _holds(path: Path, checksum: str) -> bool:
    """Whether the file on disk still has the checksum it was pulled with (``verify`` re-checks it)."""
    try:
        verify_file(path, checksum)
    except (IntegrityError, OSError):
        return False
    return True


@contextmanager
def _writing(where: Path | str, url: str) -> Iterator[None]:
    """File-system errors of the destination as ``TransferError`` naming the path (a destination under a
    regular file, no permission, a full disk)."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, FastloadError):
            raise
        path = exc.filename or where
        raise TransferError(f"cannot write {path}: {exc.strerror or exc}", url=url) from exc


@asynccontextmanager
async def _exclusive(lock: Path, url: str, trace: Trace, plain_root: Path | None = None):
    """One pull at a time into a destination: a second one waits (traced as ``lock``), then finds the first
    one's files complete. ``flock`` goes with the process, so a killed pull never leaves it stuck. A plain
    destination's root is in PULLING_INTO while the lock is held: loads wait for the lock, and one made from
    this pull's own progress callback would wait for ever (sources/local.check_not_pulling_into)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with _writing(lock, url):
        lock.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(lock):  # planted: the lock file would be made wherever it points
            os.unlink(lock)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0), 0o644)
    try:
        with runner.private_to_process(fd):
            with trace.span("lock"):
                while True:  # polled, so that cancelling a waiting pull leaves no thread blocked in flock
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.1)
            token = PULLING_INTO.set(os.path.realpath(plain_root)) if plain_root is not None else None
            try:
                yield
            finally:
                if token is not None:
                    PULLING_INTO.reset(token)
    finally:
        try:  # unlocked explicitly: a process forked meanwhile shares the open file, and closing ours alone
            fcntl.flock(fd, fcntl.LOCK_UN)  # would leave the lock held until that child exits
        finally:
            os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = own_dir(path.parent) / (path.name + INCOMPLETE)
    with os.fdopen(open_own(tmp, os.O_WRONLY, fresh=True), "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# -- the pull --------------------------------------------------------------------------------------


def _plan(entries: Sequence[Entry], targets: Sequence[FileTarget], chunk_bytes: int) -> LoadPlan:
    """One U8 "tensor" per file, chunks over the bytes still missing: the loader's plan shape."""
    files, tensors, chunks = [], [], []
    for i, (e, t) in enumerate(zip(entries, targets)):
        size = t.info.size
        files.append(PlannedFile(t.info, 0, None))
        spec = TensorSpec(e.rel, DTYPES["U8"], (size,), i, 0, size)
        tensors.append(PlannedTensor(spec, (size,)))
        for start, end in t.missing:
            for at in range(start, end, chunk_bytes):
                stop = min(at + chunk_bytes, end)
                chunks.append(ChunkRead(len(chunks), i, at, stop, (Piece(i, at, stop - at, at),)))
    return LoadPlan(tuple(files), tuple(tensors), tuple(chunks), chunk_bytes)


def _check_directory(value, what: str) -> None:
    """``to`` / ``cache_dir``: None, or a path. ``""`` was the working directory, where the files landed; an
    int a TypeError that named neither."""
    if value is None:
        return
    path = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(path, str) or not path:
        raise ConfigError(f"pull({what}=...) must be a directory path (str or os.PathLike), got {value!r}")


def _destination(source: str, to, cache_dir, revision) -> tuple[str, Path | None]:
    """The source URL (with ``revision`` applied) and the plain destination (None: the hub cache)."""
    _check_directory(to, "to")
    _check_directory(cache_dir, "cache_dir")
    if scheme_of(source) == "hf":
        source = with_revision(source, revision)
        if to is not None and cache_dir is not None:
            raise ConfigError("give either a destination directory (to) or a cache directory, not both")
        return source, None if to is None else Path(to).expanduser()
    if revision is not None:
        raise ConfigError("a revision applies to hf:// sources only")
    if cache_dir is not None:
        raise ConfigError("a cache directory applies to hf:// sources only (use a destination directory)")
    if to is not None:
        return source, _not_the_source(source, Path(to).expanduser())  # ~ as in cache_dir (a shell leaves --to=~/x)
    name = (str(to_path(source)) if scheme_of(source) == "local" else unquote(_path_of(source)))
    name = name.rstrip("/\\").replace("\\", "/")
    name = name.rsplit("/", 1)[-1]
    single = _names_file(source) or (scheme_of(source) == "local" and os.path.isfile(to_path(source)))
    return source, _not_the_source(source, Path.cwd() if single else Path.cwd() / name)


def _not_the_source(source: str, destination: Path) -> Path:
    """``destination``, unless it is the local source's own directory (``fastload pull llama`` run in llama's
    parent, a file pulled where it lies): the pull would copy every file onto itself, each time."""
    if scheme_of(source) == "local":
        try:
            where = Path(to_path(source))
            where = where.parent if where.is_file() else where
            same = destination.is_dir() and os.path.samefile(where, destination)
        except OSError:  # the source is missing, or its name too long: the pull says so itself
            same = False
        if same:
            raise ConfigError(f"the destination {printable(str(destination))} is where the source already is: "
                              "give another one (to=, --to)")
    return destination


async def apull(source, *, to=None, cache_dir=None, revision=None, config: LoadConfig | None = None,
                trace: Trace | None = None, progress: Callable[[int, int], None] | None = None,
                verify: bool = False) -> PullResult:
    """``pull`` for async code; returns what it did as a :class:`PullResult`."""
    with runner.boundary():
        async with own_workers():  # file writes, flushes and hashes on a pool of the call's own
            return await _apull(source, to=to, cache_dir=cache_dir, revision=revision, config=config, trace=trace,
                                progress=progress, verify=verify)


async def _apull(source, *, to, cache_dir, revision, config, trace, progress, verify) -> PullResult:
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise ConfigError(f"source must be a path or URL, got {source!r}")
    source = normalize_url(source)
    check_progress(progress)
    progress = runner.guarded(progress)
    config = LoadConfig() if config is None else config  # (config={} or 0 is refused, as load refuses it)
    if not isinstance(config, LoadConfig):
        raise ConfigError("config must be a fastload.LoadConfig")
    verify = verify or config.verify_checksums
    config = config.replace(verify_checksums=verify)
    trace = as_trace(trace)
    source, plain = _destination(source, to, cache_dir, revision)
    scheme = scheme_of(source)
    transports = Transports(config, trace)
    trace.begin()  # (right before the try: each begin has its finish)
    error = None
    try:
        with trace.span("resolve"):
            await transports.prepare(source)
            if scheme == "hf":
                settings = HubSettings.from_env()
                ref = parse_hub_url(source)
                cache = Path(cache_dir).expanduser() if cache_dir is not None else settings.cache_dir
                if settings.offline:
                    found = cached_snapshot(cache, ref) if plain is None else None
                    if found is None:
                        raise SourceNotFoundError(f"HF_HUB_OFFLINE is set and {source} is not in the cache at {cache}",
                                                  url=source)
                    return PullResult(found, (), (), 0, 0)
                commit, entries = await _list_hub(source, transports)
                layout = PlainLayout(plain) if plain is not None else HubLayout(
                    cache, ref.repo_id, commit, ref.revision or "main",
                    ref.path if ref.is_dir else ref.path.rpartition("/")[0])
            else:
                listed = {"local": _list_local, "s3": _list_s3, "http": _list_http}[scheme]
                entries = await (listed(source, plain) if scheme == "local" else listed(source, transports))
                layout = PlainLayout(plain)
            single = (scheme == "hf" and not parse_hub_url(source).is_dir) or (len(entries) == 1 and (
                _names_file(source) or entries[0].url == source
                or (scheme == "local" and os.path.isfile(to_path(source)))))
            entries = _check_paths(entries, source)
            at_source = {e.rel for e in entries}  # what the source has, pulled or not
            listed, entries = entries, entries if single else _skip_other_formats(entries)
            if not single and scheme != "http":  # (an HTTP listing is its index's shards, each looked up)
                entries = await _check_shards(entries, listed, transports)
            if not entries:
                raise SourceNotFoundError(f"no files to pull under {source}", url=source)
            if isinstance(layout, PlainLayout):
                layout.source = _source_id(source, single)
        async with _exclusive(layout.lock, source, trace, layout.root if isinstance(layout, PlainLayout) else None):
            with _writing(layout.dest, source):
                layout.prepare()
                # a file of an earlier pull where the source now has a folder (or the other way round) first
                blocking = () if single else await in_worker(layout.prune, at_source, True)
            with trace.span("resolve"):
                judged = await _stat_all(entries, layout, transports, config.max_concurrency, verify)
            result = await _fetch(judged, layout, single, transports, config, trace, progress, verify)
            if single:
                return result
            with _writing(layout.dest, source):
                return replace(result, removed=blocking + await in_worker(layout.prune, at_source))
    except BaseException as exc:
        error = exc
        raise
    finally:
        await transports.aclose()
        trace.finish(error)


def _with_info(e: Entry, info: ObjectInfo) -> Entry:
    if e.size is not None and info.size != e.size:
        # The Hub's listing names the content (size and id): another size is other bytes. Elsewhere the object
        # changed between the listing and now.
        kind = IntegrityError if e.etag else SourceChangedError
        raise kind(f"the listing says {e.size} bytes, the server has {info.size}", url=e.url)
    return replace(e, size=info.size, info=info)


async def _stat_all(entries: list[Entry], layout, transports: Transports, limit: int,
                    verify: bool) -> list[tuple[Entry, bool]]:
    """Each entry, with ``info`` filled where the layout needs it to judge presence or the file must be
    fetched, and whether it is present (complete, and with ``verify`` still matching its checksum)."""
    gate = asyncio.Semaphore(limit)

    async def one(e: Entry) -> tuple[Entry, bool]:
        here = None
        if e.info is None and not layout.needs_stat(e):  # the listing says enough to judge presence
            here = await in_worker(layout.present, e, None, verify)
            if here:
                return e, True
        if e.info is None:
            async with gate:
                e = _with_info(e, await transports.for_url(e.url).stat(e.url))
        if here is None:
            here = await in_worker(layout.present, e, e.info, verify)
        return e, here

    return list(await gather(one(e) for e in entries))


async def _fetch(judged: list[tuple[Entry, bool]], layout, single: bool, transports: Transports,
                 config: LoadConfig, trace: Trace, progress, verify: bool) -> PullResult:
    entries = [e for e, _ in judged]
    present = [e for e, here in judged if here]
    if present:  # what a pull killed between a file's rename and its journal's removal left, or a stale partial
        await in_worker(_drop_leftovers, [layout.temp(e) for e in present])
    todo, shared = [], []  # shared: the same content as a file already in todo (the Hub's one blob, two paths)
    temps: set[Path] = set()
    for e, here in judged:
        if not here:
            (shared if layout.temp(e) in temps else todo).append(e)
            temps.add(layout.temp(e))
    targets = [FileTarget(layout.temp(e), e.info, _published(e)) for e in todo]
    for t in targets:
        t.done = resume_ranges(t.temp, t.info)
    # A file shared with one in todo (the Hub's one blob at two paths) is fetched once: its bytes count once.
    total = sum((e.info.size if e.info else e.size or 0) for e in entries if e not in shared)
    done = total - sum(t.info.size - sum(b - a for a, b in t.done) for t in targets)
    if progress is not None:
        progress(done, total)

    def advanced(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    with trace.span("plan"):
        missing = sum(end - start for t in targets for start, end in t.missing)
        plan = _plan(todo, targets, chunk_size(missing, config))
    verification = transports.verification  # set when verifying: files read whole are checked as they stream
    if verification is not None:
        transports.expect(plan)
    def complete(i: int) -> None:
        with _writing(targets[i].temp, todo[i].url):
            layout.complete(todo[i], targets[i].info)

    sink = FileSink(targets, on_complete=complete, verify=verify,
                    trace=trace, verified=lambda info: verification is not None and info.url in verification.verified())
    try:
        for i in range(len(targets)):
            if sink.remaining[i]:
                sink.open(i)
        for i in sink.initially_complete():
            await in_worker(sink.finish, i)
        if plan.chunks:
            pool = BufferPool(plan.chunk_bytes, max(2, config.host_buffer_bytes // plan.chunk_bytes))
            await run_plan(plan, transports=transports, sink=sink, pool=pool, trace=trace, emit=lambda _: None,
                           progress=advanced if progress is not None else None, workers=config.max_concurrency)
    except IntegrityError as exc:  # a file that failed its checksum as it streamed: drop it, do not resume it
        for t in targets:
            if t.info.url == exc.url:
                discard(t)
        raise
    finally:
        sink.close()
    with _writing(layout.dest, entries[0].url):
        path = await in_worker(layout.finish, entries, single)
    return PullResult(path, tuple(e.rel for e in todo + shared), tuple(e.rel for e in present), plan.total_bytes,
                      total)


def pull(source, *, to=None, cache_dir=None, revision=None, config: LoadConfig | None = None,
         trace: Trace | None = None, progress: Callable[[int, int], None] | None = None,
         verify: bool = False) -> Path:
    """Pre-stage a model directory (weights, config, tokenizer and other files) on local disk.

    ``hf://`` sources go to the Hugging Face cache (``cache_dir``, default ``HF_HUB_CACHE`` / ``HF_HOME/hub``)
    unless ``to`` names a plain directory; other sources go to ``to`` (default: ``./<last path segment>``).
    ``progress(done_bytes, total_bytes)`` is called as chunks land; ``verify`` (or ``config.verify_checksums``)
    checks each file against the checksum its source publishes (the Hub's sha256 of LFS files, S3's
    ``ChecksumSHA256``, HTTP ``Repr-Digest``): as it streams when read whole, else once written. Returns where the
    files are.
    """
    return runner.run(lambda: apull(source, to=to, cache_dir=cache_dir, revision=revision, config=config,
                                    trace=trace, progress=progress, verify=verify)).path
