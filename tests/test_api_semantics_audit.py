"""Audit: the public API's semantics over local files (load / stream / plan, LoadConfig, dtype=, names=,
sources, indexes, header strictness against the reference).

Only what the rest of the suite does not already cover (see test_contract.py and test_load.py).
Real files in tmp_path; ``safetensors`` is the reference; nothing of fastload is mocked. Every load is
bounded by ``bounded`` (a daemon thread with a join timeout) so a regression fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

import fastload
from checkpoints import write_single
from reliability_helpers import bounded, same_bytes

SMALL = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=128 * 1024, max_concurrency=3)

FLOATS = ["float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
          "float8_e5m2fnuz", "float8_e8m0fnu"]
FLOATS = [f for f in FLOATS if hasattr(torch, f)]


def raw_file(path: Path, header: str, data: bytes) -> Path:
    """A safetensors file with exactly this header text (the reference writer would never produce it)."""
    h = header.encode("utf-8")
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def reference_rejects(path: Path) -> bool:
    try:
        safetensors.torch.load_file(str(path))
    except Exception:  # noqa: BLE001 - SafetensorError and friends
        return True
    return False


# -- header strictness: "validated at least as strictly as safetensors" (README, format/) ---------------

def test_tensor_name_with_a_lone_surrogate_escape_is_a_format_error(tmp_path):
    r"""``"a\ud800"`` is not a Unicode string: the reference (serde_json) refuses the header; Python's json
    accepts it and fastload hands out a dict key that cannot even be encoded to UTF-8."""
    path = raw_file(tmp_path / "m.safetensors",
                    '{"a\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4))
    assert reference_rejects(path)
    with pytest.raises(fastload.FormatError, match="m.safetensors"):
        bounded(lambda: fastload.load(path))


def test_metadata_value_with_a_lone_surrogate_escape_is_a_format_error(tmp_path):
    path = raw_file(tmp_path / "m.safetensors",
                    '{"__metadata__": {"k": "\\udc80"}, "a": {"dtype": "F32", "shape": [1], '
                    '"data_offsets": [0, 4]}}', bytes(4))
    assert reference_rejects(path)
    with pytest.raises(fastload.FormatError):
        bounded(lambda: fastload.plan(path))


@pytest.mark.parametrize("entry", [
    '{"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}',
    '{"dtype": "F32", "shape": [1], "data_offsets": [-0, 4]}',
], ids=["shape", "data_offsets"])
def test_negative_zero_integer_is_a_format_error(tmp_path, entry):
    """JSON ``-0`` is a float to the reference (``invalid type: floating point``) and so not a usize;
    Python's json reads it as the int 0."""
    data = bytes(4) if "[0, 4]" in entry or "-0, 4" in entry else b""
    path = raw_file(tmp_path / "m.safetensors", '{"a": ' + entry + '}', data)
    assert reference_rejects(path)
    with pytest.raises(fastload.FormatError):
        bounded(lambda: fastload.load(path))


@pytest.mark.parametrize("header,data", [
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}   ', bytes(4)),
    ('  {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)),
    ('{"__metadata__": null, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)),
    ('{"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)),
    ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": {"x": "y"}}', bytes(4)),
], ids=["trailing-space", "leading-space", "null-metadata", "empty-name", "metadata-last"])
def test_headers_the_reference_accepts_load_the_same(tmp_path, header, data):
    path = raw_file(tmp_path / "m.safetensors", header, data)
    want = safetensors.torch.load_file(str(path))
    got = bounded(lambda: fastload.load(path))
    assert list(got) == list(want) and all(same_bytes(got[n], want[n]) for n in want)


# -- indexes ----------------------------------------------------------------------------------------------

def test_index_naming_a_shard_with_a_lone_surrogate_is_a_format_error(tmp_path):
    """A hostile index value that no file system path can hold: FormatError, not a raw UnicodeEncodeError
    from ``os.stat`` escaping the error hierarchy."""
    write_single(tmp_path / "s1.safetensors", {"a": torch.arange(4.0)})
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "s\\ud800.safetensors"}}')
    with pytest.raises(fastload.FastloadError):
        bounded(lambda: fastload.load(tmp_path))


