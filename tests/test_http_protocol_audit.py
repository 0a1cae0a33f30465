"""HTTP protocol corners of the HTTP(S) source (audit).

Each test runs a real server on loopback (``Srv`` below: a small ranged file server whose replies a
test can shape per request) and checks that a load either returns tensors bit-identical to
``safetensors`` or raises a typed fastload error, quickly, leaving nothing running.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
from collections.abc import Callable
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

import pytest
import torch
from reliability_helpers import (  # noqa: F401
    QUICK,
    Leaks,
    Timer,
    assert_bit_exact,
    data_start,
    load_checked,
    private_tmp,
)
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import fastload

ENGINES = ["threads", "aiohttp"]
FAST_RETRY = fastload.RetryConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, deadline_s=5.0)
CFG = QUICK.replace(retry=FAST_RETRY, stall_timeout_s=1.0)


# -- a shapeable ranged file server ---------------------------------------------------------------

class Req:
    def __init__(self, n: int, method: str, target: str, headers: dict[str, str]):
        self.n = n
        self.method = method
        self.target = target  # the raw request target, query string included
        self.path = unquote(urlsplit(target).path)
        self.query = urlsplit(target).query
        self.headers = headers
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("range", ""))
        self.range = (int(m.group(1)), int(m.group(2)) + 1) if m else None


class Reply:
    def __init__(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"", *,
                 mode: str = "length", delay_s: float = 0.0):
        self.status = status
        self.headers = dict(headers or {})
        self.body = body
        self.mode = mode  # "length" | "chunked" | "close" (close-delimited, no length)
        self.delay_s = delay_s  # before the status line
        self.interim: list[bytes] = []  # raw 1xx responses sent before this one


class Srv:
    """Serves ``files`` (decoded path -> bytes) with single ranges; ``script(req, reply) -> reply`` may rewrite."""

    def __init__(self, files: dict[str, bytes], script: Callable[[Req, Reply], Reply] | None = None, *,
                 etag: str | None = '"v1"', last_modified: str | None = None, host: str = "127.0.0.1",
                 close_every_reply: bool = False):
        self.files = files
        self.script = script or (lambda req, rep: rep)
        self.etag = etag
        self.last_modified = last_modified if last_modified is not None else formatdate(1_700_000_000, usegmt=True)
        self.close_every_reply = close_every_reply
        self.requests: list[Req] = []
        self.lock = threading.Lock()
        self.connections = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with owner.lock:
                    owner.connections += 1

            def do_GET(self):
                owner._handle(self)

            def do_HEAD(self):
                owner._handle(self)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True
            block_on_close = False

            def server_bind(self):
                import socketserver
                socketserver.TCPServer.server_bind(self)
                self.server_name, self.server_port = self.server_address[:2]

        self.host = host
        self.httpd = Server((host, 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.stopping = threading.Event()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str, userinfo: str = "") -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{userinfo}{host}:{self.port}{path}"

    def default(self, req: Req) -> Reply:
        data = self.files.get(req.path)
        if data is None:
            return Reply(404, {"Content-Type": "text/plain"}, b"not found")
        common = {}
        if self.etag:
            common["ETag"] = self.etag
        if self.last_modified:
            common["Last-Modified"] = self.last_modified
        if req.range is None:
            return Reply(200, common, data)
        start, end = req.range
        if start >= len(data):
            return Reply(416, {**common, "Content-Range": f"bytes */{len(data)}"})
        end = min(end, len(data))
        return Reply(206, {**common, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}, data[start:end])

    def gets(self, ranged_only: bool = False) -> list[Req]:
        with self.lock:
            return [r for r in self.requests if r.method == "GET" and (r.range or not ranged_only)]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        with self.lock:
            req = Req(len(self.requests), h.command, h.path, {k.lower(): v for k, v in h.headers.items()})
            self.requests.append(req)
        rep = self.script(req, self.default(req))
        if rep.delay_s and self.stopping.wait(rep.delay_s):
            h.close_connection = True
            return
        for raw in rep.interim:
            h.wfile.write(raw)
        h.send_response_only(rep.status)
        for name, value in rep.headers.items():
            h.send_header(name, value)
        close = rep.mode == "close" or self.close_every_reply
        if rep.mode == "chunked":
            h.send_header("Transfer-Encoding", "chunked")
        elif rep.mode == "length" and "Content-Length" not in rep.headers:
            h.send_header("Content-Length", str(len(rep.body)))
        if close:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        if h.command == "HEAD":
            return
        try:
            if rep.mode == "chunked":
                for i in range(0, len(rep.body), 5000):
                    piece = rep.body[i:i + 5000]
                    h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                h.wfile.write(b"0\r\n\r\n")
            else:
                h.wfile.write(rep.body)
            h.wfile.flush()
        except OSError:
            h.close_connection = True

    def __enter__(self) -> Srv:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def tensors_of(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(40_000, generator=g), "b": torch.randn(123, 77, generator=g),
            "c": torch.arange(5_003, dtype=torch.int32)}


def blob(tensors: dict[str, torch.Tensor]) -> tuple[bytes, dict[str, torch.Tensor]]:
    raw = st_save(tensors)
    return raw, st_load(raw)  # the reference: what safetensors itself reads back


def load_bounded(url, ports, config, bound_s: float = 8.0, **kwargs):
    """``fastload.load`` or the exception it raised (any type: an untyped one is a finding), bounded in time,
    leaving no thread or socket behind."""
    return load_checked(url, set(ports), config, bound_s, catch=Exception, **kwargs)[0]


def ok(got, want) -> None:
    assert not isinstance(got, BaseException), f"{type(got).__name__}: {got}"
    assert_bit_exact(got, want)


# -- paths: percent-encoding and unicode ----------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("spelling", ["raw", "quoted"])
def test_unicode_path_loads_bit_exact(engine, spelling):
    """A file under a non-ASCII directory name, given raw (as users type it) or percent-encoded: every
    request must reach the same file (UTF-8 percent-encoded on the wire), on both body engines."""
    raw, want = blob(tensors_of())
    path = "/mödels/模型/model.safetensors"
    with Srv({path: raw}) as srv:
        url = srv.url(path if spelling == "raw" else quote(path))
        got = load_bounded(url, {srv.port}, CFG.replace(http_engine=engine))
        assert all(r.path == path for r in srv.gets()), {r.target for r in srv.gets()}
    ok(got, want)


@pytest.mark.parametrize("engine", ENGINES)
def test_percent_encoded_reserved_characters_stay_encoded(engine):
    """``%23`` (#), ``%3F`` (?), ``%20`` and ``%25`` in a path are part of the file name: sent as they were."""
    raw, want = blob(tensors_of())
    path = "/a b#c?d%e/model.safetensors"
    with Srv({path: raw}) as srv:
        url = srv.url(quote(path))
        assert "%23" in url and "%3F" in url and "%25" in url
        got = load_bounded(url, {srv.port}, CFG.replace(http_engine=engine))
        assert {r.path for r in srv.gets()} == {path}
    ok(got, want)


# -- query strings --------------------------------------------------------------------------------

SIG = "sig-SECRET-1234"


def _needs_query(query: str):
    def script(req: Req, rep: Reply) -> Reply:
        if req.query != query:
            return Reply(403, {"Content-Type": "text/plain"}, b"signature missing")
        return rep
    return script


@pytest.mark.parametrize("engine", ENGINES)
def test_presigned_query_is_sent_on_every_request(engine):
    raw, want = blob(tensors_of())
    query = f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=60&X-Amz-Signature={SIG}"
    with Srv({"/m.safetensors": raw}, _needs_query(query)) as srv:
        got = load_bounded(srv.url(f"/m.safetensors?{query}"), {srv.port}, CFG.replace(http_engine=engine))
        assert len(srv.gets()) >= 3 and all(r.query == query for r in srv.gets())
    ok(got, want)


@pytest.mark.parametrize("engine", ENGINES)
def test_presigned_query_is_redacted_when_a_body_read_fails(engine):
    """Tensor reads that keep failing (a 500 each time) end in TransferError naming the URL and range, but
    never the signature."""
    raw, _ = blob(tensors_of())
    start = data_start(raw)
    query = f"X-Amz-Signature={SIG}"

    def script(req: Req, rep: Reply) -> Reply:
        if req.range and req.range[0] >= start:
            return Reply(500, {"Content-Type": "text/plain"}, f"bad {req.target}".encode())
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        err = load_bounded(srv.url(f"/m.safetensors?{query}"), {srv.port}, CFG.replace(http_engine=engine))
    assert isinstance(err, fastload.TransferError), err
    assert "m.safetensors" in str(err) and "bytes [" in str(err)
    import traceback
    assert SIG not in "".join(traceback.format_exception(err)) and SIG not in repr(vars(err))


def _checkpoint_dir(tensors: dict[str, torch.Tensor], shards: dict[str, list[str]]) -> tuple[dict[str, bytes], dict]:
    """files (relative name -> bytes) for a sharded checkpoint; shards maps a file name to its tensor names."""
    files, weight_map = {}, {}
    for name, keys in shards.items():
        files[name] = st_save({k: tensors[k] for k in keys})
        weight_map.update({k: name for k in keys})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    return files, {k: st_load(files[n])[k] for n, keys in shards.items() for k in keys}


@pytest.mark.parametrize("engine", ENGINES)
def test_directory_url_with_a_token_query_keeps_it_on_every_request(engine):
    """A directory URL whose access token is a query parameter (Azure SAS-style ``?sv=...&sig=...``): the file
    names go into the path, before the query, and every request carries the token."""
    files, want = _checkpoint_dir(tensors_of(), {"s1.safetensors": ["a"], "s2.safetensors": ["b", "c"]})
    query = f"sv=2024&sig={SIG}"
    with Srv({f"/ckpt/{k}": v for k, v in files.items()}, _needs_query(query)) as srv:
        got = load_bounded(srv.url(f"/ckpt/?{query}"), {srv.port}, CFG.replace(http_engine=engine))
        paths = {r.path for r in srv.gets()}
    if isinstance(got, fastload.FastloadError):
        assert SIG not in str(got)
    assert paths >= {"/ckpt/model.safetensors.index.json"}, paths
    ok(got, want)


# -- credentials in the URL -----------------------------------------------------------------------

PASSWORD = "pw-SECRET-c0ffee"


def _needs_basic(user: str, password: str):
    token = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def script(req: Req, rep: Reply) -> Reply:
        if req.headers.get("authorization") != token:
            return Reply(401, {"WWW-Authenticate": 'Basic realm="x"', "Content-Type": "text/plain"}, b"who?")
        return rep
    return script


@pytest.mark.parametrize("engine", ENGINES)
def test_single_file_url_with_userinfo_authenticates_every_request(engine):
    raw, want = blob(tensors_of())
    with Srv({"/m.safetensors": raw}, _needs_basic("alice", PASSWORD)) as srv:
        got = load_bounded(srv.url("/m.safetensors", f"alice:{PASSWORD}@"), {srv.port},
                           CFG.replace(http_engine=engine))
    ok(got, want)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("form", ["directory", "index"])
def test_sharded_checkpoint_behind_basic_auth_in_the_url(engine, form):
    """``http://user:pw@host/ckpt/`` (or its index.json): the shards are on the same origin and need the same
    credentials. The shard URLs must be built from the real URL, not from its redacted display form
    (``user:***@``, which would send the password ``***``)."""
    files, want = _checkpoint_dir(tensors_of(), {"s1.safetensors": ["a"], "s2.safetensors": ["b", "c"]})
    with Srv({f"/ckpt/{k}": v for k, v in files.items()}, _needs_basic("alice", PASSWORD)) as srv:
        tail = "/ckpt/" if form == "directory" else "/ckpt/model.safetensors.index.json"
        got = load_bounded(srv.url(tail, f"alice:{PASSWORD}@"), {srv.port}, CFG.replace(http_engine=engine))
        unauthenticated = {r.path for r in srv.gets() if r.headers.get("authorization") is None}
    if isinstance(got, BaseException):
        assert PASSWORD not in str(got)
    ok(got, want)
    assert not unauthenticated, unauthenticated


def test_credentials_in_url_never_show_in_errors_of_a_sharded_load():
    """A shard that is missing behind basic auth: SourceNotFoundError, no password in it."""
    files, _ = _checkpoint_dir(tensors_of(), {"s1.safetensors": ["a"], "s2.safetensors": ["b", "c"]})
    del files["s2.safetensors"]
    with Srv({f"/ckpt/{k}": v for k, v in files.items()}) as srv:
        err = load_bounded(srv.url("/ckpt/", f"alice:{PASSWORD}@"), {srv.port}, CFG)
    assert isinstance(err, fastload.SourceNotFoundError), err
    import traceback
    assert "s2.safetensors" in str(err)
    assert PASSWORD not in "".join(traceback.format_exception(err))


# -- index.json over HTTP ---------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_index_weight_map_with_subdirectories(engine):
    files, want = _checkpoint_dir(tensors_of(), {"part1/s1.safetensors": ["a"], "part2/deep/s2.safetensors": ["b", "c"]})
    with Srv({f"/ckpt/{k}": v for k, v in files.items()}) as srv:
        got = load_bounded(srv.url("/ckpt/"), {srv.port}, CFG.replace(http_engine=engine))
        paths = {r.path for r in srv.gets()}
    ok(got, want)
    assert {"/ckpt/part1/s1.safetensors", "/ckpt/part2/deep/s2.safetensors"} <= paths


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["shard one.safetensors", "teil_ü/zwei.safetensors"])
def test_index_shard_names_that_need_percent_encoding(engine, name):
    """The index accepts shard names with spaces and non-ASCII letters (``parse_index`` lets them through);
    over HTTP they must be percent-encoded into the URL, on every request (the probe and the body reads
    alike), as aiohttp does for the probe."""
    files, want = _checkpoint_dir(tensors_of(), {name: ["a"], "s2.safetensors": ["b", "c"]})
    with Srv({f"/ckpt/{k}": v for k, v in files.items()}) as srv:
        got = load_bounded(srv.url("/ckpt/"), {srv.port}, CFG.replace(http_engine=engine))
        targets = {r.target for r in srv.gets()}
    ok(got, want)
    assert all(t.isascii() and " " not in t for t in targets), targets


