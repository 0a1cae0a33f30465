"""Corners of the ``fastload`` command line (run as a real subprocess) and of ``progress=``.

The CLI is started as ``.venv/bin/fastload`` (the installed console script) against real servers from
the fixtures; nothing under test is mocked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastload
from checkpoints import chunky_tensors, write_single
from reliability_helpers import run_on_pty
from servers.faults import Hang

FASTLOAD = str(Path(sys.executable).with_name("fastload"))
SMALL = fastload.LoadConfig(chunk_bytes=64 * 1024, host_buffer_bytes=256 * 1024, max_concurrency=4)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """~0.76 MB: three f32 200x300 tensors (several 64 KiB chunks each), a bf16 and an int64 one."""
    return write_single(tmp_path_factory.mktemp("cli_corners") / "model.safetensors",
                        chunky_tensors(seed=5, layers=3, shape=(200, 300)))


def start(*argv: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([FASTLOAD, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **kwargs)


def interrupt(proc: subprocess.Popen, within_s: float) -> tuple[float, str, str]:
    """SIGINT ``proc``; returns (seconds it took to exit, stdout, stderr). Kills it and fails past ``within_s``."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"fastload still running {within_s} s after Ctrl-C; stderr so far: {err[-1000:]!r}")
    return time.monotonic() - sent, out, err


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the subprocess to reach the server")
        time.sleep(0.05)


# -- Ctrl-C -----------------------------------------------------------------------------------------------------


def test_ctrl_c_while_an_s3_head_hangs_exits_promptly(ckpt, s3_server, s3_bucket, s3_proxy):
    """README: "Ctrl-C stops all I/O". An S3 HEAD that gets no answer (the server hangs) must not keep
    ``fastload load`` alive after Ctrl-C until botocore's read timeout (stall_timeout_s, 30 s). (``--verify``:
    checksums come with a HEAD, so it is always asked.)"""
    s3_server.put(s3_bucket, "m.safetensors", ckpt.read_bytes())
    s3_proxy.faults._add(Hang(methods=frozenset({"HEAD"})))
    env = dict(os.environ, AWS_ENDPOINT_URL=s3_proxy.url)
    proc = start("load", f"s3://{s3_bucket}/m.safetensors", "--verify", env=env)
    wait_for(lambda: any(r.method == "HEAD" for r in s3_proxy.log) or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.3)
    took, out, err = interrupt(proc, within_s=6)
    assert proc.returncode == 130 and err == "fastload: interrupted\n", (proc.returncode, err)
    assert took < 5, f"took {took:.1f} s to stop after Ctrl-C"


def test_load_verify_checks_the_published_sha256(ckpt, s3_server, s3_bucket, s3_proxy):
    """``fastload load --verify``: the object's ChecksumSHA256 (asked for with a HEAD) is checked as it streams;
    without the flag nothing is checked (and no HEAD asked)."""
    import json

    s3_server.client().put_object(Bucket=s3_bucket, Key="v/model.safetensors", Body=ckpt.read_bytes(),
                                  ChecksumAlgorithm="SHA256")
    env = dict(os.environ, AWS_ENDPOINT_URL=s3_proxy.url)
    url = f"s3://{s3_bucket}/v/model.safetensors"
    runs = {flag: subprocess.run([FASTLOAD, "load", url, "--json", *flag], capture_output=True, text=True, env=env,
                                 timeout=60) for flag in ((), ("--verify",))}
    heads = [r for r in s3_proxy.log if r.method == "HEAD"]
    for flag, done in runs.items():
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["counters"].get("checksums_verified") == (1 if flag else None), done.stdout
    assert len(heads) == 1, heads


def test_ctrl_c_mid_body_pull_leaves_no_file_under_its_final_name(ckpt, http_server, http_dir, tmp_path):
    """A pull interrupted while bodies are stalled mid-way: exit 130 at once, nothing on stdout (the
    destination is printed only on success), and no file under the final name."""
    (http_dir / "m.safetensors").write_bytes(ckpt.read_bytes())
    url = http_server.url_for(http_dir / "m.safetensors")
    http_server.faults.stall_after(1000)  # the 8-byte probe passes; each 64 KiB body stops after 1000 bytes
    dest = tmp_path / "dest"
    proc = start("pull", url, "--to", str(dest), "--chunk-size", "64KiB", "--concurrency", "2")
    wait_for(lambda: len(http_server.log) >= 2 or proc.poll() is not None)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.5)
    took, out, err = interrupt(proc, within_s=10)
    assert proc.returncode == 130 and err == "fastload: interrupted\n", (proc.returncode, err)
    assert out == "" and took < 5
    assert not (dest / "m.safetensors").exists()
    assert [p for p in dest.rglob("*") if p.is_file() and ".fastload" not in p.parts] == []


# -- bad flag values, pipes, terminals ------------------------------------------------------------------------


