"""64-bit correctness: tensors at file offsets past 2**31, 2**32 and 2**33, sizes past 4 GiB.

Every big file here is *sparse*: the header and the few tensors a test reads are written, the
filler tensors between them are holes (``os.truncate``), so an 8 GiB checkpoint takes a few
KiB of disk. Tests load only the high-offset tensors (``names=``), so only a few MB are read,
from a local path, a ``file://`` URL and the real HTTP Range server fixture (which streams the
asked range from the file and never reads a file whole). Expected bytes are the ones written,
and they are cross-checked against the reference ``safetensors.safe_open`` (mmap) reader.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import fastload
from fastload.errors import FastloadError, FormatError
from reliability_helpers import ScriptedHTTP

G31, G32, G33 = 1 << 31, 1 << 32, 1 << 33
HEADER_BYTES = 4096  # data section starts here: the JSON is padded with spaces, as safetensors pads it
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "U8": 1}
TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64, "U8": torch.uint8}
SMALL = fastload.LoadConfig(chunk_bytes=1 << 20, max_concurrency=4, host_buffer_bytes=8 << 20)


def _nbytes(dtype: str, shape) -> int:
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


def write_sparse(path: Path, layout: list[tuple[str, str, tuple[int, ...], int | None]], *, seed: int = 0,
                 header_bytes: int = HEADER_BYTES, holes: tuple[str, ...] = (),
                 pad_prefix: str = "pad_") -> dict[str, dict]:
    """Write a sparse safetensors file.

    ``layout`` is ``(name, dtype, shape, absolute_start)`` in file order; ``absolute_start`` None means
    right after the previous tensor; a gap before a given start is filled by a U8 "pad" tensor (a hole).
    Tensors named ``pad*`` or listed in ``holes`` are never written (holes, zeros); every other tensor gets random bytes.
    Returns ``{name: {"start", "end", "dtype", "shape", "bytes" (None for pads)}}`` in absolute offsets.
    """
    g = torch.Generator().manual_seed(seed)
    entries: dict[str, dict] = {}
    cursor = header_bytes
    pads = 0
    for name, dtype, shape, start in layout:
        if start is not None and start > cursor:
            pad = f"{pad_prefix}{pads}"
            pads += 1
            entries[pad] = {"dtype": "U8", "shape": (start - cursor,), "start": cursor, "end": start, "bytes": None}
            cursor = start
        assert start is None or start == cursor, (name, start, cursor)
        n = _nbytes(dtype, shape)
        data = None if name.startswith("pad") or name in holes else torch.randint(0, 256, (n,), dtype=torch.uint8,
                                                                    generator=g).numpy().tobytes()
        entries[name] = {"dtype": dtype, "shape": tuple(shape), "start": cursor, "end": cursor + n, "bytes": data}
        cursor += n
    header = {name: {"dtype": e["dtype"], "shape": list(e["shape"]),
                     "data_offsets": [e["start"] - header_bytes, e["end"] - header_bytes]}
              for name, e in entries.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= header_bytes - 8, "header does not fit"
    raw = raw.ljust(header_bytes - 8, b" ")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for e in entries.values():
            if e["bytes"] is not None:
                f.seek(e["start"])
                f.write(e["bytes"])
    os.truncate(path, cursor)
    return entries


def expected(entry: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(entry["bytes"]), dtype=TORCH[entry["dtype"]]).reshape(entry["shape"])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# The main checkpoint: ~8 GiB, tensors straddling 2**31 and 2**32 at odd offsets, one beyond 2**33.
BIG_LAYOUT = [
    ("head", "F32", (16,), None),
    ("cross31", "F32", (1000,), G31 - 1234),  # straddles 2**31, not 4-byte aligned
    ("cross32", "BF16", (768, 2049), G32 - 1_500_001),  # 3 MiB straddling 2**32 at an odd offset
    ("after32", "I64", (5,), None),  # adjacent: coalesced with cross32
    ("beyond33", "F16", (64, 96), G33 + (2 << 20) + 12345),
    ("tail", "U8", (3,), None),
]
WANTED = ["cross31", "cross32", "after32", "beyond33"]


@pytest.fixture(scope="module")
def big(http_root: Path):
    """(path, entries) of the sparse ~8 GiB checkpoint; it lives under the HTTP server's root."""
    folder = http_root / f"bigoff-{uuid.uuid4().hex[:10]}"
    folder.mkdir()
    path = folder / "model.safetensors"
    entries = write_sparse(path, BIG_LAYOUT)
    assert os.stat(path).st_blocks * 512 < 64 << 20, "the checkpoint should be sparse"
    try:
        yield path, entries
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_sparse_fixture_is_valid_for_the_reference(big):
    path, entries = big
    assert os.path.getsize(path) == entries["tail"]["end"] > G33
    with safe_open(str(path), "pt") as f:
        for name in WANTED + ["head", "tail"]:
            assert same(f.get_tensor(name), expected(entries[name])), name


