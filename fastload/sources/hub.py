"""``hf://org/name[@revision][/path]``: the Hugging Face Hub over fastload's HTTP transport, and its local cache.

(References, settings and cache lookups live in ``hub_refs.py``, which needs no network stack.)

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
import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import aiohttp
from yarl import URL

from ..config import LoadConfig, without_credentials
from ..errors import FormatError, IntegrityError, SourceNotFoundError, SourcePermissionError, TransferError
from ..redact import describe, printable, scrub
from ..format import parse_index
from ..integrity import verify_file
from ..runner import in_worker
from ..trace import Trace
from .base import ObjectInfo, Segment
from .http import BadRequest, HttpTransport, check_status, probe_headers
from .hub_refs import (_SHA256, MAX_LISTING_BYTES, MAX_REDIRECTS, HubRef, HubSettings, RepoInfo, _origin,
                       cached_snapshot, parse_hub_url, parse_repo_info)
from .retry import RetryPolicy, Transient


def _verify_cached(cached: Path, url: str) -> None:
    """Each weights file of the cached snapshot ``cached`` (a folder's own, or the file) that links to a blob
    named by its sha256 (an LFS file's, as the cache names them) holds those bytes: ``IntegrityError`` if not."""
    if cached.is_dir():
        files = sorted(p for p in cached.iterdir() if p.name.endswith(".safetensors"))
    elif cached.name.endswith(".json"):  # an index named directly: its shards (cached_snapshot found them all)
        files = [cached.parent / name for name in parse_index(cached.read_bytes(), url=url).files]
    else:
        files = [cached]
    for path in files:
        blob = os.path.realpath(path)
        if _SHA256.fullmatch(os.path.basename(blob)):
            verify_file(blob, f"sha256:{os.path.basename(blob)}", url=f"{url} ({path.name})")


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
        self.cdn = HttpTransport(without_credentials(config), policy, trace)  # credentials stay with the Hub
        self._origin = _origin(self.settings.endpoint)
        self._infos: dict[tuple[str, str], RepoInfo] = {}
        self._cdn_urls: dict[str, str] = {}  # hf:// URL -> the CDN URL last handed out for it
        self._verify = config.verify_checksums

    def resolve_url(self, ref: HubRef, path: str | None = None) -> str:
        path = ref.path if path is None else path
        return f"{self.settings.endpoint}/{ref.repo_id}/resolve/{quote(ref.rev, safe='')}/{quote(path)}"

    def _http(self, url: str) -> HttpTransport:
        return self.api if _origin(url) == self._origin else self.cdn

    async def stat(self, url: str) -> ObjectInfo:
        ref = parse_hub_url(url)
        if ref.is_dir:
            raise SourceNotFoundError(f"{url} names a folder, not a file", url=url)
        listed = self._infos.get((ref.repo_id, ref.rev))
        if listed is not None and not any(f.path == ref.path for f in listed.files):
            # The commit's listing (already asked for) says it is not there: a 404 without the round trip (the
            # probe of model.safetensors where an index is found, or the index's where the file is single).
            raise SourceNotFoundError(f"not found: no {ref.path!r} in {url} (the Hub's listing of {listed.commit})",
                                      url=url)
        target, linked, linked_size, info = await self.policy.run(
            lambda: self._follow(self.resolve_url(ref), url, probe=True), url=url, byte_range=None, request=True)
        if info is None:  # sent on to the CDN: the probe asks there
            info = await self._http(target).stat_fetch_url(target, url)
        if linked_size is not None and linked_size != info.size:  # the CDN serves other bytes than the Hub names
            raise IntegrityError(f"the Hub says {linked_size} bytes (X-Linked-Size), the CDN serves {info.size}",
                                 url=url)
        sha256 = (linked or "").removeprefix("W/").strip('"')
        return replace(info, checksum=f"sha256:{sha256}") if _SHA256.fullmatch(sha256) else info

    async def _follow(self, fetch: str, shown: str, probe: bool = False
                      ) -> tuple[str, str | None, int | None, ObjectInfo | None]:
        """Where the Hub sends a resolve request -- itself (small files) or the CDN (LFS files) -- and the
        ``X-Linked-Etag`` and ``X-Linked-Size`` it names an LFS file by (its sha256 and size).

        With ``probe`` the requests are the size probe's ranged GETs, not HEADs: a file the Hub serves itself (an
        index, a config) is then found and probed in one round trip, returned as the last item (None when the
        reply sent the request on to the CDN, where the caller probes)."""
        linked = linked_size = None
        for _ in range(MAX_REDIRECTS):
            try:
                http = self._http(fetch)
                resp = await http.session().request("GET" if probe else "HEAD", fetch, allow_redirects=False,
                                                    headers=probe_headers(fetch) if probe else None,
                                                    **http.options(fetch))
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                raise Transient(describe(scrub(exc))) from exc
            async with resp:
                linked = resp.headers.get("X-Linked-Etag") or linked
                size = (resp.headers.get("X-Linked-Size") or "").strip()
                if size.isascii() and size.isdigit():
                    if len(size) > 19:  # past int64: no file's size (and int() of 5000 digits raises)
                        raise IntegrityError(f"{shown}: the Hub names an LFS file size of {len(size)} digits")
                    linked_size = int(size)
                location = resp.headers.get("Location")
                if resp.status not in (301, 302, 303, 307, 308) or not location:
                    if not probe or resp.status in (401, 403, 404):  # (why, in the Hub's words)
                        self._check(resp, shown)
                    info = await http.probe_reply(resp, fetch, shown) if probe else None
                    return fetch, linked, linked_size, info
                if probe:  # the redirect's few bytes read, so that its connection serves the next request
                    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                        await resp.content.read(1 << 16)
                fetch = str(resp.url.join(URL(location)))
            if _origin(fetch) != self._origin:
                return fetch, linked, linked_size, None  # the CDN: its presigned URL is read directly
        raise TransferError(f"more than {MAX_REDIRECTS} redirects", url=shown)

    def _check(self, resp: aiohttp.ClientResponse, shown: str) -> None:
        try:
            check_status(resp.status, resp.reason, url=shown, headers=resp.headers)
        except SourcePermissionError as exc:
            # The Hub says why in X-Error-Message ("... not in the authorized list. Visit ... to ask for
            # access"), as huggingface_hub shows it; a token it refuses is named as the cause.
            why = printable(" ".join((resp.headers.get("X-Error-Message") or "").split()))[:300]
            if not self.settings.token:
                hint = " (private or gated repository? set HF_TOKEN)"
            elif resp.status == 401:
                hint = " (HF_TOKEN was sent and refused: expired, revoked, or for another endpoint?)"
            elif resp.headers.get("X-Error-Code") == "GatedRepo":
                hint = " (a gated repository: request access on its page, for the account of HF_TOKEN)"
            else:
                hint = ""
            raise SourcePermissionError(f"{exc}{hint}" + (f": the Hub says: {why}" if why else ""),
                                        url=shown) from exc

    async def read(self, info: ObjectInfo, segments: list[Segment], record=None) -> int:
        latest = self._cdn_urls.get(info.url)
        if latest is not None and latest != info.fetch_url:
            info = replace(info, fetch_url=latest)
        try:
            return await self._http(info.fetch_url or "").read(info, segments, record)
        except (SourcePermissionError, BadRequest):  # 400: a presigned URL's temporary credentials expired
            if not info.fetch_url or _origin(info.fetch_url) == self._origin:
                raise
        # The CDN refused its own signed URL: they expire (about an hour), and a long load outlives them.
        # Ask the Hub where the file is again (the URL is pinned to the commit) and read from there once;
        # unless another read of the file has asked meanwhile: its new URL is tried first.
        latest = self._cdn_urls.get(info.url)
        if latest is not None and latest != info.fetch_url:
            try:
                return await self._http(latest).read(replace(info, fetch_url=latest), segments, record)
            except (SourcePermissionError, BadRequest):
                pass
        ref = parse_hub_url(info.url)
        target, _, _, _ = await self.policy.run(lambda: self._follow(self.resolve_url(ref), info.url), url=info.url,
                                                byte_range=None, request=True)
        self._cdn_urls[info.url] = target
        return await self._http(target).read(replace(info, fetch_url=target), segments, record)

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
            info = await self._fetch_repo_info(ref)
            # and under its commit: the load pins the revision to it and asks again (the listing, a round trip)
            self._infos[key] = self._infos[(ref.repo_id, info.commit)] = info
        return self._infos[key]

    async def _fetch_repo_info(self, ref: HubRef) -> RepoInfo:
        api = f"{self.settings.endpoint}/api/models/{ref.repo_id}/revision/{quote(ref.rev, safe='')}?blobs=true"
        shown = f"hf://{ref.repo_id}@{ref.rev}"
        raw = await self.policy.run(lambda: self._get(api, shown), url=shown, byte_range=None, request=True)
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise FormatError(f"{shown}: the Hub's repository listing is not JSON ({str(exc)[:100]})") from None
        return parse_repo_info(doc, ref.repo_id, shown)

    async def _get(self, url: str, shown: str) -> bytes:
        try:
            resp = await self.api.session().get(url, allow_redirects=True, **self.api.options(url))
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            raise Transient(describe(scrub(exc))) from exc
        async with resp:
            try:
                self._check(resp, shown)
            except SourceNotFoundError as exc:
                raise SourceNotFoundError(f"no such repository or revision on {self.settings.endpoint}: {shown}",
                                          url=shown) from exc
            body = bytearray()
            try:  # read(n) returns what has arrived, up to n: a listing of many TCP segments takes many
                while len(body) <= MAX_LISTING_BYTES and (part := await resp.content.read(MAX_LISTING_BYTES + 1)):
                    body += part
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                raise Transient(f"listing broke off: {describe(scrub(exc))}") from exc
        if len(body) > MAX_LISTING_BYTES:
            raise FormatError(f"{shown}: repository listing larger than {MAX_LISTING_BYTES} bytes")
        return bytes(body)

    async def locate(self, url: str) -> str:
        """Where to read ``url`` from: its local cache path when complete, else ``url`` pinned to a commit."""
        ref = parse_hub_url(url)
        cached = cached_snapshot(self.settings.cache_dir, ref)
        if cached is not None:
            if self._verify:  # the cache's copy, read in place of the Hub's: checked against what names it
                await in_worker(_verify_cached, cached, url)
            return str(cached)
        if self.settings.offline:
            raise SourceNotFoundError(
                f"{url} is not in the Hugging Face cache at {self.settings.cache_dir} and HF_HUB_OFFLINE is set "
                f"(run `fastload pull {url}` while online)", url=url)
        return await self.pinned(url)

    async def pinned(self, url: str) -> str:
        """``url`` on the Hub, its revision resolved to the commit it points to now."""
        ref = parse_hub_url(url)
        commit = ref.revision if ref.pinned else (await self.repo_info(ref)).commit
        return ref.url(revision=commit)

    async def aclose(self) -> None:
        self._infos.clear()
        await self.api.aclose()
        await self.cdn.aclose()
