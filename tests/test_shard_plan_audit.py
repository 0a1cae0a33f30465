"""Audit: tensor-parallel ``shard=`` and the plan object (``fastload.plan``: table, ``to_json``, totals, metadata).

Every rank's result is compared bit for bit with ``safetensors.torch.load_file`` followed by
``full.tensor_split(world_size, dim)[rank]`` (README: "The rank gets exactly
``full.tensor_split(world_size, dim)[rank]``, contiguous").
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest
import safetensors.torch
import torch

import fastload
from fastload.describe import describe
from checkpoints import random_tensor, write_single
from test_shard_corners import assert_rank, tensor_bytes_sent, want_slice

SMALL = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=512 * 1024, max_concurrency=4)
MiB = 1 << 20


def strict_json(text: str):
    """Parse as RFC 8259 JSON: NaN / Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def strided(tmp_path_factory) -> Path:
    """Tensors whose non-dim-0 slices have rows more than 64 KiB apart (read row by row, or several rows in one
    chunk with gaps between them), next to small neighbours, in float, int and bool dtypes."""
    gen = torch.Generator().manual_seed(31)
    tensors = {
        "a.head": random_tensor((3,), torch.float32, gen),                    # everything after it unaligned
        "b.wide": random_tensor((11, 20_003), torch.float32, gen),            # 80 KB rows
        "c.cube": random_tensor((5, 3, 9_001), torch.bfloat16, gen),          # middle-dim split: rows of rows
        "d.ints": random_tensor((7, 17_000), torch.int32, gen),
        "e.flags": random_tensor((6, 70_001), torch.bool, gen),
        "f.bias": random_tensor((20_001,), torch.float16, gen),
        "g.four": random_tensor((2, 3, 5, 1_111), torch.float64, gen),        # 4-D, split on dims 1 and 2
    }
    return write_single(tmp_path_factory.mktemp("strided") / "strided.safetensors", tensors)


STRIDED_RULES = {r"^b\.": 1, r"^c\.": 1, r"^d\.": -1, r"^e\.": 1, r"^f\.": 0, r"^g\.": 2}


