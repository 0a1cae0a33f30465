"""Audit: progress reporting (``progress=`` on load/stream/aload/pull/from_pretrained, and the ``fastload pull``
progress bar with and without a terminal).

README: ``progress`` is ``callable(done_bytes, total_bytes)``; ``pull`` calls it "as chunks land" and shows "a
progress bar on a terminal". What a serious library must give a progress UI: the total is known and fixed, the
done count never goes backwards, never passes the total, ends exactly at it (once), retries never count a byte
twice, nothing is reported after the call returned or was cancelled, any callable works, and the terminal output
never carries secrets or control characters.

Real files, the real Range HTTP server fixture (with its fault rules) and real subprocesses; nothing of fastload
is mocked.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastload
from checkpoints import write_sharded
from hub_server import hub, hub_session, repo_name  # noqa: F401 -- fixtures
from reliability_helpers import Leaks, bounded, run_on_pty
from test_cli_corners import FASTLOAD, base_env

FASTLOAD = str(Path(sys.executable).with_name("fastload"))
KiB = 1024
CHUNK = 64 * KiB
RETRY = fastload.RetryConfig(max_attempts=6, backoff_base_s=0.001, backoff_max_s=0.005, deadline_s=20.0)


def cfg(**kw) -> fastload.LoadConfig:
    base = dict(chunk_bytes=CHUNK, host_buffer_bytes=8 * CHUNK, max_concurrency=4, stall_timeout_s=3.0,
                connect_timeout_s=2.0, retry=RETRY)
    base.update(kw)
    return fastload.LoadConfig(**base)


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Recorder:
    """A progress callback that records (done, total, thread) and checks the calls' types."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def __call__(self, done, total):
        assert type(done) is int and type(total) is int, (type(done), type(total))
        with self.lock:
            self.calls.append((done, total))

    def check(self, total: int, *, start: int | None = None) -> None:
        calls = list(self.calls)
        assert calls, "progress was never called"
        totals = {t for _, t in calls}
        assert totals == {total}, f"total reported {sorted(totals)}, expected {total}"
        dones = [d for d, _ in calls]
        assert dones == sorted(dones), f"progress went backwards: {dones}"
        assert all(0 <= d <= total for d in dones), f"progress outside [0, total]: {dones} / {total}"
        assert dones[-1] == total, f"progress ended at {dones[-1]} of {total}"
        assert dones.count(total) == 1, f"completion reported {dones.count(total)} times: {dones}"
        if start is not None:
            assert dones[0] == start, f"progress started at {dones[0]}, expected {start}"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """~0.5 MB single file: several 64 KiB chunks, odd sizes, a bf16, an int and an empty tensor."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        "w0": torch.randn(40_000, generator=g),
        "w1": torch.randn(120, 301, generator=g),
        "h": torch.randn(9_999, generator=g).to(torch.bfloat16),
        "ids": torch.arange(3_001, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path_factory.mktemp("progress") / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Three shards + index, Llama-like names (for shard rules), ~0.6 MB."""
    g = torch.Generator().manual_seed(11)
    tensors = {}
    for i in range(3):
        tensors[f"layers.{i}.q_proj.weight"] = torch.randn(96, 130, generator=g)
        tensors[f"layers.{i}.o_proj.weight"] = torch.randn(130, 96, generator=g).to(torch.bfloat16)
        tensors[f"layers.{i}.norm.weight"] = torch.randn(130, generator=g)
    tensors["embed.weight"] = torch.randn(200, 130, generator=g)
    directory = tmp_path_factory.mktemp("sharded") / "model"
    write_sharded(directory, tensors, 3)
    return directory, tensors


def serve_dir(http_server, http_dir: Path, src: Path) -> str:
    import shutil

    target = http_dir / src.name
    shutil.copytree(src, target)
    return http_server.url_for(target) + "/"


# -- what counts as a progress callback -------------------------------------------------------------------------


class LenZeroCallable:
    """A callable that is falsy (``__len__`` 0): e.g. a list subclass or a container-like reporter."""

    def __init__(self):
        self.calls = []

    def __len__(self):
        return 0

    def __call__(self, done, total):
        self.calls.append((done, total))


