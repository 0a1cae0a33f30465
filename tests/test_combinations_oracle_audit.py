"""Audit: load options combined the way users combine them, checked against the oracle.

``names=`` (subsets spanning files, duplicates), ``dtype=`` (float16/bfloat16/float32/float64, and a float8
target; integer, bool and complex tensors stay as stored) and ``shard=fastload.Shard(rank, world_size, rules)``
(dim 0, dim 1, the last dim, 1-D and zero-size tensors that match a rule, world sizes where ``tensor_split``
gives empty pieces), alone and together, over local paths, ``file://`` URLs, HTTP and S3, and over three layouts:
one file, an index with its shards, and a directory without an index (a list of URLs over HTTP, which cannot
list). The checkpoint holds the tricky dtypes (F8_E4M3, F8_E5M2, F8_E5M2FNUZ, F8_E8M0, BOOL, U16/U32/U64, C64)
in odd shapes, filled with random *bits*, so floats carry NaNs with payloads, signed NaNs, -0, infinities and
subnormals.

The expected result is always ``safetensors.torch.load_file`` + ``torch.tensor_split(...)[rank]`` +
``.to(dtype)`` for floating types, compared bit for bit (dtype, shape, bytes). Every tensor must be contiguous
and own its memory; ``fastload.plan`` with the same options must list the names, shapes and (stored) dtypes the
load returns, in the order it returns them; ``fastload.stream`` with the same options must hand out exactly the
same tensors; and the trace's ``bytes_fetched`` is never less than the result's bytes in stored dtype, never more
than the headers plus the planned spans, and for a dim-0 shard not more than the rank's rows plus the headers.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid

import botocore.session
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastload
from checkpoints import SAFETENSORS_DTYPES, write_sharded, write_single

KiB = 1 << 10
COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

TRANSPORTS = ["local", "file", "http", "s3"]
LAYOUTS = ["single", "index", "glob"]
TARGETS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# (name, safetensors dtype, shape): names group by prefix so that regex rules can pick families
ZOO: list[tuple[str, str, tuple[int, ...]]] = [
    ("embed.weight", "F32", (97, 301)),       # 116 KB: several 64 KiB chunks
    ("a.f64", "F64", (5, 3)),
    ("a.scalar", "F32", ()),
    ("a.bool", "BOOL", (6, 5)),
    ("a.f16vec", "F16", (1023,)),
    ("b.wide", "BF16", (3, 40001)),           # rows wider than a chunk
    ("b.e4m3", "F8_E4M3", (13, 11)),
    ("b.e5m2", "F8_E5M2", (7, 9, 5)),
    ("b.u16", "U16", (4, 0, 3)),              # zero-size in the middle
    ("b.u32", "U32", (11,)),
    ("c.u64", "U64", (3, 5)),
    ("c.f16", "F16", (301, 200)),             # 120 KB
    ("c.empty", "BF16", (0, 4)),
    ("c.one", "F16", (1,)),
    ("c.i8", "I8", (2, 257)),
    ("c.c64", "C64", (3, 2)),
    ("c.e8m0", "F8_E8M0", (5, 2)),
    ("c.fnuz", "F8_E5M2FNUZ", (9,)),
    ("d.i64", "I64", (0,)),
    ("d.f32", "F32", (2, 3, 1, 7)),
]
NAMES = [n for n, _, _ in ZOO]
SHAPES = {n: s for n, _, s in ZOO}
STORED = {n: getattr(torch, SAFETENSORS_DTYPES[d]) for n, d, _ in ZOO}

# bit patterns planted at the start of each float tensor (beyond what random bits give)
SPECIAL_BITS = {
    torch.float32: [0x7F800001, 0x7FC00001, 0xFFC12345, 0x7FBFFFFF, 0x80000000, 0x7F800000, 0x00000001, 0xFF800000],
    torch.float64: [0x7FF0000000000001, 0x7FF8000000000001, 0xFFF8DEADBEEF0001, 0x8000000000000000,
                    0x7FF0000000000000, 0x0000000000000001],
    torch.float16: [0x7C01, 0x7E01, 0xFE55, 0x7DFF, 0x8000, 0x7C00, 0x0001, 0xFC00],
    torch.bfloat16: [0x7F81, 0x7FC1, 0xFFD5, 0x7FBF, 0x8000, 0x7F80, 0x0001, 0xFF80],
}


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Every byte random (floats get NaN payloads, infinities, subnormals); bools are 0/1."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (math.prod(shape) * size,), generator=gen, dtype=torch.uint8)
    t = raw.view(dtype).reshape(shape)
    special = SPECIAL_BITS.get(dtype)
    if special and t.numel() >= len(special):
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[size]
        flat = t.reshape(-1).view(ints)
        for i, bits in enumerate(special):
            flat[i] = bits - (1 << (8 * size)) if bits >= 1 << (8 * size - 1) else bits
    return t


def zoo_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2024)
    return {name: random_bits(shape, STORED[name], gen) for name, _, shape in ZOO}


# -- the checkpoints, over every transport ------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, http_server, http_root, s3_server):
    """``{(transport, layout): source}``, plus the local files of each layout (for the oracle) under
    ``("files", layout)``, the index path under ``("index", "index")`` and the config under ``"config"`` (small
    chunks; one botocore session for every S3 load, as the README advises, or each load spends 50-600 ms making
    its client)."""
    tensors = zoo_tensors()
    root = tmp_path_factory.mktemp("zoo") / "a dir#1%20"  # a space, "#" and "%" in every URL
    root.mkdir()
    single = write_single(root / "single" / "model.safetensors", tensors, metadata={"format": "pt"})
    indexed = write_sharded(root / "index", tensors, 3, metadata={"format": "pt"})
    glob = root / "glob"
    glob.mkdir()
    parts = [NAMES[i::3] for i in range(3)]  # round robin: the files' order is not the tensors' order
    for letter, part in zip("cab", parts):
        write_single(glob / f"part-{letter}.safetensors", {n: tensors[n] for n in part})
    out: dict = {
        ("files", "single"): [single],
        ("files", "index"): sorted(indexed.glob("*.safetensors")),
        ("files", "glob"): sorted(glob.glob("*.safetensors")),
        ("index", "index"): indexed / "model.safetensors.index.json",
        "config": fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=256 * KiB, max_concurrency=4,
                                      s3=fastload.config.S3Options(session=botocore.session.get_session())),
    }
    out |= {("local", "single"): str(single), ("local", "index"): str(indexed), ("local", "glob"): str(glob)}
    out |= {("file", "single"): single.as_uri(), ("file", "index"): indexed.as_uri(),
            ("file", "glob"): glob.as_uri() + "/"}
    http_base = http_root / f"zoo-{uuid.uuid4().hex[:8]}" / root.name
    shutil.copytree(root, http_base)
    out |= {("http", "single"): http_server.url_for(http_base / "single" / "model.safetensors"),
            ("http", "index"): http_server.url_for(http_base / "index") + "/",
            ("http", "glob"): [http_server.url_for(p) for p in sorted((http_base / "glob").iterdir())]}
    bucket = f"zoo-{uuid.uuid4().hex[:8]}"
    s3_server.ensure_bucket(bucket)
    for layout in LAYOUTS:
        s3_server.upload_dir(bucket, f"ck pt/{layout}", root / layout)
    out |= {("s3", "single"): f"s3://{bucket}/ck pt/single/model.safetensors",
            ("s3", "index"): f"s3://{bucket}/ck pt/index/",
            ("s3", "glob"): f"s3://{bucket}/ck pt/glob"}  # no extension, no such object: the prefix
    return out


_FULL: dict[str, dict[str, torch.Tensor]] = {}


def full_of(zoo, layout: str) -> dict[str, torch.Tensor]:
    if layout not in _FULL:
        merged: dict[str, torch.Tensor] = {}
        for path in zoo[("files", layout)]:
            merged |= safetensors.torch.load_file(str(path))
        assert set(merged) == set(NAMES)
        _FULL[layout] = merged
    return _FULL[layout]


# -- the oracle and the checks ----------------------------------------------------------------------------


def rule_dim(shard, name: str) -> int | None:
    """The split dim the README gives ``name``: the first rule whose pattern ``re.search``-es it."""
    if shard is None:
        return None
    return next((dim for pattern, dim in shard.rules if re.search(pattern, name)), None)


def oracle(full: dict[str, torch.Tensor], *, names=None, shard=None, dtype=None, convert=True):
    """load_file + tensor_split(...)[rank] + .to(dtype) for floating types (``convert=False``: stored dtype)."""
    chosen = list(dict.fromkeys(names)) if names is not None else list(full)
    out = {}
    for name in chosen:
        t = full[name]
        dim = rule_dim(shard, name)
        if dim is not None:
            t = torch.tensor_split(t, shard.world_size, dim)[shard.rank]
        if convert and dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same_but_f16_nan_bits(t: torch.Tensor, w: torch.Tensor) -> bool:
    """Equal bit for bit except the bits of NaNs (still NaN in both)."""
    nan = w.isnan()
    return torch.equal(t.isnan(), nan) and torch.equal(t[~nan].view(torch.int32), w[~nan].view(torch.int32))


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str = "", *,
                stored: dict[str, torch.dtype] = STORED) -> None:
    """Bit for bit. A float16 -> float32 conversion's NaN bits are left out: torch itself gives them two ways
    (see ``test_float16_nans_converted_to_float32_stay_nans_and_the_rest_is_exact``)."""
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want)))
    pointers = set()
    for name, w in want.items():
        t = got[name]
        assert t.device.type == "cpu", (what, name)
        assert t.dtype == w.dtype and tuple(t.shape) == tuple(w.shape), (what, name, t.dtype, w.dtype, t.shape,
                                                                         w.shape)
        assert t.is_contiguous() and t.storage_offset() == 0, (what, name)
        assert t.untyped_storage().nbytes() == t.nbytes, (what, name, t.untyped_storage().nbytes(), t.nbytes)
        if t.nbytes:
            assert t.data_ptr() not in pointers, (what, name, "shares memory with another tensor")
            pointers.add(t.data_ptr())
        a, b = raw_bytes(t), raw_bytes(w)
        if a != b and stored.get(name) == torch.float16 and w.dtype == torch.float32 \
                and same_but_f16_nan_bits(t, w):
            continue
        if a != b:
            size = w.element_size()
            bad = sorted({i // size for i, (x, y) in enumerate(zip(a, b)) if x != y})
            show = [f"[{e}] {a[e * size:(e + 1) * size][::-1].hex()} != {b[e * size:(e + 1) * size][::-1].hex()}"
                    for e in bad[:4]]
            raise AssertionError(f"{what}: {name} ({w.dtype}, {list(w.shape)}) differs from the oracle in "
                                 f"{len(bad)} element(s) (got != want, hex): {', '.join(show)}")


def check_plan_matches(plan: fastload.LoadPlan, got: dict[str, torch.Tensor], dtype, what: str = "") -> None:
    """The plan lists what the load returned: same names in the same order, same shapes, the stored dtype
    (the result's, unless a floating tensor was converted)."""
    assert [t.name for t in plan.tensors] == list(got), (what, [t.name for t in plan.tensors], list(got))
    for t in plan.tensors:
        out = got[t.name]
        assert tuple(t.shape) == tuple(out.shape), (what, t.name, t.shape, out.shape)
        stored = getattr(torch, SAFETENSORS_DTYPES[t.spec.dtype.name])
        assert stored == STORED[t.name], (what, t.name, stored)
        assert out.dtype == (dtype if dtype is not None and stored.is_floating_point else stored), \
            (what, t.name, out.dtype, stored, dtype)
    assert plan.output_bytes == sum(math.prod(t.shape) * t.spec.dtype.itemsize for t in plan.tensors)


def header_bytes(zoo, transport: str, layout: str, plan: fastload.LoadPlan) -> int:
    """Bytes a load reads before any tensor byte: every file's 8-byte length + JSON header, and the index
    (with its 8-byte size probe over HTTP/S3)."""
    total = sum(f.data_start for f in plan.files)
    if layout == "index":
        total += zoo[("index", "index")].stat().st_size + (8 if transport in ("http", "s3") else 0)
    return total


def run_all(source, config, *, names=None, shard=None, dtype=None):
    """(load result, its trace summary, plan, stream result, stream's plan) with the same options."""
    plan = fastload.plan(source, names=names, shard=shard, config=config)
    trace = fastload.Trace()
    got = fastload.load(source, names=names, shard=shard, dtype=dtype, config=config, trace=trace)
    streamed: dict[str, torch.Tensor] = {}
    with fastload.stream(source, names=names, shard=shard, dtype=dtype, config=config) as s:
        for name, tensor in s:
            assert name not in streamed, f"stream handed out {name!r} twice"
            streamed[name] = tensor
        stream_plan = s.plan
    return got, trace.summary(), plan, streamed, stream_plan


def check_everything(zoo, transport, layout, *, names=None, shard=None, dtype=None) -> dict[str, torch.Tensor]:
    source = zoo[(transport, layout)]
    what = f"{transport}/{layout} names={names} shard={shard} dtype={dtype}"
    full = full_of(zoo, layout)
    want = oracle(full, names=names, shard=shard, dtype=dtype)
    got, summary, plan, streamed, stream_plan = run_all(source, zoo["config"], names=names, shard=shard,
                                                           dtype=dtype)
    assert_same(got, want, what + " [load]")
    assert_same(streamed, want, what + " [stream]")
    check_plan_matches(plan, got, dtype, what + " [plan]")
    assert stream_plan is not None and [t.name for t in stream_plan.tensors] == list(got), what
    # bytes: at least the result (stored dtype), at most the headers and the planned spans
    stored = oracle(full, names=names, shard=shard, convert=False)
    result_bytes = sum(t.nbytes for t in stored.values())
    assert plan.output_bytes == result_bytes, (what, plan.output_bytes, result_bytes)
    headers = header_bytes(zoo, transport, layout, plan)
    assert summary.bytes_fetched >= result_bytes, (what, summary.bytes_fetched, result_bytes)
    assert summary.bytes_fetched <= headers + plan.total_bytes, (what, summary.bytes_fetched, headers,
                                                                   plan.total_bytes)
    if shard is not None and all(rule_dim(shard, n) in (None, 0) for n in got):  # dim-0 (or whole) tensors only
        assert summary.bytes_fetched <= headers + result_bytes + 8 * len(plan.files), \
            (what, summary.bytes_fetched, headers, result_bytes)
    return got


# -- strategies ---------------------------------------------------------------------------------------------


@st.composite
def options(draw):
    names = None
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=8))  # duplicates allowed
    dtype = draw(st.sampled_from([None, None] + TARGETS))
    shard = None
    mode = draw(st.sampled_from(["none", "dim0", "mixed", "mixed"]))
    if mode != "none":
        world = draw(st.integers(1, 7))
        rank = draw(st.integers(0, world - 1))
        rules = []
        for name, _, shape in ZOO:
            if not shape or (names is not None and name not in names and draw(st.booleans())):
                continue  # scalars match no rule (that would be a ConfigError)
            dims = [None, 0] if mode == "dim0" else [None] + list(range(-len(shape), len(shape)))
            dim = draw(st.sampled_from(dims))
            if dim is not None:
                rules.append((f"^{re.escape(name)}$", dim))
        # families (every member has a dim 0 and a dim -1), before or after the single-tensor rules: first wins
        families = [(f"^{family}\\.", draw(st.sampled_from([0] if mode == "dim0" else [0, -1])))
                    for family in draw(st.lists(st.sampled_from("bcd"), unique=True, max_size=2))]
        rules = families + rules if draw(st.booleans()) else rules + families
        shard = fastload.Shard(rank, world, rules)
    return names, dtype, shard


