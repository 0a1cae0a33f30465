"""Audit: host names and addresses in source URLs, on both HTTP engines and through every entry point.

Real servers on loopback (``Origin`` below: a small ranged file server that records the ``Host`` and
``Authorization`` of every request, can require basic auth under ``/private/`` and can answer with a redirect),
moto S3 for the S3 cases. What a serious user expects:

* ``localhost``, ``LOCALHOST``, ``127.0.0.1``, ``[::1]`` (this machine has an IPv6 loopback: asserted), a port
  given or the default one omitted: ``load``, ``aload``, ``stream``, ``plan`` and ``pull`` give the bytes
  ``safetensors`` reads, on ``http_engine="threads"`` and ``"aiohttp"``; ``localhost.`` works exactly when the
  system resolver knows it, and is otherwise a typed error.
* ``user:password@`` in the URL authenticates, and the password never shows in errors (their whole chain),
  ``plan`` output, traces or the CLI's output.
* A host that does not resolve (a URL or an S3 ``endpoint_url``): a typed fastload error naming the URL,
  quickly (the resolver's "no such name" is an answer, not a glitch), nothing left running.
* Lookups of names this machine's DNS answers (``localhost.``, ``*.invalid``) are asked of the system resolver once
  per module and its answers given again at once (``_steady_resolver``): that DNS server sometimes loses a query,
  and glibc then waits 5 s.
* Name lookups never depend on the caller's default executor (shut down here; a busy one for HTTP is in
  ``test_long_running_service_audit``), HTTP and S3 alike, and a
  lookup that hangs never holds up a cancel. There is no DNS server here that hangs, so one is simulated by
  wrapping the standard library's ``socket.getaddrinfo`` (the system resolver, not fastload's code).
* Redirects: ``localhost`` -> ``127.0.0.1`` is another origin (credentials dropped); the same origin spelled
  otherwise (host case, the default port written out or left out) keeps them.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import os
import socket
import socketserver
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple, Self
from urllib.parse import urlsplit

import pytest
import torch
from reliability_helpers import QUICK, Leaks, assert_bit_exact
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import fastload
from fastload.cli import main as cli_main

ENGINES = ["threads", "aiohttp"]
APIS = ["load", "aload", "stream", "plan", "pull"]
RETRY = fastload.RetryConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, deadline_s=5.0)
CFG = QUICK.replace(retry=RETRY)
USER, PASSWORD = "alice", "pw-n4m3s-7c1e"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
UNRESOLVABLE = "does-not-exist.invalid"
# Any 127/8 address is loopback on Linux: port 80 there is this process's alone. One address per process: two
# xdist workers running this module's tests each start the module's server (Address already in use).
PORT80_HOST = f"127.83.{os.getpid() >> 8 & 0xFF}.{os.getpid() % 254 + 1}"
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
               "http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch):
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


_LOOKED_UP = ("localhost.", UNRESOLVABLE)  # names this machine's /etc/hosts does not hold: its DNS answers them


@pytest.fixture(scope="module")
def system_answers() -> dict[str, socket.gaierror | None]:
    """What the system resolver says of the names above, asked once: its DNS server here sometimes loses a
    query and glibc waits 5 s before asking again, which no time bound of a test should depend on."""
    answers: dict[str, socket.gaierror | None] = {}
    for name in _LOOKED_UP:
        try:
            socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)
            answers[name] = None
        except socket.gaierror as exc:
            answers[name] = exc
    assert answers[UNRESOLVABLE] is not None, f"{UNRESOLVABLE} resolves here (RFC 6761: .invalid never does)"
    return answers


@pytest.fixture(autouse=True)
def _steady_resolver(system_answers, monkeypatch):
    """The system resolver, with its answers for those names given again at once (as a caching resolver does)."""
    real = socket.getaddrinfo

    def lookup(host, port, *args, **kwargs):
        name = host.decode() if isinstance(host, bytes) else host
        if name in system_answers:
            known = system_answers[name]
            if known is not None:
                raise socket.gaierror(known.errno, known.strerror)
            name = "localhost"  # localhost. resolves here: to what localhost does
        return real(name, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)


# -- a ranged file server that records hosts and credentials -----------------------------------------------


class Seen(NamedTuple):
    path: str
    host: str
    authorization: str | None
    range: str | None


class Origin:
    """Serves ``files`` (path -> bytes) with single byte ranges on ``host:port``; paths under ``/private/`` need
    ``alice``'s basic auth; ``script(seen) -> (status, headers) | None`` may answer first (a redirect)."""

    def __init__(self, files: dict[str, bytes], host: str = "127.0.0.1", port: int = 0):
        self.files = files
        self.host = host
        self.script = None
        self.hold: threading.Event | None = None  # set: ranged reads past the first 64 KiB wait for it
        self.seen: list[Seen] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner._handle(self)

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True
            block_on_close = False
            request_queue_size = 64

            def server_bind(self):
                socketserver.TCPServer.server_bind(self)  # no reverse lookup of our own name
                self.server_name, self.server_port = self.server_address[:2]

        self.httpd = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True, name="names-origin")

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def url(self, path: str, host: str | None = None, port: str | None = None, userinfo: bool = False) -> str:
        host = host or (f"[{self.host}]" if ":" in self.host else self.host)
        port = f":{self.port}" if port is None else port
        return f"http://{f'{USER}:{PASSWORD}@' if userinfo else ''}{host}{port}{path}"

    def requests(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)

    def clear(self) -> None:
        with self.lock:
            self.seen.clear()
        self.script = None
        self.hold = None

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path
        seen = Seen(path, h.headers.get("Host", ""), h.headers.get("Authorization"), h.headers.get("Range"))
        with self.lock:
            self.seen.append(seen)
        reply = self.script(seen) if self.script is not None else None
        if reply is not None:
            return self._send(h, reply[0], reply[1], b"")
        if path.startswith("/private/") and seen.authorization != BASIC:
            return self._send(h, 401, {"WWW-Authenticate": 'Basic realm="w"'}, b"who are you?")
        data = self.files.get(path.replace("/private/", "/", 1))
        if data is None:
            return self._send(h, 404, {}, b"not found")
        headers = {"ETag": '"v1"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        value = (seen.range or "").removeprefix("bytes=")
        if not value:
            return self._send(h, 200, headers, data)
        first, _, last = value.partition("-")
        start, end = int(first), min(int(last) + 1, len(data))
        if self.hold is not None and start >= 65536:
            self.hold.wait(5.0)
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        self._send(h, 206, headers, data[start:end])

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes) -> None:
        try:
            h.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                h.send_header(name, value)
            h.end_headers()
            h.wfile.write(body)
        except OSError:  # the client went away (a cancelled load)
            h.close_connection = True

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.hold is not None:
            self.hold.set()
        self.httpd.shutdown()
        self.httpd.server_close()


