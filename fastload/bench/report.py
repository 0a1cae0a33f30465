"""Turn benchmark records into JSON lines, a Markdown table and a bar chart.

    from fastload.bench import report
    report.write(records, meta, out_dir, "bench")  # -> [bench.jsonl, bench.md, bench.png]
    print(report.markdown(records, meta))

matplotlib is optional: without it there is no PNG (and `write` says so on stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def markdown(records: list[dict], meta: dict) -> str:
    m = meta["machine"]
    lines = [
        f"# fastload benchmark ({meta['date']})", "",
        f"Checkpoint: {meta.get('checkpoint', '')} {meta['checkpoint_gb']:.2f} GB, {meta['shards']} shard(s), "
        + (f"{meta['timed_runs']} timed runs + 1 warm-up per loader, one child process per loader/source."
         if meta.get("rounds", 1) == 1 else
         f"{meta['timed_runs']} timed runs per loader in {meta['rounds']} rounds: each round runs every loader "
         f"of a row in turn, each in a fresh child (1 warm-up + {meta['timed_runs'] // meta['rounds']} timed runs)."),
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GiB RAM, Linux {m['kernel']}, "
        f"torch {m.get('torch', '?')}, git {m.get('git', '?')}.",
        f"1-min load average around the children: {meta.get('loadavg', '?')} "
        "(other work on the machine shows up here).",
        "Runs are made comparable: one untimed warm-up run per child; malloc keeps freed memory "
        "(MALLOC_MMAP_MAX_=0, no trim, no tcache/fastbins) and the heap is prefaulted before each "
        "timed run, so no run pays the host's slow re-touch of returned memory; minor faults are "
        "per timed run. \"First run\": the median warm-up run, a fresh process's first load (imports "
        "done), which pays first-touch page faults for its output memory. Peak RSS: VmHWM after the "
        "warm-up. Before each timed run, local warm rows check with mincore(2) that the files are in "
        "the page cache (a run that finds them not is flagged below), cold rows that eviction worked.",
        *([f"Cold rows wait {meta['cold_settle_s']:g} s after each eviction (untimed): the page cache then "
           "has to take memory the host has reclaimed."] if meta.get("cold_settle_s") else []),
        *([f"Command: `{meta['command']}`"] if meta.get("command") else []), "",
        "| row | loader | median s | GB/s | min–max s | first run s | × raw limit | × baseline "
        "| peak RSS MB | minor faults | CPU s | others' CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes, skipped, about = [], {}, {}
    for r in records:
        if "skipped" in r:
            if "loader" in r:  # one line per loader and reason, with the rows it covers
                skipped.setdefault((r["loader"], r["skipped"]), []).append(r["row"])
            else:
                notes.append(f"- **{r['row']}** skipped: {r['skipped']}")
            continue
        if r.get("note"):
            about[r["loader"]] = r["note"]
        tag = " (raw)" if r.get("is_raw") else " (baseline)" if r.get("is_baseline") else ""
        if "error" in r:
            lines.append(f"| {r['row']} | {r['loader']}{tag} | error | | | | | | | | | |")
            notes.append(f"- {r['row']} / {r['loader']}: {r['error']}")
            continue
        lines.append(
            f"| {r['row']} | {r['loader']}{tag} | {r['median_s']:.3f} | {r['gbps']:.2f} "
            f"| {r['min_s']:.3f}–{r['max_s']:.3f} | {_fmt(r.get('first_run_s'), '.3f')} "
            f"| {_fmt(r.get('ratio_raw'), '.2f')} "
            f"| {_fmt(r.get('ratio_baseline'), '.2f')} | {r['peak_rss_mb']:.0f} | {r['minflt']} "
            f"| {r['cpu_s']:.2f} | {r['others_cpu_s']:.2f} |")
        if r.get("quiet") is False:
            notes.append(f"- {r['row']} / {r['loader']}: machine still busy after "
                         f"{r['quiet_wait_s']:.0f}s wait ({r['busy_cores_before']:.1f} cores in use)")
        if ("evicted" in r and r["evicted"] is None) or ("cached" in r and r["cached"] is None):
            notes.append(f"- {r['row']} / {r['loader']}: cannot tell what is in the page cache (mincore(2) "
                         "answers only for files this process owns or may write)")
        elif "evicted" in r:
            notes.append(f"- {r['row']} / {r['loader']}: eviction "
                         f"{'worked' if r['evicted'] else 'DID NOT work'} (at most "
                         f"{100 * r['resident_after_evict_max']:.1f}% of pages still cached)")
        if r.get("cached") is False:
            notes.append(f"- {r['row']} / {r['loader']}: NOT WARM: a timed run found only "
                         f"{100 * r['resident_before_min']:.1f}% of the files' pages cached")
        trace = (r["runs"][-1].get("info") or {}).get("trace")
        if trace:
            notes.append(f"- {r['row']} / {r['loader']} trace (last run): {trace_line(trace)}")
    notes += [f"- {loader} skipped ({', '.join(rows)}): {why}" for (loader, why), rows in skipped.items()]
    notes += [f"- {loader}: {note}" for loader, note in about.items()]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


LABELS = {"io_wait": "I/O wait", "copy": "copy", "convert": "convert", "overhead": "overhead",
          "unattributed": "unattributed"}


def trace_line(trace: dict) -> str:
    """fastload's TraceSummary in one line: the time split, the bottleneck, chunk latency."""
    wall = trace.get("wall_s") or 0.0
    split = ", ".join(f"{LABELS.get(k, k)} {v:.3f}s ({100 * v / wall:.0f}%)" if wall else f"{k} {v:.3f}s"
                      for k, v in (trace.get("breakdown") or {}).items())
    parts = [f"wall {wall:.3f}s", split or ", ".join(f"{k} {v:.3f}s" for k, v in trace["stages"].items())]
    if trace.get("bottleneck"):
        parts.append(f"bottleneck {trace['bottleneck']}")
    lat = trace.get("chunk_latency") or {}
    if lat:
        parts.append(f"{trace.get('chunks', 0)} chunks, p50 {lat['p50'] * 1e3:.1f} ms, "
                     f"p99 {lat['p99'] * 1e3:.1f} ms")
    return "; ".join(p for p in parts if p)


