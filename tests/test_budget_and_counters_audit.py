"""Audit: the staging pool and memory budget, dtype conversion through staged chunks, and whether what a load
reports (trace counters, ``bytes_fetched``, ``bytes_by_file``/``bytes_by_source``, chunk records, ``progress``,
``fastload.plan(...).total_bytes``/``.chunks``) agrees with what it did.

safetensors allows tensors at any byte offset (only the header is padded to 8 bytes), and
``safetensors.torch.load_file`` loads such files; so fastload must too, with or without ``dtype=``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastload
from reliability_helpers import assert_bit_exact
from reliability_helpers import bounded

KiB, MiB = 1 << 10, 1 << 20
CHUNK = 64 * KiB
RETRY = fastload.RetryConfig(max_attempts=6, backoff_base_s=0.001, backoff_max_s=0.005, deadline_s=20.0)


def cfg(**kw) -> fastload.LoadConfig:
    base = dict(chunk_bytes=CHUNK, host_buffer_bytes=4 * CHUNK, max_concurrency=4, stall_timeout_s=5.0,
                connect_timeout_s=2.0, retry=RETRY)
    base.update(kw)
    return fastload.LoadConfig(**base)


_ST = {torch.uint8: "U8", torch.int8: "I8", torch.bool: "BOOL", torch.float16: "F16", torch.bfloat16: "BF16",
       torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}


def write_packed(path, tensors: list[tuple[str, torch.Tensor]]) -> int:
    """A valid safetensors file with the tensors back to back *in the given order*, no alignment padding
    (as safetensors' format allows). Returns the data start (8 + header length)."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors:
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return 8 + len(text)


def data_start_of(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def converted(ref: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """What ``load(dtype=...)`` must return: floating-point tensors converted by torch, the others as stored."""
    if dtype is None:
        return dict(ref)
    return {k: (v.to(dtype) if v.dtype.is_floating_point else v) for k, v in ref.items()}


class Progress:
    def __init__(self):
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, done: int, total: int) -> None:
        with self.lock:
            self.calls.append((done, total))

    def check(self, total: int) -> None:
        calls = self.calls
        assert calls, "progress was never called"
        assert {t for _, t in calls} == {total}, f"total changed or wrong: {sorted({t for _, t in calls})} vs {total}"
        dones = [d for d, _ in calls]
        assert dones == sorted(dones), "progress went backwards"
        assert dones[0] == 0 and all(0 <= d <= total for d in dones), f"progress out of [0, total]: {dones}"
        assert dones[-1] == total, f"progress ended at {dones[-1]}, not {total}"
        assert dones.count(total) == 1, "progress reported completion more than once"
        assert len(set(dones)) == len(dones), "progress reported the same value twice"


# -- unaligned tensors through staged chunks -------------------------------------------------------------------


@pytest.fixture
def unaligned(tmp_path):
    """A 3-byte U8 tensor, then F64, F32, BF16, F16 tensors at odd offsets, all coalesced into one chunk."""
    g = torch.Generator().manual_seed(1)
    tensors = [("a_u8", torch.arange(3, dtype=torch.uint8)),
               ("b_f64", torch.randn(101, generator=g, dtype=torch.float64)),
               ("c_bool", torch.tensor([True, False, True])),
               ("d_f32", torch.randn(33, 7, generator=g)),
               ("e_i8", torch.tensor([-1], dtype=torch.int8)),
               ("f_bf16", torch.randn(257, generator=g).to(torch.bfloat16)),
               ("g_f16", torch.randn(5, 3, generator=g).to(torch.float16))]
    path = tmp_path / "unaligned.safetensors"
    write_packed(path, tensors)
    ref = load_file(str(path))
    for name, t in tensors:  # the reference reads it as written
        assert torch.equal(ref[name], t)
    return path, ref


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float64],
                         ids=["as_stored", "to_float32", "to_bfloat16", "to_float64"])
def test_unaligned_tensors_coalesced_in_one_staged_chunk_convert_bit_exact(unaligned, dtype):
    path, ref = unaligned
    plan = fastload.plan(path, config=cfg())
    assert len(plan.chunks) == 1  # all of them in one read: the staged buffer holds them back to back
    got = bounded(lambda: fastload.load(path, dtype=dtype, config=cfg()))
    assert_bit_exact(got, converted(ref, dtype))