def tqdm_reporter():
    """A tqdm subclass used as the callback: tqdm instances define ``__bool__``/``__len__`` from ``total``,
    so a bar created before the total is known (total=0) is falsy."""
    from tqdm import tqdm

    class Bar(tqdm):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.calls = []

        def __call__(self, done, total):
            self.calls.append((done, total))
            self.total = total
            self.update(done - self.n)

    return Bar(total=0, disable=True)


@pytest.mark.parametrize("make", [LenZeroCallable, tqdm_reporter], ids=["len0-callable", "tqdm-subclass"])
@pytest.mark.parametrize("entry", ["load", "stream"])
def test_any_callable_is_called_even_if_falsy(ckpt, make, entry):
    """``progress`` is documented as a callable; whether the object is truthy must not matter. pull calls it
    (``is not None``); load/stream must too."""
    path, tensors = ckpt
    cb = make()
    try:
        if entry == "load":
            fastload.load(path, config=cfg(), progress=cb)
        else:
            with fastload.stream(path, config=cfg(), progress=cb) as s:
                for _ in s:
                    pass
        assert cb.calls, f"{type(cb).__name__} passed as progress= was never called"
        assert cb.calls[-1] == (stored_bytes(tensors),) * 2
    finally:
        if hasattr(cb, "close"):
            cb.close()


def test_pull_calls_a_falsy_callable(ckpt, tmp_path):
    path, _ = ckpt
    cb = LenZeroCallable()
    fastload.pull(path, to=tmp_path / "d", progress=cb)
    assert cb.calls and cb.calls[-1] == (path.stat().st_size,) * 2


@pytest.mark.parametrize("value", [True, 1, "bar"])
def test_non_callables_are_config_errors_before_any_io(ckpt, tmp_path, value):
    path, _ = ckpt
    from tqdm import tqdm

    with pytest.raises(fastload.ConfigError):
        fastload.load(path, progress=value)
    with pytest.raises(fastload.ConfigError):
        fastload.stream(path, progress=value)
    dest = tmp_path / "never"
    with pytest.raises(fastload.ConfigError):
        fastload.pull(path, to=dest, progress=value)
    assert not dest.exists(), "a refused pull created its destination"
    with tqdm(disable=True) as bar, pytest.raises(fastload.ConfigError):
        fastload.load(path, progress=bar)  # a tqdm instance is not callable(done, total)


def test_progress_none_reports_nothing_and_loads(ckpt):
    path, tensors = ckpt
    got = fastload.load(path, config=cfg(), progress=None)
    assert set(got) == set(tensors)


def test_async_callback_is_not_silently_dropped(ckpt):
    """An ``async def`` callback given to ``aload`` (an easy slip in async code): calling it only makes a
    coroutine that is never awaited, so no progress is ever shown (a RuntimeWarning at best). Either await it
    or refuse it up front with ConfigError -- never drop it silently."""
    path, tensors = ckpt
    calls = []

    async def on_progress(done, total):
        calls.append((done, total))

    async def main():
        return await fastload.aload(path, config=cfg(), progress=on_progress)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            asyncio.run(main())
        except fastload.ConfigError:
            return  # refused: fine
    import gc

    gc.collect()
    assert calls and calls[-1] == (stored_bytes(tensors),) * 2, \
        "an async progress callback was accepted, called, and its coroutine never awaited"


# -- totals -------------------------------------------------------------------------------------------------------


def test_nothing_to_fetch_still_reports_completion(ckpt, tmp_path):
    """A load that has nothing to fetch (only empty tensors selected) still tells its callback it is done:
    a UI waiting for done == total would otherwise wait forever. pull does report (0, 0) for an empty file."""
    path, _ = ckpt
    rec = Recorder()
    got = fastload.load(path, names=["empty"], config=cfg(), progress=rec)
    assert list(got) == ["empty"]
    assert rec.calls and rec.calls[-1] == (0, 0), f"progress calls: {rec.calls}"

    empty = tmp_path / "empty.json"
    empty.write_text("")
    rec = Recorder()
    fastload.pull(empty, to=tmp_path / "d", progress=rec)
    assert rec.calls and rec.calls[-1] == (0, 0), rec.calls


