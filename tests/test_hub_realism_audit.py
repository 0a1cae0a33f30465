"""Audit: hf:// sources against a Hub that behaves like the real one.

The stand-in Hub (``hub_server.HubServer``) is extended here: LFS files redirect to a *separate* CDN server
(another loopback port, so another origin) with a signed query that expires after a number of requests or
seconds (CloudFront answers 403 then); the Hub can answer 429 with Retry-After, 503, 502 HTML pages, and gate
repositories. Every entry point is driven end to end: ``load``, ``stream``, ``plan``, ``from_pretrained`` and
``pull`` (into the Hugging Face cache and into a plain directory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import torch
from checkpoints import chunky_tensors, llama_config, llama_like_tensors, write_sharded
from hub_server import HF_VARS, HubServer, _HubHandler, repo_name
from safetensors.torch import load_file
from servers import RangeHTTPServer
from servers.http_range import Reply

import fastload

TOKEN = "hf_realismSecretToken0123456789"
CHUNK = 64 << 10


def cfg(engine: str = "threads", concurrency: int = 2, attempts: int = 4) -> fastload.LoadConfig:
    return fastload.LoadConfig(chunk_bytes=CHUNK, max_concurrency=concurrency, http_engine=engine,
                               retry=fastload.RetryConfig(max_attempts=attempts, backoff_base_s=0.01,
                                                          backoff_max_s=2.0, deadline_s=20.0))


# -- a CDN on its own origin, with signed URLs that expire ---------------------------------------------------


class _CdnHandler(RangeHTTPServer.handler_class):  # type: ignore[misc, valid-type]
    def produce(self, path, headers, body):
        cdn: SigningCdn = self.server.owner  # type: ignore[assignment]
        query = parse_qs(urlsplit(self.path).query)
        sig = (query.get("Signature") or [""])[0]
        request = {n.lower(): v for n, v in headers}
        with cdn.lock:
            cdn.seen.append((self.command, path, sig, dict(request)))
            if len(cdn.seen) in cdn.rotate_at:  # the signing key rotates: every URL issued so far expires
                for old in cdn.sigs.values():
                    old[2] = True
            entry = cdn.sigs.get(sig)
            valid = entry is not None and not entry[2] and not cdn.refuse_all
            if valid and cdn.uses is not None and entry[1] >= cdn.uses:
                valid = False
            if valid and cdn.ttl_s is not None and time.monotonic() - entry[0] > cdn.ttl_s:
                valid = False
            if entry is not None:
                entry[1] += 1
            if not valid:
                cdn.refused += 1
        if cdn.delay_s and self.command == "GET":
            time.sleep(cdn.delay_s)
        if not valid:
            text = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>Request has expired</Message>" \
                   b"</Error>"
            return Reply(403, [("Content-Type", "application/xml"), ("Content-Length", str(len(text)))], [text])
        if cdn.hook is not None and (reply := cdn.hook(self.command, path)) is not None:
            return reply
        if not path.startswith("/lfs/"):
            return Reply.simple(404)
        return super().produce("/repos/" + path[len("/lfs/"):], headers, body)


class SigningCdn(RangeHTTPServer):
    handler_class = _CdnHandler

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lock = threading.Lock()
        self.sigs: dict[str, list] = {}  # signature -> [issued at, requests made with it, revoked]
        self.rotate_at: set[int] = set()  # request numbers at which every signature issued so far expires
        self.uses: int | None = None  # requests one signature allows
        self.ttl_s: float | None = None  # seconds one signature lives
        self.refuse_all = False
        self.delay_s = 0.0
        self.refused = 0
        self.hook: Callable | None = None
        self.seen: list[tuple[str, str, str, dict]] = []

    def sign(self) -> str:
        sig = "SIG" + uuid.uuid4().hex
        with self.lock:
            self.sigs[sig] = [time.monotonic(), 0, False]
        return sig

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.sigs.clear()
            self.seen.clear()
        self.uses = self.ttl_s = self.hook = None
        self.rotate_at = set()
        self.refuse_all, self.delay_s, self.refused = False, 0.0, 0


class _RealHandler(_HubHandler):
    def produce(self, path, headers, body):
        hub: RealHub = self.server.owner  # type: ignore[assignment]
        request = {n.lower(): v for n, v in headers}
        with hub.lock:
            hub.seen.append((self.command, path, dict(request), time.monotonic()))
        if hub.hook is not None and (reply := hub.hook(self.command, path, request)) is not None:
            return reply
        reply = super().produce(path, headers, body)
        if reply.status == 302:  # an LFS file: to the CDN, on its own origin, with a fresh signature
            sig = hub.cdn.sign()
            out = []
            for name, value in reply.headers:
                if name == "Location":
                    lfs = urlsplit(value).path
                    value = (f"http://127.0.0.1:{hub.cdn.port}{lfs}?Expires=9999999999&Signature={sig}"
                             f"&Key-Pair-Id=K2JCJMDEHXQW5F")
                out.append((name, value))
            reply.headers = out
        if hub.after is not None:
            hub.after(self.command, path)
        return reply


class RealHub(HubServer):
    handler_class = _RealHandler

    def __init__(self, root: Path, cdn: SigningCdn) -> None:
        super().__init__(root)
        self.cdn = cdn
        self.lock = threading.Lock()
        self.hook: Callable | None = None
        self.after: Callable | None = None
        self.seen: list[tuple[str, str, dict, float]] = []

    def reset(self) -> None:
        super().reset()
        self.cdn.reset()
        self.hook = self.after = None
        self.token = None
        with self.lock:
            self.seen.clear()

    def paths(self, kind: str = "") -> list[str]:
        with self.lock:
            return [p for _, p, _, _ in self.seen if kind in p]


@pytest.fixture(scope="session")
def real_hub_session(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-hub")
    (root / "repos").mkdir()
    with SigningCdn(root) as cdn, RealHub(root, cdn) as hub:
        yield hub


@pytest.fixture
def rhub(real_hub_session: RealHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RealHub:
    for name in HF_VARS:
        monkeypatch.delenv(name, raising=False)
    real_hub_session.reset()
    monkeypatch.setenv("HF_ENDPOINT", real_hub_session.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield real_hub_session
    real_hub_session.reset()


# -- helpers ------------------------------------------------------------------------------------------------


def chunky_repo(directory: Path, seed: int = 0) -> Path:
    """Two shards of ~0.5 MiB (8 chunks of 64 KiB each) and an index, plus a config and a tokenizer file."""
    write_sharded(directory, chunky_tensors(seed, 4, (256, 256)), 2, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"model_type": "custom", "seed": seed}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "seed": seed}))
    return directory


def reference(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].contiguous().view(torch.uint8), tensor.contiguous().view(torch.uint8)), name


def said(exc: BaseException, trace: fastload.Trace | None = None) -> str:
    text = "".join(traceback.format_exception(exc)) + repr(exc.args)
    cause = exc
    while cause is not None:
        text += repr(cause) + str(getattr(cause, "url", ""))
        cause = cause.__cause__ or cause.__context__
    if trace is not None:
        text += json.dumps(trace.to_dict(), default=str)
    return text


def drain(stream) -> dict[str, torch.Tensor]:
    with stream as s:
        return {name: tensor.clone() for name, tensor in s}


def same_files(got: Path, want: Path) -> None:
    for file in sorted(p for p in want.rglob("*") if p.is_file()):
        assert (got / file.relative_to(want)).read_bytes() == file.read_bytes(), file.name


# -- signed CDN URLs that expire mid-load ---------------------------------------------------------------------


def rotate(hub: RealHub, *at: int) -> None:
    """Count CDN requests afresh; at each of these request numbers every signature issued so far expires."""
    with hub.cdn.lock:
        hub.cdn.seen.clear()
        hub.cdn.rotate_at = set(at)
        hub.cdn.refused = 0
    with hub.lock:
        hub.seen.clear()


def weight_resolves(hub: RealHub) -> int:
    return len([p for p in hub.paths("/resolve/") if p.endswith(".safetensors")])


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_signatures_expiring_mid_load_stream_plan_are_resolved_again(rhub: RealHub, tmp_path: Path,
                                                                     engine: str) -> None:
    """The CDN's signing key rotates during each read (every URL issued before then answers 403, as an expired
    CloudFront signature): load, stream and plan re-resolve through the Hub and end bit-exact, with one Hub
    round trip per refusal at most, and no signature in the trace."""
    repo = repo_name("expire")
    src = chunky_repo(tmp_path / "src")
    rhub.add_repo(repo, src)
    want = reference(src)
    rotate(rhub, 6)
    trace = fastload.Trace()
    assert_same(fastload.load(f"hf://{repo}", config=cfg(engine), trace=trace), want)
    refused = rhub.cdn.refused
    assert refused >= 1, "the signatures never expired: the test proves nothing"
    assert weight_resolves(rhub) <= 2 + refused, (weight_resolves(rhub), refused)
    assert len(rhub.cdn.seen) <= 16 + 4 + 2 * refused, len(rhub.cdn.seen)
    assert "SIG" not in json.dumps(trace.to_dict(), default=str)
    rotate(rhub, 9)
    got = {}
    with fastload.stream(f"hf://{repo}", config=cfg(engine)) as s:
        for name, tensor in s:
            got[name] = tensor.clone()
    assert_same(got, want)
    assert rhub.cdn.refused >= 1 and weight_resolves(rhub) <= 2 + rhub.cdn.refused
    rotate(rhub, 3)  # plan: two probes, then the header reads get 403
    plan = fastload.plan(f"hf://{repo}", config=cfg(engine))
    assert sorted(t.spec.name for t in plan.tensors) == sorted(want)


def test_signatures_spent_by_other_chunks_fail_typed_or_complete(rhub: RealHub, tmp_path: Path) -> None:
    """A hostile CDN: each signed URL serves 2 requests only, so a URL fetched again may already be spent by
    the other chunks when its chunk comes to use it. The load may complete (bit-exact) or fail, but a failure
    is a SourcePermissionError naming the file and never the signature, and the Hub is asked again at most
    once per refusal (no storm)."""
    repo = repo_name("spent")
    src = chunky_repo(tmp_path / "src")
    rhub.add_repo(repo, src)
    rhub.cdn.uses = 2
    trace = fastload.Trace()
    try:
        got = fastload.load(f"hf://{repo}", config=cfg(concurrency=4), trace=trace)
    except fastload.SourcePermissionError as exc:
        assert "model-0000" in str(exc) and repo in str(exc)
        assert "SIG" not in said(exc, trace)
    else:
        assert_same(got, reference(src))
    assert rhub.cdn.refused >= 1
    assert weight_resolves(rhub) <= 2 + rhub.cdn.refused
    assert len(rhub.cdn.seen) <= 2 * (16 + 4) + rhub.cdn.refused


def test_signature_expiring_after_a_time_load(rhub: RealHub, tmp_path: Path) -> None:
    """Signed URLs live 0.8 s; the CDN takes 0.15 s per GET and the load reads one chunk at a time, so each URL
    expires several times over the load."""
    repo = repo_name("ttl")
    src = chunky_repo(tmp_path / "src")
    rhub.add_repo(repo, src)
    rhub.cdn.ttl_s, rhub.cdn.delay_s = 0.8, 0.15
    assert_same(fastload.load(f"hf://{repo}", config=cfg(concurrency=1)), reference(src))
    assert rhub.cdn.refused >= 1
    resolves = [p for p in rhub.paths("/resolve/") if p.endswith(".safetensors")]
    assert len(resolves) <= 2 + rhub.cdn.refused


# -- the Hub's own errors: 429, 503, 502 pages ----------------------------------------------------------------


HTML_502 = (b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1>"
            + b"<p>cloudfront</p>" * 200 + b"</body></html>")


def html(status: int) -> Reply:
    return Reply(status, [("Content-Type", "text/html"), ("Content-Length", str(len(HTML_502)))], [HTML_502])


def first_n(n: int, reply: Callable[[], Reply], kind: str, method: str | None = None):
    """A hook answering ``reply()`` to the first ``n`` requests whose path holds ``kind``."""
    left = {"n": n}
    lock = threading.Lock()

    def hook(command, path, *_):
        if kind in path and (method is None or command == method):
            with lock:
                if left["n"] > 0:
                    left["n"] -= 1
                    return reply()
        return None

    return hook


def both(*hooks):
    def hook(*args):
        for h in hooks:
            if (reply := h(*args)) is not None:
                return reply
        return None

    return hook


def test_429_with_retry_after_on_listing_and_resolve_is_waited_for(rhub: RealHub, tmp_path: Path) -> None:
    """The Hub rate-limits: 429 with Retry-After: 1 on the listing and on a file's resolve. The load waits
    (about) the second it was asked to, then completes."""
    repo = repo_name("ratelimit")
    src = chunky_repo(tmp_path / "src")
    rhub.add_repo(repo, src)
    limited = lambda: Reply.simple(429, [("Retry-After", "1")])  # noqa: E731
    rhub.hook = both(first_n(1, limited, "/api/"), first_n(1, limited, "model-00002-of-00002"))
    assert_same(fastload.load(f"hf://{repo}", config=cfg()), reference(src))
    with rhub.lock:
        api = [t for _, p, _, t in rhub.seen if p.startswith("/api/")]
        shard = [t for _, p, _, t in rhub.seen if p.endswith("model-00002-of-00002.safetensors")]
    assert len(api) == 2 and api[1] - api[0] >= 0.9, api
    assert len(shard) >= 2 and shard[1] - shard[0] >= 0.9, shard


def test_503_and_502_html_pages_from_hub_and_cdn_are_retried(rhub: RealHub, tmp_path: Path) -> None:
    repo = repo_name("5xx")
    src = chunky_repo(tmp_path / "src")
    rhub.add_repo(repo, src)
    rhub.hook = both(first_n(2, lambda: html(503), "/api/"), first_n(2, lambda: html(502), "/resolve/"))
    rhub.cdn.hook = first_n(2, lambda: html(502), "/lfs/", "GET")
    assert_same(fastload.load(f"hf://{repo}", config=cfg()), reference(src))
    dest = tmp_path / "plain"
    rhub.hook = both(first_n(1, lambda: html(503), "/api/"), first_n(2, lambda: html(502), "/resolve/"))
    rhub.cdn.hook = first_n(2, lambda: html(502), "/lfs/", "GET")
    fastload.pull(f"hf://{repo}", to=dest, config=cfg())
    same_files(dest, src)


@pytest.mark.parametrize("where", ["/api/", "/resolve/", "/lfs/"])
def test_a_hub_that_stays_down_is_a_transfer_error_naming_the_repo(rhub: RealHub, tmp_path: Path,
                                                                   where: str) -> None:
    repo = repo_name("down")
    src = chunky_repo(tmp_path / "src")
    rhub.add_repo(repo, src)
    if where == "/lfs/":
        rhub.cdn.hook = first_n(10 ** 6, lambda: html(502), "/lfs/", "GET")
    else:
        rhub.hook = first_n(10 ** 6, lambda: html(502), where)
    for call in (lambda: fastload.load(f"hf://{repo}", config=cfg(attempts=3)),
                 lambda: fastload.pull(f"hf://{repo}", config=cfg(attempts=3))):
        with pytest.raises(fastload.TransferError) as info:
            call()
        message = str(info.value)
        assert repo in message and "502" in message, message
        assert "<html" not in said(info.value).lower() and "SIG" not in said(info.value)
        assert info.value.attempts == 3, info.value.attempts


# -- gated and private repositories, tokens -------------------------------------------------------------------


def gate(repo: str):
    """A gated repository as the Hub serves it: the listing is public, files answer 401 without a token and 403
    with one that was not granted access."""

    def hook(command, path, headers):
        if "/resolve/" in path and repo in path:
            if "authorization" not in headers:
                return Reply.simple(401, [("X-Error-Code", "GatedRepo"), (
                    "X-Error-Message", f"Access to model {repo} is restricted. You must have access to it and be "
                                       "authenticated to access it. Please log in.")])
            return Reply.simple(403, [("X-Error-Code", "GatedRepo"), (
                "X-Error-Message", f"Access to model {repo} is restricted and you are not in the authorized list. "
                                   f"Visit https://huggingface.co/{repo} to ask for access.")])
        return None

    return hook


def model_repo(directory: Path, seed: int = 4, **sizes) -> Path:
    write_sharded(directory, llama_like_tensors(seed=seed, **sizes), 2, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(llama_config(**sizes)))
    return directory


def test_gated_repo_every_entry_point_says_set_hf_token(rhub: RealHub, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    repo = repo_name("gated")
    rhub.add_repo(repo, model_repo(tmp_path / "src"))
    rhub.hook = gate(repo)
    calls = {
        "load": lambda: fastload.load(f"hf://{repo}", config=cfg()),
        "stream": lambda: drain(fastload.stream(f"hf://{repo}", config=cfg())),
        "plan": lambda: fastload.plan(f"hf://{repo}", config=cfg()),
        "pull-cache": lambda: fastload.pull(f"hf://{repo}", config=cfg()),
        "pull-plain": lambda: fastload.pull(f"hf://{repo}", to=tmp_path / "plain", config=cfg()),
        "from_pretrained": lambda: fastload.from_pretrained(f"hf://{repo}", config=cfg()),
    }
    for what, call in calls.items():
        with pytest.raises(fastload.SourcePermissionError) as info:
            call()
        assert "HF_TOKEN" in str(info.value) and repo in str(info.value), (what, str(info.value))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for what, call in calls.items():
        with pytest.raises(fastload.SourcePermissionError) as info:
            call()
        assert repo in str(info.value) and TOKEN not in said(info.value), (what, str(info.value))
    assert rhub.cdn.seen == []


def test_private_repo_token_reaches_the_hub_only_across_entry_points(rhub: RealHub, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_TOKEN goes to every Hub request (listing, resolve, re-resolve after an expired URL) and to no CDN
    request, on its own origin; nothing fastload writes or says holds it."""
    transformers = pytest.importorskip("transformers")
    repo = repo_name("private")
    src = model_repo(tmp_path / "src")
    rhub.add_repo(repo, src)
    rhub.token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    trace = fastload.Trace()
    rotate(rhub, 4)
    assert_same(fastload.load(f"hf://{repo}", config=cfg(), trace=trace), reference(src))
    assert rhub.cdn.refused >= 1
    fastload.pull(f"hf://{repo}", to=tmp_path / "plain", config=cfg(), trace=trace)
    same_files(tmp_path / "plain", src)
    rotate(rhub, 3)
    model = fastload.from_pretrained(f"hf://{repo}@main", config=cfg(), trace=trace, dtype=torch.bfloat16)
    assert rhub.cdn.refused >= 1
    cached = fastload.pull(f"hf://{repo}", config=cfg(), trace=trace)
    same_files(cached, src)
    theirs = transformers.LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), theirs.state_dict().values()))
    with rhub.lock:
        hub_side = [(p, h) for _, p, h, _ in rhub.seen]
    with rhub.cdn.lock:
        cdn_side = [h for _, _, _, h in rhub.cdn.seen]
    assert hub_side and all(h.get("authorization") == f"Bearer {TOKEN}" for _, h in hub_side)
    assert cdn_side and not any(TOKEN in json.dumps(h) or "authorization" in h for h in cdn_side)
    assert TOKEN not in json.dumps(trace.to_dict(), default=str)
    for file in (tmp_path / "plain").rglob("*"):
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes(), file


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_cdn_refusing_for_good_fails_typed_without_a_storm(rhub: RealHub, tmp_path: Path, engine: str) -> None:
    """After 8 requests the CDN refuses every URL, fresh ones too (a revoked key, a geo block): load and pull
    fail with a SourcePermissionError naming the file, not the signature, having asked the Hub again at most
    once per read in flight."""
    repo = repo_name("revoked")
    src = model_repo(tmp_path / "src", hidden=256, intermediate=512)
    rhub.add_repo(repo, src)

    def hook(command, path):
        with rhub.cdn.lock:
            return Reply.simple(403) if len(rhub.cdn.seen) > 8 else None

    for call in (lambda: fastload.load(f"hf://{repo}", config=cfg(engine, concurrency=8)),
                 lambda: fastload.pull(f"hf://{repo}", to=tmp_path / "plain", config=cfg(engine, concurrency=8))):
        rotate(rhub)
        rhub.cdn.hook = hook
        trace = fastload.Trace()
        with pytest.raises(fastload.SourcePermissionError) as info:
            call()
        assert repo in str(info.value) and ".safetensors" in str(info.value), str(info.value)
        assert "SIG" not in said(info.value, trace)
        assert weight_resolves(rhub) <= 2 + 8 + 2, weight_resolves(rhub)
        assert len(rhub.cdn.seen) <= 8 + 2 * 8 + 4, len(rhub.cdn.seen)