@pytest.mark.parametrize("transport", ["http", "s3"])
def test_unaligned_tensors_convert_over_network(unaligned, serve, transport):
    path, ref = unaligned
    url = serve(transport, path)
    got = bounded(lambda: fastload.load(url, dtype=torch.float32, config=cfg()))
    assert_bit_exact(got, converted(ref, torch.float32))


def test_unaligned_strided_shard_spanned_and_converted(tmp_path):
    """A dim-1 shard of an F32 tensor at an odd offset, coalesced behind a 3-byte tensor: read as one span and
    picked out by a strided view that must be reinterpreted as float32 to convert it."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 24, generator=g)
    path = tmp_path / "odd_shard.safetensors"
    write_packed(path, [("a", torch.arange(3, dtype=torch.uint8)), ("w", w), ("z", torch.randn(9, generator=g))])
    shard = fastload.Shard(0, 2, {r"^w$": 1})  # rank 0: its first row starts right where "a" ends
    plan = fastload.plan(path, shard=shard, config=cfg())
    assert [len(c.pieces) for c in plan.chunks][0] == 2  # "a" and w's strided piece, read as one span
    for dtype in (None, torch.bfloat16):
        got = bounded(lambda: fastload.load(path, shard=shard, dtype=dtype, config=cfg()))
        want = w.tensor_split(2, 1)[0].contiguous()
        want = want if dtype is None else want.to(dtype)
        assert got["w"].dtype == want.dtype and torch.equal(got["w"], want), dtype
        assert torch.equal(got["a"], torch.arange(3, dtype=torch.uint8))


# -- tensors split across chunks, converted at every split point ----------------------------------------------


@pytest.mark.parametrize("stored,wanted", [(torch.bfloat16, torch.float32), (torch.float64, torch.float16),
                                           (torch.float32, torch.float64), (torch.float16, torch.bfloat16)])
def test_tensor_larger_than_budget_split_and_converted_bit_exact(tmp_path, stored, wanted):
    """One tensor several times host_buffer_bytes, behind a small odd-sized one, converted chunk by chunk."""
    g = torch.Generator().manual_seed(3)
    n = (9 * 4 * CHUNK) // torch.empty((), dtype=stored).element_size() + 3  # ~9x the pool, a ragged tail
    tensors = {"big": torch.randn(n, generator=g).to(stored), "small": torch.randn(5, generator=g).to(stored)}
    path = tmp_path / "big.safetensors"
    save_file(tensors, str(path))
    config = cfg(host_buffer_bytes=2 * CHUNK, max_concurrency=3)
    plan = fastload.plan(path, config=config)
    assert len(plan.chunks) > 9 * 4 and all(c.nbytes <= plan.chunk_bytes for c in plan.chunks)
    trace = fastload.Trace(otel=False)
    got = bounded(lambda: fastload.load(path, dtype=wanted, config=config, trace=trace))
    assert_bit_exact(got, converted(load_file(str(path)), wanted))
    s = trace.summary()
    assert s.chunks == len(plan.chunks)
    assert all(c["staged"] for c in trace.chunks)
    assert s.counters["bytes_converted"] == plan.output_bytes == s.counters["bytes_copied"]
    assert s.bytes_fetched == data_start_of(path) + plan.total_bytes


def test_many_tiny_tensors_coalesce_and_convert(tmp_path):
    g = torch.Generator().manual_seed(4)
    tensors = {f"t{i:04d}": torch.randn(1 + i % 13, generator=g).to(torch.bfloat16) for i in range(1500)}
    tensors |= {f"i{i:04d}": torch.arange(i % 5, dtype=torch.int64) for i in range(50)}
    path = tmp_path / "tiny.safetensors"
    save_file(tensors, str(path))
    config = cfg(chunk_bytes=CHUNK)
    plan = fastload.plan(path, config=config)
    assert len(plan.chunks) < 5, "tiny neighbours must be coalesced"
    assert sum(len(c.pieces) for c in plan.chunks) == sum(1 for t in tensors.values() if t.numel())
    trace, progress = fastload.Trace(otel=False), Progress()
    got = bounded(lambda: fastload.load(path, dtype=torch.float32, config=config, trace=trace, progress=progress))
    assert_bit_exact(got, converted(load_file(str(path)), torch.float32))
    progress.check(plan.output_bytes)
    s = trace.summary()
    assert s.chunks == len(plan.chunks)
    assert s.bytes_fetched == data_start_of(path) + plan.total_bytes
    assert len(progress.calls) == 1 + len(plan.chunks)  # (0, total) first, then one call per chunk


# -- bytes_fetched, bytes_by_file, plan.total_bytes with names= gaps --------------------------------------------


@pytest.fixture
def gappy(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {f"w{i}": torch.randn(3000 + 101 * i, generator=g) for i in range(8)}
    tensors["ids"] = torch.arange(777, dtype=torch.int64)
    path = tmp_path / "gappy.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("transport", ["local", "http", "s3"])
def test_names_with_gaps_bytes_fetched_is_header_plus_chunk_spans(gappy, serve, transport):
    path, tensors = gappy
    url = serve(transport, path)
    names = ["w1", "w4", "w6", "ids"]
    config = cfg(chunk_bytes=CHUNK)
    plan = fastload.plan(url, names=names, config=config)
    want_bytes = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
    assert plan.output_bytes == want_bytes
    # none of the unrequested tensors' bytes lie inside a chunk
    assert plan.total_bytes == want_bytes
    trace, progress = fastload.Trace(otel=False), Progress()
    got = bounded(lambda: fastload.load(url, names=names, config=config, trace=trace, progress=progress))
    assert_bit_exact(got, {n: tensors[n] for n in names})
    s = trace.summary()
    assert s.bytes_fetched == data_start_of(path) + plan.total_bytes, s.bytes_by_file
    assert sum(s.bytes_by_file.values()) == s.bytes_fetched
    assert sum(s.bytes_by_source.values()) == s.bytes_fetched
    assert list(s.bytes_by_source) == [transport if transport != "local" else "local"]
    assert s.chunks == len(plan.chunks)
    assert sorted((c["start"], c["end"]) for c in trace.chunks) == sorted((c.start, c.end) for c in plan.chunks)
    progress.check(plan.output_bytes)


def test_index_checkpoint_bytes_by_file_sums_and_names_every_shard(tmp_path, http_server, http_dir):
    from checkpoints import write_sharded

    g = torch.Generator().manual_seed(6)
    tensors = {f"l{i}": torch.randn(4000 + i, generator=g) for i in range(6)}
    src = write_sharded(tmp_path / "sharded", tensors, 3)
    shutil.copytree(src, http_dir / "sharded")
    url = http_server.url_for(http_dir / "sharded") + "/"
    config = cfg()
    for source in (str(src), url):
        plan = fastload.plan(source, config=config)
        trace = fastload.Trace(otel=False)
        got = bounded(lambda: fastload.load(source, dtype=torch.float16, config=config, trace=trace))
        assert_bit_exact(got, converted(tensors, torch.float16))
        s = trace.summary()
        assert sum(s.bytes_by_file.values()) == s.bytes_fetched
        index_bytes = (src / "model.safetensors.index.json").stat().st_size
        headers = sum(data_start_of(src / f) for f in os.listdir(src) if f.endswith(".safetensors"))
        # over HTTP too the index comes once: its probe brings it whole
        assert s.bytes_fetched == index_bytes + headers + plan.total_bytes, s.bytes_by_file
        shard_keys = [k for k in s.bytes_by_file if k.endswith(".safetensors")]
        assert len(shard_keys) == 3
        assert s.chunks == len(plan.chunks)


# -- progress -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["plain", "names", "shard", "dtype"])
def test_progress_monotonic_and_ends_exactly_at_total_once(gappy, kind):
    path, tensors = gappy
    kwargs = {"names": dict(names=["w0", "w7", "ids"]),
              "shard": dict(shard=fastload.Shard(2, 3, {r"^w[0-3]$": 0})),
              "dtype": dict(dtype=torch.bfloat16), "plain": {}}[kind]
    config = cfg(chunk_bytes=CHUNK)
    plan_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    plan = fastload.plan(path, config=config, **plan_kwargs)
    progress = Progress()
    got = bounded(lambda: fastload.load(path, config=config, progress=progress, **kwargs))
    assert sum(t.numel() * torch.empty((), dtype=tensors[n].dtype).element_size() for n, t in got.items()) \
        == plan.output_bytes
    progress.check(plan.output_bytes)


@pytest.mark.parametrize("engine", ["aiohttp", "threads"])
def test_progress_over_http_with_retries_not_counted_twice(gappy, http_server, http_dir, engine):
    path, tensors = gappy
    shutil.copy(path, http_dir / "m.safetensors")
    url = http_server.url_for(http_dir / "m.safetensors")
    if engine == "aiohttp":
        http_server.faults.cut_after(20 * KiB)  # every reply breaks off: each chunk needs several attempts
    else:  # threaded bodies resume from whole 4 MiB pieces only: refuse requests instead of cutting bodies
        http_server.faults.fail_first(5, 503)
    config = cfg(chunk_bytes=CHUNK, http_engine=engine)
    plan = fastload.plan(str(path), config=config)
    progress, trace = Progress(), fastload.Trace(otel=False)
    got = bounded(lambda: fastload.load(url, config=config, progress=progress, trace=trace))
    assert_bit_exact(got, tensors)
    progress.check(plan.output_bytes)
    s = trace.summary()
    assert s.counters.get("retries", 0) > 0
    # resumed where they broke off (aiohttp: from the last byte): nothing received twice
    assert s.bytes_fetched == data_start_of(path) + plan.total_bytes


def test_progress_via_stream_with_shard_and_names(gappy):
    path, tensors = gappy
    shard = fastload.Shard(0, 2, {r"^w": 0})
    names = ["w2", "w3", "ids"]
    config = cfg()
    plan = fastload.plan(path, names=names, shard=shard, config=config)
    progress = Progress()

    def run():
        seen = {}
        with fastload.stream(path, names=names, shard=shard, config=config, progress=progress) as s:
            for name, t in s:
                seen[name] = t
        return seen

    got = bounded(run)
    assert set(got) == set(names)
    for n in ("w2", "w3"):
        assert torch.equal(got[n], tensors[n].tensor_split(2, 0)[0])
    progress.check(plan.output_bytes)


# -- stages -----------------------------------------------------------------------------------------------------


def test_convert_stage_only_when_converting(gappy):
    path, _ = gappy
    plain, conv = fastload.Trace(otel=False), fastload.Trace(otel=False)
    fastload.load(path, config=cfg(), trace=plain)
    fastload.load(path, config=cfg(), dtype=torch.float16, trace=conv)
    sp, sc = plain.summary(), conv.summary()
    assert "convert" not in sp.stages and not sp.counters.get("bytes_converted")
    assert not any(c["staged"] for c in plain.chunks)
    assert "wait" not in sp.stages, "a load that stages nothing waits for no buffer"
    assert "convert" in sc.stages and sc.counters["bytes_converted"] > 0
    # a dtype equal to the stored one converts nothing
    same = fastload.Trace(otel=False)
    fastload.load(path, config=cfg(), dtype=torch.float32, trace=same)
    ss = same.summary()
    assert "convert" not in ss.stages and not ss.counters.get("bytes_converted")
    assert not any(c["staged"] for c in same.chunks)


# -- trace= path written when the load fails --------------------------------------------------------------


@pytest.mark.parametrize("failure", ["missing", "unknown_name", "bad_header", "callback"])
def test_trace_path_is_valid_json_when_load_fails(gappy, tmp_path, failure):
    path, _ = gappy
    out = tmp_path / "t.json"
    kwargs: dict = {}
    source = path
    if failure == "missing":
        source, expected = tmp_path / "nope.safetensors", fastload.SourceNotFoundError
    elif failure == "unknown_name":
        kwargs["names"], expected = ["w1", "no_such"], fastload.ConfigError
    elif failure == "bad_header":
        source = tmp_path / "bad.safetensors"
        source.write_bytes(struct.pack("<Q", 16) + b"{not json at al}")
        expected = fastload.FormatError
    else:
        def boom(done, total):
            raise KeyError("callback failed")
        kwargs["progress"], expected = boom, KeyError
    with pytest.raises(expected):
        bounded(lambda: fastload.load(source, config=cfg(), trace=str(out), **kwargs))
    doc = json.loads(out.read_text())
    errors = doc["fastload"]["summary"]["errors"]
    assert len(errors) == 1 and errors[0].startswith(expected.__name__), errors
    assert not list(tmp_path.glob("*.tmp*"))


# -- memory: staged conversion of one tensor bigger than the budget, in a child process ----------------------

CHILD = textwrap.dedent(r"""
    import json, os, sys, tempfile
    import torch, fastload
    from safetensors.torch import save_file

    source, budget, engine = sys.argv[1], int(sys.argv[2]), sys.argv[3]

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    warm = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    save_file({"x": torch.ones(1000)}, warm)
    fastload.load(warm, dtype=torch.bfloat16)
    config = fastload.LoadConfig(chunk_bytes=budget // 4, host_buffer_bytes=budget, http_engine=engine,
                                 max_concurrency=16)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmHWM")
    out = fastload.load(source, dtype=torch.bfloat16, config=config)
    out_bytes = sum(t.numel() * t.element_size() for t in out.values())
    print(json.dumps({"extra": status("VmHWM") - before - out_bytes, "out": out_bytes}))
