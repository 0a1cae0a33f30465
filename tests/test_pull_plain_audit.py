"""Audit of ``fastload pull`` into a PLAIN directory (``to=`` / ``--to``) from local dirs, HTTP base URLs and S3
prefixes: fastload/pull.py ``PlainLayout`` and listing, sinks/file.py, the CLI.

Corners tests/test_pull.py, tests/test_pull_corners.py and tests/test_pull_audit.py (the HF cache) do not cover.
Real servers only (the Range HTTP server, moto S3); nothing inside fastload is mocked; ``safetensors`` is the
reference for bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastload
from fastload import LoadConfig
from fastload.cli import main
from fastload.pull import apull
from fastload.runner import run
from servers import RangeHTTPServer
from servers.http_range import Reply, _FileHandler

SMALL = LoadConfig(chunk_bytes=256 << 10, max_concurrency=4)
ONE = SMALL.replace(max_concurrency=1)


def pull_result(source, **kwargs):
    return run(lambda: apull(source, **{"config": SMALL, **kwargs}))


def make_files(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def visible_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def blob(n: int, seed: int = 0) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def tiny_checkpoint(path: Path, seed: int = 0, prefix: str = "") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {prefix + "a.weight": torch.randn(64, 32, generator=g),
               prefix + "b.bias": torch.arange(16, dtype=torch.int32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def sharded_with_names(root: Path, names: list[str]) -> None:
    """A checkpoint whose index names shards ``names`` (one tensor each)."""
    root.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, name in enumerate(names):
        save_file({f"t{i}": torch.full((128,), float(i))}, str(root / name), metadata={"format": "pt"})
        weight_map[f"t{i}"] = name
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


class Stop(Exception):
    pass


def stop_after(chunks: int):
    calls = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) > chunks:  # the first call reports what was already there
            raise Stop

    return progress


# -- HTTP: URLs that carry a token, names that need percent-encoding ---------------------------------


def test_http_base_url_with_query_token(http_server: RangeHTTPServer, http_dir: Path, tmp_path: Path) -> None:
    """README: "The shards of an HTTP(S) directory or index get its credentials: ... the query string (a
    SAS-style token) go with every file". ``fastload.load`` does so; a pull of the same URL must too."""
    src = http_dir / "tok"
    sharded_with_names(src, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    (src / "config.json").write_text('{"model_type": "bert"}')
    url = http_server.url_for(src) + "/?sig=s3cr3t&se=2030"
    assert set(fastload.load(url, config=SMALL)) == {"t0", "t1"}  # the loader's reading of such a URL
    out = tmp_path / "out"
    result = pull_result(url, to=out)
    assert visible_files(out) == visible_files(src)
    assert sorted(result.fetched) == sorted(visible_files(src))


def test_http_default_destination_never_named_after_the_token(http_server: RangeHTTPServer, http_dir: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``to`` a pull goes to ``./<last path segment>``: the segment of the URL's path, never the query
    string (a secret must not become a directory name)."""
    src = http_dir / "llama"
    tiny_checkpoint(src / "model.safetensors")
    monkeypatch.chdir(tmp_path)
    try:
        path = fastload.pull(http_server.url_for(src) + "/?sig=s3cr3t", config=SMALL)
    finally:
        leaked = [p.name for p in tmp_path.iterdir() if "s3cr3t" in p.name]
    assert leaked == []
    assert path == tmp_path / "llama" and (path / "model.safetensors").is_file()


def test_http_single_file_url_with_query_token(http_server: RangeHTTPServer, http_dir: Path, tmp_path: Path) -> None:
    """A single file URL with a token: that file, saved under its own name (not "name?sig=...")."""
    tensors = tiny_checkpoint(http_dir / "model.safetensors")
    url = http_server.url_for(http_dir / "model.safetensors") + "?sig=s3cr3t"
    out = tmp_path / "out"
    result = pull_result(url, to=out)
    assert result.path == out / "model.safetensors"
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == ["model.safetensors"]
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_http_shard_names_that_need_percent_encoding(http_server: RangeHTTPServer, http_dir: Path,
                                                     tmp_path: Path) -> None:
    """Shard names with spaces, a "+", parentheses and non-ASCII letters: the loader percent-encodes them
    (resolve.join); a pull must fetch the same files and save them under their real names."""
    names = ["part one.safetensors", "größe.safetensors", "a+b (1).safetensors"]
    src = http_dir / "odd"
    sharded_with_names(src, names)
    url = http_server.url_for(src) + "/"
    assert set(fastload.load(url, config=SMALL)) == {"t0", "t1", "t2"}
    out = tmp_path / "out"
    pull_result(url, to=out)
    assert visible_files(out) == visible_files(src)


class _NoETagHandler(_FileHandler):
    """Like many static servers and some CDNs: Range and Last-Modified, no ETag."""

    def produce(self, path, headers, body) -> Reply:
        reply = super().produce(path, headers, body)
        reply.headers = [(k, v) for k, v in reply.headers if k.lower() != "etag"]
        return reply


class NoETagServer(RangeHTTPServer):
    handler_class = _NoETagHandler


def test_second_pull_from_a_server_without_etag_fetches_nothing(http_dir: Path, tmp_path: Path) -> None:
    """README: "a second pull rewrites nothing that is complete", and the reader pins "the ETag (or
    Last-Modified, and the size)". A server that sends Last-Modified but no ETag is such a source."""
    src = http_dir / "noetag"
    tiny_checkpoint(src / "model.safetensors")
    (src / "config.json").write_text('{"model_type": "bert"}')
    out = tmp_path / "out"
    with NoETagServer(http_dir.parent) as server:
        url = server.url_for(src) + "/"
        first = pull_result(url, to=out)
        assert sorted(first.fetched) == ["config.json", "model.safetensors"]
        before = {p: os.stat(out / p).st_ino for p in first.fetched}
        server.reset()
        again = pull_result(url, to=out)
        assert again.fetched == () and again.bytes_fetched == 0, again
        assert {p: os.stat(out / p).st_ino for p in first.fetched} == before


# -- local sources ---------------------------------------------------------------------------------------


def test_local_file_rewritten_with_same_size_and_mtime_is_fetched_again(tmp_path: Path) -> None:
    """A source file replaced by other bytes of the same size with its old mtime set back (``cp -p``): the next
    pull fetches it again; the files that did not change are left alone."""
    src = make_files(tmp_path / "src", {"model.safetensors": blob(300_000, 1), "config.json": b'{"x": 1}',
                                        "sub/tokenizer.json": b'{"t": 2}'})
    out = tmp_path / "out"
    pull_result(str(src), to=out)
    kept = os.stat(out / "config.json").st_ino
    old = os.stat(src / "model.safetensors")
    (src / "model.safetensors").write_bytes(blob(300_000, 2))
    os.utime(src / "model.safetensors", ns=(old.st_atime_ns, old.st_mtime_ns))
    again = pull_result(str(src), to=out)
    assert again.fetched == ("model.safetensors",)
    assert sorted(again.present) == ["config.json", "sub/tokenizer.json"]
    assert (out / "model.safetensors").read_bytes() == blob(300_000, 2)
    assert os.stat(out / "config.json").st_ino == kept


def test_local_resume_after_the_source_was_rewritten_in_between(tmp_path: Path) -> None:
    """An interrupted pull whose source is then replaced by other bytes of the same size: the resume starts
    afresh; the result is wholly the new version, never old chunks stitched to new ones."""
    old, new = blob(2 << 20, 1), blob(2 << 20, 2)
    src = make_files(tmp_path / "src", {"model.safetensors": old})
    out = tmp_path / "out"
    with pytest.raises(Stop):
        pull_result(str(src), to=out, config=ONE, progress=stop_after(3))
    assert not (out / "model.safetensors").exists()
    (src / "model.safetensors").write_bytes(new)
    result = pull_result(str(src), to=out, config=ONE)
    assert (out / "model.safetensors").read_bytes() == new
    assert result.bytes_fetched == len(new)


def test_local_names_with_spaces_unicode_and_subfolders(tmp_path: Path) -> None:
    files = {"model.safetensors": blob(70_000), "a b/c #1.txt": b"hash", "q?x=1.txt": b"query",
             "pct%20.txt": b"percent", "ünï/cödé.json": b"{}", "deep/er/still/x.json": b"[]", "日本語.txt": b"jp"}
    src = make_files(tmp_path / "src", files)
    out = tmp_path / "out"
    result = pull_result(src.as_uri() + "/", to=out)
    assert visible_files(out) == files
    assert sorted(result.fetched) == sorted(files)
    assert pull_result(str(src), to=out).fetched == ()


def test_local_source_with_symlinked_files_like_a_hub_snapshot(tmp_path: Path) -> None:
    """A Hugging Face cache snapshot holds relative symlinks into ``blobs/``: pulling it into a plain directory
    gives regular files with the blobs' bytes, and a second pull finds them complete."""
    weights, config = blob(400_000, 3), b'{"model_type": "bert"}'
    blobs = make_files(tmp_path / "repo" / "blobs", {"aaa": weights, "bbb": config})
    snap = tmp_path / "repo" / "snapshots" / "c0ffee"
    (snap / "sub").mkdir(parents=True)
    os.symlink("../../blobs/aaa", snap / "model.safetensors")
    os.symlink("../../../blobs/bbb", snap / "sub" / "config.json")
    out = tmp_path / "out"
    pull_result(str(snap), to=out)
    assert not (out / "model.safetensors").is_symlink() and not (out / "sub" / "config.json").is_symlink()
    assert visible_files(out) == {"model.safetensors": weights, "sub/config.json": config}
    assert (blobs / "aaa").read_bytes() == weights  # the source is untouched
    assert pull_result(str(snap), to=out).fetched == ()


def test_hidden_files_and_other_formats(tmp_path: Path) -> None:
    """Documented: hidden files are skipped, and other-format weights when the source has safetensors; a
    source with only ``.bin`` weights keeps them."""
    src = make_files(tmp_path / "src", {"model.safetensors": blob(50_000), "pytorch_model.bin": b"pt",
                                        "flax_model.msgpack": b"fx", ".gitattributes": b"*", ".git/HEAD": b"ref",
                                        "sub/.hidden.json": b"{}", "config.json": b"{}"})
    out = tmp_path / "out"
    pull_result(str(src), to=out)
    assert sorted(visible_files(out)) == ["config.json", "model.safetensors"]
    assert not (out / ".gitattributes").exists() and not (out / ".git").exists()
    bin_only = make_files(tmp_path / "bin", {"pytorch_model.bin": b"pt-weights", "config.json": b"{}"})
    pull_result(str(bin_only), to=tmp_path / "out2")
    assert visible_files(tmp_path / "out2") == {"pytorch_model.bin": b"pt-weights", "config.json": b"{}"}


# -- the destination -------------------------------------------------------------------------------------


def test_unrelated_files_in_the_destination_are_kept(tmp_path: Path) -> None:
    src = make_files(tmp_path / "src", {"model.safetensors": blob(80_000), "config.json": b'{"v": 1}'})
    out = make_files(tmp_path / "out", {"notes.txt": b"mine", "extra.safetensors": b"not mine either",
                                        "sub/keep.bin": b"keep", ".env": b"SECRET=1"})
    pull_result(str(src), to=out)
    pull_result(str(src), to=out)
    assert (out / "notes.txt").read_bytes() == b"mine"
    assert (out / "extra.safetensors").read_bytes() == b"not mine either"
    assert (out / "sub" / "keep.bin").read_bytes() == b"keep" and (out / ".env").read_bytes() == b"SECRET=1"
    assert (out / "model.safetensors").read_bytes() == blob(80_000)


def test_destination_that_is_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_files(tmp_path / "src", {"model.safetensors": blob(10_000)})
    dest = tmp_path / "dest"
    dest.write_bytes(b"precious")
    with pytest.raises(fastload.FastloadError) as err:
        pull_result(str(src), to=dest)
    assert isinstance(err.value, OSError) and str(dest) in str(err.value)
    assert dest.read_bytes() == b"precious"
    assert main(["pull", str(src), "--to", str(dest), "--quiet"]) == 1
    out = capsys.readouterr()
    assert out.err.startswith("fastload: error: ") and out.err.count("\n") == 1 and out.out == ""
    assert dest.read_bytes() == b"precious"


def test_permissions_follow_the_umask_not_a_private_temp_file(tmp_path: Path) -> None:
    src = make_files(tmp_path / "src", {"model.safetensors": blob(600_000), "config.json": b"{}"})
    (src / "model.safetensors").chmod(0o600)  # the source's mode is not copied either way
    old = os.umask(0o022)
    try:
        pull_result(str(src), to=tmp_path / "a")
        os.umask(0o027)
        pull_result(str(src), to=tmp_path / "b")
    finally:
        os.umask(old)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE(os.stat(tmp_path / "a" / name).st_mode) == 0o644, name
        assert stat.S_IMODE(os.stat(tmp_path / "b" / name).st_mode) == 0o640, name
    assert stat.S_IMODE(os.stat(tmp_path / "a").st_mode) == 0o755


def test_pulled_directory_loads_and_ignores_the_metadata_folder(tmp_path: Path) -> None:
    """``.fastload/`` (incomplete files, records) must not confuse a load of the pulled directory, nor a pull
    from it, nor transformers; here with a leftover incomplete shard of a second, interrupted pull."""
    src = tmp_path / "src"
    a = tiny_checkpoint(src / "a.safetensors", 1, "x.")
    b = tiny_checkpoint(src / "b.safetensors", 2, "y.")
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32,
                                                  "num_attention_heads": 4, "num_hidden_layers": 1}))
    out = tmp_path / "out"
    pull_result(str(src), to=out)
    later = make_files(tmp_path / "later", {"c.safetensors": blob(1 << 20)})
    with pytest.raises(Stop):
        pull_result(str(later), to=out, config=ONE, progress=stop_after(1))
    assert list((out / ".fastload").rglob("c.safetensors"))  # the leftover is there ...
    state = fastload.load(str(out))  # ... and not one of the checkpoint's files
    want = {**load_file(str(src / "a.safetensors")), **load_file(str(src / "b.safetensors"))}
    assert set(state) == set(a) | set(b) == set(want)
    assert all(torch.equal(state[k], v) for k, v in want.items())
    assert fastload.plan(str(out)).files and all(".fastload" not in f.info.url for f in fastload.plan(str(out)).files)
    again = pull_result(str(out), to=tmp_path / "copy")  # a pulled directory is a fine source
    assert sorted(again.fetched) == ["a.safetensors", "b.safetensors", "config.json"]
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(out))
    assert config.model_type == "bert" and config.hidden_size == 32


