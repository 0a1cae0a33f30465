"""Audit: local sources that change, or are odd, while fastload reads them.

What ``test_local_source_audit.py``, ``test_memory_and_races.py`` and ``test_direct_io.py`` already cover for one
file (unlink, rename over, append, truncate, in-place rewrite mid-load; special files as a load source) is not
repeated here. This file takes the multi-shard view: a *later* shard of an index cut short, appended to, rewritten
in place, replaced or removed while the load / stream / ``direct_io`` load is on an earlier one (the error must
name that shard and a byte range; no thread or descriptor may stay behind; a stream hands out only whole, right
tensors); a checkpoint directory reached through a symlink that is swapped to a new release while the load
resolves it; ``fastload.pull`` from a local source that changes mid-pull (nothing partial under a final name, and
the next pull completes); odd local sources for ``pull`` (FIFOs, sockets, device links, symlink loops) and for
``load`` (a data region that is a hole, tmpfs with ``direct_io``, a path that is not UTF-8).

``safetensors`` is the reference, bit for bit. Nothing of fastload is mocked; one test passes a ``fastload.Trace``
subclass whose ``count`` (after doing its own work) performs the swap at a fixed point of the resolve, the only
way to place it there deterministically.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

import fastload
from checkpoints import evict
from reliability_helpers import Leaks, Timer, bounded, same_bytes

MiB = 1 << 20
TYPED = (fastload.SourceChangedError, fastload.IntegrityError, fastload.TransferError, fastload.FormatError)


def reference(path) -> dict[str, torch.Tensor]:
    """safetensors' tensors, cloned (its own are views of a mapping, which would pin the pages in the cache)."""
    return {k: v.clone() for k, v in safetensors.torch.load_file(str(path)).items()}


def assert_exact(got: dict, want: dict) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name, tensor in want.items():
        assert same_bytes(got[name], tensor), name


# -- a four-shard index: a later shard changes while an earlier one is read ---------------------------------------