# -- hosts ----------------------------------------------------------------------------------------

def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_available(), reason="the OS has no IPv6 loopback")
@pytest.mark.parametrize("engine", ENGINES)
def test_ipv6_literal_host(engine):
    raw, want = blob(tensors_of())
    with Srv({"/m.safetensors": raw}, host="::1") as srv:
        url = srv.url("/m.safetensors")
        assert url.startswith("http://[::1]:")
        got = load_bounded(url, set(), CFG.replace(http_engine=engine))
        hosts = {r.headers.get("host") for r in srv.gets()}
    ok(got, want)
    assert hosts == {f"[::1]:{srv.port}"}, hosts


# -- framing: chunked, close-delimited, Connection: close --------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["chunked", "close"])
def test_exact_ranges_without_content_length_load_bit_exact(engine, mode):
    """206 replies with the right Content-Range but no Content-Length: chunked, or delimited by closing the
    connection (HTTP/1.0-style). Both are legal framings of the right bytes."""
    raw, want = blob(tensors_of())

    def script(req: Req, rep: Reply) -> Reply:
        if rep.status == 206:
            rep.mode = mode
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    ok(got, want)


@pytest.mark.parametrize("engine", ENGINES)
def test_server_that_closes_the_connection_after_every_reply(engine):
    raw, want = blob(tensors_of())
    with Srv({"/m.safetensors": raw}, close_every_reply=True) as srv:
        trace = fastload.Trace()
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine), trace=trace)
    ok(got, want)
    assert not trace.summary().counters.get("retries"), "Connection: close is not a failure"


