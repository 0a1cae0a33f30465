"""Audit: HTTP redirects, and which credentials travel where, on both HTTP engines.

What "correct" means here (RFC 9110 15.4, and what curl, requests, aiohttp and browsers do):

* A redirect to another origin (scheme, host or port) never carries the credentials meant for the first one:
  ``Authorization`` (from ``http_headers`` or from ``user:password@``), ``Cookie`` and ``Proxy-Authorization``.
  aiohttp itself drops exactly these three; requests drops Authorization and user-set Cookie; curl (since
  7.58) drops Authorization and Cookie on a host change.
* A redirect within the same origin keeps them (relative or absolute ``Location``), userinfo included
  (curl and requests keep the credentials of ``user:password@`` on the same host).
* An https -> http downgrade is refused, or at least never carries credentials.
* Loops and more than 10 hops fail with a typed error (``TransferError``) that names the URL the caller gave,
  never a redirect target's secret query (README: "Presigned query strings, passwords and header values never
  appear in fastload's errors, traces or output").
* 301/302/303/307/308 of a ranged GET: the redirected request is a GET, has no body, keeps ``Range``.
* ``hf://``: ``HF_TOKEN`` (and other credentials) go to the Hub's own host only, never to the CDN it
  redirects LFS files to (README).

The size probe always goes through aiohttp; tensor reads through the engine under test. Redirecting only the
reads (``phase="reads"``) exercises the threaded engine's own redirect code.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import torch

import fastload
from hub_server import HF_VARS, HubServer, repo_name
from reliability_helpers import QUICK, assert_bit_exact, bounded, data_start, write_checkpoint
from servers import RangeHTTPServer
from servers.http_range import Reply

ENGINES = ["threads", "aiohttp"]
SECRET = "s3cr3t9f2c"  # anything that may carry it: a header value, a password, a query value
USER = "alice"
BASIC = base64.b64encode(f"{USER}:{SECRET}".encode()).decode()
CFG = QUICK.replace(retry=fastload.RetryConfig(max_attempts=3, backoff_base_s=0.001, backoff_max_s=0.005,
                                               deadline_s=10.0))
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
               "http_proxy", "https_proxy", "all_proxy", "no_proxy")

# Credential kinds: (http_headers, userinfo in the URL)
CREDS = {
    "authorization": ({"Authorization": f"Bearer {SECRET}"}, False),
    "cookie": ({"Cookie": f"session={SECRET}"}, False),
    "proxy-authorization": ({"Proxy-Authorization": f"Basic {SECRET}"}, False),
    "userinfo": ({}, True),
}


# -- a RangeHTTPServer that records every request and can answer some of them with a script -------------


@dataclass
class Seen:
    method: str
    target: str  # path and query as sent
    headers: dict[str, str]  # lower-cased names
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> str:
        return urlsplit(self.target).query

    @property
    def host(self) -> str:
        return self.headers.get("host", "").rsplit(":", 1)[0]

    @property
    def range_start(self) -> int | None:
        value = self.headers.get("range", "")
        if not value.startswith("bytes="):
            return None
        first = value[6:].split("-")[0]
        return int(first) if first.isdigit() else None

    def carries_secret(self) -> bool:
        return any(SECRET in v or BASIC in v for v in self.headers.values())


class _Handler(RangeHTTPServer.handler_class):  # type: ignore[misc, valid-type]
    def produce(self, path, headers, body):
        owner: Origin = self.server.owner  # type: ignore[assignment]
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in headers}, body)
        with owner.lock:
            owner.seen.append(seen)
        if owner.script is not None:
            reply = owner.script(seen)
            if reply is not None:
                return reply
        return super().produce(path, headers, body)


class Origin(RangeHTTPServer):
    """The file server of tests/servers with a request log of full headers and a ``script(seen)`` hook."""

    handler_class = _Handler

    def __init__(self, root: Path, tls=None) -> None:
        super().__init__(root, tls=tls)
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.script = None

    def base(self, host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def requests_to(self, host: str = "127.0.0.1") -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.host == host]


def moved(status: int, location: str) -> Reply:
    return Reply(status, [("Location", location), ("Content-Length", "0")], [])


def with_userinfo(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{USER}:{SECRET}@{rest}"


def config_for(engine: str, cred: str | None = None, **changes) -> fastload.LoadConfig:
    headers = CREDS[cred][0] if cred else {}
    return CFG.replace(http_engine=engine, http_headers=headers, **changes)


def source_url(base: str, cred: str | None, path: str = "/m.safetensors") -> str:
    url = base + path
    return with_userinfo(url) if cred and CREDS[cred][1] else url


def attempt(fn):
    """``fn()``'s result or the FastloadError it raised (bounded: a hang fails the test, never the suite)."""
    def run():
        try:
            return fn()
        except fastload.FastloadError as exc:
            return exc
    return bounded(run, 15.0)


