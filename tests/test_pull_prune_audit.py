"""Audit: ``fastload pull`` into a plain directory removes what an earlier pull of the same source wrote and the
source no longer has (README, "``fastload pull``"), and nothing else.

Real sources only: local folders, the Range HTTP server, moto S3 and the stand-in Hub (tests/hub_server.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastload
from fastload import LoadConfig, RetryConfig
from fastload.cli import main
from fastload.errors import FastloadError
from fastload.pull import apull
from fastload.runner import run
from hub_server import HubServer, hub, hub_session, repo_name  # noqa: F401 -- fixtures
from servers import RangeHTTPServer

SMALL = LoadConfig(chunk_bytes=64 << 10, max_concurrency=4)
FAST_FAIL = SMALL.replace(retry=RetryConfig(max_attempts=1, backoff_base_s=0.0, backoff_max_s=0.0))


def pull_result(source, **kwargs):
    return run(lambda: apull(source, **{"config": SMALL, **kwargs}))


def visible(out: Path) -> list[str]:
    """Every file under ``out`` outside ``.fastload/``, as sorted relative paths."""
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if (p.is_file() or p.is_symlink()) and ".fastload" not in p.relative_to(out).parts)


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randn(257 + i, generator=g) for i in range(4)}


def sharded(folder: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    from checkpoints import write_sharded

    t = tensors(seed)
    write_sharded(folder, t, 2)
    (folder / "config.json").write_text('{"model_type": "x"}')
    return t


def to_single(folder: Path, seed: int = 2) -> dict[str, torch.Tensor]:
    for f in folder.glob("model*"):
        f.unlink()
    t = tensors(seed)
    save_file(t, str(folder / "model.safetensors"))
    return t


SHARDED = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
           "model.safetensors.index.json"]
DROPPED = sorted(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                  "model.safetensors.index.json"])


def files(folder: Path, content: dict[str, bytes]) -> Path:
    for name, data in content.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


# -- local sources: what a user changed stays ----------------------------------------------------------


def test_cli_summary_counts_removed_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    sharded(src)
    assert main(["pull", str(src), "--to", str(out)]) == 0
    capsys.readouterr()
    to_single(src)
    assert main(["pull", str(src), "--to", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"1 file\(s\) fetched \([^)]*\), 1 already complete, 3 removed \(gone from the source\)",
                        err[-1]), err
    assert visible(out) == ["config.json", "model.safetensors"]
    assert main(["pull", str(src), "--to", str(out)]) == 0
    assert "removed" not in capsys.readouterr().err


def test_file_edited_in_place_with_mtime_restored_is_kept(tmp_path: Path) -> None:
    """Same size, mtime restored to the nanosecond (``touch -d`` / ``os.utime``), other bytes: the user changed it,
    so it must not be deleted as "as the earlier pull left it"."""
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, "notes.txt": b"pulled notes"})
    pull_result(str(src), to=out)
    notes = out / "notes.txt"
    st = notes.stat()
    notes.write_bytes(b"MY OWN notes")  # same size
    os.utime(notes, ns=(st.st_atime_ns, st.st_mtime_ns))
    (src / "notes.txt").unlink()
    result = pull_result(str(src), to=out)
    assert notes.exists() and notes.read_bytes() == b"MY OWN notes", \
        f"user's edited file deleted (removed={result.removed})"


def test_file_rewritten_by_hand_with_new_mtime_is_kept(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, "notes.txt": b"pulled notes"})
    pull_result(str(src), to=out)
    time.sleep(0.01)
    (out / "notes.txt").write_bytes(b"pulled notes")  # identical bytes, new mtime: still "changed since"
    (src / "notes.txt").unlink()
    assert pull_result(str(src), to=out).removed == ()
    assert (out / "notes.txt").exists()


def test_symlink_and_directory_with_a_pulled_files_name_are_kept(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, "a.json": b"{}", "b.json": b"{}"})
    pull_result(str(src), to=out)
    mine = files(tmp_path / "mine", {"a.json": b"{}"})
    (out / "a.json").unlink()
    (out / "a.json").symlink_to(mine / "a.json")
    (out / "b.json").unlink()
    (out / "b.json").mkdir()
    (out / "b.json" / "inside").write_text("x")
    (src / "a.json").unlink()
    (src / "b.json").unlink()
    assert pull_result(str(src), to=out).removed == ()
    assert (out / "a.json").is_symlink() and (mine / "a.json").read_bytes() == b"{}"
    assert (out / "b.json" / "inside").read_text() == "x"


def test_pulled_subfolder_replaced_by_a_symlink_elsewhere_is_not_followed(tmp_path: Path) -> None:
    """The user moved a pulled subfolder out (``cp -a``: mtimes kept) and left a symlink to it: removing a file
    the source dropped must not delete through the symlink, outside the destination."""
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, "tok/vocab.txt": b"a\nb\n", "tok/merges.txt": b"m"})
    pull_result(str(src), to=out)
    shared = tmp_path / "shared" / "tok"
    shutil.copytree(out / "tok", shared)  # copy2: mtimes to the nanosecond
    shutil.rmtree(out / "tok")
    (out / "tok").symlink_to(shared, target_is_directory=True)
    (src / "tok" / "vocab.txt").unlink()
    pull_result(str(src), to=out)
    assert (shared / "vocab.txt").exists(), "prune deleted a file outside the destination through a symlink"


def test_file_that_became_a_folder_at_the_source(tmp_path: Path) -> None:
    """The source replaced file ``extra`` by a folder ``extra/``: the earlier pull's unchanged ``extra`` is what the
    source no longer has, and must not block the new layout."""
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, "extra": b"old"})
    pull_result(str(src), to=out)
    (src / "extra").unlink()
    files(src, {"extra/config.json": b"{}"})
    result = pull_result(str(src), to=out)
    assert (out / "extra" / "config.json").read_bytes() == b"{}"
    assert result.removed == ("extra",)


def test_folder_that_became_a_file_at_the_source(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, "extra/config.json": b"{}"})
    pull_result(str(src), to=out)
    shutil.rmtree(src / "extra")
    files(src, {"extra": b"now a file"})
    result = pull_result(str(src), to=out)
    assert (out / "extra").read_bytes() == b"now a file"
    assert result.removed == ("extra/config.json",)


def test_destination_inside_the_source(tmp_path: Path) -> None:
    """``fastload pull ./m --to ./m/copy``: the copy is not part of the source; a second pull copies nothing again
    (README: a second pull rewrites nothing that is complete) and never nests copies in copies."""
    src = files(tmp_path / "m", {"model.safetensors": b"\0" * 64, "config.json": b"{}"})
    out = src / "copy"
    pull_result(str(src), to=out)
    second = pull_result(str(src), to=out)
    assert second.fetched == () and second.removed == ()
    assert visible(out) == ["config.json", "model.safetensors"]


def test_source_inside_the_destination(tmp_path: Path) -> None:
    out = tmp_path / "out"
    src = files(out / "orig", {"model.safetensors": b"\0" * 64, "config.json": b"{}", "old.json": b"{}"})
    pull_result(str(src), to=out)
    (src / "old.json").unlink()
    assert pull_result(str(src), to=out).removed == ("old.json",)
    assert visible(out) == ["config.json", "model.safetensors", "orig/config.json", "orig/model.safetensors"]


def test_two_local_sources_into_one_folder(tmp_path: Path) -> None:
    a = files(tmp_path / "a", {"model.safetensors": b"\1" * 64, "a.json": b"{}", "shared.json": b'{"a":1}'})
    b = files(tmp_path / "b", {"other.safetensors": b"\2" * 64, "b.json": b"{}"})
    out = tmp_path / "out"
    pull_result(str(a), to=out)
    pull_result(str(b), to=out)
    (a / "a.json").unlink()
    assert pull_result(str(a), to=out).removed == ("a.json",)
    assert pull_result(str(b), to=out).removed == ()
    assert visible(out) == ["b.json", "model.safetensors", "other.safetensors", "shared.json"]
    shutil.rmtree(b)
    b.mkdir()
    files(b, {"x.safetensors": b"\3" * 8})
    assert sorted(pull_result(str(b), to=out).removed) == ["b.json", "other.safetensors"]
    assert visible(out) == ["model.safetensors", "shared.json", "x.safetensors"]


@pytest.mark.parametrize("spelling", ["relative", "dot-relative", "trailing-slash", "file-url"])
def test_local_spellings_of_one_source_are_one_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      spelling: str) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    sharded(src)
    pull_result(str(src), to=out)
    to_single(src)
    monkeypatch.chdir(tmp_path)
    second = {"relative": "src", "dot-relative": "./src/../src", "trailing-slash": str(src) + "/",
              "file-url": src.as_uri()}[spelling]
    assert sorted(pull_result(second, to=out).removed) == DROPPED
    assert visible(out) == ["config.json", "model.safetensors"]


def test_symlink_to_the_current_version_is_followed_as_one_source(tmp_path: Path) -> None:
    """``current -> v1`` is pulled, then ``current`` is pointed at ``v2``: the same source, which moved on."""
    from reliability_helpers import assert_bit_exact

    v1, v2, current, out = tmp_path / "v1", tmp_path / "v2", tmp_path / "current", tmp_path / "out"
    sharded(v1)
    v2.mkdir()
    (v2 / "config.json").write_bytes((v1 / "config.json").read_bytes())
    new = tensors(9)
    save_file(new, str(v2 / "model.safetensors"))
    current.symlink_to(v1, target_is_directory=True)
    pull_result(str(current), to=out)
    current.unlink()
    current.symlink_to(v2, target_is_directory=True)
    assert sorted(pull_result(str(current), to=out).removed) == DROPPED
    assert_bit_exact(fastload.load(out), new)


def test_single_file_pull_into_a_pulled_folder_removes_nothing(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    sharded(src)
    pull_result(str(src), to=out)
    other = files(tmp_path / "o", {"model.safetensors": b"\0" * 64})
    result = pull_result(str(other / "model.safetensors"), to=out)
    assert result.removed == () and visible(out) == sorted(SHARDED + ["model.safetensors"])


# -- failures and interruptions: nothing removed, nothing wedged ---------------------------------------


def test_failed_pull_removes_nothing(http_server: RangeHTTPServer, http_dir: Path, tmp_path: Path) -> None:
    src, out = http_dir / "m", tmp_path / "out"
    sharded(src)
    url = http_server.url_for(src) + "/"
    pull_result(url, to=out)
    to_single(src)
    http_server.faults.fail_first(1000, 500, path="*/model.safetensors")
    with pytest.raises(FastloadError):
        pull_result(url, to=out, config=FAST_FAIL)
    assert visible(out) == SHARDED, "a pull that failed removed files"
    http_server.faults.clear()
    assert sorted(pull_result(url, to=out).removed) == DROPPED


def test_state_left_by_a_pull_interrupted_inside_prune(tmp_path: Path) -> None:
    """Killed between removing a file and its record: the next pull neither fails nor fetches the dropped file;
    when the source has the file again it is fetched as usual."""
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, "gone.json": b"{}"})
    pull_result(str(src), to=out)
    (src / "gone.json").unlink()
    (out / "gone.json").unlink()  # the file went, its record stayed
    result = pull_result(str(src), to=out)
    assert result.fetched == () and not (out / "gone.json").exists()
    (src / "gone.json").write_bytes(b'{"back": 1}')
    assert pull_result(str(src), to=out).fetched == ("gone.json",)
    assert (out / "gone.json").read_bytes() == b'{"back": 1}'


def test_partial_file_of_a_dropped_shard_does_not_stay(http_server: RangeHTTPServer, http_dir: Path,
                                                       tmp_path: Path) -> None:
    """An interrupted pull leaves a partial shard in ``.fastload/incomplete`` to resume; once the source no longer
    has that shard, the next complete pull must not keep the partial (it can be GBs) forever."""
    src, out = http_dir / "m", tmp_path / "out"
    from checkpoints import write_sharded

    write_sharded(src, {f"w{i}": torch.randn(200_000) for i in range(2)}, 2)  # ~800 KB a shard
    url = http_server.url_for(src) + "/"

    def stop_after_three(done: int, total: int, calls: list = []) -> None:  # noqa: B006
        calls.append(done)
        if len(calls) > 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull_result(url, to=out, config=SMALL.replace(max_concurrency=1), progress=stop_after_three)
    left = [p for p in (out / ".fastload").rglob("*") if p.is_file() and "model-0000" in p.name]
    assert left, "precondition: the interrupted pull left a partial shard to resume"
    to_single(src)
    pull_result(url, to=out)
    stale = [p.relative_to(out).as_posix() for p in (out / ".fastload").rglob("*")
             if p.is_file() and "model-0000" in p.name]
    assert stale == [], f"partial files of shards the source dropped stay: {stale}"


def test_verify_pull_removes_dropped_files_and_refetches_corrupt_ones(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    sharded(src)
    pull_result(str(src), to=out)
    new = to_single(src)
    result = pull_result(str(src), to=out, verify=True)
    assert sorted(result.removed) == DROPPED
    assert pull_result(str(src), to=out, verify=True).removed == ()
    from reliability_helpers import assert_bit_exact

    assert_bit_exact(fastload.load(out), new)


# -- the records in .fastload/meta ------------------------------------------------------------------


@pytest.mark.parametrize("text", ["null", "[]", '"x"', "3", "{not json", '{"source": "x"}', '{"source": []}'])
def test_corrupt_record_of_a_file_still_at_the_source(tmp_path: Path, text: str) -> None:
    """A record that is not what fastload writes: the file is fetched again, the pull does not crash."""
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, "config.json": b"{}"})
    pull_result(str(src), to=out)
    (out / ".fastload" / "meta" / "config.json.json").write_text(text)
    result = pull_result(str(src), to=out)
    assert "config.json" in result.fetched and result.removed == ()


@pytest.mark.parametrize("source_field", ['"x"', "[]", "3", '{"size": "64"}'])
def test_corrupt_record_of_a_dropped_file_is_kept_not_a_crash(tmp_path: Path, source_field: str) -> None:
    """A record that names this source and the file's mtime but whose ``source`` is not an object: not proof the file
    is as pulled, so it stays; and the pull completes."""
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, "x.json": b"{}"})
    pull_result(str(src), to=out)
    meta = out / ".fastload" / "meta" / "x.json.json"
    saved = json.loads(meta.read_text())
    meta.write_text(json.dumps({**saved, "source": json.loads(source_field)}))
    (src / "x.json").unlink()
    result = pull_result(str(src), to=out)
    assert result.removed == () and (out / "x.json").exists()


def test_record_naming_a_path_outside_the_folder(tmp_path: Path) -> None:
    """Records name files by where they lie under ``.fastload/meta``; what a record's fields say about paths must
    never make a pull delete outside the destination."""
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, "x.json": b"{}"})
    pull_result(str(src), to=out)
    victim = tmp_path / "x.json"
    victim.write_bytes(b"{}")
    meta = out / ".fastload" / "meta" / "x.json.json"
    saved = json.loads(meta.read_text())
    saved["source"]["url"] = "../x.json"
    saved["mtime_ns"] = victim.stat().st_mtime_ns
    meta.write_text(json.dumps(saved))
    (out / ".fastload" / "meta" / "..json").write_text(json.dumps(saved))  # a record for a file named "."
    (src / "x.json").unlink()
    pull_result(str(src), to=out)
    assert victim.read_bytes() == b"{}"
    assert (out / "model.safetensors").exists()


def test_records_of_an_older_fastload_are_adopted(tmp_path: Path) -> None:
    """Records without ``pulled_from`` (an older fastload): the first pull finds the files complete; from then on they
    are this source's, and a file the source drops later is removed."""
    src, out = tmp_path / "src", tmp_path / "out"
    sharded(src)
    pull_result(str(src), to=out)
    for meta in (out / ".fastload" / "meta").rglob("*.json"):
        saved = json.loads(meta.read_text())
        saved.pop("pulled_from")
        meta.write_text(json.dumps(saved))
    upgraded = pull_result(str(src), to=out)
    assert upgraded.fetched == () and upgraded.removed == ()  # not removed without proof: fine
    to_single(src)
    assert sorted(pull_result(str(src), to=out).removed) == DROPPED


