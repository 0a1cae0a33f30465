"""hf:// sources: URL parsing, HF_* settings, streaming from a (stand-in) Hub, and the local hub cache."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fastload
from fastload.sources.hub_refs import HubRef, HubSettings, cached_snapshot, parse_hub_url
from hub_server import HubServer, hub, hub_session, minilm_dir, repo_name  # noqa: F401 -- fixtures
from servers.faults import FailWith

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def reference(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(sorted(got)) == list(sorted(want))
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


# -- parsing and settings --------------------------------------------------------------------------


@pytest.mark.parametrize("url, ref", [
    ("hf://org/name", HubRef("org/name", None, "")),
    ("hf://org/name@v1.0", HubRef("org/name", "v1.0", "")),
    (f"hf://org/name@{COMMIT}/sub/model.safetensors", HubRef("org/name", COMMIT, "sub/model.safetensors")),
    ("hf://org/name@refs%2Fpr%2F3/", HubRef("org/name", "refs/pr/3", "")),
    ("hf://models/org/Name-1.5B/onnx/", HubRef("org/Name-1.5B", None, "onnx/")),
])
def test_parse_hub_url(url: str, ref: HubRef) -> None:
    assert parse_hub_url(url) == ref


@pytest.mark.parametrize("url", ["hf://name", "hf://org/..", "hf://org/na me", "hf://org/name/../x", "hf:///name",
                                 "hf://org/name//x"])
def test_parse_hub_url_rejects(url: str) -> None:
    with pytest.raises(fastload.ConfigError):
        parse_hub_url(url)


def test_settings_follow_hf_conventions(tmp_path: Path) -> None:
    s = HubSettings.from_env({"HF_HOME": str(tmp_path / "home"), "HF_ENDPOINT": "http://hub.test/",
                              "HF_TOKEN": "tok", "HF_HUB_OFFLINE": "1"})
    assert s == HubSettings(tmp_path / "home" / "hub", "http://hub.test", "tok", True)
    s = HubSettings.from_env({"HF_HOME": "/x", "HF_HUB_CACHE": str(tmp_path), "TRANSFORMERS_OFFLINE": "yes"})
    assert (s.cache_dir, s.offline, s.endpoint, s.token) == (tmp_path, True, "https://huggingface.co", None)
    assert HubSettings.from_env({"HF_HUB_OFFLINE": "0", "XDG_CACHE_HOME": "/c"}).cache_dir == Path(
        "/c/huggingface/hub")
    with pytest.raises(fastload.ConfigError, match="HF_ENDPOINT"):
        HubSettings.from_env({"HF_ENDPOINT": "ftp://x"})


# -- streaming from the Hub ------------------------------------------------------------------------


def test_load_streams_real_model_from_hub(hub: HubServer, minilm_dir: Path) -> None:
    repo = repo_name("minilm")
    commit = hub.add_repo(repo, minilm_dir)
    got = fastload.load(f"hf://{repo}")
    assert_same(got, reference(minilm_dir))
    paths = [r.path for r in hub.log]
    assert paths[0] == f"/api/models/{repo}/revision/main"  # one listing call gives the commit
    assert all(f"/resolve/{commit}/" in p for p in paths if "/resolve/" in p)  # every file pinned to it
    data = [r for r in hub.log if r.range and r.range != "bytes=0-7"]  # all but the size probes
    assert data and all(r.path.startswith("/lfs/") for r in data)  # chunks go straight to the "CDN"
    # one HEAD per weight file; none for the absent index: the listing already said it is not there
    assert [p for p in paths if "/resolve/" in p] == [f"/{repo}/resolve/{commit}/model.safetensors"]
    assert paths.count(f"/api/models/{repo}/revision/main") == 1 and not [p for p in paths if commit in p and
                                                                          p.startswith("/api/")]


def test_sharded_checkpoint_at_branch_and_commit(hub: HubServer, llama_sharded_checkpoint: Path) -> None:
    repo = repo_name("llama")
    commit = hub.add_repo(repo, llama_sharded_checkpoint, revision="v2")
    want = reference(llama_sharded_checkpoint)
    assert_same(fastload.load(f"hf://{repo}@v2"), want)
    assert_same(fastload.load(f"hf://{repo}@{commit}/"), want)
    plan = fastload.plan(f"hf://{repo}@v2")
    assert len(plan.files) == 3 and all(f.info.url.startswith(f"hf://{repo}@{commit}/model-") for f in plan.files)
    with pytest.raises(fastload.SourceNotFoundError, match="no such repository or revision"):
        fastload.load(f"hf://{repo}@main")


def test_token_goes_to_the_hub_only(hub: HubServer, minilm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = repo_name("private")
    hub.add_repo(repo, minilm_dir)
    hub.token = "s3cret"
    with pytest.raises(fastload.SourcePermissionError, match="set HF_TOKEN"):
        fastload.plan(f"hf://{repo}")
    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(fastload.SourcePermissionError):
        fastload.plan(f"hf://{repo}")
    monkeypatch.setenv("HF_TOKEN", "s3cret")
    hub.reset()
    assert_same(fastload.load(f"hf://{repo}"), reference(minilm_dir))
    hub_side = [auth for path, auth in hub.auth_seen if not path.startswith("/lfs/")]
    cdn_side = [auth for path, auth in hub.auth_seen if path.startswith("/lfs/")]
    assert hub_side and all(hub_side)
    assert cdn_side and not any(cdn_side)  # the token never reaches another origin


def test_missing_repo_and_file(hub: HubServer, minilm_dir: Path) -> None:
    with pytest.raises(fastload.SourceNotFoundError):
        fastload.load(f"hf://{repo_name('absent')}")
    repo = repo_name("m")
    hub.add_repo(repo, minilm_dir)
    with pytest.raises(fastload.SourceNotFoundError):
        fastload.load(f"hf://{repo}/nope.safetensors")


# -- the local cache -------------------------------------------------------------------------------


def fake_cache(cache: Path, repo: str, source: Path, commit: str = COMMIT, ref: str = "main") -> Path:
    """A hub cache entry laid out as huggingface_hub lays it out (blobs + relative symlinks + refs)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (folder / "blobs").mkdir()
    for file in source.iterdir():
        if file.is_file():
            blob = folder / "blobs" / f"blob-{file.name}"
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    (folder / "refs").mkdir()
    (folder / "refs" / ref).write_text(commit)
    return snapshot