def test_load_progress_local_names_dtype_exact(ckpt):
    path, tensors = ckpt
    names = ["w1", "ids", "empty"]
    rec = Recorder()
    got = fastload.load(path, names=names, dtype=torch.float16, config=cfg(), progress=rec)
    assert set(got) == set(names)
    rec.check(stored_bytes({n: tensors[n] for n in names}))


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_index_names_shard_dtype_totals(sharded, http_server, http_dir, engine):
    """Over HTTP through the index, with names= across shards, a tensor-parallel shard and dtype=: total is the
    rank's stored bytes of exactly the selected tensors, monotone, ends there once."""
    directory, tensors = sharded
    url = serve_dir(http_server, http_dir, directory)
    shard = fastload.Shard(1, 3, {r"q_proj": 0, r"o_proj": 1})
    names = ["layers.0.q_proj.weight", "layers.1.o_proj.weight", "layers.2.norm.weight", "embed.weight"]
    rec = Recorder()
    got = bounded(lambda: fastload.load(url, names=names, shard=shard, dtype=torch.float32,
                                        config=cfg(http_engine=engine), progress=rec))
    want = {}
    for n in names:
        t = tensors[n]
        dim = shard.dim_for(n)
        want[n] = t if dim is None else t.tensor_split(3, dim)[1]
    assert set(got) == set(names)
    for n in names:
        assert torch.equal(got[n], want[n].to(torch.float32)), n
    rec.check(stored_bytes(want))


def test_mixed_local_and_http_list_totals(sharded, http_server, http_dir):
    directory, tensors = sharded
    shards = sorted(directory.glob("model-*.safetensors"))
    import shutil

    remote = http_dir / shards[1].name
    shutil.copy(shards[1], remote)
    sources = [str(shards[0]), http_server.url_for(remote), shards[2].as_uri()]
    rec = Recorder()
    got = bounded(lambda: fastload.load(sources, dtype=torch.bfloat16, config=cfg(), progress=rec))
    reference = {}
    for s in shards:
        reference.update(load_file(str(s)))
    assert set(got) == set(reference)
    rec.check(stored_bytes(reference))


def test_stream_progress_ends_at_total_of_handed_out_tensors(sharded):
    directory, tensors = sharded
    rec = Recorder()
    with fastload.stream(directory, config=cfg(), progress=rec) as s:
        got = dict(s)
    rec.check(stored_bytes(got))
    assert stored_bytes(got) == stored_bytes(tensors)


# -- retries ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_load_retries_after_cut_connections_count_once(sharded, http_server, http_dir, engine):
    directory, tensors = sharded
    url = serve_dir(http_server, http_dir, directory)
    http_server.faults.cut_after(10_000, times=6, path="*model-0000*-of-00003.safetensors")
    http_server.faults.fail_first(3, 503, path="*model-00002-of-00003.safetensors")
    rec = Recorder()
    got = bounded(lambda: fastload.load(url, config=cfg(http_engine=engine), progress=rec))
    assert set(got) == set(tensors)
    rec.check(stored_bytes(tensors))
    cut = [r for r in http_server.faults.rules]
    assert all(r.fired for r in cut), "the faults did not fire: the test proves nothing"


def test_pull_retries_after_cut_connections_count_once(sharded, http_server, http_dir, tmp_path):
    directory, _ = sharded
    url = serve_dir(http_server, http_dir, directory)
    rule = http_server.faults.cut_after(5_000, times=5, path="*model-0000*-of-00003.safetensors")
    rec = Recorder()
    out = tmp_path / "out"
    result = bounded(lambda: asyncio.run(fastload.apull(url, to=out, config=cfg(), progress=rec)))
    total = sum(p.stat().st_size for p in directory.iterdir())
    assert result.total_bytes == total
    rec.check(total, start=0)
    assert rule.fired, "the fault did not fire"
    for p in directory.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()


# -- pull: resumed and already complete ----------------------------------------------------------------------------


class Stop(Exception):
    pass


def test_pull_callback_error_surfaces_and_resume_starts_where_it_stopped(sharded, http_server, http_dir, tmp_path):
    """A callback that raises stops the pull with that exception (not wrapped into something else, no
    thread/socket/file left); the next pull's progress starts at the bytes already there and still ends exactly
    at the total."""
    directory, _ = sharded
    url = serve_dir(http_server, http_dir, directory)
    out = tmp_path / "out"
    total = sum(p.stat().st_size for p in directory.iterdir())
    seen = []

    def stop_after_two(done, total_):
        seen.append(done)
        if len(seen) >= 3:
            raise Stop("enough")

    one = cfg(max_concurrency=1)
    with Leaks({http_server.port}) as leaks:
        with pytest.raises(Stop, match="enough"):
            bounded(lambda: fastload.pull(url, to=out, config=one, progress=stop_after_two))
        leaks.check(grace_s=1.0)
    rec = Recorder()
    result = bounded(lambda: asyncio.run(fastload.apull(url, to=out, config=one, progress=rec)))
    first = rec.calls[0][0]
    assert 0 < first < total, f"a resumed pull started its progress at {first} of {total}"
    assert first == total - result.bytes_fetched, (first, total, result.bytes_fetched)
    rec.check(total)
    for p in directory.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()


