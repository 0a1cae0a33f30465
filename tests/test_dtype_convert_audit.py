"""Audit: dtype conversion on load (``dtype=``).

The README's contract: ``dtype`` converts floating-point tensors; integer and bool tensors stay as stored;
results are bit-identical to ``safetensors.torch.load_file``. With ``dtype=`` the reference is therefore
torch's own ``tensor.to(dtype)`` on the ``load_file`` result, compared bit for bit.

One caveat, from torch itself: torch's float16 -> wider conversion does not treat NaN payloads the same in its
vectorised loop and in its scalar tail (``x[k:].to(float32)`` may quiet a NaN payload that ``x.to(float32)``
keeps, depending on how TensorIterator splits the work over threads). Where the *source* is float16 and both
sides are NaN, only NaN-ness is compared; everywhere else every bit is.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastload
from fastload.errors import ConfigError

KiB = 1 << 10
SMALL = fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=128 * KiB, max_concurrency=4)

# safetensors name -> torch dtype, for the float dtypes this torch and safetensors both know.
_FLOAT_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}


def _saveable(name: str, attr: str) -> torch.dtype | None:
    dtype = getattr(torch, attr, None)
    if dtype is None:
        return None
    try:
        safetensors.torch.save({"p": torch.zeros(1, dtype=dtype)})
        torch.zeros(1).to(dtype)
    except Exception:  # noqa: BLE001 - not supported by this torch/safetensors
        return None
    return dtype


FLOATS: dict[str, torch.dtype] = {n: d for n, a in _FLOAT_NAMES.items() if (d := _saveable(n, a)) is not None}
TARGETS = list(FLOATS.values())
TARGET_IDS = [str(d).removeprefix("torch.") for d in TARGETS]


# -- helpers ---------------------------------------------------------------------------------------------------


def flat_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def expected(ref: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return ref.to(dtype) if dtype is not None and ref.dtype.is_floating_point else ref


def assert_same(name: str, got: torch.Tensor, want: torch.Tensor, src_dtype: torch.dtype | None = None) -> None:
    """Bit-identical (see the module docstring for the one float16-NaN allowance)."""
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert tuple(got.shape) == tuple(want.shape), (name, got.shape, want.shape)
    assert got.device == want.device, name
    assert got.is_contiguous(), name
    if want.numel() == 0:
        return
    g, w = flat_bits(got), flat_bits(want)
    if torch.equal(g, w):
        return
    size = want.element_size()
    diff = (g.view(-1, size) != w.view(-1, size)).any(dim=1)
    if src_dtype == torch.float16:
        both_nan = got.reshape(-1).float().isnan() & want.reshape(-1).float().isnan()
        diff &= ~both_nan
    idx = diff.nonzero().flatten()
    assert idx.numel() == 0, (f"{name}: {idx.numel()} of {want.numel()} element(s) differ from torch's "
                              f"{src_dtype}->{want.dtype}, first at {idx[:5].tolist()}: "
                              f"got {g.view(-1, size)[idx[:3]].tolist()} want {w.view(-1, size)[idx[:3]].tolist()}")


def assert_owns_memory(name: str, t: torch.Tensor) -> None:
    assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


def random_bits(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``n`` elements of ``dtype`` with every bit pattern possible (NaN payloads, subnormals, infinities)."""
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen).view(dtype)


def special_values(dtype: torch.dtype) -> torch.Tensor:
    """The edge values of ``dtype`` and of every target: zeros, infinities, NaNs, extremes, subnormals, values
    that overflow or underflow narrower types, ties that round."""
    vals = [0.0, -0.0, 1.0, -1.0, 0.5, math.inf, -math.inf, math.nan, -math.nan, 1e6, -1e6, 1e-30, -1e-30,
            65504.0, 65519.0, 65520.0, 70000.0, 448.0, 449.0, 464.0, 480.0, 57344.0, 61440.0, 240.0, 3.4e38,
            -3.4e38, 1e300, -1e300, 5e-324, 2.0 ** -24, 2.0 ** -25, 2.0 ** -14, 2.0 ** -126, 2.0 ** -149,
            2.0 ** -133, 2.0 ** -9, 2.0 ** -10, 2.0 ** 127, 2.0 ** -127, 1.0 + 2.0 ** -8, 1.0 + 2.0 ** -9,
            1.0 + 3 * 2.0 ** -9, 3.0, 0.1, -0.1, 1 / 3]
    base = torch.tensor(vals, dtype=torch.float64)
    for info_dtype in TARGETS:
        fi = torch.finfo(info_dtype)
        base = torch.cat([base, torch.tensor([fi.max, fi.min, fi.tiny, fi.smallest_normal, fi.eps],
                                             dtype=torch.float64)])
    out = base.to(dtype)
    fi = torch.finfo(dtype)
    # The smallest subnormal of the type itself, and the largest finite bit patterns.
    extra = torch.tensor([fi.max, fi.min, fi.tiny], dtype=torch.float64).to(dtype)
    return torch.cat([out, extra])


