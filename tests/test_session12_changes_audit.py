"""Audit of session 12's changes, at their edges: local directories pinned through links, loads waiting for a
pull's lock, JSON taken whole from a 200 probe, Trace checked at construction, S3Options pickled without its
session, and a load that fails in a thread while the interpreter's main thread has stopped.

Real files, the fixtures' HTTP server, real subprocesses and real flock()s; nothing inside fastload is mocked.
"""

from __future__ import annotations

import asyncio
import copy
import fcntl
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import botocore.session
import pytest
import torch

import fastload
from checkpoints import write_sharded
from fastload import LoadConfig
from fastload.config import S3Options
from reliability_helpers import assert_bit_exact, bounded, fds, make_tensors, wait_for_no_new_fds, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")


def _python(code: str, timeout: float = 12.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# -- runner: a stopped main thread is not always interpreter exit ------------------------------------------------


def test_a_load_failing_in_a_non_daemon_thread_after_main_returned_raises_its_own_error(tmp_path):
    """threading's shutdown marks the main thread stopped, then joins the non-daemon threads, which still run
    user code for as long as they like. A load there that fails for its own reason must raise that error (the
    thread's ``except`` handles it); it became SystemExit, which ends the thread silently."""
    missing = tmp_path / "does-not-exist"
    done = _python(f"""
        import threading, time
        import fastload

        def work():
            time.sleep(0.3)  # the main thread has returned by now
            try:
                fastload.load({str(missing)!r})
            except fastload.SourceNotFoundError:
                print("CAUGHT", flush=True)
            except BaseException as exc:
                print("ESCAPED", type(exc).__name__, flush=True)
                raise

        threading.Thread(target=work).start()
    """)
    assert "CAUGHT" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_a_load_in_a_non_daemon_thread_after_main_returned_succeeds(tmp_path):
    path, want = write_checkpoint(tmp_path / "m.safetensors")
    done = _python(f"""
        import threading, time
        import fastload

        def work():
            time.sleep(0.3)
            got = fastload.load({str(path)!r})
            print("LOADED", len(got), flush=True)

        threading.Thread(target=work).start()
    """)
    assert f"LOADED {len(want)}" in done.stdout, (done.stdout, done.stderr[-2000:])


# -- local: waiting for a pull's lock ---------------------------------------------------------------------------


def test_a_load_from_the_pulls_own_progress_callback_of_a_folder_in_its_destination_does_not_hang(tmp_path):
    """A pull holds its destination's lock exclusively; a load in the same process, from the pull's progress
    callback, of a folder inside that destination waits for the lock while the pull waits for the callback:
    the process hung for ever. It must end (the folder loaded, or a clear error) within seconds."""
    source, _ = write_checkpoint(tmp_path / "src" / "model.safetensors")
    dest = tmp_path / "dest"
    write_checkpoint(dest / "old" / "model.safetensors", seed=1)
    done = None
    try:
        done = _python(f"""
            import fastload
            calls = []

            def progress(done, total):
                if calls:
                    return
                calls.append(1)
                try:
                    print("INNER", len(fastload.load({str(dest / "old")!r})), flush=True)
                except fastload.FastloadError as exc:
                    print("INNER-ERROR", type(exc).__name__, flush=True)

            fastload.pull({str(source.parent)!r}, to={str(dest)!r}, progress=progress)
            print("PULLED", flush=True)
        """, timeout=10)
    except subprocess.TimeoutExpired:
        pass
    assert done is not None, "pull + load from its progress callback hung (deadlock on the pull's own lock)"
    assert "PULLED" in done.stdout, (done.stdout, done.stderr[-2000:])


def _held_lock(dest: Path) -> int:
    lock = dest / ".fastload" / "pull.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a pull in another process holds it
    return fd


def test_aload_cancelled_while_waiting_for_a_pulls_lock_ends_at_once_and_leaves_nothing(tmp_path):
    dest = tmp_path / "dest"
    write_sharded(dest, make_tensors(), 2)
    fd = _held_lock(dest)
    try:
        before = fds()

        async def main():
            task = asyncio.ensure_future(fastload.aload(str(dest)))
            await asyncio.sleep(0.6)
            assert not task.done()  # waiting for the lock
            t0 = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return time.monotonic() - t0

        took = bounded(lambda: asyncio.run(main()), 10)
        assert took < 1.0
        assert not wait_for_no_new_fds(before)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    # nothing of the cancelled load holds the lock shared: a pull can take it
    fd = _held_lock(dest)
    os.close(fd)


def test_stream_closed_while_waiting_for_a_pulls_lock_ends_at_once_and_a_load_after_the_pull_is_exact(tmp_path):
    dest = tmp_path / "dest"
    want = make_tensors(seed=3)
    write_sharded(dest, want, 3)
    fd = _held_lock(dest)
    before = fds()
    try:
        opened: list = []
        got: list = []

        def read():
            with fastload.stream(str(dest / "model.safetensors.index.json")) as s:
                opened.append(s)
                got.extend(_drain(s))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        time.sleep(0.6)
        assert reader.is_alive() and opened and not got  # waiting for the pull
        t0 = time.monotonic()
        opened[0].close()
        reader.join(5)
        assert not reader.is_alive() and time.monotonic() - t0 < 2.0
        assert not wait_for_no_new_fds(before)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    assert_bit_exact(bounded(lambda: fastload.load(str(dest)), 10), want)


def _drain(s):
    try:
        return [name for name, _ in s]
    except Exception as exc:  # noqa: BLE001 - a closed stream may say so
        return [type(exc).__name__]


def test_a_load_waits_for_a_pull_in_another_thread_and_gets_the_whole_new_checkpoint(tmp_path):
    src = tmp_path / "src"
    want = make_tensors(seed=5)
    write_sharded(src, want, 3)
    dest = tmp_path / "dest"
    fd = _held_lock(dest)  # a pull under way
    result: dict = {}
    loader = threading.Thread(target=lambda: result.setdefault("v", fastload.load(str(dest))), daemon=True)
    loader.start()
    time.sleep(0.4)
    for name in sorted(os.listdir(src)):  # files land one by one, as a pull puts them
        os.link(src / name, dest / name)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    loader.join(10)
    assert_bit_exact(result["v"], want)


# -- resolve: a directory behind a link, pinned -----------------------------------------------------------------


def test_links_dotdot_relative_and_file_urls_load_what_the_kernel_names(tmp_path, monkeypatch):
    v1, v2 = tmp_path / "rel" / "v1", tmp_path / "rel" / "v2"
    want1, want2 = make_tensors(seed=1), make_tensors(seed=2)
    write_sharded(v1, want1, 2)
    write_sharded(v2, want2, 2)
    (tmp_path / "rel" / "current").symlink_to("v1")
    (tmp_path / "rel" / "v1" / "up").symlink_to(v2)  # current/up -> v2; current/up/.. is rel (kernel), not v1
    monkeypatch.chdir(tmp_path)
    assert_bit_exact(fastload.load("rel/current"), want1)
    assert_bit_exact(fastload.load("rel/current/up/../v2"), want2)  # .. after a link: the link's parent
    assert_bit_exact(fastload.load((tmp_path / "rel" / "current").as_uri()), want1)
    assert_bit_exact(fastload.load((tmp_path / "rel" / "current" / "model.safetensors.index.json").as_uri()), want1)
    assert_bit_exact(fastload.load("rel/current/model.safetensors.index.json"), want1)
    monkeypatch.chdir(v1)
    assert_bit_exact(fastload.load("model.safetensors.index.json"), want1)  # no directory part at all
    plan = fastload.plan(str(tmp_path / "rel" / "current"))
    assert "v1" in str(plan) and "v2" not in str(plan)


# -- trace: checked at construction ----------------------------------------------------------------------------


def test_trace_given_an_existing_directory_is_refused_at_construction(tmp_path):
    """Trace(path) is checked when made so that a path that cannot be written does not cost the load's tensors
    at its end; a directory named ``x.json`` passes the check, and the load then fails after every tensor."""
    path, _ = write_checkpoint(tmp_path / "m.safetensors")
    (tmp_path / "t.json").mkdir()
    try:
        trace = fastload.Trace(str(tmp_path / "t.json"))
    except fastload.ConfigError:
        return
    got = fastload.load(str(path), trace=trace)  # must not fail at its end when construction accepted the path
    assert got


def test_trace_otel_and_path_types(tmp_path):
    for bad in (0, "false", 1):
        with pytest.raises(fastload.ConfigError):
            fastload.Trace(otel=bad)
    for bad in (b"/tmp/x.json", 3, str(tmp_path / "t.txt"), ""):
        with pytest.raises(fastload.ConfigError):
            fastload.Trace(bad)
    t = fastload.Trace(tmp_path / "ok.json")  # a Path is fine
    path, _ = write_checkpoint(tmp_path / "m.safetensors")
    fastload.load(str(path), trace=t)
    assert (tmp_path / "ok.json").stat().st_size > 0


# -- config: S3Options and its session --------------------------------------------------------------------------


def _session_with_keys():
    session = botocore.session.Session()
    session.set_credentials("AKIDEXAMPLE", "not-a-secret")
    return session


def test_deepcopy_of_a_config_keeps_its_botocore_session():
    """Pickling leaves the session behind (it belongs to the process). copy.deepcopy goes through the same
    __reduce__: a config deep-copied in the same process (a framework copying its settings) silently lost the
    session and the credentials set on it, still comparing equal to the original."""
    session = _session_with_keys()
    config = LoadConfig(s3=S3Options(session=session, region="us-east-1"))
    copied = copy.deepcopy(config)
    assert copied == config
    assert copied.s3.session is not None, "deepcopy dropped the session (and its credentials)"
    assert copied.s3.session.get_credentials().access_key == "AKIDEXAMPLE"


def test_pickle_of_s3options_keeps_fields_equality_hash_and_the_sessions_profile(tmp_path, monkeypatch):
    plain = S3Options(profile="dev", region="eu-west-1", anonymous=False, presign_expiry_s=600)
    back = pickle.loads(pickle.dumps(plain))
    assert back == plain and hash(back) == hash(plain) and back.profile == "dev"
    config = LoadConfig(s3=plain, max_concurrency=3)
    assert pickle.loads(pickle.dumps(config)) == config
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    (tmp_path / "config").write_text("[profile prod]\nregion = us-west-2\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    session = botocore.session.Session(profile="prod")
    back = pickle.loads(pickle.dumps(S3Options(session=session)))
    assert back.session is None and back.profile == "prod"
    with pytest.raises(fastload.ConfigError):
        S3Options(profile="")


# -- plan: Shard with numpy ints --------------------------------------------------------------------------------


def test_shard_of_numpy_ints_loads_like_plain_ints(tmp_path):
    np = pytest.importorskip("numpy")
    path, want = write_checkpoint(tmp_path / "m.safetensors")
    a = fastload.Shard(world_size=np.int64(2), rank=np.int32(1), rules={r"w\d": np.int64(0)})
    b = fastload.Shard(world_size=2, rank=1, rules={r"w\d": 0})
    assert a == b and hash(a) == hash(b) and type(a.rank) is int
    got_a, got_b = fastload.load(str(path), shard=a), fastload.load(str(path), shard=b)
    assert got_a.keys() == got_b.keys() and all(torch.equal(got_a[k], got_b[k]) for k in got_a)


# -- http: a JSON answered 200 whole ----------------------------------------------------------------------------


def test_json_answered_200_with_a_short_body_is_retried_and_then_loads(http_server, http_dir):
    want = make_tensors(seed=7)
    write_sharded(http_dir, want, 2)
    index = http_server.url_for(http_dir / "model.safetensors.index.json")
    http_server.faults.ignore_range(path="*.json")
    http_server.faults.short_body(5, times=1, path="*.json")
    got = bounded(lambda: fastload.load(index, config=LoadConfig(retry=fastload.RetryConfig(backoff_base_s=0.01,
                                                                                            backoff_max_s=0.05))), 15)
    assert_bit_exact(got, want)
    json_requests = http_server.requests("*.json")
    assert len(json_requests) == 2, [(r.status, r.range) for r in json_requests]  # one cut, one whole: no more


def test_json_answered_200_always_short_is_a_typed_error_not_a_format_error(http_server, http_dir):
    write_sharded(http_dir, make_tensors(seed=8), 2)
    index = http_server.url_for(http_dir / "model.safetensors.index.json")
    http_server.faults.ignore_range(path="*.json")
    http_server.faults.short_body(5, path="*.json")
    config = LoadConfig(retry=fastload.RetryConfig(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.05))
    with pytest.raises(fastload.TransferError):
        bounded(lambda: fastload.load(index, config=config), 15)
    assert len(http_server.requests("*.json")) == 3