# -- the plan as JSON ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["1e999", "-1e999", "NaN", "Infinity"])
def test_plan_json_of_an_index_with_extreme_numbers_is_valid_json(tmp_path, value, capsys):
    """``1e999`` is a valid JSON number (RFC 8259 sets no range); Python reads it as ``inf`` and the plan's
    ``to_json`` (and so ``fastload inspect --json``) then writes ``Infinity``, which is not JSON. ``NaN`` /
    ``Infinity`` are not JSON at all: the index parser must refuse them (FormatError, "invalid JSON"), or at
    the very least the plan must not echo them as invalid JSON. fastload reads indexes by the rules of the
    headers, those of the reference parser (serde_json), which refuses 1e999 as out of range: a FormatError
    is right for every value here, and whatever is accepted must come out as strict JSON."""
    safetensors.torch.save_file({"a": torch.ones(4)}, tmp_path / "s1.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"metadata": {"total_size": %s}, "weight_map": {"a": "s1.safetensors"}}' % value)
    try:
        plan = fastload.plan(tmp_path)
    except fastload.FormatError as exc:
        assert "out of range" in str(exc) or "not JSON" in str(exc), exc
        return
    doc = strict_json(plan.to_json())
    assert doc["tensors"][0]["name"] == "a"
    from fastload.cli import main

    capsys.readouterr()
    assert main(["inspect", "--json", str(tmp_path)]) == 0
    strict_json(capsys.readouterr().out)  # what `fastload inspect --json` prints is JSON


def test_plan_json_is_stable_and_carries_the_shard(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tensors = {"q.weight": random_tensor((10, 6), torch.float32, gen), "o.weight": random_tensor((6, 10),
                                                                                               torch.bfloat16, gen)}
    path = write_single(tmp_path / "m.safetensors", tensors, metadata={"format": "pt", "ü": "\u2603"})
    shard = fastload.Shard(1, 3, {"q": 0, "o": -1})
    one = fastload.plan(path, shard=shard).to_json()
    two = fastload.plan(path, shard=shard).to_json()
    assert one == two  # same source, same plan, same text
    doc = strict_json(one)
    assert doc["files"][0]["metadata"] == {"format": "pt", "ü": "\u2603"}
    by_name = {t["name"]: t for t in doc["tensors"]}
    assert by_name["q.weight"]["shape"] == [3, 6] and by_name["q.weight"]["split_dim"] == 0
    assert by_name["o.weight"]["shape"] == [6, 3] and by_name["o.weight"]["split_dim"] == 1
    assert doc["output_bytes"] == 3 * 6 * 4 + 6 * 3 * 2
    # every piece listed in the JSON lies inside its tensor and the pieces fill exactly the rank's bytes
    filled = [0] * len(doc["tensors"])
    for chunk in doc["chunks"]:
        for piece in chunk["pieces"]:
            tensor, src, length, dst = piece[:4]
            rows = piece[4] if len(piece) > 4 else 1
            t = doc["tensors"][tensor]
            assert t["start"] <= src and src + length <= t["end"]
            filled[tensor] += rows * length
    assert filled == [math.prod(t["shape"]) * (4 if t["dtype"] == "F32" else 2) for t in doc["tensors"]]


# -- the plan as text ------------------------------------------------------------------------------------------

def test_plan_table_one_line_per_tensor_and_no_control_characters(tmp_path):
    """Tensor names come from the file (a hostile one too): the table printed by ``print(plan)`` and
    ``fastload inspect --all`` must keep one row per tensor and must not pass the file's control characters
    (newlines, terminal escape sequences) to the terminal. Error messages already show names with ``repr``."""
    tensors = {"line\nbreak": torch.ones(2), "esc\x1b[2J\x1b[31mred": torch.ones(3), "ok": torch.ones(1)}
    path = tmp_path / "names.safetensors"
    safetensors.torch.save_file(tensors, path)
    plan = fastload.plan(path)
    text = str(plan)
    assert "\x1b" not in text
    header_lines = 1 + len(plan.files) + 1  # summary, one per file, the column titles
    assert len(text.splitlines()) == header_lines + len(tensors), text
    shown = describe(plan, every_tensor=True)
    assert "\x1b" not in shown


def test_describe_does_not_print_metadata_control_characters(tmp_path):
    """``fastload inspect`` prints the file's ``__metadata__``: a hostile value must not reach the terminal raw."""
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"a": torch.ones(2)}, path, metadata={"title": "\x1b]0;owned\x07\x1b[2J", "k": "a\nb"})
    shown = describe(fastload.plan(path))
    assert "\x1b" not in shown and "\x07" not in shown
    meta = shown.split("metadata:", 1)[1].strip().splitlines()
    assert len(meta) == 2, meta  # one line per key


def test_plan_table_size_is_linear_in_the_header(tmp_path):
    """The table pads every row to the longest name: one 20 kB name among 2000 tensors makes ``str(plan)`` 40 MB
    for a 60 kB header (a 50 MB name among 500k tensors in a 100 MB header: terabytes). Printing a plan must
    take space in proportion to what it prints."""
    tensors = {f"t{i}": torch.zeros(1, dtype=torch.uint8) for i in range(2000)}
    tensors["n" * 20_000] = torch.zeros(1, dtype=torch.uint8)
    path = tmp_path / "long.safetensors"
    safetensors.torch.save_file(tensors, path)
    plan = fastload.plan(path)
    header = plan.files[0].data_start
    text = str(plan)
    assert len(text) < 2 * header + 200 * len(tensors), (len(text), header)


def test_plan_table_with_unicode_and_very_long_names(tmp_path):
    long = "model.layers." + "x" * 3000 + ".weight"
    tensors = {long: torch.ones(2, 4), "ünï€😀.weight": torch.ones(4, 2), "b": torch.ones(4)}
    path = tmp_path / "u.safetensors"
    safetensors.torch.save_file(tensors, path)
    shard = fastload.Shard(1, 2, {"ünï": 1, "x{3000}": 0})
    plan = fastload.plan(path, shard=shard)
    text = str(plan)
    rows = text.splitlines()[3:]
    assert len(rows) == 3
    for name, shape in [(long, "1x4"), ("ünï€😀.weight", "4x1"), ("b", "4")]:
        row = next(r for r in rows if r.strip().startswith(name))
        assert re.search(rf"\s{re.escape(shape)}\s", row), row  # the rank's shape, not the stored one
    got = fastload.load(path, shard=shard)
    assert tuple(got[long].shape) == (1, 4) and tuple(got["ünï€😀.weight"].shape) == (4, 1)