@settings(max_examples=36, **COMMON)
@given(transport=st.sampled_from(TRANSPORTS), layout=st.sampled_from(LAYOUTS), opts=options())
def test_random_combinations_match_the_oracle(zoo, transport, layout, opts):
    names, dtype, shard = opts
    check_everything(zoo, transport, layout, names=names, shard=shard, dtype=dtype)


# -- tables ---------------------------------------------------------------------------------------------------


# every non-scalar tensor split on one dim; world 5 leaves empty pieces for dims of size < 5
TRICKY = ["a.bool", "b.e4m3", "b.e5m2", "b.u16", "b.u32", "c.u64", "c.i8", "c.c64", "c.e8m0", "c.fnuz", "a.f64",
          "c.empty", "d.i64", "d.f32", "c.one"]


def ranks(transport: str, world: int) -> list[int]:
    """Every rank; over S3 (moto answers slowly) the second and the last."""
    return [1, world - 1] if transport == "s3" else list(range(world))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_tricky_dtypes_every_rank_of_an_uneven_split(zoo, transport, dim):
    """Each rank of world 5 over the tricky dtypes, names spread over the three shard files, converted to
    bfloat16 (integers, bools and complex stay as stored); 1-D tensors are split on their only dim."""
    rules = [(f"^{re.escape(n)}$", dim if len(SHAPES[n]) > 1 else 0) for n in TRICKY]
    for rank in ranks(transport, 5):
        shard = fastload.Shard(rank, 5, rules)
        got = check_everything(zoo, transport, "index", names=TRICKY, shard=shard, dtype=torch.bfloat16)
        if rank >= 2:
            assert got["c.i8"].shape[0 if dim == 0 else -1] == (0 if dim == 0 else 257 // 5 + (rank < 257 % 5))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_dim0_shard_reads_only_the_rank_rows(zoo, transport, layout):
    """Every non-scalar tensor split on dim 0 (world 3), with a float16 conversion: the trace's bytes are the
    headers plus exactly the rank's rows."""
    rules = [(f"^{re.escape(n)}$", 0) for n in NAMES if SHAPES[n]]
    for rank in ranks(transport, 3):
        shard = fastload.Shard(rank, 3, rules)
        check_everything(zoo, transport, layout, shard=shard, dtype=torch.float16)


@pytest.mark.parametrize("transport", ["http", "s3"])
def test_names_whose_slices_are_all_empty_read_only_headers(zoo, transport):
    """Zero-size tensors and tensors whose rank piece is empty (world 7 on dims < 7), matched by rules,
    converted: nothing but headers is fetched, and each result is an empty tensor of the right dtype."""
    names = ["c.empty", "b.u16", "d.i64", "c.u64", "a.f64", "c.i8"]
    shard = fastload.Shard(6, 7, [(r"^c\.empty$", 1), (r"^b\.u16$", 2), (r"^d\.i64$", 0), (r"^c\.u64$", 0),
                                  (r"^a\.f64$", 1), (r"^c\.i8$", 0)])
    got = check_everything(zoo, transport, "index", names=names, shard=shard, dtype=torch.float64)
    assert all(t.numel() == 0 for t in got.values()), {n: t.shape for n, t in got.items()}
    assert got["a.f64"].dtype == torch.float64 and got["c.empty"].dtype == torch.float64
    plan = fastload.plan(zoo[(transport, "index")], names=names, shard=shard, config=zoo["config"])
    assert plan.total_bytes == 0 and plan.chunks == ()


@pytest.mark.parametrize("transport, target", [("local", torch.float8_e4m3fn), ("http", torch.float8_e5m2),
                                               ("s3", torch.float8_e8m0fnu), ("file", torch.float8_e4m3fnuz)])
def test_float8_target_with_names_and_last_dim_shard(zoo, transport, target):
    """A float8 target dtype is accepted (it is floating and torch converts to it); the result is the oracle's
    narrowed slice, wider floats included (NaN, infinities and overflow as torch maps them)."""
    names = ["embed.weight", "c.f16", "b.wide", "a.f64", "b.e5m2", "c.u64", "a.bool"]
    shard = fastload.Shard(1, 3, [(r"^(embed|c)\.", -1), (r"^b\.", 1)])
    check_everything(zoo, transport, "glob", names=names, shard=shard, dtype=target)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_names_as_any_iterable_give_checkpoint_order(zoo, transport):
    """``names`` as a set, a generator or a reversed tuple: the result is the same dict, in checkpoint order
    (the order of the plan), whatever order the names came in."""
    wanted = ["d.f32", "c.f16", "a.bool", "b.e4m3", "embed.weight"]
    shard = fastload.Shard(2, 4, {r"^c\.f16$": 1, r"^embed": 0, r"^d\.": 2})
    source = zoo[(transport, "index")]
    first = check_everything(zoo, transport, "index", names=wanted, shard=shard, dtype=torch.float32)
    for names in (set(wanted), (n for n in wanted), tuple(reversed(wanted))):
        got = fastload.load(source, names=names, shard=shard, dtype=torch.float32, config=zoo["config"])
        assert list(got) == list(first)
        assert_same(got, first, f"{transport} names as {type(names).__name__}")


def test_zoo_really_holds_what_the_audit_relies_on(zoo):
    """Guard: random bits gave NaNs with payloads (several distinct NaN bit patterns) in every float width,
    the special patterns were planted, and every layout holds the same tensors."""
    full = full_of(zoo, "single")
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}
    for name in ("embed.weight", "c.f16", "b.wide", "a.f64", "a.f16vec"):
        t = full[name]
        nan_bits = t[t.isnan()].view(ints[t.element_size()]).unique()
        assert t.isinf().any() and len(nan_bits) > 2, (name, nan_bits)
    assert full["a.scalar"].shape == () and full["b.u16"].numel() == 0
    for layout in ("index", "glob"):
        other = full_of(zoo, layout)
        assert all(raw_bytes(other[n]) == raw_bytes(full[n]) for n in NAMES), layout
    index = json.loads(zoo[("index", "index")].read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert os.path.basename(zoo[("files", "glob")][0]) == "part-a.safetensors"


@pytest.mark.parametrize("transport", ["local", "http"])
def test_float16_nans_converted_to_float32_stay_nans_and_the_rest_is_exact(tmp_path, http_server, http_dir, transport):
    """``dtype=float32`` over a float16 tensor of NaNs (signed, with payloads) that starts mid-chunk, as most
    tensors of a checkpoint do: every NaN stays a NaN and every other element is ``.to(float32)``'s bit for bit.
    A NaN's own bits are not comparable: torch converts float16 -> float32 two ways (vectorised: the payload
    kept and quieted, 0x7E01 -> 0x7FC02000; its scalar tail: 0x7FFFFFFF for every NaN, sign lost), so even the
    oracle's bits depend on where its vector loop ended (its last 3 elements here are 0x7FFFFFFF), and no
    piecewise conversion can match them all (README)."""
    patterns = torch.tensor([0x7C01, 0x7E01, 0xFE55, 0x7DFF, 0xFC01, 0x7FFF, 0xFE00, 0x7E00], dtype=torch.int32)
    w = patterns.repeat(70000 // 8).to(torch.int16).view(torch.float16)
    tensors = {"a.pad": torch.arange(1000, dtype=torch.float32),  # 4000 + 6006 bytes first: w starts mid-chunk
               "w": w, "v": torch.full((3, 1001), float("nan"), dtype=torch.float16)}
    path = write_single((http_dir if transport == "http" else tmp_path) / "nan16.safetensors", tensors)
    source = str(path) if transport == "local" else http_server.url_for(path)
    config = fastload.LoadConfig(chunk_bytes=64 * KiB, host_buffer_bytes=256 * KiB, max_concurrency=4)
    full = safetensors.torch.load_file(str(path))
    got = fastload.load(source, dtype=torch.float32, config=config)
    want = oracle(full, dtype=torch.float32)
    assert_same(got, want, f"{transport} f16 NaNs -> f32", stored={"w": torch.float16, "v": torch.float16})
    for name in ("w", "v"):
        assert torch.equal(got[name].isnan(), want[name].isnan()) and bool(got[name].isnan().all()), name
