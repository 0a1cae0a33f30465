"""Audit: local files as a source (sources/local.py, resolve.py for paths, sinks/host.py), with and without
``LoadConfig(direct_io=True)``.

Special files, links, permissions (checked as an unprivileged user in a child process: these tests run as
root), files changed under a running load, odd layouts and offsets past 4 GiB with O_DIRECT, many files,
odd names and relative paths. ``safetensors`` is the reference, bit for bit; nothing of fastload is mocked.
Every load is bounded by ``bounded`` (a daemon thread with a join timeout), so a hang fails instead.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import save_file

import fastload
from checkpoints import evict, write_single
from reliability_helpers import bounded, same_bytes

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def reference(path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in safetensors.torch.load_file(str(path)).items()}


def assert_matches(got: dict, want: dict, dtype=None) -> None:
    assert set(got) == set(want), (sorted(got), sorted(want))
    for name, tensor in want.items():
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        assert same_bytes(got[name], tensor), name
        assert got[name].untyped_storage().nbytes() == got[name].numel() * got[name].element_size(), name


def open_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out


def o_direct_works(path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    return True


def raw_file(path: Path, header: dict | str, data: bytes = b"") -> Path:
    h = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    hb = h.encode()
    path.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    return path


# -- special files: never a hang, always a typed error naming the path ------------------------------------


@pytest.mark.parametrize("kind", ["empty", "five_bytes", "zero_length_header", "dev_null", "dev_zero", "fifo",
                                  "empty_dir_named_like_a_file", "symlink_loop", "dangling_symlink"])
def test_special_paths_fail_fast_with_a_typed_error(tmp_path, kind):
    path = tmp_path / "x.safetensors"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "five_bytes":
        path.write_bytes(b"\x01\x02\x03\x04\x05")
    elif kind == "zero_length_header":
        path.write_bytes(struct.pack("<Q", 0))
    elif kind == "dev_null":
        path = Path("/dev/null")
    elif kind == "dev_zero":
        path = Path("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)  # nobody ever writes: opening it blocking, or reading it, would hang
    elif kind == "empty_dir_named_like_a_file":
        path.mkdir()
    elif kind == "symlink_loop":
        os.symlink(tmp_path / "y.safetensors", path)
        os.symlink(path, tmp_path / "y.safetensors")
    elif kind == "dangling_symlink":
        os.symlink(tmp_path / "gone.safetensors", path)
    before = open_fds()
    for config in (fastload.LoadConfig(), fastload.LoadConfig(direct_io=True, local_cold_readers=1)):
        with pytest.raises(fastload.FastloadError) as info:
            bounded(lambda: fastload.load(path, config=config))
        assert str(path) in str(info.value), str(info.value)
        if kind == "dangling_symlink":
            assert isinstance(info.value, fastload.SourceNotFoundError)
        if kind in ("empty", "five_bytes", "zero_length_header"):
            assert isinstance(info.value, fastload.FormatError)
        with pytest.raises(fastload.FastloadError):
            bounded(lambda: fastload.plan([path, path]))
    assert open_fds() <= before


def test_directory_named_like_a_file_is_a_checkpoint_directory(tmp_path):
    """A directory is a checkpoint directory whatever its name (README: "A directory ... is a checkpoint
    directory"): ``x.safetensors/`` holding ``model.safetensors`` loads that."""
    d = tmp_path / "x.safetensors"
    tensors = {"a": torch.arange(7.0), "b": torch.arange(3, dtype=torch.int16)}
    write_single(d / "model.safetensors", tensors)
    assert_matches(bounded(lambda: fastload.load(d)), tensors)
    assert_matches(bounded(lambda: fastload.load(str(d) + "/")), tensors)


def test_directory_listing_does_not_silently_drop_a_dangling_shard(tmp_path):
    """A directory without index or model.safetensors loads "every *.safetensors in it". One of them a
    dangling symlink (a half-deleted HF cache snapshot, a shard on an unmounted volume) must fail, naming
    it: returning the other shards' tensors alone is a partial checkpoint presented as complete."""
    a = {"a": torch.arange(5.0)}
    write_single(tmp_path / "part-1.safetensors", a)
    os.symlink(tmp_path / "elsewhere" / "part-2.safetensors", tmp_path / "part-2.safetensors")
    with pytest.raises(fastload.SourceNotFoundError) as info:
        got = bounded(lambda: fastload.load(tmp_path))
        pytest.fail(f"loaded {sorted(got)} without the dangling part-2.safetensors")
    assert "part-2.safetensors" in str(info.value)


@pytest.mark.parametrize("dangling", ["model.safetensors", "model.safetensors.index.json"])
def test_dangling_model_file_does_not_fall_back_to_other_weights(tmp_path, dangling):
    """A checkpoint directory whose ``model.safetensors`` (or index) is a symlink to a blob that is gone (a
    Hugging Face cache snapshot after a partial ``delete-cache``, or an interrupted download) must fail
    naming it, not fall through to "every *.safetensors" and hand back an adapter's weights as the model.
    (transformers, which never lists, raises "no file named model.safetensors" here.)"""
    write_single(tmp_path / "adapter_model.safetensors", {"lora_A": torch.ones(2, 3)})
    os.symlink(tmp_path / "blobs" / "0123abcd", tmp_path / dangling)
    with pytest.raises(fastload.SourceNotFoundError) as info:
        got = bounded(lambda: fastload.load(tmp_path))
        pytest.fail(f"loaded {sorted(got)} in place of the dangling {dangling}")
    assert dangling in str(info.value)


def test_index_naming_a_fifo_or_device_fails_fast(tmp_path):
    write_single(tmp_path / "s1.safetensors", {"a": torch.arange(4.0)})
    os.mkfifo(tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with pytest.raises(fastload.FastloadError) as info:
        bounded(lambda: fastload.load(tmp_path))
    assert "s2.safetensors" in str(info.value)


# -- permissions: root without its DAC capabilities (root reads anything) --------------------------------------------

CHILD = textwrap.dedent(r"""
    import ctypes, json, os, sys
    import fastload  # imported first: the interpreter lives under /root, which only root may enter

    # Root without CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH and CAP_FOWNER: file modes apply to it as to anyone.
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0
    drop = ~((1 << 1) | (1 << 2) | (1 << 3)) & 0xFFFFFFFF
    data[0].effective &= drop
    data[0].permitted &= drop
    assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
    assert open("/proc/self/status").read().count("CapEff")
    out = {}
    for key, source in json.loads(sys.argv[1]).items():
        try:
            got = fastload.load(source)
            out[key] = ["ok", sorted(got)]
        except BaseException as exc:
            out[key] = [type(exc).__name__, isinstance(exc, fastload.FastloadError), str(exc)]
    print(json.dumps(out))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="drops root's capabilities in a child")
def test_unreadable_files_and_directories_raise_source_permission_error():
    base = Path(tempfile.mkdtemp(prefix="fastload-perm-", dir="/tmp"))
    try:
        base.chmod(0o755)
        write_single(base / "locked.safetensors", {"a": torch.arange(3.0)}).chmod(0o000)
        closed = base / "closed"  # no search permission: nothing inside can even be stat'ed
        write_single(closed / "model.safetensors", {"a": torch.arange(3.0)})
        closed.chmod(0o000)
        unlisted = base / "unlisted"  # search but no read: files can be opened by name, not listed
        write_single(unlisted / "w.safetensors", {"a": torch.arange(3.0)}).chmod(0o644)
        unlisted.chmod(0o111)
        ok = base / "ok.safetensors"
        write_single(ok, {"a": torch.arange(3.0)}).chmod(0o644)
        sources = {"file": str(base / "locked.safetensors"), "closed_dir": str(closed),
                   "unlisted_dir": str(unlisted), "ok": str(ok),
                   "list_with_locked": [str(ok), str(base / "locked.safetensors")]}
        script = base / "child.py"
        script.write_text(CHILD)
        script.chmod(0o644)
        run = subprocess.run([sys.executable, str(script), json.dumps(sources)], capture_output=True, text=True,
                             timeout=60, cwd=str(base))
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["ok"] == ["ok", ["a"]], out
        wrong = {key: out[key] for key in ("file", "closed_dir", "unlisted_dir", "list_with_locked")
                 if out[key][:2] != ["SourcePermissionError", True]}
        assert not wrong, f"not a SourcePermissionError: {wrong}"
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
        subprocess.run(["rm", "-rf", str(base)], check=False)


# -- files changed under a running load -------------------------------------------------------------------


def _mid_load(tmp_path, action, direct: bool, dtype=None):
    path = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(11)
    tensors = {"w": torch.randn(3 * MiB // 4, generator=g), "v": torch.randn(MiB // 4 + 3, generator=g),
               "i": torch.arange(1001, dtype=torch.int64)}
    save_file(tensors, str(path))
    want = reference(path)
    evict(path)
    fired = []

    def progress(done, total):
        if not fired:
            fired.append(done)
            action(path)
            if direct and path.exists():
                evict(path)

    config = fastload.LoadConfig(chunk_bytes=MiB, host_buffer_bytes=4 * MiB, max_concurrency=1,
                                 direct_io=direct)
    try:
        got = bounded(lambda: fastload.load(str(path), config=config, progress=progress, dtype=dtype))
    except (fastload.SourceChangedError, fastload.IntegrityError) as exc:
        assert fired
        return exc
    assert fired, "progress never ran"
    assert_matches(got, want, dtype)
    return got


@pytest.mark.parametrize("direct", [False, True], ids=["page_cache", "direct_io"])
def test_file_unlinked_mid_load_still_loads_the_old_bytes(tmp_path, direct):
    """POSIX keeps an unlinked file's bytes for the descriptors open on it: nothing changed, nothing mixed;
    the load should complete with exactly the old bytes."""
    result = _mid_load(tmp_path, lambda p: p.unlink(), direct)
    assert isinstance(result, dict), f"an unlinked (unchanged) file failed the load: {result!r}"


@pytest.mark.parametrize("direct", [False, True], ids=["page_cache", "direct_io"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["raw", "convert"])
def test_file_renamed_over_mid_load_gives_all_old_bytes(tmp_path, direct, dtype):
    """The atomic save (write a temp file, rename it over the path): the load's descriptor keeps the old file,
    intact; the local transport's docstring promises such a load completes on the old version."""

    def replace(path):
        newer = path.with_name("newer.safetensors")
        save_file({"w": torch.ones(3 * MiB // 4), "v": torch.ones(MiB // 4 + 3),
                   "i": torch.zeros(1001, dtype=torch.int64)}, str(newer))
        os.replace(newer, path)

    result = _mid_load(tmp_path, replace, direct, dtype)
    assert isinstance(result, dict), f"a rename over the path failed the load: {result!r}"


@pytest.mark.parametrize("direct", [False, True], ids=["page_cache", "direct_io"])
def test_file_appended_to_mid_load_never_returns_mixed_bytes(tmp_path, direct):
    def append(path):
        with open(path, "ab") as f:
            f.write(b"\x7f" * (3 * MiB))

    _mid_load(tmp_path, append, direct)  # a typed error or exactly the old bytes


@pytest.mark.parametrize("direct", [False, True], ids=["page_cache", "direct_io"])
def test_file_truncated_between_plan_and_load(tmp_path, direct):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(MiB), "t": torch.arange(9, dtype=torch.uint8)}, str(path))
    plan = bounded(lambda: fastload.plan(path))
    assert plan.output_bytes == 4 * MiB + 9
    size = path.stat().st_size
    os.truncate(path, size - 5)  # the last tensor's tail is gone
    evict(path)
    config = fastload.LoadConfig(direct_io=direct, chunk_bytes=MiB, host_buffer_bytes=4 * MiB)
    with pytest.raises(fastload.FormatError):
        bounded(lambda: fastload.load(path, config=config))
    with open(path, "ab") as f:  # the same size again, the tail now zeros: a new, valid file
        f.write(b"\0" * 5)
    got = bounded(lambda: fastload.load(path, config=config))
    assert_matches(got, reference(path))


@pytest.mark.parametrize("direct", [False, True], ids=["page_cache", "direct_io"])
def test_file_truncated_mid_stream_with_cold_readers_gate(tmp_path, direct):
    """One ordered cold reader (``local_cold_readers=1``), several workers waiting at the gate, and the file
    cut short after the first chunk: a typed error, promptly, and no tensor of zeros handed out before it."""
    path = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(2)
    tensors = {f"t{i}": torch.randn(MiB // 4 + i, generator=g) for i in range(8)}  # 8 x ~1 MiB
    save_file(tensors, str(path))
    want = reference(path)
    evict(path)
    fired = []

    def progress(done, total):
        if not fired:
            fired.append(done)
            os.truncate(path, path.stat().st_size // 3)

    config = fastload.LoadConfig(chunk_bytes=MiB, host_buffer_bytes=8 * MiB, max_concurrency=4,
                                 local_cold_readers=1, direct_io=direct)
    seen = {}

    def consume():
        with fastload.stream(path, config=config, progress=progress) as s:
            for name, tensor in s:
                seen[name] = tensor

    with pytest.raises((fastload.SourceChangedError, fastload.IntegrityError)):
        bounded(consume)
    assert fired
    for name, tensor in seen.items():  # whatever was handed out before the error is whole and right
        assert same_bytes(tensor, want[name]), name


# -- odd layouts with O_DIRECT; offsets past 4 GiB in a sparse file -----------------------------------------


@pytest.fixture
def odd_file(tmp_path):
    """Unaligned starts, zero-size tensors, ranges over 1 MiB (the O_DIRECT threshold), a 1-byte tensor at
    the very end, and a file size that is no multiple of 512."""
    g = torch.Generator().manual_seed(7)
    tensors = {
        "a_lead": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),
        "b_big": torch.randn(MiB // 2 + 1, generator=g),  # 2 MiB + 4
        "c_empty": torch.zeros(0, 5),
        "d_half": torch.randn(700_001, generator=g).half(),
        "e_bf16": torch.randn(600_003, generator=g).bfloat16(),
        "f_empty_int": torch.zeros(0, dtype=torch.int32),
        "g_ids": torch.randint(-1000, 1000, (300_007,), generator=g, dtype=torch.int32),
        "h_bool": torch.rand(1_300_001, generator=g) > 0.5,
        "z_last": torch.tensor([True]),  # bool, named last: the 1 byte at the very end of the file
    }
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    assert path.stat().st_size % 512 != 0
    # the 1-byte tensor is last in the file
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__") == \
        header["z_last"]["data_offsets"][1]
    return path


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16], ids=["raw", "f32", "f16"])
@pytest.mark.parametrize("names", [None, ["z_last", "b_big", "c_empty"], ["h_bool", "d_half"]],
                         ids=["all", "tail_big_empty", "bool_half"])
@pytest.mark.parametrize("cfg", [
    dict(chunk_bytes=MiB, host_buffer_bytes=2 * MiB),  # the smallest budget: no room left for scratch
    dict(chunk_bytes=MiB, host_buffer_bytes=5 * MiB, local_cold_readers=1, max_concurrency=3),
    dict(chunk_bytes=4 * MiB, host_buffer_bytes=64 * MiB, local_threads=1),
], ids=["tiny_budget", "gate", "roomy_one_thread"])
def test_direct_io_odd_layout_names_and_dtype_bit_exact(odd_file, dtype, names, cfg):
    want = reference(odd_file)
    if names is not None:
        want = {n: want[n] for n in names}
    evict(odd_file)
    trace = fastload.Trace()
    got = bounded(lambda: fastload.load(odd_file, names=names, dtype=dtype, trace=trace,
                                        config=fastload.LoadConfig(direct_io=True, **cfg)))
    assert list(got) == [n for n in reference(odd_file) if n in want] or set(got) == set(want)
    assert_matches(got, want, dtype)
    if names is None and dtype is None and cfg.get("host_buffer_bytes", 0) >= 5 * MiB and o_direct_works(odd_file):
        assert trace.summary().counters.get("bytes_direct", 0) >= MiB, "the O_DIRECT path did not run"
    if names is not None:
        fetched = trace.summary().counters.get("bytes_fetched", 0)
        wanted = sum(t.numel() * t.element_size() for t in want.values())
        header = 8 + struct.unpack("<Q", odd_file.read_bytes()[:8])[0]
        assert fetched <= wanted + header, f"fetched {fetched} bytes for {wanted} bytes of {names}"


def _sparse_with_tail(path: Path, tail: dict[str, bytes], hole: int) -> dict:
    """A file whose first tensor is ``hole`` bytes of zeros (never written: a hole), then ``tail`` tensors
    (uint8, real bytes) at offsets past ``hole``."""
    header = {"hole": {"dtype": "U8", "shape": [hole], "data_offsets": [0, hole]}}
    at = hole
    for name, data in tail.items():
        header[name] = {"dtype": "U8", "shape": [len(data)], "data_offsets": [at, at + len(data)]}
        at += len(data)
    raw_file(path, header)
    start = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(start + at)
        f.seek(start + hole)
        f.write(b"".join(tail.values()))
    return header


@pytest.mark.parametrize("direct", [False, True], ids=["page_cache", "direct_io"])
def test_tensors_past_4_gib_in_a_sparse_file_with_names(tmp_path, direct):
    """Offsets past 2**32 (and 2**31) in every read path; ``names=`` reads only what it names (a 4 GiB
    neighbour is neither read nor allocated)."""
    g = torch.Generator().manual_seed(4)
    tail = {"mid": torch.randint(0, 256, (3 * MiB + 123,), generator=g, dtype=torch.uint8).numpy().tobytes(),
            "last": b"\x5a"}
    path = tmp_path / "sparse.safetensors"
    _sparse_with_tail(path, tail, 4 * GiB + 4097)
    evict(path)
    trace = fastload.Trace()
    got = bounded(lambda: fastload.load(path, names=["mid", "last"], trace=trace, config=fastload.LoadConfig(
        chunk_bytes=MiB, host_buffer_bytes=8 * MiB, direct_io=direct)))
    with safetensors.safe_open(str(path), framework="pt") as f:
        want = {n: f.get_tensor(n).clone() for n in ("mid", "last")}
    assert_matches(got, want)
    assert trace.summary().counters.get("bytes_fetched", 0) < 4 * MiB


def test_sparse_file_with_trailing_bytes_past_what_the_header_promises(tmp_path):
    """safetensors refuses a file longer than its header's tensors (MetadataIncompleteBuffer); so must
    fastload, and quickly (it must not read the 4 GiB)."""
    path = raw_file(tmp_path / "t.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                    struct.pack("<4f", 1, 2, 3, 4))
    os.truncate(path, path.stat().st_size + 4 * GiB)
    with pytest.raises(Exception):
        safetensors.torch.load_file(str(path))
    for direct in (False, True):
        with pytest.raises(fastload.FormatError):
            bounded(lambda: fastload.load(path, config=fastload.LoadConfig(direct_io=direct)), seconds=5)


# -- many files ---------------------------------------------------------------------------------------------


def test_two_hundred_single_tensor_files_in_a_list(tmp_path):
    g = torch.Generator().manual_seed(9)
    paths, want = [], {}
    for i in range(200):
        t = torch.randn(i * 37 + 1, generator=g)
        if i % 3 == 0:
            t = t.half()
        p = write_single(tmp_path / f"f{i:03d}.safetensors", {f"t{i}": t})
        paths.append(str(p))
        want[f"t{i}"] = t
    before = open_fds()
    for config in (fastload.LoadConfig(), fastload.LoadConfig(direct_io=True, local_cold_readers=1,
                                                              chunk_bytes=MiB, host_buffer_bytes=2 * MiB)):
        got = bounded(lambda: fastload.load(paths, config=config), seconds=20)
        assert list(got) == list(want)
        assert_matches(got, want)
        got = bounded(lambda: fastload.load(paths, config=config, dtype=torch.bfloat16), seconds=20)
        assert_matches(got, want, torch.bfloat16)
    assert open_fds() <= before
    # the directory, listed: the same tensors
    assert_matches(bounded(lambda: fastload.load(tmp_path), seconds=20), want)


# -- names and paths ----------------------------------------------------------------------------------------

ODD_NAMES = ["with space.safetensors", "ünïcødé-模型.safetensors", "new\nline.safetensors",
             "back\\slash.safetensors", "hash#frag?q=1.safetensors", "per%20cent.safetensors",
             "C:\\models\\llama.safetensors", " lead-and-trail .safetensors", "semi;colon,comma.safetensors"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_file_names_load_as_paths_and_file_uris(tmp_path, name):
    """On Linux a backslash, '#', '?', '%' or a newline is an ordinary file-name character."""
    g = torch.Generator().manual_seed(len(name))
    tensors = {"a": torch.randn(1000, generator=g), "b": torch.arange(5, dtype=torch.int64)}
    path = write_single(tmp_path / name, tensors)
    for source in (path, str(path), path.as_uri(), [str(path)]):
        assert_matches(bounded(lambda: fastload.load(source)), tensors)


@pytest.mark.parametrize("dirname", ["my models", "模型 dir", "a#b?c", "with\\backslash"])
def test_odd_directory_names_with_an_index(tmp_path, dirname):
    d = tmp_path / dirname
    t1 = {"a": torch.arange(10.0)}
    t2 = {"b": torch.arange(5, dtype=torch.int64)}
    write_single(d / "shard one.safetensors", t1)
    write_single(d / "shard ü.safetensors", t2)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "shard one.safetensors", "b": "shard ü.safetensors"}}))
    for source in (d, str(d) + "/", d.as_uri() + "/", d / "model.safetensors.index.json"):
        assert_matches(bounded(lambda: fastload.load(source)), t1 | t2)


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    t = {"a": torch.arange(6.0)}
    write_single(tmp_path / "m.safetensors", t)
    t1, t2 = {"x": torch.ones(3)}, {"y": torch.zeros(2, dtype=torch.int8)}
    write_single(tmp_path / "ck" / "s1.safetensors", t1)
    write_single(tmp_path / "ck" / "sub" / "s2.safetensors", t2)
    (tmp_path / "ck" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "s1.safetensors", "y": "sub/s2.safetensors"}}))
    monkeypatch.chdir(tmp_path)
    for source in ("m.safetensors", "./m.safetensors", Path("m.safetensors"), "ck/../m.safetensors"):
        assert_matches(bounded(lambda: fastload.load(source)), t)
    for source in ("ck", "ck/", "./ck", Path("ck"), "ck/model.safetensors.index.json"):
        assert_matches(bounded(lambda: fastload.load(source)), t1 | t2)
    monkeypatch.chdir(tmp_path / "ck" / "sub")
    assert_matches(bounded(lambda: fastload.load("../../m.safetensors")), t)
    assert_matches(bounded(lambda: fastload.load(".")), t2)