def test_cached_checkpoint_needs_no_network(hub: HubServer, llama_sharded_checkpoint: Path,
                                            monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    repo = repo_name("cached")
    snapshot = fake_cache(tmp_path / "hf-cache", repo, llama_sharded_checkpoint)
    want = reference(llama_sharded_checkpoint)
    assert cached_snapshot(tmp_path / "hf-cache", parse_hub_url(f"hf://{repo}")) == snapshot
    assert_same(fastload.load(f"hf://{repo}"), want)
    assert_same(fastload.load(f"hf://{repo}@{COMMIT}"), want)
    assert hub.log == []  # the repository is not even on the Hub: everything came from the cache
    assert fastload.plan(f"hf://{repo}").files[0].info.url.startswith(str(snapshot))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_same(fastload.load(f"hf://{repo}"), want)
    with pytest.raises(fastload.SourceNotFoundError, match="HF_HUB_OFFLINE"):
        fastload.load(f"hf://{repo}@other-branch")


def test_incomplete_cache_streams(hub: HubServer, llama_sharded_checkpoint: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    repo = repo_name("partial")
    commit = hub.add_repo(repo, llama_sharded_checkpoint)
    snapshot = fake_cache(tmp_path / "hf-cache", repo, llama_sharded_checkpoint, commit=commit)
    (snapshot / "model-00002-of-00003.safetensors").unlink()  # one shard missing
    assert cached_snapshot(tmp_path / "hf-cache", parse_hub_url(f"hf://{repo}")) is None
    assert_same(fastload.load(f"hf://{repo}"), reference(llama_sharded_checkpoint))
    assert any(r.path.startswith("/lfs/") for r in hub.log)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(fastload.SourceNotFoundError, match="fastload pull"):
        fastload.load(f"hf://{repo}")


def test_lfs_files_carry_their_sha256(hub: HubServer, llama_sharded_checkpoint: Path) -> None:
    import hashlib

    repo = repo_name("sums")
    hub.add_repo(repo, llama_sharded_checkpoint)
    plan = fastload.plan(f"hf://{repo}")
    for f in plan.files:
        data = (llama_sharded_checkpoint / f.info.url.rsplit("/", 1)[-1]).read_bytes()
        assert f.info.checksum == "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(eq=False)
class RefuseAfter(FailWith):
    """Answer ``status`` once the first ``after`` matching GETs went through (a signed URL that expired)."""

    after: int = 2

    def wants_to_fire(self) -> bool:
        return self.seen > self.after


def test_an_expired_cdn_url_is_resolved_again(hub: HubServer, minilm_dir: Path) -> None:
    """The Hub's CDN URLs are signed and expire (about an hour): a load that outlives one asks the Hub
    where the file is again, once, instead of failing with 403."""
    repo = repo_name("expiry")
    hub.add_repo(repo, minilm_dir)
    rule = hub.faults._add(RefuseAfter(pattern="/lfs/*", times=1, status=403, after=2))  # the probe, the header
    got = fastload.load(f"hf://{repo}")
    assert_same(got, reference(minilm_dir))
    assert rule.fired == 1
    assert len([r for r in hub.log if "/resolve/" in r.path and r.path.endswith("/model.safetensors")]) == 2
    hub.faults._add(RefuseAfter(pattern="/lfs/*", status=403, after=0))  # a CDN that refuses every time
    with pytest.raises(fastload.SourcePermissionError, match=repo):
        fastload.load(f"hf://{repo}")
