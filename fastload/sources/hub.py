"""``hf://org/name[@revision][/path]``: the Hugging Face Hub over fastload's HTTP transport, and its local cache.

Bytes come from ``{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}`` (ranged GETs
through :class:`HttpTransport`, with ``Authorization: Bearer $HF_TOKEN`` when a
token is set; aiohttp drops it on a redirect to another host, such as the
Hub's CDN). The file listing and the commit a revision points to come from
``{HF_ENDPOINT}/api/models/{repo}/revision/{revision}?blobs=true``.

A load first looks in the local hub cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), laid out as
``huggingface_hub`` lays it out (``models--org--name/{refs,blobs,snapshots}``).
When the snapshot there holds the whole checkpoint, the load reads those files
and makes no network call; otherwise it streams from the Hub, pinned to one
commit. With ``HF_HUB_OFFLINE=1`` a checkpoint missing from the cache is an
error. These ``HF_*`` variables are the Hugging Face conventions users expect,
read here only, when a hub source is resolved.

``huggingface_hub`` is not needed: the protocol and the cache layout are small
and public, and implementing them here keeps ``hf://`` working in a bare
install.
"""

from __future__ import annotations

import asyncio
import json
import os
import posixpath
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from yarl import URL

from ..config import LoadConfig
from ..errors import ConfigError, FormatError, SourceNotFoundError, SourcePermissionError, TransferError
from ..format import INDEX_NAME, SINGLE_NAME, parse_index
from ..redact import describe, scrub
from ..trace import Trace
from .base import ObjectInfo, Segment
from .http import HttpTransport, check_status
from .retry import RetryPolicy, Transient

DEFAULT_ENDPOINT = "https://huggingface.co"
COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_TRUE = {"1", "on", "yes", "true"}
MAX_LISTING_BYTES = 64 << 20
MAX_REDIRECTS = 5


def _origin(url: str) -> tuple[str, str]:
    parsed = urlsplit(url)
    return parsed.scheme, parsed.netloc


@dataclass(frozen=True)
class HubSettings:
    """Where the Hub is, who we are and where its cache lives (from the ``HF_*`` variables)."""

    cache_dir: Path
    endpoint: str = DEFAULT_ENDPOINT
    token: str | None = None
    offline: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "HubSettings":
        env = os.environ if environ is None else environ
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = env.get("HF_HUB_CACHE") or os.path.join(home, "hub")
        offline = (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in _TRUE
        endpoint = (env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        if not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"HF_ENDPOINT must be an http(s) URL, got {endpoint!r}")
        token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None
        return cls(Path(os.path.expandvars(cache)).expanduser(), endpoint, token, offline)


@dataclass(frozen=True)
class HubRef:
    """A parsed ``hf://`` URL. ``path`` is inside the repo; "" or ending in "/" names a folder."""

    repo_id: str
    revision: str | None = None  # None: the default branch
    path: str = ""

    @property
    def rev(self) -> str:
        return self.revision or "main"

    @property
    def is_dir(self) -> bool:
        return not self.path or self.path.endswith("/")

    @property
    def pinned(self) -> bool:
        return self.revision is not None and COMMIT.fullmatch(self.revision) is not None

    def url(self, path: str | None = None, revision: str | None = None) -> str:
        rev = revision or self.revision
        at = f"@{quote(rev, safe='')}" if rev else ""
        return f"hf://{self.repo_id}{at}/{self.path if path is None else path}"


def parse_hub_url(url: str) -> HubRef:
    """``hf://org/name[@revision][/path]``; a revision holding ``/`` is percent-encoded (``refs%2Fpr%2F1``)."""
    if not url.startswith("hf://"):
        raise ConfigError(f"not an hf:// URL: {url!r}")
    parts = url[5:].split("/")
    if parts and parts[0] == "models":
        parts = parts[1:]
    if len(parts) < 2:
        raise ConfigError(f"hf:// URLs name a repository as hf://org/name[@revision], got {url!r}")
    org, name = parts[0], parts[1]
    name, _, revision = name.partition("@")
    if not (_REPO_PART.fullmatch(org) and _REPO_PART.fullmatch(name)) or ".." in org + name:
        raise ConfigError(f"not a Hub repository id: {org}/{name!r} in {url!r}")
    path = "/".join(parts[2:])
    if path and (posixpath.normpath(path.rstrip("/")) != path.rstrip("/") or path.startswith("/")
                 or any(p in ("..", ".") for p in path.split("/"))):
        raise ConfigError(f"path {path!r} in {url!r} is not a plain path inside the repository")
    return HubRef(f"{org}/{name}", unquote(revision) or None, path)


def with_revision(url: str, revision: str | None) -> str:
    """``url`` at ``revision`` (a ConfigError if the URL already names another one)."""
    if revision is None:
        return url
    ref = parse_hub_url(url)
    if ref.revision is not None and ref.revision != revision:
        raise ConfigError(f"{url} names revision {ref.revision!r} but revision={revision!r} was given")
    return ref.url(revision=revision)


# -- the local cache (huggingface_hub's layout) -----------------------------------------------------


def repo_cache_dir(cache_dir: Path, repo_id: str) -> Path:
    return Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))


