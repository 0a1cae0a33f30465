"""Audit of the ``fastload`` command line: stdout/stderr separation, exit codes, ``FASTLOAD_*`` values,
``--dtype``/``--device`` spellings, odd paths, ``--trace`` on failures, pipes, Ctrl-C, ``--version`` and
``python -m fastload``.

The CLI runs in-process (``fastload.cli.main`` with capsys) and as the installed console script
(``.venv/bin/fastload``) in a subprocess, always with a timeout, against real files and the fixtures' servers.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from checkpoints import chunky_tensors, write_sharded, write_single
from fastload.cli import main

FASTLOAD = str(Path(sys.executable).with_name("fastload"))
TIMEOUT = 60


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """~0.76 MB: three f32 200x300 tensors, a bf16 and an int64 one."""
    return write_single(tmp_path_factory.mktemp("cli_audit2") / "model.safetensors",
                        chunky_tensors(seed=11, layers=3, shape=(200, 300)))


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLOAD_")}
    env.update(extra)
    return env


def cli(*argv: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([FASTLOAD, *argv], capture_output=True, text=True, timeout=TIMEOUT,
                          env=base_env() if env is None else env, **kwargs)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(err: str) -> bool:
    return err.startswith("fastload: error: ") and err.count("\n") == 1 and err.endswith("\n") \
        and "Traceback" not in err


# -- --json: stdout is exactly one JSON document ------------------------------------------------------------------


def test_json_stdout_is_one_document_and_stderr_has_the_rest(ckpt, tmp_path):
    """``load --json --trace`` and ``inspect --json`` as real processes: stdout parses as one JSON document
    (nothing else mixed in), the "trace written" note goes to stderr."""
    trace = tmp_path / "out.json"
    proc = cli("load", str(ckpt), "--json", "--trace", str(trace), "--dtype", "float16")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["bytes_fetched"] == ckpt.stat().st_size
    assert proc.stderr == f"trace written to {trace}\n"
    assert "traceEvents" in json.loads(trace.read_text())
    proc = cli("inspect", str(ckpt), "--json", "--all", "--top", "1")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    doc = json.loads(proc.stdout)
    assert {t["name"] for t in doc["tensors"]} == set(safetensors.torch.load_file(ckpt))


@pytest.mark.parametrize("command", ["load", "inspect"])
def test_json_failure_prints_nothing_on_stdout(command, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!")
    proc = cli(command, str(bad), "--json")
    assert proc.returncode == 1 and proc.stdout == "" and one_line_error(proc.stderr), proc.stderr


# -- exit codes: usage errors are argparse's 2, failures 1 -----------------------------------------------------------


@pytest.mark.parametrize("argv", [[], ["load"], ["inspect"], ["pull"], ["load", "x", "--concurrency", "many"],
                                  ["load", "x", "--names"], ["nosuchcommand"], ["load", "x", "--bogus"]])
def test_usage_errors_exit_2_on_stderr(argv):
    proc = cli(*argv)
    assert proc.returncode == 2 and proc.stdout == "", (argv, proc.returncode, proc.stdout)
    assert "usage: fastload" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_help_exits_0_without_running_anything():
    proc = cli("bench", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: fastload bench"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_load_failure_exits_1_with_one_line(tmp_path):
    proc = cli("load", str(tmp_path / "absent.safetensors"))
    assert proc.returncode == 1 and proc.stdout == "" and one_line_error(proc.stderr), proc.stderr


def test_empty_chunk_size_is_an_error_like_every_other_bad_value(ckpt, capsys, monkeypatch):
    """``--chunk-size ''`` is not a size; ``FASTLOAD_CHUNK_BYTES=''`` and ``--concurrency ''`` are errors, but the
    empty flag value is silently taken as "not given" (``if args.chunk_size``) and the load runs at the default."""
    monkeypatch.setenv("FASTLOAD_CHUNK_BYTES", "")
    rc, _, err = run_cli(capsys, "inspect", str(ckpt))
    assert rc == 1 and one_line_error(err), err
    monkeypatch.delenv("FASTLOAD_CHUNK_BYTES")
    rc, out, err = run_cli(capsys, "inspect", str(ckpt), "--chunk-size", "")
    assert rc != 0, f"--chunk-size '' accepted: {out.splitlines()[0]!r}"
    assert "Traceback" not in err


# -- FASTLOAD_* environment variables --------------------------------------------------------------------------------

BAD_ENV = [
    ("FASTLOAD_CHUNK_BYTES", "abc"), ("FASTLOAD_CHUNK_BYTES", "0"), ("FASTLOAD_CHUNK_BYTES", "1e3"),
    ("FASTLOAD_CHUNK_BYTES", "-16MiB"), ("FASTLOAD_CHUNK_BYTES", "9" * 30), ("FASTLOAD_CHUNK_BYTES", "nan"),
    ("FASTLOAD_CHUNK_BYTES", "inf"), ("FASTLOAD_CHUNK_BYTES", "16Mi"),
    ("FASTLOAD_MAX_CONCURRENCY", "0"), ("FASTLOAD_MAX_CONCURRENCY", "-3"), ("FASTLOAD_MAX_CONCURRENCY", "1e3"),
    ("FASTLOAD_MAX_CONCURRENCY", "9" * 30),
    ("FASTLOAD_HOST_BUFFER_BYTES", "1k"), ("FASTLOAD_LOCAL_THREADS", "0"), ("FASTLOAD_LOCAL_THREADS", "4.0"),
    ("FASTLOAD_STALL_TIMEOUT_S", "nan"), ("FASTLOAD_STALL_TIMEOUT_S", "inf"), ("FASTLOAD_STALL_TIMEOUT_S", "0"),
    ("FASTLOAD_STALL_TIMEOUT_S", "1e999"), ("FASTLOAD_HTTP_ENGINE", ""),
]


@pytest.mark.parametrize("command", ["load", "inspect", "pull"])
def test_bad_environment_values_are_one_line_errors(capsys, monkeypatch, ckpt, tmp_path, command):
    extra = ["--to", str(tmp_path / "out")] if command == "pull" else []
    for var, value in BAD_ENV:
        monkeypatch.setenv(var, value)
        try:
            rc, out, err = run_cli(capsys, command, str(ckpt), *extra)
        except Exception as exc:  # noqa: BLE001 - a traceback for the user
            pytest.fail(f"{var}={value!r}: {type(exc).__name__}: {exc}")
        assert rc == 1 and out == "" and one_line_error(err), (var, value, err)
        monkeypatch.delenv(var)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_environment_value_error_names_the_variable(capsys, monkeypatch, ckpt):
    """The user never typed ``chunk_bytes``: an error caused by ``FASTLOAD_CHUNK_BYTES=0`` must say which
    variable is wrong (as ``FASTLOAD_MAX_CONCURRENCY=x`` already does), or the user has to guess that a
    forgotten export in their shell is why ``fastload load`` refuses to run."""
    unclear = []
    for var, value in BAD_ENV:
        monkeypatch.setenv(var, value)
        _, _, err = run_cli(capsys, "load", str(ckpt))
        if var not in err:
            unclear.append(f"{var}={value!r} -> {err.strip()}")
        monkeypatch.delenv(var)
    assert unclear == [], "\n".join(unclear)


def test_good_environment_values_are_used(ckpt):
    proc = cli("inspect", str(ckpt), "--json", env=base_env(FASTLOAD_CHUNK_BYTES="128k",
                                                            FASTLOAD_MAX_CONCURRENCY=" 2 "))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["chunk_bytes"] == 128 * 1024


# -- --dtype / --device --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling,dtype", [("bfloat16", torch.bfloat16), ("torch.bfloat16", torch.bfloat16),
                                            ("float16", torch.float16), ("half", torch.float16),
                                            ("torch.float32", torch.float32)])
def test_dtype_spellings_convert(capsys, ckpt, spelling, dtype):
    rc, out, err = run_cli(capsys, "load", str(ckpt), "--dtype", spelling)
    assert rc == 0, err
    want = safetensors.torch.load_file(ckpt)
    floats = sum(1 for t in want.values() if t.is_floating_point())
    name = str(dtype).removeprefix("torch.")
    assert f"{floats} {name}" in out.splitlines()[0], out.splitlines()[0]


@pytest.mark.parametrize("spelling", ["bf16", "fp16", "BFloat16", "torch.", "", "__class__", "int8", "cfloat"])
def test_bad_dtype_spellings_are_one_line_errors(capsys, ckpt, spelling):
    rc, out, err = run_cli(capsys, "load", str(ckpt), "--dtype", spelling)
    assert rc == 1 and out == "" and one_line_error(err), (spelling, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_one_clear_line(device, ckpt):
    proc = cli("load", str(ckpt), "--device", device, "--json")
    assert proc.returncode == 1 and proc.stdout == "" and one_line_error(proc.stderr), proc.stderr
    assert "CUDA" in proc.stderr


@pytest.mark.parametrize("device", ["cuda:-1", "CPU", "", "meta", "mps", "0", "cuda:0 "])
def test_bad_devices_are_one_line_errors(capsys, ckpt, device):
    rc, out, err = run_cli(capsys, "load", str(ckpt), "--device", device)
    assert rc == 1 and out == "" and one_line_error(err), (device, err)


# -- paths ----------------------------------------------------------------------------------------------------------


def test_paths_with_spaces_unicode_and_url_characters(capsys, ckpt, tmp_path):
    """A plain path is a path: ``#``, ``?``, ``%20`` and spaces in it are literal; ``file://`` is percent-decoded."""
    d = tmp_path / "my models" / "ü 模型"
    d.mkdir(parents=True)
    target = d / "m #1 %20?.safetensors"
    target.write_bytes(ckpt.read_bytes())
    for source in (str(target), str(d), str(d) + "/", target.as_uri()):
        rc, out, err = run_cli(capsys, "load", source)
        assert rc == 0 and out.startswith("loaded 5 tensor(s)"), (source, err)
    rc, out, err = run_cli(capsys, "inspect", str(target), "--json")
    assert rc == 0 and json.loads(out)["files"][0]["url"] == str(target)