def test_many_files_prune_is_quick(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"model.safetensors": b"\0" * 64, **{f"d{i % 10}/f{i:04}.json": b"{}" for i in range(1000)}})
    pull_result(str(src), to=out)
    for i in range(0, 1000, 2):
        (src / f"d{i % 10}" / f"f{i:04}.json").unlink()
    t0 = time.monotonic()
    result = pull_result(str(src), to=out)
    elapsed = time.monotonic() - t0
    assert len(result.removed) == 500 and len(result.present) == 501
    assert len(visible(out)) == 501
    assert elapsed < 5, f"a pull of 1000 files that removes 500 took {elapsed:.1f}s"


# -- HTTP ------------------------------------------------------------------------------------------------


def test_http_rotated_token_is_one_source(http_server: RangeHTTPServer, http_dir: Path, tmp_path: Path) -> None:
    src, out = http_dir / "m", tmp_path / "out"
    sharded(src)
    base = http_server.url_for(src) + "/"
    pull_result(base + "?token=aaa", to=out)
    to_single(src)
    assert sorted(pull_result(base + "?token=bbb", to=out).removed) == DROPPED


def test_http_rotated_token_fetches_nothing_again(http_server: RangeHTTPServer, http_dir: Path,
                                                  tmp_path: Path) -> None:
    """README: a second pull rewrites nothing that is complete; a new token on the same URL is the same source."""
    src, out = http_dir / "m", tmp_path / "out"
    sharded(src)
    base = http_server.url_for(src) + "/"
    pull_result(base + "?token=aaa", to=out)
    second = pull_result(base + "?token=bbb", to=out)
    assert second.fetched == (), f"a rotated token fetched {second.fetched} again"