def cached_commit(cache_dir: Path, ref: HubRef) -> str | None:
    """The commit ``ref``'s revision points to in the cache (``refs/<revision>``), if known."""
    repo = repo_cache_dir(cache_dir, ref.repo_id)
    if ref.pinned:
        return ref.revision
    try:
        commit = (repo / "refs" / ref.rev).read_text().strip()
    except (OSError, ValueError):
        return None
    return commit if COMMIT.fullmatch(commit) else None


def _complete_checkpoint(folder: Path) -> bool:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            names = parse_index(index.read_bytes(), url=str(index)).files
        except (OSError, FormatError):
            return False
        return all((folder / name).is_file() for name in names)
    return (folder / SINGLE_NAME).is_file()


def cached_snapshot(cache_dir: Path, ref: HubRef) -> Path | None:
    """The local path for ``ref`` when the cache holds its whole checkpoint (else None)."""
    commit = cached_commit(cache_dir, ref)
    if commit is None:
        return None
    snapshot = repo_cache_dir(cache_dir, ref.repo_id) / "snapshots" / commit
    target = snapshot / ref.path if ref.path else snapshot
    if ref.is_dir:
        return target if _complete_checkpoint(target) else None
    return target if target.is_file() else None


# -- the Hub's HTTP API -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoFile:
    path: str
    size: int | None
    blob: str | None  # what huggingface_hub names the cached blob: the LFS sha256, else the git blob id
    sha256: str | None


@dataclass(frozen=True)
class RepoInfo:
    repo_id: str
    commit: str
    files: tuple[RepoFile, ...]


def parse_repo_info(doc: object, repo_id: str, url: str) -> RepoInfo:
    if not isinstance(doc, dict) or not isinstance(doc.get("sha"), str) or not COMMIT.fullmatch(doc["sha"]):
        raise FormatError(f"{url}: the Hub's answer has no commit sha")
    files = []
    for sibling in doc.get("siblings") or []:
        if not isinstance(sibling, dict) or not isinstance(sibling.get("rfilename"), str):
            raise FormatError(f"{url}: malformed file entry {sibling!r}")
        lfs = sibling.get("lfs") if isinstance(sibling.get("lfs"), dict) else None
        sha256 = lfs.get("sha256") if lfs else None
        size = lfs.get("size") if lfs else sibling.get("size")
        blob = sha256 or sibling.get("blobId")
        if (sha256 is not None and not _SHA256.fullmatch(str(sha256))) or not (
                blob is None or COMMIT.fullmatch(str(blob)) or _SHA256.fullmatch(str(blob))):
            raise FormatError(f"{url}: file entry {sibling['rfilename']!r} has a malformed blob id")
        files.append(RepoFile(sibling["rfilename"], size if isinstance(size, int) else None, blob, sha256))
    return RepoInfo(repo_id, doc["sha"], tuple(files))