def test_cdn_refusing_an_expired_temporary_credential_with_400_is_resolved_again(rhub: RealHub,
                                                                                 tmp_path: Path) -> None:
    """An S3-style presigned CDN URL signed with temporary credentials answers 400 ExpiredToken (not 403) once
    the credentials expire before the URL does (fastload's own BadRequest says as much for S3). A Hub load
    must treat it as the expired URL it is: ask the Hub again and complete."""
    repo = repo_name("expired400")
    src = chunky_repo(tmp_path / "src")
    rhub.add_repo(repo, src)
    body = b"<Error><Code>ExpiredToken</Code><Message>The provided token has expired.</Message></Error>"
    expired = {"on": True}

    def hook(command, path):
        with rhub.cdn.lock:
            n = len(rhub.cdn.seen)
            sig = rhub.cdn.seen[-1][2]
            first = next(s for _, _, s, _ in rhub.cdn.seen)
        if expired["on"] and n >= 6 and sig == first:  # the URL handed out first has expired
            return Reply(400, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))], [body])
        return None

    rhub.cdn.hook = hook
    trace = fastload.Trace()
    try:
        got = fastload.load(f"hf://{repo}", config=cfg(), trace=trace)
    except fastload.FastloadError as exc:
        assert "SIG" not in said(exc, trace)
        raise
    assert_same(got, reference(src))


