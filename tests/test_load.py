"""End to end: fastload.load/stream/plan against safetensors, over every transport."""

from __future__ import annotations

import shutil
import threading

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import llama_like_tensors, write_single

TRANSPORTS = ["local", "file", "http", "s3"]
SMALL = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=256 * 1024, max_concurrency=4)
FAST_FAIL = fastload.LoadConfig(retry=fastload.RetryConfig(max_attempts=2, backoff_base_s=0.01, backoff_max_s=0.02))




def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since ``before`` that still run, ignoring the test servers' request handlers."""
    return [t for t in threading.enumerate()
            if t not in before and t.is_alive() and "process_request" not in t.name]


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_dtype_bit_exact(transport, serve, all_dtypes_checkpoint):
    want = safetensors.torch.load_file(all_dtypes_checkpoint)
    got = fastload.load(serve(transport, all_dtypes_checkpoint), config=SMALL)
    assert set(got) == set(want)
    for name in want:
        assert bytes_equal(got[name], want[name]), name
    # every tensor owns its memory: no two outputs share storage
    storages = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(storages) == sum(1 for t in got.values() if t.numel())


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sharded_with_index(transport, serve, llama_sharded_checkpoint):
    want = {}
    for shard in sorted(llama_sharded_checkpoint.glob("*.safetensors")):
        want.update(safetensors.torch.load_file(shard))
    trace = fastload.Trace()
    got = fastload.load(serve(transport, llama_sharded_checkpoint, as_dir=True), config=SMALL, trace=trace)
    assert set(got) == set(want)
    assert all(bytes_equal(got[n], want[n]) for n in want)
    summary = trace.summary()
    data = sum(t.numel() * t.element_size() for t in want.values())
    assert data <= summary.bytes_fetched < data + 64 * 1024 * 4  # tensor bytes plus headers/index only
    assert {"resolve", "header", "plan", "fetch"} <= set(summary.stages)
    assert summary.wall_s > 0


def test_index_file_as_source_and_list_of_files(llama_sharded_checkpoint):
    want = fastload.load(llama_sharded_checkpoint)
    via_index = fastload.load(llama_sharded_checkpoint / "model.safetensors.index.json")
    via_list = fastload.load(sorted(str(p) for p in llama_sharded_checkpoint.glob("*.safetensors")))
    assert set(via_index) == set(via_list) == set(want)
    assert all(bytes_equal(via_index[n], want[n]) and bytes_equal(via_list[n], want[n]) for n in want)


def test_directory_without_index_uses_model_safetensors_then_glob(tmp_path):
    tensors = llama_like_tensors(seed=1)
    names = list(tensors)
    write_single(tmp_path / "a.safetensors", {n: tensors[n] for n in names[::2]})
    write_single(tmp_path / "b.safetensors", {n: tensors[n] for n in names[1::2]})
    got = fastload.load(tmp_path)
    assert set(got) == set(names)
    write_single(tmp_path / "model.safetensors", {"only": torch.ones(3)})
    assert list(fastload.load(tmp_path)) == ["only"]


@pytest.mark.parametrize("transport", ["local", "http", "s3"])
def test_names_fetch_only_those_bytes(transport, serve, tmp_path, request):
    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(10)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    trace = fastload.Trace()
    source = serve(transport, path)
    got = fastload.load(source, names=["t3", "t7"], trace=trace, config=SMALL)
    assert list(got) == ["t3", "t7"]
    assert torch.equal(got["t7"], tensors["t7"])
    header = path.stat().st_size - 10 * 4000
    assert trace.summary().bytes_fetched == header + 2 * 4000
    if transport == "http":
        server = request.getfixturevalue("http_server")
        from urllib.parse import urlparse

        assert server.bytes_sent(urlparse(source).path) == header + 2 * 4000  # the stat probe brings the length prefix