# -- Shard objects ---------------------------------------------------------------------------------------------

def test_shard_survives_pickle_copy_and_replace(strided):
    """A TP launcher hands the Shard to worker processes (pickle) or derives each rank's (dataclasses.replace)."""
    base = fastload.Shard(0, 3, STRIDED_RULES)
    full = safetensors.torch.load_file(strided)
    for rank in range(3):
        shard = dataclasses.replace(base, rank=rank)
        again = pickle.loads(pickle.dumps(shard))
        assert again == shard == copy.deepcopy(shard) and hash(again) == hash(shard)
        assert_rank(fastload.load(strided, shard=again, config=SMALL), full, shard)
    with pytest.raises(fastload.ConfigError):
        dataclasses.replace(base, rank=3)


# -- bit-exactness: strided (rows > 64 KiB apart) pieces over every road ---------------------------------------

@pytest.mark.parametrize("dtype", [None, torch.float16])
@pytest.mark.parametrize("chunk", [64 * 1024, MiB])
@pytest.mark.parametrize("world_size", [2, 3])
def test_local_strided_every_rank_concatenates_to_the_whole(strided, dtype, chunk, world_size):
    full = safetensors.torch.load_file(strided)
    config = fastload.LoadConfig(chunk_bytes=chunk, host_buffer_bytes=4 * chunk, max_concurrency=3)
    parts = []
    for rank in range(world_size):
        shard = fastload.Shard(rank, world_size, STRIDED_RULES)
        got = fastload.load(strided, shard=shard, dtype=dtype, config=config)
        assert list(got) == list(full)
        assert_rank(got, full, shard, dtype)
        parts.append(got)
    for name, tensor in full.items():
        dim = fastload.Shard(0, world_size, STRIDED_RULES).dim_for(name)
        if dim is not None:
            joined = torch.cat([p[name] for p in parts], dim)
            want = tensor if dtype is None or not tensor.dtype.is_floating_point else tensor.to(dtype)
            assert torch.equal(joined, want), name


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_http_strided_both_engines_bytes_within_span(strided, serve, http_server, engine, dtype):
    full = safetensors.torch.load_file(strided)
    source = serve("http", strided)
    path = urlparse(source).path
    config = fastload.LoadConfig(chunk_bytes=MiB, host_buffer_bytes=4 * MiB, max_concurrency=3, http_engine=engine)
    whole = fastload.plan(strided)
    data_start = whole.files[0].data_start
    for rank in range(3):
        shard = fastload.Shard(rank, 3, STRIDED_RULES)
        http_server.reset()
        got = fastload.load(source, shard=shard, dtype=dtype, config=config)
        assert_rank(got, full, shard, dtype)
        sent = tensor_bytes_sent(http_server, path, data_start)
        plan = fastload.plan(strided, shard=shard, config=config)
        assert sent == plan.total_bytes  # "what a load would fetch"
        assert sent <= whole.total_bytes  # never more than the tensors' spans


def test_s3_strided_with_names_and_dtype(strided, serve):
    full = safetensors.torch.load_file(strided)
    source = serve("s3", strided)
    names = ["g.four", "e.flags", "c.cube", "a.head"]
    for rank in range(2):
        shard = fastload.Shard(rank, 2, STRIDED_RULES)
        got = fastload.load(source, names=names, shard=shard, dtype=torch.float32, config=SMALL)
        assert list(got) == [n for n in full if n in names]  # checkpoint order, not the order asked
        assert_rank(got, full, shard, torch.float32)


# -- local byte accounting ----------------------------------------------------------------------------------------

