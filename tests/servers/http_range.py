"""A real HTTP/1.1 file server with byte ranges, a request log and fault injection.

``RangeHTTPServer`` serves the files under a directory.  The machinery it shares
with ``FaultProxy`` lives here too: ``BackgroundHTTPServer`` (threaded server on
127.0.0.1, start/stop, request log) and ``FaultInjectingHandler`` (carries out a
``FaultPlan`` around whatever reply a subclass produces).
"""

from __future__ import annotations

import re
import select
import socket
import socketserver
import ssl
import sys
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from email.utils import formatdate
from fnmatch import fnmatchcase
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import TypeVar
from urllib.parse import quote, unquote, urlsplit

from .faults import FaultPlan, Faults, Headers

BLOCK_SIZE = 1 << 20

ServerT = TypeVar("ServerT", bound="BackgroundHTTPServer")


@dataclass
class RequestRecord:
    """One request as the server answered it; status 0 means it hung."""

    method: str
    path: str
    range: str | None
    status: int = 0
    body_bytes: int = 0
    authorization: bool = False  # the request carried an Authorization header


class RequestLog:
    """Thread-safe list of ``RequestRecord``; readers get snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[RequestRecord] = []

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def add_bytes(self, record: RequestRecord, n: int) -> None:
        with self._lock:
            record.body_bytes += n

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return [replace(r) for r in self._records]

    def clear(self) -> None:
        with self._lock:
            self._records.clear()


@dataclass
class Reply:
    """A reply before faults distort it.  ``close_delimited``: no length, close ends it."""

    status: int
    headers: Headers
    body: Iterable[bytes] = ()
    close_delimited: bool = False

    @classmethod
    def simple(cls, status: int, extra: Headers = ()) -> Reply:
        text = f"{status} {HTTPStatus(status).phrase}\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))]
        return cls(status, headers + list(extra), [text])


class FaultInjectingHandler(BaseHTTPRequestHandler):
    """Base handler: plan faults, let ``produce`` answer, send the distorted reply."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stalls
    server: _ThreadingServer

    def produce(self, path: str, headers: Headers, body: bytes) -> Reply:
        raise NotImplementedError

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # the request log replaces stderr chatter

    def handle_with_faults(self) -> None:
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        body = self._read_request_body()
        record = RequestRecord(self.command, path, self.headers.get("Range"),
                               authorization="Authorization" in self.headers)
        plan = owner.faults.plan(self.command, path)
        if plan.hang:
            owner.log_store.add(record)
            owner.stopping.wait()
            self.close_connection = True
            return
        if plan.delay and owner.stopping.wait(plan.delay):
            self.close_connection = True
            return
        headers = plan.rewrite_request(list(self.headers.items()))
        if plan.error_status is not None:
            reply = Reply.simple(plan.error_status, plan.error_headers())
        else:
            reply = self.produce(path, headers, body)
        self._send(reply, plan, record)

    def _read_request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, reply: Reply, plan: FaultPlan, record: RequestRecord) -> None:
        headers = plan.rewrite_response(reply.status, reply.headers)
        limit = None
        if self.command != "HEAD":
            limit = plan.body_limit(_content_length(headers))
        record.status = reply.status
        self.server.owner.log_store.add(record)
        self.send_response_only(reply.status)
        for name, value in headers:
            self.send_header(name, value)
        if reply.close_delimited:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            if self.command != "HEAD" and self._stream(reply.body, limit, record):
                if plan.stall_when_cut:
                    self.wfile.flush()
                    self._wait_for_client_to_leave()
                self.close_connection = True  # cut short: the client sees a dead socket
        finally:
            close = getattr(reply.body, "close", None)
            if close is not None:
                close()

    def _wait_for_client_to_leave(self) -> None:
        """Send nothing until the client closes its end (or the server stops)."""
        while not self.server.owner.stopping.wait(0.05):
            if select.select([self.connection], [], [], 0)[0]:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return
                except OSError:
                    return

    def _stream(self, body: Iterable[bytes], limit: int | None, record: RequestRecord) -> bool:
        """Write the body; True if it was cut at ``limit``."""
        log = self.server.owner.log_store
        sent = 0
        for chunk in body:
            cut = limit is not None and sent + len(chunk) > limit
            if cut:
                chunk = chunk[: limit - sent]
            if chunk:
                log.add_bytes(record, len(chunk))  # before the client can see them
                try:
                    self.wfile.write(chunk)
                except OSError:
                    log.add_bytes(record, -len(chunk))
                    raise
                sent += len(chunk)
            if cut:
                return True
        return False


class _ThreadingServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # the default backlog of 5 drops SYNs of parallel clients: 1 s retransmits

    def __init__(self, owner: BackgroundHTTPServer, handler: type[FaultInjectingHandler]):
        self.owner = owner
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.accepted = 0  # connections accepted so far
        super().__init__(("127.0.0.1", 0), handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # skip the slow reverse DNS lookup
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request: socket.socket, client_address: object) -> None:
        with self._connections_lock:
            self._connections.add(request)
            self.accepted += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients hanging up mid-body and sockets closed by stop() are expected.
        if not isinstance(sys.exc_info()[1], ConnectionError) and not self.owner.stopping.is_set():
            super().handle_error(request, client_address)