@pytest.mark.parametrize("engine", ENGINES)
def test_identity_encoding_is_asked_for_on_every_request(engine):
    raw, want = blob(tensors_of())
    with Srv({"/m.safetensors": raw}) as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
        encodings = {r.headers.get("accept-encoding") for r in srv.gets()}
    ok(got, want)
    assert encodings == {"identity"}, encodings


# -- redirects ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_of_tensor_reads_only_to_another_port(engine, status):
    """The probe and header reads are answered directly; tensor reads are redirected to a mirror on another
    port (absolute Location). The bytes come from the mirror, bit-exact."""
    raw, want = blob(tensors_of())
    start = data_start(raw)
    with Srv({"/mirror/m.safetensors": raw}) as mirror:
        def script(req: Req, rep: Reply) -> Reply:
            if req.range and req.range[0] >= start:
                return Reply(status, {"Location": mirror.url("/mirror/m.safetensors")})
            return rep

        with Srv({"/m.safetensors": raw}, script) as srv:
            got = load_bounded(srv.url("/m.safetensors"), {srv.port, mirror.port}, CFG.replace(http_engine=engine))
        ranged = mirror.gets(ranged_only=True)
    ok(got, want)
    assert ranged and all(r.range[0] >= start for r in ranged)


@pytest.mark.parametrize("engine", ENGINES)
def test_relative_redirect_keeps_range_and_query(engine):
    """A relative ``Location`` (``../blobs/x?...``) resolves against the request URL; the redirected GET still
    carries the Range asked for."""
    raw, want = blob(tensors_of())

    def script(req: Req, rep: Reply) -> Reply:
        if req.path == "/repo/main/m.safetensors":
            return Reply(307, {"Location": "../blobs/abc?token=t1"})
        if req.path == "/repo/blobs/abc" and req.query != "token=t1":
            return Reply(403, {}, b"no token")
        return rep

    with Srv({"/repo/blobs/abc": raw}, script) as srv:
        got = load_bounded(srv.url("/repo/main/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
        blob_gets = [r for r in srv.gets() if r.path == "/repo/blobs/abc"]
    ok(got, want)
    assert blob_gets and all(r.range for r in blob_gets)


@pytest.mark.parametrize("engine", ENGINES)
def test_redirect_loop_on_tensor_reads_only_fails_typed(engine):
    raw, _ = blob(tensors_of())
    start = data_start(raw)

    def script(req: Req, rep: Reply) -> Reply:
        if req.range and req.range[0] >= start or req.path == "/loop":
            return Reply(302, {"Location": "/loop" if req.path != "/loop" else "/m.safetensors"})
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        err = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    assert isinstance(err, fastload.TransferError), err
    assert "m.safetensors" in str(err) and "bytes [" in str(err)


# -- replies that are not a single 206 of the range ---------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_multipart_byteranges_reply_never_reaches_a_tensor(engine):
    raw, _ = blob(tensors_of())
    start = data_start(raw)

    def script(req: Req, rep: Reply) -> Reply:
        if rep.status == 206 and req.range[0] >= start:
            a, b = req.range
            part = (f"--XYZ\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b - 1}/{len(raw)}"
                    f"\r\n\r\n").encode() + raw[a:b] + b"\r\n--XYZ--\r\n"
            return Reply(206, {"ETag": '"v1"', "Content-Type": "multipart/byteranges; boundary=XYZ"}, part)
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        err = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    assert isinstance(err, fastload.TransferError), err
    assert "m.safetensors" in str(err)


@pytest.mark.parametrize("engine", ENGINES)
def test_content_range_with_unknown_total_on_tensor_reads_is_accepted(engine):
    raw, want = blob(tensors_of())
    start = data_start(raw)

    def script(req: Req, rep: Reply) -> Reply:
        if rep.status == 206 and req.range[0] >= start:
            a, b = req.range
            rep.headers["Content-Range"] = f"bytes {a}-{b - 1}/*"
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    ok(got, want)


@pytest.mark.parametrize("engine", ENGINES)
def test_content_range_for_another_range_is_never_used(engine):
    """206 whose Content-Range names bytes shifted by one (same length): a lie, retried, then TransferError."""
    raw, _ = blob(tensors_of())
    start = data_start(raw)

    def script(req: Req, rep: Reply) -> Reply:
        if rep.status == 206 and req.range[0] >= start:
            a, b = req.range
            return Reply(206, {"ETag": '"v1"', "Content-Range": f"bytes {a + 1}-{b}/{len(raw)}"}, raw[a + 1:b + 1])
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        err = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    assert isinstance(err, fastload.TransferError), err


# -- validators ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_weak_etag_loads_without_if_match(engine):
    raw, want = blob(tensors_of())
    with Srv({"/m.safetensors": raw}, etag='W/"v1"') as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
        if_match = [r.headers.get("if-match") for r in srv.gets() if r.headers.get("if-match")]
    ok(got, want)
    assert not if_match, if_match


@pytest.mark.parametrize("engine", ENGINES)
def test_strong_etag_is_sent_as_if_match_on_tensor_reads(engine):
    raw, want = blob(tensors_of())
    start = data_start(raw)
    with Srv({"/m.safetensors": raw}, etag='"abc-1"') as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
        tensor_gets = [r for r in srv.gets(ranged_only=True) if r.range[0] >= start]
    ok(got, want)
    assert tensor_gets and all(r.headers.get("if-match") == '"abc-1"' for r in tensor_gets)


@pytest.mark.parametrize("engine", ENGINES)
def test_etag_missing_at_first_then_appearing_loads(engine):
    raw, want = blob(tensors_of())

    def script(req: Req, rep: Reply) -> Reply:
        if req.n == 0:
            rep.headers.pop("ETag", None)
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    ok(got, want)


@pytest.mark.parametrize("engine", ENGINES)
def test_last_modified_only_loads_bit_exact(engine):
    raw, want = blob(tensors_of())
    with Srv({"/m.safetensors": raw}, etag=None) as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    ok(got, want)


@pytest.mark.parametrize("engine", ENGINES)
def test_strong_etag_replaced_mid_load_is_source_changed(engine):
    raw, _ = blob(tensors_of())
    start = data_start(raw)

    def script(req: Req, rep: Reply) -> Reply:
        if req.range and req.range[0] >= start and req.headers.get("if-match") == '"v1"':
            return Reply(412, {"ETag": '"v2"'}, b"precondition failed")
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        err = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    assert isinstance(err, fastload.SourceChangedError), err
    assert "m.safetensors" in str(err)


# -- timing: slow first byte --------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_slow_first_byte_under_the_stall_timeout_is_not_a_retry(engine):
    raw, want = blob(tensors_of())
    start = data_start(raw)

    def script(req: Req, rep: Reply) -> Reply:
        if req.range and req.range[0] >= start:
            rep.delay_s = 0.5
        return rep

    trace = fastload.Trace()
    with Srv({"/m.safetensors": raw}, script) as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine, stall_timeout_s=1.5),
                           trace=trace)
    ok(got, want)
    assert not trace.summary().counters.get("retries")