def write_raw(path: Path, entries: list[tuple[str, str, tuple[int, ...], bytes]], metadata=None) -> Path:
    """A safetensors file with tensors in exactly the given order and no alignment padding anywhere (the
    format allows it; safetensors' own writer would sort and align)."""
    header: dict = {}
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(e[3] for e in entries))
    return path


def as_bytes(t: torch.Tensor) -> bytes:
    return flat_bits(t).numpy().tobytes()


def src_dtype_of(name: str) -> torch.dtype | None:
    return FLOATS.get(name.split(".")[0])


# -- checkpoints -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_float(tmp_path_factory) -> Path:
    """Per float dtype: random bits across several 64 KiB chunks (odd count), edge values, a scalar and
    empties; plus integer, bool and complex tensors that must stay as stored."""
    gen = torch.Generator().manual_seed(7)
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype in FLOATS.items():
        size = torch.empty(0, dtype=dtype).element_size()
        tensors[f"{name}.bits"] = random_bits(150_001 // size, dtype, gen)  # ~150 KB: straddles 64 KiB chunks
        tensors[f"{name}.special"] = special_values(dtype)
        tensors[f"{name}.scalar"] = random_bits(1, dtype, gen).reshape(())
        tensors[f"{name}.one"] = random_bits(1, dtype, gen)
        tensors[f"{name}.odd"] = random_bits(3 * 5 * 7, dtype, gen).reshape(3, 5, 7)
        tensors[f"{name}.empty"] = torch.empty(0, dtype=dtype)
        tensors[f"{name}.empty_3x0"] = torch.empty(3, 0, dtype=dtype)
    tensors["I64.v"] = torch.randint(-2**62, 2**62, (1001,), generator=gen)
    tensors["I32.v"] = torch.randint(-2**31, 2**31 - 1, (33,), generator=gen, dtype=torch.int32)
    tensors["I8.v"] = torch.randint(-128, 127, (7,), generator=gen, dtype=torch.int8)
    tensors["U8.v"] = torch.randint(0, 255, (5,), generator=gen, dtype=torch.uint8)
    tensors["BOOL.v"] = torch.randint(0, 2, (9,), generator=gen).bool()
    tensors["C64.v"] = torch.randn(11, generator=gen, dtype=torch.complex64)
    tensors["I64.scalar"] = torch.tensor(-5)
    path = tmp_path_factory.mktemp("dtype") / "every_float.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def unaligned(tmp_path_factory) -> Path:
    """Every float dtype at odd file offsets: one-byte tensors between them, tensors coalesced into one chunk
    and others that straddle 64 KiB chunk boundaries, odd element counts throughout."""
    gen = torch.Generator().manual_seed(8)
    entries = []
    for i, (name, dtype) in enumerate(FLOATS.items()):
        size = torch.empty(0, dtype=dtype).element_size()
        entries.append((f"pad{i}", "U8", (2 * i + 1,), bytes(range(2 * i + 1))))
        entries.append((f"{name}.big", name, (70_001 // size * 2 + 1,), as_bytes(random_bits(70_001 // size * 2 + 1,
                                                                                          dtype, gen))))
        entries.append((f"b{i}", "BOOL", (1,), b"\x01"))
        entries.append((f"{name}.small", name, (3,), as_bytes(random_bits(3, dtype, gen))))
        entries.append((f"{name}.special", name, (len(special_values(dtype)),), as_bytes(special_values(dtype))))
        entries.append((f"{name}.scalar", name, (), as_bytes(random_bits(1, dtype, gen))))
        entries.append((f"{name}.empty", name, (0, 2), b""))
        entries.append((f"i{i}", "I16", (3,), as_bytes(torch.tensor([1, -2, 300], dtype=torch.int16))))
    return write_raw(tmp_path_factory.mktemp("dtype") / "unaligned.safetensors", entries)


