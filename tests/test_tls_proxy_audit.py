"""HTTP(S) and S3 transports in corporate networks: TLS trust, host names and forward proxies.

What "correct" means here comes from the README and from how the standard clients behave:

* A certificate that does not verify (unknown CA, wrong host name) is refused at once, with a
  ``TransferError`` naming the URL, never retried; both body engines alike, also when only a later
  connection of the load meets the bad certificate.
* ``HTTP(S)_PROXY`` / ``NO_PROXY``: curl, requests, urllib, huggingface_hub and botocore send requests
  through the proxy the environment names (CONNECT for https, an absolute-URI request for http) and
  bypass it for ``NO_PROXY`` hosts. Whatever fastload does, the two engines and, for S3, the metadata
  calls (botocore) and the presigned GETs (fastload's own HTTP engine) must agree: a HEAD through the
  proxy and GETs around it fail in a network where only the proxy reaches the store.
* ``AWS_CA_BUNDLE`` (the AWS SDKs' private-CA setting) makes an S3 endpoint over HTTPS trusted for
  botocore's HEAD/LIST; the presigned GETs of the same load must trust the same CA.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import uuid
from collections.abc import Callable

import pytest

import fastload
from reliability_helpers import QUICK, Leaks, assert_bit_exact, load_checked, write_checkpoint
from servers import RangeHTTPServer

trustme = pytest.importorskip("trustme")

ENGINES = ["threads", "aiohttp"]
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
               "http_proxy", "https_proxy", "all_proxy", "no_proxy")


# -- helpers: a byte pump, a TLS front, a forward proxy ---------------------------------------------


def _pump(a: socket.socket, b: socket.socket, stop: threading.Event) -> None:
    """Copy bytes both ways between ``a`` and ``b`` until both directions ended (or ``stop``)."""
    sel = selectors.DefaultSelector()
    peers = {a: b, b: a}
    for s in peers:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    open_dirs = 2
    try:
        while open_dirs and not stop.is_set():
            for key, _ in sel.select(0.05):
                src = key.fileobj
                try:
                    data = src.recv(1 << 16)
                    while data and isinstance(src, ssl.SSLSocket) and src.pending():
                        data += src.recv(src.pending())
                except (BlockingIOError, ssl.SSLWantReadError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(src)
                    open_dirs -= 1
                    try:
                        peers[src].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    if open_dirs and isinstance(peers[src], ssl.SSLSocket):
                        open_dirs = 0  # a TLS peer cannot be half-closed: the conversation is over
                    continue
                dst = peers[src]
                dst.setblocking(True)
                try:
                    dst.sendall(data)
                except OSError:
                    open_dirs = 0
                    break
                finally:
                    dst.setblocking(False)
    finally:
        sel.close()
        for s in peers:
            try:
                s.close()
            except OSError:
                pass


class _Listener:
    """A TCP listener on 127.0.0.1 that hands each accepted connection to ``serve`` on its own thread."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._loop, name=f"audit-listener:{self.port}", daemon=True)

    def serve(self, conn: socket.socket, n: int) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        self.sock.settimeout(0.05)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self.lock:
                n = self.accepted
                self.accepted += 1
                self._conns.append(conn)
            threading.Thread(target=self._guard, args=(conn, n), name="audit-process_request",
                             daemon=True).start()

    def _guard(self, conn: socket.socket, n: int) -> None:
        try:
            self.serve(conn, n)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._thread.join(5)
        self.sock.close()
        with self.lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class TLSFront(_Listener):
    """Terminates TLS on 127.0.0.1 and relays the plain bytes to ``upstream`` (host, port).

    ``context_for(n)`` gives the server context for the n-th connection (0-based), or None to accept
    the TCP connection and never answer the TLS handshake.
    """

    def __init__(self, upstream: tuple[str, int], context_for: Callable[[int], ssl.SSLContext | None]):
        super().__init__()
        self.upstream = upstream
        self.context_for = context_for
        self.handshakes = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def serve(self, conn: socket.socket, n: int) -> None:
        context = self.context_for(n)
        if context is None:
            self.stop.wait()
            return
        conn.settimeout(5)
        try:
            tls = context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            return
        with self.lock:
            self.handshakes += 1
        up = socket.create_connection(self.upstream, timeout=5)
        up.settimeout(None)
        tls.settimeout(None)
        _pump(tls, up, self.stop)