@pytest.mark.parametrize("engine", ENGINES)
def test_first_byte_slower_than_the_stall_timeout_every_time_is_a_transfer_error(engine):
    raw, _ = blob(tensors_of())
    start = data_start(raw)

    def script(req: Req, rep: Reply) -> Reply:
        if req.range and req.range[0] >= start:
            rep.delay_s = 3.0
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        err = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine, stall_timeout_s=0.3),
                           bound_s=6.0)
    assert isinstance(err, fastload.TransferError), err
    assert "m.safetensors" in str(err) and "bytes [" in str(err)


# -- 416 and empty tensors ------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("layout", ["empty_last", "only_empty", "empty_between"])
def test_empty_tensors_over_http(engine, layout):
    g = torch.Generator().manual_seed(3)
    tensors = {
        "empty_last": {"a": torch.randn(5000, generator=g), "zz": torch.zeros(0, 4)},
        "only_empty": {"e1": torch.zeros(0), "e2": torch.zeros(3, 0, dtype=torch.int64)},
        "empty_between": {"a": torch.randn(300, generator=g), "b": torch.zeros(0, dtype=torch.float16),
                          "c": torch.randn(7, generator=g)},
    }[layout]
    raw, want = blob(tensors)
    with Srv({"/m.safetensors": raw}) as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
        bad = [r for r in srv.gets(ranged_only=True) if r.range[0] >= len(raw)]
        assert not any(r.headers.get("range", "").startswith("bytes=") and r.range is None for r in srv.gets())
    ok(got, want)
    assert not bad, "asked for bytes past the end of the file"


