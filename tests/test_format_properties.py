"""Property-based tests (hypothesis) of the header parser, the index parser and the planner.

* Any bytes, any JSON: the parser returns a header whose tensors tile the data
  section exactly, or raises FormatError -- never anything else.
* Differential: whatever the reference implementation (``safetensors.deserialize``)
  rejects, fastload rejects too; what both accept, they read the same way.
* The index parser lets through only names that stay inside the checkpoint directory.
* The planner: for random checkpoints, chunk sizes, name subsets and tensor-parallel
  shards, copying the plan's pieces out of the file yields exactly
  ``tensor_split(full, world_size, dim)[rank]`` for every tensor, with no chunk
  over ``chunk_bytes`` and no byte read that was not asked for.
"""

from __future__ import annotations

import json
import math
import posixpath
import struct

import pytest
import safetensors
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fastload
from fastload.format import DTYPES, MAX_HEADER_BYTES, header_length, parse_header, parse_index
from fastload.plan import Shard, build_plan
from fastload.sources import ObjectInfo

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
URL = "mem://x.safetensors"


def check_invariants(header, file_size: int) -> None:
    """What every accepted header guarantees."""
    pos = header.data_start
    for spec in header.tensors:
        assert spec.start == pos and spec.end >= spec.start
        assert spec.nbytes == math.prod(spec.shape) * spec.dtype.itemsize
        assert all(isinstance(d, int) and d >= 0 for d in spec.shape)
        pos = spec.end
    assert pos == file_size


def parse_file(data: bytes):
    """fastload's reading of a whole file's bytes: (header or FormatError)."""
    try:
        start = header_length(data[:8], url=URL, file_size=len(data))
        header = parse_header(data[8:start], url=URL, file_size=len(data))
    except fastload.FormatError as exc:
        return exc
    check_invariants(header, len(data))
    return header


def file_bytes(header: object, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# -- any input: a header or a FormatError ---------------------------------------------------------

@SETTINGS
@given(st.binary(max_size=64), st.integers(0, 2**64 - 1))
def test_header_length_any_prefix(prefix, size):
    try:
        n = header_length(prefix, url=URL, file_size=size)
    except fastload.FormatError:
        return
    assert 8 <= n <= min(size, 8 + MAX_HEADER_BYTES)


@SETTINGS
@given(st.binary(max_size=3000), st.integers(0, 4096))
def test_parse_header_any_bytes(raw, extra):
    try:
        header = parse_header(raw, url=URL, file_size=8 + len(raw) + extra)
    except fastload.FormatError:
        return
    check_invariants(header, 8 + len(raw) + extra)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=25,
)
DTYPE_NAMES = sorted(DTYPES) + ["F128", "", "f32", "F4"]
DIMS = st.integers(0, 6) | st.integers(-3, 2**64) | st.floats(allow_nan=True) | st.booleans() | JSON


@st.composite
def tensor_entries(draw):
    """Plausible-looking tensor entries, often valid, often subtly not."""
    entry = {
        "dtype": draw(st.sampled_from(DTYPE_NAMES) | JSON),
        "shape": draw(st.lists(DIMS, max_size=4) | JSON),
        "data_offsets": draw(st.lists(st.integers(-4, 200) | JSON, min_size=0, max_size=3)),
    }
    if draw(st.booleans()):
        entry.pop(draw(st.sampled_from(sorted(entry))))
    return entry if draw(st.integers(0, 9)) else draw(JSON)


@st.composite
def headers(draw):
    doc = draw(st.dictionaries(st.text(max_size=6), tensor_entries(), max_size=5))
    if draw(st.booleans()):
        doc["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)) | JSON)
    return doc


@SETTINGS
@given(headers(), st.integers(0, 400))
def test_parse_header_any_json(doc, data_len):
    raw = json.dumps(doc).encode()
    try:
        header = parse_header(raw, url=URL, file_size=8 + len(raw) + data_len)
    except fastload.FormatError:
        return
    check_invariants(header, 8 + len(raw) + data_len)


# -- differential against the reference implementation -------------------------------------------

SUPPORTED = sorted(DTYPES)


@st.composite
def valid_checkpoints(draw):
    """A header the reference writes, as (header dict, data bytes): tensors back to back."""
    names = draw(st.lists(st.text(min_size=1, max_size=6).filter(lambda s: s != "__metadata__"),
                          unique=True, max_size=5))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(SUPPORTED))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        n = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2))
    return header, draw(st.binary(min_size=offset, max_size=offset))


def mutate(draw, header: dict) -> dict:
    """One small change that may or may not break the header."""
    header = json.loads(json.dumps(header))
    names = [n for n in header if n != "__metadata__"]
    if not names:
        return header
    entry = header[draw(st.sampled_from(names))]
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "drop"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(SUPPORTED + ["F128", 3]))
    elif field == "shape":
        entry["shape"] = draw(st.lists(st.integers(-1, 2**63), max_size=3))
    elif field == "data_offsets":
        i = draw(st.integers(0, 1))
        entry["data_offsets"][i] += draw(st.integers(-9, 9))
    elif field == "extra":
        entry["extra"] = 1
    else:
        del entry[draw(st.sampled_from(sorted(entry)))]
    return header


def reference(data: bytes):
    try:
        return {name: info for name, info in safetensors.deserialize(data)}
    except Exception as exc:  # noqa: BLE001 - the reference raises SafetensorError and others
        return exc


