"""The threaded HTTP body engine (``LoadConfig.http_engine="threads"``, the default).

The fault, cancellation and secrecy suites already run on it; these cover what
only it does itself: redirects with credentials kept to their origin, keep-alive
connections, and aborting a body that hangs mid-stream.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import fastload
from reliability_helpers import QUICK, Leaks, Timer, assert_bit_exact, write_checkpoint


@pytest.fixture
def redirector():
    """A server on 127.0.0.1 that answers every GET with 302 to ``target + path``, noting Authorization."""
    seen: list[bool] = []

    class Handler(BaseHTTPRequestHandler):
        target = ""

        def do_GET(self):  # noqa: N802
            seen.append("Authorization" in self.headers)
            self.send_response(302)
            self.send_header("Location", Handler.target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, Handler, seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_redirects_are_followed_and_credentials_stay_with_their_origin(engine, redirector, http_server, http_dir):
    server, handler, seen = redirector
    file, tensors = write_checkpoint(http_dir / "model.safetensors")
    target_url = http_server.url_for(file)
    base = target_url.split("/", 3)
    handler.target = f"{base[0]}//{base[2]}"
    url = f"http://127.0.0.1:{server.server_address[1]}/{base[3]}"
    config = QUICK.replace(http_engine=engine, http_headers={"Authorization": "Bearer s3cret"})
    assert_bit_exact(fastload.load(url, config=config), tensors)
    gets = [r for r in http_server.log if r.method == "GET"]
    assert len(seen) >= 2 and all(seen), "the redirecting origin should get the header it was given"
    assert len(gets) >= 2 and not any(r.authorization for r in gets), "Authorization leaked to another origin"


def test_connections_are_kept_alive(http_server, http_dir):
    file, tensors = write_checkpoint(http_dir / "model.safetensors")
    config = QUICK.replace(max_concurrency=2)
    before = http_server.connections_accepted
    assert_bit_exact(fastload.load(http_server.url_for(file), config=config), tensors)
    gets = [r for r in http_server.log if r.method == "GET"]
    opened = http_server.connections_accepted - before
    assert len(gets) > 6 and opened <= 2 + 2, f"{opened} connections for {len(gets)} GETs"  # +aiohttp's probe


def test_a_body_that_stalls_midway_is_aborted_on_cancel(http_server, http_dir):
    """The caller gives up (here a 1 s wait_for) while threads sit in recv: they are woken, nothing is left."""
    file, _ = write_checkpoint(http_dir / "model.safetensors")
    stall = http_server.faults.stall_after(10_000, path="*")
    config = QUICK.replace(max_concurrency=2, stall_timeout_s=60.0)

    async def main():
        await asyncio.wait_for(fastload.aload(http_server.url_for(file), config=config), 1.0)

    try:
        with Leaks({http_server.port}) as leaks, Timer() as timer:
            with pytest.raises(asyncio.TimeoutError):
                asyncio.run(main())
    finally:
        http_server.faults.clear()  # tests that reach the server through `serve` do not reset it
    assert stall.fired >= 1
    assert timer.s < 5, f"cancelling took {timer.s:.1f} s: a thread stayed blocked in recv"
    leaks.check(grace_s=0.5)


def test_a_keep_alive_connection_the_server_closed_is_replaced_without_a_retry(http_server, http_dir):
    """Servers close idle keep-alive connections; the next request on one must not cost a retry."""
    from fastload.sources.http_threads import ThreadedBodies

    file = http_dir / "blob.bin"
    file.write_bytes(bytes(range(256)) * 64)
    url = http_server.url_for(file)
    bodies = ThreadedBodies(threads=1, connect_timeout_s=2, stall_timeout_s=2, headers={},
                            ssl_context=ssl.create_default_context)

    async def get(start: int, end: int) -> bytes:
        out = bytearray(end - start)

        def receive(readinto):
            view, got = memoryview(out), 0
            while got < len(out) and (n := readinto(view[got:])):
                got += n

        await bodies.get(url, {"Range": f"bytes={start}-{end - 1}"}, lambda resp: None, receive)
        return bytes(out)

    try:
        assert asyncio.run(get(0, 1000)) == file.read_bytes()[:1000]
        before = http_server.connections_accepted
        http_server.hang_up()  # the server closes the idle connection
        assert asyncio.run(get(5000, 9000)) == file.read_bytes()[5000:9000]
        assert http_server.connections_accepted == before + 1
    finally:
        bodies.close()


@pytest.fixture
def https_server(tmp_path, monkeypatch):
    """The Range server over TLS, with a certificate from a test CA that SSL_CERT_FILE makes trusted."""
    import trustme

    from servers import RangeHTTPServer

    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    root = tmp_path / "root"
    root.mkdir()
    with RangeHTTPServer(root, tls=server_context) as server:
        yield server


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_https_loads_bit_exact_and_verifies_the_certificate(engine, https_server, monkeypatch, tmp_path):
    file, tensors = write_checkpoint(https_server.root / "model.safetensors")
    url = https_server.url_for(file)
    assert url.startswith("https://")
    config = QUICK.replace(http_engine=engine)
    with Leaks({https_server.port}) as leaks:
        assert_bit_exact(fastload.load(url, config=config), tensors)
        leaks.check(grace_s=0.5)
    assert len([r for r in https_server.log if r.method == "GET"]) >= 2
    # A certificate nobody vouches for is refused at once (no retries: it is a matter of trust).
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    trace = fastload.Trace()
    with pytest.raises(fastload.TransferError, match="not trusted.*certificate verify failed") as caught:
        fastload.load(url, config=config, trace=trace)
    assert url in str(caught.value) and trace.summary().counters.get("retries", 0) == 0