@pytest.fixture(scope="module")
def shardable(tmp_path_factory) -> Path:
    """Shardable tensors in float dtypes, at an unaligned start (a 3-byte tensor first)."""
    gen = torch.Generator().manual_seed(9)
    specs = {
        "rows.weight": ("F32", torch.float32, (301, 67)),         # dim 0 / 1, spans chunks
        "wide.weight": ("BF16", torch.bfloat16, (3, 40_001)),    # rows wider than 64 KiB: read one by one
        "cube.weight": ("F16", torch.float16, (9, 70, 33)),
        "fp8.weight": ("F8_E4M3", torch.float8_e4m3fn, (130, 77)),
        "dbl.weight": ("F64", torch.float64, (17, 13)),
    }
    entries = [("head", "U8", (3,), b"abc")]
    for name, (st, dtype, shape) in specs.items():
        if st not in FLOATS:
            continue
        values = (torch.randn(shape, generator=gen, dtype=torch.float64) * 100)
        values.view(-1)[:5] = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e6], dtype=torch.float64)
        entries.append((name, st, shape, as_bytes(values.to(dtype))))
    entries.append(("ids", "I64", (13,), as_bytes(torch.arange(13) * 3)))
    return write_raw(tmp_path_factory.mktemp("dtype") / "shardable.safetensors", entries)


# -- the conversion matrix -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_every_float_source_to_every_target_is_bit_identical_to_torch(every_float, target):
    ref = safetensors.torch.load_file(str(every_float))
    got = fastload.load(every_float, dtype=target, config=SMALL)
    assert list(got) == list(ref) or set(got) == set(ref)
    for name, r in ref.items():
        assert_same(name, got[name], expected(r, target), src_dtype_of(name))
        assert_owns_memory(name, got[name])


@pytest.mark.parametrize("target", TARGETS, ids=TARGET_IDS)
def test_unaligned_offsets_and_chunk_straddling_tensors_convert_bit_identically(unaligned, target):
    ref = safetensors.torch.load_file(str(unaligned))
    got = fastload.load(str(unaligned), dtype=target, config=SMALL)
    assert set(got) == set(ref)
    for name, r in ref.items():
        assert_same(name, got[name], expected(r, target), src_dtype_of(name))
        assert_owns_memory(name, got[name])


def test_integer_bool_and_complex_tensors_stay_as_stored(every_float):
    ref = safetensors.torch.load_file(str(every_float))
    got = fastload.load(every_float, dtype=torch.bfloat16)
    for name in ("I64.v", "I32.v", "I8.v", "U8.v", "BOOL.v", "C64.v", "I64.scalar"):
        assert got[name].dtype == ref[name].dtype, name
        assert_same(name, got[name], ref[name])


def test_dtype_none_and_same_dtype_are_bit_identical_to_load_file(every_float):
    ref = safetensors.torch.load_file(str(every_float))
    for dtype in (None, torch.float32):
        got = fastload.load(every_float, dtype=dtype, config=SMALL)
        for name, r in ref.items():
            if dtype is not None and r.dtype.is_floating_point and r.dtype != dtype:
                continue  # a real conversion: covered by the matrix
            assert_same(name, got[name], r)  # as stored: every bit (NaN payloads too) kept


def test_scalars_and_zero_element_tensors_keep_shape_and_take_the_target_dtype(every_float):
    got = fastload.load(every_float, dtype=torch.float16)
    for name, dtype in FLOATS.items():
        assert got[f"{name}.scalar"].shape == () and got[f"{name}.scalar"].dtype == torch.float16
        assert got[f"{name}.empty"].shape == (0,) and got[f"{name}.empty"].dtype == torch.float16
        assert got[f"{name}.empty_3x0"].shape == (3, 0) and got[f"{name}.empty_3x0"].dtype == torch.float16


def test_overflow_to_narrow_targets_matches_torch_exactly(tmp_path):
    """1e6 -> fp16 is inf, -> fp8 e4m3fn is NaN (no inf there), -> e5m2 is inf: whatever torch says, exactly."""
    values = torch.tensor([1e6, -1e6, 65520.0, 1e-8, -1e-8, 500.0, 1e39, math.nan], dtype=torch.float64)
    path = tmp_path / "o.safetensors"
    safetensors.torch.save_file({"d": values, "f": values.to(torch.float32), "h": values.to(torch.float16)},
                                str(path))
    ref = safetensors.torch.load_file(str(path))
    for target in TARGETS:
        got = fastload.load(path, dtype=target)
        for name in ref:
            assert_same(f"{name}->{target}", got[name], ref[name].to(target), ref[name].dtype)