def test_tilde_is_not_silently_another_file(tmp_path, monkeypatch):
    """The README does not promise ``~`` expansion (safetensors does not expand it either): ``~/m`` is either
    the home file or a SourceNotFoundError naming the path as given, never something else."""
    home = tmp_path / "home"
    t = {"a": torch.arange(4.0)}
    write_single(home / "m.safetensors", t)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    try:
        got = bounded(lambda: fastload.load("~/m.safetensors"))
    except fastload.SourceNotFoundError as exc:
        assert "~/m.safetensors" in str(exc)
    else:
        assert_matches(got, t)


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="no memfd_create")
@pytest.mark.parametrize("direct", [False, True], ids=["page_cache", "direct_io"])
def test_memfd_through_proc_self_fd(tmp_path, direct):
    """``/proc/self/fd/N`` of an anonymous memory file (a checkpoint handed over as a descriptor): a regular
    file without O_DIRECT, reached through a magic link. Bit-exact either way."""
    src = tmp_path / "m.safetensors"
    g = torch.Generator().manual_seed(13)
    save_file({"w": torch.randn(MiB // 2 + 7, generator=g), "i": torch.arange(33, dtype=torch.int16)}, str(src))
    fd = os.memfd_create("ckpt")
    try:
        os.write(fd, src.read_bytes())
        path = f"/proc/self/fd/{fd}"
        for dtype in (None, torch.float16):
            got = bounded(lambda: fastload.load(path, dtype=dtype, config=fastload.LoadConfig(
                direct_io=direct, chunk_bytes=MiB, host_buffer_bytes=4 * MiB)))
            assert_matches(got, reference(src), dtype)
    finally:
        os.close(fd)


# -- open descriptors: bounded, and a file reopened must be the one pinned ------------------------------------


def _segments(info, start: int, n: int):
    from fastload.sources import Segment

    buf = bytearray(n)
    return buf, [Segment(start, memoryview(buf))]


def test_descriptors_are_bounded_and_a_reopened_file_is_checked(tmp_path):
    """With room for 2 descriptors, reading 5 files closes the idle ones; reading an evicted file again reopens
    it, and a file renamed over it meanwhile is a SourceChangedError, never the new bytes in the old's place."""
    import asyncio

    from fastload.sources.local import LocalTransport
    from reliability_helpers import fds

    paths = [tmp_path / f"f{i}.bin" for i in range(5)]
    for i, p in enumerate(paths):
        p.write_bytes(bytes([i]) * 4096)

    async def main():
        transport = LocalTransport(2, fastload.Trace(), max_open=2)
        try:
            infos = [await transport.stat(str(p)) for p in paths]
            assert len(transport._fds) == 2
            before = fds()
            for i, info in enumerate(infos):  # each read reopens what the stats closed
                buf, segs = _segments(info, 100, 16)
                await transport.read(info, segs)
                assert bytes(buf) == bytes([i]) * 16
            assert len(transport._fds) == 2 and len(fds()) <= len(before) + 1
            replacement = tmp_path / "new.bin"
            replacement.write_bytes(b"\xff" * 4096)
            os.replace(replacement, paths[0])  # f0's descriptor was closed for f3/f4
            buf, segs = _segments(infos[0], 0, 16)
            with pytest.raises(fastload.SourceChangedError, match="f0.bin"):
                await transport.read(infos[0], segs)
            buf, segs = _segments(infos[4], 0, 16)  # still open: read from the pinned descriptor
            await transport.read(infos[4], segs)
            assert bytes(buf) == b"\x04" * 16
        finally:
            await transport.aclose()

    asyncio.run(main())


def test_a_load_of_more_shards_than_descriptors_is_exact(tmp_path):
    """A 40-shard checkpoint in a process allowed 48 open files (12 for shards): loaded bit-exact."""
    from checkpoints import write_sharded

    tensors = {f"t{i}": torch.full((1000 + i,), float(i)) for i in range(40)}
    write_sharded(tmp_path / "ck", tensors, 40)
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
        import torch, fastload
        from safetensors.torch import load_file
        import glob
        got = fastload.load({str(tmp_path / "ck")!r})
        want = {{}}
        for f in sorted(glob.glob({str(tmp_path / "ck" / "*.safetensors")!r})):
            want.update(load_file(f))
        assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
