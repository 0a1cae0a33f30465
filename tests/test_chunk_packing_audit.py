"""Audit: the planner's chunking (``fastload/plan.py``: ``_runs``, ``_cut``, ``_chunks``, ``build_plan``,
``chunk_size``), with the fill rule (a contiguous tensor right after the open chunk first fills it, the room
rounded down to a multiple of 8 bytes, then goes on in chunk-size parts).

Property-based: random safetensors files written by hand (odd sizes, unaligned offsets, zero-size tensors,
scalars, every dtype this torch/safetensors can store), random ``chunk_bytes`` around the tensors' sizes, random
``names=`` subsets and ``shard=`` rules. First the plan's invariants (``fastload.plan``), then loads bit for bit
against ``safetensors.torch.load_file`` over local files (``load``, ``stream``, ``direct_io``), the HTTP Range
fixture (both engines) and the CUDA sink's logic on the fake device.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import os
import re
import struct
import tempfile
from urllib.parse import urlparse
from dataclasses import dataclass
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastload
from checkpoints import evict, random_tensor, saveable_dtypes
from test_direct_io import direct_supported
from fake_device import LateDevice, assert_bit_exact, drive
from fastload.plan import MIN_SPLIT, chunk_size, split_bounds

KiB = 1 << 10
MiB = 1 << 20

DTYPES: dict[str, torch.dtype] = saveable_dtypes()  # safetensors name -> torch dtype
DTYPE_NAMES = sorted(DTYPES)
CONVERT_TO = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

COMMON = dict(deadline=None, derandomize=True, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large, HealthCheck.large_base_example])

_counter = itertools.count()


# -- layouts ----------------------------------------------------------------------------------------------------


@dataclass
class Layout:
    tensors: list[tuple[str, str, tuple[int, ...]]]  # (name, safetensors dtype, shape), in file order
    header_pad: int
    seed: int

    def values(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        return {name: random_tensor(shape, DTYPES[dt], g) for name, dt, shape in self.tensors}


def write_layout(path: Path, layout: Layout) -> Path:
    """Tensors back to back in the given order (no alignment at all); the header padded by ``header_pad``
    spaces, so the data section starts at any offset mod 8."""
    entries, blobs, offset = {}, [], 0
    for (name, dt, shape), t in zip(layout.tensors, layout.values().values()):
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        assert len(raw) == math.prod(shape) * t.element_size()
        entries[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header = json.dumps(entries, separators=(",", ":")).encode() + b" " * layout.header_pad
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"".join(blobs))
    return path


SIZE_ANCHORS = [0.02, 0.1, 0.3, 0.45, 0.6, 0.9, 1.0, 1.1, 1.5, 2.0, 3.0]  # of max_bytes / 3 (64 KiB-ish)


@st.composite
def sizes(draw, max_bytes: int) -> int:
    """Bytes around the chunk sizes (hypothesis alone would keep to a few bytes), perturbed by odd amounts."""
    return max(1, int(draw(st.sampled_from(SIZE_ANCHORS)) * max_bytes / 3) + draw(st.integers(-99, 99)))


@st.composite
def shapes(draw, itemsize: int, max_bytes: int) -> tuple[int, ...]:
    kind = draw(st.sampled_from(["mat", "scalar", "empty", "vec", "vec", "mat", "mat", "cube", "tiny"]))
    if kind == "scalar":
        return ()
    if kind == "empty":
        return draw(st.sampled_from([(0,), (0, 7), (5, 0), (3, 0, 2)]))
    if kind == "tiny":
        return draw(st.sampled_from([(1,), (3,), (1, 1), (2, 3), (7,), (1, 5, 1)]))
    elems = max(1, draw(sizes(max_bytes)) // itemsize)
    if kind == "vec":
        return (elems,)
    if kind == "mat":
        rows = draw(st.sampled_from([1, 2, 3, 5, 7, 16, 31, 64, 97, 128, 255, 512, 1000]))
        return (rows, max(1, elems // rows))
    a = draw(st.sampled_from([1, 2, 3, 5]))
    b = draw(st.sampled_from([1, 2, 7, 29, 64]))
    return (a, b, max(1, elems // (a * b)))


@st.composite
def layouts(draw, max_tensors: int = 7, max_bytes: int = 200 * KiB) -> Layout:
    n = draw(st.integers(2, max_tensors))
    tensors = []
    for i in range(n):
        dt = draw(st.sampled_from(DTYPE_NAMES))
        shape = draw(shapes(DTYPES[dt].itemsize, max_bytes))
        tensors.append((f"t{i}.{dt.lower()}", dt, shape))
    return Layout(tensors, draw(st.integers(0, 9)), draw(st.integers(0, 2**31)))


@st.composite
def chunk_bytes_small(draw) -> int:
    """64 KiB .. ~256 KiB, any multiple of 64 (the config's rule): ``chunk_size`` keeps it as it is."""
    base = draw(st.sampled_from([1024, 1025, 1100, 1500, 1536, 2000, 2048, 3001, 4096]))
    return (base + draw(st.integers(0, 37))) * 64


@st.composite
def selections(draw, layout: Layout, allow_names: bool = True, allow_shard: bool = True):
    """(names or None, shard or None)."""
    all_names = [name for name, _, _ in layout.tensors]
    names = None
    if allow_names and draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(all_names), min_size=1, max_size=len(all_names), unique=True))
    shard = None
    if allow_shard and draw(st.booleans()):
        world = draw(st.integers(2, 5))
        rank = draw(st.integers(0, world - 1))
        rules = []
        for name, _, shape in layout.tensors:
            options = [None] + ([0, -1] if len(shape) >= 1 else []) + ([1] if len(shape) >= 2 else [])
            dim = draw(st.sampled_from(options))
            if dim is not None:
                rules.append((f"^{re.escape(name)}$", dim))
        shard = fastload.Shard(rank, world, rules)
    return names, shard