def test_index_with_extra_keys_and_a_wrong_total_size_still_loads(tmp_path):
    tensors = {"a": torch.arange(4.0), "b": torch.ones(3, dtype=torch.int32)}
    write_single(tmp_path / "s1.safetensors", tensors)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 999, "extra": [1, 2]}, "weight_map": {"a": "s1.safetensors",
                                                                          "b": "s1.safetensors"},
         "something_else": {"x": 1}}))
    got = bounded(lambda: fastload.load(tmp_path))
    assert set(got) == set(tensors) and all(same_bytes(got[n], tensors[n]) for n in tensors)
    assert bounded(lambda: fastload.plan(tmp_path)).index_metadata["total_size"] == 999


def test_index_shards_reached_through_symlinks(tmp_path):
    real = tmp_path / "store"
    t1 = {"a": torch.arange(10.0)}
    t2 = {"b": torch.arange(5, dtype=torch.int64)}
    write_single(real / "x.safetensors", t1)
    write_single(real / "y.safetensors", t2)
    ck = tmp_path / "ck"
    (ck / "sub").mkdir(parents=True)
    os.symlink(real / "x.safetensors", ck / "model-1.safetensors")
    os.symlink(real / "y.safetensors", ck / "sub" / "model-2.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-1.safetensors", "b": "sub/model-2.safetensors"}}))
    got = bounded(lambda: fastload.load(ck, config=SMALL))
    assert same_bytes(got["a"], t1["a"]) and same_bytes(got["b"], t2["b"])
    linked_dir = tmp_path / "linked"
    os.symlink(ck, linked_dir)
    assert set(bounded(lambda: fastload.load(linked_dir))) == {"a", "b"}


def test_index_naming_itself_as_a_shard_is_a_format_error(tmp_path):
    write_single(tmp_path / "s1.safetensors", {"a": torch.arange(4.0)})
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors.index.json"}}))
    with pytest.raises(fastload.FormatError):
        bounded(lambda: fastload.load(tmp_path))


# -- sources ----------------------------------------------------------------------------------------------

def test_file_uri_of_a_non_utf8_file_name_round_trips(tmp_path):
    """``Path.as_uri()`` percent-encodes the file system's bytes (``w%FF.safetensors``); a ``file://`` URL
    must name the same file back (``unquote`` as UTF-8 turns ``%FF`` into U+FFFD, another name)."""
    path = tmp_path / os.fsdecode(b"w\xff.safetensors")
    tensors = {"a": torch.arange(3.0)}
    write_single(path, tensors)
    assert same_bytes(bounded(lambda: fastload.load(path))["a"], tensors["a"])  # the plain path works
    uri = path.as_uri()
    assert "%FF" in uri
    got = bounded(lambda: fastload.load(uri))
    assert same_bytes(got["a"], tensors["a"])


