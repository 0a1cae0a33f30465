"""Corners of the trace numbers, CLI exit codes and messages, shard=/dtype= and from_pretrained.

Every test here uses real files in tmp_path and the real servers from conftest.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import chunky_tensors, random_tensor, write_sharded, write_single
from fastload.cli import main

CHUNK = 64 * 1024
SMALL = fastload.LoadConfig(chunk_bytes=CHUNK, host_buffer_bytes=4 * CHUNK, max_concurrency=4)
FAST_RETRY = fastload.RetryConfig(backoff_base_s=0.001, backoff_max_s=0.002)


def data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """~0.9 MB: f32 tensors spanning several 64 KiB chunks, a bf16 one and an int one."""
    return write_single(tmp_path_factory.mktemp("corners") / "model.safetensors",
                        chunky_tensors(seed=3, layers=3, shape=(200, 300)))


def ok_bytes(server) -> int:
    """Body bytes of successful (2xx) replies: tensor and header bytes, not error pages."""
    return sum(r.body_bytes for r in server.log if 200 <= r.status < 300)


def http_url(http_server, http_dir: Path, path: Path) -> str:
    target = http_dir / path.name
    (shutil.copytree if path.is_dir() else shutil.copy)(path, target)
    return http_server.url_for(target)


# -- trace: bytes_fetched is what the server actually sent ------------------------------------------------------


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_bytes_fetched_equals_bytes_the_server_sent(ckpt, http_server, http_dir, engine):
    url = http_url(http_server, http_dir, ckpt)
    trace = fastload.Trace(otel=False)
    fastload.load(url, config=SMALL.replace(http_engine=engine), trace=trace)
    s = trace.summary()
    assert s.bytes_fetched == ok_bytes(http_server) == ckpt.stat().st_size
    assert s.bytes_by_file == {url: s.bytes_fetched}


def test_http_bytes_fetched_with_names_and_shard(ckpt, http_server, http_dir):
    url = http_url(http_server, http_dir, ckpt)
    for kwargs in (dict(names=["layer1.weight", "positions"]),
                   dict(shard=fastload.Shard(1, 3, {"layer": 1, "norm": 0})),
                   dict(shard=fastload.Shard(2, 3, {"layer": 0}), names=["layer2.weight"]),
                   dict(shard=fastload.Shard(0, 2, {"layer": 1}), dtype=torch.float16)):
        http_server.reset()
        trace = fastload.Trace(otel=False)
        fastload.load(url, config=SMALL, trace=trace, **kwargs)
        assert trace.summary().bytes_fetched == ok_bytes(http_server), kwargs


def test_http_bytes_fetched_counts_the_index_file(http_server, http_dir, tmp_path):
    """An indexed checkpoint over HTTP: every byte the server sent (index included) is in bytes_fetched."""
    tensors = {f"w{i}": torch.full((50, 40), float(i)) for i in range(4)}
    directory = write_sharded(tmp_path / "ckpt", tensors, 2)
    url = http_url(http_server, http_dir, directory) + "/"
    trace = fastload.Trace(otel=False)
    got = fastload.load(url, trace=trace)
    assert all(torch.equal(got[n], tensors[n]) for n in tensors)
    s = trace.summary()
    sent = {r.path.rsplit("/", 1)[-1]: 0 for r in http_server.log}
    for r in http_server.log:
        sent[r.path.rsplit("/", 1)[-1]] += r.body_bytes
    by_file = {u.rsplit("/", 1)[-1]: n for u, n in s.bytes_by_file.items()}
    assert by_file == {k: v for k, v in sent.items() if v}
    assert s.bytes_fetched == ok_bytes(http_server)


def test_http_retries_counted_exactly_and_bytes_match(ckpt, http_server, http_dir):
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.fail_first(3, status=503)
    trace = fastload.Trace(otel=False)
    fastload.load(url, config=SMALL.replace(retry=FAST_RETRY), trace=trace)
    s = trace.summary()
    failed = sum(1 for r in http_server.log if r.status == 503)
    assert failed == 3
    assert s.counters["retries"] == failed
    assert s.bytes_fetched == ok_bytes(http_server)


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_broken_bodies_bytes_fetched_is_what_arrived(ckpt, http_server, http_dir, engine):
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.cut_after(20 * 1024)
    trace = fastload.Trace(otel=False)
    got = fastload.load(url, config=SMALL.replace(retry=FAST_RETRY, http_engine=engine), trace=trace)
    want = safetensors.torch.load_file(ckpt)
    assert all(bytes_equal(got[n], want[n]) for n in want)
    s = trace.summary()
    assert s.bytes_fetched == ok_bytes(http_server)
    # every GET beyond the first of each read is a retry: probe + header + one per chunk are first attempts
    assert s.counters["retries"] == len(http_server.log) - 2 - len(trace.chunks)


def test_s3_bytes_fetched_equals_proxy_bytes(ckpt, s3_server, s3_bucket, s3_proxy):
    s3_server.put(s3_bucket, "m.safetensors", ckpt.read_bytes())
    config = SMALL.replace(s3=fastload.S3Options(endpoint_url=s3_proxy.url))
    trace = fastload.Trace(otel=False)
    fastload.load(f"s3://{s3_bucket}/m.safetensors", config=config, trace=trace,
                  shard=fastload.Shard(1, 2, {"layer": 1}))
    assert trace.summary().bytes_fetched == s3_proxy.bytes_sent()


def test_failed_load_counts_exactly_what_arrived(ckpt, http_server, http_dir):
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.cut_after(CHUNK // 2)  # probe and header fit; every chunk breaks off
    config = SMALL.replace(max_concurrency=1, retry=fastload.RetryConfig(max_attempts=1))
    trace = fastload.Trace(otel=False)
    with pytest.raises(fastload.TransferError):
        fastload.load(url, config=config, trace=trace)
    s = trace.summary()
    assert s.bytes_fetched == ok_bytes(http_server)
    assert s.errors and s.errors[0].startswith("TransferError")
    assert sum(s.breakdown.values()) == pytest.approx(s.wall_s, abs=1e-9)
    assert "failed: TransferError" in s.table()


# -- shard= and dtype= -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Path:
    g = torch.Generator().manual_seed(21)
    tensors = {"a": random_tensor((7, 301, 33), torch.float32, g),   # ~280 KB, dims split unevenly
               "b": random_tensor((5, 7001), torch.bfloat16, g),     # rows wider than a chunk
               "h": random_tensor((1, 1), torch.float16, g),
               "one": random_tensor((1,), torch.float32, g),
               "i": random_tensor((9, 11), torch.int32, g)}
    return write_single(tmp_path_factory.mktemp("odd") / "odd.safetensors", tensors)


@pytest.mark.parametrize(("transport", "dtype"), [("http", torch.float16), ("http", None), ("s3", torch.float16),
                                                   ("local", torch.float64)])
def test_shard_every_dim_with_dtype_over_transports(odd, serve, transport, dtype):
    full = safetensors.torch.load_file(odd)
    source = serve(transport, odd)
    for world in (3, 4):
        for rules in ({"a": 0, "b": 1, "h": 1, "one": 0, "i": 1}, {"a": 1, "b": 0, "h": 0, "i": 0},
                      {"a": 2, "b": -1, "h": -2, "one": -1, "i": -1}):
            for rank in range(world):
                shard = fastload.Shard(rank, world, rules)
                got = fastload.load(source, shard=shard, dtype=dtype, config=SMALL)
                for name, tensor in full.items():
                    dim = shard.dim_for(name)
                    want = tensor if dim is None else tensor.tensor_split(world, dim)[rank]
                    if dtype is not None and want.dtype.is_floating_point:
                        want = want.to(dtype)
                    assert bytes_equal(got[name], want), (transport, name, rank, world, rules)
                    assert got[name].is_contiguous()


def test_shard_scalar_tensor_is_config_error_naming_it(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {"s": torch.tensor(3.0), "w": torch.ones(4, 2)})
    with pytest.raises(fastload.ConfigError, match="'s'"):
        fastload.load(path, shard=fastload.Shard(0, 2, {".": 0}))
    got = fastload.load(path, shard=fastload.Shard(1, 2, {"w": 0}), dtype="float16")
    assert got["s"].dtype == torch.float16 and got["s"].shape == () and got["s"].item() == 3.0
    assert torch.equal(got["w"], torch.ones(2, 2, dtype=torch.float16))


# -- the CLI: expected errors are one line and a non-zero status ---------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> bool:
    return err.count("\n") == 1 and err.startswith("fastload: error: ") and "Traceback" not in err


@pytest.mark.parametrize("url", ["http://[::1/model.safetensors", "https://[fe80::1/"])
@pytest.mark.parametrize("command", ["load", "inspect"])
def test_cli_malformed_url_is_one_line_error(capsys, command, url):
    try:
        rc, _, err = run_cli(capsys, command, url)
    except Exception as exc:  # noqa: BLE001 - what the user would see as a traceback
        pytest.fail(f"fastload {command} {url!r} raised {type(exc).__name__}: {exc}")
    assert rc != 0 and one_line_error(err), err


def test_library_malformed_url_raises_a_fastload_error():
    with pytest.raises(fastload.FastloadError):
        fastload.plan("http://[::1/model.safetensors")


def test_cli_expected_errors(capsys, tmp_path, ckpt):
    bad_len = tmp_path / "bad.safetensors"
    bad_len.write_bytes(b"garbage!")
    bad_json = tmp_path / "bad_json.safetensors"
    bad_json.write_bytes((16).to_bytes(8, "little") + b'{"a":1,"b":2,"c"')
    cases = [
        ("load", str(tmp_path / "missing.safetensors")),
        ("inspect", str(tmp_path / "missing.safetensors")),
        ("load", str(bad_len)), ("inspect", str(bad_json)), ("load", str(bad_json)),
        ("load", str(ckpt), "--device", "tpu"), ("load", str(ckpt), "--device", "cuda:7"),
        ("load", str(ckpt), "--dtype", "int8"), ("load", str(ckpt), "--dtype", "nope"),
        ("load", str(ckpt), "--names", "nope"), ("load", str(ckpt), "--chunk-size", "lots"),
        ("load", str(ckpt), "--chunk-size", "1e400"), ("load", str(ckpt), "--chunk-size", "0"),
        ("load", str(ckpt), "--concurrency", "0"),
        ("load", str(ckpt), "--trace", str(tmp_path / "no" / "dir.json")),
        ("load", "ftp://host/x.safetensors"), ("load", "s3://"), ("load", "hf://"), ("inspect", ""),
        ("load", "http://127.0.0.1:notaport/x.safetensors"),
    ]
    if torch.cuda.is_available():
        cases = [c for c in cases if "cuda:7" not in c]
    for argv in cases:
        rc, out, err = run_cli(capsys, *argv)
        assert rc == 1 and one_line_error(err), (argv, err)


def test_cli_bad_environment_values(capsys, ckpt, monkeypatch):
    for var, value in [("FASTLOAD_HTTP_ENGINE", "curl"), ("FASTLOAD_MAX_CONCURRENCY", "x"),
                       ("FASTLOAD_CHUNK_BYTES", "lots"), ("FASTLOAD_STALL_TIMEOUT_S", "-1")]:
        monkeypatch.setenv(var, value)
        rc, _, err = run_cli(capsys, "load", str(ckpt))
        assert rc == 1 and one_line_error(err), (var, err)
        monkeypatch.delenv(var)


def test_cli_trace_target_is_a_directory(capsys, ckpt, tmp_path):
    (tmp_path / "d.json").mkdir()
    rc, _, err = run_cli(capsys, "load", str(ckpt), "--trace", str(tmp_path / "d.json"))
    assert rc == 1 and one_line_error(err), err


def test_cli_zero_tensor_file(capsys, tmp_path):
    path = write_single(tmp_path / "empty.safetensors", {})
    rc, out, err = run_cli(capsys, "load", str(path))
    assert rc == 0 and "loaded 0 tensor(s)" in out and "0 chunk(s)" in out
    rc, out, _ = run_cli(capsys, "load", str(path), "--json")
    summary = json.loads(out)
    assert summary["bytes_fetched"] == path.stat().st_size and summary["chunks"] == 0
    assert sum(summary["breakdown"].values()) == pytest.approx(summary["wall_s"])
    rc, out, _ = run_cli(capsys, "inspect", str(path), "--json")
    assert rc == 0 and json.loads(out)["tensors"] == []


CTRL_C = textwrap.dedent("""
    import sys
    from fastload.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("command", ["load", "inspect", "pull"])
