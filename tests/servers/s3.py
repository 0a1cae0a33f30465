"""A real S3 endpoint on 127.0.0.1: moto's threaded server plus upload helpers."""

from __future__ import annotations

import logging
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing"


class S3Server:
    """moto S3 on a free 127.0.0.1 port; ``client()`` gives a boto3 client for it."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        # Port 0: the OS picks a free port; moto binds it and reports it back.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._endpoint: str | None = None

    def start(self) -> S3Server:
        # moto's werkzeug server logs every request at INFO; keep failures readable.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self._endpoint = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._endpoint is not None:
            self._server.stop()
            self._endpoint = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        if self._endpoint is None:
            raise RuntimeError("S3 server not started")
        return self._endpoint

    def client(self, endpoint_url: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client for this server, or for ``endpoint_url`` (e.g. a proxy in front).

        Extra keyword arguments go to ``botocore.config.Config``.
        """
        import boto3
        from botocore.config import Config

        config.setdefault("s3", {"addressing_style": "path"})
        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(**config),
        )

    def reset(self) -> None:
        """Forget every bucket and object."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def ensure_bucket(self, bucket: str, client: Any = None) -> None:
        client = client or self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if bucket not in existing:
            client.create_bucket(Bucket=bucket)

    def put(self, bucket: str, key: str, data: bytes) -> None:
        """Store ``data`` at ``s3://bucket/key``, creating the bucket if needed."""
        client = self.client()
        self.ensure_bucket(bucket, client)
        client.put_object(Bucket=bucket, Key=key, Body=data)

    def upload_dir(self, bucket: str, prefix: str, local_dir: Path) -> list[str]:
        """Upload every file under ``local_dir`` to ``prefix/<relative path>``; returns the keys."""
        client = self.client()
        self.ensure_bucket(bucket, client)
        root = Path(local_dir)
        keys = []
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            key = "/".join(part for part in (prefix.strip("/"), file.relative_to(root).as_posix())
                           if part)
            client.upload_file(str(file), bucket, key)
            keys.append(key)
        return keys