def test_bytes_path_is_a_config_error_or_loads(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    for source in (bytes(path), [bytes(path)]):
        try:
            got = bounded(lambda: fastload.load(source))
        except fastload.ConfigError:
            continue
        assert same_bytes(got["a"], torch.arange(3.0))


def test_same_tensor_name_in_two_files_names_both_files(tmp_path):
    """Also when the second file is the first one through a symlink or as a ``file://`` URL, and when a
    directory listing brings both."""
    x = write_single(tmp_path / "d" / "x.safetensors", {"a": torch.arange(4.0), "b": torch.ones(3)})
    y = write_single(tmp_path / "d" / "y.safetensors", {"a": torch.zeros(4), "c": torch.ones(2)})
    os.symlink(x, tmp_path / "link.safetensors")
    for source, second in (([x, y], "y.safetensors"), ([x, tmp_path / "link.safetensors"], "link.safetensors"),
                           ([x, x.as_uri()], "file://"), (tmp_path / "d", "y.safetensors")):
        with pytest.raises(fastload.FormatError) as info:
            bounded(lambda: fastload.load(source))
        assert "'a'" in str(info.value) and "x.safetensors" in str(info.value) and second in str(info.value)


def test_list_mixing_a_file_and_a_directory_without_index(tmp_path):
    write_single(tmp_path / "x.safetensors", {"a": torch.arange(4.0)})
    write_single(tmp_path / "e" / "model.safetensors", {"q": torch.ones(2)})
    got = bounded(lambda: fastload.load([tmp_path / "x.safetensors", tmp_path / "e"]))
    assert set(got) == {"a", "q"}


def test_directory_of_non_model_safetensors_files_loads_them_all(tmp_path):
    write_single(tmp_path / "adapter_model.safetensors", {"lora.A": torch.ones(2, 3)})
    write_single(tmp_path / "extra.safetensors", {"emb": torch.arange(6, dtype=torch.int32)})
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub.safetensors").mkdir()  # a directory with the suffix is not a file to read
    os.mkfifo(tmp_path / "pipe.safetensors")  # nor a FIFO (opening it would block forever)
    got = bounded(lambda: fastload.load(tmp_path))
    assert set(got) == {"lora.A", "emb"}


# -- dtype= -----------------------------------------------------------------------------------------------

def _mixed_float_checkpoint(path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i, name in enumerate(FLOATS):
        values = torch.randn(20_000 + 17 * i, generator=g) * 30
        values[:8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 65520.0, 3e38])
        if name == "float8_e8m0fnu":
            values = values.abs() + 2.0 ** -12
        tensors[name] = values.to(getattr(torch, name))
        tensors[name + ".small"] = torch.randn(3, generator=g).abs().to(getattr(torch, name))
        tensors[f"ints{i}"] = torch.arange(i + 5, dtype=torch.int16)
    tensors["flags"] = torch.tensor([True, False])
    tensors["cplx"] = torch.randn(3, dtype=torch.complex64, generator=g)
    return write_single(path, tensors)


@pytest.mark.parametrize("target", FLOATS)
def test_every_float_dtype_to_every_float_dtype_matches_torch_to(tmp_path, target):
    """Bit-exact against ``tensor.to(dtype)`` of the reference's tensor, across many chunks, for load and
    stream, with the dtype given as a torch dtype, its name and ``"torch.<name>"``; others untouched."""
    path = _mixed_float_checkpoint(tmp_path / "m.safetensors")
    want_dtype = getattr(torch, target)
    ref = safetensors.torch.load_file(str(path))
    for spec in (want_dtype, target, "torch." + target):
        got = bounded(lambda: fastload.load(path, dtype=spec, config=SMALL))
        assert list(got) == list(ref)

        def streamed():
            with fastload.stream(path, dtype=spec, config=SMALL) as s:
                return dict(s)

        for result in (got, bounded(streamed)):
            for name, tensor in ref.items():
                want = tensor.to(want_dtype) if tensor.is_floating_point() else tensor
                assert same_bytes(result[name], want), (name, spec)


@pytest.mark.parametrize("bad", ["int8", "torch.int8", "BF16", "auto", "finfo", "bfloat16 ", "", "torch.",
                                 torch.int32, torch.complex64, float, 16])
def test_dtype_that_is_not_a_float_dtype_is_a_config_error(tmp_path, bad):
    path = write_single(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    with pytest.raises(fastload.ConfigError):
        fastload.load(path, dtype=bad)


# -- names= -----------------------------------------------------------------------------------------------

def test_names_accepts_any_iterable_and_duplicates_and_keeps_checkpoint_order(tmp_path):
    tensors = {"a": torch.arange(4.0), "b": torch.ones(3), "c": torch.arange(2, dtype=torch.int64)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    order = list(safetensors.torch.load_file(str(path)))
    for names in ((n for n in ["c", "a", "c"]), {"c", "a"}, ("a", "c", "a"), ["c", "a"], {"a": 1, "c": 2}):
        got = bounded(lambda: fastload.load(path, names=names))
        assert list(got) == [n for n in order if n in ("a", "c")]
        assert all(same_bytes(got[n], tensors[n]) for n in got)
    with fastload.stream(path, names=iter(["b", "b"])) as s:
        assert [n for n, _ in s] == ["b"]


def test_unknown_names_list_every_unknown_one(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {"a": torch.arange(4.0)}, metadata={"k": "v"})
    with pytest.raises(fastload.ConfigError) as info:
        fastload.load(path, names=["a", "zz", "__metadata__", "zz"])
    message = str(info.value)
    assert "'zz'" in message and "'__metadata__'" in message and "m.safetensors" in message
    with pytest.raises(fastload.ConfigError, match="zz"):
        fastload.plan(path, names=["zz"])


# -- stream() ---------------------------------------------------------------------------------------------

def test_stream_is_an_iterable_not_an_iterator_and_a_finished_one_yields_nothing_more(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {"a": torch.arange(4.0), "b": torch.ones(3)})
    s = fastload.stream(path)
    assert s.plan is None
    with pytest.raises(TypeError):
        len(s)
    with s:
        first = next(iter(s))
        rest = bounded(lambda: list(s))
        assert sorted([first[0]] + [n for n, _ in rest]) == ["a", "b"]
        assert bounded(lambda: list(s)) == []  # exhausted, not hung
        assert [t.name for t in s.plan.tensors] == ["a", "b"]
    assert bounded(lambda: list(s)) == []


# -- progress ---------------------------------------------------------------------------------------------

def test_progress_reaches_the_total_once_with_conversion(tmp_path):
    tensors = {"a": torch.randn(300_000), "e": torch.empty(0), "i": torch.arange(7)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    calls = []
    bounded(lambda: fastload.load(path, dtype=torch.float16, config=SMALL, progress=lambda d, t: calls.append((d, t))))
    total = sum(t.nbytes for t in tensors.values())
    assert calls and calls[-1] == (total, total)
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:])) and {t for _, t in calls} == {total}


def test_progress_callback_error_propagates_and_leaves_no_thread(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {"a": torch.randn(300_000)})
    before = set(threading.enumerate())

    def boom(done, total):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        bounded(lambda: fastload.load(path, config=SMALL, progress=boom))
    left = [t for t in threading.enumerate() if t not in before and t.is_alive() and t.name.startswith("fastload")]
    assert not left


# -- LoadConfig: validated on construction (ConfigError), every field ------------------------------------

@pytest.mark.parametrize("make", [
    lambda: fastload.LoadConfig(http_headers=None),
    lambda: fastload.LoadConfig(http_headers=5),
    lambda: fastload.LoadConfig(http_headers=[("X-A", "b")]),
    lambda: fastload.LoadConfig(http_headers={"X-A": 1}),
    lambda: fastload.LoadConfig(http_headers={1: "b"}),
    lambda: fastload.LoadConfig(http_headers={"X-A": "ok\r\nHost: evil.example"}),
    lambda: fastload.LoadConfig(http_headers={"Bad Name:": "v"}),
], ids=["None", "int", "list", "int-value", "int-name", "crlf-value", "bad-name"])
def test_http_headers_are_validated_on_construction(make):
    """The README: LoadConfig is 'validated on construction (ConfigError)'. ``http_headers`` is the one field
    that is not: a bad value is accepted and fails later, in the middle of an HTTP load, as an AttributeError,
    a TypeError or http.client's ValueError (and a CR/LF in a value is a header-injection attempt)."""
    with pytest.raises(fastload.ConfigError):
        make()


@pytest.mark.parametrize("make", [
    lambda: fastload.LoadConfig(stall_timeout_s=float("nan")),
    lambda: fastload.LoadConfig(stall_timeout_s=float("inf")),
    lambda: fastload.LoadConfig(connect_timeout_s=-1),
    lambda: fastload.LoadConfig(connect_timeout_s=0),
    lambda: fastload.LoadConfig(stall_timeout_s=True),
    lambda: fastload.LoadConfig(chunk_bytes=2 ** 70),
    lambda: fastload.LoadConfig(chunk_bytes=-64),
    lambda: fastload.LoadConfig(chunk_bytes=float(64 << 20)),
    lambda: fastload.LoadConfig(chunk_bytes=True),
    lambda: fastload.LoadConfig(max_concurrency=0),
    lambda: fastload.LoadConfig(max_concurrency=2 ** 70),
    lambda: fastload.LoadConfig(local_threads=0),
    lambda: fastload.LoadConfig(local_cold_readers=0),
    lambda: fastload.LoadConfig(host_buffer_bytes=-1),
    lambda: fastload.LoadConfig(host_buffer_bytes=True),
    lambda: fastload.LoadConfig(http_engine=None),
    lambda: fastload.LoadConfig(retry=None),
    lambda: fastload.LoadConfig(s3=None),
    lambda: fastload.RetryConfig(backoff_base_s=float("nan")),
    lambda: fastload.RetryConfig(backoff_max_s=float("inf")),
    lambda: fastload.RetryConfig(backoff_base_s=-1),
    lambda: fastload.RetryConfig(deadline_s=float("nan")),
    lambda: fastload.RetryConfig(deadline_s=0),
    lambda: fastload.RetryConfig(max_attempts=0),
    lambda: fastload.S3Options(presign_expiry_s=True),
    lambda: fastload.S3Options(region=5),
], ids=[f"case{i}" for i in range(26)])
def test_config_rejects_nan_inf_negative_zero_huge_and_bool_values(make):
    with pytest.raises(fastload.ConfigError):
        make()


def test_frozen_config_is_hashable_and_not_changed_through_the_callers_dict():
    """'One frozen object': a frozen dataclass is hashable (usable as a cache key) and its fields do not
    change after construction. The ``http_headers`` dict makes ``hash(LoadConfig())`` raise TypeError, and the
    caller's dict, kept as is, changes the 'frozen' config (bypassing its validation) when mutated."""
    hash(fastload.LoadConfig())
    headers = {"X-A": "1"}
    config = fastload.LoadConfig(http_headers=headers)
    headers["X-A"] = "2"
    headers["X-B"] = "3"
    assert dict(config.http_headers) == {"X-A": "1"}


def test_huge_but_accepted_timeouts_do_not_break_an_http_load(http_server, http_dir):
    """A config that LoadConfig accepts must work: ``stall_timeout_s=1e300`` (say, 'never') is a finite number,
    but ``socket.settimeout`` / ``Event.wait`` overflow on it (OverflowError: timestamp out of range).
    Either reject it on construction or load."""
    tensors = {"a": torch.arange(1000.0)}
    write_single(http_dir / "m.safetensors", tensors)
    url = http_server.url_for(http_dir / "m.safetensors")
    for field in ("stall_timeout_s", "connect_timeout_s"):
        try:
            config = SMALL.replace(**{field: 1e300}, retry=fastload.RetryConfig(max_attempts=2, deadline_s=10))
        except fastload.ConfigError:
            continue
        got = bounded(lambda: fastload.load(url, config=config))
        assert same_bytes(got["a"], tensors["a"]), field


def test_numpy_int_config_values_give_plain_ints_to_plan_json_and_trace_files(tmp_path):
    """LoadConfig accepts numpy integers on purpose (config._is_int: 'An integer, numpy's included'). They must
    not leak into what fastload serialises: ``plan.chunk_bytes`` stays an ``np.int64`` (chunk_size returns
    ``config.chunk_bytes`` as is), so ``plan.to_json()`` and ``trace.to_dict()`` raise TypeError, and a load with
    ``trace="x.json"`` fails after its tensors were read and writes no trace."""
    np = pytest.importorskip("numpy")
    path = write_single(tmp_path / "m.safetensors", {"a": torch.randn(100_000), "i": torch.arange(5)})
    config = fastload.LoadConfig(chunk_bytes=np.int64(64 * 1024), host_buffer_bytes=np.int64(1 << 20),
                                 max_concurrency=np.int64(3), local_threads=np.int64(2))
    plan = bounded(lambda: fastload.plan(path, config=config))
    assert json.loads(plan.to_json())["chunk_bytes"] == 64 * 1024
    trace = fastload.Trace()
    got = bounded(lambda: fastload.load(path, config=config, trace=trace, dtype=torch.float16))
    assert set(got) == {"a", "i"}
    json.dumps(trace.to_dict())
    out = tmp_path / "trace.json"
    bounded(lambda: fastload.load(path, config=config, trace=str(out)))
    assert json.loads(out.read_text())


# -- ownership after conversion and names subsets ---------------------------------------------------------

@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float8_e5m2])
def test_results_own_their_memory_with_names_subsets(tmp_path, dtype):
    tensors = {f"t{i}": torch.full((50, 33), float(i)) for i in range(6)} | {"ids": torch.arange(12)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    got = bounded(lambda: fastload.load(path, dtype=dtype, names=["t1", "t3", "ids"], config=SMALL))
    storages = set()
    for name, tensor in got.items():
        assert tensor.is_contiguous() and tensor._base is None, name
        assert tensor.untyped_storage().nbytes() == tensor.nbytes, name
        storages.add(tensor.untyped_storage().data_ptr())
        tensor.view(-1)[0] = 0  # writable
    assert len(storages) == len(got)