def test_pull_of_complete_files_reports_total_once(ckpt, tmp_path):
    path, _ = ckpt
    dest = tmp_path / "d"
    fastload.pull(path, to=dest)
    rec = Recorder()
    result = asyncio.run(fastload.apull(path, to=dest, progress=rec))
    assert result.fetched == () and result.bytes_fetched == 0
    assert rec.calls == [(path.stat().st_size,) * 2], rec.calls


def test_hub_pull_of_a_blob_listed_twice_starts_at_zero(hub, tmp_path):
    """README: "A file the Hub lists at two paths is fetched once and linked twice". A fresh pull into an empty
    cache has nothing done yet: its progress starts at 0, and what it counts up by is what it fetches."""
    data = bytes(range(256)) * 4096  # 1 MiB
    src = tmp_path / "src"
    (src / "copy").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(data)
    (src / "copy" / "model.safetensors").write_bytes(data)
    (src / "config.json").write_text('{"model_type": "bert"}')
    repo = repo_name("progdup")
    hub.add_repo(repo, src)
    rec = Recorder()
    result = bounded(lambda: asyncio.run(fastload.apull(f"hf://{repo}", config=cfg(), progress=rec)))
    assert (result.path / "copy" / "model.safetensors").read_bytes() == data
    first, total = rec.calls[0]
    assert first == 0, (f"a pull into an empty cache reported {first} of {total} bytes done before fetching "
                        f"anything (fetched {result.bytes_fetched})")
    assert total - first == result.bytes_fetched, (first, total, result.bytes_fetched)
    rec.check(total)


# -- cancel / failure paths --------------------------------------------------------------------------------------


def test_no_progress_after_stream_closed(ckpt):
    path, _ = ckpt
    rec = Recorder()
    with fastload.stream(path, config=cfg(max_concurrency=1), progress=rec) as s:
        for _ in s:
            break
    n = len(rec.calls)
    time.sleep(0.2)
    assert len(rec.calls) == n, "progress was called after the stream was closed"


def test_no_progress_after_aload_cancelled(sharded, http_server, http_dir):
    directory, _ = sharded
    url = serve_dir(http_server, http_dir, directory)
    # (1.5 s: the load must still be waiting on its last shard when the cancel lands, even on a loaded machine;
    # 0.3 s was once not enough beside three test workers)
    http_server.faults.slow_first_byte(1.5, path="*model-00003-of-00003.safetensors")
    rec = Recorder()

    async def main():
        task = asyncio.ensure_future(fastload.aload(url, config=cfg(), progress=rec))
        while not rec.calls:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        n = len(rec.calls)
        await asyncio.sleep(0.3)
        return n

    n = bounded(lambda: asyncio.run(main()))
    assert len(rec.calls) == n, "progress was called after the load was cancelled"
    assert rec.calls[-1][0] < rec.calls[-1][1]


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_callback_error_over_http_surfaces_and_leaves_nothing(sharded, http_server, http_dir, engine):
    directory, _ = sharded
    url = serve_dir(http_server, http_dir, directory)

    def boom(done, total):
        raise Stop(f"callback at {done}")

    with Leaks({http_server.port}) as leaks:
        with pytest.raises(Stop) as info:
            bounded(lambda: fastload.load(url, config=cfg(http_engine=engine), progress=boom))
        leaks.check(grace_s=1.0)
    assert type(info.value) is Stop


def test_failed_load_stops_progress_short_of_total(sharded, http_server, http_dir):
    """A load that fails (the object replaced mid-load) never reports completion."""
    directory, _ = sharded
    url = serve_dir(http_server, http_dir, directory)
    http_server.faults.change_etag_after(2, path="*model-00003-of-00003.safetensors")
    rec = Recorder()
    with pytest.raises(fastload.SourceChangedError):
        bounded(lambda: fastload.load(url, config=cfg(), progress=rec))
    assert all(d < t for d, t in rec.calls), rec.calls


