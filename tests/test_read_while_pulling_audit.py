"""Audit: reading a directory while ``fastload pull`` is writing into it.

A service that starts while its weights are still being pre-staged, a second replica pulling into a shared volume,
a pull into the Hugging Face cache while transformers or fastload reads it. At every moment of a pull, a reader of
the destination (``fastload.load`` / ``stream`` / ``plan`` / ``from_pretrained``, and plain ``transformers``)
must get either a clear typed error (``SourceNotFoundError`` ...) or the complete, bit-exact checkpoint: never a
partial (or mixed) checkpoint returned as if it were whole. fastload's own readers of a plain destination wait for
a pull under way (they take its lock shared while they open the files), so some reads started during the pull end
after it: "during" counts the reads started while the pull ran.

Real pulls from the HTTP, S3 and Hub fixtures, slowed down by the fixtures' fault rules (``slow_first_byte``) so that
readers run many times during the pull; nothing inside fastload is mocked. tests/test_pull*.py cover what a pull
leaves when it is done; this file covers what a reader sees while it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import fastload
from checkpoints import llama_config, llama_like_tensors, write_sharded
from fastload import LoadConfig
from fastload.errors import FastloadError
from hub_server import hub, hub_session, repo_name  # noqa: F401 -- fixtures

pytestmark = pytest.mark.filterwarnings("ignore")

SLOW = 0.25  # seconds before each slowed GET's first byte: a file lands every SLOW seconds or so
ONE = LoadConfig(chunk_bytes=64 << 10, max_concurrency=1, host_buffer_bytes=1 << 20)


# -- checkpoints -------------------------------------------------------------------------------------------------


def sharded(root: Path, seed: int, shards: int = 3, config: bool = True) -> dict[str, torch.Tensor]:
    """A llama-like checkpoint in ``shards`` shards plus its index (and config.json); returns its tensors."""
    tensors = llama_like_tensors(seed=seed)
    write_sharded(root, tensors, shards, metadata={"format": "pt"})
    if config:
        (root / "config.json").write_text(json.dumps(llama_config()))
    return tensors


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return set(got) == set(want) and all(
        got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)) for k in want)


# -- readers -----------------------------------------------------------------------------------------------------


def read_load(dest) -> dict[str, torch.Tensor]:
    return fastload.load(str(dest))


def read_stream(dest) -> dict[str, torch.Tensor]:
    with fastload.stream(str(dest)) as items:
        return {name: tensor.clone() for name, tensor in items}


def read_plan(dest) -> set[str]:
    return {t.spec.name for t in fastload.plan(str(dest)).tensors}


def read_model(dest) -> dict[str, torch.Tensor]:
    model = fastload.from_pretrained(str(dest))
    return {k: v.detach() for k, v in model.state_dict().items()}


def judge(kind: str, got, wants: list[dict[str, torch.Tensor]]) -> str | None:
    """None when ``got`` is one of the whole checkpoints ``wants``; else what is wrong with it."""
    if kind == "plan":
        if any(got == set(w) for w in wants):
            return None
        return f"plan of {len(got)} tensors, not of a whole checkpoint"
    if kind == "model":
        if any(all(k in got and torch.equal(got[k].view(torch.uint8), w[k].view(torch.uint8)) for k in w)
               for w in wants):
            return None
        return "a model whose weights are not those of a whole checkpoint"
    if any(same(got, w) for w in wants):
        return None
    counts = [sum(k in got and torch.equal(got[k].view(torch.uint8), w[k].view(torch.uint8)) for k in w)
              for w in wants]
    return f"{len(got)} tensors, matching {counts} of {[len(w) for w in wants]}: partial or mixed"


READERS = {"load": read_load, "stream": read_stream, "plan": read_plan, "model": read_model}


class Watcher:
    """Reads ``dest`` again and again while ``pull`` runs in a thread, taking each of ``readers`` in turn; records
    what each read gave. ``readers``: names in ``READERS``, or ``{name: (how to judge, read(), typed errors)}`` where
    the typed errors are those that count as a clear answer ("not there (yet)")."""

    def __init__(self, readers, dest: Path, wants: list[dict[str, torch.Tensor]]):
        if not isinstance(readers, dict):
            readers = {name: (name, lambda name=name: READERS[name](dest), (FastloadError,)) for name in readers}
        self.readers, self.dest, self.wants = readers, dest, wants
        self.outcomes: list[tuple[float, str, str, str]] = []  # (time, reader, "error"|"whole"|"BAD", detail)

    def listing(self) -> list[str]:
        return sorted(p.name for p in self.dest.iterdir()) if self.dest.is_dir() else []

    def read_once(self, t0: float, name: str) -> str:
        kind, read, typed = self.readers[name]
        at = round(time.monotonic() - t0, 2)
        listing = self.listing()
        try:
            got = read()
        except typed as exc:
            self.outcomes.append((at, name, "error", f"{type(exc).__name__} {listing}"))
            return "error"
        except Exception as exc:  # noqa: BLE001 -- anything but a typed error is a finding
            self.outcomes.append((at, name, "BAD", f"untyped {type(exc).__name__}: {exc} {listing}"))
            return "BAD"
        wrong = judge(kind, got, self.wants)
        self.outcomes.append((at, name, "whole", "") if wrong is None else (at, name, "BAD", f"{wrong} {listing}"))
        return self.outcomes[-1][2]

    def run(self, pull, timeout: float = 30.0) -> None:
        failure: list[BaseException] = []

        def target() -> None:
            try:
                pull()
            except BaseException as exc:  # noqa: BLE001
                failure.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        names = list(self.readers)
        t0 = time.monotonic()
        thread.start()
        turn = 0
        while thread.is_alive() and time.monotonic() - t0 < timeout:
            self.read_once(t0, names[turn % len(names)])
            turn += 1
            time.sleep(0.02)
        thread.join(5)
        assert not thread.is_alive(), "the pull did not finish"
        assert not failure, failure
        self.during = len(self.outcomes)
        for name in names:  # after the pull: whole, with every reader
            assert self.read_once(t0, name) == "whole", self.outcomes[-1]

    def bad(self) -> list[tuple[float, str, str, str]]:
        return [o for o in self.outcomes if o[2] == "BAD"]

    def check(self, at_least: int = 2) -> None:
        assert self.during >= at_least, self.outcomes
        bad = self.bad()
        assert not bad, (f"{len(bad)} of {self.during} reads during the pull returned a checkpoint that is not "
                         f"whole ({sorted({b[1] for b in bad})}); the first: {bad[:3]}")


# -- S3 prefix into a plain directory ----------------------------------------------------------------------------


@pytest.fixture
def s3_slow(s3_server, s3_bucket, s3_proxy):
    """(bucket, config through the proxy, proxy faults)."""
    config = ONE.replace(s3=fastload.S3Options(endpoint_url=s3_proxy.url))
    return s3_bucket, config, s3_proxy.faults


def test_reading_a_plain_directory_while_an_s3_prefix_is_pulled_into_it(s3_server, s3_slow, tmp_path):
    """An S3 prefix lists sorted: ``model-0000N-of-...`` before ``model.safetensors.index.json``. The shards land
    first, one by one, and the index last; in between the destination is a folder of some shards and no index,
    which load / stream / plan read as "every *.safetensors in it": a partial checkpoint returned as the whole."""
    bucket, config, faults = s3_slow
    src = tmp_path / "src"
    want = sharded(src, seed=1)
    s3_server.upload_dir(bucket, "llama", src)
    faults.slow_first_byte(SLOW, path=f"/{bucket}/llama/*")
    dest = tmp_path / "dest"
    watcher = Watcher(["load", "stream", "plan"], dest, [want])
    watcher.run(lambda: fastload.pull(f"s3://{bucket}/llama/", to=dest, config=config))
    watcher.check()


def test_from_pretrained_of_a_plain_directory_while_an_s3_prefix_is_pulled_into_it(s3_server, s3_slow, tmp_path):
    """from_pretrained follows transformers' rule (model.safetensors, else the index; no "every *.safetensors"):
    during the pull it must say the weights are missing, and give the whole model once they are there."""
    bucket, config, faults = s3_slow
    src = tmp_path / "src"
    want = sharded(src, seed=2)
    s3_server.upload_dir(bucket, "llama", src)
    faults.slow_first_byte(SLOW, path=f"/{bucket}/llama/*")
    dest = tmp_path / "dest"
    watcher = Watcher(["model"], dest, [want])
    watcher.run(lambda: fastload.pull(f"s3://{bucket}/llama/", to=dest, config=config))
    watcher.check(3)


# -- HTTP base URL into a plain directory ------------------------------------------------------------------------


def test_reading_while_an_http_base_url_is_pulled_with_the_index_first(http_server, http_dir, tmp_path):
    """An HTTP base URL pulls the index first (it is listed first): a reader sees an index whose shards are not
    all there (SourceNotFoundError), then the whole checkpoint."""
    want = sharded(http_dir / "llama", seed=3)
    http_server.faults.slow_first_byte(SLOW, path="*/llama/model*")
    dest = tmp_path / "dest"
    watcher = Watcher(["load", "plan"], dest, [want])
    watcher.run(lambda: fastload.pull(http_server.url_for(http_dir / "llama") + "/", to=dest, config=ONE))
    watcher.check()


def test_reading_while_an_http_pull_waits_on_a_slow_index(http_server, http_dir, tmp_path):
    """The same HTTP pull with two reads in flight, where the server is slow to answer for the index (a cold
    cache, a retry): the shards land while the index is still on its way. The destination is then a folder of
    shards without their index, and a load of it returns the shards that landed as the checkpoint."""
    want = sharded(http_dir / "llama", seed=4)
    http_server.faults.slow_first_byte(0.25, path="*/llama/model-*")
    http_server.faults.slow_first_byte(1.5, path="*/llama/model.safetensors.index.json")
    dest = tmp_path / "dest"
    watcher = Watcher(["load"], dest, [want])
    watcher.run(lambda: fastload.pull(http_server.url_for(http_dir / "llama") + "/", to=dest,
                                      config=ONE.replace(max_concurrency=2)))
    watcher.check()


# -- hf:// into a plain directory --------------------------------------------------------------------------------


def test_reading_while_a_hub_repo_is_pulled_into_a_plain_directory(hub, tmp_path):
    """``fastload pull hf://org/name --to DIR``: the Hub lists files sorted, so the shards land before the index."""
    src = tmp_path / "src"
    want = sharded(src, seed=5)
    repo = repo_name("plain")
    hub.add_repo(repo, src)
    slow_hub(hub, repo)
    dest = tmp_path / "dest"
    watcher = Watcher(["load"], dest, [want])
    watcher.run(lambda: fastload.pull(f"hf://{repo}", to=dest, config=ONE))
    watcher.check()