def test_http_token_is_not_written_to_disk(http_server: RangeHTTPServer, http_dir: Path, tmp_path: Path) -> None:
    """fastload keeps URLs' secrets out of what it shows; the records it leaves in the model folder (which gets
    copied into images and shared) must not hold a presigned signature either."""
    src, out = http_dir / "m", tmp_path / "out"
    sharded(src)
    pull_result(http_server.url_for(src) + "/?X-Amz-Signature=SECRETSIG123", to=out)
    leaks = [p.relative_to(out).as_posix() for p in out.rglob("*")
             if p.is_file() and b"SECRETSIG123" in p.read_bytes()]
    assert leaks == [], f"the signature is stored in {leaks}"


def test_http_base_url_with_and_without_slash_is_one_source(http_server: RangeHTTPServer, http_dir: Path,
                                                            tmp_path: Path) -> None:
    """``https://host/models/llama`` and ``.../llama/`` list the same files (the README's example has no slash):
    a pull with one spelling follows what a pull with the other wrote."""
    src, out = http_dir / "m", tmp_path / "out"
    sharded(src)
    url = http_server.url_for(src)
    pull_result(url + "/", to=out)
    to_single(src)
    assert sorted(pull_result(url, to=out).removed) == DROPPED
    assert visible(out) == ["config.json", "model.safetensors"]