def new_path(directory: Path | None = None) -> Path:
    directory = Path(directory or tempfile.gettempdir())
    return directory / f"layout-{os.getpid()}-{next(_counter)}.safetensors"


def config_for(chunk: int, **kwargs) -> fastload.LoadConfig:
    kwargs.setdefault("max_concurrency", 4)
    kwargs.setdefault("host_buffer_bytes", max(4 * chunk, 256 * KiB))
    return fastload.LoadConfig(chunk_bytes=chunk, **kwargs)


# -- references ---------------------------------------------------------------------------------------------------


def expected(path: Path, *, names=None, shard=None, dtype=None) -> dict[str, torch.Tensor]:
    ref = safetensors.torch.load_file(str(path))
    if names is not None:
        ref = {n: ref[n] for n in names}
    out = {}
    for name, t in ref.items():
        if shard is not None:
            dim = shard.dim_for(name)
            if dim is not None:
                t = t.tensor_split(shard.world_size, dim)[shard.rank].contiguous()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for name, t in want.items():
        out = got[name]
        assert out.dtype == t.dtype and tuple(out.shape) == tuple(t.shape), (name, out.dtype, t.dtype,
                                                                             out.shape, t.shape)
        a = out.contiguous().reshape(-1).view(torch.uint8) if out.numel() else out.reshape(-1)
        b = t.contiguous().reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)
        if not torch.equal(a, b):
            bad = (a != b).nonzero()
            first = int(bad[0]) if len(bad) else -1
            raise AssertionError(f"{name} ({t.dtype}, shape {list(t.shape)}) differs from safetensors: "
                                 f"{len(bad)} byte(s), first at byte {first}")


# -- plan invariants --------------------------------------------------------------------------------------------


def needed_src(t, o: int, shard) -> int:
    """File offset of output byte ``o`` of planned tensor ``t`` (stored dtype)."""
    spec = t.spec
    if t.split_dim is None:
        return spec.start + o
    d = t.split_dim
    lo, hi = split_bounds(spec.shape[d], shard.world_size, shard.rank)
    inner = math.prod(spec.shape[d + 1:]) * spec.dtype.itemsize
    width = (hi - lo) * inner
    r, c = divmod(o, width)
    return spec.start + r * spec.shape[d] * inner + lo * inner + c