@pytest.mark.parametrize("engine", ENGINES)
def test_names_selecting_only_an_empty_tensor_fetches_no_tensor_bytes(engine):
    raw, want = blob({"a": torch.randn(20_000), "zz": torch.zeros(0)})
    start = data_start(raw)
    with Srv({"/m.safetensors": raw}) as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine), names=["zz"])
        tensor_gets = [r for r in srv.gets(ranged_only=True) if r.range[1] > start]
    ok(got, {"zz": want["zz"]})
    assert not tensor_gets


def test_zero_byte_object_is_a_format_error_naming_the_url():
    """An empty object (416 with ``bytes */0`` for the probe): not a safetensors file."""
    with Srv({"/empty.safetensors": b""}) as srv:
        err = load_bounded(srv.url("/empty.safetensors"), {srv.port}, CFG)
    assert isinstance(err, fastload.FormatError), err
    assert "empty.safetensors" in str(err)


# -- header syntax the two engines must read alike --------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_header_values_with_trailing_whitespace_are_read_as_without(engine):
    """RFC 9112 5.1: optional whitespace after a field value is not part of it. A server that pads its values
    (``ETag: "v1"  ``) serves the same object on every reply; the probe (aiohttp) strips the padding, so the
    body replies must be compared the same way, not as a changed ETag."""
    raw, want = blob(tensors_of())

    def script(req: Req, rep: Reply) -> Reply:
        rep.headers = {k: v + "  " for k, v in rep.headers.items()}
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    ok(got, want)