def _sharded(root: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, bytes]]:
    """4 shards of ~3.2 MiB (three ~1 MiB float tensors and an int64 one each) and their index."""
    ck = root / "ck"
    ck.mkdir()
    g = torch.Generator().manual_seed(5)
    weight_map, want = {}, {}
    for s in range(4):
        tensors = {f"s{s}.w{i}": torch.randn(256, 1024 + s, generator=g) for i in range(3)}
        tensors[f"s{s}.ids"] = torch.arange(333 * (s + 1), dtype=torch.int64)
        name = f"model-{s + 1:05d}-of-00004.safetensors"
        save_file(tensors, str(ck / name))
        want.update(reference(ck / name))
        weight_map.update({k: name for k in tensors})
    (ck / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    originals = {name: (ck / name).read_bytes() for name in set(weight_map.values())}
    for name in originals:
        evict(ck / name)
    return ck, want, originals


VICTIM = "model-00003-of-00004.safetensors"  # from ~6.3 MiB into the load: unread when the first chunk lands


def _mutate(path: Path, original: bytes, action: str) -> None:
    if action == "truncate_half":
        os.truncate(path, len(original) // 2)
    elif action == "truncate_to_header":
        os.truncate(path, 100)
    elif action == "truncate_last_byte":
        os.truncate(path, len(original) - 1)
    elif action == "append":
        with open(path, "ab") as f:
            f.write(b"\x7f" * 4096)
    elif action == "rewrite_same_length":  # other bytes, same size: what can only the timestamps tell?
        with open(path, "r+b") as f:
            f.seek(len(original) // 2)
            f.write(bytes(255 - b for b in original[len(original) // 2:len(original) // 2 + MiB]))
    else:
        raise AssertionError(action)


SCENARIOS = {  # mode, LoadConfig extras, load keywords
    "load": ("load", {}, {}),
    "stream": ("stream", {}, {}),
    "load_direct_io": ("load", {"direct_io": True}, {}),
    "stream_direct_io": ("stream", {"direct_io": True}, {}),
    "convert_bf16_direct_io": ("load", {"direct_io": True}, {"dtype": torch.bfloat16}),
    "shard_dim1_rows": ("load", {}, {"shard": fastload.Shard(0, 2, {r"\.w\d$": 1})}),
    "verify_checksums": ("load", {"verify_checksums": True}, {}),
}


def _expected(want: dict, kwargs: dict) -> dict:
    out = {}
    for name, tensor in want.items():
        if kwargs.get("dtype") is not None and tensor.is_floating_point():
            tensor = tensor.to(kwargs["dtype"])
        if "shard" in kwargs and ".w" in name:
            tensor = tensor.tensor_split(2, 1)[0].contiguous()
        out[name] = tensor
    return out


def _run(ck: Path, mode: str, config: fastload.LoadConfig, progress, kwargs: dict) -> tuple[dict, object]:
    """(tensors handed out, the result or the exception)."""
    seen: dict = {}

    def go():
        if mode == "stream":
            with fastload.stream(ck, config=config, progress=progress, **kwargs) as s:
                for name, tensor in s:
                    seen[name] = tensor
            return seen
        return fastload.load(ck, config=config, progress=progress, **kwargs)

    try:
        return seen, bounded(go, seconds=15)
    except fastload.FastloadError as exc:
        return seen, exc


@pytest.mark.parametrize("action", ["truncate_half", "truncate_to_header", "truncate_last_byte", "append",
                                    "rewrite_same_length"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_later_shard_changed_mid_load_is_a_typed_error_naming_it(tmp_path, scenario, action):
    """The third shard changes once the first chunk of the first has landed. The load must end in a typed
    fastload error whose ``url`` is that shard and whose ``byte_range`` lies inside it; a stream may have handed
    out tensors before, each whole and right; nothing (thread, descriptor, temporary file) stays behind."""
    mode, extra, kwargs = SCENARIOS[scenario]
    ck, want, originals = _sharded(tmp_path)
    victim = ck / VICTIM
    fired = []

    def progress(done, total):
        if done and not fired:
            fired.append(done)
            _mutate(victim, originals[VICTIM], action)
            if extra.get("direct_io"):
                evict(victim)

    config = fastload.LoadConfig(chunk_bytes=MiB, max_concurrency=2, host_buffer_bytes=4 * MiB, **extra)
    with Leaks() as leaks:
        seen, result = _run(ck, mode, config, progress, kwargs)
        leaks.check(grace_s=1.0)
    assert fired, "progress never ran"
    assert isinstance(result, TYPED), f"{action} of {VICTIM} mid-load gave {type(result).__name__}, not an error"
    assert result.url == str(victim), (result.url, str(result))
    assert str(victim) in str(result)
    if not isinstance(result, fastload.FormatError):
        assert result.byte_range is not None, str(result)
        start, end = result.byte_range
        assert 0 <= start < end <= len(originals[VICTIM]), result.byte_range
    expected = _expected(want, kwargs)
    for name, tensor in seen.items():  # whatever a stream handed out before the error is whole and right
        assert same_bytes(tensor, expected[name]), name
        assert not name.startswith("s2."), f"{name} of the changed shard was handed out"


@pytest.mark.parametrize("direct", [False, True], ids=["page_cache", "direct_io"])
@pytest.mark.parametrize("action", ["replace", "unlink"])
def test_later_shard_replaced_or_removed_mid_load_gives_its_old_bytes(tmp_path, direct, action):
    """Every shard was opened while the headers were read: a shard renamed over (the atomic save) or removed
    while the load is on an earlier one is still read from that descriptor, whole and unchanged."""
    ck, want, originals = _sharded(tmp_path)
    victim = ck / VICTIM
    fired = []

    def progress(done, total):
        if done and not fired:
            fired.append(done)
            if action == "replace":
                newer = ck / "newer.tmp"
                newer.write_bytes(originals[VICTIM][:-4096] + b"\0" * 4096)
                os.replace(newer, victim)
                evict(victim)
            else:
                victim.unlink()

    config = fastload.LoadConfig(chunk_bytes=MiB, max_concurrency=2, host_buffer_bytes=4 * MiB, direct_io=direct)
    with Leaks() as leaks:
        got = bounded(lambda: fastload.load(ck, config=config, progress=progress), seconds=15)
        leaks.check(grace_s=1.0)
    assert fired
    assert_exact(got, want)


# -- a checkpoint directory reached through a symlink that is swapped to another release ---------------------------


def _release(root: Path, name: str, fill: float) -> None:
    """One release of a 4-shard model: same shard and tensor names in every release, other values."""
    d = root / name
    d.mkdir()
    weight_map = {}
    for s in range(4):
        shard = f"model-{s + 1:05d}-of-00004.safetensors"
        save_file({f"layer{s}.weight": torch.full((1000,), fill)}, str(d / shard))
        weight_map[f"layer{s}.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


class SwapAfterSecondShardOpened(fastload.Trace):
    """A Trace that, after counting the first bytes read of shard 2 (its open, during resolve), points
    ``current`` at ``v2`` the way ``ln -sfn v2 current`` does (a new link renamed over the old)."""

    def __init__(self, current: Path):
        super().__init__()
        self.current = current
        self.swapped = False

    def count(self, name, n=1, key=None):
        super().count(name, n, key)
        if (name == "bytes_fetched" and key and key.endswith("model-00002-of-00004.safetensors")
                and not self.swapped):
            self.swapped = True
            tmp = self.current.with_name("current.new")
            os.symlink("v2", tmp)
            os.replace(tmp, self.current)


def test_symlinked_release_directory_swapped_during_resolve_never_mixes_releases(tmp_path):
    """``current -> v1``, swapped atomically to ``v2`` (``ln -sfn``; Kubernetes' atomic volume writer does the
    same with ``..data``) while a load of ``current/`` is opening its shards. Each file is consistent, but the
    README's promise ("bytes of two versions are never mixed") is worth little if the *model* comes back half
    v1, half v2 without a word: the load must give one release whole, or raise SourceChangedError."""
    _release(tmp_path, "v1", 1.0)
    _release(tmp_path, "v2", 2.0)
    current = tmp_path / "current"
    os.symlink("v1", current)
    trace = SwapAfterSecondShardOpened(current)
    config = fastload.LoadConfig(local_threads=1, max_concurrency=1)  # shards opened one by one, in index order
    try:
        got = bounded(lambda: fastload.load(current, config=config, trace=trace))
    except fastload.SourceChangedError:
        return
    assert trace.swapped, "the swap never ran"
    values = {name: tensor[0].item() for name, tensor in sorted(got.items())}
    assert len(set(values.values())) == 1, f"one model, two releases: {values}"


def test_pull_of_a_symlinked_release_directory_swapped_mid_listing_never_mixes_releases(tmp_path):
    """The same swap under ``fastload.pull``: the destination must hold one release, or the pull fail."""
    _release(tmp_path, "v1", 1.0)
    _release(tmp_path, "v2", 2.0)
    current = tmp_path / "current"
    os.symlink("v1", current)
    trace = SwapAfterSecondShardOpened(current)
    out = tmp_path / "out"
    try:
        bounded(lambda: fastload.pull(current, to=out, trace=trace,
                                      config=fastload.LoadConfig(local_threads=1, max_concurrency=1)))
    except fastload.SourceChangedError:
        return
    assert trace.swapped
    values = {p.name: safetensors.torch.load_file(str(p))[f"layer{int(p.name[6:11]) - 1}.weight"][0].item()
              for p in sorted(out.glob("*.safetensors"))}
    assert len(values) == 4 and len(set(values.values())) == 1, f"one pulled model, two releases: {values}"


# -- fastload.pull from a local source that changes mid-pull -------------------------------------------------------


def _pull_source(root: Path) -> tuple[Path, bytes]:
    src = root / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file({f"t{i}": torch.randn(MiB // 4, generator=g) for i in range(8)}, str(src / "model.safetensors"))
    (src / "config.json").write_text('{"model_type": "x"}')
    evict(src / "model.safetensors")
    return src, (src / "model.safetensors").read_bytes()


@pytest.mark.parametrize("action", ["truncate_half", "truncate_to_header", "append", "rewrite_same_length"])
def test_pull_of_a_file_changed_mid_pull_fails_cleanly_and_the_next_pull_completes(tmp_path, action):
    src, original = _pull_source(tmp_path)
    out = tmp_path / "out"
    fired = []

    def progress(done, total):
        if done and not fired:
            fired.append(done)
            _mutate(src / "model.safetensors", original, action)

    config = fastload.LoadConfig(chunk_bytes=MiB, max_concurrency=1, host_buffer_bytes=2 * MiB)
    with Leaks() as leaks, pytest.raises(fastload.FastloadError) as info:
        bounded(lambda: fastload.pull(src, to=out, config=config, progress=progress))
    leaks.check(grace_s=1.0)
    assert fired
    assert isinstance(info.value, (fastload.SourceChangedError, fastload.IntegrityError)), repr(info.value)
    assert info.value.url == str(src / "model.safetensors"), str(info.value)
    assert not (out / "model.safetensors").exists(), "a partial file under its final name"
    # The next pull fetches what the source holds now, whole.
    now = (src / "model.safetensors").read_bytes()
    if action.startswith("truncate"):  # (a truncated safetensors file is still a file to pull)
        assert len(now) < len(original)
    bounded(lambda: fastload.pull(src, to=out, config=config))
    assert (out / "model.safetensors").read_bytes() == now
    assert (out / "config.json").read_text() == '{"model_type": "x"}'


@pytest.mark.parametrize("action", ["replace", "unlink"])
def test_pull_of_a_file_replaced_or_removed_mid_pull_copies_the_old_version_whole(tmp_path, action):
    src, original = _pull_source(tmp_path)
    out = tmp_path / "out"
    fired = []
    newer = original[:-4] + b"\0\0\0\0"

    def progress(done, total):
        if done and not fired:
            fired.append(done)
            path = src / "model.safetensors"
            if action == "replace":
                (src / "new.tmp").write_bytes(newer)
                os.replace(src / "new.tmp", path)
            else:
                path.unlink()

    config = fastload.LoadConfig(chunk_bytes=MiB, max_concurrency=1, host_buffer_bytes=2 * MiB)
    bounded(lambda: fastload.pull(src, to=out, config=config, progress=progress))
    assert fired
    assert (out / "model.safetensors").read_bytes() == original
    if action == "replace":  # the next pull sees the new version and fetches it
        bounded(lambda: fastload.pull(src, to=out, config=config))
        assert (out / "model.safetensors").read_bytes() == newer


@pytest.mark.parametrize("kind", ["fifo", "unix_socket", "link_to_dev_zero", "symlink_loop", "dangling_link"])
def test_pull_of_a_directory_holding_an_odd_entry_fails_fast_and_writes_nothing_partial(tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    save_file({"a": torch.arange(10.0)}, str(src / "model.safetensors"))
    odd = src / "extra.txt"
    sock = None
    if kind == "fifo":
        os.mkfifo(odd)  # nobody writes: reading it would hang
    elif kind == "unix_socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(odd))
    elif kind == "link_to_dev_zero":  # endless: reading it whole would never end
        os.symlink("/dev/zero", odd)
    elif kind == "symlink_loop":
        os.symlink(src / "loop2.txt", odd)
        os.symlink(odd, src / "loop2.txt")
    else:
        os.symlink(src / "gone.txt", odd)
    out = tmp_path / "out"
    try:
        with Leaks() as leaks, Timer() as timer, pytest.raises(fastload.FastloadError) as info:
            bounded(lambda: fastload.pull(src, to=out), seconds=10)
        leaks.check(grace_s=1.0)
    finally:
        if sock is not None:
            sock.close()
    assert timer.s < 5, f"took {timer.s:.1f} s"
    assert "extra.txt" in str(info.value) or "loop2.txt" in str(info.value), str(info.value)
    assert not (out / "extra.txt").exists()
    for p in out.rglob("*"):  # nothing but what is whole, and the pull's own bookkeeping
        if p.is_file() and ".fastload" not in p.parts:
            assert p.name == "model.safetensors" and p.read_bytes() == (src / "model.safetensors").read_bytes()


# -- odd local sources for load ------------------------------------------------------------------------------------


@pytest.mark.parametrize("direct", [False, True], ids=["page_cache", "direct_io"])
def test_data_region_that_is_a_hole_loads_as_zeros(tmp_path, direct):
    """A sparse file whose first tensor's bytes were never written (a hole: zeros, no disk blocks; what a
    preallocating writer leaves), then real bytes: bit-exact with safetensors, through O_DIRECT too."""
    path = tmp_path / "sparse.safetensors"
    header = {"hole": {"dtype": "F32", "shape": [4 * MiB], "data_offsets": [0, 16 * MiB]},
              "tail": {"dtype": "U8", "shape": [5], "data_offsets": [16 * MiB, 16 * MiB + 5]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + 16 * MiB)
        f.seek(0, 2)
        f.write(b"abcde")
    assert os.stat(path).st_blocks * 512 < 4 * MiB  # really sparse
    want = reference(path)
    evict(path)
    trace = fastload.Trace()
    got = bounded(lambda: fastload.load(path, trace=trace, config=fastload.LoadConfig(
        chunk_bytes=MiB, direct_io=direct, host_buffer_bytes=8 * MiB)))
    assert_exact(got, want)


def test_tmpfs_file_with_direct_io_is_exact(tmp_path):
    """/dev/shm is tmpfs: its pages are the page cache itself (O_DIRECT there is refused, or on newer kernels
    meaningless). direct_io must still load it bit-exact, with and without the cold-reader gate and conversion."""
    shm = Path("/dev/shm")
    path = shm / f"fastload-audit-{os.getpid()}.safetensors"
    g = torch.Generator().manual_seed(8)
    try:
        save_file({"w": torch.randn(3 * MiB // 4 + 5, generator=g), "i": torch.arange(77, dtype=torch.int16),
                   "h": torch.randn(1001, generator=g).half()}, str(path))
        want = reference(path)
        for extra in ({}, {"local_cold_readers": 1}):
            config = fastload.LoadConfig(direct_io=True, chunk_bytes=MiB, host_buffer_bytes=4 * MiB, **extra)
            assert_exact(bounded(lambda: fastload.load(path, config=config)), want)
            got = bounded(lambda: fastload.load(path, config=config, dtype=torch.float32))
            assert_exact(got, {k: v.float() if v.is_floating_point() else v for k, v in want.items()})
    finally:
        path.unlink(missing_ok=True)


def test_paths_that_are_not_utf8(tmp_path):
    """A directory and a file whose names are not UTF-8 (os.fsdecode gives surrogates): load, file URI, plan,
    a Chrome trace written to disk, pull, the CLI, and an error naming such a path."""
    root = os.fsencode(tmp_path) + b"/d\xff\xfe"
    os.mkdir(root)
    file_b = root + b"/m\xe9.safetensors"
    tensors = {"a": torch.arange(10.0), "b": torch.arange(3, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "ascii.safetensors"))
    want = reference(tmp_path / "ascii.safetensors")  # (safetensors itself refuses a path that is not UTF-8)
    os.rename(tmp_path / "ascii.safetensors", os.fsdecode(file_b))
    path, folder = os.fsdecode(file_b), os.fsdecode(root)
    for source in (path, Path(path), Path(path).as_uri(), folder, [path]):
        assert_exact(bounded(lambda: fastload.load(source)), want)
    assert bounded(lambda: fastload.plan(path)).output_bytes == 10 * 4 + 3 * 8
    trace_file = tmp_path / "t.json"
    bounded(lambda: fastload.load(path, trace=str(trace_file)))
    json.loads(trace_file.read_text())
    out = tmp_path / "out"
    bounded(lambda: fastload.pull(folder, to=out))
    assert (os.fsencode(out) + b"/m\xe9.safetensors") in [os.fsencode(p) for p in out.iterdir()]
    assert_exact(bounded(lambda: fastload.load(out)), want)
    missing = os.fsdecode(root + b"/no\xff.safetensors")
    with pytest.raises(fastload.SourceNotFoundError) as info:
        bounded(lambda: fastload.load(missing))
    assert missing in str(info.value)
    run = subprocess.run([sys.executable, "-m", "fastload", "inspect", file_b], capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "fastload", "load", root + b"/no\xff.safetensors"],
                         capture_output=True, timeout=60)
    assert run.returncode == 1 and run.stderr.count(b"\n") == 1 and b"Traceback" not in run.stderr, run.stderr