""")


@pytest.fixture(scope="module")
def big_f32(tmp_path_factory):
    path = tmp_path_factory.mktemp("bigmem") / "big.safetensors"
    g = torch.Generator().manual_seed(7)
    save_file({"big": torch.randn(24 * MiB, generator=g), "tail": torch.randn(11, generator=g)}, str(path))
    yield path
    path.unlink()


@pytest.mark.parametrize("where", ["local", "http-threads", "http-aiohttp"])
def test_one_tensor_bigger_than_budget_converted_within_budget(big_f32, tmp_path, http_server, http_dir, where):
    """96 MiB of float32 in one tensor, to bfloat16 (48 MiB of output), through a 16 MiB staging budget."""
    budget = 16 * MiB
    if where == "local":
        source, engine = str(big_f32), "threads"
    else:
        shutil.copy(big_f32, http_dir / "big.safetensors")
        source, engine = http_server.url_for(http_dir / "big.safetensors"), where.split("-")[1]
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = subprocess.run([sys.executable, str(script), source, str(budget), engine], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["out"] == 24 * MiB * 2 + 22
    assert result["extra"] <= budget + 24 * MiB, (
        f"{result['extra'] / MiB:.1f} MiB beyond the {result['out'] / MiB:.1f} MiB of outputs; budget "
        f"{budget / MiB:.0f} MiB")


def test_list_of_mixed_sources_counters_split_by_source_and_file(tmp_path, http_server, http_dir):
    g = torch.Generator().manual_seed(8)
    a = {"a0": torch.randn(5000, generator=g), "a1": torch.arange(99, dtype=torch.int32)}
    b = {"b0": torch.randn(7000, generator=g).to(torch.bfloat16)}
    c = {"c0": torch.randn(300, 11, generator=g)}
    pa, pb, pc = tmp_path / "a.safetensors", http_dir / "b.safetensors", tmp_path / "c.safetensors"
    save_file(a, str(pa)), save_file(b, str(pb)), save_file(c, str(pc))
    sources = [str(pa), http_server.url_for(pb), pc.as_uri()]
    config = cfg()
    plan = fastload.plan(sources, config=config)
    trace, progress = fastload.Trace(otel=False), Progress()
    got = bounded(lambda: fastload.load(sources, dtype=torch.float16, config=config, trace=trace, progress=progress))
    assert_bit_exact(got, converted(a | b | c, torch.float16))
    progress.check(plan.output_bytes)
    s = trace.summary()
    spans = {i: sum(ch.nbytes for ch in plan.chunks if ch.file == i) for i in range(3)}
    assert s.bytes_by_source == {"local": data_start_of(pa) + spans[0] + data_start_of(pc) + spans[2],
                                 "http": data_start_of(pb) + spans[1]}
    assert len(s.bytes_by_file) == 3 and sum(s.bytes_by_file.values()) == s.bytes_fetched
    assert s.chunks == len(plan.chunks)
    assert s.counters["bytes_converted"] == sum(t.numel() * t.element_size() for t in (a["a0"], b["b0"], c["c0"]))