# -- S3 ---------------------------------------------------------------------------------------------------


def test_s3_directory_markers_multi_chunk_object_and_odd_keys(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    client = s3_server.client()
    big = blob((1 << 20) + 12345, 7)
    objects = {"m/": b"", "m/sub/": b"", "m/model.safetensors": big, "m/sub/config.json": b'{"a": 1}',
               "m/a b/ünï #1.txt": b"odd", "m/q?x=1.json": b"{}", "m/empty.txt": b""}
    for key, data in objects.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=data)
    out = tmp_path / "out"
    config = LoadConfig(chunk_bytes=512 << 10, max_concurrency=4)  # the big object is 3 chunks
    result = pull_result(f"s3://{s3_bucket}/m", to=out, config=config)
    want = {k[2:]: v for k, v in objects.items() if not k.endswith("/")}
    assert visible_files(out) == want
    assert sorted(result.fetched) == sorted(want) and result.bytes_fetched == sum(map(len, want.values()))
    assert pull_result(f"s3://{s3_bucket}/m/", to=out, config=config).fetched == ()


def test_s3_object_replaced_between_pulls_is_fetched_again(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="m/model.safetensors", Body=blob(100_000, 1))
    client.put_object(Bucket=s3_bucket, Key="m/config.json", Body=b'{"v": 1}')
    out = tmp_path / "out"
    config = LoadConfig()
    pull_result(f"s3://{s3_bucket}/m/", to=out, config=config)
    client.put_object(Bucket=s3_bucket, Key="m/model.safetensors", Body=blob(100_000, 2))  # same size, new ETag
    again = pull_result(f"s3://{s3_bucket}/m/", to=out, config=config)
    assert again.fetched == ("model.safetensors",) and again.present == ("config.json",)
    assert (out / "model.safetensors").read_bytes() == blob(100_000, 2)