def test_inspect_negative_top_is_rejected(ckpt):
    """``--top -2`` is not "how many of the largest tensors to list": today it slices ``[:-2]`` and prints
    "largest 3 tensor(s)" for a 5-tensor checkpoint. A bad flag value must be an error."""
    proc = subprocess.run([FASTLOAD, "inspect", str(ckpt), "--top", "-2"], capture_output=True, text=True,
                          timeout=60)
    assert "largest 3 tensor(s)" not in proc.stdout, "--top -2 listed 3 tensors (slice [:-2]) and exited 0"
    assert proc.returncode != 0 and "--top" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_output_piped_into_head_gives_no_error(tmp_path):
    """``fastload inspect --all big | head -1``: the reader leaving early is not an error worth reporting
    (no "fastload: error: [Errno 32] Broken pipe" on stderr, no traceback)."""
    path = tmp_path / "many.safetensors"
    save_file({f"layer{i}.weight": torch.zeros(2) for i in range(5000)}, str(path))  # --all prints ~400 kB
    proc = start("inspect", str(path), "--all")
    first = proc.stdout.readline()
    proc.stdout.close()  # like `head -1` exiting
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert first.startswith("1 file(s), 5000 tensor(s)")
    assert "Broken pipe" not in err and "Traceback" not in err, err


def base_env(**extra) -> dict:
    """This environment without FASTLOAD_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLOAD_")}
    env.update(extra)
    return env


def test_pull_progress_bar_goes_to_stderr_on_a_terminal(ckpt, tmp_path):
    """README: "a progress bar on a terminal". With stderr a terminal and stdout a pipe, the bar reaches
    100% on stderr and stdout carries only the destination path."""
    dest = tmp_path / "dest"
    rc, out, err = run_on_pty([FASTLOAD, "pull", str(ckpt), "--to", str(dest), "--chunk-size", "64KiB"],
                               base_env(TERM="xterm"))
    assert rc == 0, err
    assert out.strip() == str(dest / ckpt.name)
    assert "pull: 100%" in err and "1 file(s) fetched" in err, err


# -- progress= --------------------------------------------------------------------------------------------------


def output_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_progress_adds_up_for_load_and_stream(ckpt):
    calls = []
    got = fastload.load(ckpt, config=SMALL, progress=lambda done, total: calls.append((done, total)))
    assert len(calls) > 5 and calls[-1] == (output_bytes(got), output_bytes(got))
    assert all(b[0] > a[0] and b[1] == a[1] for a, b in zip(calls, calls[1:]))
    calls.clear()
    with fastload.stream(ckpt, config=SMALL, names=["layer1.weight", "positions"],
                         progress=lambda done, total: calls.append((done, total))) as s:
        streamed = dict(s)
    assert set(streamed) == {"layer1.weight", "positions"}
    assert calls and calls[-1] == (output_bytes(streamed), output_bytes(streamed))


def test_progress_callback_error_fails_the_load(ckpt):
    class Stop(Exception):
        pass

    def progress(done, total):
        if done > 100_000:
            raise Stop("from the callback")

    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(Stop, match="from the callback"):
        fastload.load(ckpt, config=SMALL, progress=progress)
    with pytest.raises(Stop, match="from the callback"):
        with fastload.stream(ckpt, config=SMALL, progress=progress) as s:
            for _ in s:
                pass
    time.sleep(0.1)
    left = [t.name for t in threading.enumerate() if t.ident not in before]
    assert left == [], left


@pytest.mark.parametrize("value", [True, 1, "tqdm"])
def test_progress_must_be_callable(ckpt, value):
    with pytest.raises(fastload.ConfigError, match="progress must be a callable"):
        fastload.load(ckpt, progress=value)
    from tqdm import tqdm

    with tqdm(disable=True) as bar, pytest.raises(fastload.ConfigError):
        fastload.stream(ckpt, progress=bar)


def test_progress_of_a_local_dim1_shard_counts_the_bytes_read(ckpt):
    """``progress`` counts the result's bytes, whatever the reads spanned: a dim-1 shard of a local file reads
    its narrow rows with the gaps between them (752 kB for 282 kB of tensors), and progress still ends at the
    282 kB it delivered (it used to count the spans: 752 kB of "progress")."""
    shard = fastload.Shard(1, 3, {r"layer\d\.weight": 1})
    trace = fastload.Trace(otel=False)
    calls = []
    got = fastload.load(ckpt, config=SMALL, shard=shard, trace=trace,
                        progress=lambda done, total: calls.append((done, total)))
    header = fastload.plan(ckpt).files[0].data_start
    read = trace.summary().bytes_fetched - header
    assert read > output_bytes(got)  # the spans, gaps included
    assert calls[-1] == (output_bytes(got),) * 2, f"progress ended at {calls[-1]}"
    assert all(a <= b for (a, _), (b, _) in zip(calls, calls[1:]))