@pytest.mark.parametrize("how", ["local", "file", "pathlike"])
def test_load_high_offset_tensors_local(big, how):
    path, entries = big
    source = {"local": str(path), "file": path.as_uri(), "pathlike": path}[how]
    trace = fastload.Trace()
    got = fastload.load(source, names=WANTED, config=SMALL, trace=trace)
    assert list(got) == WANTED
    for name in WANTED:
        assert same(got[name], expected(entries[name])), name
    wanted_bytes = sum(entries[n]["end"] - entries[n]["start"] for n in WANTED)
    fetched = trace.summary().bytes_fetched
    assert wanted_bytes <= fetched <= wanted_bytes + HEADER_BYTES + 64


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_load_high_offset_tensors_http(big, http_server, engine):
    path, entries = big
    url = http_server.url_for(path)
    config = SMALL.replace(http_engine=engine)
    got = fastload.load(url, names=WANTED, config=config)
    for name in WANTED:
        assert same(got[name], expected(entries[name])), name
    wanted_bytes = sum(entries[n]["end"] - entries[n]["start"] for n in WANTED)
    assert http_server.bytes_sent() <= wanted_bytes + HEADER_BYTES + 64
    # Every Range asked for names exact 64-bit offsets inside a wanted tensor (none is cut to 32 bits).
    spans = [(entries[n]["start"], entries[n]["end"]) for n in WANTED] + [(0, HEADER_BYTES)]
    for rec in http_server.requests():
        assert rec.status == 206, rec
        first, _, last = rec.range.removeprefix("bytes=").partition("-")
        first, last = int(first), int(last)
        assert any(s <= first and last < e for s, e in spans) or (
            first >= entries["cross32"]["start"] and last < entries["after32"]["end"]), rec.range


def test_load_http_directory_url(big, http_server):
    path, entries = big
    url = http_server.url_for(path.parent) + "/"
    got = fastload.load(url, names=["beyond33"], config=SMALL)
    assert same(got["beyond33"], expected(entries["beyond33"]))


def test_stream_high_offset(big):
    path, entries = big
    with fastload.stream(path, names=WANTED, config=SMALL) as s:
        got = dict(s)
    for name in WANTED:
        assert same(got[name], expected(entries[name])), name


def test_load_high_offset_with_dtype_conversion(big):
    """Staged path (conversion) at offsets past 2**32."""
    path, entries = big
    got = fastload.load(path, names=["cross32", "beyond33"], dtype=torch.float32, config=SMALL)
    for name in ["cross32", "beyond33"]:
        assert same(got[name], expected(entries[name]).float()), name


@pytest.mark.parametrize("mode", ["direct_io", "cold_readers"])
def test_load_high_offset_cold_paths(big, mode):
    """O_DIRECT (aligned scratch, unaligned 64-bit start) and the ordered cold gate, on evicted pages."""
    path, entries = big
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    config = SMALL.replace(direct_io=True) if mode == "direct_io" else SMALL.replace(local_cold_readers=1)
    trace = fastload.Trace()
    got = fastload.load(path, names=["cross32", "beyond33"], config=config, trace=trace)
    for name in ["cross32", "beyond33"]:
        assert same(got[name], expected(entries[name])), name


# -- plan numbers ------------------------------------------------------------------------------------


