"""``fastload pull`` / hf:// sources: corners tests/test_pull.py and tests/test_hub.py do not cover.

Real servers only (the stand-in Hub, the Range HTTP server with faults); nothing inside fastload is mocked.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

import fastload
from fastload import LoadConfig, RetryConfig
from fastload.cli import main
from fastload.pull import apull
from fastload.runner import run
from hub_server import HubServer, hub, hub_session, minilm_dir, repo_name  # noqa: F401 -- fixtures
from servers import RangeHTTPServer
from servers.faults import CutAfter

SMALL = LoadConfig(chunk_bytes=256 << 10, max_concurrency=4)
ONE = SMALL.replace(max_concurrency=1)


def pull_result(source, **kwargs):
    return run(lambda: apull(source, **{"config": SMALL, **kwargs}))


def cache_folder(tmp_path: Path, repo: str) -> Path:
    return tmp_path / "hf-cache" / ("models--" + repo.replace("/", "--"))


def make_src(tmp_path: Path, files: dict[str, bytes]) -> Path:
    src = tmp_path / "src"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return src


def served_random_file(http_server: RangeHTTPServer, http_dir: Path, tmp_path: Path) -> tuple[bytes, str, Path]:
    """1 MiB of random bytes served as model.safetensors: its bytes, its URL, a destination to pull into."""
    path = http_dir / "model.safetensors"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    return data, http_server.url_for(path), tmp_path / "out"


def weights(n: int = 1 << 20, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32)


# -- hub cache layout: blobs shared by several paths ----------------------------------------------


def test_hub_repo_with_identical_files_in_two_places(hub: HubServer, tmp_path: Path) -> None:
    """Real repos often hold the same file twice (config.json at the root and in onnx/, tokenizer copies):
    both paths name the same blob, and so the same temporary file."""
    config = b'{"model_type": "bert", "hidden_size": 8}\n'
    src = make_src(tmp_path, {"model.safetensors": weights(), "config.json": config, "onnx/config.json": config})
    repo = repo_name("dup")
    commit = hub.add_repo(repo, src)
    path = pull_result(f"hf://{repo}").path
    assert path == cache_folder(tmp_path, repo) / "snapshots" / commit
    assert (path / "config.json").read_bytes() == config
    assert (path / "onnx" / "config.json").read_bytes() == config


def test_hub_repo_with_identical_weights_in_two_places(hub: HubServer, tmp_path: Path) -> None:
    """Same for an LFS file that is larger than one chunk (e.g. a checkpoint copied into a subfolder)."""
    data = weights(1 << 20)
    src = make_src(tmp_path, {"model.safetensors": data, "copy/model.safetensors": data})
    repo = repo_name("dupw")
    hub.add_repo(repo, src)
    path = pull_result(f"hf://{repo}", config=ONE).path
    assert (path / "model.safetensors").read_bytes() == data
    assert (path / "copy" / "model.safetensors").read_bytes() == data


# -- empty files ----------------------------------------------------------------------------------


def test_empty_file_in_subfolder_local_to_plain_dir(tmp_path: Path) -> None:
    src = make_src(tmp_path, {"model.safetensors": weights(64 << 10), "sub/empty.txt": b""})
    out = tmp_path / "out"
    result = pull_result(str(src), to=out)
    assert (out / "sub" / "empty.txt").read_bytes() == b""
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert "sub/empty.txt" in result.fetched


def test_empty_file_alone_from_hub(hub: HubServer, tmp_path: Path) -> None:
    """A single empty file from a fresh cache (no blobs/ folder yet)."""
    src = make_src(tmp_path, {"model.safetensors": weights(64 << 10), "empty.txt": b""})
    repo = repo_name("empty")
    hub.add_repo(repo, src)
    path = pull_result(f"hf://{repo}/empty.txt").path
    assert path.read_bytes() == b""
    assert os.readlink(path) == "../../blobs/" + hashlib.sha1(b"blob 0\0").hexdigest()


def test_empty_file_in_hub_repo_into_cache(hub: HubServer, tmp_path: Path) -> None:
    src = make_src(tmp_path, {"model.safetensors": weights(64 << 10), "sub/empty.txt": b""})
    repo = repo_name("empty2")
    hub.add_repo(repo, src)
    path = pull_result(f"hf://{repo}").path
    assert (path / "sub" / "empty.txt").read_bytes() == b""


# -- revisions: refs/ must stay inside the repository's cache folder --------------------------------


@pytest.mark.parametrize("revision", ["../../../escaped", "ABSOLUTE"])
def test_revision_cannot_write_outside_the_cache(hub: HubServer, tmp_path: Path, revision: str) -> None:
    """A git ref name never holds '..' or starts with '/'; a revision that does (a typo, or a hostile endpoint
    that answers for it) must not make pull write ``refs/<revision>`` outside the cache."""
    if revision == "ABSOLUTE":
        revision = str(tmp_path / "outside" / "escaped")
    (tmp_path / "outside").mkdir()
    src = make_src(tmp_path, {"model.safetensors": weights(64 << 10)})
    repo = repo_name("rev")
    commit = hub.add_repo(repo, src)
    hub.refs[(repo, revision)] = commit  # the endpoint answers for that name
    with pytest.raises(fastload.ConfigError, match="not a revision name"):
        pull_result(f"hf://{repo}", revision=revision)
    escaped = [p for p in (tmp_path / "escaped", tmp_path / "outside" / "escaped") if p.exists()]
    assert escaped == [], f"pull wrote {escaped} outside the cache"


def test_revisions_branch_tag_pr_and_commit_are_found_by_huggingface_hub(hub: HubServer, tmp_path: Path) -> None:
    """Pulls of several revisions into one cache: each refs/<rev> names its commit, old snapshots stay, blobs
    are shared, and huggingface_hub resolves every revision offline."""
    from huggingface_hub import snapshot_download

    cache = tmp_path / "hf-cache"
    a = make_src(tmp_path / "a", {"model.safetensors": weights(64 << 10, 1), "config.json": b'{"v": 1}'})
    b = make_src(tmp_path / "b", {"model.safetensors": weights(64 << 10, 1), "config.json": b'{"v": 2}'})
    repo = repo_name("revs")
    c1 = hub.add_repo(repo, a)
    hub.refs[(repo, "v1.0")] = c1  # a tag
    p1 = pull_result(f"hf://{repo}").path
    p1t = pull_result(f"hf://{repo}", revision="v1.0").path
    c2 = hub.add_repo(repo, b)  # main moves
    hub.refs[(repo, "refs/pr/1")] = c2
    p2 = pull_result(f"hf://{repo}").path
    p2pr = pull_result(f"hf://{repo}@refs%2Fpr%2F1").path
    p1c = pull_result(f"hf://{repo}@{c1}").path
    folder = cache_folder(tmp_path, repo)
    assert p1 == p1t == p1c == folder / "snapshots" / c1 and p2 == p2pr == folder / "snapshots" / c2
    assert (folder / "refs" / "main").read_text() == c2
    assert (folder / "refs" / "v1.0").read_text() == c1
    assert (folder / "refs" / "refs" / "pr" / "1").read_text() == c2
    assert not (folder / "refs" / c1).exists()  # a commit is not a ref
    assert os.readlink(p1 / "model.safetensors") == os.readlink(p2 / "model.safetensors")  # one shared blob
    assert len(list((folder / "blobs").iterdir())) == 3
    for rev, commit, version in (("main", c2, b'{"v": 2}'), ("v1.0", c1, b'{"v": 1}'),
                                 ("refs/pr/1", c2, b'{"v": 2}'), (c1, c1, b'{"v": 1}')):
        got = Path(snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True))
        assert got == folder / "snapshots" / commit, rev
        assert (got / "config.json").read_bytes() == version, rev


# -- what an earlier pull left behind --------------------------------------------------------------


def test_truncated_blob_is_fetched_again(hub: HubServer, tmp_path: Path) -> None:
    data = weights(1 << 20)
    repo = repo_name("trunc")
    hub.add_repo(repo, make_src(tmp_path, {"model.safetensors": data}))
    path = pull_result(f"hf://{repo}").path
    blob = (path / "model.safetensors").resolve()
    with open(blob, "r+b") as f:
        f.truncate(1000)
    again = pull_result(f"hf://{repo}")
    assert again.fetched == ("model.safetensors",)
    assert (path / "model.safetensors").read_bytes() == data


def test_verify_checks_a_blob_already_in_the_cache(hub: HubServer, tmp_path: Path) -> None:
    """``--verify`` "checks published sha256s": a blob already in the cache whose bytes no longer match the
    sha256 it is named by (bit rot, a crashed writer of another tool) must not pass a verifying pull."""
    data = weights(1 << 20)
    repo = repo_name("rot")
    hub.add_repo(repo, make_src(tmp_path, {"model.safetensors": data}))
    path = pull_result(f"hf://{repo}", verify=True).path
    blob = (path / "model.safetensors").resolve()
    with open(blob, "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * 64)
    again = pull_result(f"hf://{repo}", verify=True)
    assert again.fetched == ("model.safetensors",), "a verifying pull trusted a corrupt blob"
    assert (path / "model.safetensors").read_bytes() == data
    assert pull_result(f"hf://{repo}", verify=True).present == ("model.safetensors",)  # whole again: kept


def test_verify_checks_a_git_stored_file_by_its_git_object_id(hub: HubServer, tmp_path: Path) -> None:
    """Files outside LFS (config, tokenizer) are named by their git blob id, not a sha256: a verifying pull
    checks that id, and an unverified one trusts size alone."""
    config = b'{"model_type": "bert", "hidden_size": 8}\n'
    repo = repo_name("rotgit")
    hub.add_repo(repo, make_src(tmp_path, {"model.safetensors": weights(64 << 10), "config.json": config}))
    path = pull_result(f"hf://{repo}").path
    blob = (path / "config.json").resolve()
    blob.write_bytes(config.replace(b"bert", b"BERT"))  # same size, other bytes
    assert "config.json" in pull_result(f"hf://{repo}").present  # without verify: size only
    again = pull_result(f"hf://{repo}", verify=True)
    assert again.fetched == ("config.json",) and (path / "config.json").read_bytes() == config


def test_stale_journal_for_other_object_restarts(http_server: RangeHTTPServer, http_dir: Path,
                                                 tmp_path: Path) -> None:
    """A temporary file whose journal claims chunks of an object with another ETag is started afresh."""
    data, url, out = served_random_file(http_server, http_dir, tmp_path)
    temp = out / ".fastload" / "incomplete" / "model.safetensors"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(b"\0" * len(data))
    temp.with_name(temp.name + ".journal").write_text(
        f'{{"etag": "\\"other\\"", "size": {len(data)}, "url": "{url}"}}\n0 {len(data)}\n')
    result = pull_result(url, to=out)
    assert result.bytes_fetched == len(data)
    assert (out / "model.safetensors").read_bytes() == data


# -- a server that drops the connection mid-file, retries exhausted ------------------------------------


@dataclass(eq=False)
class CutAfterFirst(CutAfter):
    """Answer the first ``after`` matching GETs whole, then cut every later body after ``nbytes``."""

    after: int = 1

    def wants_to_fire(self) -> bool:
        return self.seen > self.after


def test_connection_dropped_mid_file_then_rerun(http_server: RangeHTTPServer, http_dir: Path,
                                               tmp_path: Path) -> None:
    data, url, out = served_random_file(http_server, http_dir, tmp_path)
    # the size probe and the first two 256 KiB chunks arrive; every later read dies at once
    http_server.faults._add(CutAfterFirst(pattern="*/model.safetensors", nbytes=0, after=3))
    config = ONE.replace(retry=RetryConfig(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.01))
    with pytest.raises(fastload.TransferError) as err:
        run(lambda: apull(url, to=out, config=config))
    assert url in str(err.value) and err.value.byte_range is not None
    assert "%d-" % err.value.byte_range[0] in str(err.value) or str(err.value.byte_range[0]) in str(err.value)
    assert not (out / "model.safetensors").exists()
    http_server.faults.clear()
    http_server.reset()
    result = run(lambda: apull(url, to=out, config=ONE))
    assert (out / "model.safetensors").read_bytes() == data
    assert result.bytes_fetched == len(data) - 2 * (256 << 10)  # resumed, not restarted


# -- two pulls of the same repository at once ------------------------------------------------------


def test_two_concurrent_pulls_of_one_repo_take_turns(hub: HubServer, tmp_path: Path) -> None:
    """Pull B of a repository that pull A is part-way through (another thread or process) waits for A,
    then finds A's files complete: nothing fetched twice, no half-written blob renamed into place."""
    data = weights(1 << 20)
    repo = repo_name("race")
    hub.add_repo(repo, make_src(tmp_path, {"model.safetensors": data}))
    paused, resume = threading.Event(), threading.Event()
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:  # after the first chunk of A landed (and was journaled)
            paused.set()
            resume.wait(10)

    outcome: dict[str, object] = {}
    trace_b = fastload.Trace()

    def pull(name: str, **kwargs) -> None:
        try:
            outcome[name] = pull_result(f"hf://{repo}", config=ONE, **kwargs)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            outcome[name] = exc

    a = threading.Thread(target=pull, args=("a",), kwargs={"progress": progress})
    a.start()
    assert paused.wait(10)
    b = threading.Thread(target=pull, args=("b",), kwargs={"trace": trace_b})
    b.start()
    try:
        b.join(0.5)
        assert b.is_alive(), f"pull B did not wait for pull A: {outcome.get('b')!r}"
    finally:
        resume.set()
        a.join(10)
        b.join(10)
    result_a, result_b = outcome["a"], outcome["b"]
    assert not isinstance(result_a, BaseException) and not isinstance(result_b, BaseException), outcome
    assert result_a.fetched == ("model.safetensors",) and result_b.present == ("model.safetensors",)
    assert result_b.bytes_fetched == 0 and trace_b.summary().stages["lock"] >= 0.4
    assert (result_b.path / "model.safetensors").read_bytes() == data
    assert not list(cache_folder(tmp_path, repo).rglob("*incomplete*"))