def test_http_single_file_pull_with_token_removes_nothing(http_server: RangeHTTPServer, http_dir: Path,
                                                          tmp_path: Path) -> None:
    src, out = http_dir / "m", tmp_path / "out"
    sharded(src)
    pull_result(http_server.url_for(src) + "/", to=out)
    one = files(http_dir / "one", {"model.safetensors": b"\0" * 64})
    result = pull_result(http_server.url_for(one / "model.safetensors") + "?token=t", to=out)
    assert result.removed == () and visible(out) == sorted(SHARDED + ["model.safetensors"])


# -- S3 --------------------------------------------------------------------------------------------------


def test_s3_overlapping_prefixes_are_different_sources(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    s3_server.put(s3_bucket, "m/model.safetensors", b"\1" * 64)
    s3_server.put(s3_bucket, "m/a.json", b"{}")
    s3_server.put(s3_bucket, "m2/b.json", b"{}")
    s3_server.put(s3_bucket, "m2/other.safetensors", b"\2" * 64)
    out = tmp_path / "out"
    pull_result(f"s3://{s3_bucket}/m", to=out)
    pull_result(f"s3://{s3_bucket}/m2", to=out)
    assert visible(out) == ["a.json", "b.json", "model.safetensors", "other.safetensors"]
    s3_server.client().delete_object(Bucket=s3_bucket, Key="m/a.json")
    assert pull_result(f"s3://{s3_bucket}/m", to=out).removed == ("a.json",)
    assert pull_result(f"s3://{s3_bucket}/m2", to=out).removed == ()
    assert visible(out) == ["b.json", "model.safetensors", "other.safetensors"]


def test_s3_prefix_with_and_without_slash_is_one_source(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    s3_server.put(s3_bucket, "m/model.safetensors", b"\1" * 64)
    s3_server.put(s3_bucket, "m/a.json", b"{}")
    out = tmp_path / "out"
    pull_result(f"s3://{s3_bucket}/m/", to=out)
    s3_server.client().delete_object(Bucket=s3_bucket, Key="m/a.json")
    assert pull_result(f"s3://{s3_bucket}/m", to=out).removed == ("a.json",)
    assert visible(out) == ["model.safetensors"]


# -- hf:// into a plain folder ------------------------------------------------------------------------


def test_hub_new_revision_removes_what_it_dropped(hub: HubServer, tmp_path: Path) -> None:
    from reliability_helpers import assert_bit_exact

    repo = repo_name("prune")
    a, b = tmp_path / "a", tmp_path / "b"
    sharded(a)
    c1 = hub.add_repo(repo, a)
    hub.refs[(repo, "v1")] = c1
    b.mkdir()
    (b / "config.json").write_bytes((a / "config.json").read_bytes())
    new = tensors(5)
    save_file(new, str(b / "model.safetensors"))
    hub.add_repo(repo, b)
    out = tmp_path / "out"
    assert visible(pull_result(f"hf://{repo}@v1", to=out).path) == SHARDED
    result = pull_result(f"hf://{repo}", to=out)
    assert sorted(result.removed) == DROPPED
    assert_bit_exact(fastload.load(out), new)
    assert pull_result(f"hf://{repo}", revision="v1", to=out).removed == ("model.safetensors",)


def test_hub_repo_and_its_subfolder_into_one_folder(hub: HubServer, tmp_path: Path) -> None:
    repo = repo_name("prune-sub")
    a = files(tmp_path / "a", {"model.safetensors": b"\0" * 64, "config.json": b"{}",
                               "sub/model.safetensors": b"\1" * 64, "sub/extra.json": b"{}"})
    hub.add_repo(repo, a)
    out = tmp_path / "out"
    pull_result(f"hf://{repo}", to=out)
    sub = pull_result(f"hf://{repo}/sub/", to=out)  # writes model.safetensors, extra.json at the top
    assert sub.removed == ()
    root = pull_result(f"hf://{repo}", to=out)
    assert root.removed == () and "extra.json" in visible(out)
    assert (out / "sub" / "extra.json").exists()
    single = pull_result(f"hf://{repo}/config.json", to=out)
    assert single.removed == ()
    assert visible(out) == ["config.json", "extra.json", "model.safetensors", "sub/extra.json",
                            "sub/model.safetensors"]


def test_weights_in_another_format_stay_while_the_source_has_them(tmp_path: Path) -> None:
    """A ``.bin`` the source still has (skipped now that it has safetensors too) is not "gone from the source"."""
    src, out = tmp_path / "src", tmp_path / "out"
    files(src, {"pytorch_model.bin": b"\7" * 64, "config.json": b"{}"})
    pull_result(str(src), to=out)
    files(src, {"model.safetensors": b"\0" * 64})
    assert pull_result(str(src), to=out).removed == ()
    assert (out / "pytorch_model.bin").exists()
    (src / "pytorch_model.bin").unlink()
    assert pull_result(str(src), to=out).removed == ("pytorch_model.bin",)


def test_hub_models_prefix_spelling_is_one_source(hub: HubServer, tmp_path: Path) -> None:
    repo = repo_name("prune-sp")
    a = files(tmp_path / "a", {"model.safetensors": b"\0" * 64, "config.json": b"{}", "old.json": b"{}"})
    hub.add_repo(repo, a)
    out = tmp_path / "out"
    pull_result(f"hf://models/{repo}", to=out)
    (a / "old.json").unlink()
    hub.add_repo(repo, a)
    assert pull_result(f"hf://{repo}", to=out).removed == ("old.json",)
