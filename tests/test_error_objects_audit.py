"""Error objects and messages: every failure a user can meet is a typed fastload error that names the
source (redacted) and, for I/O, the byte range; carries its documented attributes; survives pickle and copy
(multiprocessing and Ray ship exceptions between processes); never shows a secret, not even down its
``__cause__``/``__context__`` chain; and is the same type whichever entry point raised it (``load``, ``stream``
iteration, ``aload``, ``plan``, ``apull``, the CLI).

Real components only: the suite's HTTP Range server with its fault rules, moto's S3 server (with IAM checks
switched on for the bad-credentials case), real files, a real unprivileged process for EACCES.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

import fastload
from checkpoints import write_single
from reliability_helpers import QUICK, make_tensors
from servers.faults import ChangeEtagAfter, Rule

PASSWORD = "pw-SECRET-c0ffee"
TOKEN = "tok-SECRET-7f3a9c"
HEADER_TOKEN = "hdr-SECRET-b16b00"
SECRET_KEY = "aws-SECRET-KEY-0b1c2d3e4f"
SECRETS = (PASSWORD, TOKEN, HEADER_TOKEN, SECRET_KEY, "SECRET")

FAIL_FAST = QUICK.replace(stall_timeout_s=0.5, retry=fastload.RetryConfig(
    max_attempts=3, backoff_base_s=0.005, backoff_max_s=0.01, deadline_s=5.0))

DOCUMENTED_BASES = {
    fastload.ConfigError: ValueError,
    fastload.FormatError: ValueError,
    fastload.SourceNotFoundError: FileNotFoundError,
    fastload.SourcePermissionError: PermissionError,
    fastload.TransferError: OSError,
    fastload.SourceChangedError: OSError,
    fastload.IntegrityError: OSError,
    fastload.DeviceError: RuntimeError,
}
TRANSPORT_ERRORS = (fastload.TransferError, fastload.SourceChangedError, fastload.IntegrityError)
URL_ERRORS = (fastload.SourceNotFoundError, fastload.SourcePermissionError)


# -- helpers ------------------------------------------------------------------------------------------------


def small_checkpoint(directory: Path, name: str = "model.safetensors") -> Path:
    """~1.2 MB, several 64 KiB chunks per tensor (QUICK's chunk size)."""
    directory.mkdir(parents=True, exist_ok=True)
    return write_single(directory / name, make_tensors(seed=3))


def with_secrets(url: str) -> str:
    """``url`` with ``alice:PASSWORD@`` and ``?token=TOKEN`` (the RangeHTTPServer ignores both)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"alice:{PASSWORD}@{parts.netloc}", query=f"token={TOKEN}"))


def chain(exc: BaseException) -> list[BaseException]:
    out, todo, seen = [], [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def everything_visible(exc: BaseException) -> str:
    """What a log line, a printed traceback or an error reporter could show of ``exc`` and its chain."""
    parts = ["".join(traceback.format_exception(exc))]
    for e in chain(exc):
        parts += [str(e), repr(e), repr(e.args)]
        if hasattr(e, "__dict__"):
            parts.append(repr({k: v for k, v in vars(e).items() if not k.startswith("__")}))
    return "\n".join(parts)


def assert_no_secret(exc: BaseException, secrets=SECRETS) -> None:
    text = everything_visible(exc)
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"{leaked} visible in {type(exc).__name__} or its chain:\n{text[-3000:]}"


def assert_round_trips(exc: BaseException) -> None:
    """pickle (multiprocessing, Ray), copy.copy and copy.deepcopy keep type, message, args and attributes."""
    clones = {"pickle": pickle.loads(pickle.dumps(exc)), "copy": copy.copy(exc), "deepcopy": copy.deepcopy(exc)}
    for how, clone in clones.items():
        assert type(clone) is type(exc), how
        assert str(clone) == str(exc), f"{how} changed the message:\n  {str(exc)!r}\n  {str(clone)!r}"
        assert clone.args == exc.args, how
        for attr in ("url", "byte_range", "attempts"):
            if hasattr(exc, attr):
                assert getattr(clone, attr) == getattr(exc, attr), f"{how} changed .{attr}"
        assert repr(clone) == repr(exc), how


def assert_well_formed(exc: BaseException, cls: type, *, url: str | None = None,
                       byte_range: bool = False) -> None:
    """The generic contract of a fastload error, on a real one."""
    assert isinstance(exc, cls), f"expected {cls.__name__}, got {type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert type(exc).__module__.startswith("fastload"), type(exc)
    assert isinstance(exc, fastload.FastloadError)
    assert isinstance(exc, DOCUMENTED_BASES[cls]), f"{cls.__name__} must be a {DOCUMENTED_BASES[cls].__name__}"
    message = str(exc)
    assert message and "\n" not in message, repr(message)
    assert not message.startswith("[Errno"), message
    r = repr(exc)
    assert r.startswith(type(exc).__name__ + "(") and "\n" not in r, r
    if url is not None:
        assert url in message, f"{url!r} not named in {message!r}"
    if isinstance(exc, URL_ERRORS + TRANSPORT_ERRORS):
        assert exc.url, f"{type(exc).__name__}.url not set: {message}"
        if url is not None:
            assert exc.url == url, (exc.url, url)
    if isinstance(exc, TRANSPORT_ERRORS) and byte_range:
        assert exc.byte_range is not None, f".byte_range not set: {message}"
        start, end = exc.byte_range
        assert isinstance(start, int) and isinstance(end, int) and 0 <= start < end, exc.byte_range
        assert f"bytes [{start}, {end})" in message, message
    assert_round_trips(exc)
    assert_no_secret(exc)


def raised(fn, *args, **kwargs) -> BaseException:
    try:
        fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - inspected by the caller
        return exc
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise")


@dataclass(eq=False)
class CutBodyAfterFirst(Rule):
    """After the first ``after`` GETs (size probe, header), send headers and no body byte, then close."""

    after: int = 2

    def wants_to_fire(self) -> bool:
        return self.seen > self.after

    def apply(self, plan) -> None:
        plan.cut_after = 0


@dataclass(eq=False)
class ShiftRangeAfterFirst(Rule):
    after: int = 2
    shift: int = 8

    def wants_to_fire(self) -> bool:
        return self.seen > self.after

    def apply(self, plan) -> None:
        plan.content_range_shift = self.shift


def add_rule(server, rule: Rule) -> Rule:
    return server.faults._add(rule)


def http_ckpt(http_server, http_dir: Path) -> tuple[str, Path]:
    path = small_checkpoint(http_dir)
    return http_server.url_for(path), path


# == the hierarchy itself ==================================================================================


def test_hierarchy_as_documented():
    for cls, base in DOCUMENTED_BASES.items():
        assert issubclass(cls, fastload.FastloadError) and issubclass(cls, base), cls
        assert getattr(fastload, cls.__name__) is cls


@pytest.mark.parametrize("cls", list(DOCUMENTED_BASES))
def test_every_class_constructed_by_hand_round_trips(cls):
    if cls in TRANSPORT_ERRORS:
        exc = cls("read failed", url="http://host/m.safetensors", byte_range=(8, 4096), attempts=3)
    elif cls in URL_ERRORS:
        exc = cls("not found: http://host/m.safetensors", url="http://host/m.safetensors")
    else:
        exc = cls("bad value")
    assert_round_trips(exc)


@pytest.mark.parametrize("cls", TRANSPORT_ERRORS)
def test_transport_error_with_a_query_string_round_trips(cls):
    """The message is built as ``...; url=<redacted url>; bytes [a, b)``: unpickling calls ``cls(message)``, which
    redacts it again; the URL pattern then swallows the ``;`` after the redacted query value."""
    exc = cls("retries exhausted: short body", url=f"https://h/m.safetensors?token={TOKEN}", byte_range=(0, 8),
              attempts=3)
    assert TOKEN not in str(exc)
    assert_round_trips(exc)


# == local files ===========================================================================================


def test_local_missing_file(tmp_path):
    path = str(tmp_path / "nope.safetensors")
    exc = raised(fastload.load, path, config=FAIL_FAST)
    assert_well_formed(exc, fastload.SourceNotFoundError, url=path)


def test_local_missing_directory_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    exc = raised(fastload.load, str(tmp_path / "empty"), config=FAIL_FAST)
    assert_well_formed(exc, fastload.SourceNotFoundError)
    assert str(tmp_path / "empty") in str(exc)


@pytest.mark.parametrize("bad", ["length_past_end", "not_json", "offsets_past_end"])
def test_local_malformed_header_is_format_error_naming_the_file(tmp_path, bad):
    good = small_checkpoint(tmp_path / "src").read_bytes()
    n = int.from_bytes(good[:8], "little")
    if bad == "length_past_end":
        raw = (len(good) + 100).to_bytes(8, "little") + good[8:]
    elif bad == "not_json":
        raw = good[:8] + b"{" + b"x" * (n - 1) + good[8 + n:]
    else:  # a file truncated inside its data section: the header's offsets run past the end
        raw = good[: len(good) // 2]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    exc = raised(fastload.load, str(path), config=FAIL_FAST)
    assert_well_formed(exc, fastload.FormatError, url=str(path))


def test_local_file_truncated_after_planning_is_typed(tmp_path):
    """The file shrinks between reading its header and the rest of its data (truncated as the first chunk
    lands): SourceChangedError or IntegrityError naming the path, from ``stream`` iteration."""
    path = small_checkpoint(tmp_path)
    done = []

    def progress(got: int, total: int) -> None:
        if got and not done:
            done.append(got)
            with open(path, "r+b") as f:
                f.truncate(9000)

    config = FAIL_FAST.replace(max_concurrency=1, local_threads=1)
    with pytest.raises(fastload.FastloadError) as info:
        with fastload.stream(str(path), config=config, progress=progress) as s:
            for _ in s:
                pass
    exc = info.value
    assert isinstance(exc, (fastload.SourceChangedError, fastload.IntegrityError)), repr(exc)
    assert_well_formed(exc, type(exc), url=str(path))


def _nobody_can_run() -> bool:
    return os.geteuid() == 0 and shutil.which("setpriv") is not None


@pytest.mark.skipif(not _nobody_can_run(), reason="needs root and setpriv to drop to an unprivileged user")
def test_local_permission_denied_as_unprivileged_user():
    """EACCES: SourcePermissionError (a PermissionError) naming the path, pickled round; the CLI prints one
    line, exits 1, no traceback."""
    directory = Path(tempfile.mkdtemp(prefix="fastload-eacces-", dir="/tmp"))
    try:
        directory.chmod(0o755)
        path = small_checkpoint(directory)
        path.chmod(0)
        script = r"""
import io, json, pickle, sys, contextlib
import fastload
from fastload.cli import main
path = sys.argv[1]
out = {}
try:
    fastload.load(path)
except BaseException as exc:
    clone = pickle.loads(pickle.dumps(exc))
    out["api"] = [type(exc).__name__, isinstance(exc, PermissionError), str(exc), exc.url,
                  type(clone).__name__, str(clone), getattr(clone, "url", None)]
err = io.StringIO()
with contextlib.redirect_stderr(err):
    try:
        out["cli_status"] = main(["load", path])
    except BaseException as exc:
        out["cli_status"] = repr(exc)
out["cli_stderr"] = err.getvalue()
print(json.dumps(out))
"""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        env.update(HOME=str(directory), PYTHONPATH=str(Path(__file__).resolve().parents[1]),
                   PYTHONDONTWRITEBYTECODE="1")
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                               "-c", script, str(path)], capture_output=True, text=True, timeout=60, env=env,
                              cwd=str(directory))
        assert proc.returncode == 0, proc.stderr[-2000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        name, is_perm, message, url, clone_name, clone_message, clone_url = out["api"]
        assert name == "SourcePermissionError" and is_perm, out
        assert str(path) in message and url == str(path), out
        assert (clone_name, clone_message, clone_url) == (name, message, url), out
        assert out["cli_status"] == 1, out
        lines = out["cli_stderr"].strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fastload: error:") and str(path) in lines[0], out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# == HTTP ==================================================================================================


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_404_with_credentials_in_the_url(http_server, http_dir, engine):
    url = with_secrets(http_server.url_for(http_dir / "missing.safetensors"))
    exc = raised(fastload.load, url, config=FAIL_FAST.replace(http_engine=engine))
    assert_well_formed(exc, fastload.SourceNotFoundError)
    assert exc.url.startswith(f"http://alice:***@127.0.0.1:{http_server.port}/"), exc.url
    assert exc.url in str(exc)


def test_http_403_is_permission_error(http_server, http_dir):
    url, _ = http_ckpt(http_server, http_dir)
    http_server.faults.fail_first(10, 403)
    secret_url = with_secrets(url)
    exc = raised(fastload.load, secret_url, config=FAIL_FAST)
    assert_well_formed(exc, fastload.SourcePermissionError)
    assert exc.url.endswith("?token=***") and exc.url in str(exc)


def test_http_malformed_header_names_the_redacted_url(http_server, http_dir):
    good = small_checkpoint(http_dir / "src").read_bytes()
    path = http_dir / "bad.safetensors"
    path.write_bytes(good[:8] + b"[" + good[9:])
    url = with_secrets(http_server.url_for(path))
    exc = raised(fastload.load, url, config=FAIL_FAST)
    assert_well_formed(exc, fastload.FormatError)
    assert f"http://alice:***@127.0.0.1:{http_server.port}/" in str(exc) and "token=***" in str(exc)


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_connection_dropped_mid_body(http_server, http_dir, engine):
    """Every data GET is cut before its first byte: retries spent, TransferError with url, range, attempts;
    the chained cause (a socket/aiohttp error) shows no credential."""
    url, _ = http_ckpt(http_server, http_dir)
    add_rule(http_server, CutBodyAfterFirst(pattern=urlsplit(url).path, after=2))
    exc = raised(fastload.load, with_secrets(url), config=FAIL_FAST.replace(http_engine=engine))
    assert_well_formed(exc, fastload.TransferError, byte_range=True)
    assert exc.attempts == FAIL_FAST.retry.max_attempts, exc.attempts
    assert exc.byte_range[0] >= 8, exc.byte_range  # a data range, past the size probe and the header
    assert exc.url.startswith("http://alice:***@") and exc.url.endswith("?token=***"), exc.url


@pytest.mark.parametrize("engine", ["threads", "aiohttp"])
def test_http_connection_dropped_mid_body_with_authorization_header(http_server, http_dir, engine):
    url, _ = http_ckpt(http_server, http_dir)
    add_rule(http_server, CutBodyAfterFirst(pattern=urlsplit(url).path, after=2))
    config = FAIL_FAST.replace(http_engine=engine, http_headers={"Authorization": f"Bearer {HEADER_TOKEN}"})
    exc = raised(fastload.load, url, config=config)
    assert_well_formed(exc, fastload.TransferError, url=url, byte_range=True)


def test_http_wrong_content_range(http_server, http_dir):
    url, _ = http_ckpt(http_server, http_dir)
    add_rule(http_server, ShiftRangeAfterFirst(pattern=urlsplit(url).path, after=2, shift=8))
    exc = raised(fastload.load, url, config=FAIL_FAST)
    assert_well_formed(exc, fastload.TransferError, url=url, byte_range=True)
    assert "Content-Range" in str(exc)


def test_http_wrong_content_range_with_a_token_survives_pickle(http_server, http_dir):
    """The same failure on a URL with a SAS-style token: the error a Ray/multiprocessing worker sends back
    must read the same on the other side."""
    url, _ = http_ckpt(http_server, http_dir)
    add_rule(http_server, ShiftRangeAfterFirst(pattern=urlsplit(url).path, after=2, shift=8))
    exc = raised(fastload.load, with_secrets(url), config=FAIL_FAST)
    assert_well_formed(exc, fastload.TransferError, byte_range=True)


def test_http_etag_change_mid_load(http_server, http_dir):
    url, _ = http_ckpt(http_server, http_dir)
    http_server.faults.change_etag_after(2, path=urlsplit(url).path)
    exc = raised(fastload.load, url, config=FAIL_FAST)
    assert_well_formed(exc, fastload.SourceChangedError, url=url, byte_range=True)


def test_http_server_ignoring_range_from_the_start(http_server, http_dir):
    url, _ = http_ckpt(http_server, http_dir)
    http_server.faults.ignore_range()
    exc = raised(fastload.load, url, config=FAIL_FAST)
    assert_well_formed(exc, fastload.TransferError, url=url, byte_range=True)


def test_http_connection_refused_has_a_range_and_no_secret(http_server):
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    url = f"http://alice:{PASSWORD}@127.0.0.1:{port}/m.safetensors?token={TOKEN}"
    exc = raised(fastload.load, url, config=FAIL_FAST)
    assert_well_formed(exc, fastload.TransferError, byte_range=True)
    assert exc.url == f"http://alice:***@127.0.0.1:{port}/m.safetensors?token=***"


# == the same failure through every entry point =============================================================


def _entry_points(source, config, tmp_path):
    def via_load():
        fastload.load(source, config=config)

    def via_stream():
        with fastload.stream(source, config=config) as s:
            for _ in s:
                pass

    def via_plan():
        fastload.plan(source, config=config)

    def via_aload():
        asyncio.run(fastload.aload(source, config=config))

    def via_pull():
        fastload.pull(source, to=str(tmp_path / "pulled"), config=config)

    def via_apull():
        asyncio.run(fastload.apull(source, to=str(tmp_path / "apulled"), config=config))

    return {"load": via_load, "stream": via_stream, "plan": via_plan, "aload": via_aload, "pull": via_pull,
            "apull": via_apull}


@pytest.mark.parametrize("kind", ["missing", "malformed", "etag_change", "dropped"])
def test_same_type_from_every_entry_point(http_server, http_dir, tmp_path, kind):
    url, path = http_ckpt(http_server, http_dir)
    expected = {"missing": fastload.SourceNotFoundError, "malformed": fastload.FormatError,
                "etag_change": fastload.SourceChangedError, "dropped": fastload.TransferError}[kind]
    if kind == "missing":
        url = with_secrets(url.replace("model.safetensors", "gone.safetensors"))
    elif kind == "malformed":
        raw = path.read_bytes()
        path.write_bytes(raw[:8] + b"]" + raw[9:])
        url = with_secrets(url)
    got = {}
    for name in _entry_points(url, FAIL_FAST, tmp_path):
        if name == "plan" and kind in ("etag_change", "dropped"):
            continue  # headers only: nothing past them is read
        if name in ("pull", "apull") and kind == "malformed":
            continue  # pull copies files; it is not documented to parse them
        source = url
        if kind in ("etag_change", "dropped"):
            # A file of its own per entry point: a request of the previous load still in a server thread must
            # not count towards this one's rule.
            own = http_dir / f"{name}-model.safetensors"
            shutil.copy(path, own)
            source = http_server.url_for(own)
            pattern = urlsplit(source).path
            if kind == "etag_change":
                add_rule(http_server, ChangeEtagAfter(pattern=pattern, after=2))
            else:
                add_rule(http_server, CutBodyAfterFirst(pattern=pattern, after=2))
        fn = _entry_points(source, FAIL_FAST, tmp_path)[name]
        exc = raised(fn)
        got[name] = type(exc).__name__
        assert isinstance(exc, expected), f"{name}: {type(exc).__module__}.{type(exc).__name__}: {exc}"
        assert_no_secret(exc)
        assert_round_trips(exc)
    assert len(set(got.values())) == 1, got


@pytest.mark.parametrize("command,kind", [(c, k) for c in ("load", "inspect", "pull")
                                          for k in ("missing", "malformed", "no_range")
                                          if (c, k) != ("pull", "malformed")])  # pull copies files, parses none
def test_cli_expected_errors_are_one_line_exit_1(http_server, http_dir, tmp_path, capsys, monkeypatch, command,
                                                 kind):
    from fastload.cli import main

    url, path = http_ckpt(http_server, http_dir)
    if kind == "missing":
        url = url.replace("model.safetensors", "gone.safetensors")
    elif kind == "malformed":
        raw = path.read_bytes()
        path.write_bytes(raw[:8] + b"]" + raw[9:])
    else:  # a server that never honours Range: TransferError at once (the CLI's retry budget is the default)
        http_server.faults.ignore_range()
    url = with_secrets(url)
    monkeypatch.chdir(tmp_path)
    argv = [command, url, "--chunk-size", "64KiB"] + (["--quiet", "--to", str(tmp_path / "out")]
                                                       if command == "pull" else [])
    status = main(argv)
    out, err = capsys.readouterr()
    assert status == 1, (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastload: error: "), err
    assert "Traceback" not in err
    assert f"http://alice:***@127.0.0.1:{http_server.port}/" in err, err
    for secret in SECRETS:
        assert secret not in err + out


# == S3 (moto) =============================================================================================


@pytest.fixture
def s3_object(s3_server, s3_bucket, tmp_path):
    path = small_checkpoint(tmp_path / "s3src")
    s3_server.put(s3_bucket, "ck/model.safetensors", path.read_bytes())
    return f"s3://{s3_bucket}/ck/model.safetensors", s3_bucket


def test_s3_no_such_key(s3_object):
    _, bucket = s3_object
    url = f"s3://{bucket}/ck/absent.safetensors"
    exc = raised(fastload.load, url, config=FAIL_FAST)
    assert_well_formed(exc, fastload.SourceNotFoundError, url=url)


def test_s3_no_such_bucket(s3_server):
    url = "s3://no-such-bucket-error-audit/m.safetensors"
    exc = raised(fastload.load, url, config=FAIL_FAST)
    assert_well_formed(exc, fastload.SourceNotFoundError, url=url)


def test_s3_presigned_get_dropped_mid_body_names_the_s3_url(s3_object, s3_proxy):
    """Every presigned data GET is cut: TransferError naming s3://bucket/key (never the presigned URL) with the
    byte range; nothing in the chain carries X-Amz-Signature or the credential."""
    url, _ = s3_object
    add_rule(s3_proxy, CutBodyAfterFirst(pattern="*/ck/model.safetensors", after=2))
    config = FAIL_FAST.replace(s3=fastload.S3Options(endpoint_url=s3_proxy.url.rstrip("/")))
    exc = raised(fastload.load, url, config=config)
    assert_well_formed(exc, fastload.TransferError, url=url, byte_range=True)
    text = everything_visible(exc)
    assert "X-Amz-Signature" not in text.replace("X-Amz-Signature=***", ""), text[-2000:]
    assert "X-Amz-Credential=testing" not in text and "Credential=testing" not in text


def test_s3_checksum_mismatch_with_verify(s3_server, s3_bucket, tmp_path):
    import base64
    import hashlib

    from moto.s3.models import s3_backends

    path = small_checkpoint(tmp_path / "s3sum")
    s3_server.client().put_object(Bucket=s3_bucket, Key="m.safetensors", Body=path.read_bytes(),
                                  ChecksumAlgorithm="SHA256")
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    for regions in s3_backends.values():
        for backend in regions.values():
            if s3_bucket in backend.buckets:
                backend.buckets[s3_bucket].keys["m.safetensors"].checksum_value = wrong
    url = f"s3://{s3_bucket}/m.safetensors"
    exc = raised(fastload.load, url, config=FAIL_FAST.replace(verify_checksums=True))
    assert_well_formed(exc, fastload.IntegrityError, url=url)
    assert "mismatch" in str(exc)


@pytest.mark.parametrize("shape", ["object", "prefix"])
def test_s3_bad_credentials_is_permission_error_without_the_key(s3_object, moto_auth, monkeypatch, shape):
    url, bucket = s3_object
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAERRAUDIT0000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    source = url if shape == "object" else f"s3://{bucket}/ck/"
    exc = raised(fastload.load, source, config=FAIL_FAST)
    assert_well_formed(exc, fastload.SourcePermissionError)
    assert exc.url.startswith(f"s3://{bucket}/ck"), exc.url
    assert exc.url in str(exc)
    # the same through the other entry points
    for fn in (lambda: fastload.plan(source, config=FAIL_FAST),
               lambda: asyncio.run(fastload.aload(source, config=FAIL_FAST))):
        other = raised(fn)
        assert type(other) is type(exc), repr(other)
        assert_no_secret(other)


# == config errors =========================================================================================


@pytest.mark.parametrize("make", [
    lambda: fastload.LoadConfig(chunk_bytes=1),
    lambda: fastload.LoadConfig(max_concurrency=0),
    lambda: fastload.LoadConfig(http_engine="curl"),
    lambda: fastload.RetryConfig(max_attempts=0),
    lambda: fastload.S3Options(addressing_style="sideways"),
    lambda: fastload.load("/x.safetensors", device="tpu"),
    lambda: fastload.load("/x.safetensors", dtype="int7"),
    lambda: fastload.load("gopher://host/x.safetensors"),
    lambda: fastload.load([]),
], ids=["chunk", "concurrency", "engine", "retry", "addressing", "device", "dtype", "scheme", "empty-list"])
def test_config_errors_are_typed_and_round_trip(make):
    exc = raised(make)
    assert_well_formed(exc, fastload.ConfigError)


def test_config_error_does_not_echo_headers_given_as_pairs():
    """``http_headers`` given as a list of pairs (a common slip) is refused; the message must not print the
    Authorization value the caller put in it."""
    exc = raised(fastload.LoadConfig, http_headers=[("Authorization", f"Bearer {HEADER_TOKEN}")])
    assert isinstance(exc, fastload.ConfigError)
    assert HEADER_TOKEN not in str(exc), str(exc)


def test_config_error_does_not_echo_an_endpoint_password():
    """A mistyped scheme on an S3 endpoint with credentials in it: the ConfigError must not print the
    password (README: passwords never appear in fastload's errors)."""
    exc = raised(fastload.S3Options, endpoint_url=f"htps://minio:{PASSWORD}@store.internal:9000")
    assert isinstance(exc, fastload.ConfigError)
    assert PASSWORD not in str(exc), str(exc)


def test_unparsable_url_with_a_password_does_not_echo_it():
    """A password with an unescaped ``#`` makes urlsplit read the rest as a fragment and the password as a port:
    the ConfigError must still not print it."""
    exc = raised(fastload.load, f"http://alice:{PASSWORD}#x@127.0.0.1:1/m.safetensors", config=FAIL_FAST)
    assert isinstance(exc, fastload.FastloadError), repr(exc)
    assert PASSWORD not in str(exc) and PASSWORD not in everything_visible(exc), str(exc)


def test_unknown_names_config_error_lists_them(tmp_path):
    path = small_checkpoint(tmp_path)
    exc = raised(fastload.load, str(path), names=["w0", "nope.weight"], config=FAIL_FAST)
    assert_well_formed(exc, fastload.ConfigError)
    assert "nope.weight" in str(exc)


def test_cli_config_error_one_line(capsys, monkeypatch, tmp_path):
    from fastload.cli import main

    path = small_checkpoint(tmp_path)
    monkeypatch.setenv("FASTLOAD_MAX_CONCURRENCY", "zero")
    status = main(["load", str(path)])
    _, err = capsys.readouterr()
    assert status == 1 and err.startswith("fastload: error: ") and len(err.strip().splitlines()) == 1, err
    assert "FASTLOAD_MAX_CONCURRENCY" in err
