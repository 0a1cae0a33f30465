"""Audit of ``fastload pull`` into the Hugging Face cache: what huggingface_hub itself makes of the result.

Corners tests/test_pull.py, tests/test_pull_corners.py and tests/test_hub.py do not cover. Real servers only
(the stand-in Hub on loopback); nothing inside fastload is mocked; huggingface_hub is the reference for the
cache layout.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest

import fastload
from fastload import LoadConfig
from fastload.cli import main
from fastload.pull import apull
from fastload.runner import run
from hub_server import HubServer, git_blob_sha1, hub, hub_session, minilm_dir, repo_name  # noqa: F401 -- fixtures

SMALL = LoadConfig(chunk_bytes=256 << 10, max_concurrency=4)
ONE = SMALL.replace(max_concurrency=1)


def pull_result(source, **kwargs):
    return run(lambda: apull(source, **{"config": SMALL, **kwargs}))


def folder_of(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def make_src(where: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(data)
    return where


def weights(n: int = 1 << 20, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32)


def served_copy(hub: HubServer, repo: str, commit: str, name: str) -> Path:
    """The file the stand-in Hub serves for ``name`` at ``commit`` (to damage after publishing)."""
    return hub.root / "repos" / repo / commit / name


def scan(cache: Path):
    from huggingface_hub import scan_cache_dir

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cache huggingface_hub finds odd warns about it
        return scan_cache_dir(cache)


class Stop(Exception):
    pass


def stop_after(chunks: int):
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) > chunks:
            raise Stop

    return progress


# -- huggingface_hub's own view of a pulled cache ----------------------------------------------------


def test_scan_cache_dir_accepts_a_pulled_cache(hub: HubServer, minilm_dir: Path, tmp_path: Path) -> None:
    """``hf cache scan`` / ``scan_cache_dir`` sees the pulled repository whole: no warnings, one revision
    with ``main``, every file pointing at a blob of the right size, blobs named as the Hub names them."""
    cache = tmp_path / "hf-cache"
    repo = repo_name("scan")
    commit = hub.add_repo(repo, minilm_dir)
    pull_result(f"hf://{repo}")
    info = scan(cache)
    assert info.warnings == [], info.warnings
    [cached] = [r for r in info.repos if r.repo_id == repo]
    [revision] = cached.revisions
    assert revision.commit_hash == commit and revision.refs == frozenset({"main"})
    files = {f.file_path.relative_to(revision.snapshot_path).as_posix(): f for f in revision.files}
    want = {p.relative_to(minilm_dir).as_posix(): p for p in minilm_dir.rglob("*") if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(minilm_dir).parts)}
    assert set(files) == set(want)
    for name, path in want.items():
        data = path.read_bytes()
        blob = files[name].blob_path.name
        expected = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_blob_sha1(data)
        assert blob == expected, name
        assert files[name].size_on_disk == len(data), name
    assert info.incomplete_files == frozenset()


def test_scan_cache_dir_after_an_interrupted_pull(hub: HubServer, tmp_path: Path) -> None:
    """An interrupted first pull must not leave a repository folder huggingface_hub calls corrupted
    (huggingface_hub's own interrupted download leaves ``snapshots/<commit>/`` in place); a rerun completes."""
    cache = tmp_path / "hf-cache"
    data = weights(2 << 20)
    repo = repo_name("scanint")
    commit = hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": data, "config.json": b"{}"}))
    with pytest.raises(Stop):
        pull_result(f"hf://{repo}", config=ONE, progress=stop_after(2))
    snapshot = folder_of(cache, repo) / "snapshots" / commit
    assert not (snapshot / "model.safetensors").exists()  # nothing complete-looking
    info = scan(cache)
    assert info.warnings == [], [str(w) for w in info.warnings]
    path = pull_result(f"hf://{repo}", config=ONE).path
    assert (path / "model.safetensors").read_bytes() == data
    info = scan(cache)
    assert info.warnings == [] and [r.repo_id for r in info.repos] == [repo]


def test_huggingface_hub_download_reuses_pulled_blobs(hub: HubServer, tmp_path: Path) -> None:
    """Online huggingface_hub (HEAD to the Hub, then the blob it names by X-Linked-Etag / ETag) finds fastload's
    blobs and fetches no byte again: the blob names agree with what huggingface_hub derives itself."""
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-cache"
    repo = repo_name("reuse")
    files = {"model.safetensors": weights(1 << 20), "config.json": b'{"model_type": "bert"}', "sub/tok.json": b"[]"}
    commit = hub.add_repo(repo, make_src(tmp_path / "src", files))
    path = pull_result(f"hf://{repo}").path
    hub.reset()
    for name in files:
        sub, _, base = name.rpartition("/")
        got = hf_hub_download(repo, base, subfolder=sub or None, cache_dir=cache, endpoint=hub.endpoint)
        assert Path(got) == path / name and Path(got).read_bytes() == files[name]
    bodies = [r for r in hub.log if r.method == "GET" and ("/resolve/" in r.path or r.path.startswith("/lfs/"))]
    assert bodies == [], [(r.method, r.path) for r in bodies]
    assert path == folder_of(cache, repo) / "snapshots" / commit


def test_pull_reuses_blobs_huggingface_hub_downloaded(hub: HubServer, tmp_path: Path) -> None:
    """The other way round: blobs huggingface_hub downloaded are complete for fastload, not fetched again."""
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-cache"
    repo = repo_name("theirs")
    files = {"model.safetensors": weights(1 << 20), "config.json": b'{"model_type": "bert"}'}
    hub.add_repo(repo, make_src(tmp_path / "src", files))
    for name in files:
        hf_hub_download(repo, name, cache_dir=cache, endpoint=hub.endpoint)
    hub.reset()
    result = pull_result(f"hf://{repo}")
    assert result.fetched == () and sorted(result.present) == sorted(files)
    assert not [r for r in hub.log if r.path.startswith("/lfs/")]
    assert scan(cache).warnings == []


def test_subfolder_pull_is_found_by_huggingface_hub(hub: HubServer, tmp_path: Path) -> None:
    """``hf://org/name/sub/`` lands in ``snapshots/<commit>/sub/`` with ``refs/main``; huggingface_hub finds
    ``subfolder=`` files offline; a later whole-repo pull fills the same snapshot."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cache = tmp_path / "hf-cache"
    repo = repo_name("subf")
    files = {"config.json": b'{"root": 1}', "sub/model.safetensors": weights(512 << 10), "sub/config.json": b"{}"}
    commit = hub.add_repo(repo, make_src(tmp_path / "src", files))
    snapshot = folder_of(cache, repo) / "snapshots" / commit
    path = pull_result(f"hf://{repo}/sub/").path
    assert path == snapshot / "sub"
    assert (folder_of(cache, repo) / "refs" / "main").read_text() == commit
    assert not (snapshot / "config.json").exists()
    got = hf_hub_download(repo, "model.safetensors", subfolder="sub", cache_dir=cache, local_files_only=True)
    assert Path(got) == snapshot / "sub" / "model.safetensors"
    assert try_to_load_from_cache(repo, "sub/config.json", cache_dir=cache) == str(snapshot / "sub" / "config.json")
    assert os.readlink(snapshot / "sub" / "model.safetensors").startswith("../../../blobs/")
    again = pull_result(f"hf://{repo}")
    assert again.path == snapshot and again.fetched == ("config.json",)
    assert (snapshot / "config.json").read_bytes() == b'{"root": 1}'
    assert scan(cache).warnings == []


def test_single_file_in_a_subfolder(hub: HubServer, tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    repo = repo_name("one")
    files = {"model.safetensors": weights(64 << 10), "a/b/vocab.txt": b"hello\nworld\n"}
    commit = hub.add_repo(repo, make_src(tmp_path / "src", files))
    path = pull_result(f"hf://{repo}/a/b/vocab.txt").path
    assert path == folder_of(cache, repo) / "snapshots" / commit / "a" / "b" / "vocab.txt"
    assert path.read_bytes() == b"hello\nworld\n"
    assert os.readlink(path) == "../../../../blobs/" + git_blob_sha1(b"hello\nworld\n")
    assert not (path.parent.parent.parent / "model.safetensors").exists()
    assert scan(cache).warnings == []


# -- where the cache is --------------------------------------------------------------------------------


def test_cache_location_precedence(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cache_dir= beats HF_HUB_CACHE, which beats HF_HOME/hub, as in huggingface_hub."""
    repo = repo_name("where")
    hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": weights(64 << 10)}))
    explicit = pull_result(f"hf://{repo}", cache_dir=tmp_path / "explicit").path
    assert str(explicit).startswith(str(tmp_path / "explicit" / "models--"))
    assert pull_result(f"hf://{repo}").path.is_relative_to(tmp_path / "hf-cache")
    monkeypatch.delenv("HF_HUB_CACHE")
    assert pull_result(f"hf://{repo}").path.is_relative_to(tmp_path / "hf-home" / "hub")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pull_result(f"hf://{repo}").path.is_relative_to(tmp_path / "xdg" / "huggingface" / "hub")


def test_tilde_in_hf_hub_cache(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = repo_name("tilde")
    hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": weights(64 << 10)}))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", "~/hfc")
    monkeypatch.chdir(tmp_path)
    assert pull_result(f"hf://{repo}").path.is_relative_to(tmp_path / "home" / "hfc")
    assert not (tmp_path / "~").exists()


def test_legacy_huggingface_hub_cache_variable(hub: HubServer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub (and so transformers) still honours HUGGINGFACE_HUB_CACHE when HF_HUB_CACHE is unset;
    a pull that puts the files elsewhere leaves transformers with nothing offline."""
    repo = repo_name("legacy")
    hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": weights(64 << 10)}))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    probe = subprocess.run(
        [os.sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
        env={**os.environ}, capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == str(tmp_path / "legacy")  # what huggingface_hub uses
    assert pull_result(f"hf://{repo}").path.is_relative_to(tmp_path / "legacy")


def test_relative_cache_dir_gives_working_links(hub: HubServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import snapshot_download

    repo = repo_name("rel")
    files = {"model.safetensors": weights(64 << 10), "x/y.json": b"{}"}
    hub.add_repo(repo, make_src(tmp_path / "src", files))
    monkeypatch.chdir(tmp_path)
    path = pull_result(f"hf://{repo}", cache_dir="relcache").path
    got = Path(snapshot_download(repo, cache_dir=tmp_path / "relcache", local_files_only=True))
    assert got.resolve() == (tmp_path / path).resolve()
    for name, data in files.items():
        assert (got / name).read_bytes() == data
    monkeypatch.chdir("/")
    for name, data in files.items():
        assert (tmp_path / path / name).read_bytes() == data


# -- a Hub whose bytes disagree with its listing --------------------------------------------------------


def test_cdn_serves_a_shorter_file_than_listed(hub: HubServer, tmp_path: Path) -> None:
    """The listing says N bytes and sha256 S; the CDN serves fewer bytes. No blob named S with other
    bytes may appear, and no snapshot link to it: a typed error instead (size mismatch)."""
    cache = tmp_path / "hf-cache"
    data = weights(1 << 20)
    repo = repo_name("short")
    commit = hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": data}))
    served = served_copy(hub, repo, commit, "model.safetensors")
    served.write_bytes(data[: len(data) - 4096])
    sha = hashlib.sha256(data).hexdigest()
    try:
        with pytest.raises(fastload.FastloadError) as err:
            pull_result(f"hf://{repo}")
        assert isinstance(err.value, (fastload.IntegrityError, fastload.SourceChangedError)), repr(err.value)
        blob = folder_of(cache, repo) / "blobs" / sha
        assert not blob.exists() or blob.read_bytes() == data
        assert not (folder_of(cache, repo) / "snapshots" / commit / "model.safetensors").exists()
    finally:
        served.write_bytes(data)


def test_verify_checks_fetched_git_stored_file(hub: HubServer, tmp_path: Path) -> None:
    """README: ``--verify`` checks the Hub's sha256 *or git blob id* of the files fetched. A config.json served
    with other bytes (same size) than its git blob id says must fail a verifying pull with IntegrityError and
    leave no blob under that id."""
    cache = tmp_path / "hf-cache"
    config = b'{"model_type": "bert", "hidden_size": 8}\n'
    repo = repo_name("gitbad")
    commit = hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": weights(64 << 10),
                                                             "config.json": config}))
    served_copy(hub, repo, commit, "config.json").write_bytes(config.replace(b"bert", b"BERT"))
    with pytest.raises(fastload.IntegrityError):
        pull_result(f"hf://{repo}", verify=True)
    blob = folder_of(cache, repo) / "blobs" / git_blob_sha1(config)
    assert not blob.exists() or blob.read_bytes() == config


def test_verify_rejects_lfs_bytes_that_differ_from_their_sha256(hub: HubServer, tmp_path: Path) -> None:
    """The CDN serves other bytes of the same size for an LFS file: a verifying pull raises IntegrityError
    naming the file, leaves nothing in blobs/ for it (not even a temporary to resume), no snapshot link."""
    cache = tmp_path / "hf-cache"
    data = weights(1 << 20)
    repo = repo_name("lfsbad")
    commit = hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": data}))
    served = served_copy(hub, repo, commit, "model.safetensors")
    served.write_bytes(data[:-1] + b"\x00")
    try:
        with pytest.raises(fastload.IntegrityError, match="model.safetensors"):
            pull_result(f"hf://{repo}", verify=True)
        blobs = folder_of(cache, repo) / "blobs"
        assert not blobs.exists() or list(blobs.iterdir()) == []
        assert not (folder_of(cache, repo) / "snapshots" / commit / "model.safetensors").exists()
    finally:
        served.write_bytes(data)
    path = pull_result(f"hf://{repo}", verify=True).path
    assert (path / "model.safetensors").read_bytes() == data


# -- destinations that cannot be written ---------------------------------------------------------------


@contextmanager
def read_only(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:  # root ignores permissions: make the folder immutable instead
        made = shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(path)]).returncode == 0
        assert made, "as root, a read-only folder needs chattr +i (e2fsprogs) on a filesystem that supports it"
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=False)
    else:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)


def test_read_only_cache_dir_is_a_clear_error(hub: HubServer, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    repo = repo_name("ro")
    hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": weights(64 << 10)}))
    cache = tmp_path / "ro-cache"
    with read_only(cache):
        with pytest.raises(fastload.FastloadError) as err:
            pull_result(f"hf://{repo}", cache_dir=cache)
        assert isinstance(err.value, OSError) and str(cache) in str(err.value)
        assert main(["pull", f"hf://{repo}", "--cache-dir", str(cache), "--quiet"]) == 1
        out = capsys.readouterr()
        assert out.err.startswith("fastload: error: ") and out.err.count("\n") == 1 and str(cache) in out.err
        assert out.out == ""


def test_read_only_plain_destination_is_a_clear_error(tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", {"model.safetensors": weights(64 << 10)})
    out = tmp_path / "ro-out"
    with read_only(out):
        with pytest.raises(fastload.FastloadError) as err:
            pull_result(str(src), to=out)
        assert str(out) in str(err.value)


def test_read_only_existing_blobs_folder(hub: HubServer, tmp_path: Path) -> None:
    """A cache whose repo folder exists but cannot be written (another user's cache): a typed error naming
    the path, not a raw PermissionError from deep inside."""
    repo = repo_name("roblobs")
    hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": weights(64 << 10)}))
    cache = tmp_path / "c"
    blobs = folder_of(cache, repo) / "blobs"
    with read_only(blobs):
        with pytest.raises(fastload.FastloadError) as err:
            pull_result(f"hf://{repo}", cache_dir=cache)
        assert "blobs" in str(err.value)


# -- offline ------------------------------------------------------------------------------------------


def test_offline_pull_of_a_repo_without_root_weights(hub: HubServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """After a complete pull, the same pull with HF_HUB_OFFLINE=1 answers from the cache, whatever the repo
    holds (here: a diffusers-style repo whose weights live in a subfolder)."""
    repo = repo_name("diff")
    files = {"model_index.json": b"{}", "unet/config.json": b"{}",
             "unet/diffusion_pytorch_model.safetensors": weights(64 << 10)}
    hub.add_repo(repo, make_src(tmp_path / "src", files))
    path = pull_result(f"hf://{repo}").path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset()
    assert pull_result(f"hf://{repo}").path == path
    assert pull_result(f"hf://{repo}/unet/").path == path / "unet"
    assert hub.log == []


def test_offline_pull_of_a_partial_cache_fails(hub: HubServer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a snapshot huggingface_hub filled with one file is not the pulled repository: the pull must
    not report success for a cache that lacks the weights' shards."""
    from huggingface_hub import hf_hub_download

    cache = tmp_path / "hf-cache"
    repo = repo_name("partial")
    index = b'{"metadata": {}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}'
    files = {"model.safetensors.index.json": index, "m-1.safetensors": weights(64 << 10, 1),
             "m-2.safetensors": weights(64 << 10, 2)}
    hub.add_repo(repo, make_src(tmp_path / "src", files))
    hf_hub_download(repo, "model.safetensors.index.json", cache_dir=cache, endpoint=hub.endpoint)
    hf_hub_download(repo, "m-1.safetensors", cache_dir=cache, endpoint=hub.endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(fastload.SourceNotFoundError):
        pull_result(f"hf://{repo}")


# -- interrupts ----------------------------------------------------------------------------------------


def test_ctrl_c_from_a_timer_mid_hub_pull_then_rerun(hub: HubServer, tmp_path: Path) -> None:
    """KeyboardInterrupt delivered to the main thread (as Ctrl-C is) while a slow CDN streams: the pull stops
    promptly, nothing complete-looking in snapshots/, no thread left; a rerun completes."""
    import _thread
    import threading
    import time

    cache = tmp_path / "hf-cache"
    data = weights(2 << 20)
    repo = repo_name("ctrlc")
    commit = hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": data, "config.json": b"{}"}))
    hub.faults.slow_first_byte(0.5, path="/lfs/*")
    before = set(threading.enumerate())
    timer = threading.Timer(0.8, _thread.interrupt_main)
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            fastload.pull(f"hf://{repo}", config=ONE)
            time.sleep(5)  # the pull finished before the timer: give it time to fire, fail below
    finally:
        timer.cancel()
        hub.faults.clear()
    assert time.monotonic() - started < 4
    snapshot = folder_of(cache, repo) / "snapshots" / commit
    assert not (snapshot / "model.safetensors").exists()
    blob = folder_of(cache, repo) / "blobs" / hashlib.sha256(data).hexdigest()
    assert not blob.exists()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
        if not left:
            break
        time.sleep(0.05)
    assert not left, left
    path = fastload.pull(f"hf://{repo}", config=ONE)
    assert (path / "model.safetensors").read_bytes() == data
    assert scan(cache).warnings == []


def test_cli_pull_interrupted_exit_status_and_no_snapshot(hub: HubServer, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    import _thread
    import threading

    cache = tmp_path / "hf-cache"
    repo = repo_name("clictrlc")
    commit = hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": weights(1 << 20)}))
    hub.faults.slow_first_byte(0.5, path="/lfs/*")
    timer = threading.Timer(0.8, _thread.interrupt_main)
    timer.start()
    try:
        code = main(["pull", f"hf://{repo}", "--chunk-size", "256KiB", "--concurrency", "1"])
    finally:
        timer.cancel()
        hub.faults.clear()
    assert code == 130
    err = capsys.readouterr()
    assert "interrupted" in err.err and err.out == ""
    assert not (folder_of(cache, repo) / "snapshots" / commit / "model.safetensors").exists()


def test_resume_with_another_chunk_size(http_server, http_dir: Path, tmp_path: Path) -> None:
    """A pull interrupted at 256 KiB chunks and resumed at 384 KiB chunks (another --chunk-size) fetches
    exactly the bytes that were missing and ends bit-identical."""
    data = os.urandom((3 << 20) + 12345)
    (http_dir / "model.safetensors").write_bytes(data)
    url = http_server.url_for(http_dir / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(Stop):
        pull_result(url, to=out, config=ONE, progress=stop_after(3))
    http_server.reset()
    result = pull_result(url, to=out, config=LoadConfig(chunk_bytes=384 << 10, max_concurrency=3))
    assert (out / "model.safetensors").read_bytes() == data
    assert result.bytes_fetched == len(data) - 3 * (256 << 10)
    assert sum(r.body_bytes for r in http_server.log if r.range != "bytes=0-7") == len(data) - 3 * (256 << 10)


def test_cli_offline_pull_of_an_uncached_repo(hub: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    repo = repo_name("offcli")
    hub.add_repo(repo, make_src(tmp_path / "src", {"model.safetensors": weights(64 << 10)}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset()
    assert main(["pull", f"hf://{repo}", "--quiet"]) == 1
    out = capsys.readouterr()
    assert out.err.startswith("fastload: error: ") and out.err.count("\n") == 1 and "HF_HUB_OFFLINE" in out.err
    assert out.out == "" and hub.log == []
