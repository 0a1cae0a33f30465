"""fastload against a second, independent HTTP server: aiohttp's own ``web.static`` / ``web.FileResponse`` (audit).

The suite's other HTTP tests talk to servers written for the suite. Real weights sit behind other servers, whose
Range, ETag, conditional-request and keep-alive behaviour is their own: aiohttp's file server answers ``If-Match``
with 412, an unsatisfiable range with 416 and ``bytes */size``, makes its ETag of the file's mtime and size, serves
``*.gz`` siblings to clients that accept gzip, and closes idle keep-alive connections after ``keepalive_timeout``
(fresh ones too). Each test starts that server in a thread on 127.0.0.1 (an ephemeral port), counts every request
with a middleware, and runs both body engines against it.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import torch
from aiohttp import web
from checkpoints import llama_config, llama_like_tensors, write_sharded, write_single
from reliability_helpers import client_sockets, same_bytes
from safetensors.torch import load_file, save

import fastload
from fastload.sources.http import JSON_PROBE_BYTES

ENGINES = ["threads", "aiohttp"]
SIG = "s1gn4ture-T0KEN"
RETRY = fastload.RetryConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02, deadline_s=5.0)
CFG = fastload.LoadConfig(chunk_bytes=64 << 10, max_concurrency=4, host_buffer_bytes=1 << 20, stall_timeout_s=2.0,
                          connect_timeout_s=2.0, retry=RETRY)
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
REC = web.RequestKey("rec", dict)


# -- aiohttp's file server, in a thread ------------------------------------------------------------------------

class Origin:
    """``web.static(prefix, root)`` on aiohttp's own server. ``log`` holds one dict per request (method, path,
    query, Range, If-Match, Accept-Encoding, client port; status and reply headers once prepared). With ``sig``,
    a request whose query lacks ``sig=<sig>`` is refused with 403. ``before(request)`` runs ahead of the handler
    (on the server's loop); ``gzip_json`` answers ``*.json`` with a gzip-encoded ``web.Response`` (200, Range
    ignored); ``compress`` turns on aiohttp's content negotiation (gzip only for clients that accept it)."""

    def __init__(self, root: Path, *, prefix: str = "/", sig: str | None = None, keepalive_timeout: float = 75.0,
                 before=None, gzip_json: bool = False, compress: bool = False, plain_json: bool = False):
        self.root, self.prefix, self.sig, self.before = Path(root), prefix, sig, before
        self.gzip_json, self.compress, self.keepalive_timeout = gzip_json, compress, keepalive_timeout
        self.plain_json = plain_json  # *.json as a plain web.Response: 200 and the whole file, Range ignored
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True, name="aiohttp-origin")

    def _app(self) -> web.Application:
        @web.middleware
        async def middleware(request: web.Request, handler):
            peer = request.transport.get_extra_info("peername") if request.transport else None
            rec = {"method": request.method, "path": request.path, "query": request.query_string,
                   "range": request.headers.get("Range"), "if_match": request.headers.get("If-Match"),
                   "accept_encoding": request.headers.get("Accept-Encoding"), "peer": peer[1] if peer else None,
                   "status": None, "content_range": None, "content_length": None, "content_encoding": None,
                   "etag": None}
            with self.lock:
                self.log.append(rec)
            request[REC] = rec
            if self.sig is not None and request.query.get("sig") != self.sig:
                raise web.HTTPForbidden()
            if self.before is not None:
                await self.before(request)
            if (self.gzip_json or self.plain_json) and request.path.endswith(".json"):
                file = self.root / request.path[len(self.prefix):]
                if file.is_file() and self.plain_json:
                    return web.Response(body=file.read_bytes(), content_type="application/json")
                if file.is_file():
                    return web.Response(body=gzip.compress(file.read_bytes()), content_type="application/json",
                                        headers={"Content-Encoding": "gzip"})
            response = await handler(request)
            if self.compress:
                response.enable_compression()  # gzip/deflate only when Accept-Encoding allows it
            return response

        async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
            rec = request.get(REC)
            if rec is not None:
                rec.update(status=response.status, content_range=response.headers.get("Content-Range"),
                           content_length=response.content_length,
                           content_encoding=response.headers.get("Content-Encoding"),
                           etag=response.headers.get("ETag"))

        app = web.Application(middlewares=[middleware])
        app.on_response_prepare.append(on_prepare)
        app.add_routes([web.static(self.prefix.rstrip("/") or "/", self.root)])
        return app

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        runner = web.AppRunner(self._app(), keepalive_timeout=self.keepalive_timeout, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        self.port = runner.addresses[0][1]
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def url(self, rel: str = "", sig: str | None = None) -> str:
        sig = self.sig if sig is None else sig
        return f"http://127.0.0.1:{self.port}{self.prefix}{rel}" + (f"?sig={sig}" if sig else "")

    def requests(self, rel: str | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.log if rel is None or r["path"] == self.prefix + rel]

    def clear(self) -> None:
        with self.lock:
            self.log.clear()

    def __enter__(self) -> Origin:
        self.thread.start()
        assert self.ready.wait(10), "aiohttp server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# -- helpers ---------------------------------------------------------------------------------------------------

def cfg(engine: str, **kw) -> fastload.LoadConfig:
    return CFG.replace(http_engine=engine, **kw)


def span(rec: dict) -> tuple[int, int]:
    m = _RANGE.fullmatch(rec["range"] or "")
    assert m, f"request without a single closed range: {rec}"
    return int(m.group(1)), int(m.group(2)) + 1


def data_start_of(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert same_bytes(got[name], tensor), name


def assert_every_request_clean(origin: Origin) -> None:
    """GETs only, each with a single closed Range and the token, answered 206 (never a whole-file 200)."""
    for r in origin.requests():
        assert r["method"] == "GET", r
        assert r["query"] == f"sig={origin.sig}" if origin.sig else r["query"] == "", r
        assert r["status"] in (206, 404), r  # 404: a probe of a file the directory does not have
        span(r)


def assert_file_read_once(origin: Origin, rel: str, path: Path) -> None:
    """One 8-byte probe, one header read (exactly the JSON), then tensor ranges inside the file that cover the
    data section once."""
    size, start = path.stat().st_size, data_start_of(path)
    reqs = origin.requests(rel)
    spans = [span(r) for r in reqs]
    assert spans.count((0, 8)) == 1, (rel, spans)
    header = [s for s in spans if s[0] == 8]
    assert header == ([(8, start)] if start > 8 else []), (rel, spans)
    data = sorted(s for s in spans if s[0] >= start)
    assert len(spans) == 1 + len(header) + len(data), (rel, spans)
    assert all(start <= a < b <= size for a, b in data), (rel, data)
    pos = start
    for a, b in data:  # disjoint and gap-free: every tensor byte once
        assert a == pos, (rel, data)
        pos = b
    assert pos == size, (rel, data)
    assert all(r["content_length"] == b - a for r, (a, b) in zip(reqs, spans)), reqs


def no_client_sockets(port: int, grace_s: float = 1.0) -> list:
    deadline = time.monotonic() + grace_s
    while (left := client_sockets({port})) and time.monotonic() < deadline:
        time.sleep(0.02)
    return left


def replace_file(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` and a later mtime (aiohttp's ETag is mtime_ns-size; a coarse
    clock could give a same-size rewrite the old mtime, and the old ETag)."""
    old = path.stat()
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.utime(tmp, ns=(old.st_atime_ns, old.st_mtime_ns + 1_000_000_000))
    os.replace(tmp, path)


def tensors_of(seed: int, count: int = 5, n: int = 30_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"w{i}": torch.randn(n + 1_013 * i, generator=g) for i in range(count)}
    out["ids"] = torch.arange(777, dtype=torch.int64)
    out["half"] = torch.randn(3, 517, generator=g).to(torch.bfloat16)
    return out


@pytest.fixture
def single(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "www"
    path = write_single(root / "models" / "one" / "model.safetensors", tensors_of(1))
    return root, path


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "www"
    directory = write_sharded(root / "models" / "sh", tensors_of(2, count=7), 3)
    (directory / "config.json").write_text(json.dumps({"model_type": "none"}))
    return root, directory


# -- load / stream / plan / pull of one file and of a sharded directory ----------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_single_file_load_stream_plan_pull_behind_prefix_and_token(engine, single, tmp_path):
    root, path = single
    want = load_file(str(path))
    rel = "models/one/model.safetensors"
    with Origin(root, prefix="/serve/v1/", sig=SIG) as origin:
        url = origin.url(rel)
        assert_same(fastload.load(url, config=cfg(engine)), want)
        assert_every_request_clean(origin)
        assert_file_read_once(origin, rel, path)
        assert len({r["if_match"] for r in origin.requests() if span(r) != (0, 8)}) == 1  # the ETag, pinned
        assert no_client_sockets(origin.port) == []

        origin.clear()
        with fastload.stream(url, config=cfg(engine)) as s:
            streamed = {name: t.clone() for name, t in s}
        assert_same(streamed, want)
        assert_file_read_once(origin, rel, path)

        origin.clear()
        planned = fastload.plan(url, config=cfg(engine))
        assert {t.name for t in planned.tensors} == set(want)
        assert planned.files[0].info.size == path.stat().st_size and SIG not in repr(planned.to_dict())
        assert sorted(span(r) for r in origin.requests()) == [(0, 8), (8, data_start_of(path))]

        origin.clear()
        out = fastload.pull(url, to=tmp_path / "pulled", config=cfg(engine))
        assert out.read_bytes() == path.read_bytes()
        assert_every_request_clean(origin)
        spans = sorted(span(r) for r in origin.requests())
        # the probe's 8 bytes are the file's first: written as they came, the rest fetched once
        assert spans[0] == (0, 8) and spans[1][0] == 8 and sum(b - a for a, b in spans) == path.stat().st_size, spans
        assert no_client_sockets(origin.port) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_directory_url_load_stream_plan_pull(engine, sharded, tmp_path):
    root, directory = sharded
    shards = sorted(directory.glob("*.safetensors"))
    want = {k: v for p in shards for k, v in load_file(str(p)).items()}
    with Origin(root, prefix="/blobs/", sig=SIG) as origin:
        url = origin.url("models/sh/")
        assert url.endswith("/models/sh/?sig=" + SIG)
        assert_same(fastload.load(url, config=cfg(engine)), want)
        assert_every_request_clean(origin)
        assert all(r["status"] == 206 for r in origin.requests())  # the index is found first: no 404 probes
        index = directory / "model.safetensors.index.json"
        assert [span(r) for r in origin.requests("models/sh/model.safetensors.index.json")] == \
            [(0, JSON_PROBE_BYTES)]  # one request: the probe brings it whole
        assert index.stat().st_size < JSON_PROBE_BYTES
        for p in shards:
            assert_file_read_once(origin, f"models/sh/{p.name}", p)
        assert len(origin.requests()) == 1 + sum(len(origin.requests(f"models/sh/{p.name}")) for p in shards)

        origin.clear()
        with fastload.stream(url, config=cfg(engine, max_concurrency=2)) as s:
            streamed = {name: t.clone() for name, t in s}
        assert_same(streamed, want)
        for p in shards:
            assert_file_read_once(origin, f"models/sh/{p.name}", p)

        origin.clear()
        planned = fastload.plan(url, config=cfg(engine))
        assert {t.name for t in planned.tensors} == set(want) and len(planned.files) == len(shards)
        for p in shards:
            assert sorted(span(r) for r in origin.requests(f"models/sh/{p.name}")) == [(0, 8), (8, data_start_of(p))]

        origin.clear()
        out = fastload.pull(url, to=tmp_path / "pulled", config=cfg(engine))
        assert_every_request_clean(origin)
        for p in [*shards, index, directory / "config.json"]:
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
        assert sorted(x.name for x in out.iterdir() if x.name != ".fastload") == \
            sorted(x.name for x in directory.iterdir())
        assert no_client_sockets(origin.port) == []


# -- from_pretrained -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    import transformers
    root = tmp_path_factory.mktemp("llama-www")
    directory = write_sharded(root / "org" / "tiny-llama", llama_like_tensors(), 3)
    (directory / "config.json").write_text(json.dumps(llama_config()))
    return root, directory, transformers.AutoModelForCausalLM.from_pretrained(directory)


@pytest.mark.parametrize("engine", ENGINES)
def test_from_pretrained_of_a_sharded_model_behind_prefix_and_token(engine, llama):
    root, directory, reference = llama
    with Origin(root, prefix="/hub/", sig=SIG) as origin:
        model = fastload.from_pretrained(origin.url("org/tiny-llama/"), config=cfg(engine))
        assert type(model) is type(reference)
        ours, theirs = model.state_dict(), reference.state_dict()
        assert list(ours) == list(theirs)
        for name in ours:
            assert same_bytes(ours[name], theirs[name]), name
        shards = {p.name: p for p in directory.glob("*.safetensors")}
        want = {k: v for p in shards.values() for k, v in load_file(str(p)).items()}
        assert all(same_bytes(ours[k], v) for k, v in want.items())
        assert_every_request_clean(origin)
        for name, p in shards.items():
            assert_file_read_once(origin, f"org/tiny-llama/{name}", p)
        index = origin.requests("org/tiny-llama/model.safetensors.index.json")
        assert [span(r) for r in index].count((0, 8)) <= 2 and len(index) <= 3, index  # (a known second probe)
        assert SIG not in str(model.config.to_dict())
        assert no_client_sockets(origin.port) == []


# -- tiny and edge-shaped files --------------------------------------------------------------------------------

def _edge_files() -> dict[str, bytes]:
    g = torch.Generator().manual_seed(5)
    return {
        "zero": b"",
        "eight_zero_len": (0).to_bytes(8, "little"),
        "eight_len_past_eof": (2).to_bytes(8, "little"),
        "three": b"\x05\x00\x00",
        "header_at_eof": save({}),
        "metadata_only": save({}, metadata={"format": "pt", "k": "v"}),
        "empty_tensor_at_eof": save({"a": torch.randn(2_000, generator=g), "zz": torch.zeros(0, 3)}),
        "only_empty_tensors": save({"e": torch.zeros(0), "f": torch.zeros(4, 0, dtype=torch.int32)}),
    }


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", list(_edge_files()))
def test_tiny_and_edge_files(engine, case, tmp_path):
    raw = _edge_files()[case]
    root = tmp_path / "www"
    root.mkdir()
    (root / f"{case}.safetensors").write_bytes(raw)
    with Origin(root) as origin:
        started = time.monotonic()
        try:
            got = fastload.load(origin.url(f"{case}.safetensors"), config=cfg(engine))
        except fastload.FastloadError as exc:
            got = exc
        took = time.monotonic() - started
        reqs = origin.requests()
    assert took < 5.0
    if case in ("zero", "eight_zero_len", "eight_len_past_eof", "three"):
        assert isinstance(got, fastload.FormatError), got
        assert f"{case}.safetensors" in str(got)
        assert len(reqs) == 1 and span(reqs[0]) == (0, 8), reqs  # the probe says it all: nothing retried
        return
    assert not isinstance(got, Exception), got
    assert_same(got, load_file(str(root / f"{case}.safetensors")))
    assert all(r["status"] == 206 for r in reqs), reqs  # no 416: nothing asked at or past the end
    spans = [span(r) for r in reqs]
    assert all(b <= len(raw) and a < b for a, b in spans), spans
    start = 8 + int.from_bytes(raw[:8], "little")
    assert spans.count((0, 8)) == 1 and spans.count((8, start)) == 1
    data = [s for s in spans if s[0] >= start]
    assert sum(b - a for a, b in data) == len(raw) - start, spans


# -- the file replaced on disk mid-load ------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("when", ["header", "first_data", "third_data"])
def test_file_replaced_mid_load_is_source_changed_and_never_mixed(engine, when, tmp_path):
    root = tmp_path / "www"
    old, new = tensors_of(7), {k: (v + 1 if v.is_floating_point() else v + 3) for k, v in tensors_of(7).items()}
    path = write_single(root / "m.safetensors", old)
    raw_new = save(new)
    assert len(raw_new) == path.stat().st_size  # the same size: only the ETag (mtime) tells
    start = data_start_of(path)
    seen = {"data": 0}

    async def before(request: web.Request) -> None:
        m = _RANGE.fullmatch(request.headers.get("Range", ""))
        if not m:
            return
        first = int(m.group(1))
        if first >= start:
            seen["data"] += 1
        fire = {"header": first == 8, "first_data": first >= start and seen["data"] == 1,
                "third_data": first >= start and seen["data"] == 3}[when]
        if fire:
            replace_file(path, raw_new)

    got: dict[str, torch.Tensor] = {}
    with Origin(root, before=before) as origin:
        with pytest.raises(fastload.SourceChangedError) as err:
            with fastload.stream(origin.url("m.safetensors"), config=cfg(engine, max_concurrency=1)) as s:
                for name, tensor in s:
                    got[name] = tensor.clone()
        reqs = origin.requests()
    assert "m.safetensors" in str(err.value)
    for name, tensor in got.items():  # what was handed out before the change is the old file's, whole
        assert same_bytes(tensor, old[name]), name
    assert reqs[-1]["status"] == 412 and all(r["status"] == 206 for r in reqs[:-1]), reqs
    assert len(reqs) == {"header": 2, "first_data": 3, "third_data": 5}[when], reqs  # one reader; no retry
    assert all(r["if_match"] for r in reqs if span(r) != (0, 8))


@pytest.mark.parametrize("engine", ENGINES)
def test_pull_resumed_after_the_file_changed_refetches_it_whole(engine, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    g = torch.Generator().manual_seed(9)
    version_a = save({f"w{i}": torch.randn(60_000, generator=g) for i in range(5)})
    version_b = save({f"w{i}": torch.randn(60_000, generator=g) for i in range(5)})
    assert len(version_a) == len(version_b)
    path = root / "model.safetensors"
    path.write_bytes(version_a)
    out = tmp_path / "out"
    one = cfg(engine, chunk_bytes=256 << 10, max_concurrency=1)

    class Stop(Exception):
        pass

    def stop_after(n: int):
        calls = []

        def progress(done: int, total: int) -> None:
            calls.append(done)
            if len(calls) > n:
                raise Stop
        return progress

    with Origin(root, sig=SIG) as origin:
        url = origin.url("model.safetensors")
        with pytest.raises(Stop):  # control: an unchanged file resumes, fetching only what is missing
            fastload.pull(url, to=out, config=one, progress=stop_after(2))
        origin.clear()
        with pytest.raises(Stop):
            fastload.pull(url, to=out, config=one, progress=stop_after(1))
        resumed = sum(b - a for a, b in (span(r) for r in origin.requests()) if (a, b) != (0, 8))
        assert resumed == 256 << 10  # the one chunk taken before the stop; the two already there were not

        replace_file(path, version_b)
        origin.clear()
        result = fastload.pull(url, to=out, config=one)
        assert result.read_bytes() == version_b
        assert_every_request_clean(origin)
        spans = sorted(span(r) for r in origin.requests())
        assert sum(b - a for a, b in spans) == len(version_b) and spans[0] == (0, 8), spans  # all of it again (the
        # new version's first 8 bytes from its probe)
        probe = origin.requests()[0]
        assert span(probe) == (0, 8)
        assert {r["if_match"] for r in origin.requests()[1:]} == {probe["etag"]}  # pinned to the new version
        assert not (out / ".fastload" / "incomplete" / "model.safetensors").exists()

        replace_file(path, version_a)  # and once more, complete this time: a finished file that went stale
        origin.clear()
        assert fastload.pull(url, to=out, config=one).read_bytes() == version_a


# -- the token on every request --------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_a_token_the_server_refuses_is_a_permission_error_that_hides_it(engine, sharded):
    root, _ = sharded
    with Origin(root, prefix="/p/", sig=SIG) as origin:
        for source in (origin.url("models/sh/", sig="wrong-T0KEN-value"),
                       origin.url("models/sh/model-00001-of-00003.safetensors", sig="wrong-T0KEN-value")):
            started = time.monotonic()
            with pytest.raises(fastload.SourcePermissionError) as err:
                fastload.load(source, config=cfg(engine))
            assert time.monotonic() - started < 3.0
            assert "wrong-T0KEN-value" not in str(err.value) and "wrong-T0KEN-value" not in repr(err.value.args)
        assert all(r["status"] == 403 for r in origin.requests())
        assert len(origin.requests()) == 2  # refused at the first request each: not retried


# -- keep-alive and encodings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_server_closing_idle_keep_alive_connections_costs_no_retry(engine, sharded):
    """aiohttp closes a connection idle for ``keepalive_timeout``; a slow progress callback keeps the load's
    connections idle longer than that between requests. With a single attempt allowed, a closed connection
    taken for a live one would fail the load."""
    root, directory = sharded
    shards = sorted(directory.glob("*.safetensors"))
    want = {k: v for p in shards for k, v in load_file(str(p)).items()}
    config = cfg(engine, chunk_bytes=64 << 10, max_concurrency=1, retry=fastload.RetryConfig(max_attempts=1))
    with Origin(root, keepalive_timeout=0.05) as origin:
        got = fastload.load(origin.url("models/sh/"), config=config, progress=lambda done, total: time.sleep(0.1))
        reqs = origin.requests()
    assert_same(got, want)
    assert all(r["status"] == 206 for r in reqs)
    assert len({r["peer"] for r in reqs}) >= 3, "the server did not close idle connections: nothing was tested"


@pytest.mark.parametrize("engine", ENGINES)
def test_precompressed_siblings_and_gzip_negotiation_never_reach_a_tensor(engine, sharded):
    """``web.static`` serves ``name.gz`` in place of ``name`` (with ``Content-Encoding: gzip`` and the *gzip
    file's* ranges) to a client that accepts gzip, and the middleware compresses what it may: fastload must ask
    for, and get, the identity bytes of every file."""
    root, directory = sharded
    for p in list(directory.iterdir()):
        p.with_name(p.name + ".gz").write_bytes(gzip.compress(p.read_bytes()))
    shards = sorted(directory.glob("*.safetensors"))
    want = {k: v for p in shards for k, v in load_file(str(p)).items()}
    with Origin(root, compress=True, sig=SIG) as origin:
        assert_same(fastload.load(origin.url("models/sh/"), config=cfg(engine)), want)
        reqs = origin.requests()
    assert all(r["content_encoding"] is None for r in reqs), reqs
    assert all(r["accept_encoding"] == "identity" for r in reqs), reqs
    assert_every_request_clean(origin)


@pytest.mark.parametrize("engine", ENGINES)
def test_index_sent_gzip_encoded_whatever_was_asked_is_a_prompt_typed_error(engine, sharded):
    """A middleware that answers the JSON index with a gzip-encoded ``web.Response`` (200, Range ignored): the
    documented answer is a TransferError naming the index, at the first reply, without the token."""
    root, _ = sharded
    with Origin(root, gzip_json=True, sig=SIG) as origin:
        started = time.monotonic()
        with pytest.raises(fastload.TransferError) as err:
            fastload.load(origin.url("models/sh/"), config=cfg(engine))
        took = time.monotonic() - started
        reqs = origin.requests()
    assert took < 3.0
    assert "model.safetensors.index.json" in str(err.value) and SIG not in str(err.value)
    assert len(reqs) == 1 and reqs[0]["status"] == 200, reqs


@pytest.mark.parametrize("engine", ENGINES)
def test_json_from_a_handler_that_ignores_range_is_taken_whole_from_the_probe(engine, llama, tmp_path):
    """The index and config.json from a handler that answers 200 with the whole file (a dynamic route: Range
    ignored), the shards from the file server: the JSON is taken from the probe's reply, as curl or
    huggingface_hub take it, with no second request. It used to fail the whole load ("cannot serve parallel
    ranged reads"), though a JSON file is read whole anyway. load, plan, pull and from_pretrained: exact."""
    root, directory, reference = llama
    with Origin(root, sig=SIG, plain_json=True) as origin:
        url = origin.url("org/tiny-llama/")
        got = fastload.load(url, config=cfg(engine))
        index = origin.requests("org/tiny-llama/model.safetensors.index.json")
        assert [r["status"] for r in index] == [200], index
        want = {k: v for p in directory.glob("*.safetensors") for k, v in load_file(str(p)).items()}
        assert set(got) == set(want) and all(same_bytes(got[k], v) for k, v in want.items())
        assert len(fastload.plan(url, config=cfg(engine)).files) == 3
        model = fastload.from_pretrained(url, config=cfg(engine))
        ours, theirs = model.state_dict(), reference.state_dict()
        assert list(ours) == list(theirs) and all(same_bytes(ours[k], theirs[k]) for k in ours)
        dest = tmp_path / "pulled"
        fastload.pull(url, to=dest, config=cfg(engine))
        for p in directory.iterdir():
            assert (dest / p.name).read_bytes() == p.read_bytes(), p.name
        assert no_client_sockets(origin.port) == []


@pytest.mark.parametrize("engine", ENGINES)
def test_percent_encoded_sas_token_and_odd_shard_names(engine, tmp_path):
    """An Azure-SAS-style token whose value holds ``+ / = &`` (percent-encoded in the URL) and shard names with
    spaces, non-ASCII and sub-delimiters: aiohttp's router decodes the path, its query parser the token; every
    request must name the right file and carry the token unchanged."""
    from urllib.parse import quote

    root = tmp_path / "www"
    names = ["model shard 1.safetensors", "ünï-2.safetensors", "a+b;c=d,e.safetensors", "x@y!z'(1).safetensors"]
    g = torch.Generator().manual_seed(11)
    weight_map, want = {}, {}
    (root / "sh").mkdir(parents=True)
    for i, name in enumerate(names):
        tensors = {f"t{i}": torch.randn(5_000 + i, generator=g)}
        (root / "sh" / name).write_bytes(save(tensors))
        weight_map[f"t{i}"] = name
        want.update(load_file(str(root / "sh" / name)))
    (root / "sh" / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    token = "ab+c/d e==&x"
    with Origin(root, sig=token) as origin:
        url = f"http://127.0.0.1:{origin.port}/sh/?sv=2024&sig={quote(token, safe='')}"
        assert_same(fastload.load(url, config=cfg(engine)), want)
        reqs = origin.requests()
    assert all(r["status"] == 206 for r in reqs), reqs
    assert {r["path"] for r in reqs} == {"/sh/" + n for n in [*names, "model.safetensors.index.json"]}


@pytest.mark.parametrize("engine", ENGINES)
def test_stream_left_early_leaves_no_socket_to_the_server(engine, tmp_path):
    root = tmp_path / "www"
    g = torch.Generator().manual_seed(12)
    path = write_single(root / "big.safetensors", {f"w{i}": torch.randn(400_000, generator=g) for i in range(6)})
    with Origin(root) as origin:
        with fastload.stream(origin.url("big.safetensors"), config=cfg(engine, max_concurrency=2)) as s:
            name, tensor = next(iter(s))
            assert same_bytes(tensor, load_file(str(path))[name])
        assert no_client_sockets(origin.port, grace_s=2.0) == []
        # and the server still answers a fresh load after the cut connections
        assert_same(fastload.load(origin.url("big.safetensors"), config=cfg(engine)), load_file(str(path)))
