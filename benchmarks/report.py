"""Turn benchmark records into core.json, a Markdown table and a bar chart.

    from benchmarks import report
    report.write(records, meta, out_dir, "core")  # -> [core.json, core.md, core.png]
"""

from __future__ import annotations

import json
from pathlib import Path


def _fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def markdown(records: list[dict], meta: dict) -> str:
    m = meta["machine"]
    lines = [
        f"# fastload core benchmark ({meta['date']})", "",
        f"Checkpoint: {meta['checkpoint_gb']:.2f} GB bf16, {meta['shards']} shards, "
        f"{meta['runs']} timed runs + 1 warm-up per loader, one child process per loader/source.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gb']} GiB RAM, Linux {m['kernel']}, "
        f"torch {m.get('torch', '?')}, git {m.get('git', '?')}.",
        f"1-min load average around the children: {meta.get('loadavg', '?')} "
        "(other work on the machine shows up here).", "",
        "| row | loader | median s | GB/s | min–max s | × raw limit | × baseline "
        "| peak RSS MB | minor faults | CPU s | others' CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in records:
        if "skipped" in r:
            notes.append(f"- **{r['row']}** skipped: {r['skipped']}")
            continue
        tag = " (raw)" if r.get("is_raw") else " (baseline)" if r.get("is_baseline") else ""
        if "error" in r:
            lines.append(f"| {r['row']} | {r['loader']}{tag} | error | | | | | | | | |")
            notes.append(f"- {r['row']} / {r['loader']}: {r['error']}")
            continue
        lines.append(
            f"| {r['row']} | {r['loader']}{tag} | {r['median_s']:.3f} | {r['gbps']:.2f} "
            f"| {r['min_s']:.3f}–{r['max_s']:.3f} | {_fmt(r.get('ratio_raw'), '.2f')} "
            f"| {_fmt(r.get('ratio_baseline'), '.2f')} | {r['peak_rss_mb']:.0f} | {r['minflt']} "
            f"| {r['cpu_s']:.2f} | {r['others_cpu_s']:.2f} |")
        if r.get("quiet") is False:
            notes.append(f"- {r['row']} / {r['loader']}: machine still busy after "
                         f"{r['quiet_wait_s']:.0f}s wait ({r['busy_cores_before']:.1f} cores in use)")
        if "evicted" in r:
            notes.append(f"- {r['row']} / {r['loader']}: eviction "
                         f"{'worked' if r['evicted'] else 'DID NOT work'} (at most "
                         f"{100 * r['resident_after_evict_max']:.1f}% of pages still cached)")
        trace = (r["runs"][-1].get("info") or {}).get("trace")
        if trace and trace.get("stages"):
            st = ", ".join(f"{k} {v:.3f}s" for k, v in trace["stages"].items())
            notes.append(f"- {r['row']} / {r['loader']} trace (last run): {st}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
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
    colors = ["tab:orange" if r["loader"] == "fastload" else "tab:gray" if r.get("is_raw")
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
    """Write NAME.json (the records), NAME.md and, with matplotlib, NAME.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    _write_text(paths[0], json.dumps(records, indent=1))
    _write_text(paths[1], markdown(records, meta))
    if plot(records, out_dir / f"{name}.png"):
        paths.append(out_dir / f"{name}.png")
    return paths