def around_secret(text: str) -> str:
    """The text around the first place ``SECRET`` shows up in ``text`` (for a readable assertion message)."""
    at = text.find(SECRET)
    return text[max(0, at - 400):at + 100] if at >= 0 else ""


def everything_said(err: BaseException) -> str:
    """What a user can see of an error: its text, repr, attributes and the whole printed chain."""
    parts = [str(err), repr(err), str(getattr(err, "url", "")), "".join(traceback.format_exception(err))]
    parts += [str(n) for n in getattr(err, "__notes__", [])]
    return "\n".join(parts)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in (*_PROXY_VARS, "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("redirect_root")
    (directory / "blob").mkdir(parents=True)
    return directory


@pytest.fixture(scope="module")
def ckpt(root) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A ~0.3 MB checkpoint served at /blob/m.safetensors (several 64 KiB chunks)."""
    file, tensors = write_checkpoint(root / "blob" / "m.safetensors", count=2)
    return file.read_bytes(), tensors


def _fresh(server: Origin) -> Origin:
    with server.lock:
        server.seen.clear()
    server.script = None
    return server


@pytest.fixture(scope="module")
def _a(root):
    with Origin(root) as server:
        yield server


@pytest.fixture(scope="module")
def _b(root):
    with Origin(root) as server:
        yield server


@pytest.fixture
def a(_a):
    yield _fresh(_a)
    _a.script = None


@pytest.fixture
def b(_b):
    yield _fresh(_b)
    _b.script = None


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (just released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- cross-origin redirects drop credentials ------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("other", ["port", "host"])
@pytest.mark.parametrize("cred", list(CREDS))
def test_cross_origin_redirect_does_not_carry_credentials(engine, other, cred, a, b, ckpt):
    """Every request to origin A is redirected (302) to another origin: another port (B) or another host name
    for the same server (``localhost``). A gets the credential; the other origin never does."""
    raw, tensors = ckpt
    target, host = (b, "127.0.0.1") if other == "port" else (a, "localhost")
    where = target.base(host)
    a.script = lambda s: moved(302, where + "/blob/m.safetensors") if s.host == "127.0.0.1" else None
    got = attempt(lambda: fastload.load(source_url(a.base(), cred), config=config_for(engine, cred)))
    assert not isinstance(got, BaseException), got
    assert_bit_exact(got, tensors)
    at_origin = a.requests_to("127.0.0.1")
    at_target = target.requests_to(host)
    assert at_origin and all(s.carries_secret() for s in at_origin), "origin A should get the credential"
    leaked = [(s.method, s.target, s.headers.get("range")) for s in at_target if s.carries_secret()]
    assert at_target and not leaked, (
        f"{cred} sent to another origin ({where}) on {len(leaked)} of {len(at_target)} requests: {leaked[:3]}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cred", list(CREDS))
def test_cross_origin_redirect_of_tensor_reads_only_does_not_carry_credentials(engine, cred, a, b, ckpt):
    """Probe and header read are answered by A; only ranged reads of tensor bytes go to B (the engine's own
    redirect code, not aiohttp's, for http_engine='threads')."""
    raw, tensors = ckpt
    start = data_start(raw)

    def script(s: Seen):
        if s.path == "/m.safetensors":
            if s.range_start is not None and s.range_start >= start:
                return moved(307, b.base() + "/blob/m.safetensors")
            return moved(307, "/blob/m.safetensors")  # same origin: the header comes from A
        return None

    a.script = script
    got = attempt(lambda: fastload.load(source_url(a.base(), cred), config=config_for(engine, cred)))
    assert not isinstance(got, BaseException), got
    assert_bit_exact(got, tensors)
    at_b = b.requests_to()
    leaked = [s.headers.get("range") for s in at_b if s.carries_secret()]
    assert at_b and not leaked, f"{cred} sent to another origin on {len(leaked)} of {len(at_b)} tensor reads"


# -- same-origin redirects keep them ---------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("location", ["relative", "absolute"])
@pytest.mark.parametrize("cred", list(CREDS))
def test_same_origin_redirect_keeps_credentials(engine, location, cred, a, ckpt):
    """/m.safetensors -> /blob/m.safetensors on the same origin: the credential goes with the redirected GET
    (curl, requests and aiohttp keep it; a private server would otherwise answer 401)."""
    raw, tensors = ckpt
    where = "/blob/m.safetensors" if location == "relative" else a.base() + "/blob/m.safetensors"
    a.script = lambda s: moved(302, where) if s.path == "/m.safetensors" else None
    got = attempt(lambda: fastload.load(source_url(a.base(), cred), config=config_for(engine, cred)))
    assert not isinstance(got, BaseException), got
    assert_bit_exact(got, tensors)
    blob = [s for s in a.requests_to() if s.path == "/blob/m.safetensors"]
    missing = [s.headers.get("range") for s in blob if not s.carries_secret()]
    assert blob and not missing, (
        f"{cred} dropped on a same-origin ({location}) redirect for {len(missing)} of {len(blob)} requests")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("form,keeps", [
    ("blob/m.safetensors", True),           # relative path
    ("./blob/m.safetensors?v=1", True),     # dot segment and a query
    ("//127.0.0.1:{port}/blob/m.safetensors", True),   # scheme-relative, same origin
    ("//localhost:{port}/blob/m.safetensors", False),  # scheme-relative, another host
])
def test_relative_location_forms(engine, form, keeps, a, ckpt):
    raw, tensors = ckpt
    where = form.format(port=a.port)
    a.script = lambda s: moved(301, where) if s.path == "/m.safetensors" else None
    got = attempt(lambda: fastload.load(a.base() + "/m.safetensors", config=config_for(engine, "authorization")))
    assert not isinstance(got, BaseException), got
    assert_bit_exact(got, tensors)
    host = "127.0.0.1" if keeps else "localhost"
    blob = [s for s in a.requests_to(host) if s.path == "/blob/m.safetensors"]
    assert blob and all(s.range_start is not None for s in blob), "Range lost on the redirected GETs"
    if keeps:
        assert all(s.carries_secret() for s in blob), "Authorization dropped on a same-origin redirect"
    else:
        assert not any(s.carries_secret() for s in blob), "Authorization sent to another host"


# -- https -> http ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _secure(tmp_path_factory, root):
    """An HTTPS origin over the same files (a trustme CA; its certificate names 127.0.0.1) and the CA file."""
    import ssl

    trustme = pytest.importorskip("trustme")
    authority = trustme.CA()
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    authority.issue_cert("127.0.0.1").configure_cert(ctx)
    with Origin(root, tls=ctx) as server:
        yield server, ca_file


@pytest.fixture
def secure(_secure, monkeypatch):
    server, ca_file = _secure
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    yield _fresh(server)
    server.script = None


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("phase", ["all", "reads"])
@pytest.mark.parametrize("cred", list(CREDS))
def test_https_to_http_downgrade_never_carries_credentials(engine, phase, cred, secure, b, ckpt):
    """An HTTPS origin redirects to plain HTTP: refused, or at least nothing secret goes out in clear text."""
    raw, tensors = ckpt
    start = data_start(raw)

    def script(s: Seen):
        if s.path != "/m.safetensors":
            return None
        if phase == "all" or (s.range_start is not None and s.range_start >= start):
            return moved(302, b.base() + "/blob/m.safetensors")
        return moved(302, "/blob/m.safetensors")

    secure.script = script
    got = attempt(lambda: fastload.load(source_url(secure.base(), cred), config=config_for(engine, cred)))
    assert secure.requests_to(), "the HTTPS origin was never asked"
    clear = [s.headers.get("range") for s in b.requests_to() if s.carries_secret()]
    assert not clear, f"{cred} sent in clear text after an https->http redirect ({len(clear)} requests)"
    if not isinstance(got, BaseException):
        assert_bit_exact(got, tensors)


# -- loops and hop limits --------------------------------------------------------------------------------


def _hop(n: int) -> str:
    return f"/hop{n}?X-Amz-Signature={SECRET}&token={SECRET}"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("phase", ["all", "reads"])
@pytest.mark.parametrize("kind", ["loop", "endless"])
def test_redirect_loop_fails_typed_naming_the_url_given_not_the_targets_secret(engine, phase, kind, a, ckpt):
    raw, _ = ckpt
    start = data_start(raw)

    def script(s: Seen):
        if s.path.startswith("/hop"):
            n = int(s.path[4:])
            return moved(302, _hop(1 if kind == "loop" and n == 3 else n + 1))
        if s.path == "/m.safetensors":
            if phase == "all" or (s.range_start is not None and s.range_start >= start):
                return moved(302, _hop(1))
            return moved(302, "/blob/m.safetensors")
        return None

    a.script = script
    url = a.base() + "/m.safetensors"
    trace = fastload.Trace()
    err = attempt(lambda: fastload.load(url, config=config_for(engine), trace=trace))
    assert isinstance(err, fastload.TransferError), err
    assert url in str(err), f"the error should name the URL given: {err}"
    said = everything_said(err)
    assert SECRET not in said, f"a redirect target's query leaked into the error:\n{around_secret(said)}"
    assert SECRET not in json.dumps(trace.to_dict()) and SECRET not in str(trace.summary())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("phase", ["all", "reads"])
def test_redirect_loop_is_not_retried_like_a_network_fault(engine, phase, a, ckpt):
    """A loop is the server's deterministic answer: following it again after backoff changes nothing (curl,
    requests and aiohttp give up at once). With max_attempts=3, a retried loop costs 3x the requests."""
    raw, _ = ckpt
    start = data_start(raw)

    def script(s: Seen):
        if s.path.startswith("/hop"):
            return moved(302, "/hop")
        if s.path == "/m.safetensors":
            if phase == "all" or (s.range_start is not None and s.range_start >= start):
                return moved(302, "/hop")
            return moved(302, "/blob/m.safetensors")
        return None

    a.script = script
    err = attempt(lambda: fastload.load(a.base() + "/m.safetensors", config=config_for(engine, max_concurrency=1)))
    assert isinstance(err, fastload.TransferError), err
    hops = len([s for s in a.requests_to() if s.path == "/hop"])
    assert err.attempts in (None, 1), f"a redirect loop was tried {err.attempts} times ({hops} requests in the loop)"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("hops,ok", [(10, True), (11, False)])
def test_up_to_ten_hops_load_and_eleven_fail(engine, hops, ok, a, ckpt):
    """A chain of N distinct redirects before the file: 10 are followed (the threaded engine's own
    MAX_REDIRECTS), 11 fail with TransferError. Both engines alike: the probe (aiohttp) as the reads."""
    raw, tensors = ckpt

    def script(s: Seen):
        if s.path == "/m.safetensors":
            return moved(302, _hop(1))
        if s.path.startswith("/hop"):
            n = int(s.path[4:])
            return moved(302, _hop(n + 1) if n < hops - 1 else "/blob/m.safetensors")
        return None

    a.script = script
    got = attempt(lambda: fastload.load(a.base() + "/m.safetensors", config=config_for(engine)))
    if ok:
        assert not isinstance(got, BaseException), f"{hops} redirects refused: {got}"
        assert_bit_exact(got, tensors)
    else:
        assert isinstance(got, fastload.TransferError), got
        assert SECRET not in everything_said(got)


# -- 301/302/303/307/308 of ranged GETs ------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_every_redirect_status_keeps_get_range_and_no_body(engine, status, a, b, ckpt):
    raw, tensors = ckpt
    a.script = lambda s: moved(status, b.base() + "/blob/m.safetensors") if s.path == "/m.safetensors" else None
    got = attempt(lambda: fastload.load(a.base() + "/m.safetensors", config=config_for(engine)))
    assert not isinstance(got, BaseException), got
    assert_bit_exact(got, tensors)
    at_a, at_b = a.requests_to(), b.requests_to()
    assert len(at_b) == len(at_a) >= 3, (len(at_a), len(at_b))
    assert all(s.method == "GET" and not s.body for s in at_b), {(s.method, len(s.body)) for s in at_b}
    assert all(int(s.headers.get("content-length") or 0) == 0 for s in at_b)
    # Each redirected request asks for exactly the range the original asked for.
    assert sorted(s.headers.get("range") for s in at_a) == sorted(s.headers.get("range") for s in at_b)


# -- a redirect target's query never shows ---------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("phase", ["all", "reads"])
@pytest.mark.parametrize("failure", ["403", "404", "500", "refused", "bad-port"])
def test_redirect_targets_secret_query_never_appears_in_errors_or_traces(engine, phase, failure, a, b, ckpt,
                                                                         tmp_path):
    raw, _ = ckpt
    start = data_start(raw)
    query = f"?X-Amz-Signature={SECRET}&sig={SECRET}"
    if failure == "refused":
        target = f"http://127.0.0.1:{closed_port()}/blob/m.safetensors{query}"
    elif failure == "bad-port":
        target = f"http://127.0.0.1:99999/blob/m.safetensors{query}"
    else:
        status = int(failure)
        b.script = lambda s: Reply.simple(status)
        target = b.base() + "/blob/m.safetensors" + query

    def script(s: Seen):
        if s.path != "/m.safetensors":
            return None
        if phase == "all" or (s.range_start is not None and s.range_start >= start):
            return moved(302, target)
        return moved(302, "/blob/m.safetensors")

    a.script = script
    url = a.base() + "/m.safetensors"
    trace = fastload.Trace()
    trace_file = tmp_path / "load.json"
    err = attempt(lambda: fastload.load(url, config=config_for(engine), trace=trace))
    assert isinstance(err, fastload.FastloadError), err
    assert url in str(err), f"the error should name the URL given: {err}"
    said = everything_said(err)
    assert SECRET not in said, f"the redirect target's query leaked:\n{around_secret(said)}"
    assert SECRET not in json.dumps(trace.to_dict()) and SECRET not in str(trace.summary())
    err2 = attempt(lambda: fastload.load(url, config=config_for(engine), trace=str(trace_file)))
    assert isinstance(err2, fastload.FastloadError)
    assert trace_file.exists() and SECRET not in trace_file.read_text()


@pytest.mark.parametrize("engine", ENGINES)
def test_successful_redirected_load_keeps_the_targets_query_out_of_the_trace(engine, a, b, ckpt, tmp_path):
    raw, tensors = ckpt
    target = b.base() + f"/blob/m.safetensors?X-Amz-Signature={SECRET}&token={SECRET}"
    a.script = lambda s: moved(307, target) if s.path == "/m.safetensors" else None
    trace = fastload.Trace()
    got = attempt(lambda: fastload.load(a.base() + "/m.safetensors", config=config_for(engine), trace=trace))
    assert not isinstance(got, BaseException), got
    assert_bit_exact(got, tensors)
    assert any(SECRET in s.query for s in b.requests_to()), "the target's query must still be sent to it"
    assert SECRET not in json.dumps(trace.to_dict()) and SECRET not in str(trace.summary())
    plan = attempt(lambda: fastload.plan(a.base() + "/m.safetensors", config=config_for(engine)))
    assert SECRET not in repr(plan) and SECRET not in str(plan)
    trace_file = tmp_path / "ok.json"
    fastload.load(a.base() + "/m.safetensors", config=config_for(engine), trace=str(trace_file))
    assert SECRET not in trace_file.read_text()


# -- the Hub's CDN ---------------------------------------------------------------------------------------


class _RecordingHubHandler(HubServer.handler_class):  # type: ignore[misc, valid-type]
    def produce(self, path, headers, body):
        hub: RecordingHub = self.server.owner  # type: ignore[assignment]
        with hub.lock:
            hub.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in headers}, body))
        return super().produce(path, headers, body)


