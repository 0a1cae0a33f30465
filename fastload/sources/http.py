"""HTTP(S): ranged GETs, their checks, and the size probe.

One aiohttp session per load makes the probe (and, with ``http_engine="aiohttp"``,
the body reads); by default bodies are received by ``http_threads.ThreadedBodies``
straight into the tensors. Both roads go through the same checks below.

Every reply is checked before a byte is used: 206 with the exact
``Content-Range`` and ``Content-Length`` asked for, and the ETag (or
Last-Modified) pinned from the first reply. A server that ignores ``Range``,
lies about the range or replaces the object mid-load can therefore never put
wrong bytes into a tensor. A read that breaks mid-body resumes where it broke:
from the last byte received (aiohttp), or from the last whole piece (threaded
bodies: a ``readinto`` cut by a stall does not say how much of its piece
arrived, so up to ``PIECE`` bytes are fetched again).

What is retried (as ``Transient``): connection errors, stalls (no byte for
``stall_timeout_s``, also before the first byte), 408/429/5xx, a body cut
short, and replies that lie about the range (wrong ``Content-Range`` or
``Content-Length``, too many bytes) or ignore ``Range`` on a server whose first
reply honoured it. What fails at once: 404/410, 401/403, other 4xx, 412/416 and
a changed ETag/size (``SourceChangedError``), and a server that never honours
``Range`` (``TransferError``: parallel ranged reads are impossible there).
Messages and chained causes never hold a presigned query string, a password or
a header value (see ``redact.py``).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from urllib.parse import urlsplit
import threading
from email.utils import parsedate_to_datetime

import aiohttp
from yarl import URL

from ..config import LoadConfig
from ..errors import (ConfigError, FastloadError, SourceChangedError, SourceNotFoundError, SourcePermissionError,
                      TransferError)
from ..integrity import checksum_from_repr_digest
from ..redact import describe, redact_url, scrub
from ..trace import ReadRecord, Trace
from ..runner import closing, detached
from .base import ObjectInfo, Segment, http_range, out_of_files, out_of_files_message, span_of, unresolvable
from .http_threads import MAX_REDIRECTS, BodyOverrun, ThreadedBodies, env_proxies, env_proxy
from .retry import RETRY_STATUSES, Fatal, RetryPolicy, Transient, retry_after

PROBE_BYTES = 8  # the size probe's range: a safetensors header length, and never a byte of tensor data
# A JSON file's probe (a shard index, a model's config) asks for this much: the whole file, almost always (a 70B
# model's index is about 60 KB), so that reading it takes no second round trip.
JSON_PROBE_BYTES = 256 << 10
# A JSON file (an index, config.json) whose server ignores Range is taken whole from the probe's 200 reply, up
# to this size (resolve's cap on an index): read whole anyway, it needs no ranges, and curl, requests and
# huggingface_hub all take such a reply. A .safetensors file behind such a server still fails: no parallel reads.
WHOLE_JSON_BYTES = 64 << 20
FIRST_PIECE = 64 << 10  # threaded bodies: the first read is small, so the trace sees the first byte early
PIECE = 4 << 20  # later reads: progress (what a retry resumes from) is counted per piece
GAP_BUFFER = 1 << 20  # bytes between wanted segments are received here and dropped
_SIGNED = re.compile(r"[?&]X-(Amz|Goog)-Signature=", re.IGNORECASE)  # a presigned URL's query (S3 and GCS)
# ASCII digits (RFC 9110), at most 19: a value past int64 cannot describe a file and would not parse cheaply.
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")


def _value(headers, name: str) -> str | None:
    """A header's value without the whitespace around it (RFC 9112 5.1: not part of the value; aiohttp strips
    it, http.client does not), None when absent."""
    value = headers.get(name)
    return None if value is None else value.strip()


def _joined(headers, name: str) -> str | None:
    """All lines of a field as one comma-joined value (RFC 9110 5.3), None when absent."""
    lines = headers.getall(name, []) if hasattr(headers, "getall") else headers.get_all(name) or []
    return ", ".join(v.strip() for v in lines) or None


def _int_header(headers, name: str) -> int | None:
    """An integer header, or None when absent; garbage is a lie worth a retry."""
    value = _value(headers, name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise Transient(f"unparsable {name} header {value[:40]!r}") from None


class _Declined(Exception):
    """:meth:`HttpTransport.probe`'s one attempt did not answer plainly (carried past the retry loop)."""


