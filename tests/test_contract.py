"""The public contract (issue 2, "What users get" / "How it must work"): the corners.

Only what the rest of the suite does not already cover: directory and index
resolution corners, names= and dtype= edges, memory ownership, stream() misuse,
LoadConfig validation, plan() serialisation, and errors naming the source.
Real files in tmp_path, real servers from conftest; nothing of fastload is mocked.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import write_single
from reliability_helpers import same_bytes

SMALL = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=256 * 1024, max_concurrency=4)


def header_end(path) -> int:
    """8 + N: where the data section of a safetensors file starts (= header bytes a load must read)."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def two_shards(directory, *, weight_map=None):
    """s1: a (1000 f32), x (10 f32); s2: b (2000 f32); an index mapping them (or ``weight_map``)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {"a": torch.arange(1000, dtype=torch.float32), "x": torch.zeros(10),
               "b": torch.full((2000,), 2.0)}
    write_single(directory / "s1.safetensors", {"a": tensors["a"], "x": tensors["x"]})
    write_single(directory / "s2.safetensors", {"b": tensors["b"]})
    wm = weight_map or {"a": "s1.safetensors", "x": "s1.safetensors", "b": "s2.safetensors"}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return tensors


# -- LoadConfig: validated on construction, ConfigError for every bad value ------------------------

@pytest.mark.parametrize("make", [
    lambda: fastload.LoadConfig(max_concurrency=True),
    lambda: fastload.LoadConfig(local_threads=True),
    lambda: fastload.LoadConfig(local_cold_readers=True),
    lambda: fastload.RetryConfig(max_attempts=True),
    lambda: fastload.RetryConfig(max_concurrent_retries=True),
], ids=["max_concurrency", "local_threads", "local_cold_readers", "retry.max_attempts",
        "retry.max_concurrent_retries"])
def test_config_rejects_bool_where_an_int_is_wanted(make):
    """``True`` is not a count (Shard already rejects bools for its ints; LoadConfig should too)."""
    with pytest.raises(fastload.ConfigError):
        make()


@pytest.mark.parametrize("make", [
    lambda: fastload.LoadConfig(host_buffer_bytes="1GiB"),
    lambda: fastload.LoadConfig(stall_timeout_s="5"),
    lambda: fastload.LoadConfig(connect_timeout_s=None),
    lambda: fastload.RetryConfig(max_attempts="3"),
    lambda: fastload.RetryConfig(deadline_s="x"),
    lambda: fastload.S3Options(endpoint_url=5),
    lambda: fastload.S3Options(presign_expiry_s="1h"),
], ids=["host_buffer_bytes-str", "stall_timeout-str", "connect_timeout-None", "retry.max_attempts-str",
        "retry.deadline-str", "s3.endpoint_url-int", "s3.presign_expiry-str"])
def test_config_wrong_types_are_config_errors_not_type_errors(make):
    """Spec: LoadConfig is 'validated on construction (ConfigError)': a wrong type is a ConfigError too,
    not a TypeError or AttributeError from the range checks."""
    with pytest.raises(fastload.ConfigError):
        make()


@pytest.mark.parametrize("make", [
    lambda: fastload.LoadConfig(host_buffer_bytes=1e9),
    lambda: fastload.RetryConfig(max_attempts=2.5),
    lambda: fastload.LoadConfig(direct_io="no"),
    lambda: fastload.LoadConfig(verify_checksums="no"),
    lambda: fastload.S3Options(anonymous="no"),
], ids=["host_buffer_bytes-float", "retry.max_attempts-float", "direct_io-str", "verify_checksums-str",
        "s3.anonymous-str"])
def test_config_accepts_only_the_documented_types(make):
    """A string 'no' for a bool flag is truthy: S3Options(anonymous='no') silently turns anonymous access ON."""
    with pytest.raises(fastload.ConfigError):
        make()


def test_from_env_overflowing_size_is_a_config_error():
    from fastload.config import from_env

    with pytest.raises(fastload.ConfigError):
        from_env({"FASTLOAD_CHUNK_BYTES": "1e400"})  # float -> inf -> int() would raise OverflowError


def test_config_is_frozen_and_replace_revalidates():
    config = fastload.LoadConfig()
    with pytest.raises(Exception):
        config.chunk_bytes = 1 << 20  # frozen
    with pytest.raises(fastload.ConfigError):
        config.replace(max_concurrency=0)


# -- stream(): misuse must not hang ----------------------------------------------------------------

def test_stream_iterated_without_with_does_not_hang(tmp_path):
    """``for n, t in fastload.stream(src)`` (forgetting ``with``) raises at once, saying how to use it.

    The load starts on entering the block, so a bare iteration would wait forever. Checked in a
    daemon thread with a deadline, so that a regression fails instead of hanging the suite.
    """
    path = write_single(tmp_path / "m.safetensors", {"a": torch.ones(4)})
    result: list = []

    def consume():
        try:
            result.append([name for name, _ in fastload.stream(path)])
        except BaseException as exc:  # noqa: BLE001 - raising is an acceptable answer
            result.append(exc)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "iterating a stream outside its with-block hangs forever"
    assert isinstance(result[0], RuntimeError) and "with fastload.stream" in str(result[0])


def test_a_stream_runs_once_and_a_half_read_one_does_not_look_finished(tmp_path):
    tensors = {f"t{i}": torch.full((20_000,), float(i)) for i in range(4)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    s = fastload.stream(path, config=SMALL)
    with s:
        next(iter(s))
    with pytest.raises(RuntimeError, match="closed before its load finished"):
        list(s)
    with pytest.raises(RuntimeError, match="runs once"):
        s.__enter__()
    done = fastload.stream(path, config=SMALL)
    with done:
        assert len(list(done)) == 4
    assert list(done) == []  # a finished stream is simply exhausted


def test_stream_break_then_resume_gives_the_rest_and_local_leaves_no_fd_or_thread(tmp_path):
    tensors = {f"t{i}": torch.full((20_000,), float(i)) for i in range(6)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    config = SMALL.replace(max_concurrency=1)
    fastload.load(path)  # warm imports / lazily created executors
    fds, threads = len(os.listdir("/proc/self/fd")), set(threading.enumerate())
    with fastload.stream(path, config=config) as s:
        first = []
        for name, _ in s:
            first.append(name)
            break
        rest = [name for name, _ in s]
    assert sorted(first + rest) == sorted(tensors)  # iteration resumes where the break left it
    for _ in range(3):  # early exits and consumer exceptions on local files
        with fastload.stream(path, config=config) as s:
            for _ in s:
                break
        with pytest.raises(KeyError):
            with fastload.stream(path, config=config) as s:
                for _ in s:
                    raise KeyError("consumer")
    assert len(os.listdir("/proc/self/fd")) == fds
    assert not [t for t in threading.enumerate() if t not in threads and t.is_alive()]


def test_plan_and_stream_inside_a_running_event_loop(tmp_path):
    tensors = {"a": torch.arange(10, dtype=torch.int32), "b": torch.ones(3, 3)}
    path = write_single(tmp_path / "m.safetensors", tensors)

    async def main():
        plan = fastload.plan(path)
        with fastload.stream(path) as s:
            streamed = dict(s)
        return plan, streamed

    plan, streamed = asyncio.run(main())
    assert {t.name for t in plan.tensors} == {"a", "b"}
    assert all(same_bytes(streamed[n], tensors[n]) for n in tensors)


# -- directory resolution and shard indexes --------------------------------------------------------

def test_index_takes_precedence_over_model_safetensors_and_glob(tmp_path):
    tensors = two_shards(tmp_path)
    write_single(tmp_path / "model.safetensors", {"decoy": torch.ones(1)})
    write_single(tmp_path / "zz.safetensors", {"decoy2": torch.ones(1)})
    got = fastload.load(tmp_path)
    assert set(got) == set(tensors)
    assert all(same_bytes(got[n], tensors[n]) for n in tensors)


def test_model_safetensors_that_is_a_directory_falls_back_to_glob(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    write_single(tmp_path / "w.safetensors", {"z": torch.ones(2)})
    assert list(fastload.load(tmp_path)) == ["z"]


def test_file_urls_with_percent_escapes_and_spaces(tmp_path):
    directory = tmp_path / "dir with space%20 #hash"
    tensors = {"a": torch.arange(6, dtype=torch.int16)}
    write_single(directory / "model.safetensors", tensors)
    uri = directory.as_uri()
    assert "%2520" in uri and "%20" in uri and "%23" in uri
    for source in (uri, uri + "/", uri + "/model.safetensors", str(directory) + "/",
                   "file://localhost" + uri[len("file://"):]):
        got = fastload.load(source)
        assert list(got) == ["a"] and same_bytes(got["a"], tensors["a"]), source


def test_same_file_twice_in_a_list_is_an_error_naming_it(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {"a": torch.ones(2)})
    with pytest.raises(fastload.FastloadError, match="m.safetensors"):
        fastload.load([path, path])


def test_one_element_list_of_an_indexed_dir_validates_the_index_like_the_dir(tmp_path):
    """``load(d)`` rejects an index naming a tensor its shard lacks; so do ``load([d])`` and
    ``load([index])``: a one-element list means what its element means."""
    two_shards(tmp_path, weight_map={"a": "s1.safetensors", "x": "s1.safetensors", "b": "s2.safetensors",
                                     "ghost": "s1.safetensors"})
    with pytest.raises(fastload.FormatError, match="ghost"):
        fastload.load(tmp_path)
    with pytest.raises(fastload.FormatError, match="ghost"):
        fastload.load([tmp_path])
    with pytest.raises(fastload.FormatError, match="ghost"):
        fastload.load([tmp_path / "model.safetensors.index.json"])


def test_a_list_of_checkpoint_directories_loads_each_by_its_own_rules(tmp_path):
    """README: a source is a path "or a list of these": directories with an index, with one model.safetensors
    and with loose shards load together; each index is checked against its own shards only."""
    from checkpoints import write_sharded

    first = two_shards(tmp_path / "indexed")
    second = {"m.w": torch.arange(7.0)}
    write_single(tmp_path / "single" / "model.safetensors", second)
    third = {"p.w": torch.ones(3), "q.w": torch.zeros(5)}
    write_single(tmp_path / "loose" / "p.safetensors", {"p.w": third["p.w"]})
    write_single(tmp_path / "loose" / "q.safetensors", {"q.w": third["q.w"]})
    fourth = {"r.w": torch.full((9,), 4.0), "s.w": torch.full((4,), 5.0)}
    write_sharded(tmp_path / "indexed2", fourth, 2)
    dirs = [tmp_path / "single", tmp_path / "indexed", tmp_path / "loose", tmp_path / "indexed2"]
    got = fastload.load(dirs)
    want = {**first, **second, **third, **fourth}
    assert set(got) == set(want) and all(same_bytes(got[n], want[n]) for n in want)
    plan = fastload.plan(dirs)
    assert plan.index_metadata == {}  # two indexes: neither one's metadata describes the load
    assert fastload.plan([tmp_path / "indexed2"]).index_metadata["total_size"] == 13 * 4
    assert fastload.plan([tmp_path / "indexed2", tmp_path / "single"]).index_metadata == {}  # not the whole load
    with pytest.raises(fastload.FormatError, match="appears in both"):
        fastload.load([tmp_path / "indexed", tmp_path / "indexed"])


def test_an_index_in_a_list_is_checked_against_its_own_shards(tmp_path):
    """The second index names a tensor its shard lacks, which the first checkpoint has: still an error, naming
    the second checkpoint."""
    two_shards(tmp_path / "one")
    write_single(tmp_path / "two" / "t.safetensors", {"t": torch.ones(2)})
    (tmp_path / "two" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"t": "t.safetensors", "a": "t.safetensors"}}))
    with pytest.raises(fastload.FormatError, match="t.safetensors") as info:
        fastload.load([tmp_path / "one", tmp_path / "two"])
    assert "'a'" in str(info.value)


def test_index_check_compares_the_shard_path_not_just_its_basename(tmp_path):
    """weight_map says t is in b/w.safetensors, but t is in a/w.safetensors: the index is wrong.

    Two shards with the same file name in different sub-directories must not be confused: the
    check compares whole relative paths, not base names.
    """
    write_single(tmp_path / "a" / "w.safetensors", {"t": torch.ones(2)})
    write_single(tmp_path / "b" / "w.safetensors", {"u": torch.ones(3)})
    good = {"t": "a/w.safetensors", "u": "b/w.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": good}))
    assert set(fastload.load(tmp_path)) == {"t", "u"}  # sub-directories are fine
    swapped = {"t": "b/w.safetensors", "u": "a/w.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": swapped}))
    with pytest.raises(fastload.FormatError, match="weight_map puts 2 tensor.s. where they are not"):
        fastload.load(tmp_path)


def test_index_naming_a_missing_shard_names_that_shard(tmp_path):
    two_shards(tmp_path, weight_map={"a": "s1.safetensors", "x": "s1.safetensors", "b": "gone.safetensors"})
    with pytest.raises(fastload.SourceNotFoundError, match="gone.safetensors") as info:
        fastload.load(tmp_path)
    assert "gone.safetensors" in (info.value.url or "")


def test_s3_key_without_extension_is_an_object_not_a_prefix(s3_server, s3_bucket, tmp_path):
    """Spec: ``s3://bucket/key`` names an object; a prefix is a directory. A key without a file
    extension is the object when one exists, else the prefix."""
    path = write_single(tmp_path / "m.safetensors", {"a": torch.arange(5, dtype=torch.int64)})
    s3_server.put(s3_bucket, "weights", path.read_bytes())
    got = fastload.load(f"s3://{s3_bucket}/weights", config=SMALL)
    assert list(got) == ["a"] and torch.equal(got["a"], torch.arange(5))
    s3_server.put(s3_bucket, "ckpt/model.safetensors", path.read_bytes())  # no object "ckpt": the prefix
    assert torch.equal(fastload.load(f"s3://{s3_bucket}/ckpt", config=SMALL)["a"], torch.arange(5))
    with pytest.raises(fastload.SourceNotFoundError, match="nothing"):
        fastload.load(f"s3://{s3_bucket}/nothing", config=SMALL)


def test_http_index_url_with_a_query_string_is_read_as_an_index(http_server, http_dir):
    """A signed/parametrised URL of the index (``...index.json?token=x``) is an index, not a safetensors
    file: the URL's path decides, not its query string."""
    tensors = two_shards(http_dir / "ck")
    url = http_server.url_for(http_dir / "ck" / "model.safetensors.index.json") + "?download=1"
    got = fastload.load(url, config=SMALL)
    assert set(got) == set(tensors)