class RecordingHub(HubServer):
    handler_class = _RecordingHubHandler

    def __init__(self, root: Path, token: str | None = None) -> None:
        super().__init__(root, token=token)
        self.lock = threading.Lock()
        self.seen: list[Seen] = []


@pytest.fixture(scope="module")
def _hub(tmp_path_factory, root, ckpt):
    """A recording stand-in Hub with one repository holding the checkpoint as model.safetensors."""
    base = tmp_path_factory.mktemp("hub")
    repo_dir = base / "repo"
    repo_dir.mkdir()
    shutil.copy(root / "blob" / "m.safetensors", repo_dir / "model.safetensors")
    with RecordingHub(base / "served") as hub:
        repo = repo_name("redir")
        hub.add_repo(repo, repo_dir)
        yield hub, repo


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cred", ["hf_token", "authorization", "cookie", "hf_token+cookie"])
def test_hub_cdn_redirect_never_gets_credentials(engine, cred, _hub, tmp_path, monkeypatch, ckpt):
    """README: HF_TOKEN is "sent to the Hub's own host only, never to the CDN it redirects to"; an
    Authorization of http_headers never goes to the CDN either; nor should a Cookie (another origin)."""
    raw, tensors = ckpt
    hub, repo = _hub
    for name in HF_VARS:
        monkeypatch.delenv(name, raising=False)
    headers = {}
    if "cookie" in cred:
        headers["Cookie"] = f"hf_session={SECRET}"
    if cred == "authorization":
        headers["Authorization"] = f"Bearer {SECRET}"
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    if "hf_token" in cred:
        monkeypatch.setenv("HF_TOKEN", SECRET)
    with hub.lock:
        hub.seen.clear()
    hub.token = SECRET if "hf_token" in cred else None
    try:
        got = attempt(lambda: fastload.load(f"hf://{repo}", config=CFG.replace(http_engine=engine,
                                                                                 http_headers=headers)))
    finally:
        hub.token = None
    with hub.lock:
        seen = list(hub.seen)
    assert not isinstance(got, BaseException), got
    assert_bit_exact(got, tensors)
    cdn = [s for s in seen if s.path.startswith("/lfs/")]
    at_hub = [s for s in seen if not s.path.startswith("/lfs/")]
    assert cdn and at_hub
    assert all(s.host == "localhost" for s in cdn) and all(s.host == "127.0.0.1" for s in at_hub)
    assert all(s.carries_secret() for s in at_hub), "the Hub itself should get the credential"
    leaked = [(s.method, s.headers.get("range")) for s in cdn if s.carries_secret()]
    assert not leaked, f"{cred} sent to the Hub's CDN on {len(leaked)} of {len(cdn)} requests: {leaked[:3]}"
