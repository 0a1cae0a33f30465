"""Audit: loading from hf://org/name[@revision][/path] (cache-first, revisions, pinning, tokens, errors, listing).

Uses a stand-in Hub (``hub_server.HubServer``) extended here with a few knobs: a path prefix (an
``HF_ENDPOINT`` such as ``http://host/mirror``), per-request hooks (a branch moved mid-load, a lying listing,
a gated repository) and a record of every request's headers.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoints import llama_config, llama_like_tensors, write_sharded, write_single
from hub_server import HF_VARS, HubServer, _HubHandler, repo_name
from safetensors.torch import load_file
from servers.http_range import Reply

import fastload

FAST = fastload.LoadConfig(retry=fastload.RetryConfig(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02,
                                                      deadline_s=5.0))
TOKEN = "hf_auditSecretToken0123456789"


# -- a stand-in Hub with knobs -----------------------------------------------------------------------------


class _AuditHandler(_HubHandler):
    def produce(self, path, headers, body):
        hub: AuditHub = self.server.owner  # type: ignore[assignment]
        with hub.lock:
            hub.seen.append((self.command, path, {n.lower(): v for n, v in headers}))
        if not path.startswith("/lfs/") and hub.prefix:
            if not path.startswith(hub.prefix + "/"):
                return Reply.simple(404)
            path = path[len(hub.prefix):]
        if hub.hook is not None:
            reply = hub.hook(self.command, path, {n.lower(): v for n, v in headers})
            if reply is not None:
                return reply
        reply = super().produce(path, headers, body)
        if hub.after is not None:
            hub.after(self.command, path, reply)
        return reply


class AuditHub(HubServer):
    handler_class = _AuditHandler

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.lock = threading.Lock()
        self.prefix = ""
        self.hook: Callable | None = None
        self.after: Callable | None = None
        self.seen: list[tuple[str, str, dict]] = []

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + self.prefix

    def reset(self) -> None:
        super().reset()
        self.prefix, self.hook, self.after = "", None, None
        with self.lock:
            self.seen.clear()
        self.token = None


@pytest.fixture(scope="session")
def audit_hub_session(tmp_path_factory):
    with AuditHub(tmp_path_factory.mktemp("audit-hub")) as server:
        yield server


@pytest.fixture
def ahub(audit_hub_session: AuditHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AuditHub:
    for name in HF_VARS:
        monkeypatch.delenv(name, raising=False)
    audit_hub_session.reset()
    monkeypatch.setenv("HF_ENDPOINT", audit_hub_session.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield audit_hub_session
    audit_hub_session.reset()


def reference(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name].view(torch.uint8) if got[name].dim() else got[name],
                           tensor.view(torch.uint8) if tensor.dim() else tensor), name


def cache_entry(cache: Path, repo: str, source: Path, commit: str, ref: str | None = "main") -> Path:
    """A hub cache entry laid out as huggingface_hub lays it out: blobs, relative symlinks, refs/<ref>."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = file.relative_to(source)
        data = file.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*([".."] * (len(rel.parts) + 1))) / "blobs" / blob.name)
    if ref is not None:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return snapshot


def other_checkpoint(directory: Path, seed: int = 7, shards: int = 3) -> Path:
    return write_sharded(directory, llama_like_tensors(seed=seed), shards, metadata={"format": "pt"})


def network_paths(hub: AuditHub) -> list[str]:
    return [r.path for r in hub.log]


# -- the cache -------------------------------------------------------------------------------------------


def test_cached_index_file_named_directly_with_a_missing_shard_goes_to_the_network(
        ahub: AuditHub, llama_sharded_checkpoint: Path, tmp_path: Path) -> None:
    """``hf://org/name/model.safetensors.index.json``: the index is in the cache but one of its shards is not.
    The cache does not hold the checkpoint, so the load must stream from the Hub (as it does for the folder)."""
    repo = repo_name("idxfile")
    commit = ahub.add_repo(repo, llama_sharded_checkpoint)
    snapshot = cache_entry(tmp_path / "hf-cache", repo, llama_sharded_checkpoint, commit)
    (snapshot / "model-00002-of-00003.safetensors").unlink()
    got = fastload.load(f"hf://{repo}/model.safetensors.index.json", config=FAST)
    assert_same(got, reference(llama_sharded_checkpoint))