# -- pull: into the cache and a plain directory, interrupted, resumed, then used offline -----------------------


class Stop(Exception):
    pass


def stop_after(calls: int):
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) > calls:
            raise Stop(f"stopped at {done} of {total}")

    return progress


def test_pull_into_cache_expiring_interrupted_resumed_then_used_offline(rhub: RealHub, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull into the HF cache whose CDN URLs expire mid-way, stopped by its progress callback, then run again:
    the second run fetches only what is missing, the snapshot is bit-exact, and huggingface_hub and plain
    transformers find it offline."""
    transformers = pytest.importorskip("transformers")
    from huggingface_hub import try_to_load_from_cache

    repo = repo_name("pullexp")
    src = model_repo(tmp_path / "src", hidden=256, intermediate=512)  # 2.2 MiB, 36 chunks
    commit = rhub.add_repo(repo, src)
    cache = tmp_path / "hf-cache"
    total = sum(p.stat().st_size for p in src.iterdir())
    rotate(rhub, 5)
    with pytest.raises(Stop):
        fastload.pull(f"hf://{repo}", config=cfg(concurrency=1), progress=stop_after(6))
    assert try_to_load_from_cache(repo, "model-00001-of-00002.safetensors", cache_dir=cache) is None
    assert try_to_load_from_cache(repo, "config.json", cache_dir=cache) is None
    served_first = rhub.cdn.bytes_sent("/lfs/*")
    assert rhub.cdn.refused >= 1, "no URL expired during the first run: the test proves nothing"
    rotate(rhub, 4)
    result = fastload.runner.run(lambda: fastload.apull(f"hf://{repo}", config=cfg(concurrency=1)))
    served_second = rhub.cdn.bytes_sent("/lfs/*") - served_first
    assert result.path == cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit
    same_files(result.path, src)
    assert result.bytes_fetched < total - 4 * CHUNK, (result.bytes_fetched, total)
    assert served_second <= result.bytes_fetched + 8 * 1024, (served_first, served_second, result.bytes_fetched)
    for name in ("config.json", "model.safetensors.index.json", "model-00002-of-00002.safetensors"):
        assert try_to_load_from_cache(repo, name, cache_dir=cache) == str(result.path / name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(repo, cache_dir=str(cache), local_files_only=True,
                                                              dtype=torch.bfloat16)
    rhub.reset()  # (transformers asks the Hub for things of its own even offline)
    ours = fastload.from_pretrained(f"hf://{repo}", dtype=torch.bfloat16)
    a, b = model.state_dict(), ours.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert_same(fastload.load(f"hf://{repo}"), reference(src))
    assert rhub.log == [] and rhub.cdn.log == []


def test_pull_into_plain_directory_expiring_interrupted_resumed(rhub: RealHub, tmp_path: Path) -> None:
    repo = repo_name("pullplain")
    src = chunky_repo(tmp_path / "src")
    rhub.add_repo(repo, src)
    dest = tmp_path / "plain"
    rotate(rhub, 6)
    with pytest.raises(Stop):
        fastload.pull(f"hf://{repo}", to=dest, config=cfg(concurrency=1), progress=stop_after(5))
    assert rhub.cdn.refused >= 1
    rotate(rhub, 3)
    result = fastload.runner.run(lambda: fastload.apull(f"hf://{repo}", to=dest, config=cfg(concurrency=1)))
    same_files(dest, src)
    total = sum(p.stat().st_size for p in src.iterdir())
    assert result.bytes_fetched < total - 3 * CHUNK
    assert_same(fastload.load(dest), reference(src))


# -- revisions: a branch that moves, one that does not exist ---------------------------------------------------


def test_pull_of_a_branch_that_moves_mid_pull_stays_on_one_commit(rhub: RealHub, tmp_path: Path) -> None:
    repo = repo_name("movepull")
    old_src = chunky_repo(tmp_path / "old", seed=1)
    new_src = chunky_repo(tmp_path / "new", seed=2)
    old = rhub.add_repo(repo, old_src)
    new = rhub.add_repo(repo, new_src)
    rhub.refs[(repo, "main")] = old
    rhub.refs[(repo, "keep-old")] = old
    rhub.after = lambda c, p: rhub.refs.__setitem__((repo, "main"), new) if p.startswith("/api/") else None
    cached = fastload.pull(f"hf://{repo}", config=cfg())
    assert cached.name == old
    same_files(cached, old_src)
    refs = tmp_path / "hf-cache" / f"models--{repo.replace('/', '--')}" / "refs" / "main"
    assert refs.read_text() == old
    rhub.refs[(repo, "main")] = old
    plain = fastload.pull(f"hf://{repo}", to=tmp_path / "plain", config=cfg())
    same_files(plain, old_src)
    assert not any(new in p for p in rhub.paths())
    assert not any(new in p for _, p, _, _ in rhub.cdn.seen)


def test_a_revision_that_does_not_exist_everywhere(rhub: RealHub, tmp_path: Path) -> None:
    repo = repo_name("norev")
    rhub.add_repo(repo, model_repo(tmp_path / "src"))
    calls = {
        "load": lambda: fastload.load(f"hf://{repo}@no-such-branch", config=cfg()),
        "stream": lambda: drain(fastload.stream(f"hf://{repo}@no-such-branch", config=cfg())),
        "plan": lambda: fastload.plan(f"hf://{repo}@no-such-branch", config=cfg()),
        "pull-cache": lambda: fastload.pull(f"hf://{repo}", revision="no-such-branch", config=cfg()),
        "pull-plain": lambda: fastload.pull(f"hf://{repo}", revision="no-such-branch", to=tmp_path / "p",
                                            config=cfg()),
        "from_pretrained": lambda: fastload.from_pretrained(f"hf://{repo}", revision="no-such-branch", config=cfg()),
        "from_pretrained-commit": lambda: fastload.from_pretrained(f"hf://{repo}", revision="f" * 40, config=cfg()),
    }
    for what, call in calls.items():
        with pytest.raises(fastload.SourceNotFoundError) as info:
            call()
        message = str(info.value)
        assert repo in message and ("no-such-branch" in message or "f" * 40 in message), (what, message)
    cache = tmp_path / "hf-cache" / f"models--{repo.replace('/', '--')}"
    assert not (cache / "refs" / "no-such-branch").exists()
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


# -- an index naming a shard the repository lacks --------------------------------------------------------------


def test_index_naming_a_missing_shard_pull_then_offline_load_names_it(rhub: RealHub, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    repo = repo_name("noshard")
    src = model_repo(tmp_path / "src")
    (src / "model-00002-of-00002.safetensors").unlink()
    rhub.add_repo(repo, src)
    for what, call in {"stream": lambda: drain(fastload.stream(f"hf://{repo}", config=cfg())),
                       "plan": lambda: fastload.plan(f"hf://{repo}", config=cfg()),
                       "from_pretrained": lambda: fastload.from_pretrained(f"hf://{repo}", config=cfg())}.items():
        with pytest.raises(fastload.SourceNotFoundError, match="model-00002-of-00002") as info:
            call()
        assert repo in str(info.value), (what, str(info.value))
    with pytest.raises(fastload.SourceNotFoundError, match="model-00002-of-00002"):  # before writing anything
        fastload.pull(f"hf://{repo}", config=cfg())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # so the cache holds no snapshot of it: offline, that is the error
    for what, call in {"load": lambda: fastload.load(f"hf://{repo}", config=cfg()),
                       "from_pretrained": lambda: fastload.from_pretrained(f"hf://{repo}", config=cfg())}.items():
        with pytest.raises(fastload.SourceNotFoundError, match="not in the Hugging Face cache"):
            call()


def test_token_saved_by_hf_auth_login_is_used_like_huggingface_hub(rhub: RealHub, tmp_path: Path) -> None:
    """``hf auth login`` (``huggingface-cli login``) keeps the token in ``$HF_HOME/token``, where
    huggingface_hub (and so transformers) finds it without HF_TOKEN: a private repository that transformers
    loads for this user must load through hf:// too, and the token still never reaches the CDN."""
    repo = repo_name("login")
    src = chunky_repo(tmp_path / "src")
    rhub.add_repo(repo, src)
    rhub.token = TOKEN
    home = tmp_path / "hf-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "token").write_text(TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    asked = subprocess.run([sys.executable, "-c", "from huggingface_hub import get_token; print(get_token())"],
                           env={**env, "HF_HOME": str(home)}, capture_output=True, text=True, timeout=60)
    assert asked.stdout.strip() == TOKEN, asked.stderr[-500:]  # what huggingface_hub (and transformers) send
    try:
        got = fastload.load(f"hf://{repo}", config=cfg())
    except fastload.FastloadError as exc:
        assert TOKEN not in said(exc)
        raise
    assert_same(got, reference(src))
    with rhub.cdn.lock:
        assert rhub.cdn.seen and not any("authorization" in h for _, _, _, h in rhub.cdn.seen)


