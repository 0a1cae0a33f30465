"""Resolve a source into checkpoint files, then read and parse their headers.

``source`` is one URL/path or a list of them. A directory (a local dir, or a
URL/prefix ending in ``/``) is a checkpoint directory: its
``model.safetensors.index.json`` when present, else ``model.safetensors``, else
(where the scheme can list) every ``*.safetensors`` in it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence
from urllib.parse import quote, urlsplit, urlunsplit

from .errors import ConfigError, FormatError, SourceNotFoundError, SourcePermissionError
from .format import (INDEX_NAME, SINGLE_NAME, FileHeader, ShardIndex, header_length,
                     parse_header, parse_index)
from .redact import redact_url
from .runner import gather
from .sources import ObjectInfo, Segment, Transports, normalize_url, read_bytes, scheme_of
from .sources.local import is_dir, not_while_pulled, to_path

MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True)
class Resolved:
    """The checkpoint files, and each index that named some of them: ``(position of its first shard in
    files, the index)``; a list of sources may hold several checkpoint directories."""

    files: tuple[ObjectInfo, ...]
    indexes: tuple[tuple[int, ShardIndex], ...] = ()


def join(base: str, name: str) -> str:
    """``name`` (already checked not to escape) relative to directory ``base``. An HTTP(S) base keeps its
    query (a token such as an Azure SAS goes with every file) and gets the name percent-encoded into its path."""
    scheme = scheme_of(base)
    if scheme == "local":
        return os.path.join(str(to_path(base)), name)
    if scheme == "http":
        parts = urlsplit(base)
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        return urlunsplit(parts._replace(path=path + quote(name, safe="/~!$&'()*+,;=:@"), fragment=""))
    return (base if base.endswith("/") else base + "/") + name


def parent(url: str) -> str:
    """The directory ``url`` names a file in (an HTTP(S) URL keeps its query, as in :func:`join`)."""
    scheme = scheme_of(url)
    if scheme == "local":
        return os.path.dirname(str(to_path(url)))
    if scheme == "http":
        parts = urlsplit(url)
        return urlunsplit(parts._replace(path=parts.path.rpartition("/")[0] + "/", fragment=""))
    return url.rpartition("/")[0] + "/"


def _pinned(directory: str) -> str:
    """A local checkpoint directory with its symbolic links resolved, once, before its index is read: the
    index and every shard are then opened in the one directory it named at that instant. Opened through the
    name as given, a release link switched mid-load (``current -> v2``, as ``ln -sfn`` or Kubernetes' volume
    writer do it) gave the first shards of one release and the rest of the other, each file consistent in
    itself, the checkpoint not."""
    return os.path.realpath(to_path(directory))


def _check_url(url: str) -> None:
    """A remote URL that cannot be parsed (``http://[::1/x``, a port that is not a number) or has no host
    is the caller's mistake: a ConfigError now, not a ValueError from deep inside a transport."""
    if scheme_of(url) not in ("http", "s3"):
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- parsing the port is what raises
    except ValueError:
        parts = None
    if parts is None:  # raised out here, with no parse error as its context: that may quote a password cut at a
        # raw "#" as the port
        raise ConfigError(f"not a valid URL (a bracketed host or port that does not parse): {redact_url(url)}")
    if not parts.hostname:
        raise ConfigError(f"no host in URL: {redact_url(url)}")


def _url_path(url: str) -> str:
    """The part of a remote URL that names the object: no query string or fragment."""
    return urlsplit(url).path if scheme_of(url) in ("http", "https") else url


def _is_dir_url(url: str) -> bool | None:
    """True for a checkpoint directory, False for one file; None when only the store can tell
    (an S3 key without a file extension may be an object or a prefix)."""
    scheme = scheme_of(url)
    if scheme == "local":
        return is_dir(to_path(url))
    path = _url_path(url)
    if path.endswith("/"):
        return True
    if scheme == "s3":
        key = url[5:].partition("/")[2]
        return True if not key else False if key.endswith((".safetensors", ".json")) else None
    return False


async def _try_stat(transports: Transports, url: str, denied: list[SourcePermissionError]) -> ObjectInfo | None:
    """The object at ``url``, or None when there is none. S3 answers 403 for a missing key to a caller without
    ListBucket (a common read-only policy): that counts as none too, noted in ``denied``. A local dangling link
    (into a half-deleted hub cache) is an error, not a reason to load other files in its place."""
    try:
        return await transports.for_url(url).stat(url)
    except SourceNotFoundError:
        if scheme_of(url) == "local" and os.path.islink(url):  # a dangling link: there, its target is not
            raise
        return None
    except SourcePermissionError as exc:
        if scheme_of(url) != "s3":
            raise
        denied.append(exc)
        return None


async def read_index(transports: Transports, info: ObjectInfo) -> tuple[ShardIndex, ObjectInfo]:
    """The shard index ``info``, read whole and checked (its size is capped before anything is read), and
    ``info`` holding those bytes as its prefix: a later read of the file (a pull's copy) asks for nothing."""
    if info.size > MAX_INDEX_BYTES:
        raise FormatError(f"{info.url}: index of {info.size} bytes is larger than the {MAX_INDEX_BYTES}-byte cap")
    raw = await read_bytes(transports.for_url(info.url), info, 0, info.size)
    return parse_index(raw, url=info.url), replace(info, prefix=raw)


async def _from_index(transports: Transports, info: ObjectInfo, url: str) -> Resolved:
    """The shards of the index ``info``, found at ``url`` (the URL as given: ``info.url`` is what messages
    show, with any password or token hidden, and the shards need them)."""
    index, _ = await read_index(transports, info)
    base = parent(url)
    urls = [join(base, name) for name in index.files]
    files = await gather(transports.for_url(u).stat(u) for u in urls)
    return Resolved(tuple(files), ((0, index),))


async def _resolve_dir(transports: Transports, url: str) -> Resolved:
    base = url if scheme_of(url) in ("local", "http") or url.endswith("/") else url + "/"
    denied: list[SourcePermissionError] = []
    index = await _try_stat(transports, join(base, INDEX_NAME), denied)
    if index is not None:
        return await _from_index(transports, index, join(base, INDEX_NAME))
    single = await _try_stat(transports, join(base, SINGLE_NAME), denied)
    if single is not None:
        return Resolved((single,))
    if denied:  # neither found, one refused: wrong credentials say 403 too, and a listing would be refused
        raise denied[0]
    listed = await transports.for_url(url).list(base)
    names = sorted(u for u in (listed or []) if u.endswith(".safetensors"))
    if not names:
        how = "" if listed is not None else f" (and {scheme_of(url)} sources cannot be listed)"
        raise SourceNotFoundError(f"no {INDEX_NAME}, {SINGLE_NAME} or *.safetensors under {url}{how}", url=url)
    return Resolved(tuple(await gather(transports.for_url(u).stat(u) for u in names)))


async def resolve(source: str | os.PathLike | Sequence[str | os.PathLike], transports: Transports,
                  found: tuple[str, ObjectInfo] | None = None) -> Resolved:
    """The files ``source`` names. ``found``: a file's URL and what looking it up gave, taken instead of asking
    again when ``source`` is that URL (from_pretrained has looked for the weights already)."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise ConfigError("empty list of sources")
        if len(source) == 1:  # exactly what the element alone names: an index or directory keeps its checks
            return await resolve(source[0], transports)
        parts = await gather(resolve(s, transports) for s in source)
        files: list[ObjectInfo] = []
        indexes: list[tuple[int, ShardIndex]] = []
        for part in parts:  # each member's files in turn; an index keeps to the files it named
            indexes += [(len(files) + first, index) for first, index in part.indexes]
            files += part.files
        return Resolved(tuple(files), tuple(indexes))
    url = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(url, str) or not url:
        raise ConfigError(f"source must be a path, URL or list of them, got {source!r}")
    url = normalize_url(url)
    _check_url(url)
    await transports.prepare(url)
    if scheme_of(url) == "hf":  # the local hub cache when it holds the checkpoint, else pinned to one commit
        url = await transports.for_url(url).locate(url)
    is_dir = _is_dir_url(url)
    if is_dir is None:  # an object of that name if there is one, else a prefix
        try:
            info = await transports.for_url(url).stat(url)
        except SourceNotFoundError:
            return await _resolve_dir(transports, url)
        except SourcePermissionError as denied:  # S3 says 403 for a missing key without ListBucket
            try:
                return await _resolve_dir(transports, url)
            except (SourceNotFoundError, SourcePermissionError):
                raise denied from None  # not a prefix either: the object named was refused
        return Resolved((info,))
    local = scheme_of(url) == "local"
    if is_dir and not local:
        return await _resolve_dir(transports, url)
    if is_dir:
        url = _pinned(url)
        async with not_while_pulled(url, transports.trace):
            return await _resolve_dir(transports, url)
    if local and url.endswith(".json"):  # an index: its shards are read from the directory it is in then
        url = os.path.join(_pinned(parent(url)), os.path.basename(to_path(url)))
        async with not_while_pulled(parent(url), transports.trace):
            return await _from_index(transports, await transports.for_url(url).stat(url), url)
    try:
        info = found[1] if found is not None and found[0] == url else await transports.for_url(url).stat(url)
    except SourceNotFoundError:
        if scheme_of(url) == "s3" and await transports.for_url(url).no_such_bucket(url):
            raise SourceNotFoundError(f"no such bucket: {url}", url=url) from None
        raise
    if _url_path(url).endswith(".json"):
        return await _from_index(transports, info, url)
    return Resolved((info,))


async def read_header(transports: Transports, info: ObjectInfo, file: int) -> FileHeader:
    """Two small reads: the 8-byte length (unless the size probe brought it), then exactly the JSON header
    (never tensor bytes)."""
    transport = transports.for_url(info.url)
    want = min(info.size, 8)
    # The size probe brought it (and counted it as fetched): one read fewer. A checksum verified as the file
    # streams starts its hash with these bytes.
    if len(info.prefix) >= want:
        prefix = info.prefix[:want]
        verifier = transports.verification.verifier(info) if transports.verification is not None else None
        if verifier is not None:
            await verifier.feed([Segment(0, memoryview(prefix))])
    else:
        prefix = await read_bytes(transport, info, 0, want)
    data_start = header_length(prefix, url=info.url, file_size=info.size)
    raw = await read_bytes(transport, info, 8, data_start)
    return parse_header(raw, url=info.url, file_size=info.size, file=file)
