"""Audit of session 13's changes, at their edges:

1. ``pull`` refuses a source whose shard index (any ``*.safetensors.index.json``, nested folders included) names a
   shard the source lacks, before anything is written (``pull._check_shards``);
2. ``from_pretrained`` asks for config.json, generation_config.json and the standard weights names at once
   (``integrations/transformers._stage``);
3. ``DaemonThreadPool`` marks its worker idle before the job's result is handed out.

Real files, the fixtures' HTTP / S3 / Hub servers and real subprocesses; nothing inside fastload is mocked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError, wait
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastload
from fastload import LoadConfig, RetryConfig
from fastload.pull import apull
from fastload.runner import DaemonThreadPool, run
from hub_server import HubServer, hub, hub_session, repo_name  # noqa: F401 -- fixtures
from reliability_helpers import Leaks, assert_bit_exact

pytestmark = pytest.mark.filterwarnings("ignore")

SMALL = LoadConfig(chunk_bytes=256 << 10, max_concurrency=4)
QUICK = LoadConfig(retry=RetryConfig(max_attempts=3, backoff_base_s=0.02, backoff_max_s=0.1))


def pull_result(source, **kwargs):
    return run(lambda: apull(source, **{"config": SMALL, **kwargs}))


def write_indexed(directory: Path, shards: list[str], index_name: str = "model.safetensors.index.json",
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """``len(shards)`` small shard files and an index naming them; returns every tensor."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, tensors = {}, {}
    for i, shard in enumerate(shards):
        name = f"layer{i}.weight"
        tensors[name] = torch.arange(64, dtype=torch.float32).reshape(8, 8) * (i + 1) + seed
        save_file({name: tensors[name]}, str(directory / shard))
        weight_map[name] = shard
    (directory / index_name).write_text(json.dumps({"metadata": {"total_size": 256 * len(shards)},
                                                    "weight_map": weight_map}))
    return tensors


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (the pull's own records included): size and mtime."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _python(args: list[str], timeout: float = 90.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)


# == 1. pull: an index naming a shard the source lacks ==========================================================


def diffusers_like(root: Path) -> Path:
    """A diffusers-style folder: sharded text encoder and unet (its own index name), a variant index at the top."""
    write_indexed(root / "text_encoder", ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    write_indexed(root / "unet", ["diffusion_pytorch_model-00001-of-00002.safetensors",
                                  "diffusion_pytorch_model-00002-of-00002.safetensors"],
                  "diffusion_pytorch_model.safetensors.index.json")
    write_indexed(root, ["model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors"],
                  "model.fp16.safetensors.index.json")
    (root / "model_index.json").write_text("{}")
    return root


@pytest.mark.parametrize("where, missing", [("local", "text_encoder/model-00002-of-00002.safetensors"),
                                            ("local", "unet/diffusion_pytorch_model-00001-of-00002.safetensors"),
                                            ("local", "model.fp16-00002-of-00002.safetensors"),
                                            ("s3", "text_encoder/model-00002-of-00002.safetensors"),
                                            ("s3", "model.fp16-00002-of-00002.safetensors")])
def test_nested_and_variant_indexes_lacking_a_shard_are_refused_before_anything_is_written(
        tmp_path: Path, request: pytest.FixtureRequest, where: str, missing: str) -> None:
    src = diffusers_like(tmp_path / "pipe")
    (src / missing).unlink()
    if where == "local":
        url = str(src)
    else:
        s3, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        s3.upload_dir(bucket, "pipe", src)
        url = f"s3://{bucket}/pipe/"
    out = tmp_path / "out"
    folder, _, name = missing.rpartition("/")
    with pytest.raises(fastload.SourceNotFoundError) as caught:
        pull_result(url, to=out)
    assert f"names 1 shard file(s) the source lacks: {name!r}" in str(caught.value)
    assert caught.value.url.endswith(missing), caught.value.url  # the missing shard, in its folder
    assert not out.exists()
    # the control: whole again, the same pull goes through and every index loads from the pulled folder
    diffusers_like(tmp_path / "whole")
    shutil.copy(tmp_path / "whole" / missing, src / missing)
    if where == "s3":
        s3.upload_dir(bucket, "pipe", src)
    pull_result(url, to=out)
    for sub in ("text_encoder", "unet"):
        assert_bit_exact(fastload.load(out / sub), fastload.load(tmp_path / "whole" / sub))
    assert_bit_exact(fastload.load(out / "model.fp16.safetensors.index.json"),
                     fastload.load(tmp_path / "whole" / "model.fp16.safetensors.index.json"))


def test_an_index_naming_a_hidden_shard_the_source_has_is_pulled_not_refused(tmp_path: Path) -> None:
    """Hidden files are skipped by a pull, but one that an index names is part of the checkpoint: the source loads
    (``fastload.load`` reads it), and a pull that says "the source lacks" it is wrong -- the source has it.
    ``_check_shards`` is given the entries after ``_skip_other_formats`` dropped the hidden ones."""
    src = tmp_path / "src"
    want = write_indexed(src, [".shard-a.safetensors", "shard-b.safetensors"])
    assert_bit_exact(fastload.load(src), want)  # the source itself is a good checkpoint
    out = tmp_path / "out"
    pull_result(str(src), to=out)
    assert_bit_exact(fastload.load(out), want)


@pytest.mark.parametrize("index", ["malformed", "huge", "escapes"])
def test_an_unusable_nested_index_fails_the_pull_before_anything_is_written(tmp_path: Path, index: str) -> None:
    """What error, and nothing written (no destination folder, no lock, no records)."""
    src = tmp_path / "src"
    write_indexed(src, ["model-00001-of-00001.safetensors"])
    bad = src / "sub" / "model.safetensors.index.json"
    bad.parent.mkdir()
    if index == "malformed":
        bad.write_text('{"weight_map": {"a": ')
        match = "invalid JSON"
    elif index == "huge":
        with open(bad, "wb") as f:  # sparse: only its size is looked at
            f.truncate((64 << 20) + 1)
        match = "larger than the"
    else:
        bad.write_text(json.dumps({"weight_map": {"layer0.weight": "../model-00001-of-00001.safetensors"}}))
        match = "escapes the checkpoint directory"
    out = tmp_path / "out"
    with pytest.raises(fastload.FormatError, match=match) as caught:
        pull_result(str(src), to=out)
    assert str(bad) in str(caught.value)
    assert not out.exists()


def test_a_refused_pull_leaves_an_earlier_complete_pull_as_it_was(tmp_path: Path) -> None:
    """Pulled whole, then the source loses a shard: the next pull (plain, and with ``verify``) is refused and
    touches nothing of the earlier one (no file pruned, no record rewritten). Whole again: it goes through."""
    src = tmp_path / "src"
    want = write_indexed(src, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    out = tmp_path / "out"
    first = pull_result(str(src), to=out)
    assert sorted(first.fetched) == sorted(os.listdir(src))
    before = tree(out)
    kept = src / "model-00002-of-00002.safetensors"
    os.rename(kept, tmp_path / "kept")
    for verify in (False, True):
        with pytest.raises(fastload.SourceNotFoundError, match="the source lacks"):
            pull_result(str(src), to=out, verify=verify)
        assert tree(out) == before
    os.rename(tmp_path / "kept", kept)
    again = pull_result(str(src), to=out, verify=True)  # (the shard's change time moved: it may be fetched again)
    assert "model-00001-of-00002.safetensors" in again.present, again
    assert_bit_exact(fastload.load(out), want)


def test_cli_exit_status_and_one_line_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_indexed(src / "text_encoder", ["a.safetensors", "b.safetensors"])
    (src / "text_encoder" / "b.safetensors").unlink()
    out = tmp_path / "out"
    done = _python(["-m", "fastload", "pull", str(src), "--to", str(out)])
    assert done.returncode == 1, done
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("fastload: error: ") and "the source lacks: 'b.safetensors'" in done.stderr
    assert not out.exists()


@pytest.mark.parametrize("secret", ["query", "userinfo"])
def test_http_missing_shard_error_names_it_without_credentials(http_server, http_dir: Path, tmp_path: Path,
                                                               secret: str) -> None:
    src = http_dir / "model"
    write_indexed(src, ["a.safetensors", "b.safetensors"])
    (src / "b.safetensors").unlink()
    base = http_server.url_for(src) + "/"
    url = base + "?token=SECRET-tok3n" if secret == "query" else base.replace("://", "://user:SECRET-pw@")
    out = tmp_path / "out"
    with pytest.raises(fastload.SourceNotFoundError) as caught:
        pull_result(url, to=out)
    assert "SECRET" not in str(caught.value) and "SECRET" not in caught.value.url
    assert caught.value.url.split("?")[0].endswith("/model/b.safetensors"), caught.value.url
    assert not out.exists()


def test_hub_nested_index_lacking_a_shard_names_it_without_the_token(hub: HubServer, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "repo"
    write_indexed(src / "text_encoder", ["a.safetensors", "b.safetensors"])
    (src / "config.json").write_text("{}")
    (src / "text_encoder" / "b.safetensors").unlink()
    repo = repo_name("lacking")
    hub.add_repo(repo, src)
    hub.token = "hf_SECRETtoken"
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETtoken")
    with pytest.raises(fastload.SourceNotFoundError) as caught:
        pull_result(f"hf://{repo}")
    assert "SECRET" not in str(caught.value) and "SECRET" not in caught.value.url
    assert caught.value.url.endswith("text_encoder/b.safetensors"), caught.value.url
    assert not (tmp_path / "hf-cache").exists() or not any((tmp_path / "hf-cache").rglob("blobs/*"))


def _s3_gets(proxy, name: str) -> int:
    return sum(1 for r in proxy.log if r.method == "GET" and r.path.endswith("/" + name))


def test_s3_index_is_read_no_more_than_needed(s3_server, s3_bucket: str, s3_proxy, tmp_path: Path) -> None:
    """The check reads each index once; the pull then copies it. A pull that finds everything present reads the
    index once (the check) and no shard."""
    src = tmp_path / "src"
    write_indexed(src / "text_encoder", ["a.safetensors", "b.safetensors"])
    s3_server.upload_dir(s3_bucket, "m", src)
    config = SMALL.replace(s3=fastload.S3Options(endpoint_url=s3_proxy.url.rstrip("/")))
    out = tmp_path / "out"
    pull_result(f"s3://{s3_bucket}/m/", to=out, config=config)
    index = "model.safetensors.index.json"
    assert _s3_gets(s3_proxy, index) <= 2, [(r.method, r.path, r.range) for r in s3_proxy.log]
    s3_proxy.log_store.clear()
    again = pull_result(f"s3://{s3_bucket}/m/", to=out, config=config)
    assert again.fetched == ()
    assert _s3_gets(s3_proxy, index) == 1, [(r.method, r.path, r.range) for r in s3_proxy.log]
    assert _s3_gets(s3_proxy, "a.safetensors") == _s3_gets(s3_proxy, "b.safetensors") == 0


def test_s3_listing_refused_with_a_readable_index_is_a_permission_error(s3_server, s3_bucket: str, s3_proxy,
                                                                       tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_indexed(src, ["a.safetensors", "b.safetensors"])
    s3_server.upload_dir(s3_bucket, "m", src)
    config = SMALL.replace(s3=fastload.S3Options(endpoint_url=s3_proxy.url.rstrip("/")))
    s3_proxy.faults.fail_first(100, 403, path=f"/{s3_bucket}")  # ListObjectsV2 is GET /bucket?list-type=2
    s3_proxy.faults.fail_first(100, 403, path=f"/{s3_bucket}/")
    out = tmp_path / "out"
    with pytest.raises(fastload.SourcePermissionError):
        pull_result(f"s3://{s3_bucket}/m/", to=out, config=config)
    assert not out.exists()
    assert_bit_exact(fastload.load(f"s3://{s3_bucket}/m/", config=config), load_file(src / "a.safetensors")
                     | load_file(src / "b.safetensors"))


# == 2. from_pretrained: model files and weights names asked for at once ========================================

transformers = pytest.importorskip("transformers")
TOKENS = torch.tensor([[1, 5, 9, 3, 7]])


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same_weights(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and torch.equal(_bits(a[name]), _bits(b[name])), name


def _gpt2(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=3, eos_token_id=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return _gpt2(tmp_path_factory.mktemp("s13-gpt2"), 1)


def _served(http_server, http_dir: Path, directory: Path, name: str) -> str:
    shutil.copytree(directory, http_dir / name)
    return http_server.url_for(http_dir / name) + "/"


@pytest.mark.parametrize("status", [403, 503])
def test_weights_named_by_config_are_not_blocked_by_the_standard_names(http_server, http_dir: Path,
                                                                      tmp_path: Path, gpt2_dir: Path,
                                                                      status: int) -> None:
    """config.json's ``transformers_weights`` names the one weights file transformers reads: it never asks for
    model.safetensors or the index. A server that answers those (absent) names with 403 (a CDN in front of a
    bucket says so for any missing key) or a 5xx must not fail the load. The standard names are probed while
    config.json is fetched, and their error fails the whole gather before config.json is even looked at."""
    model = tmp_path / "named"
    shutil.copytree(gpt2_dir, model)
    (model / "model.safetensors").rename(model / "weights-v2.safetensors")
    doc = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**doc, "transformers_weights": "weights-v2.safetensors"}))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(model)
    url = _served(http_server, http_dir, model, "named")
    http_server.faults.fail_first(1000, status, path="*/named/model.safetensors*")
    ours = fastload.from_pretrained(url, config=QUICK)
    assert_same_weights(ours, theirs)


def test_a_missing_config_json_is_reported_at_once_not_after_the_weights_probe_gives_up(
        http_server, http_dir: Path, tmp_path: Path, gpt2_dir: Path) -> None:
    """No config.json is decided by one 404: the folder is no transformers model, whatever its weights do. Asked
    one after the other, that was the error at once; asked together, the gather waits for the weights' probe to
    spend its retries (here on a server that stalls), and its TransferError replaces the real answer."""
    model = tmp_path / "noconf"
    shutil.copytree(gpt2_dir, model)
    (model / "config.json").unlink()
    url = _served(http_server, http_dir, model, "noconf")
    http_server.faults.hang(path="*/noconf/model.safetensors")
    config = QUICK.replace(stall_timeout_s=1.5, retry=RetryConfig(max_attempts=2, backoff_base_s=0.02))
    started = time.monotonic()
    with pytest.raises(fastload.FastloadError) as caught:
        fastload.from_pretrained(url, config=config)
    took = time.monotonic() - started
    assert isinstance(caught.value, fastload.SourceNotFoundError) and "config.json" in str(caught.value), (
        f"{type(caught.value).__name__}: {caught.value} after {took:.1f} s")
    assert took < 1.5, took


def test_a_failing_model_file_cancels_the_weights_probes_and_leaves_nothing(http_server, http_dir: Path,
                                                                           tmp_path: Path,
                                                                           gpt2_dir: Path) -> None:
    """config.json refused (401) while the weights' probes hang: the error at once, the hung probes cancelled,
    no thread, socket or staging folder left."""
    url = _served(http_server, http_dir, gpt2_dir, "refused") + "?token=SECRET-t"
    http_server.faults.fail_first(1000, 401, path="*/refused/config.json")
    http_server.faults.hang(path="*/refused/model.safetensors*")
    config = LoadConfig(stall_timeout_s=20)
    with Leaks({http_server.port}) as leaks:
        started = time.monotonic()
        with pytest.raises(fastload.SourcePermissionError) as caught:
            fastload.from_pretrained(url, config=config)
        assert time.monotonic() - started < 5.0
        leaks.check(grace_s=2.0)
    assert caught.value.url.split("?")[0].endswith("/refused/config.json")
    assert "SECRET" not in str(caught.value) and "SECRET" not in caught.value.url


def test_a_single_file_beside_an_index_wins_as_in_transformers(http_server, http_dir: Path, tmp_path: Path,
                                                               gpt2_dir: Path) -> None:
    """Both model.safetensors and model.safetensors.index.json: transformers takes the single file."""
    model = tmp_path / "both"
    shutil.copytree(gpt2_dir, model)
    other = _gpt2(tmp_path / "other", 77)
    transformers.GPT2LMHeadModel.from_pretrained(other).save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    for f in (tmp_path / "sharded").glob("model*"):
        shutil.copy(f, model / f.name)
    assert (model / "model.safetensors.index.json").exists()
    (model / "model.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes())
    theirs = transformers.GPT2LMHeadModel.from_pretrained(model)
    ours = fastload.from_pretrained(_served(http_server, http_dir, model, "both"))
    assert_same_weights(ours, theirs)
    assert_same_weights(ours, transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir))


def test_trace_counts_the_weights_probes_not_the_model_files(http_server, http_dir: Path, gpt2_dir: Path) -> None:
    """A retry of config.json or generation_config.json is not the weights'; one of model.safetensors' probe is."""
    url = _served(http_server, http_dir, gpt2_dir, "traced")
    http_server.faults.fail_first(1, 503, path="*/traced/config.json")
    http_server.faults.fail_first(1, 503, path="*/traced/generation_config.json")
    trace = fastload.Trace(otel=False)
    fastload.from_pretrained(url, config=QUICK, trace=trace)
    assert trace.snapshot()["counters"].get("retries", 0) == 0
    assert [u.rsplit("/", 1)[-1] for u in trace.summary().bytes_by_file] == ["model.safetensors"]
    http_server.reset()
    http_server.faults.fail_first(1, 503, path="*/traced/model.safetensors")
    trace = fastload.Trace(otel=False)
    fastload.from_pretrained(url, config=QUICK, trace=trace)
    assert trace.snapshot()["counters"].get("retries", 0) == 1
    sent = sum(r.body_bytes for r in http_server.requests("*.safetensors") if r.status == 206)  # not the 503's text
    assert trace.summary().bytes_fetched == sent


def test_hub_variant_probes_and_missing_variant(hub: HubServer, tmp_path: Path, gpt2_dir: Path) -> None:
    """hf://: variant names probed at once; the variant's single file wins; a missing variant names both."""
    model = tmp_path / "variant"
    shutil.copytree(gpt2_dir, model)
    (model / "model.safetensors").rename(model / "model.fp16.safetensors")
    repo = repo_name("variant")
    hub.add_repo(repo, model)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir)
    assert_same_weights(fastload.from_pretrained(f"hf://{repo}", variant="fp16"), theirs)
    with pytest.raises(fastload.SourceNotFoundError) as caught:
        fastload.from_pretrained(f"hf://{repo}", variant="bf16")
    assert "model.bf16.safetensors or model.safetensors.index.bf16.json" in str(caught.value), caught.value


# == 3. DaemonThreadPool: the worker is idle before the result is out ============================================


def _alive(pool: DaemonThreadPool) -> list[threading.Thread]:
    return [t for t in pool._threads if t.is_alive()]


def test_shutdown_while_jobs_chain_themselves_from_callbacks_returns_and_starts_nothing_after() -> None:
    pool = DaemonThreadPool(4, "s13-chain")
    ran, refused, lock = [0], [], threading.Lock()

    def job(n: int) -> int:
        with lock:
            ran[0] += 1
        return n + 1

    def then(future) -> None:
        try:
            pool.submit(job, future.result()).add_done_callback(then)
        except RuntimeError as exc:
            refused.append(str(exc))

    for _ in range(6):
        pool.submit(job, 0).add_done_callback(then)
    time.sleep(0.3)
    assert ran[0] > 100  # the chains run (each on a free worker)
    assert len(pool._threads) <= 4
    closer = threading.Thread(target=pool.shutdown, kwargs={"wait": True}, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "shutdown(wait=True) did not return"
    assert not _alive(pool)
    after = ran[0]
    time.sleep(0.1)
    assert ran[0] == after
    assert len(refused) == 6 and all("after shutdown" in r for r in refused), refused[:3]


def test_exceptions_and_base_exceptions_of_jobs_are_handed_over_and_the_thread_kept() -> None:
    pool = DaemonThreadPool(4, "s13-errors")
    try:
        for exc in (ValueError("v"), KeyboardInterrupt(), SystemExit(3), GeneratorExit(), CancelledError()):
            def boom(exc=exc):
                raise exc
            future = pool.submit(boom)
            assert wait([future], 10).done
            assert future.exception() is exc
            assert pool.submit(int, "5").result(10) == 5
        assert len(pool._threads) == 1 and len(_alive(pool)) == 1
        assert pool._running == 0
    finally:
        pool.shutdown(wait=True)
    assert not _alive(pool)


def test_queued_futures_cancelled_never_run_and_free_no_phantom_worker() -> None:
    pool = DaemonThreadPool(1, "s13-cancel")
    gate, ran = threading.Event(), []
    try:
        blocker = pool.submit(gate.wait, 10)
        queued = [pool.submit(ran.append, i) for i in range(10)]
        for future in queued[1::2]:
            assert future.cancel()
        gate.set()
        assert blocker.result(10) is True
        wait(queued, 10)
        assert ran == list(range(0, 10, 2))
        assert all(f.cancelled() for f in queued[1::2])
        # every worker's idle mark stands for a real free worker: the next jobs still run, on one thread
        assert [pool.submit(lambda i=i: i * 3).result(10) for i in range(20)] == [i * 3 for i in range(20)]
        assert len(pool._threads) == 1
        gate.clear()
        pool.submit(gate.wait, 10)
        rest = [pool.submit(ran.append, -1) for _ in range(5)]
    finally:
        gate.set()
        pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in rest)
    assert ran.count(-1) == sum(not f.cancelled() for f in rest)  # a cancelled job never ran, the others did


def test_max_workers_is_never_exceeded_under_bursts_from_many_threads() -> None:
    pool = DaemonThreadPool(3, "s13-burst")
    lock = threading.Lock()
    running, peak, done = [0], [0], []

    def job(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.0005 if i % 7 else 0)
        with lock:
            running[0] -= 1
        return i

    def chain(future) -> None:  # some results submit the next job from their callback
        i = future.result()
        if i % 5 == 0 and i < 10_000:
            try:
                chained.append(pool.submit(job, i + 10_001))
            except RuntimeError:
                pass

    chained: list = []
    start = threading.Barrier(12)

    def burst(k: int) -> None:
        start.wait()
        futures = []
        for i in range(k * 100, k * 100 + 100):
            f = pool.submit(job, i)
            f.add_done_callback(chain)
            futures.append(f)
        done.extend(f.result(30) for f in futures)

    try:
        threads = [threading.Thread(target=burst, args=(k,)) for k in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(done) == list(range(1200))
        wait(list(chained), 30)
        assert peak[0] <= 3 and len(pool._threads) <= 3, (peak[0], len(pool._threads))
        assert pool._running == 0
    finally:
        pool.shutdown(wait=True)


def test_exit_hook_still_waits_for_a_running_job_and_cancels_what_its_callback_submits() -> None:
    """``_stop_at_exit`` of a pool serving a caller's loop waits for ``_running == 0`` (and the pool's shutdown):
    the worker now marks itself idle before the result is out, but the job counts as running until then."""
    import asyncio

    loop = asyncio.new_event_loop()
    pool = DaemonThreadPool(2, "s13-exit", owner=(loop, None))
    started, chained, stopped = threading.Event(), [], []

    def job() -> str:
        started.set()
        time.sleep(0.4)
        return "done"

    def then(future) -> None:
        time.sleep(0.2)  # the result's callback runs in the worker: the job is not over until it returns
        chained.append(pool.submit(int, "1"))

    try:
        future = pool.submit(job)
        future.add_done_callback(then)
        assert started.wait(5)
        hook = threading.Thread(target=lambda: (pool._stop_at_exit(), stopped.append(time.monotonic())))
        hook.start()
        assert future.result(5) == "done"
        time.sleep(0.1)
        assert not stopped, "the exit hook returned while the job's callback still ran"
        deadline = time.monotonic() + 5
        while pool._running and time.monotonic() < deadline:
            time.sleep(0.01)
        ended = time.monotonic()
        pool.shutdown(wait=True)
        hook.join(5)
        assert stopped and stopped[0] >= ended
        assert chained and chained[0].cancelled()
    finally:
        pool.shutdown(wait=True)
        loop.close()


def _reference(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(13)
    tensors = {f"w{i}": torch.randn(256, 512 + 64 * i, generator=gen).to(torch.bfloat16 if i % 2 else torch.float32)
               for i in range(8)}
    tensors["ids"] = torch.arange(10_000, dtype=torch.int64)
    path = tmp_path / "ref" / "model.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("kind", ["local", "threads", "aiohttp", "s3"])
def test_loads_stay_bit_exact_under_heavy_concurrency(kind: str, tmp_path: Path, request) -> None:
    path, want = _reference(tmp_path)
    config = LoadConfig(chunk_bytes=1 << 20, max_concurrency=8, local_threads=3)
    if kind == "local":
        url = str(path)
    elif kind == "s3":
        s3, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
        s3.put(bucket, "m.safetensors", path.read_bytes())
        url = f"s3://{bucket}/m.safetensors"
    else:
        server, root = request.getfixturevalue("http_server"), request.getfixturevalue("http_dir")
        shutil.copy(path, root / "m.safetensors")
        url = server.url_for(root / "m.safetensors")
        config = config.replace(http_engine=kind)
    converted = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in want.items()}
    errors, results = [], []

    def one(i: int) -> None:
        try:
            if i % 3 == 2:
                got = {}
                with fastload.stream(url, config=config, dtype=torch.float16) as s:
                    got.update(s)
                results.append((got, converted))
            else:
                results.append((fastload.load(url, config=config, dtype=torch.float16 if i % 3 else None),
                                converted if i % 3 else want))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 9
    for got, expected in results:
        assert_bit_exact(got, expected)