# -- data, entry points, oracles --------------------------------------------------------------------------


def _checkpoint() -> tuple[bytes, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    tensors = {"a.weight": torch.randn(40_000, generator=g), "b.ids": torch.arange(9_001, dtype=torch.int32),
               "c.half": torch.randn(120, 77, generator=g).to(torch.bfloat16)}
    raw = st_save(tensors)
    return raw, st_load(raw)  # the oracle: what safetensors reads from these bytes


RAW, WANT = _checkpoint()
FILES = {"/m.safetensors": RAW, "/blob/m.safetensors": RAW, "/slow/m.safetensors": RAW}


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def origin():
    with Origin(FILES) as server:
        yield server


@pytest.fixture
def site(origin):
    origin.clear()
    yield origin
    origin.clear()


@pytest.fixture(scope="module")
def origin6():
    assert ipv6_loopback(), "this machine has no IPv6 loopback (::1)"
    with Origin(FILES, host="::1") as server:
        yield server


@pytest.fixture(scope="module")
def origin80():
    """The file server on port 80 of a loopback address, so that a URL may leave the default port out."""
    try:
        server = Origin(FILES, host=PORT80_HOST, port=80)
    except OSError as exc:
        raise AssertionError(f"cannot serve {PORT80_HOST}:80 here ({exc}); the tests of the default port need it")
    with server:
        yield server


def run_api(api: str, url: str, config: fastload.LoadConfig, where: Path, trace=None):
    if api == "load":
        return fastload.load(url, config=config, trace=trace)
    if api == "aload":
        return asyncio.run(fastload.aload(url, config=config, trace=trace))
    if api == "stream":
        with fastload.stream(url, config=config, trace=trace) as s:
            return dict(s)
    if api == "plan":
        return fastload.plan(url, config=config, trace=trace)
    if api == "pull":
        return fastload.pull(url, to=where / "pulled", config=config, trace=trace)
    raise AssertionError(api)


def check_result(api: str, got) -> None:
    if api == "plan":
        assert sorted(t.name for t in got.tensors) == sorted(WANT)
        assert got.output_bytes == sum(t.numel() * t.element_size() for t in WANT.values())
        assert [f.info.size for f in got.files] == [len(RAW)]
    elif api == "pull":
        path = Path(got)
        path = path / "m.safetensors" if path.is_dir() else path
        assert path.read_bytes() == RAW
    else:
        assert_bit_exact(got, WANT)


def everything_shown(exc: BaseException) -> str:
    """What a user or a log can see of an error: message, repr, attributes, the whole printed chain."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts += [str(e), repr(e), repr(getattr(e, "__dict__", {}))]
        e = e.__cause__ or e.__context__
    return "\n".join(parts)


# -- host spellings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "127.0.0.1"])
def test_host_spellings_give_the_same_bytes(host, api, engine, site, tmp_path):
    """A host name (any case) or an IPv4 literal, with an explicit port: every entry point gives the bytes, every
    request names that host in ``Host``, and nothing is left running."""
    with Leaks({site.port}) as leaks:
        got = run_api(api, site.url("/m.safetensors", host=host), CFG.replace(http_engine=engine), tmp_path)
    check_result(api, got)
    hosts = {s.host.lower() for s in site.requests()}
    assert hosts == {f"{host.lower()}:{site.port}"}, hosts
    leaks.check(grace_s=1.0)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("api", APIS)
def test_trailing_dot_host_follows_the_system_resolver(api, engine, site, tmp_path, system_answers):
    """``localhost.`` (a fully qualified name): works exactly when the system resolver knows it; otherwise a
    typed error that names the URL, quickly, with nothing left running."""
    url = site.url("/m.safetensors", host="localhost.")
    resolves = system_answers["localhost."] is None
    start = time.monotonic()
    with Leaks({site.port}) as leaks:
        try:
            got = run_api(api, url, CFG.replace(http_engine=engine), tmp_path)
        except fastload.FastloadError as exc:
            got = exc
    seconds = time.monotonic() - start
    if resolves:
        assert not isinstance(got, BaseException), got
        check_result(api, got)
    else:
        assert isinstance(got, fastload.FastloadError) and getattr(got, "url", None) == url, repr(got)
        assert url in str(got)
        assert seconds < 3.0, f"took {seconds:.1f} s"
    leaks.check(grace_s=1.0)


def test_this_machine_has_an_ipv6_loopback():
    assert ipv6_loopback(), "no IPv6 on loopback: the [::1] tests below cannot run here"


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("api", APIS)
def test_ipv6_literal_with_userinfo(api, engine, origin6, tmp_path):
    """``http://alice:pw@[::1]:port/private/...``: every entry point authenticates and gives the bytes, ``Host``
    is the bracketed literal; the plan names the file without the password."""
    origin6.clear()
    url = origin6.url("/private/m.safetensors", userinfo=True)
    with Leaks({origin6.port}) as leaks:
        got = run_api(api, url, CFG.replace(http_engine=engine), tmp_path)
    check_result(api, got)
    seen = origin6.requests()
    assert {s.host for s in seen} == {f"[::1]:{origin6.port}"}
    assert all(s.authorization == BASIC for s in seen)
    if api == "plan":
        assert PASSWORD not in json.dumps(got.to_dict()) + str(got)
        assert PASSWORD not in repr(got), "repr(plan) shows the password (ObjectInfo.fetch_url)"
        assert got.files[0].info.url == f"http://{USER}:***@[::1]:{origin6.port}/private/m.safetensors"
    leaks.check(grace_s=1.0)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("port", ["", ":80"])
@pytest.mark.parametrize("api", ["load", "stream", "plan"])
def test_default_port_omitted_or_explicit(api, port, engine, origin80, tmp_path):
    """``http://127.83.41.7/`` (the default port left out) and ``http://127.83.41.7:80/``: the same server."""
    origin80.clear()
    got = run_api(api, origin80.url("/m.safetensors", port=port), CFG.replace(http_engine=engine), tmp_path)
    check_result(api, got)
    assert {s.host for s in origin80.requests()} <= {PORT80_HOST, f"{PORT80_HOST}:80"}


# -- credentials in the URL are never shown -----------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_userinfo_by_host_name_is_never_shown(engine, site, tmp_path):
    """``http://alice:pw@localhost:port/private/...``: loads, and neither the plan (text, repr, JSON), the trace
    (summary, dict, Chrome export) nor the errors of a missing file, a wrong password, a refused connection and an
    unresolvable host show the password."""
    cfg = CFG.replace(http_engine=engine)
    trace = fastload.Trace()
    url = site.url("/private/m.safetensors", host="localhost", userinfo=True)
    assert_bit_exact(fastload.load(url, config=cfg, trace=trace), WANT)
    plan = fastload.plan(url, config=cfg)
    shown = {"str(plan)": str(plan), "repr(plan)": repr(plan), "plan.to_json()": plan.to_json(),
             "trace.summary()": str(trace.summary()), "trace.to_dict()": json.dumps(trace.to_dict()),
             "trace.to_chrome()": json.dumps(trace.to_chrome())}
    assert all(s.authorization == BASIC for s in site.requests())

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nobody listens there once this socket closes
    wrong = url.replace(PASSWORD, PASSWORD[::-1])
    failing = {
        "missing": (url.replace("/m.safetensors", "/gone.safetensors"), fastload.SourceNotFoundError),
        "wrong-password": (wrong, fastload.SourcePermissionError),
        "refused": (f"http://{USER}:{PASSWORD}@localhost:{closed}/m.safetensors", fastload.TransferError),
        "unresolvable": (f"http://{USER}:{PASSWORD}@{UNRESOLVABLE}/m.safetensors", fastload.FastloadError),
    }
    for case, (bad, kind) in failing.items():
        for api in ("load", "plan"):
            with pytest.raises(kind) as info:
                run_api(api, bad, cfg, tmp_path)
            text = everything_shown(info.value)
            assert PASSWORD not in text and PASSWORD[::-1] not in text, f"{case}/{api}: password shown"
            assert f"{USER}:***@" in str(info.value), f"{case}/{api}: the URL is not named: {info.value}"
    leaked = {name: text[max(0, text.find(PASSWORD) - 60):text.find(PASSWORD) + 20]
              for name, text in shown.items() if PASSWORD in text}
    assert not leaked, f"the password is shown by {leaked}"


def test_cli_never_prints_the_password_of_a_url(site, tmp_path, capsys, monkeypatch):
    """``fastload inspect|load|pull`` of ``http://alice:pw@localhost:port/...`` (``--debug`` too, which prints
    tracebacks), working and failing (404, 401): stdout and stderr never hold the password."""
    monkeypatch.chdir(tmp_path)
    url = site.url("/private/m.safetensors", host="localhost", userinfo=True)
    missing = url.replace("/m.safetensors", "/gone.safetensors")
    wrong = url.replace(PASSWORD, PASSWORD[::-1])
    codes = []
    for argv in (["inspect", url], ["load", url], ["pull", url, "--to", str(tmp_path / "p"), "--quiet"],
                 ["--debug", "inspect", missing], ["load", missing], ["--debug", "load", wrong],
                 ["pull", wrong, "--to", str(tmp_path / "q")]):
        try:
            code, printed = cli_main(argv), ""
        except fastload.FastloadError as exc:  # --debug: raised, for the interpreter to print with its traceback
            code, printed = 1, everything_shown(exc)
        codes.append(code)
        out, err = capsys.readouterr()
        text = out + err + printed
        assert PASSWORD not in text and PASSWORD[::-1] not in text, f"{argv[:2]} printed the password"
    assert codes[:3] == [0, 0, 0] and all(codes[3:]), codes
    assert (tmp_path / "p" / "m.safetensors").read_bytes() == RAW


# -- names that do not resolve ------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("api", APIS)
def test_unresolvable_host_is_a_typed_error_naming_the_url(api, engine, tmp_path):
    url = f"http://{UNRESOLVABLE}/x.safetensors"
    start = time.monotonic()
    with Leaks() as leaks, pytest.raises(fastload.FastloadError) as info:
        run_api(api, url, CFG.replace(http_engine=engine), tmp_path)
    seconds = time.monotonic() - start
    assert isinstance(info.value, OSError) and info.value.url == url, repr(info.value)
    assert url in str(info.value)
    assert seconds < 3.0, f"took {seconds:.1f} s"
    leaks.check(grace_s=1.0)
    assert not (tmp_path / "pulled").exists() or not any((tmp_path / "pulled").iterdir())


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(tmp_path / "absent"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "absent")}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("api", ["load", "pull"])
def test_s3_endpoint_by_unresolvable_name_is_a_typed_error(api, engine, aws_env, tmp_path):
    cfg = CFG.replace(http_engine=engine, s3=fastload.S3Options(endpoint_url=f"http://{UNRESOLVABLE}:9000"))
    url = "s3://bucket/x.safetensors"
    start = time.monotonic()
    with Leaks() as leaks, pytest.raises(fastload.FastloadError) as info:
        run_api(api, url, cfg, tmp_path)
    seconds = time.monotonic() - start
    assert isinstance(info.value, OSError) and info.value.url == url, repr(info.value)
    assert seconds < 3.0, f"took {seconds:.1f} s"
    leaks.check(grace_s=1.0)


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_a_name_that_does_not_exist_is_not_retried_for_seconds(kind, aws_env):
    """With the default retry policy. The resolver's "Name or service not known" (EAI_NONAME: the DNS said the
    name does not exist) is an answer, not a glitch: curl and wget stop at once. fastload retried it 8 times,
    6-16 s here, before saying so (a mistyped host name or endpoint). A temporary failure (EAI_AGAIN) is another
    matter and may be retried."""
    if kind == "http":
        url, cfg = f"http://{UNRESOLVABLE}/x.safetensors", fastload.LoadConfig()
    else:
        url = "s3://bucket/x.safetensors"
        cfg = fastload.LoadConfig(s3=fastload.S3Options(endpoint_url=f"http://{UNRESOLVABLE}:9000"))

    for module in ("fastload.sources.http", "fastload.sources.s3"):  # imported before the clock: under a loaded
        importlib.import_module(module)  # machine botocore's import and first client took most of a second

    async def main():
        start = time.monotonic()
        try:  # a few seconds: the retries this is about took 6-16 s
            await asyncio.wait_for(fastload.aload(url, config=cfg), 3.0)
        except asyncio.TimeoutError:
            return "still retrying", time.monotonic() - start
        except fastload.FastloadError as exc:
            return exc, time.monotonic() - start
        return "loaded?", time.monotonic() - start

    got, seconds = asyncio.run(main())
    assert isinstance(got, fastload.FastloadError), (
        f"a host name that does not exist: {got} after {seconds:.1f} s (retried as if the DNS had glitched)")
    assert got.url == url


