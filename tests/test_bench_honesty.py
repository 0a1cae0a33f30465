"""The benchmark harness (fastload/bench) is honest: what tests/test_bench.py does not cover.

Everything here is in-process and tiny (a few hundred KB of checkpoint); nothing runs `fastload bench`.
"""

from __future__ import annotations

import json
import os
import mmap
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.timeout(120)

TINY = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256, layers=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-shard Llama-shaped bf16 checkpoint (~150 KB) built by the harness, and its Source."""
    from fastload.bench.checkpoint import INDEX_NAME, LlamaShape, build
    from fastload.bench.loaders import Source

    ckpt = build(tmp_path_factory.mktemp("tiny-ckpt"), LlamaShape(**TINY))
    src = Source("local", str(ckpt.dir) + "/", list(ckpt.shards), ckpt.total_bytes, INDEX_NAME, has_config=True)
    return ckpt, src


def reference(ckpt) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict = {}
    for p in ckpt.files:
        out.update({k: v.clone() for k, v in load_file(p).items()})
    return out


def assert_same(got: dict, want: dict) -> None:
    assert list(sorted(got)) == list(sorted(want)), set(got) ^ set(want)
    for k, w in want.items():
        g = got[k]
        assert (g.shape, g.dtype, g.device.type) == (w.shape, w.dtype, "cpu"), k
        assert torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), k


# --- 1. the harness never checks what a loader returned ------------------------------------------------------

def run_child(tmp_path: Path, monkeypatch, source, fake) -> dict:
    """measure.child_main in this process (warm-up + 1 timed run), with `fake` as the loader."""
    from fastload.bench import loaders, measure

    monkeypatch.setattr(loaders, "get", lambda name: fake)
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"loader": "safetensors", "source": asdict(source), "runs": 1, "warmup": 1,
                                "cold": False, "prefault_bytes": 0}))
    measure.child_main(str(spec), str(result))
    return json.loads(result.read_text())


def _partial(ref):      # half the tensors: half the work
    names = sorted(ref)
    return {k: ref[k].clone() for k in names[: len(names) // 2]}


def _wrong_dtype(ref):  # every tensor as raw bytes: right names and byte count, wrong dtypes and shapes
    return {k: v.clone().view(-1).view(torch.uint8) for k, v in ref.items()}


def _no_read(ref):      # right names, shapes, dtypes and byte count; nothing read from the files at all
    return {k: torch.empty(v.shape, dtype=v.dtype) for k, v in ref.items()}


@pytest.mark.parametrize("make", [_partial, _wrong_dtype, _no_read], ids=["partial", "wrong-dtype", "reads-nothing"])
def test_the_harness_refuses_a_loader_that_returns_wrong_tensors(tiny, tmp_path, monkeypatch, make):
    """GB/s is the checkpoint's file bytes over the time, whatever came back: so every run's result is
    checked (untimed) against the shards, and a loader that returned partial, mistyped or unread tensors
    is an error, not a fast run."""
    ckpt, src = tiny
    ref = reference(ckpt)
    with pytest.raises(RuntimeError, match="result check"):
        run_child(tmp_path, monkeypatch, src, lambda source, info: make(ref))


def test_touch_refuses_meta_tensors():
    """A 'meta' tensor holds no data (what from_pretrained leaves for a weight it did not load): touch()
    must not credit it as loaded bytes, as it does device memory."""
    from fastload.bench.measure import touch

    with pytest.raises(RuntimeError, match="meta tensor"):
        touch({"w": torch.empty(1 << 20, device="meta")})


# --- 2. what the harness's own loaders return, checked here independently of check_result ----------------

TENSOR_LOADERS = ["fastload", "fastload_direct", "safetensors", "fastload_from_pretrained", "transformers",
                  "runai", "fastsafetensors"]


@pytest.mark.parametrize("name", TENSOR_LOADERS)
def test_each_loader_returns_exactly_the_checkpoints_tensors(tiny, name):
    from fastload.bench.loaders import get, missing, registry

    assert missing(registry()[name]) is None  # a test dependency (pyproject's test extra)
    ckpt, src = tiny
    info: dict = {}
    assert_same(get(name)(src, info), reference(ckpt))


def test_tensorizer_loader_returns_the_checkpoints_tensors(tiny, tmp_path):
    from dataclasses import replace

    from fastload.bench.loaders import get, missing, registry
    from fastload.bench.others import ensure_tensorizer_copy

    assert missing(registry()["tensorizer"]) is None  # a test dependency (pyproject's test extra)
    ckpt, src = tiny
    copy = ensure_tensorizer_copy(ckpt.files, tmp_path / "tz" / "model.tensors", timeout=100)
    assert_same(get("tensorizer")(replace(src, tensorizer=str(copy)), {}), reference(ckpt))


def test_raw_limits_move_every_byte_of_the_files(tiny):
    from fastload.bench.loaders import get
    from fastload.bench.measure import touch

    ckpt, src = tiny
    buf = get("raw_readinto")(src, {})["buffer"]
    assert bytes(buf.numpy()) == b"".join(p.read_bytes() for p in ckpt.files)
    assert touch({"buffer": buf}) == src.total_bytes
    assert touch(get("cat")(src, {})) == src.total_bytes


def test_a_mixed_checkpoint_with_empty_and_scalar_tensors_loads_the_same_everywhere(tmp_path):
    """Zero-size, 0-d and odd-sized tensors of several dtypes, one shard, no index: what the harness loads
    (local_target's Source) and what touch() counts must match the file."""
    from safetensors.torch import load_file, save_file

    from fastload.bench.loaders import get
    from fastload.bench.measure import touch
    from fastload.bench.suite import local_target

    tensors = {"a.f32": torch.randn(3, 5), "b.empty": torch.zeros(0, 7, dtype=torch.float16),
               "c.scalar": torch.tensor(7, dtype=torch.int64), "d.u8": torch.arange(13, dtype=torch.uint8),
               "e.bf16": torch.randn(4097, dtype=torch.bfloat16), "f.bool": torch.tensor([True, False, True])}
    save_file(tensors, tmp_path / "model.safetensors")
    src = local_target(tmp_path).source
    want = load_file(tmp_path / "model.safetensors")
    nbytes = sum(t.numel() * t.element_size() for t in want.values())
    for name in ("fastload", "safetensors"):
        got = get(name)(src, {})
        assert_same(got, want)
        assert touch(got) == nbytes, name


# --- 3. touch(): every page of every kind of result -------------------------------------------------------

def _resident_pages(addr: int, size: int) -> list[int]:
    import ctypes

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    start = addr - addr % mmap.PAGESIZE
    n = (addr + size - start + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = np.zeros(n, dtype=np.uint8)
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(n * mmap.PAGESIZE),
                        ctypes.c_void_p(vec.ctypes.data)) == 0, ctypes.get_errno()
    return [int(x) & 1 for x in vec]


@pytest.mark.parametrize("offset,length", [(0, 16 * 4096), (100, 16 * 4096), (4095, 3 * 4096 + 2), (17, 50)])
def test_touch_faults_in_every_page_of_a_lazily_mapped_view(offset, length):
    """A view into fresh anonymous memory at an unaligned offset: after touch() every page it spans is mapped
    (one byte per 4 KiB from its start plus its last byte reaches them all), and nothing is copied."""
    import numpy as np

    m = mmap.mmap(-1, 32 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = np.frombuffer(m, dtype=np.uint8)
    t = torch.from_numpy(base)[offset: offset + length]
    addr = t.data_ptr()
    assert not any(_resident_pages(addr, length))  # nothing touched yet
    from fastload.bench.measure import touch

    assert touch({"v": t}) == length
    assert all(_resident_pages(addr, length))
    del t, base
    m.close()


def test_touch_counts_views_noncontiguous_and_odd_dtypes_by_their_logical_bytes():
    from fastload.bench.measure import touch

    big = torch.arange(4096 * 3, dtype=torch.float32).reshape(96, 128)
    cases = {
        "transposed": big.t(),                     # non-contiguous: copied, then touched
        "strided": big[:, ::2],
        "narrow": big[10:20],                      # a view with a storage offset
        "empty_noncontig": big[:, :0],
        "scalar": torch.tensor(3.5),
        "bool": torch.ones(5000, dtype=torch.bool),
        "complex": torch.ones(1000, dtype=torch.complex64),
        "f8": torch.zeros(5000, dtype=torch.float8_e4m3fn),
    }
    want = {k: v.numel() * v.element_size() for k, v in cases.items()}
    for k, v in cases.items():
        assert touch({k: v}) == want[k], k
    assert touch(cases) == sum(want.values())


# --- 4. medians, ratios and merging with failures, skips, one run, a failed raw limit -----------------------

FAST, BASE, RAW, RAW1, RAW2 = "fastload", "safetensors", "raw_readinto", "raw_readinto", "cat"


def _record(loader: str, walls: list[float], **extra) -> dict:
    from fastload.bench.measure import summarize

    runs = [{"warmup": i == 0, "wall_s": w, "minflt": 3, "majflt": 0, "cpu_s": 0.1, "others_cpu_s": 0.0,
             "bytes": 10**9} for i, w in enumerate(walls)]
    return {"loader": loader, "runs": runs, "child_s": 1.0, "loadavg_before": 0.1, "loadavg_after": 0.2,
            "peak_rss_mb": 300.0, "child_peak_rss_mb": 400.0, "base_rss_mb": 200.0, "first_run_s": walls[0],
            "bytes": 10**9, **summarize(runs, 10**9), **extra}


def _run_row(monkeypatch, loaders, raw, baseline, results, skip=(), rounds=1):
    """suite.run_row with measure() and the skip check replaced: `results[name]` is a list of per-round records."""
    from fastload.bench import suite
    from fastload.bench.loaders import Source

    calls: dict[str, int] = {}

    def fake_measure(name, src, **kw):
        i = calls[name] = calls.get(name, -1) + 1
        return results[name][i]

    monkeypatch.setattr(suite, "measure", fake_measure)
    monkeypatch.setattr(suite, "_skip_reason", lambda name, row: "not here" if name in skip else None)
    src = Source("local", "/nowhere/", ["a.safetensors"], 10**9)
    row = suite.Row("local-warm", src, tuple(loaders), tuple(raw), baseline)
    return {r["loader"]: r for r in suite.run_row(row, suite.Options(rounds=rounds, quiet_wait_s=0))}


def test_ratios_use_the_best_raw_limit_and_the_baseline(monkeypatch):
    recs = _run_row(monkeypatch, [FAST, BASE, RAW1, RAW2], [RAW1, RAW2], BASE,
                    {FAST: [_record(FAST, [9, 0.5])], BASE: [_record(BASE, [9, 2.0, 1.0, 1.5])],
                     RAW1: [_record(RAW1, [9, 0.4])], RAW2: [_record(RAW2, [9, 0.25])]})
    assert recs[BASE]["median_s"] == 1.5 and (recs[BASE]["min_s"], recs[BASE]["max_s"]) == (1.0, 2.0)
    assert recs[FAST]["ratio_raw"] == pytest.approx(0.25 / 0.5)
    assert recs[FAST]["ratio_baseline"] == pytest.approx(1.5 / 0.5)
    assert recs[RAW2]["ratio_raw"] == 1.0 and recs[RAW1]["ratio_raw"] == pytest.approx(0.25 / 0.4)
    assert recs[FAST]["gbps"] == pytest.approx(2.0) and recs[FAST]["gbps_min"] == recs[FAST]["gbps_max"]


def test_a_failed_raw_limit_and_a_skipped_baseline_leave_no_ratio_and_the_report_says_so(monkeypatch):
    from fastload.bench.report import markdown

    failed = {"loader": RAW, "error": "child exit 1: OSError: boom"}
    recs = _run_row(monkeypatch, [FAST, BASE, RAW], [RAW], BASE,
                    {FAST: [_record(FAST, [9, 0.5])], RAW: [failed]}, skip={BASE})
    assert recs[FAST]["ratio_raw"] is None and recs[FAST]["ratio_baseline"] is None
    assert recs[BASE]["skipped"] == "not here" and "median_s" not in recs[RAW]
    meta = {"date": "d", "checkpoint": "c", "checkpoint_gb": 1.0, "shards": 1, "timed_runs": 1, "rounds": 1,
            "machine": {"cpu": "x", "cores": 2, "mem_gb": 1, "kernel": "k"}}
    md = markdown(list(recs.values()), meta)
    assert "| local-warm | fastload | 0.500 | 2.00 | 0.500–0.500 | 9.000 | – | – |" in md
    assert "| local-warm | raw_readinto (raw) | error |" in md and "local-warm / raw_readinto: child exit 1: OSError: boom" in md
    assert "safetensors skipped (local-warm): not here" in md


def test_rounds_pool_runs_and_one_failed_round_fails_the_loader(monkeypatch):
    recs = _run_row(monkeypatch, [FAST, RAW], [RAW], BASE,
                    {FAST: [_record(FAST, [9, 1.0]), _record(FAST, [8, 3.0]), _record(FAST, [7, 2.0])],
                     RAW: [_record(RAW, [9, 1.0]), {"loader": RAW, "error": "child exit timeout: x"},
                             _record(RAW, [9, 1.0])]}, rounds=3)
    fast = recs[FAST]
    assert (fast["median_s"], fast["min_s"], fast["max_s"], fast["first_run_s"]) == (2.0, 1.0, 3.0, 8)
    assert [r["round"] for r in fast["runs"]] == [0, 0, 1, 1, 2, 2] and fast["rounds"] == 3
    assert "error" in recs[RAW] and fast["ratio_raw"] is None


def test_cli_output_files_agree_with_each_other(tmp_path, monkeypatch):
    """report.write from suite-shaped records: every jsonl number appears, rounded, in the md row."""
    from fastload.bench import report

    recs = _run_row(monkeypatch, [FAST, BASE, RAW], [RAW], BASE,
                    {FAST: [_record(FAST, [0.9, 0.123456, 0.2])], BASE: [_record(BASE, [1, 0.3, 0.5])],
                     RAW: [_record(RAW, [1, 0.1, 0.1])]})
    meta = {"date": "d", "checkpoint": "c", "checkpoint_gb": 1.0, "shards": 1, "timed_runs": 2, "rounds": 1,
            "machine": {"cpu": "x", "cores": 2, "mem_gb": 1, "kernel": "k"}}
    records = [{**r, **meta} for r in recs.values()]
    report.write(records, meta, tmp_path, "b")
    lines = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    md = (tmp_path / "b.md").read_text()
    assert report.meta_from(lines)["timed_runs"] == 2
    for r in lines:
        tag = " (raw)" if r["is_raw"] else " (baseline)" if r["is_baseline"] else ""
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| local-warm | {r['loader']}{tag} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2:8] == [f"{r['median_s']:.3f}", f"{r['gbps']:.2f}", f"{r['min_s']:.3f}–{r['max_s']:.3f}",
                              f"{r['first_run_s']:.3f}", f"{r['ratio_raw']:.2f}", f"{r['ratio_baseline']:.2f}"]


# --- 5. a real checkpoint given as SOURCE: do all loaders of a row load what the GB/s counts? ----------------

def _tensor_bytes(paths) -> int:
    from safetensors import safe_open

    total = 0
    for p in paths:
        with safe_open(p, "pt") as f:
            for k in f.keys():
                s = f.get_slice(k)
                total += torch.empty(0, dtype=getattr(torch, {"BF16": "bfloat16", "F32": "float32",
                                                              "F16": "float16"}[s.get_dtype()])
                                     ).element_size() * int(torch.tensor(s.get_shape()).prod())
    return total


@pytest.mark.parametrize("layout", ["one-shard-file", "dir-without-index"])
def test_every_loader_of_a_row_loads_the_bytes_the_gbps_counts(tiny, tmp_path, layout):
    """suite.local_target: SOURCE = one shard file of a model dir keeps has_config=True (config.json of the
    parent), so `transformers` and `fastload_from_pretrained` load the whole directory (source.root) while
    GB/s counts only that file: 2x the work credited with 1x the bytes. With a directory without an index
    (e.g. model.safetensors next to a consolidated.safetensors, as some repos ship), shards = every
    *.safetensors and GB/s counts both files, but fastload.load(dir) reads only one of them (its trace:
    bytes_fetched = half) and so do transformers/from_pretrained, while safetensors and raw_readinto read both:
    fastload is reported 2x as fast as it was. Every loader of a row must load what Source.shards hold (or be
    skipped). (safetensors shows up in this case too: its dict merges the duplicate names.)"""
    import shutil

    from safetensors.torch import save_file

    from fastload.bench.loaders import get
    from fastload.bench.suite import _skip_reason, local_target, make_row

    ckpt, _ = tiny
    if layout == "one-shard-file":
        target = local_target(ckpt.files[0])
    else:
        d = tmp_path / "model"
        d.mkdir()
        shutil.copy(ckpt.dir / "config.json", d / "config.json")
        save_file(reference(ckpt), d / "model.safetensors")
        shutil.copy(d / "model.safetensors", d / "consolidated.safetensors")
        target = local_target(d)
    src = target.source
    want = _tensor_bytes(src.local_paths())
    row = make_row("local-warm", src, "local")
    wrong = {}
    for name in ("fastload", "safetensors", "transformers", "fastload_from_pretrained"):
        if _skip_reason(name, row):
            continue
        try:
            got = sum(t.numel() * t.element_size() for t in get(name)(src, {}).values())
        except Exception as exc:  # noqa: BLE001
            wrong[name] = f"fails: {type(exc).__name__}: {str(exc)[:120]}"
            continue
        if got != want:
            wrong[name] = f"{got} bytes of tensors for {want} in Source.shards {src.shards}"
    assert not wrong, wrong


# --- 6. the page-cache checks -------------------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to drop to another uid")
def test_resident_fraction_of_a_file_the_process_does_not_own():
    """measure.resident_fraction asks mincore(2), which since Linux 5.0 reports every page of a file the
    process neither owns nor may write as cached. For a checkpoint in a shared read-only model dir it must
    say it cannot tell (None), not 1.0: a cold row would say "eviction DID NOT work" and a warm row could
    never be flagged NOT WARM."""
    import shutil
    import subprocess
    import sys
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="bench-ro-", dir="/tmp"))  # not pytest's 0700 dirs: nobody must reach it
    os.chmod(d, 0o755)
    p = d / "f.bin"
    p.write_bytes(os.urandom(1 << 21))
    os.chmod(p, 0o644)
    code = ("import os, sys; from pathlib import Path; import numpy, fastload.sources.local; "
            "from fastload.bench.measure import evict, resident_fraction; "
            "os.setgid(65534); os.setuid(65534); p = [Path(sys.argv[1])]; os.sync(); evict(p)\n"
            "print(resident_fraction(p))")
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=60,
                         cwd=str(Path(__file__).resolve().parents[1]))
    from fastload.bench.measure import resident_fraction

    try:
        assert out.returncode == 0, out.stderr
        assert resident_fraction([p]) < 0.01  # evicted: root's own mincore says so
    finally:
        shutil.rmtree(d)
    assert out.stdout.strip() == "None", f"a non-owner was told {out.stdout.strip()} of the evicted file is cached"