def test_plan_offsets_and_totals_exact(big):
    path, entries = big
    plan = fastload.plan(path, names=WANTED, config=SMALL)
    assert plan.files[0].info.size == entries["tail"]["end"]
    assert plan.files[0].data_start == HEADER_BYTES
    by_name = {t.name: t for t in plan.tensors}
    for name in WANTED:
        t = by_name[name]
        assert (t.spec.start, t.spec.end) == (entries[name]["start"], entries[name]["end"]), name
        assert t.nbytes == entries[name]["end"] - entries[name]["start"]
    want = sum(entries[n]["end"] - entries[n]["start"] for n in WANTED)
    assert plan.total_bytes == plan.output_bytes == want
    # chunks: each at most chunk_bytes, covering exactly the wanted bytes, none outside them
    covered = sorted((c.start, c.end) for c in plan.chunks)
    for a, b in covered:
        assert b - a <= plan.chunk_bytes
    merged = []
    for a, b in covered:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    assert merged == [(entries["cross31"]["start"], entries["cross31"]["end"]),
                      (entries["cross32"]["start"], entries["after32"]["end"]),
                      (entries["beyond33"]["start"], entries["beyond33"]["end"])]
    # a chunk boundary lands exactly where chunk_bytes says: cross32 is cut every chunk_bytes from its start
    starts = [c.start for c in plan.chunks if entries["cross32"]["start"] <= c.start < entries["cross32"]["end"]]
    assert starts == list(range(entries["cross32"]["start"], entries["cross32"]["end"], plan.chunk_bytes))


def test_plan_json_exact_64bit(big):
    path, entries = big
    plan = fastload.plan(path, config=SMALL)
    doc = json.loads(plan.to_json())
    assert doc["files"][0]["size"] == entries["tail"]["end"]
    assert doc["total_bytes"] == doc["output_bytes"] == entries["tail"]["end"] - HEADER_BYTES
    tensors = {t["name"]: t for t in doc["tensors"]}
    assert set(tensors) == set(entries)
    for name, e in entries.items():
        assert (tensors[name]["start"], tensors[name]["end"]) == (e["start"], e["end"]), name
        assert tensors[name]["shape"] == list(e["shape"])
    # the whole file's chunks tile the data section exactly
    spans = sorted((c["start"], c["end"]) for c in doc["chunks"])
    assert spans[0][0] == HEADER_BYTES and spans[-1][1] == entries["tail"]["end"]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(isinstance(v, int) for s in spans for v in s)
    # pieces reference exact sources
    for c in doc["chunks"]:
        for piece in c["pieces"]:
            tensor_index, src, length, dst = piece[:4]
            t = doc["tensors"][tensor_index]
            assert t["start"] <= src and src + length <= t["end"]
            assert dst == src - t["start"]