@pytest.mark.parametrize("source", ["-", ""])
def test_dash_and_empty_source_are_one_line_errors(source, tmp_path):
    proc = cli("load", source, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == "" and one_line_error(proc.stderr), proc.stderr


@pytest.mark.parametrize("command", ["load", "inspect", "pull"])
def test_non_utf8_file_name_does_not_crash_the_output(command, ckpt, tmp_path):
    """Linux file names are bytes: ``d\\xff/model.safetensors`` is a valid path (Python hands it over as a
    surrogate escape) and it loads, but printing "... from <path>" to a UTF-8 stdout with the usual strict
    error handler (any en_US.UTF-8 desktop; emulated with PYTHONIOENCODING=utf-8) raised UnicodeEncodeError,
    a traceback after a successful load."""
    raw = os.fsencode(tmp_path) + b"/d\xff"
    os.mkdir(raw)
    with open(raw + b"/model.safetensors", "wb") as f:
        f.write(ckpt.read_bytes())
    source = os.fsdecode(raw + b"/model.safetensors")
    extra = ["--to", str(tmp_path / "out"), "--quiet"] if command == "pull" else []
    proc = subprocess.run([FASTLOAD, command, source, *extra], capture_output=True, timeout=TIMEOUT,
                          env=base_env(PYTHONIOENCODING="utf-8"))
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err and "UnicodeEncodeError" not in err, err[-600:]
    assert proc.returncode == 0, err


def test_directory_with_an_index_loads_every_shard(capsys, tmp_path):
    tensors = {f"layer{i}.weight": torch.full((64, 33), float(i)) for i in range(5)}
    directory = write_sharded(tmp_path / "sharded", tensors, 3)
    (directory / "stray.safetensors").write_bytes(b"garbage!")  # the index decides, not the listing
    rc, out, err = run_cli(capsys, "load", str(directory), "--json")
    assert rc == 0, err
    assert json.loads(out)["bytes_fetched"] > sum(t.numel() * 4 for t in tensors.values())
    rc, out, _ = run_cli(capsys, "inspect", str(directory), "--json")
    assert sorted(t["name"] for t in json.loads(out)["tensors"]) == sorted(tensors)


# -- terminal safety and one-line errors for names that come from a listing ----------------------------------------


def test_inspect_escapes_control_characters_in_listed_file_names(ckpt, tmp_path):
    """A directory (or S3 prefix) is listed: its file names are data, like tensor names and metadata, which
    ``inspect`` already escapes. A file named ``esc\\x1b[31mred.safetensors`` reached the terminal raw in the
    "files:" section (an ANSI escape sequence: colours, cursor moves, window title...)."""
    d = tmp_path / "listing"
    d.mkdir()
    (d / "esc\x1b[2J\x1b[31mred.safetensors").write_bytes(ckpt.read_bytes())
    proc = cli("inspect", str(d))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout, [line for line in proc.stdout.splitlines() if "\x1b" in line]


def test_error_about_a_listed_file_with_a_newline_is_one_line(ckpt, tmp_path):
    """README: "Command-line errors are one line". A directory whose listed shard is corrupt and is named
    ``z\\nline.safetensors`` gave a two-line error: the file name went into the message unescaped."""
    d = tmp_path / "listing"
    d.mkdir()
    (d / "a.safetensors").write_bytes(ckpt.read_bytes())
    (d / "z\nline.safetensors").write_bytes(b"garbage!")
    for command in ("load", "inspect"):
        proc = cli(command, str(d))
        assert proc.returncode == 1 and proc.stdout == "", proc.stderr
        assert one_line_error(proc.stderr), repr(proc.stderr)


# -- --trace when the load fails ---------------------------------------------------------------------------------------


def chrome_trace_with_error(path: Path) -> list[str]:
    doc = json.loads(path.read_text())
    assert isinstance(doc["traceEvents"], list) and doc["traceEvents"]
    return doc["fastload"]["summary"]["errors"]


def test_trace_is_written_when_the_load_fails(capsys, ckpt, tmp_path, http_server, http_dir):
    """README: the Chrome trace is "written when the load ends (also if it fails)"."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!")
    (http_dir / "cut.safetensors").write_bytes(ckpt.read_bytes())
    url = http_server.url_for(http_dir / "cut.safetensors")
    cases = [[str(bad)], [str(tmp_path / "absent.safetensors")], [str(ckpt), "--names", "nope"]]
    for i, argv in enumerate(cases):
        out = tmp_path / f"t{i}.json"
        rc, stdout, err = run_cli(capsys, "load", *argv, "--trace", str(out))
        assert rc == 1 and one_line_error(err) and stdout == "", (argv, err)
        assert out.exists(), f"no trace written for failed load {argv}"
        assert chrome_trace_with_error(out), argv
    # an HTTP object replaced after the header was read: SourceChangedError mid-load
    http_server.faults.change_etag_after(2)
    out = tmp_path / "http.json"
    proc = cli("load", url, "--trace", str(out), "--json", "--chunk-size", "64KiB")
    assert proc.returncode == 1 and proc.stdout == "" and one_line_error(proc.stderr), proc.stderr
    assert any("SourceChangedError" in e for e in chrome_trace_with_error(out)), chrome_trace_with_error(out)


# -- pull output in a log file ----------------------------------------------------------------------------------------


def test_pull_to_a_log_file_has_no_progress_spam(ckpt, tmp_path):
    """stdout and stderr redirected to files (a CI log): no progress bar, no carriage returns, no escape
    sequences; stdout is the destination path only, stderr the one summary line."""
    dest = tmp_path / "dest"
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        rc = subprocess.run([FASTLOAD, "pull", str(ckpt), "--to", str(dest), "--chunk-size", "64KiB"],
                            stdout=out, stderr=err, stdin=subprocess.DEVNULL, timeout=TIMEOUT,
                            env=base_env(TERM="dumb", NO_COLOR="1")).returncode
    stdout, stderr = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert rc == 0, stderr
    assert stdout == f"{dest / ckpt.name}\n"
    assert "\r" not in stderr and "\x1b" not in stderr and stderr.count("\n") == 1, repr(stderr)
    assert stderr.startswith("1 file(s) fetched")
    assert (dest / ckpt.name).read_bytes() == ckpt.read_bytes()


# -- pipes -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["inspect", "{ckpt}"], ["inspect", "{ckpt}", "--json"], ["load", "{ckpt}"],
                                  ["load", "{ckpt}", "--json"]])
def test_stdout_a_closed_pipe_small_output(ckpt, argv):
    """``fastload inspect m | true``: the reader is gone before fastload writes. The short output sits in
    stdout's buffer until the interpreter exits, and the flush there failed: "Exception ignored in:
    <_io.TextIOWrapper name='<stdout>'> BrokenPipeError" on stderr and exit status 120 (the cli's own
    BrokenPipeError handling only sees errors raised inside the command). Large outputs are handled
    (test_cli_corners), small ones, the common case, are not. PYTHONUNBUFFERED is cleared: it hides this."""
    argv = [a.format(ckpt=ckpt) for a in argv]
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([FASTLOAD, *argv], stdout=write, stderr=subprocess.PIPE, text=True, timeout=TIMEOUT,
                              env={k: v for k, v in base_env().items() if k != "PYTHONUNBUFFERED"})
    finally:
        os.close(write)
    assert "BrokenPipeError" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 141), proc.returncode


# -- Ctrl-C while the body hangs -----------------------------------------------------------------------------------


def test_ctrl_c_mid_body_load_json_exits_130_with_nothing_on_stdout(ckpt, http_server, http_dir, tmp_path):
    (http_dir / "hang.safetensors").write_bytes(ckpt.read_bytes())
    url = http_server.url_for(http_dir / "hang.safetensors")
    http_server.faults.stall_after(1000)
    proc = subprocess.Popen([FASTLOAD, "load", url, "--json", "--chunk-size", "64KiB"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=base_env())
    try:
        deadline = time.monotonic() + 30
        while len([r for r in http_server.log if r.body_bytes >= 1000]) < 1 and proc.poll() is None:
            assert time.monotonic() < deadline, "the load never reached the stalled body"
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err == "fastload: interrupted\n" and out == "", (proc.returncode, err, out)
    assert took < 5


# -- --version and python -m fastload ----------------------------------------------------------------------------------


def test_version_flag_matches_the_package_metadata():
    """``fastload --version`` is what users (and bug reports) reach for; the parser has no such option, so it
    fails with "the following arguments are required: command" and status 2."""
    proc = cli("--version")
    want = importlib.metadata.version("fastload")
    assert proc.returncode == 0 and want in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)


def test_python_dash_m_fastload_is_the_console_script(ckpt):
    """``python -m fastload`` (no console script on PATH, e.g. in a bare venv or a container) must behave like
    ``fastload``: there is no ``fastload/__main__.py``, so it fails with "No module named fastload.__main__"."""
    proc = subprocess.run([sys.executable, "-m", "fastload", "inspect", str(ckpt), "--json"], capture_output=True,
                          text=True, timeout=TIMEOUT, env=base_env())
    script = cli("inspect", str(ckpt), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(script.stdout)
    usage = subprocess.run([sys.executable, "-m", "fastload"], capture_output=True, text=True, timeout=TIMEOUT,
                           env=base_env())
    assert usage.returncode == 2 and "usage: fastload" in usage.stderr, usage.stderr
