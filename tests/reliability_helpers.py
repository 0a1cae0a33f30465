"""Helpers for the reliability tests: leak checks, a small checkpoint, quick-failing configs.

``Leaks`` snapshots what a load could leave behind -- threads, client sockets
to the test servers, open files, temporary files -- and ``check()`` asserts
that nothing new is left. The test servers live in this process, so their own
handler threads and server-side sockets are not counted: a client socket is
one whose *remote* port is a test server's.
"""

from __future__ import annotations

import fcntl
import gc
import os
import pty
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
import torch

import fastload
from checkpoints import write_single

CHUNK = 64 * 1024

#: Fail fast: tiny backoff, a short stall timeout, few attempts, a short deadline.
QUICK_RETRY = fastload.RetryConfig(max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.05, deadline_s=10.0)
QUICK = fastload.LoadConfig(chunk_bytes=CHUNK, host_buffer_bytes=8 * CHUNK, max_concurrency=4,
                            stall_timeout_s=0.5, connect_timeout_s=2.0, retry=QUICK_RETRY)


def make_tensors(seed: int = 0, count: int = 6) -> dict[str, torch.Tensor]:
    """~1.2 MB of float tensors of odd sizes (several chunks each) plus a small int one."""
    g = torch.Generator().manual_seed(seed)
    tensors = {f"w{i}": torch.randn(30_000 + 7_919 * i, generator=g) for i in range(count)}
    tensors["ids"] = torch.arange(1_001, dtype=torch.int64)
    return tensors


def write_checkpoint(path: Path, seed: int = 0, count: int = 6) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = make_tensors(seed, count)
    return write_single(path, tensors), tensors


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want) or set(got) == set(want)
    for name, tensor in want.items():
        a, b = got[name], tensor
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)), name


class ScriptedHTTP:
    """A threaded HTTP/1.1 server on 127.0.0.1 whose GETs go to ``self._handle(handler)``: the skeleton of
    the tests' scripted servers (each decides its replies in ``_handle``). ``stopping`` is set on exit."""

    def __init__(self, name: str = "scripted-server") -> None:
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                owner._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=name, daemon=True)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (bit for bit: NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def bounded(fn, seconds: float = 20.0):
    """``fn()`` in a daemon thread: its result, or the exception it raised re-raised here; a failure (never a
    hung suite) when it has not ended within ``seconds``."""
    box: dict = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=body, daemon=True, name="test-bounded")
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def fds() -> set[str]:
    """Open descriptors other than sockets, as ``fd -> target`` strings. Sockets are left to ``Leaks``, which
    tells the loader's (client) sockets from the in-process test servers' own, e.g. a handler held by a hang."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if not target.startswith("socket:"):
            out.add(f"{fd} -> {target}")
    return out


def wait_for_no_new_fds(before: set[str], grace_s: float = 1.0) -> set[str]:
    deadline = time.monotonic() + grace_s
    while True:
        extra = fds() - before
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.02)


def data_start(raw: bytes) -> int:
    """Where a safetensors file's data section begins: 8 + the header length."""
    return 8 + int.from_bytes(raw[:8], "little")


def load_checked(url: str, ports: set[int], config, bound_s: float = 6.0, catch=None, **kwargs):
    """``(result or the error, seconds)`` of ``fastload.load``, checked to end within ``bound_s`` and to leave no
    thread, socket or file behind. ``catch``: the errors returned (default ``FastloadError``; ``Exception`` where
    an untyped error is itself the finding)."""
    with Leaks(ports) as leaks, Timer() as timer:
        try:
            result = fastload.load(url, config=config, **kwargs)
        except catch or fastload.FastloadError as exc:
            result = exc
    assert timer.s < bound_s, f"took {timer.s:.1f} s"
    leaks.check(grace_s=0.5)
    return result, timer.s


def _thread_is_ours(thread: threading.Thread) -> bool:
    # The in-process test servers' per-connection handlers are not the loader's threads.
    return thread.is_alive() and "process_request" not in thread.name