META_KEYS = ("date", "machine", "checkpoint", "checkpoint_gb", "shards", "timed_runs", "rounds", "cold_settle_s",
             "command", "loadavg")


def meta_from(records: list[dict]) -> dict:
    """The run's metadata, which `suite.run` copies into every record."""
    return {k: records[0][k] for k in META_KEYS if k in records[0]} if records else {}


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def plot(records: list[dict], path: Path) -> bool:
    """Horizontal bars of median GB/s (min-max whiskers) per row and loader; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in records if "median_s" in r][::-1]
    if not ok:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(ok) + 1.2))
    colors = ["tab:orange" if r["loader"].startswith("fastload") else "tab:gray" if r.get("is_raw")
              else "tab:blue" for r in ok]
    err = [[r["gbps"] - r["gbps_min"] for r in ok], [r["gbps_max"] - r["gbps"] for r in ok]]
    ax.barh(range(len(ok)), [r["gbps"] for r in ok], xerr=err, color=colors, capsize=2)
    ax.set_yticks(range(len(ok)), [f"{r['row']}: {r['loader']}" for r in ok], fontsize=8)
    ax.set_xlabel("GB/s (median, min–max whiskers)")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return True


def write(records: list[dict], meta: dict, out_dir: Path, name: str) -> list[Path]:
    """Write NAME.jsonl (one record a line), NAME.md and, with matplotlib, NAME.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.jsonl", out_dir / f"{name}.md"]
    _write_text(paths[0], "".join(json.dumps(r) + "\n" for r in records))
    _write_text(paths[1], markdown(records, meta))
    if plot(records, out_dir / f"{name}.png"):
        paths.append(out_dir / f"{name}.png")
    elif any("median_s" in r for r in records):
        print("no PNG chart: matplotlib is not installed (pip install 'fastload[bench]')", file=sys.stderr)
    return paths
