"""Tensor-parallel loading: ``shard=Shard(rank, world_size, rules)`` on every transport.

Every result is compared with ``full.tensor_split(world_size, dim)[rank]`` from
safetensors' own load; bytes taken from the source are counted by the test
servers (not only by fastload's trace).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import llama_like_tensors, random_tensor, saveable_dtypes, write_sharded, write_single

SMALL = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=256 * 1024, max_concurrency=4)
SHAPES = {"block": (7, 5, 3), "vec": (10,), "mat": (9, 4), "empty": (0, 4), "hollow": (4, 0, 3)}


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory) -> Path:
    """Each saveable dtype in a few shapes whose dims do not divide evenly by 2, 3, 4 or 8."""
    gen = torch.Generator().manual_seed(11)
    tensors = {f"{d}.{s}": random_tensor(shape, dtype, gen)
               for d, dtype in saveable_dtypes().items() for s, shape in SHAPES.items()}
    return write_single(tmp_path_factory.mktemp("shard") / "every_dtype.safetensors", tensors)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """Tensors large enough that one rank's share spans several 64 KiB chunks, in every split dim."""
    gen = torch.Generator().manual_seed(12)
    tensors = {"rows": random_tensor((301, 200), torch.float32, gen),      # 241 KB
               "long_rows": random_tensor((3, 40001), torch.float32, gen),  # rows wider than a chunk
               "cube": random_tensor((9, 70, 33), torch.bfloat16, gen),
               "tail": random_tensor((5,), torch.int64, gen)}
    return write_single(tmp_path_factory.mktemp("shard") / "wide.safetensors", tensors)


def expected(full: torch.Tensor, shard: fastload.Shard, dim: int | None) -> torch.Tensor:
    return full if dim is None else full.tensor_split(shard.world_size, dim)[shard.rank]


def assert_rank(got: dict[str, torch.Tensor], full: dict[str, torch.Tensor], shard: fastload.Shard) -> None:
    for name, tensor in got.items():
        want = expected(full[name], shard, shard.dim_for(name))
        assert tensor.dtype == want.dtype and tensor.shape == want.shape, (name, shard)
        assert tensor.is_contiguous(), name
        assert tensor.untyped_storage().nbytes() == tensor.nbytes, name  # owns exactly its memory
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), want.contiguous().reshape(-1).view(torch.uint8)), \
            (name, shard)


def served(request, transport: str, path: Path) -> tuple[str, object]:
    """(source URL, the server that counts the bytes it sent, or None for local files and S3)."""
    source = request.getfixturevalue("serve")(transport, path)
    return source, request.getfixturevalue("http_server") if transport == "http" else None


def tensor_bytes_sent(server, source: str, data_start: int) -> int:
    """Body bytes the server sent for ranges inside the tensor data (stat probe and header excluded)."""
    total = 0
    for record in server.requests(urlparse(source).path):
        start = int(re.match(r"bytes=(\d+)-", record.range).group(1)) if record.range else 0
        if start >= data_start:
            total += record.body_bytes
    return total


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_every_rank_every_dim_every_dtype(every_dtype, dim, world_size):
    full = safetensors.torch.load_file(every_dtype)
    for rank in range(world_size):
        # 3-D tensors split on `dim`; 2-D on dim % 2 (still every dim); the 1-D ones on 0; "empty" whole
        shard = fastload.Shard(rank, world_size, [(r"\.(block|hollow)$", dim), (r"\.mat$", dim % 2 - (dim < 0) * 2),
                                                  (r"\.vec$", 0)])
        got = fastload.load(every_dtype, shard=shard, config=SMALL)
        assert set(got) == set(full)
        assert_rank(got, full, shard)


@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_ranks_put_together_give_the_whole_tensor(wide, world_size):
    full = safetensors.torch.load_file(wide)
    rules = {"rows": 1, "long_rows": -1, "cube": 1}
    parts = [fastload.load(wide, shard=fastload.Shard(r, world_size, rules), config=SMALL) for r in range(world_size)]
    for name, tensor in full.items():
        dim = fastload.Shard(0, world_size, rules).dim_for(name)
        if dim is None:
            assert all(torch.equal(p[name], tensor) for p in parts)
        else:
            assert torch.equal(torch.cat([p[name] for p in parts], dim), tensor), name


