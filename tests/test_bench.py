"""Smoke test of ``fastload bench``: one small real run through the CLI, its files and its skips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastload.cli import main

pytestmark = pytest.mark.timeout(120)


def test_bench_smoke(tmp_path, tmp_path_factory, monkeypatch, capsys):
    # Hide one optional loader the way an environment without it looks (None in sys.modules
    # makes importlib treat it as not installed); on a machine without it, this is a no-op.
    monkeypatch.setitem(sys.modules, "fastsafetensors", None)
    out = tmp_path / "out"
    work = tmp_path_factory.mktemp("bench-work")
    rc = main(["bench", "--synthetic", "48MiB", "--runs", "1", "--sources", "local-warm,http",
               "--loaders", "fastload,safetensors,fastsafetensors", "--out", str(out), "--work-dir", str(work),
               "--http-server", "python", "--quiet-wait", "0"])
    printed = capsys.readouterr().out
    assert rc == 0, printed

    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    measured = {(r["row"], r["loader"]): r for r in records if "median_s" in r}
    assert set(measured) == {("local-warm", "fastload"), ("local-warm", "safetensors"),
                             ("local-warm", "raw_readinto"), ("http-python", "fastload"), ("http-python", "curl"),
                             ("http-python", "download_then_load")}  # a row's baseline runs even if not asked for
    size = measured["local-warm", "fastload"]["bytes"]
    assert 45e6 < size < 60e6
    for (row, loader), r in measured.items():
        assert len(r["runs"]) == 2 and r["runs"][0]["warmup"] and not r["runs"][1]["warmup"]
        assert r["median_s"] > 0 and r["gbps"] == pytest.approx(size / r["median_s"] / 1e9)
        assert r["ratio_raw"] > 0, (row, loader)
        assert r["peak_rss_mb"] >= r["base_rss_mb"] > 50
        assert r["minflt"] >= 0 and isinstance(r["minflt"], int)
        assert 0.999 * size < r["runs"][1]["bytes"] <= size  # tensor bytes: the file less its headers
    assert measured["local-warm", "raw_readinto"]["ratio_raw"] == 1.0
    for (row, loader), r in measured.items():  # warm local runs checked that the files were cached
        assert r.get("cached") is (True if row == "local-warm" else None), (row, loader)
        if row == "local-warm":
            assert r["resident_before_min"] > 0.99 and "resident_before" in r["runs"][1]
    assert measured["local-warm", "safetensors"]["is_baseline"]
    for row in ("local-warm", "http-python"):
        trace = measured[row, "fastload"]["runs"][-1]["info"]["trace"]
        assert trace["bytes_fetched"] >= size - 4096 and trace["bottleneck"]
        assert sum(trace["breakdown"].values()) == pytest.approx(trace["wall_s"], rel=0.01)

    skipped = [r for r in records if "skipped" in r]
    assert [(r["row"], r["loader"]) for r in skipped] == [("local-warm", "fastsafetensors")]
    assert "fastsafetensors is not installed" in skipped[0]["skipped"]

    md = (out / "bench.md").read_text()
    assert "| local-warm | fastload |" in md and "| http-python | curl (raw) |" in md
    assert "fastsafetensors skipped (local-warm): fastsafetensors is not installed" in md
    assert "bottleneck" in md and "--synthetic 48MiB" in md and "1 timed runs + 1 warm-up" in md
    assert all(r["timed_runs"] == 1 and r["shards"] == 2 for r in records)
    assert md in printed


def test_bench_rounds_interleave_loaders_and_pool_their_runs(tmp_path, tmp_path_factory, capsys):
    out = tmp_path / "out"
    work = tmp_path_factory.mktemp("bench-work")
    rc = main(["bench", "--synthetic", "48MiB", "--runs", "1", "--rounds", "2", "--sources", "local-cold",
               "--loaders", "fastload_direct", "--out", str(out), "--work-dir", str(work), "--quiet-wait", "0",
               "--cold-settle", "0.2"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert [r["loader"] for r in records] == ["fastload_direct", "safetensors", "raw_readinto", "cat", "raw_direct"]
    for r in records:
        assert r["rounds"] == 2 and r["timed_runs"] == 2
        assert [(run["round"], run["warmup"]) for run in r["runs"]] == [(0, True), (0, False), (1, True), (1, False)]
        timed = sorted(run["wall_s"] for run in r["runs"] if not run["warmup"])
        assert r["median_s"] == pytest.approx(sum(timed) / 2) and r["min_s"] == timed[0]
    assert records[0]["ratio_raw"] > 0
    assert records[4]["is_raw"] and records[4]["runs"][-1]["bytes"] == sum(
        p.stat().st_size for p in (work / "llama-0.05GB").glob("*.safetensors"))
    trace = records[0]["runs"][-1]["info"]["trace"]
    assert trace["bytes_fetched"] > 45e6
    md = (out / "bench.md").read_text()
    assert "2 timed runs per loader in 2 rounds" in md and "--rounds 2" in md
    assert "wait 0.2 s after each eviction" in md and records[0]["cold_settle_s"] == 0.2
    assert "| local-cold | fastload_direct |" in md


def test_import_fastload_does_not_import_the_harness():
    code = ("import sys, fastload, fastload.cli; assert 'fastload.bench' not in sys.modules; "
            "import fastload.bench.suite, fastload.bench.others, fastload.bench.command; "
            "extras = {'runai_model_streamer', 'fastsafetensors', 'tensorizer', 'transformers', 'matplotlib', "
            "'boto3', 's3fs'}; print(sorted(extras & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_warm_run_that_finds_its_files_evicted_is_flagged():
    from fastload.bench.measure import summarize
    from fastload.bench.report import markdown

    runs = [{"warmup": i == 0, "wall_s": 0.5, "minflt": 1, "majflt": 0, "cpu_s": 0.1, "others_cpu_s": 0.0,
             "resident_before": frac} for i, frac in enumerate((0.0, 1.0, 0.62, 1.0))]
    stats = summarize(runs, 10**9)
    assert (stats["cached"], stats["resident_before_min"]) == (False, 0.62)  # the warm-up's 0.0 is not counted
    assert summarize(runs[:2], 10**9)["cached"] is True
    record = {"row": "local-warm", "loader": "fastload", "runs": runs, "peak_rss_mb": 100.0, "ratio_raw": 1.0,
              "ratio_baseline": None, "is_raw": False, "is_baseline": False, **stats}
    meta = {"date": "today", "checkpoint": "c", "checkpoint_gb": 1.0, "shards": 1, "timed_runs": 3, "rounds": 1,
            "machine": {"cpu": "x", "cores": 2, "mem_gb": 1, "kernel": "k"}}
    assert "local-warm / fastload: NOT WARM: a timed run found only 62.0% of the files' pages cached" in markdown(
        [record], meta)


def test_the_report_shows_each_loaders_first_run_in_a_fresh_process():
    from fastload.bench.measure import summarize
    from fastload.bench.report import markdown

    runs = [{"warmup": i == 0, "wall_s": w, "minflt": 1, "majflt": 0, "cpu_s": 0.1, "others_cpu_s": 0.0}
            for i, w in enumerate((1.75, 0.5, 0.5))]
    record = {"row": "local-cold", "loader": "fastload", "runs": runs, "peak_rss_mb": 100.0, "ratio_raw": 1.0,
              "ratio_baseline": None, "is_raw": False, "is_baseline": False, "first_run_s": 1.75,
              **summarize(runs, 10**9)}
    meta = {"date": "today", "checkpoint": "c", "checkpoint_gb": 1.0, "shards": 1, "timed_runs": 2, "rounds": 1,
            "machine": {"cpu": "x", "cores": 2, "mem_gb": 1, "kernel": "k"}}
    lines = markdown([record], meta).splitlines()
    header = next(ln for ln in lines if ln.startswith("| row |"))
    row = next(ln for ln in lines if ln.startswith("| local-cold |"))
    cells = dict(zip(header.split("|"), row.split("|")))
    assert cells[" first run s "].strip() == "1.750" and cells[" median s "].strip() == "0.500"


def test_merge_rounds_pools_runs_and_keeps_a_busy_rounds_warning():
    from fastload.bench.suite import merge_rounds

    def rec(walls, **extra):
        runs = [{"warmup": i == 0, "wall_s": w, "minflt": 1, "majflt": 0, "cpu_s": 0.1, "others_cpu_s": 0.0}
                for i, w in enumerate(walls)]
        return {"runs": runs, "child_s": 3.0, "loadavg_after": 1.0, "peak_rss_mb": extra.pop("rss", 100.0),
                "child_peak_rss_mb": 200.0, "first_run_s": walls[0], "bytes": 10**9, **extra}

    merged = merge_rounds([rec([2.0, 0.5, 0.7], quiet=True, quiet_wait_s=1.0, busy_cores_before=0.1),
                           rec([3.0, 0.9, 0.4], rss=150.0, quiet=False, quiet_wait_s=60.0, busy_cores_before=1.5)])
    assert [r["round"] for r in merged["runs"]] == [0, 0, 0, 1, 1, 1]
    assert merged["median_s"] == pytest.approx(0.6) and (merged["min_s"], merged["max_s"]) == (0.4, 0.9)
    assert merged["peak_rss_mb"] == 150.0 and merged["child_s"] == 6.0 and merged["first_run_s"] == 2.5
    assert (merged["quiet"], merged["busy_cores_before"]) == (False, 1.5)
    failed = {"error": "child exit 1: boom"}
    assert merge_rounds([rec([1.0, 0.5]), failed]) is failed


def test_touch_counts_every_tensor_and_spreads_the_pages_over_torchs_threads(monkeypatch):
    import threading

    import torch

    from fastload.bench import measure

    seen = set()
    real_sum = torch.Tensor.sum

    def spy(self, *args, **kwargs):
        seen.add(threading.get_ident())
        return real_sum(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "sum", spy)
    tensors = {f"t{i}": torch.ones(70_000 + i, dtype=torch.float32) for i in range(6)}
    tensors["empty"] = torch.zeros(0)
    tensors["int"] = torch.arange(3, dtype=torch.int64)
    assert measure.touch(tensors) == sum(t.numel() * t.element_size() for t in tensors.values())
    assert len(seen) == min(torch.get_num_threads(), 7)
    assert measure.touch({}) == 0 and measure.touch(123) == 123