# -- a new version pulled over an old one; two pulls at once -----------------------------------------------------


def test_reading_while_a_new_version_is_pulled_over_the_old_one(s3_server, s3_slow, tmp_path):
    """The destination holds v1, whole (an earlier pull). The S3 prefix now holds v2 (same layout, other values:
    a fine-tune) and is pulled again into it. Each shard is replaced when whole, one after the other, under the
    one index both versions share: between the first and the last, a reader gets v2's first shards and v1's
    others, each file consistent, the checkpoint a mix of two versions nobody published."""
    bucket, config, faults = s3_slow
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    want1, want2 = sharded(v1, seed=6), sharded(v2, seed=7)
    assert (v1 / "model.safetensors.index.json").read_bytes() == (v2 / "model.safetensors.index.json").read_bytes()
    s3_server.upload_dir(bucket, "llama", v1)
    dest = tmp_path / "dest"
    fastload.pull(f"s3://{bucket}/llama/", to=dest, config=config)
    assert same(fastload.load(str(dest)), want1)
    s3_server.upload_dir(bucket, "llama", v2)  # a new version of the same source
    faults.slow_first_byte(SLOW, path=f"/{bucket}/llama/*")
    watcher = Watcher(["load", "model"], dest, [want1, want2])
    watcher.run(lambda: fastload.pull(f"s3://{bucket}/llama/", to=dest, config=config))
    assert same(fastload.load(str(dest)), want2)
    watcher.check()