def test_url_schemes_are_case_insensitive(http_server, http_dir, s3_server, s3_bucket, tmp_path):
    """RFC 3986: a scheme is case-insensitive. ``S3://``, ``HTTP://`` and ``File://`` load like their lower-case
    forms (they were refused as unsupported schemes)."""
    path = write_single(tmp_path / "m.safetensors", {"a": torch.arange(5, dtype=torch.int64)})
    (http_dir / "m.safetensors").write_bytes(path.read_bytes())
    s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
    http = http_server.url_for(http_dir / "m.safetensors")
    for url in ("HTTP" + http[4:], f"S3://{s3_bucket}/m.safetensors", "File://" + str(path)):
        assert torch.equal(fastload.load(url, config=SMALL)["a"], torch.arange(5)), url
    with pytest.raises(fastload.ConfigError, match="unsupported source scheme"):
        fastload.load("FTP://host/m.safetensors")


# -- names= ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["local", "http"])
def test_names_in_one_shard_fetch_no_byte_of_the_other_shard(transport, serve, tmp_path):
    tensors = two_shards(tmp_path / "ck")
    trace = fastload.Trace()
    got = fastload.load(serve(transport, tmp_path / "ck", as_dir=True), names=["b", "b"], trace=trace,
                        config=SMALL)
    assert list(got) == ["b"] and same_bytes(got["b"], tensors["b"])
    ck = tmp_path / "ck"
    headers = header_end(ck / "s1.safetensors") + header_end(ck / "s2.safetensors")
    index = (ck / "model.safetensors.index.json").stat().st_size
    # (over HTTP the index's probe brings it whole: its bytes cross the wire once there too)
    assert trace.summary().bytes_fetched == index + headers + tensors["b"].nbytes