def test_cli_ctrl_c_exits_130_without_traceback(ckpt, http_server, http_dir, tmp_path, command):
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.slow_first_byte(30)
    argv = [command, url] + (["--to", str(tmp_path / "out")] if command == "pull" else [])
    accepted = http_server.connections_accepted
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path)
    deadline = time.monotonic() + 20
    while http_server.connections_accepted == accepted and time.monotonic() < deadline:  # the first request is in flight
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"fastload {command} did not stop on Ctrl-C: {err[-2000:]}")
    assert proc.returncode == 130, err
    assert err == "fastload: interrupted\n", err


def test_http_probe_bytes_that_arrived_are_counted(ckpt, http_server, http_dir):
    """The size probe's body breaks off after 4 of its 8 bytes: those 4 bytes were still read from the source."""
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.cut_after(4, times=1)
    trace = fastload.Trace(otel=False)
    fastload.load(url, config=SMALL.replace(retry=FAST_RETRY), trace=trace)
    assert trace.summary().bytes_fetched == ok_bytes(http_server)


# -- trace exports -----------------------------------------------------------------------------------------------


def strict_round_trip(doc: dict) -> None:
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc


def test_exports_of_empty_failed_and_unused_traces_are_strict_json(tmp_path, http_server, http_dir, ckpt):
    unused = fastload.Trace(otel=False)
    assert unused.summary().wall_s == 0 and "0 chunk(s)" in unused.summary().table()
    empty = fastload.Trace(otel=False)
    fastload.load(write_single(tmp_path / "empty.safetensors", {}), trace=empty)
    zeros = fastload.Trace(otel=False)
    got = fastload.load(write_single(tmp_path / "z.safetensors", {"e": torch.zeros(0, 3)}), trace=zeros,
                        dtype="float16")
    assert got["e"].shape == (0, 3) and got["e"].dtype == torch.float16
    failed = fastload.Trace(otel=False)
    url = http_url(http_server, http_dir, ckpt)
    http_server.faults.cut_after(CHUNK // 2)
    with pytest.raises(fastload.TransferError):
        fastload.load(url, config=SMALL.replace(retry=fastload.RetryConfig(max_attempts=1)), trace=failed)
    for trace in (unused, empty, zeros, failed):
        d, chrome = trace.to_dict(), trace.to_chrome()
        strict_round_trip(d)
        strict_round_trip(chrome)
        assert sum(d["summary"]["breakdown"].values()) == pytest.approx(d["wall_s"], abs=1e-9)
        for stage, busy in d["summary"]["stages"].items():
            assert busy <= d["wall_s"] + 1e-9, stage
        assert chrome["fastload"]["summary"] == json.loads(json.dumps(d["summary"]))
    assert empty.summary().bytes_fetched == (tmp_path / "empty.safetensors").stat().st_size
    assert zeros.summary().bytes_fetched == (tmp_path / "z.safetensors").stat().st_size


def test_plan_trace_counts_only_headers(ckpt):
    trace = fastload.Trace(otel=False)
    fastload.plan(ckpt, trace=trace)
    s = trace.summary()
    assert s.bytes_fetched == data_start(ckpt) and s.chunks == 0
    assert set(s.stages) == {"resolve", "header", "plan"}


# -- from_pretrained ---------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def assert_same_model(ours, theirs) -> None:
    assert type(ours) is type(theirs) and ours.dtype == theirs.dtype
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    bufs_a, bufs_b = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert list(bufs_a) == list(bufs_b) and all(torch.equal(bufs_a[k], bufs_b[k]) for k in bufs_a)
    out_a, out_b = ours.get_output_embeddings(), theirs.get_output_embeddings()
    if out_b is not None:
        assert (out_a.weight is ours.get_input_embeddings().weight) == \
            (out_b.weight is theirs.get_input_embeddings().weight)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 (tied lm_head, Conv1D, non-persistent causal-mask buffers), saved in float32."""
    torch.manual_seed(5)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    directory = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kwargs", [{}, {"torch_dtype": "auto"}, {"dtype": torch.bfloat16},
                                    {"torch_dtype": torch.float16}, {"output_loading_info": True}])
def test_from_pretrained_tiny_gpt2_equals_transformers(gpt2_dir, kwargs):
    ours = fastload.from_pretrained(gpt2_dir, **kwargs)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir, **kwargs)
    if kwargs.get("output_loading_info"):
        assert ours[1] == theirs[1]
        ours, theirs = ours[0], theirs[0]
    assert_same_model(ours, theirs)


def test_from_pretrained_bert_without_config_dtype_and_mixed_storage(tmp_path):
    """config.json without a dtype, a checkpoint that mixes float32 and bfloat16, legacy LayerNorm gamma/beta."""
    torch.manual_seed(6)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    transformers.BertForMaskedLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    body = json.loads((tmp_path / "config.json").read_text())
    body.pop("dtype", None), body.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(body))
    sd = safetensors.torch.load_file(tmp_path / "model.safetensors")
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"):
          (v.float() if i % 3 == 0 else v) for i, (k, v) in enumerate(sd.items())}
    safetensors.torch.save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for kwargs in ({}, {"dtype": "auto"}, {"dtype": torch.float32}):
        ours, info = fastload.from_pretrained(tmp_path, output_loading_info=True, **kwargs)
        theirs, want = transformers.BertForMaskedLM.from_pretrained(tmp_path, output_loading_info=True, **kwargs)
        assert info == want
        assert_same_model(ours, theirs)


def test_from_pretrained_base_checkpoint_into_head_class(tmp_path):
    torch.manual_seed(7)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    transformers.LlamaModel(config).save_pretrained(tmp_path, max_shard_size="4KB")
    ours, info = fastload.from_pretrained(tmp_path, model_class=transformers.LlamaForCausalLM,
                                          output_loading_info=True)
    theirs, want = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info == want and "lm_head.weight" in info["missing_keys"]
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a if k != "lm_head.weight")


def test_from_pretrained_trace_counts_weights_kept_in_float32(tmp_path):
    """T5 keeps ``wo`` in float32 under float16: those weights are loaded too, so the trace must count them."""
    torch.manual_seed(2)
    config = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=2, num_heads=2)
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    tensor_bytes = size - data_start(tmp_path / "model.safetensors")
    trace = fastload.Trace(otel=False)
    model = fastload.from_pretrained(tmp_path, dtype=torch.float16, trace=trace)
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    s = trace.summary()
    assert s.bytes_fetched >= size  # every tensor byte and at least one header
    assert s.counters["bytes_copied"] < tensor_bytes  # the float32 weights went straight in, not converted
    assert s.bytes_by_file == {str(tmp_path / "model.safetensors"): s.bytes_fetched}


def test_from_pretrained_subfolder(tmp_path, gpt2_dir):
    shutil.copytree(gpt2_dir, tmp_path / "sub")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, subfolder="sub")
    ours = fastload.from_pretrained(tmp_path, subfolder="sub")
    assert_same_model(ours, theirs)


def test_from_pretrained_variant_loads_the_variant_weights(tmp_path, gpt2_dir):
    shutil.copytree(gpt2_dir, tmp_path, dirs_exist_ok=True)
    torch.manual_seed(99)
    transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(gpt2_dir)).save_pretrained(
        tmp_path, variant="v2")
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model.v2.safetensors").exists()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, variant="v2")
    ours = fastload.from_pretrained(tmp_path, variant="v2")
    assert_same_model(ours, theirs)


def test_a_stream_left_early_is_cancelled_not_failed(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {f"t{i}": torch.full((50_000,), float(i)) for i in range(8)})
    trace = fastload.Trace(otel=False)
    config = fastload.LoadConfig(chunk_bytes=64 << 10, host_buffer_bytes=256 << 10, max_concurrency=1)

    def slowly(done, total):  # ~1 s for the whole file: it cannot end on its own before the stream is left
        time.sleep(0.04)

    with fastload.stream(path, trace=trace, config=config, progress=slowly) as s:
        next(iter(s))
    summary = trace.summary()
    assert summary.errors == () and summary.counters["cancelled"] == 1
    assert "cancelled before the end" in str(summary) and "failed" not in str(summary)
