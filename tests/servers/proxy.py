"""A fault-injecting HTTP reverse proxy.

``FaultProxy`` forwards every request to an upstream server with ``http.client``
(method, target with query, headers including Host, Authorization and Range,
body) and streams the reply back, applying the same ``Faults`` as the file
server.  The Host header is passed through unchanged, so a client that signed a
request for the proxy's address (AWS SigV4) still presents a consistent request
upstream.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from urllib.parse import urlsplit

from .faults import Faults, Headers
from .http_range import BLOCK_SIZE, BackgroundHTTPServer, FaultInjectingHandler, Reply

# Per-connection headers (RFC 9110 7.6.1) plus Expect, which the proxy's own
# server side already answered; framing headers are recomputed.
_NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "expect",
    "content-length",
})


def _relay(conn: http.client.HTTPConnection, response: http.client.HTTPResponse) -> Iterator[bytes]:
    try:
        while chunk := response.read(BLOCK_SIZE):
            yield chunk
    finally:
        response.close()
        conn.close()


class _ProxyHandler(FaultInjectingHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.handle_with_faults()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def produce(self, path: str, headers: Headers, body: bytes) -> Reply:
        owner: FaultProxy = self.server.owner  # type: ignore[assignment]
        conn = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port,
                                          timeout=owner.timeout)
        try:
            conn.putrequest(self.command, owner.upstream_prefix + self.path,
                            skip_host=True, skip_accept_encoding=True)
            for name, value in headers:
                if name.lower() not in _NOT_FORWARDED:
                    conn.putheader(name, value)
            if body or "Content-Length" in self.headers or "Transfer-Encoding" in self.headers:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException):
            conn.close()
            return Reply.simple(502)
        reply_headers = [(n, v) for n, v in response.getheaders()
                         if n.lower() not in _NOT_FORWARDED]
        length = response.getheader("Content-Length")
        if length is not None:
            reply_headers.append(("Content-Length", length))
        has_body = self.command != "HEAD" and response.status not in (204, 304) \
            and response.status >= 200
        return Reply(response.status, reply_headers, _relay(conn, response),
                     close_delimited=has_body and length is None)


class FaultProxy(BackgroundHTTPServer):
    """Reverse proxy on 127.0.0.1 in front of ``upstream_url``, with faults and a log."""

    handler_class = _ProxyHandler

    def __init__(self, upstream_url: str, faults: Faults | None = None,
                 timeout: float = 30.0) -> None:
        super().__init__(faults)
        upstream = urlsplit(upstream_url)
        if upstream.scheme != "http" or upstream.hostname is None:
            raise ValueError(f"need an http:// upstream URL, got {upstream_url!r}")
        self.upstream_host = upstream.hostname
        self.upstream_port = upstream.port or 80
        self.upstream_prefix = upstream.path.rstrip("/")
        self.timeout = timeout