# -- name lookups and the caller's loop ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_by_name(s3_server):
    """An object on moto, and its endpoint by host name (``http://localhost:port``)."""
    bucket = "names-audit"
    s3_server.ensure_bucket(bucket)
    s3_server.put(bucket, "m.safetensors", RAW)
    return f"s3://{bucket}/m.safetensors", s3_server.endpoint_url.replace("127.0.0.1", "localhost")


@pytest.mark.parametrize("api", ["aload", "apull"])
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["http", "s3"])
def test_async_calls_by_host_name_with_the_default_executor_shut_down(kind, engine, api, site, s3_by_name,
                                                                      tmp_path):
    """A loop whose default executor is shut down (``loop.shutdown_default_executor()``: any
    ``run_in_executor(None)`` now raises): name lookups run on fastload's own threads, so an ``aload`` / ``apull``
    by host name works, HTTP and S3 (``endpoint_url=http://localhost:port``) alike."""
    if kind == "http":
        url, cfg = site.url("/m.safetensors", host="localhost"), CFG.replace(http_engine=engine)
    else:
        url, endpoint = s3_by_name
        cfg = CFG.replace(http_engine=engine, s3=fastload.S3Options(endpoint_url=endpoint))

    async def main():
        await asyncio.get_running_loop().shutdown_default_executor()
        if api == "aload":
            return await fastload.aload(url, config=cfg)
        return await fastload.apull(url, to=tmp_path / "pulled", config=cfg)

    got = asyncio.run(main())
    if api == "aload":
        assert_bit_exact(got, WANT)
    else:
        assert (tmp_path / "pulled" / "m.safetensors").read_bytes() == RAW
    if kind == "http":
        assert {s.host for s in site.requests()} == {f"localhost:{site.port}"}