def test_plan_str_and_inspect_show_exact_sizes(big, capsys):
    path, entries = big
    plan = fastload.plan(path, config=SMALL)
    text = str(plan)
    assert str(entries["tail"]["end"]) in text  # file size in bytes
    assert str(entries["pad_2"]["end"] - entries["pad_2"]["start"]) in text  # a > 4 GiB tensor's bytes
    from fastload.cli import main

    assert main(["inspect", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"][0]["size"] == entries["tail"]["end"]
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"({entries['tail']['end'] - HEADER_BYTES} bytes)" in out


def test_plan_huge_tensors_elements(big):
    """Filler tensors with more than 2**31 and 2**32 elements: numel/nbytes/shape exact in the plan."""
    path, entries = big
    plan = fastload.plan(path, names=["pad_1", "pad_2"], config=fastload.LoadConfig())
    by_name = {t.name: t for t in plan.tensors}
    for name in ["pad_1", "pad_2"]:
        n = entries[name]["end"] - entries[name]["start"]
        assert by_name[name].shape == (n,)
        assert by_name[name].spec.numel == by_name[name].nbytes == n
    assert entries["pad_2"]["end"] - entries["pad_2"]["start"] > G32
    total = sum(entries[n]["end"] - entries[n]["start"] for n in ["pad_1", "pad_2"])
    assert plan.total_bytes == total
    assert plan.chunk_bytes == 64 << 20
    assert len(plan.chunks) == sum(-(-(entries[n]["end"] - entries[n]["start"]) // plan.chunk_bytes)
                                   for n in ["pad_1", "pad_2"])


# -- shard= on high-offset tensors -------------------------------------------------------------------


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("world", [2, 3, 5])
def test_shard_high_offset_tensor_local(big, dim, world):
    path, entries = big
    names = ["cross32", "beyond33"]
    for rank in range(world):
        shard = fastload.Shard(rank, world, {r"cross32|beyond33": dim})
        got = fastload.load(path, names=names, shard=shard, config=SMALL)
        for name in names:
            want = expected(entries[name]).tensor_split(world, dim)[rank]
            assert same(got[name], want), (name, rank)


@pytest.mark.parametrize("dim", [0, 1])
def test_shard_high_offset_tensor_http(big, http_server, dim):
    path, entries = big
    url = http_server.url_for(path)
    shard = fastload.Shard(1, 3, {r"cross32": dim})
    got = fastload.load(url, names=["cross32"], shard=shard, config=SMALL)
    want = expected(entries["cross32"]).tensor_split(3, dim)[1]
    assert same(got["cross32"], want)
    # dim 0 fetches only the rank's rows; other dims no more than the tensor's span
    row = 2049 * 2
    lo, hi = (256 * row, 512 * row) if dim == 0 else (0, 768 * row)
    limit = (hi - lo) if dim == 0 else 768 * row
    body = sum(r.body_bytes for r in http_server.requests() if r.range and
               int(r.range.removeprefix("bytes=").partition("-")[0]) >= entries["cross32"]["start"])
    assert body <= limit


# -- tensors declared with more than 2**31 / 2**32 elements (plan only, never allocated) -----------------


HUGE_LAYOUT = [
    ("small", "F32", (4,), None),
    ("wide", "U8", (65536, 65537), None),  # 2**32 + 2**16 elements, 2 dims
    ("long", "BF16", (G31 + 1,), None),  # 2**31 + 1 elements, 2**32 + 2 bytes
    ("last", "F16", (3,), None),
]


@pytest.fixture(scope="module")
def huge(tmp_path_factory):
    folder = tmp_path_factory.mktemp("huge")
    path = folder / "huge.safetensors"
    entries = write_sparse(path, HUGE_LAYOUT, holes=("wide", "long"))
    try:
        yield path, entries
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_plan_tensors_over_2_31_elements(huge):
    path, entries = huge
    plan = fastload.plan(path)
    t = {x.name: x for x in plan.tensors}
    assert t["wide"].shape == (65536, 65537) and t["wide"].nbytes == 65536 * 65537
    assert t["long"].shape == (G31 + 1,) and t["long"].nbytes == 2 * (G31 + 1)
    assert t["long"].spec.numel == G31 + 1
    assert (t["last"].spec.start, t["last"].spec.end) == (entries["last"]["start"], entries["last"]["end"])
    assert plan.output_bytes == plan.total_bytes == entries["last"]["end"] - HEADER_BYTES
    doc = json.loads(plan.to_json())
    assert {d["name"]: d["shape"] for d in doc["tensors"]}["long"] == [G31 + 1]
    # the small tensors at the end load (few bytes), after the huge ones
    got = fastload.load(path, names=["last", "small"])
    assert same(got["last"], expected(entries["last"])) and same(got["small"], expected(entries["small"]))


@pytest.mark.parametrize("dim", [0, 1])
def test_shard_plan_of_huge_tensor(huge, dim):
    path, entries = huge
    world = 3
    shard = fastload.Shard(2, world, {"wide": dim})
    plan = fastload.plan(path, names=["wide"], shard=shard)
    (t,) = plan.tensors
    rows, cols = 65536, 65537
    if dim == 0:
        lo, hi = 21846 + 21845, rows  # tensor_split(3) of 65536 rows: 21846, 21845, 21845
        assert t.shape == (hi - lo, cols)
    else:
        lo = 21846 + 21846  # cols 65537 -> 21846, 21846, 21845
        assert t.shape == (rows, 21845)
    assert t.nbytes == t.shape[0] * t.shape[1]
    assert sum(c.payload for c in plan.chunks) == t.nbytes
    start = entries["wide"]["start"]
    for c in plan.chunks:
        for p in c.pieces:
            assert start <= p.src and p.end <= entries["wide"]["end"]
            if dim == 1:
                assert (p.src - start) % cols == lo and p.length == 21845
                assert p.dst == (p.src - start) // cols * 21845
            else:
                assert p.src - start - lo * cols == p.dst
    if dim == 0:
        assert plan.total_bytes == (rows - lo) * cols


# -- hostile sizes in headers: overflow int64, exceed the file ------------------------------------------


def _file_with_header(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 2**63 - 1, 2**32 + 2, 2**31 + 7])
def test_header_length_prefix_huge(tmp_path, length):
    path = _file_with_header(tmp_path / "x.safetensors", {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
                             b"\x01", length=length)
    with pytest.raises(FormatError):
        fastload.plan(path)
    with pytest.raises(FormatError):
        fastload.load(path)


@pytest.mark.parametrize("offsets", [
    [0, 2**64], [2**64, 2**64 + 1], [2**63, 2**63 + 1], [2**63 - 1, 2**63], [0, 2**32 + 1],
    [2**64 - 1, 2**64 - 1 + 1], [-(2**63), 1], [0, 10**40],
])
def test_data_offsets_overflow_or_past_file(tmp_path, offsets):
    n = offsets[1] - offsets[0]
    shape = [n] if 0 <= n < 2**70 else [1]
    path = _file_with_header(tmp_path / "x.safetensors", {"a": {"dtype": "U8", "shape": shape, "data_offsets": offsets}},
                             b"\x01")
    with pytest.raises(FormatError):
        fastload.plan(path)


def test_data_offsets_with_thousands_of_digits(tmp_path):
    """A number longer than Python's int-parsing limit (4300 digits) is a FormatError, not a bare ValueError."""
    big_number = "9" * 5000
    raw = ('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,' + big_number + ']}}').encode()
    path = _file_with_header(tmp_path / "x.safetensors", raw, b"\x01")
    with pytest.raises(FormatError):
        fastload.plan(path)
    raw = ('{"a":{"dtype":"U8","shape":[' + big_number + '],"data_offsets":[0,1]}}').encode()
    path = _file_with_header(tmp_path / "y.safetensors", raw, b"\x01")
    with pytest.raises(FormatError):
        fastload.plan(path)


@pytest.mark.parametrize("dtype,shape", [
    ("F32", [2**62, 2**62]),  # product overflows int64 many times
    ("F64", [2**61]),  # 2**64 bytes
    ("U8", [2**63]),  # bytes = 2**63 > int64 max
    ("BF16", [2**32, 2**32]),
    ("U8", [0, 2**64]),  # empty, but a dim that overflows int64
    ("F32", [0, 2**62]),  # empty, stride in bytes overflows int64
])
def test_shape_overflows_int64(tmp_path, dtype, shape):
    path = _file_with_header(tmp_path / "x.safetensors",
                             {"a": {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(FormatError):
        fastload.plan(path)


def test_sparse_header_promises_more_than_file(tmp_path):
    """A > 4 GiB header layout whose file was cut short (a partial download) is a FormatError at plan time."""
    path = tmp_path / "cut.safetensors"
    entries = write_sparse(path, [("a", "U8", (4,), None), ("b", "U8", (4,), G32 + 10)])
    os.truncate(path, entries["b"]["end"] - 1)
    try:
        with pytest.raises(FormatError):
            fastload.plan(path)
        with pytest.raises(FormatError):
            fastload.load(path, names=["a"])
    finally:
        path.unlink()


def test_sparse_file_longer_than_header(tmp_path):
    path = tmp_path / "long.safetensors"
    entries = write_sparse(path, [("a", "U8", (4,), None), ("b", "U8", (4,), G32 + 10)])
    os.truncate(path, entries["b"]["end"] + G32)  # 4 GiB of trailing bytes
    try:
        with pytest.raises(FormatError):
            fastload.plan(path)
    finally:
        path.unlink()


# -- index.json with huge shards ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_index(http_root: Path):
    """Two sparse shards of ~4.3 and ~8.6 GiB with an index; the directory is served over HTTP too."""
    folder = http_root / f"bigidx-{uuid.uuid4().hex[:10]}"
    folder.mkdir()
    s1 = write_sparse(folder / "model-00001-of-00002.safetensors",
                      [("a.weight", "F32", (8,), None), ("a.high", "BF16", (33, 17), G32 + 77)], seed=1,
                      pad_prefix="pad_a")
    s2 = write_sparse(folder / "model-00002-of-00002.safetensors",
                      [("b.weight", "F32", (8,), None), ("b.high", "I64", (9,), G33 + 5)], seed=2,
                      pad_prefix="pad_b")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in s1} | {
        n: "model-00002-of-00002.safetensors" for n in s2}
    total = sum(e["end"] - e["start"] for e in (s1 | s2).values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total, "huge": 2**70}, "weight_map": weight_map}))
    try:
        yield folder, s1, s2, total
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("how", ["local", "file", "http", "index_url"])
def test_index_with_huge_shards(big_index, http_server, how):
    folder, s1, s2, total = big_index
    source = {"local": str(folder), "file": folder.as_uri(),
              "http": http_server.url_for(folder) + "/",
              "index_url": http_server.url_for(folder / "model.safetensors.index.json")}[how]
    got = fastload.load(source, names=["b.high", "a.high"], config=SMALL)
    assert list(got) == ["b.high", "a.high"] or set(got) == {"a.high", "b.high"}
    assert same(got["a.high"], expected(s1["a.high"])) and same(got["b.high"], expected(s2["b.high"]))
    plan = fastload.plan(source, config=SMALL)
    assert plan.output_bytes == plan.total_bytes == total > G33
    assert [f.info.size for f in plan.files] == [s1["a.high"]["end"], s2["b.high"]["end"]]
    assert plan.index_metadata["total_size"] == total
    doc = json.loads(plan.to_json())
    assert doc["index_metadata"]["huge"] == 2**70
    assert doc["total_bytes"] == total


# -- Content-Range with large values ------------------------------------------------------------------


QUICK = SMALL.replace(stall_timeout_s=1.0, connect_timeout_s=2.0,
                      retry=fastload.RetryConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.02,
                                                 deadline_s=5.0))


class FileServer(ScriptedHTTP):
    """Serves one file's byte ranges; ``total``/``shown`` let a test distort Content-Range."""

    def __init__(self, path: Path, *, total=None, shown=None) -> None:
        super().__init__("bigoff-server")
        self.path = path
        self.total = total  # callable(size) -> str: what Content-Range says the size is
        self.shown = shown  # callable(first, last) -> (first, last): what Content-Range says the range is
        self.ranges: list[str] = []

    def _handle(self, h) -> None:
        value = h.headers.get("Range", "")
        with self.lock:
            self.ranges.append(value)
        size = os.path.getsize(self.path)
        first, _, last = value.removeprefix("bytes=").partition("-")
        first, last = int(first), min(int(last), size - 1)
        with open(self.path, "rb") as f:
            f.seek(first)
            body = f.read(last - first + 1)
        a, b = self.shown(first, last) if self.shown else (first, last)
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {a}-{b}/{self.total(size) if self.total else size}")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", '"v1"')
        h.end_headers()
        h.wfile.write(body)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.path.name}"


