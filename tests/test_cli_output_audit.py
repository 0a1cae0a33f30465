"""Audit of what the ``fastload`` console script prints, as a user runs it in shells and scripts.

Every test starts ``.venv/bin/fastload`` as a real subprocess against real files and the fixtures' HTTP and S3
servers: output encodings (``PYTHONIOENCODING=ascii``, ``LANG=C``) with non-ASCII tensor names, closed and
full standard streams, readers that leave early (``| head -c 10``), terminal safety of every table, wide and
very long tensor names, the pull progress bar on a pseudo-terminal (``TERM=dumb``, a failure mid-bar), ``~`` in
``--to``, the "trace written" note, ``file://localhost`` sources and ``--opt=value``, and the exit status and
streams of a success and of each error class over HTTP and S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import safetensors.torch
import torch

from checkpoints import write_single
from reliability_helpers import run_on_pty

FASTLOAD = str(Path(sys.executable).with_name("fastload"))
TIMEOUT = 60
CJK = "层.权重"  # a tensor name in Chinese, as exported by a Chinese-language fine-tune
LONG = "model.layers.0." + "very_long_submodule_name." * 8 + "weight"  # > 60 characters: overflows the column


@pytest.fixture(scope="module")
def uni(tmp_path_factory) -> Path:
    """A checkpoint whose tensor names and metadata are not ASCII, in a directory whose name is not either."""
    d = tmp_path_factory.mktemp("cli_output") / "modèle"
    d.mkdir()
    tensors = {CJK: torch.arange(12, dtype=torch.float32).reshape(3, 4), "ü.bias": torch.ones(5),
               LONG: torch.zeros(2, 2), "x": torch.tensor([1, 2], dtype=torch.int64)}
    return write_single(d / "model.safetensors", tensors, metadata={"format": "pt", "note": "日本語"})


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTLOAD_", "PYTHONIOENCODING", "LC_"))}
    env.pop("PYTHONUNBUFFERED", None)  # a real shell does not set it; it hides buffering problems
    env.update(extra)
    return env


def cli(*argv: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    return subprocess.run([FASTLOAD, *argv], timeout=TIMEOUT, env=base_env() if env is None else env, **kwargs)


def one_line_error(err: str) -> bool:
    return err.startswith("fastload: error: ") and err.count("\n") == 1 and err.endswith("\n") \
        and "Traceback" not in err


# -- output encodings --------------------------------------------------------------------------------------------


def test_non_ascii_names_on_an_ascii_stdout_do_not_crash(uni):
    """stdout whose encoding cannot hold the names (``PYTHONIOENCODING=ascii``; a legacy latin-1 or cp1252
    terminal is the same for CJK names) -- tensor names, metadata, the directory ``modèle`` in the "files:"
    line: the command ran, so it must print its result (escaped) and exit 0, as it already
    does on stderr (Python's backslashreplace) -- not end in a UnicodeEncodeError traceback after the work is
    done."""
    proc = cli("inspect", str(uni), "--all", env=base_env(PYTHONIOENCODING="ascii"))
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err and "UnicodeEncodeError" not in err, err[-800:]
    assert proc.returncode == 0, err
    first = proc.stdout.decode("ascii").splitlines()[0]
    assert first.startswith("1 file(s), 4 tensor(s)"), first


# -- tables ------------------------------------------------------------------------------------------------------------


def test_every_tensor_table_escapes_control_characters_in_file_names(uni, tmp_path):
    """A listed directory's file names are data from whoever wrote the directory. ``inspect`` escapes them in
    its "files:" section, but ``--all`` appends ``str(plan)``, whose "file ..." lines print the name raw: an
    ESC sequence reaches the terminal (here: clear screen, red)."""
    d = tmp_path / "listing"
    d.mkdir()
    (d / "e\x1b[2J\x1b[31mred.safetensors").write_bytes(uni.read_bytes())
    proc = cli("inspect", str(d), "--all")
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in out, [line for line in out.splitlines() if "\x1b" in line]


def _columns(text: str) -> int:
    """Terminal columns: a CJK character takes two (what a terminal shows, not what ``len`` counts)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def test_c_locale_prints_names_whole_and_aligned(uni):
    """``LC_ALL=C`` (cron, minimal containers): Python's C-locale coercion makes stdout UTF-8, so names and
    metadata come out as stored. A name longer than the name column is printed whole (never cut: users copy it
    into ``--names``) and only its own row overflows: every other row's dtype column starts at the same place
    on the screen, the row of the CJK name (4 characters, 7 columns) too."""
    proc = cli("inspect", str(uni), "--all", "--top", "4", env=base_env(LC_ALL="C"))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    out = proc.stdout.decode("utf-8")
    assert CJK in out and "ü.bias" in out and "note: 日本語" in out and "modèle" in out
    assert out.count(LONG) == 2, out  # the largest-tensors table and the --all table
    for section in ("largest 4 tensor(s):", "tensors:"):
        rows = out.split(section, 1)[1].strip("\n").split("\n\n")[0].splitlines()
        rows = [r for r in rows if LONG not in r and (" F32 " in r or " I64 " in r)]
        assert len(rows) == 3, (section, rows)
        starts = {_columns(r[:r.index(" F32 " if " F32 " in r else " I64 ")]) for r in rows}
        assert len(starts) == 1, (section, rows)


# -- closed, full and early-closing standard streams ---------------------------------------------------------------


def test_stdout_closed_is_a_one_line_error_not_a_traceback(uni):
    """``fastload inspect m >&-`` (stdout closed: Python sets ``sys.stdout`` to None). Unix tools report a
    write error (``cat: write error: Bad file descriptor``); fastload crashed in its own
    ``sys.stdout.flush()``: "AttributeError: 'NoneType' object has no attribute 'flush'"."""
    proc = subprocess.run(["sh", "-c", '"$@" >&-', "sh", FASTLOAD, "inspect", str(uni)], capture_output=True,
                          text=True, timeout=TIMEOUT, env=base_env())
    assert "Traceback" not in proc.stderr and "AttributeError" not in proc.stderr, proc.stderr[-800:]
    assert proc.returncode != 0


def test_stderr_closed_errors_never_land_on_stdout(tmp_path):
    """``fastload load x --json 2>&-`` in a script that parses stdout: with stderr closed, Python sets
    ``sys.stderr`` to None and ``print(..., file=None)`` writes to *stdout*, so the error line ends up in the
    machine-readable stream. stdout must stay empty on failure."""
    missing = tmp_path / "absent.safetensors"
    proc = subprocess.run(["sh", "-c", '"$@" 2>&-', "sh", FASTLOAD, "load", str(missing), "--json"],
                          stdout=subprocess.PIPE, text=True, timeout=TIMEOUT, env=base_env())
    assert proc.returncode == 1
    assert proc.stdout == "", repr(proc.stdout)


def test_stdout_on_a_full_disk_is_one_line(uni):
    """``> /dev/full`` (stdout a file on a full disk): ENOSPC on the write is one error line and status 1. The
    cli catches the OSError of its ``flush()`` and prints its line, but the text is still in stdout's buffer:
    the interpreter's exit flush fails again, "Exception ignored in: <_io.TextIOWrapper name='<stdout>'>
    OSError: [Errno 28]" follows, and the status becomes 120."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([FASTLOAD, "load", str(uni), "--json"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=TIMEOUT, env=base_env())
    assert proc.returncode == 1 and one_line_error(proc.stderr), proc.stderr
    assert "No space left" in proc.stderr


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli_output_many") / "many.safetensors"
    safetensors.torch.save_file({f"layer{i}.weight": torch.zeros(2) for i in range(4000)}, str(path))
    return path


def test_reader_that_leaves_after_ten_bytes(many):
    """``fastload inspect big --json | head -c 10``: the reader takes 10 bytes and leaves mid-output. fastload
    exits quietly with the status of a tool SIGPIPE ended (141, as ``yes | head -c 10`` gives) and prints
    nothing on stderr."""
    proc = subprocess.Popen([FASTLOAD, "inspect", str(many), "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=base_env())
    try:
        first = proc.stdout.read(10)
        proc.stdout.close()
        err = proc.stderr.read().decode(errors="replace")
        proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(first) == 10
    assert err == "", err[-800:]
    assert proc.returncode == 141, proc.returncode


# -- the pull progress bar on a pseudo-terminal ------------------------------------------------------------------


def test_pull_bar_on_a_dumb_terminal_has_no_escape_sequences(uni, tmp_path):
    """``TERM=dumb NO_COLOR=1`` (Emacs shell, CI consoles): a bar made of plain text and carriage returns, no
    ANSI escape sequences; stdout is still only the path."""
    dest = tmp_path / "dest"
    rc, out, term = run_on_pty([FASTLOAD, "pull", str(uni), "--to", str(dest), "--chunk-size", "64KiB"],
                               base_env(TERM="dumb", NO_COLOR="1"))
    assert rc == 0, term
    assert out == f"{dest / uni.name}\n"
    assert "\x1b" not in term, repr(term)
    assert "100%" in term and "1 file(s) fetched" in term, term


def test_pull_failing_under_the_bar_prints_its_error_on_a_line_of_its_own(uni, tmp_path, http_server, http_dir):
    """The object changes on the server after the bar is drawn: the bar is closed and the one-line error
    starts a line of its own (not glued to the bar's last frame), status 1, nothing on stdout."""
    big = http_dir / "big.safetensors"
    write_single(big, {f"w{i}": torch.full((256, 256), float(i)) for i in range(4)})
    http_server.faults.change_etag_after(3)
    dest = tmp_path / "dest"
    rc, out, term = run_on_pty([FASTLOAD, "pull", http_server.url_for(big), "--to", str(dest),
                                "--chunk-size", "64KiB", "--concurrency", "1"], base_env(TERM="xterm"))
    assert rc == 1 and out == "", (rc, out, term)
    assert "pull:" in term, term  # the bar was drawn
    lines = term.replace("\r\n", "\n").split("\n")
    errors = [line for line in lines if "fastload: error:" in line]
    assert len(errors) == 1 and errors[0].startswith("fastload: error: "), repr(term)
    assert "Traceback" not in term
    assert "SourceChangedError" in errors[0] or "changed" in errors[0], errors[0]


# -- arguments: ~, =, relative paths, file:// ---------------------------------------------------------------------


def test_pull_to_with_tilde_goes_home_like_cache_dir(uni, tmp_path):
    """``fastload pull SRC --to=~/models`` (the shell does not expand ``~`` after ``--to=``; nor in
    ``--to '~/models'``). ``--cache-dir`` of the same command expands ``~`` (``Path(cache_dir).expanduser()``);
    ``--to`` did not and created a directory literally named ``~`` in the current directory."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    proc = cli("pull", str(uni), "--to=~/models", "--quiet", cwd=work, env=base_env(HOME=str(home)), text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (work / "~").exists(), "created ./~ in the working directory"
    assert (home / "models" / uni.name).read_bytes() == uni.read_bytes()
    assert proc.stdout == f"{home / 'models' / uni.name}\n"


def test_trace_written_note_is_one_line_for_any_file_name(uni, tmp_path):
    """The "trace written to ..." note names a path the user typed; a newline in it (a script's variable) must
    not split the note over two lines, as error messages are escaped for the same reason."""
    out = tmp_path / "a\nb.json"
    proc = cli("load", str(uni), "--json", "--trace", str(out), text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    assert proc.stderr.startswith("trace written to ") and proc.stderr.count("\n") == 1, repr(proc.stderr)


# -- exit status and streams per outcome, over real servers --------------------------------------------------------


def test_exit_status_and_streams_per_outcome(uni, http_server, http_dir, s3_server, s3_bucket):
    """Success: status 0, ``--json`` stdout is ASCII JSON whatever the output encoding (the non-ASCII names round-
    trip exactly), stderr empty; a ``file://localhost/...`` URL (RFC 8089) with ``..`` in it and options spelled
    ``--opt=value`` work. Failure -- missing object (HTTP 404, S3 NoSuchBucket), format error (garbage over S3),
    config error (unknown ``--names`` over S3) -- status 1, one line naming the
    source, nothing on stdout."""
    s3_server.put(s3_bucket, "bad.safetensors", b"garbage!" * 4)
    s3_server.put(s3_bucket, "m.safetensors", uni.read_bytes())
    dotdot = "file://localhost" + uni.parent.parent.as_uri()[len("file://"):] \
        + f"/{uni.parent.name}/../{uni.parent.name}/{uni.name}"
    ok = [
        ("inspect", [str(uni)], {"PYTHONIOENCODING": "ascii"}),
        ("load", [dotdot, "--chunk-size=64KiB", "--concurrency=2", "--names=x"], {}),
    ]
    failing = [
        ("SourceNotFound", ["load", http_server.url_for(http_dir / "absent.safetensors")]),
        ("SourceNotFound", ["load", "s3://no-such-bucket-4242/m.safetensors"]),
        ("Format", ["inspect", f"s3://{s3_bucket}/bad.safetensors"]),
        ("Config", ["load", f"s3://{s3_bucket}/m.safetensors", "--names", "nope"]),
    ]

    def start(argv, **env):
        return subprocess.Popen([FASTLOAD, *argv, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=base_env(**env))

    good = [(command, start([command, *argv], **env)) for command, argv, env in ok]  # at once: each start
    bad = [(kind, argv, start(argv)) for kind, argv in failing]  # imports torch
    outcomes = {}
    for command, proc in good:
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0 and err == b"", (command, err)
        outcomes[command] = json.loads(out.decode("ascii"))
    for kind, argv, proc in bad:
        out, err = proc.communicate(timeout=TIMEOUT)
        err = err.decode()
        assert proc.returncode == 1 and out == b"" and one_line_error(err), (kind, argv, err)
        assert "://" in err or "nope" in err, (kind, err)
    assert {t["name"] for t in outcomes["inspect"]["tensors"]} == set(safetensors.torch.load_file(uni))
    assert outcomes["inspect"]["files"][0]["metadata"]["note"] == "日本語"
    assert outcomes["load"]["bytes_fetched"] == uni.stat().st_size - (48 + 20 + 16)  # header and "x" only


# -- added after the audit: what its report saw but did not test ---------------------------------------------------


def test_anonymous_flag_reads_a_public_bucket_with_no_credentials_anywhere(uni, s3_server, s3_bucket, tmp_path):
    """A shell user with no AWS credentials at all: the error says how to read a public bucket from the command
    line (``--anonymous``), and with it the same command works (moto serves unsigned requests)."""
    s3_server.put(s3_bucket, "public.safetensors", uni.read_bytes())
    s3_server.client().put_object_acl(Bucket=s3_bucket, Key="public.safetensors", ACL="public-read")
    env = base_env()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        env.pop(var, None)
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    source = f"s3://{s3_bucket}/public.safetensors"
    refused = cli("inspect", source, env=env, text=True)
    assert refused.returncode == 1 and one_line_error(refused.stderr), refused.stderr
    assert "--anonymous" in refused.stderr, refused.stderr
    done = cli("inspect", source, "--anonymous", "--json", env=env, text=True)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["tensors"]) == 4


def test_a_missing_bucket_is_named_as_a_bucket(s3_server):
    proc = cli("inspect", "s3://no-such-bucket-here/m.safetensors", text=True)
    assert proc.returncode == 1 and one_line_error(proc.stderr), proc.stderr
    assert "no such bucket" in proc.stderr, proc.stderr


@pytest.mark.parametrize("how", ["directory-from-its-parent", "file-where-it-lies", "to-the-same-directory"])
def test_pull_onto_the_source_itself_is_refused_and_touches_nothing(how, uni, tmp_path):
    """``fastload pull llama`` run in llama's parent would make ./llama, the source itself, its destination and
    copy every file onto itself on each run. It is refused in one line, and the files are left as they were."""
    src = tmp_path / "llama"
    src.mkdir()
    (src / "model.safetensors").write_bytes(uni.read_bytes())
    before = (src / "model.safetensors").stat()
    argv, cwd = {
        "directory-from-its-parent": (["pull", "llama"], tmp_path),
        "file-where-it-lies": (["pull", "model.safetensors"], src),
        "to-the-same-directory": (["pull", str(src), "--to", str(tmp_path / "." / "llama")], tmp_path),
    }[how]
    proc = cli(*argv, cwd=cwd, text=True)
    assert proc.returncode == 1 and one_line_error(proc.stderr), proc.stderr
    assert "is where the source already is" in proc.stderr, proc.stderr
    after = (src / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in src.iterdir()) == ["model.safetensors"]