class BackgroundHTTPServer:
    """A threaded HTTP server on 127.0.0.1 (free port) with a log and faults."""

    handler_class: type[FaultInjectingHandler]

    def __init__(self, faults: Faults | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls  # serve HTTPS with this server-side context
        self.faults = faults if faults is not None else Faults()
        self.log_store = RequestLog()
        self.stopping = threading.Event()
        self._httpd: _ThreadingServer | None = None
        self._thread: threading.Thread | None = None

    def hang_up(self) -> None:
        """Close every open client connection from the server side (as an idle keep-alive timeout does)."""
        if self._httpd is not None:
            self._httpd.drop_connections()

    @property
    def connections_accepted(self) -> int:
        return self._httpd.accepted if self._httpd is not None else 0

    @property
    def log(self) -> list[RequestRecord]:
        return self.log_store.snapshot()

    def requests(self, path: str | None = None) -> list[RequestRecord]:
        """Logged requests, optionally those whose path matches a glob."""
        return [r for r in self.log if path is None or fnmatchcase(r.path, path)]

    def bytes_sent(self, path: str | None = None) -> int:
        return sum(r.body_bytes for r in self.requests(path))

    def reset(self) -> None:
        """Forget the log and remove all fault rules."""
        self.log_store.clear()
        self.faults.clear()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/"

    def start(self: ServerT) -> ServerT:
        self.stopping.clear()
        self._httpd = _ThreadingServer(self, self.handler_class)
        if self.tls is not None:
            self._httpd.socket = self.tls.wrap_socket(self._httpd.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop promptly, releasing hanging handlers and closing open connections."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self.stopping.set()
        httpd.shutdown()
        httpd.drop_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self: ServerT) -> ServerT:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# -- the file server -----------------------------------------------------------


class RangeNotSatisfiable(Exception):
    pass


_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """A single byte range as (first, last) inclusive; None means "send it all".

    Malformed and multi-range headers are ignored (RFC 9110 allows it).
    """
    match = _RANGE.match(value or "")
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size - 1
    start = int(first)
    if last != "" and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return start, size - 1 if last == "" else min(int(last), size - 1)


def _content_length(headers: Headers) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value)
    return None


def _file_chunks(path: Path, start: int, length: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(start)
        while length > 0:
            chunk = f.read(min(BLOCK_SIZE, length))
            if not chunk:
                return
            length -= len(chunk)
            yield chunk


class _FileHandler(FaultInjectingHandler):
    server: _ThreadingServer

    def do_GET(self) -> None:  # noqa: N802
        self.handle_with_faults()

    def do_HEAD(self) -> None:  # noqa: N802
        self.handle_with_faults()

    def produce(self, path: str, headers: Headers, body: bytes) -> Reply:
        owner: RangeHTTPServer = self.server.owner  # type: ignore[assignment]
        root = owner.root
        try:
            file = (root / path.lstrip("/")).resolve()
        except (OSError, ValueError):
            return Reply.simple(400)
        if not file.is_relative_to(root):
            return Reply.simple(403)
        if not file.is_file():
            return Reply.simple(404)
        stat = file.stat()
        size = stat.st_size
        etag = f'"{size:x}-{stat.st_mtime_ns:x}"'
        last_modified = formatdate(stat.st_mtime, usegmt=True)
        common = [("Accept-Ranges", "bytes"), ("ETag", etag), ("Last-Modified", last_modified),
                  ("Date", self.date_time_string())]
        request = {name.lower(): value.strip() for name, value in headers}
        if_match = request.get("if-match")
        if if_match is not None and if_match != "*" and etag not in _etag_list(if_match):
            return Reply.simple(412, common)
        range_value = request.get("range")
        if request.get("if-range") not in (None, etag, last_modified):
            range_value = None
        try:
            span = parse_range(range_value, size)
        except RangeNotSatisfiable:
            return Reply.simple(416, common + [("Content-Range", f"bytes */{size}")])
        kind = [("Content-Type", "application/octet-stream")]
        if span is None:
            return Reply(200, common + kind + [("Content-Length", str(size))],
                         _file_chunks(file, 0, size))
        first, last = span
        length = last - first + 1
        return Reply(206, common + kind + [("Content-Length", str(length)),
                                           ("Content-Range", f"bytes {first}-{last}/{size}")],
                     _file_chunks(file, first, length))


def _etag_list(value: str) -> list[str]:
    return [tag.strip() for tag in value.split(",")]


class RangeHTTPServer(BackgroundHTTPServer):
    """Serves the files under ``root`` with single byte ranges, ETags and faults."""

    handler_class = _FileHandler

    def __init__(self, root: Path, faults: Faults | None = None, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(faults, tls)
        self.root = Path(root).resolve()

    def url_for(self, path: Path | str) -> str:
        """The URL of a file given as a path under ``root`` (absolute or relative)."""
        relative = Path(path)
        if relative.is_absolute():
            relative = relative.resolve().relative_to(self.root)
        return self.url + quote(relative.as_posix())