@pytest.mark.parametrize("engine", ENGINES)
def test_cancelling_many_aloads_by_host_name(engine, site):
    """Eight ``aload``s of ``http://localhost:port/...`` whose tensor reads hang on the server: cancelling them
    returns promptly, with no thread or socket of theirs left."""
    site.hold = threading.Event()
    url = site.url("/slow/m.safetensors", host="localhost")
    cfg = CFG.replace(http_engine=engine, stall_timeout_s=5.0)

    async def main():
        tasks = [asyncio.ensure_future(fastload.aload(url, config=cfg)) for _ in range(8)]
        await asyncio.sleep(0.4)
        assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        start = time.monotonic()
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, time.monotonic() - start

    with Leaks({site.port}) as leaks:
        results, seconds = asyncio.run(main())
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    assert seconds < 1.0, f"the cancel took {seconds:.1f} s"
    leaks.check(grace_s=1.0)


class StuckResolver:
    """The system resolver, as a DNS server that answers ``hosts[name]`` for its first ``answers`` lookups and
    then stops answering (each later lookup blocks until ``release``, as glibc does for 5 s x attempts x
    servers). Only the given names are affected."""

    def __init__(self, real, name: str, answers: int):
        self.real, self.name, self.answers = real, name, answers
        self.release = threading.Event()
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self, host, port, *args, **kwargs):
        if host != self.name:
            return self.real(host, port, *args, **kwargs)
        with self.lock:
            self.calls += 1
            answer = self.calls <= self.answers
        if not answer:
            self.release.wait(10.0)
        return self.real("127.0.0.1", port, *args, **kwargs)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("answers", [0, 1])