# -- the dtype argument ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["bfloat16", "torch.bfloat16"])
def test_dtype_by_name_equals_dtype_object(every_float, spelling):
    by_obj = fastload.load(every_float, dtype=torch.bfloat16, names=["F32.bits", "F16.special", "I8.v"])
    by_name = fastload.load(every_float, dtype=spelling, names=["F32.bits", "F16.special", "I8.v"])
    for name in by_obj:
        assert_same(name, by_name[name], by_obj[name])


@pytest.mark.parametrize("alias,dtype", [("half", torch.float16), ("float", torch.float32),
                                         ("double", torch.float64), ("float8_e4m3fn", torch.float8_e4m3fn)])
def test_torch_dtype_aliases_by_name(every_float, alias, dtype):
    got = fastload.load(every_float, dtype=alias, names=["BF16.odd"])
    assert got["BF16.odd"].dtype == dtype


@pytest.mark.parametrize("bad", [torch.int8, torch.int64, torch.uint8, torch.bool, "int32", "bool", "uint8",
                                 torch.complex64, torch.complex128, "complex64"],
                         ids=str)
def test_non_float_target_dtype_is_a_config_error(every_float, bad):
    with pytest.raises(ConfigError) as info:
        fastload.load(every_float, dtype=bad)
    assert isinstance(info.value, ValueError)
    assert "dtype" in str(info.value)


@pytest.mark.parametrize("bad", ["bfloat", "Tensor", "float16 ", "", "cuda", 16, 3.5, object(), [torch.float16]],
                         ids=lambda v: "object()" if type(v) is object else repr(v))  # same ids in every process
def test_not_a_dtype_is_a_config_error(every_float, bad):
    with pytest.raises(ConfigError):
        fastload.load(every_float, dtype=bad)


def test_bad_dtype_is_rejected_before_any_io(tmp_path):
    """Argument errors come before the source is touched: a missing file with a bad dtype is a ConfigError."""
    with pytest.raises(ConfigError):
        fastload.load(tmp_path / "absent.safetensors", dtype=torch.int8)
    with pytest.raises(ConfigError):
        fastload.stream(tmp_path / "absent.safetensors", dtype="complex64")


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="no float4 in this torch")
def test_packed_float4_target_is_a_config_error(every_float):
    with pytest.raises(ConfigError):
        fastload.load(every_float, dtype=torch.float4_e2m1fn_x2)


# -- with the other arguments --------------------------------------------------------------------------------------


def test_names_with_dtype_fetches_and_converts_only_those(every_float):
    ref = safetensors.torch.load_file(str(every_float))
    wanted = ["F64.bits", "BF16.special", "I32.v", "F16.scalar"]
    trace = fastload.Trace()
    got = fastload.load(every_float, dtype=torch.float16, names=wanted, config=SMALL, trace=trace)
    assert list(got) == wanted or set(got) == set(wanted)
    for name in wanted:
        assert_same(name, got[name], expected(ref[name], torch.float16), src_dtype_of(name))
    stored = sum(ref[n].numel() * ref[n].element_size() for n in wanted)
    counters = trace.summary().counters
    header = fastload.plan(every_float).files[0].data_start  # the 8-byte length and the JSON header
    assert counters["bytes_fetched"] - header == stored
    converted = sum(ref[n].numel() * ref[n].element_size() for n in wanted
                    if ref[n].dtype.is_floating_point and ref[n].dtype != torch.float16)
    assert counters.get("bytes_converted", 0) == converted


@pytest.mark.parametrize("dim,world,rank", [(0, 4, 1), (1, 3, 2), (-1, 8, 7), (1, 2, 0), (2, 5, 3)])
@pytest.mark.parametrize("target", [torch.bfloat16, torch.float32, torch.float8_e5m2, torch.float64],
                         ids=["bf16", "f32", "e5m2", "f64"])
