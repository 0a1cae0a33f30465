"""Corners of ``shard=``: how tensor-parallel slicing combines with names/dtype/stream/plan, indexed
checkpoints over HTTP and S3, gaps inside one read (non-dim-0 splits), faults, checksums, empty
and scalar tensors, and invalid shard specs.

Every result is compared bit for bit with ``safetensors.torch.load_file`` followed by
``full.tensor_split(world_size, dim)[rank]`` (what README.md promises); bytes are counted by the
test servers where the README makes a promise about them.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import random_tensor, write_sharded, write_single

SMALL = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=256 * 1024, max_concurrency=4)


def want_slice(full: torch.Tensor, shard: fastload.Shard, dim: int | None) -> torch.Tensor:
    return full if dim is None else full.tensor_split(shard.world_size, dim)[shard.rank]


def assert_bits(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    want = want.contiguous()
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (name, got.dtype, got.shape,
                                                                               want.dtype, want.shape)
    assert got.is_contiguous(), name
    assert got.untyped_storage().nbytes() == got.nbytes, name  # owns exactly its memory
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


def assert_rank(got: dict[str, torch.Tensor], full: dict[str, torch.Tensor], shard: fastload.Shard,
                dtype: torch.dtype | None = None) -> None:
    for name, tensor in got.items():
        want = want_slice(full[name], shard, shard.dim_for(name))
        if dtype is not None and want.dtype.is_floating_point:
            want = want.to(dtype)
        assert_bits(tensor, want, name)


def tensor_bytes_sent(server, path: str, data_start: int) -> int:
    """Body bytes the HTTP server sent for ranges inside the tensor data (probe and header excluded)."""
    total = 0
    for record in server.requests(path):
        start = int(re.match(r"bytes=(\d+)-", record.range).group(1)) if record.range else 0
        if start >= data_start:
            total += record.body_bytes
    return total


def tensor_requests(server, path: str, data_start: int) -> list:
    return [r for r in server.requests(path)
            if r.range and int(re.match(r"bytes=(\d+)-", r.range).group(1)) >= data_start]


@pytest.fixture(scope="module")
def gappy(tmp_path_factory) -> Path:
    """Tensors whose non-dim-0 slices are many strides with gaps between them, in several dtypes."""
    gen = torch.Generator().manual_seed(21)
    tensors = {
        "a.weight": random_tensor((97, 131), torch.float32, gen),        # 50 KB, odd dims
        "b.weight": random_tensor((13, 7, 29), torch.bfloat16, gen),
        "c.ids": random_tensor((41, 10), torch.int32, gen),              # integer: stays as stored
        "d.bias": random_tensor((131,), torch.float16, gen),
        "e.flag": random_tensor((6, 5), torch.bool, gen),
        "f.scale": random_tensor((), torch.float32, gen),               # a scalar
        "g.empty": random_tensor((0, 9), torch.float32, gen),
        "h.hollow": random_tensor((5, 0, 3), torch.float64, gen),
    }
    return write_single(tmp_path_factory.mktemp("gappy") / "gappy.safetensors", tensors)


# split dims for the tensors of ``gappy`` (scalars match no rule: they load whole)
GAPPY_RULES = [(r"^a\.", 1), (r"^b\.", -1), (r"^c\.", 1), (r"^d\.", 0), (r"^e\.", 1),
               (r"^g\.", 1), (r"^h\.", 1)]


# -- invalid shard specs ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rules", [None, 5, 1.5, object()])
def test_rules_that_are_not_a_collection_are_config_errors(rules):
    """Every other malformed Shard is a ConfigError (tests/test_shard.py); so must these be,
    not a bare TypeError from ``tuple(rules)``."""
    with pytest.raises(fastload.ConfigError):
        fastload.Shard(0, 2, rules)


def test_dim_out_of_range_only_for_tensors_that_are_loaded(gappy):
    """A rule whose dim does not fit a tensor that ``names=`` leaves out is no error."""
    full = safetensors.torch.load_file(gappy)
    shard = fastload.Shard(1, 2, {r"^d\.": 0, r"^a\.": 5})
    got = fastload.load(gappy, names=["d.bias"], shard=shard)
    assert_rank(got, full, shard)
    with pytest.raises(fastload.ConfigError, match=r"a\.weight"):
        fastload.load(gappy, names=["d.bias", "a.weight"], shard=shard)


def test_scalar_matched_by_a_rule_is_a_config_error_naming_it(gappy):
    # torch.tensor_split refuses a 0-d tensor, so there is no rank slice to give: a ConfigError, not a crash.
    with pytest.raises(fastload.ConfigError, match=r"f\.scale"):
        fastload.load(gappy, shard=fastload.Shard(0, 2, {r"scale": 0}))
    with pytest.raises(fastload.ConfigError, match=r"f\.scale"):
        fastload.plan(gappy, shard=fastload.Shard(0, 2, {r"scale": -1}))


def test_out_of_range_dim_in_stream_is_a_config_error(gappy):
    with pytest.raises(fastload.ConfigError, match=r"a\.weight"):
        with fastload.stream(gappy, shard=fastload.Shard(0, 2, {r"^a\.": 2})) as s:
            list(s)
    assert not [t for t in threading.enumerate() if t.name.startswith("fastload")]


# -- every transport, gaps, dtype, names, stream ------------------------------------------------------------

@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_http_gappy_reads_both_engines(gappy, serve, http_server, engine, dtype):
    full = safetensors.torch.load_file(gappy)
    source = serve("http", gappy)
    config = SMALL.replace(http_engine=engine)
    for rank in range(3):
        shard = fastload.Shard(rank, 3, GAPPY_RULES)
        got = fastload.load(source, shard=shard, dtype=dtype, config=config)
        assert list(got) == list(full)
        assert_rank(got, full, shard, dtype)


def test_s3_stream_with_names_dtype_and_shard(gappy, serve):
    full = safetensors.torch.load_file(gappy)
    source = serve("s3", gappy)
    names = ["e.flag", "a.weight", "f.scale", "b.weight", "g.empty"]
    for rank in range(4):
        shard = fastload.Shard(rank, 4, GAPPY_RULES)
        with fastload.stream(source, names=names, shard=shard, dtype=torch.bfloat16, config=SMALL) as s:
            got = dict(s)
            plan = s.plan
        assert set(got) == set(names)
        assert_rank(got, full, shard, torch.bfloat16)
        assert {t.name: tuple(t.shape) for t in plan.tensors} == \
            {n: tuple(want_slice(full[n], shard, shard.dim_for(n)).shape) for n in names}


def test_indexed_checkpoint_over_http_and_s3_dim0_fetches_only_the_rank_rows(tmp_path, serve, http_server):
    gen = torch.Generator().manual_seed(5)
    tensors = {f"layers.{i}.{kind}": random_tensor((37 + i, 24), torch.float32, gen)
               for i in range(4) for kind in ("q_proj.weight", "o_proj.weight")}
    tensors["norm.weight"] = random_tensor((24,), torch.float32, gen)
    directory = write_sharded(tmp_path / "ckpt", tensors, 3)
    rules = {r"q_proj": 0, r"o_proj": 1}
    for transport in ("http", "s3"):
        source = serve(transport, directory, as_dir=True)
        for rank in range(3):
            shard = fastload.Shard(rank, 3, rules)
            if transport == "http":
                http_server.reset()
            got = fastload.load(source, shard=shard, config=SMALL)
            assert list(got) == sorted(got, key=list(got).index)  # a dict in checkpoint order
            assert set(got) == set(tensors)
            assert_rank(got, tensors, shard)
            plan = fastload.plan(source, shard=shard, config=SMALL)
            if transport == "http":
                sent = 0
                for f in plan.files:
                    sent += tensor_bytes_sent(http_server, urlparse(f.info.url).path, f.data_start)
                assert sent == plan.total_bytes
                # dim-0 tensors: only the rank's rows went over the wire
                for t in plan.tensors:
                    if t.split_dim == 0:
                        pieces = [p for c in plan.chunks for p in c.pieces if plan.tensors[p.tensor] is t]
                        assert sum(p.nbytes for p in pieces) == t.nbytes


def test_names_duplicates_and_order_with_shard(gappy):
    full = safetensors.torch.load_file(gappy)
    shard = fastload.Shard(2, 3, GAPPY_RULES)
    got = fastload.load(gappy, names=("d.bias", "a.weight", "d.bias"), shard=shard)
    assert list(got) == ["a.weight", "d.bias"]  # checkpoint order, each once
    assert_rank(got, full, shard)
    with pytest.raises(fastload.ConfigError, match="nope"):
        fastload.load(gappy, names=["a.weight", "nope"], shard=shard)


# -- bytes: what goes over the wire ------------------------------------------------------------------------

def test_rank_with_only_empty_slices_fetches_no_tensor_bytes(tmp_path, serve, http_server):
    """world_size larger than every split dim: the high ranks own nothing, so nothing is read."""
    tensors = {"x": torch.arange(3, dtype=torch.float32), "y": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    path = write_single(tmp_path / "tiny.safetensors", tensors)
    source = serve("http", path)
    data_start = fastload.plan(path).files[0].data_start
    for rank in (3, 4):
        http_server.reset()
        shard = fastload.Shard(rank, 5, {"x": 0, "y": 0})
        trace = fastload.Trace()
        got = fastload.load(source, shard=shard, trace=trace)
        assert_rank(got, tensors, shard)
        assert got["x"].shape == (0,) and got["y"].shape == (0, 3)
        assert tensor_requests(http_server, urlparse(source).path, data_start) == []
        assert fastload.plan(source, shard=shard).total_bytes == 0
        assert trace.summary().bytes_fetched == data_start


def test_dim0_rank_share_counted_by_trace_and_server_with_dtype(tmp_path, serve, http_server):
    """The staged (conversion) path must fetch the same rows as the direct path."""
    gen = torch.Generator().manual_seed(3)
    tensors = {"w": random_tensor((257, 300), torch.float32, gen), "v": random_tensor((1001,), torch.float32, gen)}
    path = write_single(tmp_path / "m.safetensors", tensors)
    source = serve("http", path)
    data_start = fastload.plan(path).files[0].data_start
    for rank in range(4):
        shard = fastload.Shard(rank, 4, {".*": 0})
        http_server.reset()
        trace = fastload.Trace()
        got = fastload.load(source, shard=shard, dtype=torch.bfloat16, trace=trace, config=SMALL)
        assert_rank(got, tensors, shard, torch.bfloat16)
        share = sum(want_slice(t, shard, 0).nbytes for t in tensors.values())
        assert tensor_bytes_sent(http_server, urlparse(source).path, data_start) == share
        assert trace.summary().bytes_fetched == data_start + share


def test_progress_with_shard_ends_at_the_planned_total(gappy, serve):
    source = serve("http", gappy)
    shard = fastload.Shard(1, 3, GAPPY_RULES)
    calls = []
    fastload.load(source, shard=shard, config=SMALL, progress=lambda done, total: calls.append((done, total)))
    total = fastload.plan(source, shard=shard, config=SMALL).output_bytes  # the rank's bytes, not the spans read
    assert calls and calls[-1] == (total, total)
    assert all(b[0] >= a[0] for a, b in zip(calls, calls[1:]))


# -- faults inside gappy reads -----------------------------------------------------------------------------

@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_body_cut_mid_gappy_read_resumes_to_the_right_bytes(tmp_path, serve, http_server, engine):
    """A dim-1 slice read as one ranged GET with gaps; the body breaks off several times mid-way.
    The resumed reads must land every byte in the right place (and skip the gap bytes)."""
    gen = torch.Generator().manual_seed(8)
    tensors = {"w": random_tensor((700, 3001), torch.float32, gen)}  # 8.4 MB: several 4 MiB pieces
    path = write_single(tmp_path / "big.safetensors", tensors)
    source = serve("http", path)
    config = fastload.LoadConfig(max_concurrency=1, http_engine=engine,
                                 retry=fastload.RetryConfig(backoff_base_s=0.01, backoff_max_s=0.05))
    for rank in (0, 1, 2):
        shard = fastload.Shard(rank, 3, {"w": 1})
        http_server.reset()
        http_server.faults.clear()
        http_server.faults.cut_after(1_234_567 + 1_000_003 * rank, times=2, path=urlparse(source).path)
        got = fastload.load(source, shard=shard, config=config)
        assert_rank(got, tensors, shard)
    http_server.faults.clear()


# -- checksums and partial reads ------------------------------------------------------------------------------

def test_s3_checksum_skipped_for_a_partial_rank_and_verified_for_a_whole_one(s3_server, s3_bucket, gappy):
    data = gappy.read_bytes()
    s3_server.client().put_object(Bucket=s3_bucket, Key="g.safetensors", Body=data, ChecksumAlgorithm="SHA256")
    source = f"s3://{s3_bucket}/g.safetensors"
    full = safetensors.torch.load_file(gappy)
    config = SMALL.replace(verify_checksums=True)
    # a real split: the file is read in part and cannot be verified
    shard = fastload.Shard(1, 2, GAPPY_RULES)
    trace = fastload.Trace()
    got = fastload.load(source, shard=shard, config=config, trace=trace)
    assert_rank(got, full, shard)
    counters = trace.summary().counters
    assert counters.get("checksums_skipped") == 1 and not counters.get("checksums_verified")
    # world_size 1: every rule gives the whole tensor, the file is read whole and verified
    shard = fastload.Shard(0, 1, GAPPY_RULES)
    trace = fastload.Trace()
    got = fastload.load(source, shard=shard, dtype=torch.float16, config=config, trace=trace)
    assert_rank(got, full, shard, torch.float16)
    assert trace.summary().counters.get("checksums_verified") == 1


# -- the plan --------------------------------------------------------------------------------------------

def test_plan_with_shard_describes_the_rank(gappy):
    full = safetensors.torch.load_file(gappy)
    shard = fastload.Shard(2, 4, GAPPY_RULES)
    plan = fastload.plan(gappy, shard=shard, config=SMALL)
    d = plan.to_dict()
    by_name = {t["name"]: t for t in d["tensors"]}
    for name, tensor in full.items():
        dim = shard.dim_for(name)
        assert by_name[name]["shape"] == list(want_slice(tensor, shard, dim).shape)
        assert by_name[name]["stored_shape"] == list(tensor.shape)
        assert by_name[name]["split_dim"] == (None if dim is None else dim % tensor.dim())
    assert d["output_bytes"] == sum(want_slice(t, shard, shard.dim_for(n)).nbytes for n, t in full.items())
    assert plan.total_bytes <= sum(t.nbytes for t in full.values())
    assert "f.scale" in str(plan) and "scalar" in str(plan)
    got = fastload.load(gappy, shard=shard, config=SMALL)
    assert plan.output_bytes == sum(t.nbytes for t in got.values())


def test_shard_is_hashable_and_reusable_across_loads(gappy):
    full = safetensors.torch.load_file(gappy)
    shard = fastload.Shard(1, 2, (r for r in GAPPY_RULES))  # any iterable of pairs, consumed once
    assert shard.rules == tuple(GAPPY_RULES)
    assert hash(shard) == hash(fastload.Shard(1, 2, GAPPY_RULES))
    for _ in range(2):
        assert_rank(fastload.load(gappy, shard=shard), full, shard)


def test_plan_total_bytes_matches_what_a_local_dim1_load_fetches(gappy):
    """README: ``fastload.plan`` tells "what a load would fetch". A local file split on dim 1 into rows a few
    hundred bytes apart is read span by span (a read per row cost ~10 us of Python each: a share was 5-13x
    slower than the whole file), and ``total_bytes`` says exactly that."""
    names = ["a.weight", "b.weight"]
    for rank in range(4):
        shard = fastload.Shard(rank, 4, GAPPY_RULES)
        trace = fastload.Trace()
        got = fastload.load(gappy, names=names, shard=shard, trace=trace, config=SMALL)
        plan = fastload.plan(gappy, names=names, shard=shard, config=SMALL)
        fetched = trace.summary().bytes_fetched - plan.files[0].data_start
        assert fetched > sum(t.nbytes for t in got.values())  # narrow rows: read with the gaps between them
        assert plan.total_bytes == fetched, (plan.total_bytes, fetched)


# -- sources given as file:// URLs or lists ---------------------------------------------------------------

def test_list_of_files_and_file_urls_with_shard(tmp_path):
    gen = torch.Generator().manual_seed(4)
    one = {"p.q_proj.weight": random_tensor((11, 6), torch.float32, gen), "p.norm": random_tensor((6,), torch.float32, gen)}
    two = {"r.o_proj.weight": random_tensor((6, 11), torch.bfloat16, gen)}
    a = write_single(tmp_path / "a.safetensors", one)
    b = write_single(tmp_path / "b.safetensors", two)
    full = {**one, **two}
    for rank in range(4):
        shard = fastload.Shard(rank, 4, {"q_proj": 0, "o_proj": 1})
        got = fastload.load([a.as_uri(), str(b)], shard=shard, config=SMALL)
        assert set(got) == set(full)
        assert_rank(got, full, shard)


# -- splits on a dim other than 0: one run per outer index ----------------------------------------------------

def test_dim1_rank_share_is_read_in_a_few_spans(tmp_path):
    """Row-parallel layers (o_proj, down_proj) are split on dim 1: 8192 rows of 256 bytes per tensor here. They
    used to cost a read, a memoryview and two Piece objects per row (a rank's 1/8 took 5-13x longer than the
    whole file); now each chunk is one read of its span and one strided copy per piece.
    Speed: benchmarks/bench_shard.py."""
    gen = torch.Generator().manual_seed(9)
    tensors = {f"l{i}.o_proj.weight": random_tensor((8192, 1024), torch.bfloat16, gen) for i in range(4)}  # 64 MiB
    path = write_single(tmp_path / "o.safetensors", tensors)
    shard = fastload.Shard(1, 8, {"o_proj": 1})
    trace = fastload.Trace()
    assert_rank(fastload.load(path, shard=shard, trace=trace), tensors, shard)
    plan = fastload.plan(path, shard=shard)
    assert all(p.rows > 1 for c in plan.chunks for p in c.pieces)  # a piece per tensor per chunk, not per row
    assert len(trace.chunks) == len(plan.chunks) <= 32  # 64 MiB of spans in 4 MiB reads
    assert trace.summary().bytes_fetched == plan.files[0].data_start + plan.total_bytes


def test_plan_of_a_large_row_parallel_model_is_fast(tmp_path):
    """``fastload.plan`` works "from headers alone". A 20-layer model with 8192x8192 bf16 o_proj and
    down_proj split on dim 1 (tensor-parallel, 8 ranks) took 3-6 s to plan (one Python Piece per row,
    twice); the dim-0 split ~6 ms. Rows are now grouped into strided pieces, one per chunk."""
    n, rows = 40, 8192
    nbytes = rows * 8192 * 2
    header = {f"model.layers.{i // 2}.{'self_attn.o_proj' if i % 2 == 0 else 'mlp.down_proj'}.weight":
              {"dtype": "BF16", "shape": [rows, 8192], "data_offsets": [i * nbytes, (i + 1) * nbytes]}
              for i in range(n)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:  # a sparse 5.4 GB file: only the header is ever read
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + n * nbytes)
    plan = fastload.plan(path, shard=fastload.Shard(3, 8, {"proj": 1}))
    assert plan.output_bytes == n * nbytes // 8
    pieces = sum(len(c.pieces) for c in plan.chunks)
    assert pieces == len(plan.chunks) < n * rows // 100, pieces  # rows grouped into strided pieces: not per row