@pytest.mark.parametrize("transport", ["local", "http", "s3"])
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_over_every_transport(wide, transport, dim, request):
    full = safetensors.torch.load_file(wide)
    source, _ = served(request, transport, wide)
    for rank in range(3):
        shard = fastload.Shard(rank, 3, {"cube": dim, "rows": dim % 2, "long_rows": dim % 2})
        assert_rank(fastload.load(source, shard=shard, config=SMALL), full, shard)


def test_dim0_fetches_only_the_ranks_rows(wide, http_server, serve):
    source = serve("http", wide)
    full = safetensors.torch.load_file(wide)
    data_start = fastload.plan(wide).files[0].data_start
    shares = []
    for rank in range(3):
        http_server.reset()
        shard = fastload.Shard(rank, 3, {".*": 0})
        trace = fastload.Trace()
        got = fastload.load(source, shard=shard, trace=trace, config=SMALL)
        want = sum(expected(t, shard, 0).nbytes for t in full.values())
        assert sum(t.nbytes for t in got.values()) == want
        sent = tensor_bytes_sent(http_server, source, data_start)
        assert sent == want  # counted by the server: exactly this rank's rows
        assert trace.summary().bytes_fetched == data_start + want  # header + the rank's rows
        assert http_server.bytes_sent(urlparse(source).path) == data_start + want  # the probe brings the length prefix
        shares.append(sent)
    assert sum(shares) == sum(t.nbytes for t in full.values())  # the ranks partition the tensor bytes


@pytest.mark.parametrize("dim", [1, 2, -1])
def test_other_dims_fetch_at_most_the_tensor_span(wide, http_server, serve, dim):
    source = serve("http", wide)
    plan = fastload.plan(wide, names=["cube"])
    span = plan.tensors[0].spec.nbytes
    data_start = plan.files[0].data_start
    for rank in range(4):
        shard = fastload.Shard(rank, 4, {"cube": dim})
        http_server.reset()
        trace = fastload.Trace()
        got = fastload.load(source, names=["cube"], shard=shard, trace=trace, config=SMALL)
        sent = tensor_bytes_sent(http_server, source, data_start)
        assert got["cube"].nbytes <= sent <= span
        assert sent == fastload.plan(wide, names=["cube"], shard=shard, config=SMALL).total_bytes
        assert trace.summary().bytes_fetched == data_start + sent


@pytest.mark.parametrize("dim", [1, 2])
def test_local_narrow_strides_are_read_with_their_gaps(wide, dim):
    """Rows a few KiB apart: one read of the whole span and one copy per piece beat a read per row."""
    full = safetensors.torch.load_file(wide)
    data_start = fastload.plan(wide).files[0].data_start
    for rank in range(3):
        shard = fastload.Shard(rank, 3, {"cube": dim})
        trace = fastload.Trace()
        got = fastload.load(wide, names=["cube"], shard=shard, trace=trace, config=SMALL)
        assert torch.equal(got["cube"], expected(full["cube"], shard, dim))
        plan = fastload.plan(wide, names=["cube"], shard=shard, config=SMALL)
        assert trace.summary().bytes_fetched == data_start + plan.total_bytes > data_start + got["cube"].nbytes


def test_local_wide_strides_are_read_alone(wide):
    """Rows 160 KB apart (over SPAN_STRIDE): each rank's part of each row is read alone, nothing between."""
    full = safetensors.torch.load_file(wide)
    data_start = fastload.plan(wide).files[0].data_start
    for rank in range(3):
        shard = fastload.Shard(rank, 3, {"long_rows": 1})
        for dtype in (None, torch.float64):  # straight into the tensor, and staged for conversion
            trace = fastload.Trace()
            got = fastload.load(wide, names=["long_rows"], shard=shard, trace=trace, config=SMALL, dtype=dtype)
            want = expected(full["long_rows"], shard, 1)
            assert torch.equal(got["long_rows"], want if dtype is None else want.to(dtype))
            assert trace.summary().bytes_fetched == data_start + want.nbytes


def test_s3_bytes_per_rank_counted_by_a_proxy(wide, s3_server, s3_bucket, s3_proxy):
    s3_server.put(s3_bucket, wide.name, wide.read_bytes())
    config = SMALL.replace(s3=fastload.S3Options(endpoint_url=s3_proxy.url))
    full = safetensors.torch.load_file(wide)
    data_start = fastload.plan(wide).files[0].data_start
    source = f"s3://{s3_bucket}/{wide.name}"
    for rank in range(2):
        s3_proxy.reset()
        shard = fastload.Shard(rank, 2, {"rows|cube": 0})
        trace = fastload.Trace()
        got = fastload.load(source, shard=shard, trace=trace, config=config)
        assert_rank(got, full, shard)
        sent = sum(r.body_bytes for r in s3_proxy.requests(f"*{wide.name}*")
                   if r.range and int(re.match(r"bytes=(\d+)-", r.range).group(1)) >= data_start)
        want = sum(t.nbytes for t in got.values())
        assert sent == want
        assert trace.summary().bytes_fetched >= data_start + want


