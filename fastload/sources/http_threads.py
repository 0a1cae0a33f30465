"""Ranged GET bodies received by blocking sockets on a thread pool, straight into the destination.

Why a second road next to aiohttp: on our 2-core test VM a load from nginx is
bound by one Python thread. aiohttp hands every socket read to Python as a new
``bytes`` object, which we then copy into the tensor, all under the GIL (2.6-3.0
GB/s). Here ``http.client`` parses the status line and headers, and the body
is taken with ``readinto`` on the response: the buffered reader then calls
``recv_into`` on the final memory in a loop, with the GIL released, so the
bytes are copied once (by the kernel) and both cores work: 3.6-4.0 GB/s with
sendfile, 5.2 without, above ``curl -o /dev/null`` on the same machine. aiohttp
still does everything else (the size probe, the Hub's redirects, listing), and
``LoadConfig(http_engine="aiohttp")`` puts bodies back on it.

The checks are the transport's own (status, Content-Range, Content-Length,
ETag), so a lying server is caught the same way on either road. A request
whose caller is cancelled (stream closed early, deadline, Ctrl-C) is aborted
by shutting its socket down, and the caller waits for the thread to let go of
the destination memory before the cancellation goes on.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.client
import ipaddress
import socket
import ssl
import threading
import urllib.request
from collections.abc import Callable
from urllib.parse import quote, unquote, urljoin, urlsplit

from ..config import CREDENTIAL_HEADERS
from ..errors import ConfigError, FastloadError, SourceNotFoundError
from ..redact import describe, redact_url, scrub
from ..runner import DaemonThreadPool, to_the_end
from .base import out_of_files, out_of_files_message, unresolvable
from .retry import Fatal, Transient

MAX_REDIRECTS = 10
_REDIRECTS = (301, 302, 303, 307, 308)

Check = Callable[[http.client.HTTPResponse], None]  # raises on a reply that must not be used


class BodyOverrun(Transient):
    """The body went on past the bytes asked for: none of it can be trusted (a retry starts over)."""


class _Attempt:
    """One request in flight: lets the event loop abort the blocking thread that serves it."""

    def __init__(self) -> None:
        self.aborted = False
        self.sock: socket.socket | None = None
        self.lookup: threading.Event | None = None  # set when the name lookup ends, or when aborted
        self._lock = threading.Lock()

    def attach(self, sock: socket.socket | None) -> None:
        with self._lock:
            self.sock = sock
            if self.aborted and sock is not None:
                _shutdown(sock)

    def wait_lookup(self, done: threading.Event, timeout: float) -> bool:
        """Wait for a name lookup (``done``), or until aborted: whether it ended in time and not aborted."""
        with self._lock:
            self.lookup = done
            if self.aborted:
                done.set()
        ended = done.wait(timeout)
        with self._lock:
            self.lookup = None
            return ended and not self.aborted

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self.sock is not None:
                _shutdown(self.sock)
            if self.lookup is not None:
                self.lookup.set()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv on it
    except OSError:
        pass


class ThreadedBodies:
    """Blocking ranged GETs, one keep-alive connection per (thread, origin)."""

    def __init__(self, *, threads: int, connect_timeout_s: float, stall_timeout_s: float, headers: dict[str, str],
                 ssl_context: Callable[[], ssl.SSLContext]):
        self._pool = DaemonThreadPool(threads, "fastload-http")  # exit never waits on a socket
        self._connect_timeout = connect_timeout_s
        self._stall_timeout = stall_timeout_s
        self._headers = headers
        self._local = threading.local()
        self._open: set[http.client.HTTPConnection] = set()
        self._attempts: set[_Attempt] = set()
        self._lock = threading.Lock()
        self._ssl_context = ssl_context
        self._addresses: dict[tuple[str, int], list[str]] = {}  # names looked up, for the load's life
        # HTTP(S)_PROXY / NO_PROXY, read once per load (as curl and requests read them; aiohttp: options())
        self._proxies = env_proxies()

    async def get(self, url: str, headers: dict[str, str], check: Check,
                  receive: Callable[[Callable[[memoryview], int]], None]) -> None:
        """GET ``url``; ``check`` the reply, then ``receive(readinto)`` its body, in a pool thread."""
        attempt = _Attempt()
        with self._lock:
            self._attempts.add(attempt)
        future = asyncio.get_running_loop().run_in_executor(
            self._pool, self._get_blocking, attempt, url, headers, check, receive)
        try:  # cancelled: the thread writes into the caller's memory until it returns, so wait for it
            await to_the_end(future, on_cancel=attempt.abort)
        finally:
            with self._lock:
                self._attempts.discard(attempt)

    def _get_blocking(self, attempt: _Attempt, url: str, headers: dict[str, str], check: Check,
                      receive: Callable[[Callable[[memoryview], int]], None]) -> None:
        # user:password of the URL asked for, as a header: a redirect within its origin keeps it (an absolute
        # Location has no userinfo), one elsewhere drops it with the other credentials
        sent = _with_basic_auth({**self._headers, **headers}, urlsplit(url))
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            conn = self._connection(parts.scheme, parts.hostname or "", parts.port)
            resp = None
            try:
                reused = conn.sock is not None
                try:
                    resp = self._send(attempt, conn, parts, sent)
                except (ConnectionError, http.client.BadStatusLine):
                    if not reused or attempt.aborted:
                        raise
                    # The server closed this idle keep-alive connection: once more on a new one.
                    self._discard(conn)
                    conn = self._connection(parts.scheme, parts.hostname or "", parts.port)
                    resp = self._send(attempt, conn, parts, sent)
                location = resp.getheader("Location")
                if resp.status in _REDIRECTS and location:
                    self._discard(conn)
                    try:
                        target = urljoin(url, location)
                        moved = _origin(target) != _origin(url)
                    except ValueError:  # "http://[::1/x", a port that is not a number: the server's mistake
                        raise Transient(f"redirected to an unusable Location {redact_url(location)[:80]!r}") \
                            from None
                    if moved:  # credentials stay with their origin
                        sent = {k: v for k, v in sent.items() if k.lower() not in CREDENTIAL_HEADERS}
                    url = target
                    continue
                check(resp)
                receive(_soon(resp))
                if resp.length is None and not resp.isclosed() and resp.read(1):
                    # No Content-Length (chunked): a body that goes on past the range is not the range.
                    raise BodyOverrun("server sent more than the bytes asked for")
                # Keep the connection only after a whole body: a short one or unread bytes leave it unusable.
                if resp.will_close or not resp.isclosed() or resp.length not in (0, None):
                    self._discard(conn)
                return
            except BaseException as exc:
                if resp is not None:  # its file object holds the socket too: closing the connection is not enough
                    resp.close()
                self._discard(conn)
                # A transport failure is retried; a verdict (a FastloadError from ``check``, many of them
                # OSErrors, or a certificate that does not verify) and anything else go up as they are.
                if out_of_files(exc):
                    raise Fatal(out_of_files_message()) from scrub(exc)
                if unresolvable(exc):
                    raise Fatal(f"no such host: {parts.hostname}") from scrub(exc)
                if isinstance(exc, (OSError, http.client.HTTPException)) and not isinstance(
                        exc, (FastloadError, ssl.SSLCertVerificationError)):
                    raise Transient(describe(scrub(exc))) from exc
                raise
            finally:
                attempt.attach(None)
        raise Fatal(f"more than {MAX_REDIRECTS} redirects (a redirect loop?)")  # no retry follows it better

    def _send(self, attempt: _Attempt, conn: http.client.HTTPConnection, parts, headers: dict[str, str]):
        if attempt.aborted:
            raise Transient("request aborted")
        if conn.sock is None:
            conn._create_connection = functools.partial(self._dial, attempt)  # (http.client's hook for it)
            conn.connect()
            conn.sock.settimeout(self._stall_timeout)  # a stall, first byte included
        attempt.attach(conn.sock)
        target = _target(parts)
        if conn.fastload_forward is not None:  # a forward proxy: the absolute URL, with the proxy's credentials
            host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
            target = f"http://{host}{f':{parts.port}' if parts.port else ''}{target}"
            headers = {**headers, **conn.fastload_forward}
        conn.request("GET", target, headers=headers)
        return conn.getresponse()

    def _dial(self, attempt: _Attempt, address: tuple[str, int], timeout: float | None,
              source_address=None) -> socket.socket:
        """``socket.create_connection`` whose name lookup an abort cuts short (a cancel, Ctrl-C): glibc's
        ``getaddrinfo`` cannot be interrupted, and against a DNS server that stopped answering it blocks 5 s per
        try and server; the cancel of a load waited for it. The lookup runs on a daemon thread of its own, is
        bounded by ``connect_timeout_s`` and kept for the load's other connections."""
        host, port = address
        last: OSError | None = None
        for ip in self._lookup(attempt, host, port):
            try:
                return socket.create_connection((ip, port), timeout, source_address)
            except OSError as exc:  # the next address of the name, as create_connection itself goes on
                last = exc
        raise last or OSError(f"no address for {host}")

    def _lookup(self, attempt: _Attempt, host: str, port: int) -> list[str]:
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        with self._lock:
            known = self._addresses.get((host, port))
        if known:
            return known
        done, box = threading.Event(), {}

        def look() -> None:
            try:
                box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except BaseException as exc:  # noqa: BLE001 - raised in the attempt's thread
                box["error"] = exc
            done.set()

        threading.Thread(target=look, name="fastload-detached", daemon=True).start()
        if not attempt.wait_lookup(done, self._connect_timeout):
            if attempt.aborted:
                raise ConnectionAbortedError("request aborted")
            raise TimeoutError(f"the name lookup of {host} took more than {self._connect_timeout:g} s")
        if "error" in box:
            raise box["error"]
        addresses = list(dict.fromkeys(info[4][0] for info in box["infos"]))
        with self._lock:
            self._addresses[(host, port)] = addresses
        return addresses

    def _proxy_for(self, scheme: str, host: str) -> tuple[str, int, dict[str, str]] | None:
        """(host, port, Proxy-Authorization header) of the proxy the environment names for ``host``, if any."""
        proxy = env_proxy(self._proxies, scheme, host)
        if proxy is None:
            return None
        parts = urlsplit(proxy)
        if parts.scheme != "http" or not parts.hostname:
            raise ConfigError(f"only http:// proxies are supported by http_engine='threads', got {redact_url(proxy)} "
                              "(use http_engine='aiohttp')")
        auth = {}
        if parts.username is not None:
            token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
            auth = {"Proxy-Authorization": f"Basic {token}"}
        return parts.hostname, parts.port or 80, auth

    def _connection(self, scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
        if scheme not in ("http", "https") or not host:
            raise SourceNotFoundError(f"not an http(s) URL: {scheme}://{host}", url=f"{scheme}://{host}")
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        key = (scheme, host, port)
        conn = conns.get(key)
        if conn is None:
            proxy = self._proxy_for(scheme, host)
            at_host, at_port = (proxy[0], proxy[1]) if proxy else (host, port)
            if scheme == "https":
                conn = http.client.HTTPSConnection(at_host, at_port, timeout=self._connect_timeout,
                                                   context=self._ssl_context())
                if proxy:  # CONNECT through the proxy; TLS (and the certificate's name) with the server itself
                    conn.set_tunnel(host, port, headers=proxy[2])
            else:
                conn = http.client.HTTPConnection(at_host, at_port, timeout=self._connect_timeout)
            # Through a plain HTTP proxy: requests name the absolute URL (http.client takes Host from it)
            conn.fastload_forward = proxy[2] if proxy and scheme == "http" else None
            conn.response_class = _FinalResponse
            conns[key] = conn
            with self._lock:
                self._open.add(conn)
        return conn

    def _discard(self, conn: http.client.HTTPConnection) -> None:
        conns = getattr(self._local, "conns", {})
        for key, value in list(conns.items()):
            if value is conn:
                del conns[key]
        with self._lock:
            self._open.discard(conn)
        conn.close()

    def close(self) -> None:
        """Abort what is in flight, wait for the threads, close every connection."""
        with self._lock:
            attempts = list(self._attempts)
        for attempt in attempts:
            attempt.abort()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            conns, self._open = list(self._open), set()
        for conn in conns:
            conn.close()


def env_proxies() -> dict[str, str]:
    """``HTTP_PROXY`` / ``HTTPS_PROXY`` (any case), read once per load as curl, requests and botocore read them."""
    return {k: v for k, v in urllib.request.getproxies().items() if k in ("http", "https")}


def env_proxy(proxies: dict[str, str], scheme: str, host: str) -> str | None:
    """The proxy URL for a request to ``scheme://host``, None when there is none or ``NO_PROXY`` says so."""
    proxy = proxies.get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    return proxy if "://" in proxy else "http://" + proxy


class _FinalResponse(http.client.HTTPResponse):
    """A reply past any interim 1xx (103 Early Hints...), which a client must accept before the final one
    (RFC 9110 15.2); http.client itself skips only 100 Continue. 101 is final: we never ask to switch."""

    def begin(self) -> None:
        super().begin()
        while 100 < self.status < 200 and self.status != 101:  # no body; the next status line follows
            self.headers = self.msg = None
            super().begin()


_PATH_SAFE = "/%:@!$&'()*+,;=~"  # what may stand in a path as is (RFC 3986); "%" keeps escapes as sent


def _target(parts) -> str:
    """The request target, percent-encoded as aiohttp (yarl) sends it: spaces and non-ASCII as UTF-8 escapes,
    escapes already there kept (http.client refuses both as they are)."""
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    return f"{path}?{quote(parts.query, safe=_PATH_SAFE + '?')}" if parts.query else path


def _with_basic_auth(headers: dict[str, str], parts) -> dict[str, str]:
    if parts.username is None:
        return headers
    if any(k.lower() == "authorization" for k in headers):
        raise ConfigError("cannot request a URL with user:password and an Authorization header together")
    token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
    return {**headers, "Authorization": f"Basic {token}"}


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port, the default port spelled out: ``http://h`` and ``http://h:80`` are one origin
    (RFC 9110 4.3.1), and a redirect between them keeps the credentials."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, parts.hostname or "", parts.port or {"http": 80, "https": 443}.get(scheme)


def _soon(resp: http.client.HTTPResponse):
    """``readinto`` for a body whose first call returns what has come (``read1``), so the trace's first byte
    is when the first bytes came, not when a whole first piece had; later calls fill their view."""
    first = True

    def readinto(view: memoryview) -> int:
        nonlocal first
        if not first:
            return resp.readinto(view)
        first = False
        data = resp.read1(len(view))
        view[:len(data)] = data
        if resp.length == 0:
            resp.read()  # read1 leaves a finished body open (readinto closes it): the connection is kept
        return len(data)
    return readinto