def test_empty_names_loads_nothing_and_reads_no_tensor_bytes(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {"a": torch.ones(1000)})
    trace = fastload.Trace()
    assert fastload.load(path, names=[], trace=trace) == {}
    assert trace.summary().bytes_fetched == header_end(path)


# -- dtype= ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["float8_e4m3fn", "float8_e5m2", "float64"])
def test_dtype_to_float8_and_wider_matches_torch_and_keeps_ints(tmp_path, target):
    dtype = getattr(torch, target)
    g = torch.Generator().manual_seed(3)
    tensors = {"f32": torch.randn(70_000, generator=g), "bf16": torch.randn(33, generator=g).bfloat16(),
               "e4": torch.randn(9, generator=g).to(torch.float8_e4m3fn), "i8": torch.arange(-5, 5, dtype=torch.int8),
               "u8": torch.arange(7, dtype=torch.uint8), "bool": torch.tensor([True, False, True]),
               "scalar": torch.tensor(1.5), "empty": torch.empty(0, 3)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    got = fastload.load(path, dtype=dtype, config=SMALL)
    assert list(got) == list(safetensors.torch.load_file(path))
    for name, tensor in tensors.items():
        want = tensor.to(dtype) if tensor.is_floating_point() else tensor
        assert same_bytes(got[name], want), name


def test_dtype_equal_to_stored_is_no_conversion_and_bit_exact(tmp_path):
    nan_payloads = torch.tensor([0x7FC00001, 0x7F800001, 0xFFC00123, 0x3F800000], dtype=torch.int64).to(
        torch.int32).view(torch.float32)
    tensors = {"nan": nan_payloads, "w": torch.randn(50_000), "ids": torch.arange(9)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    trace = fastload.Trace()
    got = fastload.load(path, dtype=torch.float32, trace=trace, config=SMALL)
    want = safetensors.torch.load_file(path)
    assert all(same_bytes(got[n], want[n]) for n in want)
    assert not trace.summary().counters.get("bytes_converted")


# -- odd tensors, memory ownership ----------------------------------------------------------------

def test_scalar_and_empty_tensors_at_the_very_end_of_the_file(tmp_path):
    tensors = {"a": torch.arange(3, dtype=torch.float32), "zz_scalar": torch.tensor(5.0),
               "zzz_empty": torch.empty(0, 3, dtype=torch.bfloat16)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    plan = fastload.plan(path)
    assert [t.name for t in plan.tensors][-1] == "zzz_empty" and plan.tensors[-1].spec.end == path.stat().st_size
    for names in (None, ["zzz_empty"], ["zz_scalar"]):
        got = fastload.load(path, names=names)
        want = safetensors.torch.load_file(path)
        assert all(same_bytes(got[n], want[n]) for n in got)
    with fastload.stream(path, names=["zzz_empty", "zz_scalar"]) as s:
        streamed = dict(s)
    assert set(streamed) == {"zzz_empty", "zz_scalar"} and streamed["zz_scalar"].item() == 5.0


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_every_result_owns_exactly_its_memory(tmp_path, dtype):
    tensors = {f"t{i}": torch.full((7, 5), float(i)) for i in range(8)} | {"ids": torch.arange(12),
                                                                           "s": torch.tensor(2.0)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    got = fastload.load(path, dtype=dtype, config=SMALL)
    with fastload.stream(path, dtype=dtype, config=SMALL) as s:
        streamed = dict(s)
    for result in (got, streamed):
        for name, tensor in result.items():
            assert tensor._base is None and tensor.is_contiguous(), name
            assert tensor.untyped_storage().nbytes() == tensor.nbytes, name
        before = {n: t.clone() for n, t in result.items()}
        for tensor in result.values():
            tensor.add_(1) if tensor.dtype != torch.bool else tensor.logical_not_()
        for name, tensor in result.items():  # each changed exactly once: nothing aliases anything
            expect = before[name] + 1
            assert torch.equal(tensor, expect), name
    assert all(torch.equal(got[n], streamed[n]) for n in got)  # two loads share nothing either


# -- plan(): headers only, JSON, table --------------------------------------------------------------

def test_plan_reads_only_headers_and_round_trips_through_json(tmp_path):
    tensors = {"a": torch.ones(100), "s": torch.tensor(3, dtype=torch.int8), "e": torch.empty(0)}
    path = write_single(tmp_path / "m.safetensors", tensors, metadata={"k": "v"})
    trace = fastload.Trace()
    plan = fastload.plan(path, trace=trace)
    assert trace.summary().bytes_fetched == header_end(path)
    doc = json.loads(plan.to_json())
    assert doc == json.loads(json.dumps(plan.to_dict()))
    assert doc["total_bytes"] == plan.total_bytes == 400 + 1
    assert doc["files"][0]["metadata"] == {"k": "v"} == plan.metadata
    data_start = header_end(path)
    with safetensors.safe_open(path, "pt") as f:
        names = set(f.keys())
    assert {t["name"] for t in doc["tensors"]} == names
    raw = json.loads(path.read_bytes()[8:data_start])
    for t in doc["tensors"]:
        begin, end = raw[t["name"]]["data_offsets"]
        assert (t["start"], t["end"]) == (data_start + begin, data_start + end), t
        assert t["dtype"] == raw[t["name"]]["dtype"] and t["shape"] == raw[t["name"]]["shape"]
    text = str(plan)
    assert all(name in text for name in names) and "scalar" in text and str(path) in text


# -- errors name the path ---------------------------------------------------------------------------

def test_truncated_file_is_a_format_error_naming_the_path(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {"a": torch.ones(1000)})
    plan = fastload.plan(path)  # fine before
    assert plan.total_bytes == 4000
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)
    for call in (fastload.plan, fastload.load):
        with pytest.raises(fastload.FormatError, match="m.safetensors"):
            call(path)


def test_directory_with_trailing_slash_that_is_missing_names_it(tmp_path):
    with pytest.raises(fastload.SourceNotFoundError, match="nope"):
        fastload.load(str(tmp_path / "nope") + "/")


@pytest.mark.parametrize("names", [5, [["a"]]], ids=["int", "nested-list"])
def test_bad_names_argument_is_a_config_error(tmp_path, names):
    """Like the other arguments (device, dtype, config, shard), a bad ``names`` is a ConfigError, raised
    before any header is read."""
    path = write_single(tmp_path / "m.safetensors", {"a": torch.ones(3)})
    with pytest.raises(fastload.ConfigError):
        fastload.load(path, names=names)