def test_dangling_symlink_in_cache_streams_pinned(ahub: AuditHub, llama_sharded_checkpoint: Path,
                                                  tmp_path: Path) -> None:
    """A shard whose blob was deleted (a dangling symlink) makes the snapshot incomplete: stream, pinned."""
    repo = repo_name("dangling")
    commit = ahub.add_repo(repo, llama_sharded_checkpoint)
    snapshot = cache_entry(tmp_path / "hf-cache", repo, llama_sharded_checkpoint, commit)
    (snapshot / "model-00003-of-00003.safetensors").resolve().unlink()
    assert (snapshot / "model-00003-of-00003.safetensors").is_symlink()
    got = fastload.load(f"hf://{repo}", config=FAST)
    assert_same(got, reference(llama_sharded_checkpoint))
    resolves = [p for p in network_paths(ahub) if "/resolve/" in p]
    assert resolves and all(f"/resolve/{commit}/" in p for p in resolves)


def test_refs_point_at_absent_snapshot(ahub: AuditHub, llama_sharded_checkpoint: Path, tmp_path: Path) -> None:
    """refs/main names a commit with no snapshot folder: stream from the Hub, not an error."""
    repo = repo_name("norefsnap")
    ahub.add_repo(repo, llama_sharded_checkpoint)
    folder = tmp_path / "hf-cache" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("f" * 40)
    assert_same(fastload.load(f"hf://{repo}", config=FAST), reference(llama_sharded_checkpoint))