@SETTINGS
@given(valid_checkpoints())
def test_agrees_with_reference_on_valid_files(checkpoint):
    header, data = checkpoint
    blob = file_bytes(header, data)
    ours, theirs = parse_file(blob), reference(blob)
    assert not isinstance(theirs, Exception), theirs
    assert not isinstance(ours, Exception), ours
    assert {t.name for t in ours.tensors} == set(theirs)
    for spec in ours.tensors:
        assert spec.dtype.name == theirs[spec.name]["dtype"]
        assert list(spec.shape) == list(theirs[spec.name]["shape"])
        assert blob[spec.start:spec.end] == bytes(theirs[spec.name]["data"])


@SETTINGS
@given(st.data())
def test_rejects_whatever_the_reference_rejects(data):
    header, payload = data.draw(valid_checkpoints())
    mutated = mutate(data.draw, header)
    blob = file_bytes(mutated, payload + data.draw(st.binary(max_size=3)))
    theirs = reference(blob)
    event("reference rejects" if isinstance(theirs, Exception) else "reference accepts")
    if isinstance(theirs, Exception):
        assert isinstance(parse_file(blob), fastload.FormatError), f"reference rejected: {theirs}"


# -- the index ----------------------------------------------------------------------------------

NAME_CHARS = st.sampled_from(list("ab./\\:%?#\x00\n -_") + ["..", "http://", "//", "C:", "~"])


@SETTINGS
@given(st.lists(NAME_CHARS, max_size=8).map("".join))
def test_index_names_never_escape(name):
    raw = json.dumps({"weight_map": {"t": name}}).encode()
    try:
        index = parse_index(raw, url="mem://dir/model.safetensors.index.json")
    except fastload.FormatError:
        return
    (shard,) = index.files
    joined = posixpath.normpath(posixpath.join("/base/dir", shard))
    assert joined.startswith("/base/dir/") and joined != "/base/dir"
    assert not any(c in shard for c in "\\%?#\x00\n") and "://" not in shard and not shard.startswith("/")
    assert shard == posixpath.normpath(shard)  # canonical: "./a" and "a//b" are stored as "a" and "a/b"


# -- the planner ------------------------------------------------------------------------------------

@st.composite
def plan_cases(draw):
    """Random tensors (some over a chunk), a chunk size, maybe a name subset, maybe a shard."""
    count = draw(st.integers(1, 6))
    tensors = {}
    g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    for i in range(count):
        ndim = draw(st.integers(0, 3))
        shape = tuple(draw(st.lists(st.integers(0, 70), min_size=ndim, max_size=ndim)))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int8, torch.float64]))
        tensors[f"t{i}"] = torch.randint(-100, 100, shape, generator=g).to(dtype)
    if draw(st.booleans()):  # one big enough to be split into chunks
        tensors["big"] = torch.randint(-100, 100, (draw(st.integers(1, 5)), 24_000), generator=g).float()
    chunk = 64 * 1024 * draw(st.integers(1, 3))
    names = None
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(sorted(tensors)), min_size=1, unique=True))
    shard = None
    if draw(st.booleans()):
        world = draw(st.integers(1, 4))
        rules = {f"^{n}$": draw(st.integers(-2, 2)) for n in tensors if draw(st.booleans()) and tensors[n].dim()}
        rules = {p: d for p, d in rules.items() if -tensors[p[1:-1]].dim() <= d < tensors[p[1:-1]].dim()}
        shard = Shard(draw(st.integers(0, world - 1)), world, rules)
    return tensors, chunk, names, shard


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(plan_cases())
def test_plan_reads_exactly_the_wanted_bytes(case):
    from safetensors.torch import save

    tensors, chunk, names, shard = case
    blob = save(tensors)
    start = header_length(blob[:8], url=URL, file_size=len(blob))
    header = parse_header(blob[8:start], url=URL, file_size=len(blob))
    config = fastload.LoadConfig(chunk_bytes=chunk, host_buffer_bytes=2 * chunk)
    plan = build_plan([header], [ObjectInfo(URL, len(blob))], config=config, names=names, shard=shard)
    event(f"chunks: {min(len(plan.chunks), 5)}{'+' if len(plan.chunks) > 5 else ''}")
    event("sharded" if any(t.split_dim is not None for t in plan.tensors) else "whole tensors")
    outputs = [bytearray(t.nbytes) for t in plan.tensors]
    filled = [0] * len(plan.tensors)
    for c in plan.chunks:
        assert 0 < c.nbytes <= chunk and c.start >= header.data_start and c.end <= len(blob)
        pos = c.start
        for p in c.pieces:
            assert c.start <= p.src and p.end <= c.end and p.src >= pos  # sorted, inside the chunk
            spec = plan.tensors[p.tensor].spec
            assert spec.start <= p.src and p.end <= spec.end  # only this tensor's bytes
            for row, src in enumerate(p.row_starts()):  # a strided piece: rows back to back in the output
                at = p.dst + row * p.length
                outputs[p.tensor][at:at + p.length] = blob[src:src + p.length]
            filled[p.tensor] += p.nbytes
            pos = p.end
    assert {t.name for t in plan.tensors} == set(names or tensors)
    for i, planned in enumerate(plan.tensors):
        assert filled[i] == planned.nbytes  # every output byte written exactly once (with the checks above)
        full = tensors[planned.name]
        want = full
        if planned.split_dim is not None:
            want = full.tensor_split(shard.world_size, planned.split_dim)[shard.rank]
        want = want.contiguous()
        assert tuple(want.shape) == planned.shape
        assert bytes(outputs[i]) == want.reshape(-1).view(torch.uint8).numpy().tobytes(), planned.name


@pytest.mark.parametrize("bad", [2**63, 2**64 + 5])
def test_shapes_past_int64_are_format_errors(bad):
    raw = json.dumps({"a": {"dtype": "U8", "shape": [0, bad], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(fastload.FormatError, match="overflows"):
        parse_header(raw, url=URL, file_size=8 + len(raw))