def needed_span(t, shard) -> tuple[int, int]:
    """The file span holding this rank's bytes of ``t`` (first to last needed byte, end exclusive)."""
    spec = t.spec
    if t.nbytes == 0:
        return spec.start, spec.start
    return needed_src(t, 0, shard), needed_src(t, t.nbytes - 1, shard) + 1


def check_plan(plan: fastload.LoadPlan, headers_of, *, config, names=None, shard=None) -> None:
    """Every invariant of a plan; ``headers_of`` maps name -> (start, end, file) of every tensor in the files."""
    chunk = plan.chunk_bytes
    assert 0 < chunk <= config.chunk_bytes
    if config.chunk_bytes <= MIN_SPLIT:
        assert chunk == config.chunk_bytes
    # tensors: exactly the selection
    got_names = [t.name for t in plan.tensors]
    assert len(got_names) == len(set(got_names))
    assert set(got_names) == (set(names) if names is not None else set(headers_of))
    # chunks: ids, spans, sizes
    assert [c.id for c in plan.chunks] == list(range(len(plan.chunks)))
    spans: dict[int, list[tuple[int, int]]] = {}
    per_tensor: dict[int, list[tuple[int, int, int]]] = {i: [] for i in range(len(plan.tensors))}
    for c in plan.chunks:
        assert c.pieces, f"chunk {c.id} has no pieces"
        assert c.end - c.start <= chunk, f"chunk {c.id} spans {c.end - c.start} > chunk_bytes {chunk}"
        assert c.start == min(p.src for p in c.pieces) and c.end == max(p.end for p in c.pieces), c
        rows_in_chunk = []
        for p in c.pieces:
            t = plan.tensors[p.tensor]
            assert t.spec.file == c.file
            size = t.spec.dtype.itemsize
            assert p.length > 0 and p.rows >= 1, p
            assert p.length % size == 0, f"{t.name}: piece of {p.length} bytes is not whole {size}-byte elements"
            assert p.dst % size == 0, f"{t.name}: piece at output byte {p.dst}, not a whole element"
            assert (p.src - t.spec.start) % size == 0, f"{t.name}: piece reads from mid-element {p.src}"
            if p.rows > 1:
                assert p.stride >= p.length and p.stride % size == 0, p
            for r, src in enumerate(p.row_starts()):
                dst = p.dst + r * p.length
                assert t.spec.start <= src and src + p.length <= t.spec.end, f"{t.name}: row outside tensor"
                per_tensor[p.tensor].append((dst, p.length, src))
                rows_in_chunk.append((src, src + p.length))
        rows_in_chunk.sort()
        for (a0, a1), (b0, b1) in zip(rows_in_chunk, rows_in_chunk[1:]):
            assert a1 <= b0, f"chunk {c.id}: overlapping rows {a0}-{a1} and {b0}-{b1}"
        spans.setdefault(c.file, []).append((c.start, c.end))
    for file, ss in spans.items():
        ss.sort()
        for (a0, a1), (b0, b1) in zip(ss, ss[1:]):
            assert a1 <= b0, f"file {file}: chunks [{a0}, {a1}) and [{b0}, {b1}) overlap"
    # pieces: each tensor's needed bytes exactly once, each from the right place
    for i, t in enumerate(plan.tensors):
        rows = sorted(per_tensor[i])
        at = 0
        for dst, length, src in rows:
            assert dst == at, f"{t.name}: output bytes [{at}, {dst}) missing or overlapping"
            assert src == needed_src(t, dst, shard), f"{t.name}: output byte {dst} read from {src}"
            assert needed_src(t, dst + length - 1, shard) == src + length - 1, \
                f"{t.name}: piece row at output {dst} crosses a row of the rank's slice"
            at += length
        assert at == t.nbytes, f"{t.name}: pieces give {at} of {t.nbytes} bytes"
    assert sum(c.payload for c in plan.chunks) == plan.output_bytes
    # no byte of an unselected tensor, nor of a shard's other rows outside its span, is read
    selected = {t.name: t for t in plan.tensors}
    for name, (start, end, file) in headers_of.items():
        if end == start:
            continue
        if name in selected:
            lo, hi = needed_span(selected[name], shard)
            forbidden = [(start, lo), (hi, end)]
        else:
            forbidden = [(start, end)]
        for f0, f1 in forbidden:
            if f0 >= f1:
                continue
            for c in plan.chunks:
                if c.file == file and c.start < f1 and f0 < c.end:
                    raise AssertionError(f"chunk {c.id} [{c.start}, {c.end}) reads bytes [{max(f0, c.start)}, "
                                         f"{min(f1, c.end)}) of {name!r} that the load does not need")