def test_s3_key_without_extension_is_that_object(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    """README: "An S3 key without a file extension (s3://bucket/models/llama) is that object when it exists,
    else the prefix"; the pull docstring: "a single file URL -- that file"."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="models/LICENSE", Body=b"Apache-2.0")
    out = tmp_path / "out"
    result = pull_result(f"s3://{s3_bucket}/models/LICENSE", to=out, config=LoadConfig())
    assert result.path == out / "LICENSE" and result.path.read_bytes() == b"Apache-2.0"


def test_verify_s3_prefix_with_checksum_sha256(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    """``--verify`` on a plain pull of an S3 prefix: each object's ChecksumSHA256 is checked as it streams;
    later, a file that no longer matches (same size and mtime) is fetched again, a matching one is not."""
    client = s3_server.client()
    data = {"m/model.safetensors": blob(300_000, 4), "m/config.json": b'{"model_type": "bert"}'}
    for key, body in data.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=body, ChecksumAlgorithm="SHA256")
    out = tmp_path / "out"
    trace = fastload.Trace()
    config = LoadConfig()
    pull_result(f"s3://{s3_bucket}/m", to=out, config=config, verify=True, trace=trace)
    assert trace.snapshot()["counters"]["checksums_verified"] == 2
    target = out / "model.safetensors"
    st = os.stat(target)
    with open(target, "r+b") as f:  # bit rot: same size, mtime set back
        f.write(b"\xff" * 8)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert pull_result(f"s3://{s3_bucket}/m", to=out, config=config).fetched == ()  # size + mtime only
    again = pull_result(f"s3://{s3_bucket}/m", to=out, config=config, verify=True)
    assert again.fetched == ("model.safetensors",) and again.present == ("config.json",)
    assert target.read_bytes() == data["m/model.safetensors"]


# -- the command line ------------------------------------------------------------------------------------


FASTLOAD = [sys.executable, "-m", "fastload.cli"]


def test_cli_pull_s3_prefix_outputs_and_exit_statuses(s3_server, s3_bucket: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="m/model.safetensors", Body=blob(200_000))
    client.put_object(Bucket=s3_bucket, Key="m/config.json", Body=b"{}")
    out = tmp_path / "out"
    assert main(["pull", f"s3://{s3_bucket}/m", "--to", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}\n"
    assert "2 file(s) fetched" in captured.err and "0 already complete" in captured.err
    assert main(["pull", f"s3://{s3_bucket}/m/", "--to", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out}\n" and "0 file(s) fetched" in captured.err and "2 already complete" in captured.err
    assert main(["pull", f"s3://{s3_bucket}/absent/", "--to", str(tmp_path / "x"), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("fastload: error: ") and captured.err.count("\n") == 1
    assert f"s3://{s3_bucket}/absent" in captured.err
    assert not (tmp_path / "x").exists() or not visible_files(tmp_path / "x")


def test_cli_pull_subprocess_not_a_tty(tmp_path: Path) -> None:
    """Not a terminal: no bar on stderr, the summary line there and only the path on stdout; exit 0."""
    src = make_files(tmp_path / "src", {"model.safetensors": blob(300_000), "config.json": b"{}"})
    out = tmp_path / "out"
    done = subprocess.run([*FASTLOAD, "pull", str(src), "--to", str(out), "--chunk-size", "64KiB"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}\n"
    assert done.stderr.strip().splitlines() == ["2 file(s) fetched (293.0 KiB), 0 already complete"] or (
        len(done.stderr.strip().splitlines()) == 1 and "2 file(s) fetched" in done.stderr), done.stderr
    assert "\r" not in done.stderr and "%" not in done.stderr


def test_s3_listing_with_a_key_that_is_also_a_folder(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    """S3 can hold ``m/x`` and ``m/x/y``; a file system cannot. A clear typed error naming the path, and no
    file left half-written under a final name."""
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="m/model.safetensors", Body=blob(1000))
    client.put_object(Bucket=s3_bucket, Key="m/extra", Body=b"file")
    client.put_object(Bucket=s3_bucket, Key="m/extra/inner.json", Body=b"{}")
    out = tmp_path / "out"
    with pytest.raises(fastload.FastloadError) as err:
        pull_result(f"s3://{s3_bucket}/m/", to=out, config=LoadConfig())
    assert "extra" in str(err.value)


def test_http_index_naming_a_missing_shard(http_server: RangeHTTPServer, http_dir: Path, tmp_path: Path) -> None:
    src = http_dir / "gone"
    sharded_with_names(src, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    (src / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    with pytest.raises(fastload.SourceNotFoundError, match="model-00002-of-00002.safetensors"):
        pull_result(http_server.url_for(src) + "/", to=out)
    assert not (out / "model-00002-of-00002.safetensors").exists()


def test_same_local_source_spelled_relative_then_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same directory named by a relative path, then by its absolute path (or from another working
    directory): the same files, unchanged, so the second pull rewrites nothing that is complete."""
    make_files(tmp_path / "models" / "src", {"model.safetensors": blob(500_000), "config.json": b"{}"})
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path / "models")
    first = pull_result("src", to=out)
    assert sorted(first.fetched) == ["config.json", "model.safetensors"]
    again = pull_result(str(tmp_path / "models" / "src"), to=out)
    assert again.fetched == () and again.bytes_fetched == 0, again
    monkeypatch.chdir(tmp_path)
    assert pull_result("models/src/", to=out).fetched == ()


def test_http_empty_standard_file(http_server: RangeHTTPServer, http_dir: Path, tmp_path: Path) -> None:
    """An empty file among the standard model files (a ranged GET of an empty file gets 416): pulled as an
    empty file, and found complete the next time."""
    src = http_dir / "empty"
    tiny_checkpoint(src / "model.safetensors")
    (src / "added_tokens.json").write_bytes(b"")
    (src / "config.json").write_text("{}")
    url = http_server.url_for(src) + "/"
    out = tmp_path / "out"
    result = pull_result(url, to=out)
    assert sorted(result.fetched) == ["added_tokens.json", "config.json", "model.safetensors"]
    assert (out / "added_tokens.json").read_bytes() == b""
    assert pull_result(url, to=out).fetched == ()