def test_shard_with_dtype_is_the_converted_slice(shardable, dim, world, rank, target):
    ref = safetensors.torch.load_file(str(shardable))
    rules = {r"\.weight$": dim} if dim != 2 else {r"cube\.weight$": 2}
    shard = fastload.Shard(rank, world, rules)
    got = fastload.load(shardable, dtype=target, shard=shard, config=SMALL)
    for name, r in ref.items():
        d = shard.dim_for(name)
        sliced = r if d is None else r.tensor_split(world, d)[rank]
        assert_same(name, got[name], expected(sliced, target), r.dtype)
        assert_owns_memory(name, got[name])


def test_stream_with_dtype_hands_out_every_tensor_converted(unaligned):
    ref = safetensors.torch.load_file(str(unaligned))
    seen = {}
    with fastload.stream(unaligned, dtype=torch.bfloat16, config=SMALL) as s:
        for name, tensor in s:
            assert name not in seen
            seen[name] = tensor
    assert set(seen) == set(ref)
    for name, r in ref.items():
        assert_same(name, seen[name], expected(r, torch.bfloat16), src_dtype_of(name))
        assert_owns_memory(name, seen[name])


def test_smallest_host_buffer_budget_with_many_converted_chunks(every_float):
    """host_buffer_bytes = 2 chunks and 16 readers: every converted chunk waits for a staging buffer."""
    config = fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=128 * KiB, max_concurrency=16)
    ref = safetensors.torch.load_file(str(every_float))
    got = fastload.load(every_float, dtype=torch.float16, config=config)
    for name, r in ref.items():
        assert_same(name, got[name], expected(r, torch.float16), src_dtype_of(name))


def test_aload_with_dtype(unaligned):
    import asyncio

    ref = safetensors.torch.load_file(str(unaligned))
    got = asyncio.run(fastload.aload(unaligned, dtype="float16", config=SMALL))
    for name, r in ref.items():
        assert_same(name, got[name], expected(r, torch.float16), src_dtype_of(name))


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_sources_convert_bit_identically(unaligned, shardable, http_server, http_dir, engine):
    import shutil

    config = SMALL.replace(http_engine=engine) if hasattr(SMALL, "replace") else \
        fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=128 * KiB, max_concurrency=4, http_engine=engine)
    for path in (unaligned, shardable):
        shutil.copy(path, http_dir / path.name)
    url = http_server.url_for(http_dir / unaligned.name)
    ref = safetensors.torch.load_file(str(unaligned))
    got = fastload.load(url, dtype=torch.float16, config=config)
    for name, r in ref.items():
        assert_same(name, got[name], expected(r, torch.float16), src_dtype_of(name))
    # A dim-1 shard over HTTP: the rank's rows are staged as one span and converted out of it.
    url = http_server.url_for(http_dir / shardable.name)
    ref = safetensors.torch.load_file(str(shardable))
    shard = fastload.Shard(1, 3, {r"\.weight$": 1})
    got = fastload.load(url, dtype=torch.bfloat16, shard=shard, config=config)
    for name, r in ref.items():
        d = shard.dim_for(name)
        sliced = r if d is None else r.tensor_split(3, d)[1]
        assert_same(name, got[name], expected(sliced, torch.bfloat16), r.dtype)


def test_s3_source_converts_bit_identically(unaligned, serve):
    src = serve("s3", unaligned)
    ref = safetensors.torch.load_file(str(unaligned))
    got = fastload.load(src, dtype=torch.float32, config=SMALL)
    for name, r in ref.items():
        assert_same(name, got[name], expected(r, torch.float32), src_dtype_of(name))


def test_sharded_checkpoint_directory_converts_across_files(tmp_path):
    gen = torch.Generator().manual_seed(4)
    parts = [{"a": torch.randn(1000, generator=gen), "b": torch.randn(33, generator=gen).to(torch.float16)},
             {"c": torch.randn(7, 9, generator=gen, dtype=torch.float64), "n": torch.arange(4)}]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        safetensors.torch.save_file(part, str(tmp_path / fname))
        weight_map |= dict.fromkeys(part, fname)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    got = fastload.load(tmp_path, dtype="bfloat16")
    for part in parts:
        for name, r in part.items():
            assert_same(name, got[name], expected(r, torch.bfloat16), r.dtype)


# -- what the plan, progress and trace say ----------------------------------------------------------------------


def test_progress_reaches_its_total_with_conversion(unaligned):
    calls = []
    fastload.load(unaligned, dtype=torch.float64, config=SMALL, progress=lambda d, t: calls.append((d, t)))
    assert calls
    totals = {t for _, t in calls}
    assert len(totals) == 1
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == calls[-1][1]
    plan = fastload.plan(unaligned, config=SMALL)
    assert calls[-1][1] == plan.output_bytes