def test_names_with_shard(wide, http_server, serve):
    source = serve("http", wide)
    full = safetensors.torch.load_file(wide)
    data_start = fastload.plan(wide).files[0].data_start
    shard = fastload.Shard(2, 3, {"rows": 0, "tail": 0})
    got = fastload.load(source, names=["tail", "rows"], shard=shard, config=SMALL)
    assert set(got) == {"rows", "tail"}
    assert_rank(got, full, shard)
    assert tensor_bytes_sent(http_server, source, data_start) == got["rows"].nbytes + got["tail"].nbytes


def test_first_matching_rule_wins_and_unmatched_load_whole(llama_sharded_checkpoint):
    full = llama_like_tensors(seed=0)
    rules = [(r"q_proj", 1), (r"proj", 0), (r"embed_tokens", -1)]
    shard = fastload.Shard(1, 2, rules)
    got = fastload.load(llama_sharded_checkpoint, shard=shard)
    assert_rank(got, full, shard)
    assert got["model.layers.0.self_attn.q_proj.weight"].shape == (64, 32)  # dim 1: the first rule
    assert got["model.layers.0.mlp.up_proj.weight"].shape == (88, 64)  # dim 0: the second
    assert got["model.embed_tokens.weight"].shape == (256, 32)
    assert torch.equal(got["model.norm.weight"], full["model.norm.weight"])  # no rule: whole
    assert torch.equal(got["lm_head.weight"], full["lm_head.weight"])


def test_tensor_parallel_rules_over_an_indexed_checkpoint(llama_sharded_checkpoint):
    full = llama_like_tensors(seed=0)
    rules = {r"(q|k|v|gate|up)_proj": 0, r"(o|down)_proj": 1, r"embed_tokens|lm_head": 0}
    for rank in range(3):
        shard = fastload.Shard(rank, 3, rules)
        with fastload.stream(llama_sharded_checkpoint, shard=shard) as s:
            got = dict(s)
        assert_rank({n: got[n] for n in full}, full, shard)
        plan = fastload.plan(llama_sharded_checkpoint, shard=shard)
        assert plan.output_bytes == sum(t.nbytes for t in got.values())
        assert {t.name: t.split_dim for t in plan.tensors}["model.layers.1.mlp.down_proj.weight"] == 1


def test_shard_with_dtype_conversion(wide):
    full = safetensors.torch.load_file(wide)
    shard = fastload.Shard(1, 3, {"rows": 1, "cube": 2, "long_rows": 1})
    got = fastload.load(wide, shard=shard, dtype=torch.float16, config=SMALL)
    for name, tensor in full.items():
        want = expected(tensor, shard, shard.dim_for(name))
        want = want.to(torch.float16) if want.dtype.is_floating_point else want
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name


@pytest.mark.parametrize("bad", [
    dict(rank=2, world_size=2), dict(rank=-1, world_size=2), dict(rank=0, world_size=0),
    dict(rank=True, world_size=2), dict(rank=0, world_size=2, rules={"(": 0}),
    dict(rank=0, world_size=2, rules={"x": 1.0}), dict(rank=0, world_size=2, rules={"x": True}),
    dict(rank=0, world_size=2, rules="x"), dict(rank=0, world_size=2, rules=[("x",)]),
    dict(rank=0, world_size=2, rules=[(b"x", 0)]),
])
def test_bad_shards_are_config_errors(bad):
    with pytest.raises(fastload.ConfigError):
        fastload.Shard(**bad)


@pytest.mark.parametrize("dim", [3, -4])
def test_dim_out_of_range_names_the_tensor(wide, dim):
    with pytest.raises(fastload.ConfigError, match="cube.*out of range"):
        fastload.load(wide, shard=fastload.Shard(0, 2, {"cube": dim}))
    with pytest.raises(fastload.ConfigError, match="tail"):
        fastload.plan(wide, shard=fastload.Shard(0, 2, {"tail": 1}))
    with pytest.raises(fastload.ConfigError):
        fastload.load(wide, shard="rank 0")