def test_a_name_lookup_that_hangs_never_holds_up_a_cancel(answers, engine, site, monkeypatch):
    """A DNS server that stops answering (from the first lookup, or after the first): an ``aload`` of
    ``http://weights.test:port/...`` cut by ``wait_for`` returns at once, as ``_OwnThreads`` promises ("a lookup
    that hangs never holds up a cancel"). The lookup's thread may finish later; the caller does not wait for it.
    With the aiohttp engine a name resolved once is cached for the load, so that load simply completes."""
    resolver = StuckResolver(socket.getaddrinfo, "weights.test", answers)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    url = site.url("/m.safetensors", host="weights.test")
    cfg = CFG.replace(http_engine=engine, connect_timeout_s=5.0)

    async def main():
        start = time.monotonic()
        try:
            got = await asyncio.wait_for(fastload.aload(url, config=cfg), 0.3)
        except asyncio.TimeoutError:
            got = None
        return got, time.monotonic() - start

    releaser = threading.Timer(1.5, resolver.release.set)
    releaser.start()
    try:
        got, seconds = asyncio.run(main())
    finally:
        resolver.release.set()
        releaser.cancel()
    if got is not None:
        assert engine == "aiohttp" and answers == 1, "a load whose name never resolved returned tensors"
        assert_bit_exact(got, WANT)
    assert seconds < 1.2, (f"cancelling the load took {seconds:.1f} s: it waited for a name lookup that hangs "
                           f"({resolver.calls} lookups of weights.test)")