def test_local_dim0_reads_only_the_rank_rows_with_conversion(strided):
    """README: "A dim-0 split fetches only the rank's rows", also when the chunks are staged for conversion."""
    rules = {".*": 0}
    full = safetensors.torch.load_file(strided)
    data_start = fastload.plan(strided).files[0].data_start
    for rank in range(4):
        shard = fastload.Shard(rank, 4, rules)
        for dtype in (None, torch.float16):
            trace = fastload.Trace()
            got = fastload.load(strided, shard=shard, dtype=dtype, trace=trace, config=SMALL)
            assert_rank(got, full, shard, dtype)
            share = sum(want_slice(t, shard, 0).nbytes for t in full.values())
            assert trace.summary().bytes_fetched == data_start + share, (rank, dtype)


def test_local_wide_rows_read_alone_with_several_rows_per_chunk(strided):
    """Rows more than 64 KiB apart are "read one by one" (README): with 1 MiB chunks a chunk holds several such
    rows of one tensor, and a local load must still read only the rank's part of each, converted or not."""
    names = ["a.head", "b.wide", "d.ints", "e.flags", "f.bias"]  # strides 80, 68 and 70 kB
    full = safetensors.torch.load_file(strided)
    data_start = fastload.plan(strided).files[0].data_start
    config = fastload.LoadConfig(chunk_bytes=MiB, host_buffer_bytes=4 * MiB, max_concurrency=2)
    for rank in range(3):
        shard = fastload.Shard(rank, 3, STRIDED_RULES)
        plan = fastload.plan(strided, names=names, shard=shard, config=config)
        assert any(p.rows > 1 for c in plan.chunks for p in c.pieces)  # several rows in one piece
        for dtype in (None, torch.float16):
            trace = fastload.Trace()
            got = fastload.load(strided, names=names, shard=shard, dtype=dtype, trace=trace, config=config)
            assert_rank(got, full, shard, dtype)
            assert trace.summary().bytes_fetched == data_start + plan.output_bytes, (rank, dtype)


# -- several ranks at once in one process ----------------------------------------------------------------------

def test_ranks_loaded_concurrently_from_threads_over_http(strided, serve):
    full = safetensors.torch.load_file(strided)
    source = serve("http", strided)
    results, errors = {}, []

    def rank_load(rank: int) -> None:
        try:
            shard = fastload.Shard(rank, 4, STRIDED_RULES)
            results[rank] = (shard, fastload.load(source, shard=shard, config=SMALL))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank_load, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a rank's load hung"
    assert not errors, errors
    for shard, got in results.values():
        assert_rank(got, full, shard)


def test_ranks_gathered_with_aload(strided):
    import asyncio

    full = safetensors.torch.load_file(strided)
    shards = [fastload.Shard(r, 3, STRIDED_RULES) for r in range(3)]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(fastload.aload(strided, shard=s, config=SMALL)
                                                       for s in shards)), 30)

    for shard, got in zip(shards, asyncio.run(main())):
        assert_rank(got, full, shard)


# -- unaligned tensor offsets (safetensors does not require alignment) -----------------------------------------

def write_raw(path: Path, entries) -> Path:
    """A safetensors file with tensors back to back in the given order, however that aligns them."""
    import struct

    header, offset, data = {}, 0, b""
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize("transport", ["local", "http"])
def test_unaligned_tensors_sharded_and_converted(tmp_path, serve, transport):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(37, 300, generator=gen)
    c = torch.randn(5, 7, 33, generator=gen).to(torch.bfloat16)
    path = write_raw(tmp_path / "unaligned.safetensors",
                     [("pad", "U8", [3], b"abc"), ("w", "F32", w.shape, w.numpy().tobytes()),
                      ("p2", "U8", [1], b"z"), ("c", "BF16", c.shape, c.view(torch.int16).numpy().tobytes())])
    full = safetensors.torch.load_file(path)
    assert torch.equal(full["w"], w) and torch.equal(full["c"], c)
    source = serve(transport, path)
    for dtype in (None, torch.float16):
        for world_size in (2, 3):
            for rank in range(world_size):
                for dim in (0, 1, -1):
                    shard = fastload.Shard(rank, world_size, {"^w$": dim, "^c$": dim})
                    got = fastload.load(source, shard=shard, dtype=dtype, config=SMALL)
                    assert list(got) == list(full)
                    assert_rank(got, full, shard, dtype)