# -- odd names -------------------------------------------------------------------------------------


def test_hub_file_names_with_odd_characters(hub: HubServer, tmp_path: Path) -> None:
    files = {"model.safetensors": weights(64 << 10), "a b/c #1.txt": b"hash", "q?x=1.txt": b"query",
             "pct%20.txt": b"percent", "ünï/cödé.json": b"{}", "at@v2.txt": b"at"}
    repo = repo_name("Odd.Name_x")
    hub.add_repo(repo, make_src(tmp_path, files))
    path = pull_result(f"hf://{repo}").path
    for name, data in files.items():
        assert (path / name).read_bytes() == data, name


# -- the command line ------------------------------------------------------------------------------


def test_cli_hub_errors_are_one_line(hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pull", f"hf://{repo_name('absent')}", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastload: error: ") and err.count("\n") == 1 and "no such repository" in err
    assert main(["pull", "hf://org", "--quiet"]) == 1
    assert capsys.readouterr().err.startswith("fastload: error: ")
    assert main(["pull", str(tmp_path), "--to", str(tmp_path / "o"), "--concurrency", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastload: error: ") and err.count("\n") == 1


def test_cli_pull_hub_prints_snapshot_and_summary(hub: HubServer, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    repo = repo_name("cli")
    commit = hub.add_repo(repo, make_src(tmp_path, {"model.safetensors": weights(64 << 10), "config.json": b"{}"}))
    assert main(["pull", f"hf://{repo}", "--cache-dir", str(tmp_path / "c2")]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(tmp_path / "c2" / ("models--" + repo.replace("/", "--")) / "snapshots" / commit)
    assert "2 file(s) fetched" in out.err and "0 already complete" in out.err
    assert main(["pull", f"hf://{repo}", "--cache-dir", str(tmp_path / "c2")]) == 0
    assert "0 file(s) fetched" in capsys.readouterr().err


# -- more corners ----------------------------------------------------------------------------------


def test_destination_under_a_regular_file_is_a_typed_error(tmp_path: Path) -> None:
    src = make_src(tmp_path, {"model.safetensors": weights(64 << 10)})
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    with pytest.raises(fastload.FastloadError, match="blocker"):
        pull_result(str(src), to=blocker / "out")


def test_progress_of_a_resumed_pull(http_server: RangeHTTPServer, http_dir: Path, tmp_path: Path) -> None:
    """The first report of a resumed pull counts what was already on disk; reports rise to the total."""
    data, url, out = served_random_file(http_server, http_dir, tmp_path)

    def stop_after_two(done: int, total: int, calls: list = []) -> None:  # noqa: B006
        calls.append(done)
        if len(calls) > 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(lambda: apull(url, to=out, config=ONE, progress=stop_after_two))
    calls: list[tuple[int, int]] = []
    run(lambda: apull(url, to=out, config=ONE, progress=lambda d, t: calls.append((d, t))))
    assert calls[0] == (2 * (256 << 10), len(data)) and calls[-1] == (len(data), len(data))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert (out / "model.safetensors").read_bytes() == data


# -- a source that changed its files: the destination follows it ---------------------------------------


def _sharded_then_single(root: Path) -> tuple[Path, dict, dict]:
    """A source folder holding index + 2 shards (+ config.json); returns it and the old and new tensors. The
    caller pulls it, then calls ``_becomes_single`` to rewrite it as one model.safetensors."""
    from checkpoints import write_sharded
    from reliability_helpers import make_tensors

    old = make_tensors(seed=1, count=4)
    src = write_sharded(root / "src", old, 2)
    (src / "config.json").write_text("{}")
    return src, old, make_tensors(seed=2, count=4)


def _becomes_single(src: Path, new: dict) -> None:
    from checkpoints import write_single

    for f in src.glob("model*"):
        f.unlink()
    write_single(src / "model.safetensors", new)


def test_pull_again_removes_what_the_source_dropped(tmp_path: Path) -> None:
    """A checkpoint that moved from index + shards to one file: a second pull leaves no stale index behind (a load
    of the folder prefers the index and would load the old shards)."""
    from reliability_helpers import assert_bit_exact

    src, old, new = _sharded_then_single(tmp_path)
    out = tmp_path / "out"
    first = pull_result(str(src), to=out)
    assert_bit_exact(fastload.load(out), old)
    _becomes_single(src, new)
    second = pull_result(str(src), to=out)
    assert sorted(second.removed) == sorted(["model.safetensors.index.json", "model-00001-of-00002.safetensors",
                                             "model-00002-of-00002.safetensors"])
    assert sorted(p.name for p in out.iterdir() if p.name != ".fastload") == ["config.json", "model.safetensors"]
    assert not list((out / ".fastload" / "meta").glob("model-*"))
    assert_bit_exact(fastload.load(out), new)
    assert first.removed == () and pull_result(str(src), to=out).removed == ()


def test_pull_keeps_files_changed_by_hand_and_files_of_other_sources(tmp_path: Path) -> None:
    src, old, new = _sharded_then_single(tmp_path)
    other = make_src(tmp_path / "o", {"extra/notes.txt": b"mine"})
    out = tmp_path / "out"
    pull_result(str(src), to=out)
    pull_result(str(other), to=out)  # another source into the same folder
    (out / "hand.txt").write_text("not pulled")
    edited = out / "model-00001-of-00002.safetensors"
    edited.write_bytes(edited.read_bytes())  # rewritten by hand: a new mtime
    _becomes_single(src, new)
    result = pull_result(str(src), to=out)
    assert sorted(result.removed) == ["model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert edited.exists() and (out / "hand.txt").exists() and (out / "extra" / "notes.txt").read_bytes() == b"mine"


def test_pull_of_a_folder_in_folders_removes_emptied_subfolders(tmp_path: Path) -> None:
    src = make_src(tmp_path, {"a/b/x.safetensors": weights(1 << 10), "a/y.json": b"{}", "z.json": b"{}"})
    out = tmp_path / "out"
    pull_result(str(src), to=out)
    (src / "a" / "b" / "x.safetensors").unlink()
    assert pull_result(str(src), to=out).removed == ("a/b/x.safetensors",)
    assert not (out / "a" / "b").exists() and (out / "a" / "y.json").exists()
    assert not (out / ".fastload" / "meta" / "a" / "b").exists()


def test_http_pull_follows_a_source_that_moved_to_one_file(http_server: RangeHTTPServer, http_dir: Path,
                                                           tmp_path: Path) -> None:
    """Over HTTP, where "the source no longer has it" means a 404 for a file the last pull fetched."""
    from reliability_helpers import assert_bit_exact

    src, old, new = _sharded_then_single(http_dir / "m")
    out = tmp_path / "out"
    url = http_server.url_for(src) + "/"
    pull_result(url, to=out)
    assert_bit_exact(fastload.load(out), old)
    _becomes_single(src, new)
    assert "model.safetensors.index.json" in pull_result(url, to=out).removed
    assert_bit_exact(fastload.load(out), new)


def test_single_file_pull_removes_nothing(tmp_path: Path) -> None:
    src, old, new = _sharded_then_single(tmp_path)
    out = tmp_path / "out"
    pull_result(str(src), to=out)
    one = make_src(tmp_path / "one", {"config.json": b"{}"})
    assert pull_result(str(one / "config.json"), to=out).removed == ()
    assert (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("into", ["plain", "hub-cache"])
def test_a_pull_killed_between_rename_and_journal_removal_leaves_nothing_after_the_next(
        into: str, hub: HubServer, tmp_path: Path) -> None:
    """A pull renames a finished file into place, then removes its journal: killed in between, it left the
    journal (and, had a partial of the same file been there, that too) for ever, since the file was whole and
    the next pull never opened its temporary file again. The next pull now removes what belongs to a file
    already whole under its final name."""
    data = weights(1 << 20, seed=5)
    if into == "plain":
        source, out = str(make_src(tmp_path, {"model.safetensors": data})), tmp_path / "out"
        pull_result(source, to=out)
        unfinished = out / ".fastload" / "incomplete"
        leftovers = [unfinished / "model.safetensors.journal", unfinished / "model.safetensors"]
        kwargs = {"to": out}
    else:
        repo = repo_name("leftovers")
        hub.add_repo(repo, make_src(tmp_path, {"model.safetensors": data}))
        source = f"hf://{repo}"
        blob = (pull_result(source).path / "model.safetensors").resolve()
        leftovers = [blob.with_name(blob.name + ".fastload.journal.incomplete"),
                     blob.with_name(blob.name + ".fastload.incomplete")]
        kwargs = {}
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"left by a pull killed after its rename\n")
    again = pull_result(source, **kwargs)
    assert again.fetched == () and again.present == ("model.safetensors",)
    assert [p for p in leftovers if os.path.lexists(p)] == []
    assert (again.path / "model.safetensors").read_bytes() == data