# -- redirects between names and addresses -----------------------------------------------------------------


def _redirect_once(path: str, location: str, reads_only: bool = False):
    """302 to ``location`` for requests of ``path``; with ``reads_only`` not for the size probe (``bytes=0-7``,
    always aiohttp's), so that the engine's own redirect code follows the others."""
    def script(s: Seen):
        if s.path == path and not (reads_only and (s.range or "").startswith("bytes=0-")):
            return 302, {"Location": location}
        return None
    return script


@pytest.mark.parametrize("engine", ENGINES)
def test_redirect_from_localhost_to_the_ip_drops_credentials(engine, site):
    """``http://alice:pw@localhost:port/private/m`` -> ``http://127.0.0.1:port/blob/m``: another origin (the same
    server), so the password must not go there; the load works from the public copy."""
    site.script = _redirect_once("/private/m.safetensors", site.url("/blob/m.safetensors"))
    url = site.url("/private/m.safetensors", host="localhost", userinfo=True)
    assert_bit_exact(fastload.load(url, config=CFG.replace(http_engine=engine)), WANT)
    seen = site.requests()
    at_name = [s for s in seen if s.host == f"localhost:{site.port}"]
    at_ip = [s for s in seen if s.host == f"127.0.0.1:{site.port}"]
    assert at_name and all(s.authorization == BASIC for s in at_name)
    assert at_ip and not [s.range for s in at_ip if s.authorization], "the password went to another origin"