@pytest.mark.parametrize("total", [
    lambda size: "9" * 5000,  # more digits than Python parses by default
    lambda size: str(2**64 + size),
    lambda size: str(2**63),
    lambda size: str(size + 2**32),  # a 32-bit-wrapped size seen from the other side
])
@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_content_range_huge_total_is_a_fastload_error(big, total, engine):
    """A server that reports an absurd or different size fails with a FastloadError, never a bare ValueError."""
    path, entries = big
    with FileServer(path, total=total) as server:
        with pytest.raises(FastloadError):
            fastload.load(server.url(), names=["beyond33"], config=QUICK.replace(http_engine=engine))


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_content_range_wrapped_to_32_bits_is_refused(big, engine):
    """A reply whose Content-Range names the asked range modulo 2**32 (a 32-bit server) is not the range asked:
    the load fails (TransferError) instead of taking bytes from the wrong offset."""
    path, entries = big
    with FileServer(path, shown=lambda a, b: (a % G32, b % G32)) as server:
        with pytest.raises(fastload.TransferError):
            fastload.load(server.url(), names=["beyond33"], config=QUICK.replace(http_engine=engine))
        assert any(int(r.removeprefix("bytes=").partition("-")[0]) >= G33 for r in server.ranges)


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_scripted_server_exact_ranges(big, engine):
    """Control: the same server, honest, serves the high-offset tensors byte for byte."""
    path, entries = big
    with FileServer(path) as server:
        got = fastload.load(server.url(), names=["beyond33", "cross32"], config=QUICK.replace(http_engine=engine))
        asked = {r for r in server.ranges}
    assert same(got["beyond33"], expected(entries["beyond33"]))
    assert same(got["cross32"], expected(entries["cross32"]))
    b = entries["beyond33"]
    assert f"bytes={b['start']}-{b['end'] - 1}" in asked