def test_token_that_is_not_valid_names_hf_token(rhub: RealHub, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_TOKEN set, a 401 means the token is not valid (expired, revoked, another Hub's): the error
    should point at HF_TOKEN, as it does when no token is set, not be a bare 'access denied'."""
    repo = repo_name("refused")
    rhub.add_repo(repo, chunky_repo(tmp_path / "src"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    rhub.token = "another-token"  # ours is not valid for this Hub: 401 everywhere
    with pytest.raises(fastload.SourcePermissionError) as info:
        fastload.load(f"hf://{repo}", config=cfg())
    assert TOKEN not in said(info.value)
    assert "HF_TOKEN" in str(info.value), str(info.value)


def test_gated_repo_refusing_a_token_relays_the_hubs_reason(rhub: RealHub, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A 403 on a gated repository with a token means the token's user was not granted access; the Hub says so
    (and where to ask for it) in X-Error-Message, which huggingface_hub shows. 'set HF_TOKEN' would be wrong,
    and a bare 'access denied' leaves the user guessing."""
    repo = repo_name("gated403")
    rhub.add_repo(repo, chunky_repo(tmp_path / "src"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    rhub.hook = gate(repo)
    with pytest.raises(fastload.SourcePermissionError) as info:
        fastload.load(f"hf://{repo}", config=cfg())
    assert TOKEN not in said(info.value)
    assert "ask for access" in str(info.value) or "not in the authorized list" in str(info.value), str(info.value)
