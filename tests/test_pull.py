"""fastload pull: local / HTTP / S3 / hf:// sources, the hub cache layout, atomic writes, skip and resume; the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastload
from fastload import LoadConfig
from fastload.cli import main
from fastload.pull import apull
from fastload.runner import run
from hub_server import HubServer, hub, hub_session, minilm_dir, repo_name  # noqa: F401 -- fixtures
from servers import RangeHTTPServer

SMALL = LoadConfig(chunk_bytes=256 << 10, max_concurrency=4)


def pull_result(source, **kwargs):
    return run(lambda: apull(source, **{"config": SMALL, **kwargs}))


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def state(root: Path) -> dict[str, tuple[int, int]]:
    """Inode and mtime of each file: a rewrite changes one of them."""
    return {k: (os.stat(root / k).st_ino, os.stat(root / k).st_mtime_ns) for k in files_under(root)}


def test_local_directory(minilm_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    trace = fastload.Trace()
    result = pull_result(str(minilm_dir), to=out, trace=trace)
    assert result.path == out
    assert sum(c["nbytes"] for c in trace.chunks) == result.bytes_fetched == result.total_bytes  # traced chunks
    assert files_under(out) == files_under(minilm_dir)  # nested 1_Pooling/ included, .gitattributes not
    assert "1_Pooling/config.json" in result.fetched and result.present == ()
    assert not (out / ".fastload" / "incomplete").exists() or not any((out / ".fastload" / "incomplete").rglob("*.*"))
    before = state(out)
    again = pull_result(str(minilm_dir), to=out)
    assert again.fetched == () and again.bytes_fetched == 0 and len(again.present) == len(result.fetched)
    assert state(out) == before  # nothing rewritten


def test_default_destination_and_progress(minilm_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    calls = []
    path = fastload.pull(str(minilm_dir) + "/", progress=lambda done, total: calls.append((done, total)))
    assert path == tmp_path / "model" and (path / "model.safetensors").is_file()  # ./<last path segment>
    total = sum(len(b) for b in files_under(minilm_dir).values())
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_hub_source_into_plain_directory(hub: HubServer, minilm_dir: Path, tmp_path: Path) -> None:
    repo = repo_name("plain")
    hub.add_repo(repo, minilm_dir)
    out = tmp_path / "plain"
    trace = fastload.Trace()
    assert fastload.pull(f"hf://{repo}", to=out, config=SMALL, verify=True, trace=trace) == out
    assert files_under(out) == files_under(minilm_dir)
    assert trace.snapshot()["counters"]["checksums_verified"] == 1  # the LFS file, as it streamed
    hub.reset()
    assert pull_result(f"hf://{repo}", to=out).fetched == ()
    assert [r.path for r in hub.log] == [f"/api/models/{repo}/revision/main"]  # the listing's ids suffice


def test_http_base_url_and_single_file(http_server: RangeHTTPServer, http_dir: Path, minilm_dir: Path,
                                       llama_sharded_checkpoint: Path, tmp_path: Path) -> None:
    shutil.copytree(llama_sharded_checkpoint, http_dir / "llama")
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        shutil.copyfile(minilm_dir / name, http_dir / "llama" / name)
    (http_dir / "llama" / "unlisted.txt").write_text("HTTP cannot list me")
    url = http_server.url_for(http_dir / "llama")
    result = pull_result(url, to=tmp_path / "llama")
    want = files_under(http_dir / "llama")
    del want["unlisted.txt"]
    assert files_under(tmp_path / "llama") == want
    assert sorted(result.fetched) == sorted(want)
    http_server.reset()
    again = pull_result(url + "/", to=tmp_path / "llama")
    assert again.fetched == ()
    weights = [r for r in http_server.log if r.path.endswith(".safetensors")]
    assert weights and all(r.range == "bytes=0-7" for r in weights)  # size probes only: no weight bytes again
    one = pull_result(url + "/model.safetensors.index.json", to=tmp_path / "one")
    assert one.path == tmp_path / "one" / "model.safetensors.index.json"
    assert one.path.read_bytes() == (http_dir / "llama" / "model.safetensors.index.json").read_bytes()


def test_s3_prefix_is_listed_recursively(s3_server, s3_bucket: str, minilm_dir: Path, tmp_path: Path) -> None:
    s3_server.upload_dir(s3_bucket, "models/minilm", minilm_dir)
    big = LoadConfig()  # moto answers slowly per request: few, large chunks
    result = pull_result(f"s3://{s3_bucket}/models/minilm", to=tmp_path / "m", config=big)
    got = files_under(tmp_path / "m")
    want = files_under(minilm_dir)
    assert got == want and "1_Pooling/config.json" in result.fetched
    assert pull_result(f"s3://{s3_bucket}/models/minilm/", to=tmp_path / "m", config=big).fetched == ()


def test_hub_cache_layout_works_offline(hub: HubServer, minilm_dir: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = repo_name("minilm")
    commit = hub.add_repo(repo, minilm_dir)
    cache = tmp_path / "hf-cache"
    result = pull_result(f"hf://{repo}")
    folder = cache / ("models--" + repo.replace("/", "--"))
    assert result.path == folder / "snapshots" / commit
    assert (folder / "refs" / "main").read_text() == commit
    weights = result.path / "model.safetensors"
    sha = hashlib.sha256((minilm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert weights.is_symlink() and os.readlink(weights) == f"../../blobs/{sha}"  # relative, named by sha256
    assert os.readlink(result.path / "1_Pooling" / "config.json").startswith("../../../blobs/")
    assert files_under(result.path) == files_under(minilm_dir)
    assert not list((folder / "blobs").glob("*incomplete*"))

    # huggingface_hub finds the files without the network
    assert hf_hub_download(repo, "config.json", cache_dir=cache, local_files_only=True) == str(
        result.path / "config.json")
    assert try_to_load_from_cache(repo, "tokenizer.json", cache_dir=cache) == str(result.path / "tokenizer.json")

    hub.reset()
    again = pull_result(f"hf://{repo}")
    assert again.fetched == () and [r.path for r in hub.log] == [f"/api/models/{repo}/revision/main"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset()
    assert set(fastload.load(f"hf://{repo}")) and hub.log == []
    assert pull_result(f"hf://{repo}").path == result.path  # offline pull: the cache answers


@pytest.mark.slow
def test_plain_transformers_finds_pulled_model_offline(hub: HubServer, minilm_dir: Path, tmp_path: Path) -> None:
    repo = repo_name("minilm")
    hub.add_repo(repo, minilm_dir)
    pull_result(f"hf://{repo}")
    script = (
        "import sys, transformers\n"
        f"tok = transformers.AutoTokenizer.from_pretrained({repo!r})\n"
        f"model = transformers.AutoModel.from_pretrained({repo!r})\n"
        "print(type(model).__name__, tok('hello world')['input_ids'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HUB_CACHE=str(tmp_path / "hf-cache"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    hub.reset()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "BertModel" and "[101, 7592, 2088, 102]" in done.stdout
    assert hub.log == []


class Interrupt(Exception):
    pass


def interrupt_after(chunks: int):
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) > chunks:  # the first call reports what was already there
            raise Interrupt

    return progress


def test_interrupted_pull_resumes(http_server: RangeHTTPServer, http_dir: Path, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (http_dir / "model.safetensors").write_bytes(data)  # pull does not parse: any bytes will do
    url = http_server.url_for(http_dir / "model.safetensors")
    out = tmp_path / "out"
    one_at_a_time = SMALL.replace(max_concurrency=1)
    with pytest.raises(Interrupt):
        run(lambda: apull(url, to=out, config=one_at_a_time, progress=interrupt_after(3)))
    assert not (out / "model.safetensors").exists()  # nothing under the final name
    temp = out / ".fastload" / "incomplete" / "model.safetensors"
    journal = temp.with_name(temp.name + ".journal")
    assert temp.stat().st_size == len(data) and len(journal.read_text().splitlines()) == 1 + 3
    http_server.reset()
    result = run(lambda: apull(url, to=out, config=one_at_a_time))
    assert (out / "model.safetensors").read_bytes() == data
    assert result.bytes_fetched == len(data) - 3 * (256 << 10)
    fetched = [r for r in http_server.log if r.range != "bytes=0-7"]  # all but the size probes
    assert sum(r.body_bytes for r in fetched) == len(data) - 3 * (256 << 10)  # only what was missing
    assert not temp.exists() and not journal.exists()


def test_changed_source_restarts_and_refetches(http_server: RangeHTTPServer, http_dir: Path,
                                               tmp_path: Path) -> None:
    path = http_dir / "model.safetensors"
    path.write_bytes(b"a" * (1 << 20))
    url, out = http_server.url_for(path), tmp_path / "out"
    with pytest.raises(Interrupt):
        run(lambda: apull(url, to=out, config=SMALL.replace(max_concurrency=1), progress=interrupt_after(1)))
    path.write_bytes(b"b" * (1 << 20) + b"!")  # replaced: new size and ETag
    pull_result(url, to=out)
    assert (out / "model.safetensors").read_bytes() == b"b" * (1 << 20) + b"!"
    path.write_bytes(b"c" * (1 << 20) + b"!")  # same size, new ETag: a complete file is stale too
    assert pull_result(url, to=out).fetched == ("model.safetensors",)
    assert (out / "model.safetensors").read_bytes()[:1] == b"c"


def test_verify_rejects_wrong_sha256(hub: HubServer, llama_sharded_checkpoint: Path, tmp_path: Path) -> None:
    repo = repo_name("bad")
    commit = hub.add_repo(repo, llama_sharded_checkpoint)
    hub.files[commit]["model-00002-of-00003.safetensors"]["sha256"] = "0" * 64
    with pytest.raises(fastload.IntegrityError, match="sha256"):
        run(lambda: apull(f"hf://{repo}", config=SMALL, verify=True))
    blobs = tmp_path / "hf-cache" / ("models--" + repo.replace("/", "--")) / "blobs"
    assert not (blobs / ("0" * 64)).exists()
    assert not list(blobs.glob("0000*"))


def test_verify_resumed_file_after_writing(hub: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(os.urandom(2 << 20))
    repo = repo_name("resume")
    hub.add_repo(repo, src)
    one = SMALL.replace(max_concurrency=1)
    with pytest.raises(Interrupt):
        run(lambda: apull(f"hf://{repo}", config=one, verify=True, progress=interrupt_after(2)))
    temp = next((tmp_path / "hf-cache").rglob("*.fastload.incomplete"))
    with open(temp, "r+b") as f:  # damage bytes the journal says are there
        f.write(b"\0" * 16)
    with pytest.raises(fastload.IntegrityError, match="sha256 mismatch"):
        run(lambda: apull(f"hf://{repo}", config=one, verify=True))  # resumed, so checked once written
    assert not temp.exists()  # dropped, not resumed again
    path = run(lambda: apull(f"hf://{repo}", config=one, verify=True)).path
    assert (path / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_pull_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(fastload.ConfigError, match="hf://"):
        fastload.pull(str(tmp_path), revision="main")
    with pytest.raises(fastload.ConfigError, match="hf://"):
        fastload.pull(str(tmp_path), cache_dir=tmp_path)
    with pytest.raises(fastload.ConfigError, match="revision"):
        fastload.pull("hf://org/name@v1", revision="v2")
    with pytest.raises(fastload.SourceNotFoundError):
        fastload.pull(str(tmp_path / "absent"), to=tmp_path / "x")


# -- the command line ------------------------------------------------------------------------------


def test_cli_pull(minilm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert main(["pull", str(minilm_dir), "--to", str(out), "--chunk-size", "1MiB", "--concurrency", "2"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)  # stdout: where the files went
    assert "12 file(s) fetched" in captured.err and "it/s" not in captured.err  # no bar when not a terminal
    assert main(["pull", str(minilm_dir), "--to", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out) and captured.err == ""


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pull", str(tmp_path / "absent"), "--to", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastload: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert main(["pull", "hf://org/name", "--revision", "a", "--chunk-size", "lots"]) == 1
    assert "not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["pull", "hf://org/name", "--to", "a", "--cache-dir", "b"])
    assert exit_.value.code == 2


def test_cli_inspect(llama_sharded_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(llama_sharded_checkpoint), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 file(s), 21 tensor(s)")
    assert "bytes by dtype:\n  BF16  " in out and "100.0%" in out
    largest = out.split("largest 3 tensor(s):\n")[1].splitlines()[:3]
    assert [line.split()[0] for line in largest] == ["lm_head.weight", "model.embed_tokens.weight",
                                                    "model.layers.0.mlp.down_proj.weight"]  # ties by name
    assert "metadata:\n  format: pt\n  index.total_size: " in out
    assert main(["inspect", str(llama_sharded_checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"]


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt", "/abs.txt", "a//b.txt"])
def test_hostile_listing_cannot_escape(hub: HubServer, minilm_dir: Path, tmp_path: Path, name: str) -> None:
    repo = repo_name("evil")
    commit = hub.add_repo(repo, minilm_dir)
    hub.files[commit][name] = dict(hub.files[commit]["config.json"])
    with pytest.raises(fastload.FormatError, match="not a plain relative path"):
        pull_result(f"hf://{repo}", to=tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "escape.txt").exists()
    hub.files[commit][name]["blob"] = "../../x"
    with pytest.raises(fastload.FormatError, match="blob id"):
        pull_result(f"hf://{repo}")


@pytest.mark.parametrize("where", ["local", "s3", "hub"])
def test_index_naming_a_missing_shard_is_refused_before_anything_is_written(
        where: str, llama_sharded_checkpoint: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A folder whose index names a shard it lacks would be pulled "complete" and fail its first load."""
    src = tmp_path / "src"
    shutil.copytree(llama_sharded_checkpoint, src)
    (src / "model-00002-of-00003.safetensors").unlink()
    if where == "local":
        url = str(src)
    elif where == "s3":
        s3, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        s3.upload_dir(bucket, "lacking", src)
        url = f"s3://{bucket}/lacking/"
    else:
        hub, repo = request.getfixturevalue("hub"), repo_name("lacking")
        hub.add_repo(repo, src)
        url = f"hf://{repo}"
    out = tmp_path / "out"
    with pytest.raises(fastload.SourceNotFoundError, match=r"names 1 shard file\(s\) the source lacks: "
                                                           r"'model-00002-of-00003.safetensors'") as caught:
        pull_result(url, to=out)
    assert caught.value.url.endswith("model-00002-of-00003.safetensors")
    assert not out.exists()
    shutil.copy(llama_sharded_checkpoint / "model-00002-of-00003.safetensors", src)  # the control: whole again
    if where == "s3":
        s3.upload_dir(bucket, "lacking", src)
    elif where == "hub":
        hub.add_repo(repo, src)
    assert pull_result(url, to=out).fetched
    assert fastload.load(out).keys() == fastload.load(llama_sharded_checkpoint).keys()