@pytest.mark.parametrize("shown", [
    lambda a, b: ("9" * 5000, b),  # a first byte of 5000 digits
    lambda a, b: (a, "9" * 5000),
    lambda a, b: (a + 2**64, b + 2**64),  # the asked range shifted by 2**64 (a 64-bit wrap)
])
@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_content_range_huge_values_on_reads(big, shown, engine):
    """The probe is honest; the tensor reads' Content-Range carries absurd values: TransferError (retried, then
    given up), never a bare ValueError."""
    path, entries = big
    with FileServer(path, shown=lambda a, b: (a, b) if a < HEADER_BYTES else shown(a, b)) as server:
        with pytest.raises(fastload.TransferError):
            fastload.load(server.url(), names=["beyond33"], config=QUICK.replace(http_engine=engine))


# -- fastload pull: resume bookkeeping above 4 GiB -------------------------------------------------------


class Interrupt(Exception):
    pass


def _pull(source, **kwargs):
    from fastload.pull import apull
    from fastload.runner import run

    return run(lambda: apull(source, **kwargs))


@pytest.fixture
def big_pull_source(tmp_path):
    """A sparse ~4.5 GiB file: 1 MiB of real bytes at the start, 3 MiB at the end (past 2**32), holes between."""
    src = tmp_path / "src"
    src.mkdir()
    path = src / "model.safetensors"
    entries = write_sparse(path, [("head", "U8", ((1 << 20) - HEADER_BYTES,), None),
                                  ("tail", "U8", (3 << 20,), G32 + (1 << 29) + 3)])
    try:
        yield path, entries
    finally:
        shutil.rmtree(tmp_path / "src", ignore_errors=True)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)