# -- from_pretrained --------------------------------------------------------------------------------------------


def test_from_pretrained_progress_works_or_is_refused_up_front(tmp_path):
    """from_pretrained streams its weights with fastload like load() does. ``progress=`` there must either work
    (called, ending at the weights' total) or be refused before any weight is read -- not be handed to the
    model's constructor after the whole load (TypeError from transformers)."""
    pytest.importorskip("transformers")
    from checkpoints import llama_config, llama_like_tensors

    model_dir = tmp_path / "m"
    model_dir.mkdir()
    tensors = llama_like_tensors()
    save_file(tensors, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text(json.dumps(llama_config()))
    calls = []
    trace = fastload.Trace(otel=False)
    try:
        fastload.from_pretrained(str(model_dir), trace=trace, progress=lambda d, t: calls.append((d, t)))
    except (fastload.ConfigError, TypeError) as exc:
        fetched = trace.summary().bytes_fetched if trace.to_dict() else 0
        assert fetched < stored_bytes(tensors), (
            f"progress= was refused only after the whole checkpoint was read ({fetched} bytes): {exc}")
        return
    assert calls and calls[-1] == (stored_bytes(tensors),) * 2, calls
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:])), calls


# -- the command line ------------------------------------------------------------------------------------------


def with_secrets(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, f"alice:hunter2pw@{parts.netloc}", parts.path, "sig=SECRETTOKEN123", ""))


def test_cli_pull_tty_failure_closes_bar_then_one_error_line(sharded, http_server, http_dir, tmp_path):
    """On a terminal, a pull that fails mid-way ends its bar's line before the error: the error starts a line
    of its own, nothing follows it, no traceback; no secret from the URL anywhere."""
    directory, _ = sharded
    url = with_secrets(serve_dir(http_server, http_dir, directory))
    http_server.faults.change_etag_after(1, path="*model-00003-of-00003.safetensors")
    rc, out, err = run_on_pty([FASTLOAD, "pull", url, "--to", str(tmp_path / "out"), "--chunk-size", "64KiB"],
                              base_env(TERM="xterm"))
    assert rc == 1, err
    assert out == "", out
    assert "Traceback" not in err, err
    assert "hunter2pw" not in err and "SECRETTOKEN123" not in err, err
    assert "pull:" in err, f"no progress bar was shown on the terminal: {err!r}"
    at = err.index("fastload: error:")
    before = err[:at]
    assert before.endswith("\n"), f"the error is glued to the progress bar's line: {err[-300:]!r}"
    assert err[at:].rstrip("\r\n").count("\n") == 0 and "\r" not in err[at:].rstrip("\r\n"), repr(err[at:])


def test_cli_pull_output_on_a_terminal(tmp_path, http_server, http_dir):
    """A file whose name holds control characters, from a URL with a password and a token, pulled again on a
    terminal (already complete): the bar shows 100%, the summary says nothing was fetched. ``--quiet`` on a terminal: nothing on stderr. Never the secrets, never the raw
    control characters."""
    nasty = "m\x1b]0;pwned\x07\x1b[31mx.safetensors"
    src = http_dir / nasty
    save_file({"a": torch.randn(50_000)}, str(src))
    url = with_secrets(http_server.url_for(src))
    dest = tmp_path / "out"
    argv = [FASTLOAD, "pull", url, "--to", str(dest), "--chunk-size", "64KiB"]

    def clean(text: str) -> None:
        assert "hunter2pw" not in text and "SECRETTOKEN123" not in text, text
        assert "\x1b]0;pwned" not in text and "\x07" not in text and "\x1b[31m" not in text, repr(text)

    fastload.pull(url, to=dest)  # in-process (the non-terminal CLI output is test_cli_audit2's)
    assert (dest / nasty).read_bytes() == src.read_bytes()

    rc, out, err = run_on_pty(argv, base_env(TERM="xterm"))
    assert rc == 0, err
    clean(out + err)
    assert "pull: 100%" in err, repr(err)
    assert "0 file(s) fetched" in err and "1 already complete" in err, repr(err)

    rc, out, err = run_on_pty(argv + ["--quiet"], base_env(TERM="xterm"))
    assert rc == 0, err
    clean(out)
    assert err == "", f"--quiet wrote to the terminal: {err!r}"