def test_complete_cache_used_with_offline_false_values(ahub: AuditHub, llama_sharded_checkpoint: Path,
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=0/false is not offline: an uncached repo streams; a cached one makes no request at all."""
    repo = repo_name("offfalse")
    cached = repo_name("offcached")
    commit = ahub.add_repo(repo, llama_sharded_checkpoint)
    cache_entry(tmp_path / "hf-cache", cached, llama_sharded_checkpoint, commit)
    want = reference(llama_sharded_checkpoint)
    for value in ("0", "false", "False", "no", ""):
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
        ahub.reset()
        assert_same(fastload.load(f"hf://{cached}", config=FAST), want)
        assert ahub.log == []
        assert_same(fastload.load(f"hf://{repo}", config=FAST), want)
        assert any("/resolve/" in p for p in network_paths(ahub))


def test_offline_without_cache_makes_no_request(ahub: AuditHub, llama_sharded_checkpoint: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    repo = repo_name("offline")
    ahub.add_repo(repo, llama_sharded_checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for url in (f"hf://{repo}", f"hf://{repo}/model-00001-of-00003.safetensors", f"hf://{repo}@{'a' * 40}/"):
        with pytest.raises(fastload.SourceNotFoundError, match="HF_HUB_OFFLINE"):
            fastload.load(url, config=FAST)
    with pytest.raises(fastload.SourceNotFoundError):
        fastload.plan(f"hf://{repo}", config=FAST)
    assert ahub.log == []


def test_offline_after_pull_of_subfolder_of_plain_safetensors(ahub: AuditHub, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A diffusers-style folder (``unet/diffusion_pytorch_model.safetensors``, no index, no model.safetensors)
    loads online through the listing. After ``fastload pull`` of it (what the offline error tells the user to
    run), the same load with HF_HUB_OFFLINE=1 must read the cache (every *.safetensors in the folder, the
    directory rule), as loading the snapshot folder by path does."""
    repo = repo_name("unet")
    src = tmp_path / "src"
    tensors = llama_like_tensors(seed=3)
    write_single(src / "unet" / "diffusion_pytorch_model.safetensors", tensors)
    (src / "unet" / "config.json").write_text("{}")
    ahub.add_repo(repo, src)
    assert_same(fastload.load(f"hf://{repo}/unet/", config=FAST), tensors)
    path = Path(fastload.pull(f"hf://{repo}/unet/", config=FAST))
    folder = path if path.name == "unet" else path / "unet"
    assert_same(fastload.load(folder), tensors)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ahub.reset()
    assert_same(fastload.load(f"hf://{repo}/unet/", config=FAST), tensors)
    assert ahub.log == []


# -- revisions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("revision", ["feature/x", "v1.0", "refs/pr/1"])
def test_named_revisions_stream_pinned(ahub: AuditHub, llama_sharded_checkpoint: Path, tmp_path: Path,
                                       revision: str) -> None:
    """A branch holding '/', a tag and refs/pr/N, percent-encoded in the URL: the listing is asked for that
    revision and every read is pinned to the commit it names; main (other weights) is never read."""
    repo = repo_name("rev")
    ahub.add_repo(repo, other_checkpoint(tmp_path / "main-weights"))  # main: different weights
    commit = ahub.add_repo(repo, llama_sharded_checkpoint, revision=revision)
    encoded = revision.replace("/", "%2F")
    got = fastload.load(f"hf://{repo}@{encoded}", config=FAST)
    assert_same(got, reference(llama_sharded_checkpoint))
    paths = network_paths(ahub)
    assert f"/api/models/{repo}/revision/{revision}" in paths
    resolves = [p for p in paths if "/resolve/" in p]
    assert resolves and all(f"/resolve/{commit}/" in p for p in resolves)
    plan = fastload.plan(f"hf://{repo}@{encoded}/", config=FAST)
    assert all(f.info.url.startswith(f"hf://{repo}@{commit}/") for f in plan.files)


@pytest.mark.parametrize("revision", ["feature/x", "refs/pr/1"])
def test_named_revision_with_slash_from_cache(ahub: AuditHub, llama_sharded_checkpoint: Path, tmp_path: Path,
                                              revision: str) -> None:
    """huggingface_hub stores refs/<revision> (refs/refs/pr/1, refs/feature/x): a complete snapshot there is
    used without the network."""
    repo = repo_name("revcache")
    commit = "1234567890abcdef1234567890abcdef12345678"
    cache_entry(tmp_path / "hf-cache", repo, llama_sharded_checkpoint, commit, ref=revision)
    got = fastload.load(f"hf://{repo}@{revision.replace('/', '%2F')}", config=FAST)
    assert_same(got, reference(llama_sharded_checkpoint))
    assert ahub.log == []


def test_commit_revision_needs_no_listing(ahub: AuditHub, llama_sharded_checkpoint: Path) -> None:
    repo = repo_name("commit")
    commit = ahub.add_repo(repo, llama_sharded_checkpoint)
    assert_same(fastload.load(f"hf://{repo}@{commit}", config=FAST), reference(llama_sharded_checkpoint))
    assert not any(p.startswith("/api/") for p in network_paths(ahub))


def test_branch_moved_after_listing_never_mixes_commits(ahub: AuditHub, llama_sharded_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    """main moves to another commit right after the listing answered: every read stays on the listed commit."""
    repo = repo_name("moved")
    old = ahub.add_repo(repo, llama_sharded_checkpoint)
    new_dir = other_checkpoint(tmp_path / "new")
    new = ahub.add_repo(repo, new_dir)
    ahub.refs[(repo, "main")] = old
    ahub.refs[(repo, "v-old")] = old  # the old commit stays on the Hub (the stand-in forgets unreferenced ones)

    def move(command, path, reply):
        if path.startswith("/api/"):
            ahub.refs[(repo, "main")] = new

    ahub.after = move
    got = fastload.load(f"hf://{repo}", config=FAST)
    assert_same(got, reference(llama_sharded_checkpoint))
    resolves = [p for p in network_paths(ahub) if "/resolve/" in p or p.startswith("/lfs/")]
    assert resolves and all(old in p for p in resolves) and not any(new in p for p in resolves)


def test_stream_hf_bit_exact_and_pinned(ahub: AuditHub, llama_sharded_checkpoint: Path, tmp_path: Path) -> None:
    repo = repo_name("stream")
    old = ahub.add_repo(repo, llama_sharded_checkpoint)
    new = ahub.add_repo(repo, other_checkpoint(tmp_path / "new"))
    ahub.refs[(repo, "main")] = old
    ahub.refs[(repo, "v-old")] = old
    ahub.after = lambda c, p, r: ahub.refs.__setitem__((repo, "main"), new) if p.startswith("/api/") else None
    got = {}
    with fastload.stream(f"hf://{repo}", config=FAST) as s:
        for name, tensor in s:
            got[name] = tensor
    assert_same(got, reference(llama_sharded_checkpoint))
    assert not any(new in p for p in network_paths(ahub))


# -- tokens, permissions, missing things ----------------------------------------------------------------


def _everything_said(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(exc)) + repr(exc.args)


def test_token_not_sent_to_cdn_and_not_in_errors(ahub: AuditHub, llama_sharded_checkpoint: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_TOKEN reaches the Hub (API and resolve) but no CDN request carries it in any header; errors (CDN
    refusing, file missing) say nothing of it."""
    repo = repo_name("tok")
    ahub.add_repo(repo, llama_sharded_checkpoint)
    ahub.token = TOKEN
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    trace = fastload.Trace()
    assert_same(fastload.load(f"hf://{repo}", config=FAST, trace=trace), reference(llama_sharded_checkpoint))
    hub_side = [h for _, p, h in ahub.seen if not p.startswith("/lfs/")]
    cdn_side = [h for _, p, h in ahub.seen if p.startswith("/lfs/")]
    assert hub_side and all(h.get("authorization") == f"Bearer {TOKEN}" for h in hub_side)
    assert cdn_side and not any(TOKEN in json.dumps(h) for h in cdn_side)
    assert TOKEN not in json.dumps(trace.to_dict(), default=str)
    ahub.faults.fail_first(100, status=500, path="/lfs/*")
    with pytest.raises(fastload.FastloadError) as info:
        fastload.load(f"hf://{repo}", config=FAST)
    assert TOKEN not in _everything_said(info.value)
    ahub.faults.clear()
    with pytest.raises(fastload.SourceNotFoundError) as info:
        fastload.load(f"hf://{repo}/nope.safetensors", config=FAST)
    assert TOKEN not in _everything_said(info.value)


def test_signed_cdn_url_not_in_trace_or_errors(ahub: AuditHub, llama_sharded_checkpoint: Path) -> None:
    """The Hub's CDN URLs are presigned (the signature in the query string is a credential for an hour): it
    must not appear in the trace nor in any error when the CDN fails."""
    repo = repo_name("sig")
    ahub.add_repo(repo, llama_sharded_checkpoint)
    secret = "SIGSECRET0123456789abcdef"

    def sign(command, path, reply):
        reply.headers = [(n, f"{v}?X-Amz-Signature={secret}&Expires=9999999999" if n == "Location" else v)
                         for n, v in reply.headers]

    ahub.after = sign
    trace = fastload.Trace()
    assert_same(fastload.load(f"hf://{repo}", config=FAST, trace=trace), reference(llama_sharded_checkpoint))
    assert any(r.path.startswith("/lfs/") for r in ahub.log)
    assert secret not in json.dumps(trace.to_dict(), default=str)
    for status in (500, 403, 404):
        ahub.faults.clear()
        ahub.faults.fail_first(1000, status=status, path="/lfs/*")
        trace = fastload.Trace()
        with pytest.raises(fastload.FastloadError) as info:
            fastload.load(f"hf://{repo}", config=FAST, trace=trace)
        said = _everything_said(info.value) + json.dumps(trace.to_dict(), default=str)
        assert secret not in said, status
        assert repo in str(info.value), status


@pytest.mark.parametrize("value", [f"{TOKEN}\n", f" {TOKEN} "])
def test_token_with_stray_whitespace_is_cleaned_like_huggingface_hub(
        ahub: AuditHub, llama_sharded_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """huggingface_hub strips whitespace and newlines from HF_TOKEN (``_clean_token``); a token read from a
    file with its trailing newline must work, and must never show up in an error."""
    repo = repo_name("tokws")
    ahub.add_repo(repo, llama_sharded_checkpoint)
    ahub.token = TOKEN
    monkeypatch.setenv("HF_TOKEN", value)
    try:
        got = fastload.load(f"hf://{repo}", config=FAST)
    except Exception as exc:
        assert isinstance(exc, fastload.FastloadError), f"{type(exc).__name__}: {exc}"
        assert TOKEN not in _everything_said(exc)
        raise
    assert_same(got, reference(llama_sharded_checkpoint))


def test_gated_repo_refuses_reads_names_the_repo(ahub: AuditHub, llama_sharded_checkpoint: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A gated repository: its listing is public, its files answer 401 (no token) or 403 (a token without
    access). SourcePermissionError naming the repository; the HF_TOKEN hint when no token is set."""
    repo = repo_name("gated")
    ahub.add_repo(repo, llama_sharded_checkpoint)

    def gate(command, path, headers):
        if "/resolve/" in path:
            return Reply.simple(403 if "authorization" in headers else 401,
                                [("X-Error-Code", "GatedRepo")])
        return None

    ahub.hook = gate
    with pytest.raises(fastload.SourcePermissionError, match="HF_TOKEN") as info:
        fastload.load(f"hf://{repo}", config=FAST)
    assert repo in str(info.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(fastload.SourcePermissionError) as info:
        fastload.load(f"hf://{repo}", config=FAST)
    assert repo in str(info.value) and TOKEN not in _everything_said(info.value)
    assert not any(r.path.startswith("/lfs/") for r in ahub.log)


def test_missing_repo_file_and_revision_are_typed(ahub: AuditHub, llama_sharded_checkpoint: Path) -> None:
    repo = repo_name("missing")
    commit = ahub.add_repo(repo, llama_sharded_checkpoint)
    with pytest.raises(fastload.SourceNotFoundError, match="nope"):
        fastload.plan(f"hf://{repo}@nope", config=FAST)
    with pytest.raises(fastload.SourceNotFoundError, match="absent.safetensors"):
        fastload.load(f"hf://{repo}@{commit}/absent.safetensors", config=FAST)
    with pytest.raises(fastload.SourceNotFoundError):
        fastload.load(f"hf://{repo}/empty-folder/", config=FAST)


def test_index_naming_a_shard_missing_from_the_repo(ahub: AuditHub, llama_sharded_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    repo = repo_name("noshard")
    src = tmp_path / "src"
    shutil.copytree(llama_sharded_checkpoint, src)
    (src / "model-00002-of-00003.safetensors").unlink()
    ahub.add_repo(repo, src)
    with pytest.raises(fastload.SourceNotFoundError, match="model-00002-of-00003"):
        fastload.load(f"hf://{repo}", config=FAST)


# -- paths, endpoints --------------------------------------------------------------------------------------


def test_subfolder_loads_its_own_checkpoint(ahub: AuditHub, llama_sharded_checkpoint: Path, tmp_path: Path) -> None:
    repo = repo_name("sub")
    src = tmp_path / "src"
    root = llama_like_tensors(seed=11)
    write_single(src / "model.safetensors", root)
    shutil.copytree(llama_sharded_checkpoint, src / "unet")
    ahub.add_repo(repo, src)
    assert_same(fastload.load(f"hf://{repo}/unet/", config=FAST), reference(llama_sharded_checkpoint))
    assert_same(fastload.load(f"hf://{repo}", config=FAST), root)
    assert_same(fastload.load(f"hf://{repo}/unet/model-00001-of-00003.safetensors", config=FAST),
                load_file(llama_sharded_checkpoint / "model-00001-of-00003.safetensors"))


def test_endpoint_with_path_prefix(ahub: AuditHub, llama_sharded_checkpoint: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_ENDPOINT=http://host/mirror: the API and resolve requests go under /mirror."""
    repo = repo_name("mirror")
    commit = ahub.add_repo(repo, llama_sharded_checkpoint)
    ahub.prefix = "/mirror"
    monkeypatch.setenv("HF_ENDPOINT", ahub.endpoint + "/")
    assert_same(fastload.load(f"hf://{repo}", config=FAST), reference(llama_sharded_checkpoint))
    hub_paths = [p for p in network_paths(ahub) if not p.startswith("/lfs/")]
    assert hub_paths and all(p.startswith("/mirror/") for p in hub_paths)
    assert f"/mirror/api/models/{repo}/revision/main" in hub_paths
    assert any(p.startswith(f"/mirror/{repo}/resolve/{commit}/") for p in hub_paths)


# -- X-Linked-* headers -------------------------------------------------------------------------------------


def _lying_cdn(ahub: AuditHub, name: str, data: bytes) -> None:
    """The CDN serves ``data`` for ``name`` instead of what the Hub published (sha256 and size)."""
    root = ahub.root / "repos"
    for file in root.rglob(name):
        file.write_bytes(data)


def test_cdn_bytes_not_matching_x_linked_etag_fail_verification(ahub: AuditHub, tmp_path: Path) -> None:
    repo = repo_name("linked")
    src = tmp_path / "src"
    tensors = llama_like_tensors(seed=5)
    write_single(src / "model.safetensors", tensors)
    ahub.add_repo(repo, src)
    swapped = {k: (v + 1 if v.is_floating_point() else v) for k, v in tensors.items()}
    write_single(tmp_path / "other.safetensors", swapped)
    _lying_cdn(ahub, "model.safetensors", (tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(fastload.IntegrityError):
        fastload.load(f"hf://{repo}", config=FAST.replace(verify_checksums=True))


def test_cdn_size_not_matching_x_linked_size(ahub: AuditHub, tmp_path: Path) -> None:
    """The Hub publishes the LFS file's size (X-Linked-Size, the listing's lfs.size); a CDN object of another
    size is not the file the commit holds (huggingface_hub: 'Consistency check failed'): no tensors from it."""
    repo = repo_name("linksize")
    src = tmp_path / "src"
    tensors = llama_like_tensors(seed=5)
    write_single(src / "model.safetensors", tensors)
    ahub.add_repo(repo, src)
    smaller = {k: v for k, v in list(tensors.items())[:-1]}
    write_single(tmp_path / "other.safetensors", smaller)
    _lying_cdn(ahub, "model.safetensors", (tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(fastload.FastloadError):
        fastload.load(f"hf://{repo}", config=FAST)


# -- the listing ---------------------------------------------------------------------------------------------


def _listing(ahub: AuditHub, body: bytes) -> None:
    def hook(command, path, headers):
        if path.startswith("/api/"):
            return Reply(200, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))], [body])
        return None

    ahub.hook = hook


@pytest.mark.parametrize("body", [
    b"not json",
    b"\xff\xfe{}",
    b"[]",
    b'{"sha": 5}',
    b'{"sha": "' + b"a" * 40 + b'", "siblings": 5}',
    b'{"sha": "' + b"a" * 40 + b'", "siblings": true}',
    b'{"sha": "' + b"a" * 40 + b'", "siblings": [{"rfilename": 3}]}',
    b"[" * 5_000 + b"]" * 5_000,
    b'{"sha": "' + b"a" * 40 + b'", "siblings": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
], ids=["text", "binary", "list", "sha-int", "siblings-int", "siblings-bool", "rfilename-int", "deep",
        "deep-siblings"])
def test_malformed_listing_is_a_format_error(ahub: AuditHub, body: bytes) -> None:
    """The listing is only needed for the commit here (the folder has no index nor model.safetensors, so
    it is also read for the file list): whatever garbage it holds is a FormatError, not a crash."""
    repo = repo_name("badlist")
    _listing(ahub, body)
    with pytest.raises(fastload.FormatError):
        fastload.load(f"hf://{repo}", config=FAST)


def test_huge_listing_is_refused(ahub: AuditHub) -> None:
    repo = repo_name("hugelist")
    size = (64 << 20) + 4096
    head = b'{"sha": "' + b"a" * 40 + b'", "pad": "'
    tail = b'"}'

    def body():
        yield head
        chunk = b"x" * (1 << 20)
        left = size - len(head) - len(tail)
        while left > 0:
            yield chunk[:left]
            left -= len(chunk)
        yield tail

    def hook(command, path, headers):
        if path.startswith("/api/"):
            return Reply(200, [("Content-Type", "application/json"), ("Content-Length", str(size))], body())
        return None

    ahub.hook = hook
    with pytest.raises(fastload.FormatError):
        fastload.load(f"hf://{repo}", config=FAST)


def test_listing_arriving_in_pieces_is_read_whole(ahub: AuditHub, llama_sharded_checkpoint: Path) -> None:
    """The Hub's JSON listing arrives in several TCP segments (a large repository's listing is hundreds of KB):
    the whole body must be read, not the first segment that happened to be buffered."""
    import time

    repo = repo_name("slowlist")
    commit = ahub.add_repo(repo, llama_sharded_checkpoint)

    def split(command, path, reply):
        if path.startswith("/api/") and reply.status == 200:
            data = b"".join(reply.body)

            def pieces():
                yield data[:20]
                time.sleep(0.3)
                yield data[20:]

            reply.body = pieces()

    ahub.after = split
    assert_same(fastload.load(f"hf://{repo}", config=FAST), reference(llama_sharded_checkpoint))
    assert any(f"/resolve/{commit}/" in p for p in network_paths(ahub))


def test_listing_files_of_a_folder_without_index(ahub: AuditHub, tmp_path: Path) -> None:
    """No index, no model.safetensors: every *.safetensors directly in the folder (not in sub-folders), read
    at the listed commit."""
    repo = repo_name("plain")
    src = tmp_path / "src"
    a, b, deep = llama_like_tensors(seed=1, layers=1), {"x": torch.arange(10)}, {"y": torch.ones(3)}
    write_single(src / "a.safetensors", a)
    write_single(src / "b weights#1.safetensors", b)
    write_single(src / "sub" / "c.safetensors", deep)
    commit = ahub.add_repo(repo, src)
    got = fastload.load(f"hf://{repo}", config=FAST)
    assert_same(got, {**a, **b})
    plan = fastload.plan(f"hf://{repo}", config=FAST)
    assert all(f.info.url.startswith(f"hf://{repo}@{commit}/") for f in plan.files)


# -- from_pretrained ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("audit-llama")
    write_sharded(directory, llama_like_tensors(seed=4), 2, metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(llama_config()))
    return directory


def _assert_state_equal(ours, theirs) -> None:
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def test_from_pretrained_hf_pr_revision_subfolder_bit_exact(ahub: AuditHub, llama_model_dir: Path,
                                                            tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    repo = repo_name("fp")
    src = tmp_path / "src"
    shutil.copytree(llama_model_dir, src / "text")
    ahub.add_repo(repo, other_checkpoint(tmp_path / "main-weights"))  # main: something else
    ahub.add_repo(repo, src, revision="refs/pr/1")
    theirs = transformers.LlamaForCausalLM.from_pretrained(llama_model_dir)
    ours = fastload.from_pretrained(f"hf://{repo}", revision="refs/pr/1", subfolder="text", config=FAST)
    _assert_state_equal(ours, theirs)
    ours = fastload.from_pretrained(f"hf://{repo}@refs%2Fpr%2F1/text/", config=FAST)
    _assert_state_equal(ours, theirs)


def test_from_pretrained_branch_moved_mid_load(ahub: AuditHub, llama_model_dir: Path, tmp_path: Path) -> None:
    """Config and weights come from one commit even when main moves after the first listing."""
    transformers = pytest.importorskip("transformers")
    repo = repo_name("fpmove")
    old = ahub.add_repo(repo, llama_model_dir)
    other = tmp_path / "other"
    write_sharded(other, llama_like_tensors(seed=9, layers=3), 3, metadata={"format": "pt"})
    (other / "config.json").write_text(json.dumps(llama_config(layers=3)))
    new = ahub.add_repo(repo, other)
    ahub.refs[(repo, "main")] = old
    ahub.refs[(repo, "v-old")] = old
    ahub.after = lambda c, p, r: ahub.refs.__setitem__((repo, "main"), new) if p.startswith("/api/") else None
    ours = fastload.from_pretrained(f"hf://{repo}", config=FAST)
    _assert_state_equal(ours, transformers.LlamaForCausalLM.from_pretrained(llama_model_dir))
    assert not any(new in p for p in network_paths(ahub))


def test_from_pretrained_cache_with_weights_but_no_config(ahub: AuditHub, llama_model_dir: Path,
                                                          tmp_path: Path) -> None:
    """The cache holds the weights (hf_hub_download of the safetensors files only) but not config.json: the
    model directory is not complete there, so from_pretrained must fetch config.json from the Hub (as
    transformers would), not fail with 'no config.json'."""
    transformers = pytest.importorskip("transformers")
    repo = repo_name("fpnocfg")
    commit = ahub.add_repo(repo, llama_model_dir)
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    for f in llama_model_dir.iterdir():
        if f.name != "config.json":
            shutil.copyfile(f, weights_only / f.name)
    cache_entry(tmp_path / "hf-cache", repo, weights_only, commit)
    ours = fastload.from_pretrained(f"hf://{repo}", config=FAST)
    _assert_state_equal(ours, transformers.LlamaForCausalLM.from_pretrained(llama_model_dir))


def test_from_pretrained_complete_cache_no_network(ahub: AuditHub, llama_model_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    repo = repo_name("fpcache")
    cache_entry(tmp_path / "hf-cache", repo, llama_model_dir, "c" * 40)
    ours = fastload.from_pretrained(f"hf://{repo}", config=FAST)
    _assert_state_equal(ours, transformers.LlamaForCausalLM.from_pretrained(llama_model_dir))
    assert ahub.log == []