def client_sockets(ports: set[int]) -> list:
    """This process's sockets connected *to* one of ``ports`` (the client side of a test server)."""
    return [c for c in psutil.Process().net_connections(kind="inet")
            if c.raddr and c.raddr.port in ports and c.status != psutil.CONN_TIME_WAIT]


class Leaks:
    """``with Leaks(ports, watch=[dirs]) as leaks: ...; leaks.check()``."""

    def __init__(self, ports: set[int] | tuple[int, ...] = (), watch: list[Path] = ()):
        self.ports = set(ports)
        self.watch = [Path(w) for w in watch]

    def _files(self) -> set[str]:
        """Entries of the watched directories and of this test's private temp directory (``private_tmp``)."""
        out = set()
        for directory in self.watch + [Path(tempfile.gettempdir())]:
            if directory.is_dir():
                out.update(str(directory / name) for name in os.listdir(directory))
        return out

    def __enter__(self) -> "Leaks":
        self.threads = {t for t in threading.enumerate()}
        self.open_files = {f.path for f in psutil.Process().open_files()}
        self.files = self._files()
        return self

    def __exit__(self, *exc) -> None:
        pass

    def new_threads(self) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in self.threads and _thread_is_ours(t)]

    def sockets(self) -> list:
        """The loader's client sockets to the watched ports that are open now."""
        return client_sockets(self.ports)

    def check(self, grace_s: float = 0.0) -> None:
        """Nothing new may be left: threads, client sockets, open files, temporary files."""
        deadline = time.monotonic() + grace_s
        while True:
            threads = self.new_threads()
            sockets = self.sockets()
            opened = {f.path for f in psutil.Process().open_files()} - self.open_files
            created = self._files() - self.files
            if not (threads or sockets or opened or created) or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        assert not threads, f"threads left running: {[t.name for t in threads]}"
        assert not sockets, f"sockets left open: {sockets}"
        assert not opened, f"files left open: {sorted(opened)}"
        assert not created, f"files left behind: {sorted(created)}"


@pytest.fixture(autouse=True)
def private_tmp(tmp_path_factory, monkeypatch) -> Path:
    """Each test gets its own temp directory, so a file a load leaves there is seen (and no one else's)."""
    directory = tmp_path_factory.mktemp("private-tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


class Timer:
    """``with Timer() as t: ...``; ``t.s`` is the elapsed wall time."""

    def __enter__(self) -> "Timer":
        self.start = time.monotonic()
        self.s = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.monotonic() - self.start


def sigint_after(event: threading.Event, delay: float, sent: list[float] | None = None) -> threading.Thread:
    """Once ``event`` is set, wait ``delay`` and send this process a SIGINT (to its main thread), as a user's
    Ctrl-C; the time it was sent goes to ``sent`` (time a Ctrl-C from then, not from the start of a load that a
    loaded machine stretches)."""
    def body():
        if event.wait(10):
            time.sleep(delay)
            if sent is not None:
                sent.append(time.monotonic())
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=body, name="test-sigint", daemon=True)
    thread.start()
    return thread


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage still alive in this process (after a collection)."""
    gc.collect()
    # (type(), not isinstance: isinstance reads __class__, and torch's deprecated module attributes warn on that)
    return sum(o.untyped_storage().nbytes() for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def dir_source(kind: str, directory: Path, request) -> str:
    """``directory`` as a checkpoint-directory source of ``kind``: local path, file:// URL, HTTP or S3 prefix (the
    servers are the conftest fixtures, asked of ``request``)."""
    if kind == "local":
        return str(directory)
    if kind == "file":
        return directory.as_uri() + "/"
    if kind == "http":
        server, root = request.getfixturevalue("http_server"), request.getfixturevalue("http_dir")
        shutil.copytree(directory, root / directory.name)
        return server.url_for(root / directory.name) + "/"
    s3, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    s3.upload_dir(bucket, directory.name, directory)
    return f"s3://{bucket}/{directory.name}/"


def run_on_pty(command: list[str], env: dict, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``command`` with stderr on a terminal (a pty, 40x120) and stdout a pipe, as in an interactive shell;
    returns (status, stdout, what reached the terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, env=env)
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        os.close(master)
    return proc.returncode, out.decode(errors="replace"), b"".join(chunks).decode(errors="replace")