SAME_ORIGIN = {  # (server, the URL's host and port, the Location's host and port)
    "host-case": ("site", "LOCALHOST", None, "localhost", None),
    "host-name": ("site", "localhost", None, "localhost", None),
    "default-port-left-out": ("origin80", PORT80_HOST, ":80", PORT80_HOST, ""),
    "default-port-written": ("origin80", PORT80_HOST, "", PORT80_HOST, ":80"),
}


# Where aiohttp follows the redirect (the size probe, on either engine, and every read of the aiohttp engine), a
# written and a left-out default port are two origins to it (yarl's URL.origin() compares the port as written), so
# it drops the credentials, and the load ends in a 401: the safe side, and left as it is. fastload's own engine
# follows the reads' redirects itself, and keeps them.
REDIRECT_CASES = [(case, phase, engine) for case in SAME_ORIGIN for phase in ("every-request", "reads-only")
                  for engine in ENGINES
                  if not case.startswith("default-port") or (phase, engine) == ("reads-only", "threads")]


@pytest.mark.parametrize("case, phase, engine", REDIRECT_CASES)
def test_absolute_redirect_to_the_same_origin_spelled_otherwise_keeps_credentials(case, phase, engine, request):
    """The server answers with an absolute ``Location`` naming itself as it sees itself: ``localhost`` for a URL
    that said ``LOCALHOST``, ``http://127.83.41.7/`` for a URL that said ``:80`` (or the other way round). Host
    names are case-insensitive and 80 is http's port (RFC 9110 4.2.1, 4.3.1): the same origin, so
    ``user:password@`` goes along, as it does within an origin (aiohttp, curl, requests)."""
    fixture, host, port, to_host, to_port = SAME_ORIGIN[case]
    server = request.getfixturevalue(fixture)
    server.clear()
    location = server.url("/private/blob/m.safetensors", host=to_host, port=to_port)
    server.script = _redirect_once("/private/m.safetensors", location, reads_only=phase == "reads-only")
    url = server.url("/private/m.safetensors", host=host, port=port, userinfo=True)
    try:
        got = fastload.load(url, config=CFG.replace(http_engine=engine))
    except fastload.FastloadError as exc:
        got = exc
    finally:
        server.script = None
    blob = [s for s in server.requests() if s.path == "/private/blob/m.safetensors"]
    assert not isinstance(got, BaseException), (
        f"{got!r}; requests to {location}: {len(blob)}, without the credentials: "
        f"{sum(s.authorization is None for s in blob)}")
    assert_bit_exact(got, WANT)
    assert blob and all(s.authorization == BASIC for s in blob)


@pytest.mark.parametrize("engine", ENGINES)
def test_plan_of_s3_by_host_name_shows_no_presigned_url(engine, s3_by_name):
    """``plan`` of an S3 object through ``endpoint_url=http://localhost:port``: the plan in every form (text,
    repr, JSON) names ``s3://bucket/key``, never the presigned GET URL (its signature and access key id):
    "Presigned URLs never appear in messages" (README)."""
    url, endpoint = s3_by_name
    plan = fastload.plan(url, config=CFG.replace(http_engine=engine, s3=fastload.S3Options(endpoint_url=endpoint)))
    assert [f.info.url for f in plan.files] == [url]
    for name, text in {"str(plan)": str(plan), "plan.to_json()": plan.to_json(), "repr(plan)": repr(plan)}.items():
        for secret in ("X-Amz-Signature", "X-Amz-Credential", "localhost"):
            assert secret not in text, f"{name} shows the presigned GET URL ({secret}=...)"