def header_spans(plan_all: fastload.LoadPlan) -> dict[str, tuple[int, int, int]]:
    return {t.name: (t.spec.start, t.spec.end, t.spec.file) for t in plan_all.tensors}


# -- plan properties ---------------------------------------------------------------------------------------------


@settings(max_examples=60, **COMMON)
@given(data=st.data())
def test_plan_invariants_random_layouts(data):
    layout = data.draw(layouts())
    chunk = data.draw(chunk_bytes_small())
    names, shard = data.draw(selections(layout))
    path = write_layout(new_path(), layout)
    config = config_for(chunk)
    everything = fastload.plan(str(path), config=config)
    check_plan(everything, header_spans(everything), config=config)
    plan = fastload.plan(str(path), config=config, names=names, shard=shard)
    check_plan(plan, header_spans(everything), config=config, names=names, shard=shard)


@settings(max_examples=40, **COMMON)
@given(data=st.data())
def test_plan_invariants_chunk_sizes_above_the_split_minimum(data):
    """Chunks over 1 MiB: ``chunk_size`` cuts them to spread the load over the readers (never below 1 MiB)."""
    layout = data.draw(layouts(max_tensors=5, max_bytes=3 * MiB))
    chunk = data.draw(st.integers(MiB // 64, 4 * MiB // 64)) * 64
    conc = data.draw(st.integers(1, 16))
    names, shard = data.draw(selections(layout))
    path = write_layout(new_path(), layout)
    config = fastload.LoadConfig(chunk_bytes=chunk, max_concurrency=conc, host_buffer_bytes=2 * chunk)
    everything = fastload.plan(str(path), config=config)
    plan = fastload.plan(str(path), config=config, names=names, shard=shard)
    check_plan(plan, header_spans(everything), config=config, names=names, shard=shard)
    spans = sum(needed_span(t, shard)[1] - needed_span(t, shard)[0] for t in plan.tensors)
    assert plan.chunk_bytes == chunk_size(spans, config)
    assert plan.chunk_bytes >= min(chunk, MIN_SPLIT)


@settings(max_examples=60, **COMMON)
@given(layout=layouts(), chunk=chunk_bytes_small())
def test_whole_file_chunks_are_full_except_the_last(layout, chunk):
    """The fill rule: in a whole-file load every byte is contiguous with the next, so every chunk but the last
    is filled to within 7 bytes of ``chunk_bytes`` (the room rounded down to a multiple of 8)."""
    path = write_layout(new_path(), layout)
    plan = fastload.plan(str(path), config=config_for(chunk))
    data = sum(t.spec.nbytes for t in plan.tensors)
    for c in plan.chunks[:-1]:
        assert c.nbytes > chunk - 8, f"chunk {c.id} holds {c.nbytes} of {chunk} bytes"
    assert len(plan.chunks) == (0 if data == 0 else len(plan.chunks))
    assert len(plan.chunks) <= -(-data // (chunk - 7))
    # and the chunks tile the data section: nothing read twice, nothing skipped
    if plan.chunks:
        assert plan.chunks[0].start == min(t.spec.start for t in plan.tensors if t.spec.nbytes)
        for a, b in zip(plan.chunks, plan.chunks[1:]):
            assert a.end == b.start


def test_fill_rule_example_is_whole_elements_for_every_itemsize(tmp_path):
    """A worked example: a 3-byte u8 first, so the chunk's room is 3 short of a multiple of 8; the next
    tensor of each itemsize must be cut at whole elements (and at most 7 bytes short of a full chunk)."""
    chunk = 64 * KiB
    for dt in [d for d in DTYPE_NAMES if DTYPES[d].itemsize in (2, 4, 8)]:
        size = DTYPES[dt].itemsize
        layout = Layout([("pad", "U8", (3,)), ("big", dt, (3 * chunk // size + 5,))], header_pad=1, seed=1)
        path = write_layout(tmp_path / f"{dt}.safetensors", layout)
        config = config_for(chunk)
        plan = fastload.plan(str(path), config=config)
        check_plan(plan, header_spans(plan), config=config)
        first = plan.chunks[0]
        assert [p.tensor for p in first.pieces] == [0, 1]
        assert first.pieces[1].length == (chunk - 3) // 8 * 8
        got = fastload.load(str(path), config=config, dtype=torch.float16)
        assert_same(got, expected(path, dtype=torch.float16))


@settings(max_examples=60, **COMMON)
@given(layout=layouts(), chunk=chunk_bytes_small(), data=st.data())
def test_a_tensor_that_fits_in_the_open_chunk_is_one_piece(layout, chunk, data):
    """The fill rule is for a tensor that does *not* fit in the open chunk. One that fits (but whose length
    is above the room rounded down to 8 bytes) must not be split into two pieces of the same chunk: every
    tensor has at most one piece per chunk, as before the rule."""
    names, shard = data.draw(selections(layout))
    path = write_layout(new_path(), layout)
    plan = fastload.plan(str(path), config=config_for(chunk), names=names, shard=shard)
    for c in plan.chunks:
        tensors = [p.tensor for p in c.pieces]
        assert len(tensors) == len(set(tensors)), \
            f"chunk {c.id} holds {len(tensors) - len(set(tensors))} needless extra piece(s): {c.pieces}"


def test_fill_rule_does_not_split_a_u8_tensor_that_fits(tmp_path):
    """The minimal case: 3 + 65530 bytes in a 65536-byte chunk fit; the room rounded down (65528) is not."""
    layout = Layout([("pad", "U8", (3,)), ("a", "U8", (65530,)), ("b", "F32", (10,))], header_pad=0, seed=1)
    path = write_layout(tmp_path / "fit.safetensors", layout)
    plan = fastload.plan(str(path), config=config_for(64 * KiB))
    pieces_of_a = [p for c in plan.chunks for p in c.pieces if plan.tensors[p.tensor].name == "a"]
    assert len(pieces_of_a) == 1, pieces_of_a
    assert_same(fastload.load(str(path), config=config_for(64 * KiB), dtype=torch.float16),
                expected(path, dtype=torch.float16))


@settings(max_examples=20, **COMMON)
@given(layout=layouts(max_tensors=7, max_bytes=160 * KiB), files=st.integers(2, 3), chunk=chunk_bytes_small(),
       data=st.data())
def test_index_checkpoint_across_files(layout, files, chunk, data):
    """Chunks are per file (a chunk never mixes files), ids run across files, and the load is bit-exact."""
    names, shard = data.draw(selections(layout))
    dtype = data.draw(st.sampled_from([None] + CONVERT_TO))
    directory = Path(tempfile.mkdtemp(dir=tempfile.gettempdir()))
    parts = [layout.tensors[i * len(layout.tensors) // files:(i + 1) * len(layout.tensors) // files]
             for i in range(files)]
    parts = [p for p in parts if p]
    weight_map = {}
    values = layout.values()
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        sub = Layout(part, layout.header_pad + i, 0)
        sub.values = lambda part=part: {n: values[n] for n, _, _ in part}  # the same values as the layout's
        write_layout(directory / fname, sub)
        weight_map |= {n: fname for n, _, _ in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = config_for(chunk)
    everything = fastload.plan(str(directory), config=config)
    plan = fastload.plan(str(directory), config=config, names=names, shard=shard)
    check_plan(plan, header_spans(everything), config=config, names=names, shard=shard)
    got = fastload.load(str(directory), config=config, names=names, shard=shard, dtype=dtype)
    want = {}
    for i, part in enumerate(parts):
        fname = directory / f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        sub_names = [n for n, _, _ in part if names is None or n in names]
        want |= expected(fname, names=sub_names, shard=shard, dtype=dtype)
    assert_same(got, want)


# -- loads: local ------------------------------------------------------------------------------------------------


@settings(max_examples=40, **COMMON)
@given(data=st.data())
def test_load_bit_exact_with_names_shard_and_dtype(data):
    layout = data.draw(layouts())
    chunk = data.draw(chunk_bytes_small())
    names, shard = data.draw(selections(layout))
    dtype = data.draw(st.sampled_from([None, None] + CONVERT_TO))
    path = write_layout(new_path(), layout)
    calls: list[tuple[int, int]] = []
    got = fastload.load(str(path), config=config_for(chunk), names=names, shard=shard, dtype=dtype,
                        progress=lambda done, total: calls.append((done, total)))
    want = expected(path, names=names, shard=shard, dtype=dtype)
    assert_same(got, want)
    # progress: the result's bytes in the stored dtype, from (0, total) up to (total, total)
    stored = expected(path, names=names, shard=shard)
    total = sum(t.numel() * t.element_size() for t in stored.values())
    assert calls[0] == (0, total) and calls[-1] == (total, total), (calls[:2], calls[-1:], total)
    assert all(a[0] <= b[0] and b[1] == total for a, b in zip(calls, calls[1:]))


@settings(max_examples=25, **COMMON)
@given(data=st.data())
def test_stream_bit_exact_and_each_tensor_once(data):
    layout = data.draw(layouts())
    chunk = data.draw(chunk_bytes_small())
    names, shard = data.draw(selections(layout))
    dtype = data.draw(st.sampled_from([None] + CONVERT_TO))
    path = write_layout(new_path(), layout)
    got: dict[str, torch.Tensor] = {}
    with fastload.stream(str(path), config=config_for(chunk), names=names, shard=shard, dtype=dtype) as s:
        for name, tensor in s:
            assert name not in got, f"{name} handed out twice"
            got[name] = tensor
    assert_same(got, expected(path, names=names, shard=shard, dtype=dtype))


@settings(max_examples=8, **COMMON)
@given(layout=layouts(max_tensors=5, max_bytes=1536 * KiB), extra=st.integers(0, 1000),
       dtype=st.sampled_from([None, torch.float32, torch.bfloat16]))
def test_direct_io_bit_exact_with_unaligned_chunk_sizes(layout, extra, dtype):
    """``direct_io`` reads cold ranges of at least ~1 MiB through O_DIRECT: chunk sizes just over 1 MiB (a
    multiple of 64, not of 4096) with one reader, so ``chunk_size`` keeps them and fills cut tensors there."""
    path = write_layout(new_path(), layout)
    assert direct_supported(path), "needs O_DIRECT and cachestat(2), as this project's machines have"
    chunk = MiB + 64 * extra
    config = fastload.LoadConfig(chunk_bytes=chunk, max_concurrency=1, host_buffer_bytes=4 * chunk,
                                 direct_io=True)
    evict(path)
    trace = fastload.Trace()
    got = fastload.load(str(path), config=config, dtype=dtype, trace=trace)
    assert_same(got, expected(path, dtype=dtype))


def test_direct_io_really_reads_direct(tmp_path):
    """Guard for the property above: a cold multi-MiB layout is read (partly) through O_DIRECT."""
    layout = Layout([("a", "U8", (3,)), ("b", "F32", (700_001,)), ("c", "BF16", (900_003,)),
                     ("d", "I64", (5,)), ("e", "F16", (1_100_007,))], header_pad=5, seed=7)
    path = write_layout(tmp_path / "direct.safetensors", layout)
    assert direct_supported(path), "needs O_DIRECT and cachestat(2), as this project's machines have"
    chunk = MiB + 64 * 77
    config = fastload.LoadConfig(chunk_bytes=chunk, max_concurrency=1, host_buffer_bytes=4 * chunk,
                                 direct_io=True)
    evict(path)
    trace = fastload.Trace()
    got = fastload.load(str(path), config=config, dtype=torch.float32, trace=trace)
    assert_same(got, expected(path, dtype=torch.float32))
    assert trace.summary().counters.get("bytes_direct", 0) > 0


# -- loads: HTTP ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_bit_exact_both_engines(engine, http_server, http_root):
    @settings(max_examples=10, **COMMON)
    @given(data=st.data())
    def prop(data):
        layout = data.draw(layouts(max_tensors=5, max_bytes=160 * KiB))
        chunk = data.draw(chunk_bytes_small())
        names, shard = data.draw(selections(layout))
        dtype = data.draw(st.sampled_from([None] + CONVERT_TO))
        path = write_layout(new_path(http_root), layout)
        url = http_server.url_for(path)
        config = config_for(chunk, http_engine=engine)
        plan = fastload.plan(url, config=config, names=names, shard=shard)
        everything = fastload.plan(str(path), config=config)
        check_plan(plan, header_spans(everything), config=config, names=names, shard=shard)
        http_server.reset()
        got = fastload.load(url, config=config, names=names, shard=shard, dtype=dtype)
        assert_same(got, expected(path, names=names, shard=shard, dtype=dtype))
        # on the wire: no range in the data section touches bytes the load does not need
        data_start = plan.files[0].data_start
        selected = {t.name: t for t in plan.tensors}
        forbidden = []
        for name, (start, end, _) in header_spans(everything).items():
            lo, hi = needed_span(selected[name], shard) if name in selected else (end, end)
            forbidden += [(a, b) for a, b in ((start, lo), (hi, end)) if a < b] if name in selected \
                else [(start, end)] if start < end else []
        for record in http_server.requests(urlparse(url).path):
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", record.range or "")
            assert m, f"unranged or open request {record.range!r}"
            r0, r1 = int(m.group(1)), int(m.group(2)) + 1
            if r0 < data_start:
                continue  # size probe and header
            assert r1 - r0 <= plan.chunk_bytes, f"request {record.range} longer than a chunk"
            for a, b in forbidden:
                assert not (r0 < b and a < r1), f"request {record.range} reads [{a}, {b}), not needed"

    prop()


# -- CUDA sink logic on the fake device ---------------------------------------------------------------------------


@settings(max_examples=12, **COMMON)
@given(data=st.data())
def test_cuda_sink_on_fake_device_bit_exact(data):
    layout = data.draw(layouts(max_tensors=6, max_bytes=160 * KiB))
    chunk = data.draw(chunk_bytes_small())
    names, shard = data.draw(selections(layout))
    dtype = data.draw(st.sampled_from([None] + CONVERT_TO))
    path = write_layout(new_path(), layout)
    device = LateDevice(lanes=3, max_delay_s=0.002, seed=data.draw(st.integers(0, 100)))
    config = fastload.LoadConfig(chunk_bytes=chunk, host_buffer_bytes=2 * chunk, max_concurrency=4)
    got, _ = asyncio.run(asyncio.wait_for(
        drive(str(path), device, config=config, buffers=2, names=names, shard=shard, dtype=dtype), 20))
    assert device.violations == []
    assert_bit_exact(got, expected(path, names=names, shard=shard, dtype=dtype))


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_large_unaligned_chunks_with_fill(engine, http_server, http_dir):
    """Chunks over 4 MiB (the threaded engine's resume unit) that are not a multiple of 4096: tensors are cut
    by the fill rule at unaligned offsets inside them; bit-exact with conversion, and every range <= a chunk."""
    layout = Layout([("a", "U8", (5,)), ("b", "F32", (1_300_001,)), ("c", "BF16", (2, 1_000_003)),
                     ("d", "BOOL", (3,)), ("e", "F64", (400_009,))], header_pad=3, seed=11)
    path = write_layout(http_dir / "big.safetensors", layout)
    chunk = 4 * MiB + 64 * 13
    config = fastload.LoadConfig(chunk_bytes=chunk, max_concurrency=1, host_buffer_bytes=2 * chunk,
                                 http_engine=engine)
    url = http_server.url_for(path)
    plan = fastload.plan(url, config=config)
    assert plan.chunk_bytes == chunk
    check_plan(plan, header_spans(plan), config=config)
    assert any(len({p.tensor for p in c.pieces}) > 1 for c in plan.chunks)  # the fill rule did fill
    got = fastload.load(url, config=config, dtype=torch.float16)
    assert_same(got, expected(path, dtype=torch.float16))