def test_rank_slices_smaller_than_world_size_are_empty(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {"t": torch.arange(3.0), "u": torch.ones(2, 2)})
    for rank in range(5):
        shard = fastload.Shard(rank, 5, {"t": 0, "u": 1})
        got = fastload.load(path, shard=shard)
        assert torch.equal(got["t"], torch.arange(3.0).tensor_split(5)[rank])
        assert got["u"].shape == torch.ones(2, 2).tensor_split(5, 1)[rank].shape


def test_file_of_only_empty_tensors(tmp_path):
    path = write_single(tmp_path / "m.safetensors", {"e": torch.zeros(3, 0), "f": torch.zeros(0, 5)})
    got = fastload.load(path, shard=fastload.Shard(1, 2, {"e": 0, "f": 1}))
    assert got["e"].shape == (1, 0) and got["f"].shape == (0, 2)


def test_write_sharded_rules_use_index(tmp_path):
    tensors = {f"layer{i}.w": torch.randn(6, 10) for i in range(4)}
    directory = write_sharded(tmp_path / "ckpt", tensors, 2)
    shard = fastload.Shard(1, 4, {r"layer[02]": 1})
    got = fastload.load(directory, shard=shard)
    assert_rank(got, tensors, shard)


def test_rules_accept_mappings_and_pairs_alike():
    assert fastload.Shard(0, 2, {"a": 0, "b": -1}) == fastload.Shard(0, 2, [["a", 0], ("b", -1)])
    assert fastload.Shard(0, 2, [["a", 0]]).rules == (("a", 0),)


# -- the plan itself, as a property: random shapes, dims, world sizes and chunk sizes -------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fastload.format import header_length, parse_header  # noqa: E402
from fastload.plan import build_plan  # noqa: E402
from fastload.sources import ObjectInfo  # noqa: E402


@st.composite
def shard_cases(draw):
    count = draw(st.integers(1, 4))
    shapes = [tuple(draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))) for _ in range(count)]
    dtypes = [draw(st.sampled_from([torch.float64, torch.bfloat16, torch.int8])) for _ in range(count)]
    dims = [draw(st.one_of(st.none(), st.integers(-len(s), len(s) - 1))) for s in shapes]
    world = draw(st.integers(1, 9))
    return shapes, dtypes, dims, world, draw(st.integers(0, world - 1)), draw(st.sampled_from([1, 2, 3])) * 65536


@settings(max_examples=120, deadline=None)
@given(shard_cases())
def test_plan_pieces_rebuild_every_rank_slice(case):
    shapes, dtypes, dims, world, rank, chunk_bytes = case
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": random_tensor(shape, dtype, gen) for i, (shape, dtype) in enumerate(zip(shapes, dtypes))}
    data = safetensors.torch.save(tensors)
    n = header_length(data[:8], url="mem", file_size=len(data))
    header = parse_header(data[8:n], url="mem", file_size=len(data))
    shard = fastload.Shard(rank, world, [(f"^t{i}$", d) for i, d in enumerate(dims) if d is not None])
    config = fastload.LoadConfig(chunk_bytes=chunk_bytes, host_buffer_bytes=2 * chunk_bytes)
    plan = build_plan([header], [ObjectInfo("mem", len(data))], config=config, shard=shard)
    outputs = [bytearray(t.nbytes) for t in plan.tensors]
    written = [0] * len(plan.tensors)
    for chunk in plan.chunks:
        assert chunk.nbytes <= chunk_bytes and chunk.pieces[0].src == chunk.start
        assert chunk.pieces[-1].end == chunk.end
        for prev, piece in zip(chunk.pieces, chunk.pieces[1:]):
            gap = piece.src - prev.end
            assert gap >= 0 and (gap == 0 or prev.tensor == piece.tensor)  # gaps only inside one tensor
        for p in chunk.pieces:
            spec = plan.tensors[p.tensor].spec
            assert spec.start <= p.src and p.end <= spec.end
            assert p.rows == 1 or p.stride > p.length  # a strided piece skips bytes between its rows
            for row, src in enumerate(p.row_starts()):  # rows back to back in the output
                at = p.dst + row * p.length
                outputs[p.tensor][at:at + p.length] = data[src:src + p.length]
            written[p.tensor] += p.nbytes
    for t, out, count in zip(plan.tensors, outputs, written):
        dim = shard.dim_for(t.name)
        want = expected(tensors[t.name], shard, dim).contiguous()
        assert t.shape == tuple(want.shape) and count == want.nbytes  # every byte written exactly once
        assert bytes(out) == want.reshape(-1).view(torch.uint8).numpy().tobytes(), (t.name, dim)