def _region(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(end - start)


@pytest.mark.parametrize("via", ["local", "http"])
def test_pull_resumes_above_4gib(big_pull_source, http_server, via):
    """An interrupted pull of a > 4 GiB file resumes with exactly the missing bytes, at 64-bit offsets.

    The first pull is interrupted after its first 1 MiB chunk (a real journal); the journal then gets the
    entries an earlier run would have written for the holes (plain ``start end`` lines, offsets past 2**32),
    so the resumed pull has only the last ~3 MiB to fetch. No GBs are written: the temp file stays sparse."""
    path, entries = big_pull_source
    size = os.path.getsize(path)
    if via == "http":
        folder = http_server.root / f"bigpull-{uuid.uuid4().hex[:8]}"
        folder.mkdir()
        os.link(path, folder / path.name)
        source = http_server.url_for(folder / path.name)
    else:
        folder, source = None, str(path)
    out = path.parent.parent / "out"
    config = fastload.LoadConfig(chunk_bytes=1 << 20, max_concurrency=1, host_buffer_bytes=4 << 20)
    calls = []

    def interrupt(done, total):
        calls.append((done, total))
        if len(calls) > 1:
            raise Interrupt

    try:
        with pytest.raises(Interrupt):
            _pull(source, to=out, config=config, progress=interrupt)
        assert calls[0] == (0, size)
        temp = out / ".fastload" / "incomplete" / path.name
        journal = temp.with_name(temp.name + ".journal")
        lines = journal.read_text().splitlines()
        assert lines[1:] == [f"0 {1 << 20}"], lines
        assert os.path.getsize(temp) == size
        tail = entries["tail"]["start"]
        cut = tail + (1 << 20) - 5  # the resumed pull fetches [cut, size): 2 MiB + 5 bytes, all past 2**32
        with open(journal, "a") as f:
            f.write(f"{1 << 20} {G31}\n{G31} {G32}\n{G32} {tail}\n")
        # bytes an earlier run had written below ``cut``, as it would have
        with open(temp, "r+b") as f:
            f.seek(tail)
            f.write(_region(path, tail, cut))
        with open(journal, "a") as f:
            f.write(f"{tail} {cut}\n")
        calls.clear()
        result = _pull(source, to=out, config=config, progress=lambda d, t: calls.append((d, t)))
        final = out / path.name
        assert result.total_bytes == size
        assert result.bytes_fetched == size - cut
        assert calls[0] == (cut, size) and calls[-1] == (size, size)
        assert os.path.getsize(final) == size
        assert _region(final, 0, 1 << 20) == _region(path, 0, 1 << 20)
        assert _region(final, tail, size) == _region(path, tail, size)
        assert os.stat(final).st_blocks * 512 < 64 << 20  # still sparse: nothing but the fetched bytes written
        if via == "http":
            sent = [r for r in http_server.requests(f"/{folder.name}/*") if r.range != "bytes=0-7"]
            assert sum(r.body_bytes for r in sent) == (1 << 20) - 8 + size - cut  # (bytes 0-7: the probe's)
        # a second pull finds it complete
        again = _pull(source, to=out, config=config)
        assert again.fetched == () and again.bytes_fetched == 0
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _interrupted_pull(path, out):
    """Pull ``path`` into ``out`` 1 MiB at a time and stop it after the first chunk; returns the config and the
    journal the stopped pull left."""
    config = fastload.LoadConfig(chunk_bytes=1 << 20, max_concurrency=1, host_buffer_bytes=4 << 20)
    calls = []

    def interrupt(done, total):
        calls.append((done, total))
        if len(calls) > 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        _pull(str(path), to=out, config=config, progress=interrupt)
    temp = out / ".fastload" / "incomplete" / path.name
    return config, temp.with_name(temp.name + ".journal")


def test_pull_journal_ranges_past_size_are_ignored(big_pull_source):
    """Journal entries beyond the object's size (or wrapped past 2**64) do not count as done."""
    path, entries = big_pull_source
    size = os.path.getsize(path)
    out = path.parent.parent / "out"
    config, journal = _interrupted_pull(path, out)
    calls = []
    tail = entries["tail"]["start"]
    with open(journal, "a") as f:
        f.write(f"{1 << 20} {tail}\n")  # the holes: genuinely done (zeros both sides)
        f.write(f"{tail} {size + 1}\n{tail} {2**64 + tail + 10}\n{2**64 + tail} {2**64 + size}\n")
        f.write(f"{tail - 2**64} {size}\n")  # negative: not digits
    calls.clear()
    result = _pull(str(path), to=out, config=config, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (tail, size)
    assert result.bytes_fetched == size - tail
    assert _region(out / path.name, tail, size) == _region(path, tail, size)


def test_pull_journal_with_non_ascii_digits(big_pull_source):
    """A journal line with characters ``str.isdigit`` accepts and ``int`` refuses (superscripts) is a damaged
    entry to ignore, not a crash of the resumed pull."""
    path, entries = big_pull_source
    out = path.parent.parent / "out"
    config, journal = _interrupted_pull(path, out)
    tail = entries["tail"]["start"]
    with open(journal, "a") as f:
        f.write(f"{1 << 20} {tail}\n")
        f.write("4294967296 4294967296\u00b2\n")  # "²": isdigit() is True, int() refuses it
    result = _pull(str(path), to=out, config=config)
    assert result.bytes_fetched == os.path.getsize(path) - tail


# -- page-cache probes at 64-bit offsets ------------------------------------------------------------------


def test_mincore_bytes_at_offsets_past_4gib(big):
    """``mincore_bytes`` maps the range at its 64-bit file offset (mmap's off_t), and sees what is cached."""
    from fastload.sources.local import load_libc, mincore_bytes

    path, entries = big
    b = entries["cross32"]
    libc = load_libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # DONTNEED leaves dirty pages cached: the fixture's writes must be on disk first
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert mincore_bytes(libc, fd, b["start"], b["end"] - b["start"]) == 0
        os.pread(fd, b["end"] - b["start"], b["start"])  # now cached
        cached = mincore_bytes(libc, fd, b["start"], b["end"] - b["start"])
        assert cached >= b["end"] - b["start"] - 4096
        far = entries["beyond33"]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.pread(fd, far["end"] - far["start"], far["start"])
        assert mincore_bytes(libc, fd, far["start"], far["end"] - far["start"]) > 0
        # the same span 4 GiB lower (what a 32-bit offset would probe) is a hole nobody read
        assert mincore_bytes(libc, fd, far["start"] - G32, far["end"] - far["start"]) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("text,value", [
    ("4294967297", 2**32 + 1), ("9007199254740993", 2**53 + 1), ("8589934593b", 2**33 + 1), ("5GiB", 5 << 30),
])
def test_parse_size_exact_for_large_counts(text, value):
    """A byte count given in whole bytes comes back exactly, not rounded through a float."""
    from fastload.config import parse_size

    assert parse_size(text) == value


# -- the Hub's X-Linked-Size ----------------------------------------------------------------------------

from hub_server import hub, hub_session, repo_name  # noqa: E402,F401 -- fixtures


@pytest.mark.parametrize("linked_size", ["9" * 5000, str(2**64 + 16), str(2**32 + 16)])
def test_hub_linked_size_absurd_is_a_fastload_error(hub, tmp_path, linked_size):
    """An ``X-Linked-Size`` that is not the file's size (past 2**32, past 2**64, 5000 digits) fails the load with
    a FastloadError (IntegrityError/TransferError), not a bare ValueError."""
    from safetensors.torch import save_file

    src = tmp_path / "repo"
    src.mkdir()
    save_file({"w": torch.arange(16, dtype=torch.float32)}, str(src / "model.safetensors"))
    repo = repo_name("linked")
    commit = hub.add_repo(repo, src)
    hub.files[commit]["model.safetensors"]["size"] = linked_size
    with pytest.raises(FastloadError):
        fastload.load(f"hf://{repo}", config=QUICK)