class ForwardProxy(_Listener):
    """A tiny forward proxy: ``CONNECT host:port`` tunnels (https), ``GET http://host/path`` is forwarded
    (http). ``log`` holds ``(method, target)`` of every request it was asked to carry."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, conn: socket.socket, n: int) -> None:
        conn.settimeout(5)
        buf = b""
        while b"\r\n\r\n" not in buf:
            piece = conn.recv(65536)
            if not piece:
                return
            buf += piece
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ", 2)
        with self.lock:
            self.log.append((method, target))
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                up.sendall(rest)
        else:
            if not target.startswith("http://"):
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            hostport, _, path = target[len("http://"):].partition("/")
            host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "80")
            up = socket.create_connection((host, int(port)), timeout=5)
            headers = [line for line in lines[1:]
                       if line.split(":", 1)[0].strip().lower() not in ("proxy-connection", "connection",
                                                                       "keep-alive", "proxy-authorization")]
            out = "\r\n".join([f"{method} /{path} {version}", *headers, "Connection: close", "", ""])
            up.sendall(out.encode("latin-1") + rest)
        conn.settimeout(None)
        up.settimeout(None)
        _pump(conn, up, self.stop)

    def carried(self) -> list[tuple[str, str]]:
        with self.lock:
            return list(self.log)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def ca(tmp_path):
    """A private CA (``ca.pem`` written to a file) and a server context factory for host names."""
    authority = trustme.CA()
    ca_file = tmp_path / "private-ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))

    def server_context(*hosts: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        authority.issue_cert(*hosts).configure_cert(ctx)
        return ctx

    authority.file = ca_file
    authority.server_context = server_context
    return authority


@pytest.fixture
def no_proxy_env(monkeypatch):
    """No proxy or CA settings from the host leak in (a CI image often sets them all to its system store)."""
    for name in (*_PROXY_VARS, "SSL_CERT_FILE", "SSL_CERT_DIR", "AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE",
                 "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _set_proxy(monkeypatch, *, http: str | None = None, https: str | None = None, no_proxy: str = "") -> None:
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    for names, value in ((("HTTP_PROXY", "http_proxy"), http), (("HTTPS_PROXY", "https_proxy"), https)):
        if value:
            for name in names:
                monkeypatch.setenv(name, value)
    # Set explicitly, even empty: 127.0.0.1/localhost are in many default NO_PROXY lists.
    monkeypatch.setenv("NO_PROXY", no_proxy)
    monkeypatch.setenv("no_proxy", no_proxy)


def _retries(trace: fastload.Trace) -> int:
    return trace.summary().counters.get("retries", 0)


# -- TLS: host names --------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cert_host,url_host,ok", [
    ("localhost", "localhost", True),
    ("127.0.0.1", "127.0.0.1", True),
    ("localhost", "127.0.0.1", False),   # a DNS name does not vouch for an IP address
    ("127.0.0.1", "localhost", False),   # nor an IP SAN for a name that resolves to it
    ("files.example.test", "127.0.0.1", False),
])
def test_certificate_must_name_the_host_in_the_url(engine, cert_host, url_host, ok, ca, tmp_path, no_proxy_env):
    no_proxy_env.setenv("SSL_CERT_FILE", str(ca.file))
    root = tmp_path / "root"
    root.mkdir()
    file, tensors = write_checkpoint(root / "model.safetensors")
    with RangeHTTPServer(root, tls=ca.server_context(cert_host)) as server:
        url = f"https://{url_host}:{server.port}/model.safetensors"
        trace = fastload.Trace()
        result, _ = load_checked(url, {server.port}, QUICK.replace(http_engine=engine), trace=trace)
        if ok:
            assert isinstance(result, dict), result
            assert_bit_exact(result, tensors)
        else:
            assert isinstance(result, fastload.TransferError), result
            assert "not trusted" in str(result) and url in str(result), str(result)
            assert "certificate" in str(result).lower()
            assert _retries(trace) == 0, "a certificate for another host is a matter of trust, not retried"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("second", ["wrong_host", "unknown_ca"])
def test_bad_certificate_on_a_later_connection_is_refused_not_retried(engine, second, ca, http_server, http_dir,
                                                                      no_proxy_env):
    """The probe's connection verifies, later ones (the body reads: a load balancer with one misconfigured
    node) present a certificate that does not: the body road says so, once, naming the URL."""
    no_proxy_env.setenv("SSL_CERT_FILE", str(ca.file))
    file, tensors = write_checkpoint(http_dir / "model.safetensors")
    good = ca.server_context("127.0.0.1")
    if second == "wrong_host":
        bad = ca.server_context("other.example.test")
    else:  # the right name, from a CA nobody trusts
        bad = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        trustme.CA().issue_cert("127.0.0.1").configure_cert(bad)
    path = http_server.url_for(file).split("/", 3)[3]
    with TLSFront(("127.0.0.1", http_server.port), lambda n: good if n == 0 else bad) as front:
        url = f"{front.url}/{path}"
        trace = fastload.Trace()
        # no ports: sockets are checked by test_leaving_an_https_stream_early_leaves_no_socket, which fails reliably
        # where this, racing the TLS shutdown of a connection cut mid-request, would fail only now and then
        result, _ = load_checked(url, set(), QUICK.replace(http_engine=engine, max_concurrency=2), trace=trace)
        assert isinstance(result, fastload.TransferError), result
        assert "not trusted" in str(result) and url in str(result), str(result)
        assert _retries(trace) == 0
        assert front.accepted <= 1 + 2 + 1, f"{front.accepted} connections for a refused certificate"


@pytest.mark.parametrize("engine", ENGINES)
def test_tls_handshake_that_never_answers_is_bounded(engine, ca, http_server, http_dir, no_proxy_env):
    """A server that accepts TCP and never finishes the TLS handshake is a connect stall: bounded by
    connect_timeout_s per attempt, then a TransferError naming the URL (no hang)."""
    no_proxy_env.setenv("SSL_CERT_FILE", str(ca.file))
    file, tensors = write_checkpoint(http_dir / "model.safetensors")
    good = ca.server_context("127.0.0.1")
    path = http_server.url_for(file).split("/", 3)[3]
    config = QUICK.replace(http_engine=engine, connect_timeout_s=0.3, stall_timeout_s=0.3, max_concurrency=2,
                           retry=fastload.RetryConfig(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02,
                                                      deadline_s=5.0))
    # The probe's connection works; every later one hangs in the handshake.
    with TLSFront(("127.0.0.1", http_server.port), lambda n: good if n == 0 else None) as front:
        url = f"{front.url}/{path}"
        result, seconds = load_checked(url, set(), config, bound_s=6.0)
        if isinstance(result, dict):  # aiohttp may carry every body on the probe's kept-alive connection
            assert_bit_exact(result, tensors)
        else:
            assert isinstance(result, fastload.TransferError), result
            assert url in str(result)


# -- proxies: plain HTTP and HTTPS sources ------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_http_proxy_from_environment_carries_every_request(engine, http_server, http_dir, no_proxy_env):
    """``HTTP_PROXY`` names the only way out (curl, requests, urllib, botocore, huggingface_hub all use it):
    the probe and every ranged body GET go through it, as absolute-URI requests."""
    file, tensors = write_checkpoint(http_dir / "model.safetensors")
    url = http_server.url_for(file)
    with ForwardProxy() as proxy:
        _set_proxy(no_proxy_env, http=proxy.url)
        result, _ = load_checked(url, {proxy.port, http_server.port}, QUICK.replace(http_engine=engine))
        assert isinstance(result, dict), result
        assert_bit_exact(result, tensors)
        gets_at_server = [r for r in http_server.requests() if r.method == "GET"]
        carried = [(m, t) for m, t in proxy.carried() if m == "GET" and t == url]
        assert len(carried) == len(gets_at_server) >= 2, (
            f"{len(gets_at_server)} GETs reached the server, {len(carried)} went through HTTP_PROXY "
            f"(engine={engine}): requests bypassed the proxy the environment names")


@pytest.mark.parametrize("engine", ENGINES)
def test_https_proxy_from_environment_tunnels_with_connect(engine, ca, tmp_path, no_proxy_env):
    """``HTTPS_PROXY``: an https source is reached through a CONNECT tunnel, and the certificate is still
    verified end to end (the proxy only carries bytes)."""
    no_proxy_env.setenv("SSL_CERT_FILE", str(ca.file))
    root = tmp_path / "root"
    root.mkdir()
    file, tensors = write_checkpoint(root / "model.safetensors")
    with RangeHTTPServer(root, tls=ca.server_context("127.0.0.1")) as server, ForwardProxy() as proxy:
        url = server.url_for(file)
        _set_proxy(no_proxy_env, https=proxy.url)
        result, _ = load_checked(url, {proxy.port, server.port}, QUICK.replace(http_engine=engine))
        assert isinstance(result, dict), result
        assert_bit_exact(result, tensors)
        tunnels = [t for m, t in proxy.carried() if m == "CONNECT"]
        assert tunnels and set(tunnels) == {f"127.0.0.1:{server.port}"}, (
            f"no CONNECT through HTTPS_PROXY (engine={engine}); proxy saw {proxy.carried()}")
        assert server.connections_accepted == len(tunnels), (
            f"{server.connections_accepted} connections reached the server, {len(tunnels)} through the proxy")


@pytest.mark.parametrize("engine", ENGINES)
def test_no_proxy_host_bypasses_the_proxy(engine, http_server, http_dir, no_proxy_env):
    """A host in ``NO_PROXY`` is reached directly, whatever ``HTTP_PROXY`` says."""
    file, tensors = write_checkpoint(http_dir / "model.safetensors")
    url = http_server.url_for(file)
    with ForwardProxy() as proxy:
        _set_proxy(no_proxy_env, http=proxy.url, https=proxy.url, no_proxy="localhost,127.0.0.1")
        result, _ = load_checked(url, {proxy.port, http_server.port}, QUICK.replace(http_engine=engine))
        assert isinstance(result, dict), result
        assert_bit_exact(result, tensors)
        assert proxy.carried() == [], f"NO_PROXY host sent through the proxy: {proxy.carried()}"


# -- S3: proxies and private CAs ----------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_s3_through_http_proxy_sends_head_and_gets_the_same_way(engine, s3_server, s3_bucket, tmp_path,
                                                                no_proxy_env):
    """botocore sends the HEAD through ``HTTP_PROXY``; the presigned GETs of the same load must take the
    same road, or a network where only the proxy reaches the store gets a HEAD that works and GETs that
    cannot connect. (Checksums verified: a HEAD is asked then, not only when the first GET is refused.)"""
    file, tensors = write_checkpoint(tmp_path / "model.safetensors")
    key = f"m-{uuid.uuid4().hex[:8]}/model.safetensors"
    s3_server.put(s3_bucket, key, file.read_bytes())
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    with ForwardProxy() as proxy:
        _set_proxy(no_proxy_env, http=proxy.url, https=proxy.url)
        result, _ = load_checked(f"s3://{s3_bucket}/{key}", {proxy.port},
                                 QUICK.replace(http_engine=engine, verify_checksums=True))
        assert isinstance(result, dict), result
        assert_bit_exact(result, tensors)
        carried = proxy.carried()
        heads = [t for m, t in carried if m == "HEAD" and key in t]
        gets = [t for m, t in carried if m == "GET" and key in t]
        assert heads, f"botocore's HEAD did not use HTTP_PROXY: {carried}"  # the reference behaviour
        assert gets, (f"HEAD went through HTTP_PROXY, but no presigned GET did (engine={engine}): "
                      f"the tensor bytes bypassed the proxy to 127.0.0.1:{port}")


@pytest.fixture
def s3_over_tls(s3_server, ca):
    """moto behind a TLS front whose certificate comes from the private CA; yields the https endpoint."""
    host, port = s3_server.endpoint_url.rsplit("/", 1)[1].split(":")
    good = ca.server_context("127.0.0.1")
    with TLSFront((host, int(port)), lambda n: good) as front:
        yield front


def _put_checkpoint(s3_server, bucket, tmp_path):
    file, tensors = write_checkpoint(tmp_path / "model.safetensors")
    key = f"m-{uuid.uuid4().hex[:8]}/model.safetensors"
    s3_server.put(bucket, key, file.read_bytes())
    return f"s3://{bucket}/{key}", tensors


@pytest.mark.parametrize("engine", ENGINES)
def test_s3_private_ca_via_aws_ca_bundle_trusts_heads_and_gets(engine, s3_server, s3_bucket, s3_over_tls, ca,
                                                               tmp_path, no_proxy_env):
    """An S3-compatible store over HTTPS with a private CA, set up the AWS way (``AWS_CA_BUNDLE``): botocore
    trusts it for HEAD; the presigned GETs of the same load must trust it too."""
    url, tensors = _put_checkpoint(s3_server, s3_bucket, tmp_path)
    no_proxy_env.setenv("AWS_ENDPOINT_URL", s3_over_tls.url)
    no_proxy_env.setenv("AWS_CA_BUNDLE", str(ca.file))
    trace = fastload.Trace()
    result, _ = load_checked(url, {s3_over_tls.port}, QUICK.replace(http_engine=engine), trace=trace)
    assert s3_over_tls.handshakes >= 1, "botocore never reached the TLS endpoint"
    assert isinstance(result, dict), (
        f"HEAD trusted the private CA from AWS_CA_BUNDLE, the presigned GET did not (engine={engine}): {result!r}")
    assert_bit_exact(result, tensors)


@pytest.mark.parametrize("engine", ENGINES)
def test_s3_private_ca_in_aws_config_profile_trusts_heads_and_gets(engine, s3_server, s3_bucket, s3_over_tls, ca,
                                                                   tmp_path, no_proxy_env):
    """The same with ``ca_bundle`` in the AWS config file (the profile's setting, as ``aws configure set
    ca_bundle`` writes it)."""
    url, tensors = _put_checkpoint(s3_server, s3_bucket, tmp_path)
    config_file = tmp_path / "aws-config"
    config_file.write_text(f"[default]\nca_bundle = {ca.file}\n")
    no_proxy_env.setenv("AWS_CONFIG_FILE", str(config_file))
    no_proxy_env.setenv("AWS_ENDPOINT_URL", s3_over_tls.url)
    result, _ = load_checked(url, {s3_over_tls.port}, QUICK.replace(http_engine=engine))
    assert s3_over_tls.handshakes >= 1
    assert isinstance(result, dict), (
        f"HEAD trusted the profile's ca_bundle, the presigned GET did not (engine={engine}): {result!r}")
    assert_bit_exact(result, tensors)


def test_s3_untrusted_endpoint_error_says_it_is_the_certificate(s3_server, s3_bucket, s3_over_tls, tmp_path,
                                                               no_proxy_env):
    """No CA configured at all: refused at once with a TransferError naming the object, and saying what is
    wrong (the certificate) as the HTTP road does ("TLS certificate not trusted")."""
    url, _ = _put_checkpoint(s3_server, s3_bucket, tmp_path)
    no_proxy_env.setenv("AWS_ENDPOINT_URL", s3_over_tls.url)
    trace = fastload.Trace()
    result, _ = load_checked(url, {s3_over_tls.port}, QUICK, trace=trace)
    assert isinstance(result, fastload.TransferError), result
    assert url in str(result)
    assert _retries(trace) == 0
    assert "certificate" in str(result).lower(), f"no word of the certificate in {str(result)!r}"


# -- HTTPS: nothing of a load is left behind ------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_leaving_an_https_stream_early_leaves_no_socket(engine, ca, tmp_path, no_proxy_env):
    """test_cancel's early exit, over TLS: requests in flight when the stream closes must not leave their
    sockets behind (a TLS connection closed with a close_notify that nobody waits for once the load's event
    loop is gone stays open, CLOSE_WAIT or ESTABLISHED, until the garbage collector finds it)."""
    no_proxy_env.setenv("SSL_CERT_FILE", str(ca.file))
    root = tmp_path / "root"
    root.mkdir()
    file, _ = write_checkpoint(root / "model.safetensors")
    with RangeHTTPServer(root, tls=ca.server_context("127.0.0.1")) as server:
        server.faults.slow_first_byte(0.3, path="*")
        config = QUICK.replace(http_engine=engine, max_concurrency=4, stall_timeout_s=5.0)
        with Leaks({server.port}) as leaks:
            with fastload.stream(server.url_for(file), config=config) as s:
                for _name, _tensor in s:
                    break
            leaks.check(grace_s=1.0)