@pytest.mark.parametrize("engine", ENGINES)
def test_interim_103_early_hints_before_the_206(engine):
    """RFC 9110 15.2: a client must parse any 1xx responses before the final one (a CDN sends 103 Early
    Hints). The 206 that follows is the reply."""
    raw, want = blob(tensors_of())

    def script(req: Req, rep: Reply) -> Reply:
        rep.interim = [b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"]
        return rep

    with Srv({"/m.safetensors": raw}, script) as srv:
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, CFG.replace(http_engine=engine))
    ok(got, want)


@pytest.mark.parametrize("engine", ENGINES)
def test_non_string_http_header_value_is_a_config_error(engine):
    """``LoadConfig`` is validated (ConfigError); a header value that is not a string (an int from a settings
    file) must not escape a load as a bare TypeError."""
    raw, _ = blob(tensors_of())
    with Srv({"/m.safetensors": raw}) as srv:
        try:
            config = CFG.replace(http_engine=engine, http_headers={"X-Retry-Budget": 3})
        except fastload.ConfigError:
            return
        got = load_bounded(srv.url("/m.safetensors"), {srv.port}, config)
    assert isinstance(got, fastload.ConfigError) or not isinstance(got, BaseException), repr(got)


@pytest.mark.parametrize("engine", ENGINES)
def test_two_urls_differing_only_in_their_query_are_two_objects(engine):
    """``/dl?id=1`` and ``/dl?id=2`` redact to the same display URL (``/dl?id=***``): still two objects, each
    read from its own URL, each pinned to its own ETag."""
    a, want_a = blob({"x": torch.randn(10_000)})
    b, want_b = blob({"y": torch.randn(20_000), "z": torch.arange(99)})

    def script(req: Req, rep: Reply) -> Reply:
        data = {"id=1": a, "id=2": b}.get(req.query)
        if req.path != "/dl" or data is None or req.range is None:
            return Reply(404, {}, b"no")
        s, e = req.range
        e = min(e, len(data))
        return Reply(206, {"ETag": f'"{req.query}"', "Content-Range": f"bytes {s}-{e - 1}/{len(data)}"}, data[s:e])

    with Srv({}, script) as srv:
        got = load_bounded([srv.url("/dl?id=1"), srv.url("/dl?id=2")], {srv.port}, CFG.replace(http_engine=engine))
    ok(got, {**want_a, **want_b})