def test_plan_describes_stored_tensors_and_a_load_fetches_exactly_them(unaligned):
    plan = fastload.plan(unaligned, config=SMALL)
    ref = safetensors.torch.load_file(str(unaligned))
    by_name = {t["name"]: t for t in plan.to_dict()["tensors"]}
    for name, r in ref.items():
        assert by_name[name]["shape"] == list(r.shape)
    trace = fastload.Trace()
    fastload.load(unaligned, dtype=torch.float64, config=SMALL, trace=trace)
    header = plan.files[0].data_start  # the 8-byte length and the JSON header are fetched too
    assert trace.summary().counters["bytes_fetched"] == plan.total_bytes + header


def test_trace_counts_conversion_under_the_convert_stage(every_float):
    ref = safetensors.torch.load_file(str(every_float))
    trace = fastload.Trace()
    fastload.load(every_float, dtype=torch.float16, config=SMALL, trace=trace)
    summary = trace.summary()
    converted = sum(r.numel() * r.element_size() for r in ref.values()
                    if r.dtype.is_floating_point and r.dtype != torch.float16)
    assert summary.counters.get("bytes_converted") == converted
    assert summary.stages.get("convert", 0) > 0
    assert summary.exclusive.get("convert", 0) > 0
    assert summary.breakdown["convert"] > 0
    assert "convert" in summary.throughput
    assert "conversion" in summary.table()


def test_no_conversion_means_no_convert_stage(every_float):
    """Same dtype as stored: nothing is converted, so nothing is reported as conversion."""
    trace = fastload.Trace()
    fastload.load(every_float, dtype=torch.float32, names=["F32.bits", "F32.special"], config=SMALL, trace=trace)
    summary = trace.summary()
    assert summary.counters.get("bytes_converted", 0) == 0
    assert summary.stages.get("convert", 0) == 0
    assert summary.breakdown["convert"] == 0


def test_sharded_copy_without_dtype_is_not_reported_as_conversion(shardable):
    """A dim-1 shard picks rows out of a staged span: a copy, not a dtype conversion. The README's table puts
    conversion time under "conversion" only; this load converts nothing."""
    trace = fastload.Trace()
    fastload.load(shardable, shard=fastload.Shard(0, 4, {r"\.weight$": 1}), config=SMALL, trace=trace)
    summary = trace.summary()
    assert summary.counters.get("bytes_converted", 0) == 0
    assert summary.stages.get("convert", 0) == 0, summary.stages
    assert summary.breakdown["convert"] == 0, summary.breakdown


def test_mixed_chunk_counts_only_converted_bytes(tmp_path):
    """F32 and BF16 tensors coalesced into one chunk, dtype=bfloat16: only the F32 bytes are converted."""
    gen = torch.Generator().manual_seed(5)
    tensors = {"a": torch.randn(100, generator=gen), "b": torch.randn(100, generator=gen).to(torch.bfloat16),
               "c": torch.randn(3, generator=gen)}
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    trace = fastload.Trace()
    got = fastload.load(path, dtype=torch.bfloat16, trace=trace)
    for name, r in tensors.items():
        assert_same(name, got[name], r.to(torch.bfloat16), r.dtype)
    assert trace.summary().counters.get("bytes_converted") == 103 * 4


def test_conversion_results_do_not_alias_each_other_or_staging(unaligned):
    """Converted outputs are fresh tensors: writing one changes no other, and a second load does not change
    the first's results (no views into reused staging buffers)."""
    first = fastload.load(unaligned, dtype=torch.float32, config=SMALL)
    snapshot = {n: t.clone() for n, t in first.items()}
    ptrs = set()
    for name, t in first.items():
        if t.numel():
            assert t.data_ptr() not in ptrs, name
            ptrs.add(t.data_ptr())
    fastload.load(unaligned, dtype=torch.float32, config=SMALL)
    for name, t in first.items():
        assert torch.equal(flat_bits(t), flat_bits(snapshot[name])), name