def test_unknown_names_are_listed(all_dtypes_checkpoint):
    with pytest.raises(fastload.ConfigError, match="nope.*also_nope|also_nope.*nope"):
        fastload.load(all_dtypes_checkpoint, names=["nope", "also_nope"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtype_converts_floats_only(dtype, all_dtypes_checkpoint):
    want = safetensors.torch.load_file(all_dtypes_checkpoint)
    got = fastload.load(all_dtypes_checkpoint, dtype=dtype, config=SMALL)
    for name, tensor in want.items():
        if tensor.is_floating_point():
            assert got[name].dtype == dtype
            assert torch.equal(got[name], tensor.to(dtype)), name
        else:
            assert bytes_equal(got[name], tensor), name


def test_dtype_conversion_across_many_chunks(tmp_path):
    big = torch.randn(300_000)
    path = write_single(tmp_path / "m.safetensors", {"big": big, "ints": torch.arange(50_000)})
    got = fastload.load(path, dtype="bfloat16", config=SMALL)
    assert torch.equal(got["big"], big.to(torch.bfloat16))
    assert torch.equal(got["ints"], torch.arange(50_000))


def test_metadata_and_plan(all_dtypes_checkpoint):
    plan = fastload.plan(all_dtypes_checkpoint, config=SMALL)
    assert plan.metadata == {"format": "pt"}
    with safetensors.safe_open(all_dtypes_checkpoint, "pt") as f:
        assert {t.name for t in plan.tensors} == set(f.keys())
    assert plan.total_bytes == sum(t.nbytes for t in plan.tensors)
    assert all(c.nbytes <= SMALL.chunk_bytes for c in plan.chunks)
    as_dict = plan.to_dict()
    assert as_dict["total_bytes"] == plan.total_bytes and len(as_dict["tensors"]) == len(plan.tensors)
    import json
    assert json.loads(plan.to_json())["files"][0]["metadata"] == {"format": "pt"}
    text = str(plan)
    assert "tensor(s)" in text and plan.tensors[0].name in text


def test_small_tensors_are_coalesced(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {f"n{i}": torch.ones(16) for i in range(100)})
    plan = fastload.plan(path)
    assert len(plan.chunks) == 1 and len(plan.chunks[0].pieces) == 100


def test_stream_yields_every_tensor_once(llama_sharded_checkpoint):
    want = fastload.load(llama_sharded_checkpoint)
    seen = {}
    with fastload.stream(llama_sharded_checkpoint, config=SMALL) as s:
        for name, tensor in s:
            assert name not in seen
            seen[name] = tensor
        assert s.plan is not None and len(s.plan.tensors) == len(want)
    assert set(seen) == set(want) and all(bytes_equal(seen[n], want[n]) for n in want)


def test_stream_is_in_completion_order(http_server, http_dir):
    """The first tensor of the plan is held back by a slow server; the others come out before it."""
    from servers.faults import SlowFirstByte

    class SlowDataOnly(SlowFirstByte):
        def wants_to_fire(self) -> bool:  # GETs 1-3 of a file are the stat probe and the header reads
            return self.seen > 3

    slow = write_single(http_dir / "a.safetensors", {"first": torch.zeros(1000)})
    fast = write_single(http_dir / "b.safetensors", {f"t{i}": torch.full((1000,), float(i)) for i in range(5)})
    http_server.faults._add(SlowDataOnly(pattern="*/a.safetensors", seconds=1.0))
    sources = [http_server.url_for(slow), http_server.url_for(fast)]
    assert fastload.plan(sources).tensors[0].name == "first"
    with fastload.stream(sources, config=SMALL) as s:
        order = [name for name, _ in s]
    assert sorted(order) == sorted(["first", "t0", "t1", "t2", "t3", "t4"])
    assert order[-1] == "first"


def test_stream_early_exit_cancels_and_leaves_no_threads(http_server, http_dir):
    tensors = {f"t{i}": torch.full((50_000,), float(i)) for i in range(20)}
    url = http_server.url_for(write_single(http_dir / "m.safetensors", tensors))
    before = set(threading.enumerate())
    http_server.faults.slow_first_byte(0.2, path="*")
    with fastload.stream(url, config=SMALL.replace(max_concurrency=2)) as s:
        for name, tensor in s:
            break
    assert not new_threads(before)
    assert len(http_server.log) < 2 + 20  # it stopped well before fetching everything


def test_stream_consumer_exception_propagates_and_cleans_up(all_dtypes_checkpoint):
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="consumer failed"):
        with fastload.stream(all_dtypes_checkpoint) as s:
            for _ in s:
                raise RuntimeError("consumer failed")
    assert not new_threads(before)


@pytest.mark.parametrize("transport", ["local", "file", "http", "s3"])
def test_missing_source_names_the_url(transport, serve, tmp_path, request):
    if transport in ("local", "file"):
        source = (tmp_path / "absent.safetensors").as_uri() if transport == "file" else str(tmp_path / "absent.safetensors")
    elif transport == "http":
        source = request.getfixturevalue("http_server").url + "absent.safetensors"
    else:
        source = f"s3://{request.getfixturevalue('s3_bucket')}/absent.safetensors"
    with pytest.raises(fastload.SourceNotFoundError) as info:
        fastload.load(source, config=FAST_FAIL)
    assert "absent.safetensors" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("transport", ["local", "http", "s3"])
def test_empty_directory_is_not_found(transport, serve, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("no weights here")
    with pytest.raises(fastload.SourceNotFoundError, match="model.safetensors"):
        fastload.load(serve(transport, tmp_path / "empty", as_dir=True), config=FAST_FAIL)


def test_load_inside_running_event_loop(all_dtypes_checkpoint):
    import asyncio

    async def main():
        return fastload.load(all_dtypes_checkpoint), await fastload.aload(all_dtypes_checkpoint)

    sync_result, async_result = asyncio.run(main())
    assert set(sync_result) == set(async_result)
    assert all(bytes_equal(sync_result[n], async_result[n]) for n in sync_result)


def test_transient_errors_are_retried(http_server, http_dir, all_dtypes_checkpoint):
    path = http_dir / "m.safetensors"
    shutil.copy(all_dtypes_checkpoint, path)
    http_server.faults.fail_first(3, status=503)
    got = fastload.load(http_server.url_for(path),
                        config=SMALL.replace(retry=fastload.RetryConfig(backoff_base_s=0.01, backoff_max_s=0.05)))
    want = safetensors.torch.load_file(all_dtypes_checkpoint)
    assert all(bytes_equal(got[n], want[n]) for n in want)


def test_server_ignoring_range_never_corrupts(http_server, http_dir, all_dtypes_checkpoint):
    path = http_dir / "m.safetensors"
    shutil.copy(all_dtypes_checkpoint, path)
    http_server.faults.ignore_range()
    with pytest.raises(fastload.TransferError, match="Range") as info:
        fastload.load(http_server.url_for(path), config=FAST_FAIL)
    assert "m.safetensors" in str(info.value) and "bytes [" in str(info.value)


@pytest.mark.parametrize("bad", [
    dict(chunk_bytes=1000), dict(chunk_bytes=64), dict(max_concurrency=0), dict(host_buffer_bytes=1),
    dict(stall_timeout_s=0),
])
def test_config_is_validated(bad):
    with pytest.raises(fastload.ConfigError):
        fastload.LoadConfig(**bad)


def test_bad_arguments_are_config_errors(all_dtypes_checkpoint):
    for kwargs in (dict(device="tpu"), dict(dtype=torch.int32), dict(dtype="nope"), dict(config={}),
                   dict(shard=(0, 2))):
        with pytest.raises(fastload.ConfigError):
            fastload.load(all_dtypes_checkpoint, **kwargs)
    with pytest.raises(fastload.ConfigError, match="scheme"):
        fastload.load("ftp://example/x.safetensors")


def test_error_hierarchy_mixes_builtins():
    assert issubclass(fastload.SourceNotFoundError, FileNotFoundError)
    assert issubclass(fastload.FormatError, ValueError) and issubclass(fastload.ConfigError, ValueError)
    for cls in (fastload.TransferError, fastload.SourceChangedError, fastload.IntegrityError):
        assert issubclass(cls, OSError) and issubclass(cls, fastload.FastloadError)
    err = fastload.TransferError("boom", url="http://x/y", byte_range=(0, 8), attempts=3)
    assert str(err) == "boom; url=http://x/y; bytes [0, 8); attempts=3"


def test_interrupt_inside_running_loop_cancels_the_load(http_server, http_dir):
    """A sync load called from async code runs in a private thread; Ctrl-C while it waits cancels it.

    Runs in a subprocess so that pytest's own signal handling stays out of the way.
    """
    import subprocess
    import sys
    import textwrap

    url = http_server.url_for(write_single(http_dir / "m.safetensors", {"x": torch.ones(100_000)}))
    http_server.faults.slow_first_byte(0.3)
    script = textwrap.dedent(f"""
        import asyncio, signal, threading, time, fastload
        def on_alarm(*_):
            raise KeyboardInterrupt
        signal.signal(signal.SIGALRM, on_alarm)
        async def main():
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            return fastload.load({url!r})
        try:
            asyncio.run(main())
            print("LOADED")
        except KeyboardInterrupt:
            print("INTERRUPTED")
        print("ALIVE", [t.name for t in threading.enumerate() if t.name.startswith("fastload")])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stdout
    assert "INTERRUPTED" in out and "ALIVE []" in out, out


def test_from_env_reads_the_documented_variables_and_rejects_garbage():
    from fastload.config import from_env

    config = from_env({"FASTLOAD_STALL_TIMEOUT_S": "2.5", "FASTLOAD_MAX_CONCURRENCY": "3",
                       "FASTLOAD_CHUNK_BYTES": "4MiB"}, max_concurrency=5)
    assert (config.stall_timeout_s, config.max_concurrency, config.chunk_bytes) == (2.5, 5, 4 << 20)
    for var in ("FASTLOAD_STALL_TIMEOUT_S", "FASTLOAD_LOCAL_THREADS", "FASTLOAD_HOST_BUFFER_BYTES"):
        with pytest.raises(fastload.ConfigError, match=var.split("_BYTES")[0] if "BYTES" not in var else "size"):
            from_env({var: "lots"})
    assert from_env({"FASTLOAD_HTTP_ENGINE": "aiohttp"}).http_engine == "aiohttp"
    with pytest.raises(fastload.ConfigError, match="http_engine"):
        from_env({"FASTLOAD_HTTP_ENGINE": "curl"})


def test_import_and_local_load_leave_the_network_stack_unimported(all_dtypes_checkpoint):
    """Cold start includes import time: a local load must not pay for aiohttp or botocore."""
    import subprocess
    import sys

    script = (f"import sys, fastload; fastload.load({str(all_dtypes_checkpoint)!r}); "
              "print(sorted(m for m in ('aiohttp', 'botocore', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_reused_botocore_session_makes_every_client(serve, all_dtypes_checkpoint):
    """``S3Options(session=...)``: clients come from the caller's session (its model cache is reused)."""
    import botocore.session

    session = botocore.session.Session()
    made = []
    session.register("creating-client-class.s3", lambda **kwargs: made.append(1))
    config = SMALL.replace(s3=fastload.S3Options(session=session))
    url = serve("s3", all_dtypes_checkpoint)
    expected = safetensors.torch.load_file(all_dtypes_checkpoint)
    for _ in range(2):
        got = fastload.load(url, config=config)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert len(made) == 2
    with pytest.raises(fastload.ConfigError, match="profile"):
        fastload.S3Options(session=session, profile="other")
    with pytest.raises(fastload.ConfigError, match="botocore"):
        fastload.S3Options(session="default")


def test_chunk_size_spreads_small_loads_over_the_readers(tmp_path):
    from fastload.plan import MIN_SPLIT, chunk_size

    config = fastload.LoadConfig()  # 64 MiB chunks, 16 readers
    assert chunk_size(10 << 30, config) == config.chunk_bytes
    assert chunk_size(90 << 20, config) == 6 << 20  # 90 MiB / 16 = 5.6 MiB, rounded up to whole MiB
    assert chunk_size(100, config) == MIN_SPLIT
    small = fastload.LoadConfig(chunk_bytes=256 << 10, host_buffer_bytes=1 << 20)
    assert chunk_size(10 << 30, small) == small.chunk_bytes  # below the floor: taken as given
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(20 << 20, dtype=torch.uint8)}, path)
    plan = fastload.plan(str(path))
    assert plan.chunk_bytes == 2 << 20 and len(plan.chunks) == 10