class BadRequest(TransferError):
    """HTTP 400: a request the server refuses as it stands (S3 says so for a presigned URL whose temporary
    credentials expired: ExpiredToken), never retried as it is."""


def check_status(status: int, reason: str, *, url: str, byte_range=None, headers=None) -> None:
    """Turn a non-2xx status into the matching fastload error (or a Transient to retry)."""
    if 200 <= status < 300:
        return
    text = f"HTTP {status} {reason or ''}".strip()
    if status in (404, 410):
        raise SourceNotFoundError(f"not found ({text}): {url}", url=url)
    if status in (401, 403):
        raise SourcePermissionError(f"access denied ({text}): {url}", url=url)
    if status == 400:
        raise BadRequest(text, url=url, byte_range=byte_range)
    if status == 412:
        raise SourceChangedError(f"object changed during the load ({text})", url=url, byte_range=byte_range)
    if status == 416:
        raise SourceChangedError(f"range no longer satisfiable ({text}); object shrank?", url=url, byte_range=byte_range)
    if status in RETRY_STATUSES:
        raise Transient(text, retry_after=retry_after(headers or {}))
    raise TransferError(text, url=url, byte_range=byte_range)


class _Cursor:
    """Writes a byte stream that starts at ``pos`` into sorted segments, discarding gap bytes."""

    def __init__(self, segments: list[Segment]):
        self.segments = segments
        self.pos = segments[0].offset
        self.end = segments[-1].end
        self._i = 0
        self._gap: memoryview | None = None  # where gap bytes land (one buffer: a strided shard has many gaps)

    def write(self, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        while mv:
            seg = self.segments[self._i]
            if self.pos >= seg.end:
                self._i += 1
                continue
            if self.pos < seg.offset:  # gap: skip the bytes nobody wants
                skip = min(seg.offset - self.pos, len(mv))
                mv, self.pos = mv[skip:], self.pos + skip
                continue
            at = self.pos - seg.offset
            n = min(len(seg.view) - at, len(mv))
            seg.view[at:at + n] = mv[:n]
            mv, self.pos = mv[n:], self.pos + n

    def rewind(self, pos: int) -> None:
        """Write from ``pos`` again (bytes already written there are not to be trusted)."""
        self.pos, self._i = pos, 0

    def next_view(self, limit: int) -> memoryview:
        """Where the next at most ``limit`` bytes of the stream go (a throwaway buffer for gap bytes)."""
        while self.pos >= self.segments[self._i].end:
            self._i += 1
        seg = self.segments[self._i]
        if self.pos < seg.offset:
            if self._gap is None:
                self._gap = memoryview(bytearray(GAP_BUFFER))
            return self._gap[:min(seg.offset - self.pos, limit)]
        at = self.pos - seg.offset
        return seg.view[at:at + limit]

    def receive(self, readinto, on_bytes) -> None:
        """Fill the rest of the span with ``readinto(view) -> n`` until it is full or the body ends (n == 0)."""
        limit = FIRST_PIECE
        while self.pos < self.end:
            n = readinto(self.next_view(limit))
            if not n:
                return
            self.pos += n
            on_bytes(n)
            limit = PIECE


def _untrusted(exc: BaseException, url: str, byte_range) -> TransferError:
    """A certificate that does not verify: a fault of trust, not of the network, so it is not retried."""
    where = "AWS_CA_BUNDLE or the AWS config's ca_bundle" if url.startswith("s3://") else "SSL_CERT_FILE"
    return TransferError(f"TLS certificate not trusted ({describe(scrub(exc))}); a private CA goes in {where}",
                         url=url, byte_range=byte_range)


def _same_time(a: str, b: str) -> bool:
    """Two Last-Modified values name the same instant (HTTP dates; other spellings compare as text)."""
    try:
        return parsedate_to_datetime(a) == parsedate_to_datetime(b)
    except (TypeError, ValueError):
        return a == b


def _check_identity(resp, url: str, byte_range) -> None:
    """A body in a Content-Encoding (gzip, br, ...) is not the object's bytes at those offsets, even with a
    right Content-Range: refused, whatever we asked (``Accept-Encoding: identity``)."""
    encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise TransferError(f"server sent the range with Content-Encoding {encoding[:40]!r}, not the object's "
                            "own bytes (we asked for identity)", url=url, byte_range=byte_range)


def _validator_headers(info: ObjectInfo) -> dict[str, str]:
    if info.etag and not info.etag.startswith("W/"):
        return {"If-Match": info.etag}
    return {}


class _OwnThreads:
    """What aiohttp's ``ThreadedResolver`` asks of its loop, name lookups, on daemon threads of fastload's own.
    The loop's are ``run_in_executor(None)``: the caller's default executor, where an ``aload`` by host name
    waited behind the caller's own work, and deadlocked when that work was waiting for the load. Detached, a
    lookup that hangs (a DNS server that does not answer) never holds up a cancel either."""

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        return await detached(socket.getaddrinfo, host, port, family, type, proto, flags)

    async def getnameinfo(self, sockaddr, flags=0):
        return await detached(socket.getnameinfo, sockaddr, flags)


def _probe_bytes(url: str) -> int:
    return JSON_PROBE_BYTES if urlsplit(url).path.endswith(".json") else PROBE_BYTES


def probe_headers(url: str) -> dict[str, str]:
    """The headers of the size probe of ``url``: the Range of its first bytes."""
    return {"Range": f"bytes=0-{_probe_bytes(url) - 1}"}


class HttpTransport:
    def __init__(self, config: LoadConfig, policy: RetryPolicy, trace: Trace, *, ca_file: str | None = None):
        self.config = config
        self.ca_file = ca_file  # trust only these CAs (S3's GETs: the bundle botocore was told to trust)
        self.policy = policy
        self.trace = trace
        self._session: aiohttp.ClientSession | None = None
        self._bodies: ThreadedBodies | None = None
        self._ssl: ssl.SSLContext | None = None
        self._ssl_lock = threading.Lock()
        self._no_ranges: set[str] = set()  # URLs whose first reply ignored Range
        self._ranged: set[str] = set()  # URLs that have answered a Range with 206
        self._proxies: dict[str, str] | None = None  # from the environment, read when first needed
        self._names: dict[str, str] = {}  # shown name -> the URL it stands for (see _shown)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:  # a request that outlived its load must not reopen a session or threads
            raise RuntimeError("HTTP transport used after its load closed it")

    def session(self) -> aiohttp.ClientSession:
        self._check_open()
        if self._session is None:
            cfg = self.config
            connector = aiohttp.TCPConnector(
                limit=max(2 * cfg.max_concurrency, 8),  # deliberately above our own concurrency cap
                limit_per_host=0,
                ttl_dns_cache=300,
                resolver=aiohttp.ThreadedResolver(loop=_OwnThreads()),  # (not the caller's executor: see there)
                # a TLS connection cut mid-body (a stream left early) is closed now, not when the GC runs
                enable_cleanup_closed=True,
            )
            timeout = aiohttp.ClientTimeout(  # no total: long streams are fine while bytes keep flowing
                total=None, connect=cfg.connect_timeout_s, sock_connect=cfg.connect_timeout_s,
                sock_read=cfg.stall_timeout_s,
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=timeout, auto_decompress=False, read_bufsize=1 << 20,
                headers=self._headers(),  # no trust_env: it reads ~/.netrc per request, in the caller's executor
            )
        return self._session

    def ssl_context(self) -> ssl.SSLContext:
        """One verifying TLS context per load, made when first needed (loading the CA store costs ms).

        Both body roads use it, and it is made at load time, so ``SSL_CERT_FILE``/``SSL_CERT_DIR``
        (a private CA, e.g. an internal S3 gateway) apply to every request of the load alike.
        """
        with self._ssl_lock:
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=self.ca_file)
            return self._ssl

    def tls_for(self, url: str) -> ssl.SSLContext | bool:
        """aiohttp's ``ssl=`` for a request to ``url`` (no context is made for plain HTTP)."""
        return self.ssl_context() if url.startswith("https:") else True

    def options(self, url: str) -> dict:
        """aiohttp's per-request ``ssl=`` and ``proxy=`` for ``url``: ``HTTP(S)_PROXY`` unless ``NO_PROXY``
        names the host, as the threaded engine reads them."""
        if self._proxies is None:
            self._proxies = env_proxies()
        parts = urlsplit(url)
        return {"ssl": self.tls_for(url), "proxy": env_proxy(self._proxies, parts.scheme, parts.hostname or "")}

    def _headers(self) -> dict[str, str]:
        return {"Accept-Encoding": "identity", "User-Agent": "fastload", **self.config.http_headers}

    def bodies(self) -> ThreadedBodies:
        self._check_open()
        if self._bodies is None:
            cfg = self.config
            self._bodies = ThreadedBodies(threads=cfg.max_concurrency, connect_timeout_s=cfg.connect_timeout_s,
                                          stall_timeout_s=cfg.stall_timeout_s, headers=self._headers(),
                                          ssl_context=self.ssl_context)
        return self._bodies

    async def _request(self, method: str, url: str, display: str, headers: dict, byte_range=None):
        try:
            # A signed URL, and any GET URL botocore built for an S3 object (an anonymous one carries no
            # signature), goes out byte for byte: yarl would drop the dot segments of a key such as
            # "./dot/x.safetensors" (as curl does for a plain URL), and ask for another object.
            verbatim = display.startswith("s3://") or _SIGNED.search(url)
            target = URL(url, encoded=True) if verbatim else url
            # MAX_REDIRECTS hops, as the threaded engine follows (aiohttp counts the reply that would be one more)
            return await self.session().request(method, target, headers=headers, allow_redirects=True,
                                                max_redirects=MAX_REDIRECTS + 1, **self.options(url))
        except aiohttp.InvalidURL as exc:
            raise SourceNotFoundError(f"invalid URL: {display}", url=display) from scrub(exc)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _untrusted(exc, display, byte_range) from scrub(exc)
        except aiohttp.TooManyRedirects as exc:
            raise Fatal(f"more than {MAX_REDIRECTS} redirects (a redirect loop?)") from scrub(exc)
        except ValueError as exc:  # e.g. an Authorization header and user:password in the URL
            raise ConfigError(f"cannot request {display}: {describe(scrub(exc))}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            if out_of_files(exc):
                raise Fatal(out_of_files_message()) from scrub(exc)
            if unresolvable(exc):
                raise Fatal(f"no such host: {urlsplit(url).hostname}") from scrub(exc)
            raise Transient(describe(scrub(exc))) from exc

    async def stat(self, url: str) -> ObjectInfo:
        display = self._shown(url)  # a presigned or user:password URL is fetched, never shown
        return await self.policy.run(lambda: self._stat_once(url, display), url=display,
                                     byte_range=(0, _probe_bytes(url)), request=True)

    def _shown(self, url: str) -> str:
        """``url`` as messages and traces show it, one name per object: two URLs that differ only in hidden
        query values (``?file=a``, ``?file=b``) would both show as ``?file=***``, and a load keys its checksum
        checks and its per-file counts by that name, so the second is ``... [2]``."""
        shown = redact_url(url)
        candidate, n = shown, 1
        while self._names.setdefault(candidate, url) != url:
            n += 1
            candidate = f"{shown} [{n}]"
        return candidate

    async def stat_fetch_url(self, fetch_url: str, display: str) -> ObjectInfo:
        display = redact_url(display)
        return await self.policy.run(lambda: self._stat_once(fetch_url, display), url=display,
                                     byte_range=(0, _probe_bytes(fetch_url)), request=True)

    async def probe(self, fetch_url: str, display: str) -> ObjectInfo | None:
        """:meth:`stat_fetch_url` in one attempt, for a caller that has another way to ask (S3's HEAD, which
        botocore retries, follows to the bucket's region and whose answer names an error exactly): not found
        raises; any other failure (a refusal, a 5xx, a stall, a reply that cannot be used or parsed) is None."""
        display = redact_url(display)

        async def once() -> ObjectInfo:
            try:
                return await self._stat_once(fetch_url, display)
            except SourceNotFoundError:
                raise
            except FastloadError as exc:
                raise _Declined() from exc
            except (Transient, Fatal) as exc:
                self.trace.count("retries")  # the other way of asking is this failure's retry
                raise _Declined() from exc

        try:
            return await self.policy.run(once, url=display, byte_range=(0, _probe_bytes(fetch_url)), request=True)
        except _Declined:
            return None

    async def _stat_once(self, fetch_url: str, display: str) -> ObjectInfo:
        # A ranged GET of the first PROBE_BYTES: gives the size, the validators, proves Range works, and
        # brings a safetensors file's header length, so reading the header takes one request, not two.
        async with await self._request("GET", fetch_url, display, probe_headers(fetch_url)) as resp:
            return await self.probe_reply(resp, fetch_url, display)

    async def probe_reply(self, resp, fetch_url: str, display: str) -> ObjectInfo:
        """What ``resp``, the reply to a size probe of ``fetch_url`` (a GET with :func:`probe_headers`), says of
        the object: its size, validators and first bytes."""
        prefix, probe = b"", _probe_bytes(fetch_url)
        if resp.status == 416 and _value(resp.headers, "Content-Range") == "bytes */0":
            return ObjectInfo(url=display, size=0, etag=_value(resp.headers, "ETag"),  # an empty object
                              last_modified=_value(resp.headers, "Last-Modified"),
                              fetch_url=None if fetch_url == display else fetch_url)
        check_status(resp.status, resp.reason, url=display, headers=resp.headers)
        _check_identity(resp, display, (0, probe))
        if resp.status != 206:
            self._no_ranges.add(display)
        if resp.status == 206:
            self._ranged.add(display)
            match = _CONTENT_RANGE.fullmatch(_value(resp.headers, "Content-Range") or "")
            if not match or match.group(3) == "*":
                raise TransferError("206 reply without a usable Content-Range", url=display)
            size = int(match.group(3))
            want = min(size, probe)
            if (int(match.group(1)), int(match.group(2)) + 1) == (0, want):
                body = b""
                try:
                    while len(body) <= want and (piece := await resp.content.read(want + 1 - len(body))):
                        body += piece
                        self.trace.count("bytes_fetched", len(piece), key=display)  # used or not, it came
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    body = b""  # the headers told what a probe must; the header read fetches these bytes
                prefix = body if len(body) == want else b""  # a body of another length is not used
        elif probe == JSON_PROBE_BYTES and (_int_header(resp.headers, "Content-Length") or 0) <= WHOLE_JSON_BYTES:
            prefix = await self._whole_body(resp, display)
            size = len(prefix)
        else:
            length = _int_header(resp.headers, "Content-Length")
            if length is None:
                raise TransferError("server sent neither Content-Range nor Content-Length", url=display)
            size = length
        etag = _value(resp.headers, "ETag")
        modified = _value(resp.headers, "Last-Modified")
        checksum = checksum_from_repr_digest(_joined(resp.headers, "Repr-Digest"))
        return ObjectInfo(url=display, size=size, etag=etag, last_modified=modified,
                          fetch_url=None if fetch_url == display else fetch_url, checksum=checksum, prefix=prefix)

    async def _whole_body(self, resp, display: str) -> bytes:
        """The body of a 200 reply to the probe of a JSON file: the whole object, at most WHOLE_JSON_BYTES."""
        body = bytearray()
        try:
            while piece := await resp.content.read(1 << 20):
                body += piece
                self.trace.count("bytes_fetched", len(piece), key=display)
                if len(body) > WHOLE_JSON_BYTES:
                    raise TransferError(f"server ignored Range and sent more than {WHOLE_JSON_BYTES} bytes of JSON",
                                        url=display)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise Transient(f"body broke off after {len(body)} bytes: {describe(scrub(exc))}") from exc
        length = _int_header(resp.headers, "Content-Length")
        if length is not None and length != len(body):
            raise Transient(f"short body: {len(body)} of {length} bytes")
        return bytes(body)

    async def read(self, info: ObjectInfo, segments: list[Segment], record: ReadRecord | None = None) -> int:
        start, end = span_of(segments)
        have = len(info.prefix)
        if start < have:  # the probe brought these first bytes (a JSON file's 256 KiB): copied, not asked again
            for seg in segments:
                if seg.offset < have:
                    n = min(seg.end, have) - seg.offset
                    seg.view[:n] = info.prefix[seg.offset:seg.offset + n]
            if end <= have:  # all of it: no request
                if record is not None:  # (a copy from memory: it starts and has its first byte at once)
                    record.started = record.first_byte = self.trace.now()
                return end - start
            segments = [Segment(max(seg.offset, have), seg.view[max(0, have - seg.offset):])
                        for seg in segments if seg.end > have]
        cursor = _Cursor(segments)
        await self.policy.run(lambda: self._read_once(info, cursor, record), url=info.url, byte_range=(start, end),
                              progress=lambda: cursor.pos, request=True)
        return end - start

    async def _read_once(self, info: ObjectInfo, cursor: _Cursor, record: ReadRecord | None = None) -> None:
        if record is not None:  # tracing: count attempts, note when the first request went out
            record.attempts += 1
            record.started = record.started if record.started is not None else self.trace.now()
        start, end = cursor.pos, cursor.end
        if start == end:  # the last attempt received everything, then failed (e.g. looking past the end)
            return
        headers = {"Range": http_range(start, end), **_validator_headers(info)}
        try:
            if self.config.http_engine == "threads":
                await self._read_threaded(info, cursor, headers, record)
            else:
                await self._read_aiohttp(info, cursor, headers, record)
        except BodyOverrun:
            cursor.rewind(start)
            raise
        if cursor.pos != end:
            raise Transient(f"short body: {cursor.pos - start} of {end - start} bytes")

    async def _read_threaded(self, info: ObjectInfo, cursor: _Cursor, headers: dict, record: ReadRecord | None):
        start, end = cursor.pos, cursor.end

        def check(resp) -> None:
            check_status(resp.status, resp.reason, url=info.url, byte_range=(start, end), headers=resp.headers)
            self._check_reply(resp, info, start, end)

        def on_bytes(n: int) -> None:
            if record is not None and record.first_byte is None:
                record.first_byte = self.trace.now()
            self.trace.count("bytes_fetched", n, key=info.url)

        try:
            await self.bodies().get(info.fetch_url or info.url, headers, check,
                                    lambda readinto: cursor.receive(readinto, on_bytes))
        except ssl.SSLCertVerificationError as exc:
            raise _untrusted(exc, info.url, (start, end)) from scrub(exc)
        except Transient as exc:
            if cursor.pos == start or isinstance(exc, BodyOverrun):
                raise
            raise Transient(f"body broke off after {cursor.pos - start} of {end - start} bytes: {exc}") from exc

    async def _read_aiohttp(self, info: ObjectInfo, cursor: _Cursor, headers: dict, record: ReadRecord | None):
        start, end = cursor.pos, cursor.end
        byte_range = (start, end)
        resp = await self._request("GET", info.fetch_url or info.url, info.url, headers, byte_range)
        async with resp:
            check_status(resp.status, resp.reason, url=info.url, byte_range=byte_range, headers=resp.headers)
            self._check_reply(resp, info, start, end)
            try:
                async for data in resp.content.iter_any():
                    if cursor.pos + len(data) > end:
                        raise BodyOverrun(f"server sent more than the {end - start} bytes asked for")
                    if record is not None and record.first_byte is None:
                        record.first_byte = self.trace.now()
                    cursor.write(data)
                    self.trace.count("bytes_fetched", len(data), key=info.url)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise Transient(f"body broke off after {cursor.pos - start} of {end - start} bytes: "
                                f"{describe(scrub(exc))}") from exc

    def _check_reply(self, resp, info: ObjectInfo, start: int, end: int) -> None:
        byte_range = (start, end)
        _check_identity(resp, info.url, byte_range)
        etag, modified = _value(resp.headers, "ETag"), _value(resp.headers, "Last-Modified")
        if info.etag and etag and etag != info.etag:
            raise SourceChangedError(f"object changed during the load (ETag {info.etag} -> {etag})",
                                     url=info.url, byte_range=byte_range)
        if not info.etag and info.last_modified and modified and not _same_time(modified, info.last_modified):
            raise SourceChangedError(f"object changed during the load (Last-Modified {info.last_modified} -> "
                                     f"{modified[:40]})", url=info.url, byte_range=byte_range)
        if resp.status != 206:
            why = f"server ignored the Range request (HTTP {resp.status} instead of 206)"
            if info.url in self._no_ranges:  # its first reply ignored Range too: it never will
                raise TransferError(f"{why}; it cannot serve parallel ranged reads", url=info.url,
                                    byte_range=byte_range)
            if info.url not in self._ranged:  # no 206 from it yet (an S3 object: no probe): one more try only
                self._no_ranges.add(info.url)
            raise Transient(why)  # a server that honoured Range before: a glitch worth a retry
        self._ranged.add(info.url)
        content_range = _value(resp.headers, "Content-Range") or ""
        match = _CONTENT_RANGE.fullmatch(content_range)
        if not match or (int(match.group(1)), int(match.group(2)) + 1) != (start, end):
            raise Transient(f"server answered with Content-Range {content_range[:80]!r}")
        if match.group(3) != "*" and int(match.group(3)) != info.size:
            raise SourceChangedError(f"object size changed from {info.size} to {match.group(3)}",
                                     url=info.url, byte_range=byte_range)
        length = _int_header(resp.headers, "Content-Length")
        if length is not None and length != end - start:
            raise Transient(f"Content-Length {length} does not match the {end - start}-byte range")

    async def list(self, url: str) -> list[str] | None:
        return None  # plain HTTP has no listing

    async def aclose(self) -> None:
        self._closed = True
        try:
            if self._bodies is not None:
                await closing(self._bodies.close)  # aborts requests in flight, then joins the threads
                self._bodies = None
        finally:  # the session and its keep-alive sockets go even when a cancel lands on the line above
            if self._session is not None:
                await self._session.close()
                self._session = None