def test_cli_load_rejects_integer_dtype_in_one_line(unaligned, capsys):
    from fastload.cli import main

    assert main(["load", str(unaligned), "--dtype", "int8"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "dtype" in err, err


def test_cli_load_with_float_dtype_reports_converted_tensors(unaligned, capsys):
    from fastload.cli import main

    assert main(["load", str(unaligned), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16" in out


def test_direct_io_with_conversion_is_bit_identical(tmp_path):
    """direct_io shares host_buffer_bytes between O_DIRECT scratch and the conversion staging pool."""
    import os

    gen = torch.Generator().manual_seed(6)
    tensors = {"a": torch.randn(3, generator=gen), "big": torch.randn(600_001, generator=gen),
               "h": torch.randn(777, generator=gen).half(), "i": torch.arange(5)}
    path = tmp_path / "d.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)  # this project's machines have O_DIRECT: else a failure
    os.close(fd)
    from checkpoints import evict

    evict(path)
    config = fastload.LoadConfig(direct_io=True, chunk_bytes=1 << 20, host_buffer_bytes=4 << 20)
    got = fastload.load(path, dtype=torch.bfloat16, config=config)
    for name, r in tensors.items():
        assert_same(name, got[name], expected(r, torch.bfloat16), r.dtype)


def test_empty_rank_share_with_dtype_is_an_empty_tensor_of_the_target_dtype(shardable):
    """world_size larger than the split dim: some ranks get zero rows, still in the requested dtype."""
    ref = safetensors.torch.load_file(str(shardable))
    shard = fastload.Shard(20, 24, {r"dbl\.weight$": 0})  # 17 rows over 24 ranks: rank 20 gets none
    got = fastload.load(shardable, dtype=torch.float16, shard=shard, names=["dbl.weight", "ids"])
    want = ref["dbl.weight"].tensor_split(24, 0)[20].to(torch.float16)
    assert want.shape == (0, 13)
    assert_same("dbl.weight", got["dbl.weight"], want)
    assert_same("ids", got["ids"], ref["ids"])


def test_leaving_a_converting_stream_early_leaves_no_worker_thread(every_float):
    import threading
    import time

    before = {t.ident for t in threading.enumerate()}
    with fastload.stream(every_float, dtype=torch.float64, config=SMALL) as s:
        for _name, _tensor in s:
            break
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not left:
            break
        time.sleep(0.05)
    assert not left, [t.name for t in left]


def test_concurrent_converting_loads_do_not_interfere(unaligned):
    from concurrent.futures import ThreadPoolExecutor

    ref = safetensors.torch.load_file(str(unaligned))
    targets = [torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda d: fastload.load(unaligned, dtype=d, config=SMALL), targets))
    for target, got in zip(targets, results):
        for name, r in ref.items():
            assert_same(name, got[name], expected(r, target), src_dtype_of(name))


def test_stream_plan_reports_stored_dtypes_while_tensors_arrive_converted(unaligned):
    with fastload.stream(unaligned, dtype="float16", config=SMALL) as s:
        items = list(s)
        plan = s.plan
    assert plan is not None
    stored = {t["name"]: t["dtype"] for t in plan.to_dict()["tensors"]}
    ref = safetensors.torch.load_file(str(unaligned))
    for name, tensor in items:
        assert stored[name] in _FLOAT_NAMES or stored[name] in ("U8", "BOOL", "I16")
        assert tensor.dtype == (torch.float16 if ref[name].dtype.is_floating_point else ref[name].dtype)


@pytest.mark.parametrize("shard_dim", [None, 1])
def test_large_unaligned_piece_converts_in_blocks(tmp_path, shard_dim):
    """A 3 MiB bf16 tensor at an odd offset (after a 3-byte u8 one) is converted through aligned blocks (1 MiB),
    not one clone of the whole piece: in one chunk whole, and as a dim-1 shard (many short strided rows)."""
    gen = torch.Generator().manual_seed(11)
    big = torch.randn(1024, 1536, generator=gen).to(torch.bfloat16)
    path = write_raw(tmp_path / "u.safetensors", [("pad", "U8", (3,), b"\x01\x02\x03"),
                                                  ("big", "BF16", tuple(big.shape), as_bytes(big))])
    config = fastload.LoadConfig(chunk_bytes=8 << 20)
    shard = None if shard_dim is None else fastload.Shard(1, 3, {"big": shard_dim})
    got = fastload.load(str(path), dtype=torch.float32, config=config, shard=shard)
    want = big.to(torch.float32) if shard is None else big.to(torch.float32).tensor_split(3, 1)[1]
    assert torch.equal(flat_bits(got["big"]), flat_bits(want.contiguous()))
    assert got["pad"].tolist() == [1, 2, 3]