class HubTransport:
    """``hf://`` URLs: stat/read through the HTTP transport, list through the Hub API, locate in the cache.

    Two HTTP sessions: one for the Hub itself, carrying the token, and one without it for the CDN that LFS files
    redirect to. A file's redirect is followed once, at stat; its chunks are then read from the CDN directly
    (as ``huggingface_hub`` does), which spares the Hub one request per chunk.
    """

    def __init__(self, config: LoadConfig, policy: RetryPolicy, trace: Trace, settings: HubSettings | None = None):
        self.settings = settings or HubSettings.from_env()
        headers = dict(config.http_headers)
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        self.policy = policy
        self.api = HttpTransport(config.replace(http_headers=headers), policy, trace)
        self.cdn = HttpTransport(config, policy, trace)
        self._origin = _origin(self.settings.endpoint)
        self._infos: dict[tuple[str, str], RepoInfo] = {}

    def resolve_url(self, ref: HubRef, path: str | None = None) -> str:
        path = ref.path if path is None else path
        return f"{self.settings.endpoint}/{ref.repo_id}/resolve/{quote(ref.rev, safe='')}/{quote(path)}"

    def _http(self, url: str) -> HttpTransport:
        return self.api if _origin(url) == self._origin else self.cdn

    async def stat(self, url: str) -> ObjectInfo:
        ref = parse_hub_url(url)
        if ref.is_dir:
            raise SourceNotFoundError(f"{url} names a folder, not a file", url=url)
        target, linked = await self.policy.run(lambda: self._follow(self.resolve_url(ref), url), url=url,
                                               byte_range=None)
        info = await self._http(target).stat_fetch_url(target, url)
        sha256 = (linked or "").removeprefix("W/").strip('"')
        return replace(info, checksum=f"sha256:{sha256}") if _SHA256.fullmatch(sha256) else info

    async def _follow(self, fetch: str, shown: str) -> tuple[str, str | None]:
        """Where the Hub sends a resolve request -- itself (small files) or the CDN (LFS files) -- and the
        ``X-Linked-Etag`` it names an LFS file by (its sha256)."""
        linked = None
        for _ in range(MAX_REDIRECTS):
            try:
                resp = await self._http(fetch).session().head(fetch, allow_redirects=False)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                raise Transient(describe(scrub(exc))) from exc
            async with resp:
                linked = resp.headers.get("X-Linked-Etag") or linked
                location = resp.headers.get("Location")
                if resp.status not in (301, 302, 303, 307, 308) or not location:
                    self._check(resp, shown)
                    return fetch, linked
                fetch = str(resp.url.join(URL(location)))
            if _origin(fetch) != self._origin:
                return fetch, linked  # the CDN: its presigned URL is read directly
        raise TransferError(f"more than {MAX_REDIRECTS} redirects", url=shown)

    def _check(self, resp: aiohttp.ClientResponse, shown: str) -> None:
        try:
            check_status(resp.status, resp.reason, url=shown, headers=resp.headers)
        except SourcePermissionError as exc:
            hint = "" if self.settings.token else " (private or gated repository? set HF_TOKEN)"
            raise SourcePermissionError(f"{exc}{hint}", url=shown) from exc

    async def read(self, info: ObjectInfo, segments: list[Segment], record=None) -> int:
        http = self._http(info.fetch_url or "")
        if record is None:
            return await http.read(info, segments)
        return await http.read(info, segments, record=record)

    async def list(self, url: str) -> list[str] | None:
        ref = parse_hub_url(url)
        prefix = ref.path if not ref.path or ref.path.endswith("/") else ref.path + "/"
        info = await self.repo_info(ref)
        return [ref.url(f.path, info.commit) for f in info.files
                if f.path.startswith(prefix) and "/" not in f.path[len(prefix):]]

    async def repo_info(self, ref: HubRef) -> RepoInfo:
        """The commit ``ref``'s revision points to and the repository's files (asked once per transport)."""
        key = (ref.repo_id, ref.rev)
        if key not in self._infos:
            self._infos[key] = await self._fetch_repo_info(ref)
        return self._infos[key]

    async def _fetch_repo_info(self, ref: HubRef) -> RepoInfo:
        api = f"{self.settings.endpoint}/api/models/{ref.repo_id}/revision/{quote(ref.rev, safe='')}?blobs=true"
        shown = f"hf://{ref.repo_id}@{ref.rev}"
        raw = await self.policy.run(lambda: self._get(api, shown), url=shown, byte_range=None)
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise FormatError(f"{shown}: the Hub's repository listing is not JSON") from exc
        return parse_repo_info(doc, ref.repo_id, shown)

    async def _get(self, url: str, shown: str) -> bytes:
        try:
            resp = await self.api.session().get(url, allow_redirects=True)
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            raise Transient(describe(scrub(exc))) from exc
        async with resp:
            try:
                self._check(resp, shown)
            except SourceNotFoundError as exc:
                raise SourceNotFoundError(f"no such repository or revision on {self.settings.endpoint}: {shown}",
                                          url=shown) from exc
            try:
                body = await resp.content.read(MAX_LISTING_BYTES + 1)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                raise Transient(f"listing broke off: {describe(scrub(exc))}") from exc
        if len(body) > MAX_LISTING_BYTES:
            raise FormatError(f"{shown}: repository listing larger than {MAX_LISTING_BYTES} bytes")
        return body

    async def locate(self, url: str) -> str:
        """Where to read ``url`` from: its local cache path when complete, else ``url`` pinned to a commit."""
        ref = parse_hub_url(url)
        cached = cached_snapshot(self.settings.cache_dir, ref)
        if cached is not None:
            return str(cached)
        if self.settings.offline:
            raise SourceNotFoundError(
                f"{url} is not in the Hugging Face cache at {self.settings.cache_dir} and HF_HUB_OFFLINE is set "
                f"(run `fastload pull {url}` while online)", url=url)
        commit = ref.revision if ref.pinned else (await self.repo_info(ref)).commit
        return ref.url(revision=commit)

    async def aclose(self) -> None:
        self._infos.clear()
        await self.api.aclose()
        await self.cdn.aclose()