def test_two_pulls_of_two_releases_into_one_destination_at_once(s3_server, s3_slow, tmp_path):
    """Two replicas pull two releases (``s3://b/v1/`` and ``s3://b/v2/``) into one shared volume at once. The pulls
    take turns (the lock); what a reader sees meanwhile must be one whole release or a typed error."""
    bucket, config, faults = s3_slow
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    want1, want2 = sharded(v1, seed=8), sharded(v2, seed=9)
    s3_server.upload_dir(bucket, "v1", v1)
    s3_server.upload_dir(bucket, "v2", v2)
    faults.slow_first_byte(0.15, path=f"/{bucket}/*")
    dest = tmp_path / "dest"
    errors: list[BaseException] = []

    def both() -> None:
        def one(prefix: str) -> None:
            try:
                fastload.pull(f"s3://{bucket}/{prefix}/", to=dest, config=config)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        threads = [threading.Thread(target=one, args=(p,)) for p in ("v1", "v2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    watcher = Watcher(["load"], dest, [want1, want2])
    watcher.run(both)
    assert not errors, errors
    watcher.check()


LOADER = r"""
import json, sys, time
import torch, fastload
from safetensors.torch import load_file
dest, v1, v2 = sys.argv[1:4]
want = [{}, {}]
for i, d in enumerate((v1, v2)):
    index = json.load(open(d + "/model.safetensors.index.json"))["weight_map"]
    for name, shard in index.items():
        want[i][name] = load_file(d + "/" + shard)[name]
config = fastload.LoadConfig(chunk_bytes=64 << 10, host_buffer_bytes=128 << 10, max_concurrency=1)
got = {}
try:
    with fastload.stream(dest, config=config) as items:
        for name, tensor in items:
            got[name] = tensor.clone()
            if len(got) == 1:
                print("started", flush=True)
                sys.stdin.readline()  # the pull has replaced the files
            time.sleep(0.01)
except fastload.FastloadError as exc:
    print(json.dumps({"error": type(exc).__name__}), flush=True)
else:
    same = [sorted(n for n in got if torch.equal(got[n].view(torch.uint8), w[n].view(torch.uint8))) for w in want]
    print(json.dumps({"tensors": len(got), "v1": len(same[0]), "v2": len(same[1])}), flush=True)
"""


def test_a_pull_replaces_the_files_another_process_is_loading(tmp_path):
    """One process streams the destination (v1, pulled earlier; small buffers, so most bytes are read after the
    first tensor), a pull of v2 replaces every file meanwhile: the load gives v1 whole, or a typed error
    (SourceChangedError), never a mix of v1 and v2."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    sharded(v1, seed=13)
    sharded(v2, seed=14)
    dest = tmp_path / "dest"
    fastload.pull(str(v1), to=dest, config=ONE)
    child = subprocess.Popen([sys.executable, "-c", LOADER, str(dest), str(v1), str(v2)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "started", child.stderr.read()[-2000:]
        fastload.pull(str(v2), to=dest, config=ONE)
        out, err = child.communicate("go\n", timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result in ({"tensors": 21, "v1": 21, "v2": 0}, {"error": "SourceChangedError"}), result


# -- hf:// into the Hugging Face cache ---------------------------------------------------------------------------


def slow_hub(hub_server, repo: str) -> None:
    hub_server.faults.slow_first_byte(SLOW, path="/lfs/*")
    hub_server.faults.slow_first_byte(SLOW, path=f"/{repo}/resolve/*")


def cli_pull(source: str, cache: Path, hub_server) -> None:
    """``fastload pull`` in a process of its own, online (the readers here run offline)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=hub_server.endpoint, HF_HOME=str(cache.parent / "pull-home"))
    done = subprocess.run([sys.executable, "-m", "fastload", "pull", source, "--cache-dir", str(cache),
                           "--concurrency", "1", "--chunk-size", "64KiB", "--quiet"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]


def hub_readers(repo: str, cache: Path, names: list[str]) -> dict[str, tuple]:
    """Readers of ``hf://repo`` from the cache (HF_HUB_OFFLINE=1 set by the test), each imported and warmed up."""
    import transformers

    def by_transformers() -> dict[str, torch.Tensor]:
        model = transformers.AutoModelForCausalLM.from_pretrained(repo, local_files_only=True, cache_dir=str(cache))
        return {k: v.detach() for k, v in model.state_dict().items()}

    readers = {
        "load": ("load", lambda: fastload.load(f"hf://{repo}"), (FastloadError,)),
        "from_pretrained": ("model", lambda: {k: v.detach() for k, v in
                                              fastload.from_pretrained(f"hf://{repo}").state_dict().items()},
                            (FastloadError,)),
        # transformers says "not in the cache" with an OSError
        "transformers": ("model", by_transformers, (FastloadError, OSError)),
    }
    return {name: readers[name] for name in names}


def test_reading_the_hub_cache_offline_while_a_repo_is_pulled_into_it(hub, tmp_path, monkeypatch):
    """A first pull into the cache (in another process) while this one reads ``hf://org/name`` offline, with
    fastload (load, from_pretrained) and with plain transformers (``local_files_only``): "not in the cache", then
    the whole model."""
    src = tmp_path / "src"
    want = sharded(src, seed=10)
    repo = repo_name("cache")
    hub.add_repo(repo, src)
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    readers = hub_readers(repo, cache, ["load", "from_pretrained", "transformers"])
    for _, read, typed in readers.values():  # imports what each reader needs before the pull starts
        with pytest.raises(typed):
            read()
    slow_hub(hub, repo)
    watcher = Watcher(readers, cache, [want])
    watcher.run(lambda: cli_pull(f"hf://{repo}", cache, hub))
    watcher.check()


def test_reading_the_hub_cache_offline_while_a_new_revision_is_pulled(hub, tmp_path, monkeypatch):
    """main moves from v1 (in the cache) to v2 (being pulled): the snapshot of v1 stays whole, refs/main moves
    once v2's snapshot is: a reader gets v1 or v2, whole, never a mix nor an error."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    want1, want2 = sharded(v1, seed=11), sharded(v2, seed=12)
    repo = repo_name("rev")
    cache = tmp_path / "hf-cache"
    hub.add_repo(repo, v1)
    fastload.pull(f"hf://{repo}", cache_dir=cache, config=ONE)
    hub.add_repo(repo, v2)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    slow_hub(hub, repo)
    watcher = Watcher(hub_readers(repo, cache, ["load", "transformers"]), cache, [want1, want2])
    watcher.run(lambda: cli_pull(f"hf://{repo}", cache, hub))
    watcher.check()
    assert [o for o in watcher.outcomes if o[2] != "whole"] == [], watcher.outcomes
    assert same(fastload.load(f"hf://{repo}"), want2)
