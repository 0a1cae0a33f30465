"""Shared fixtures: real HTTP, proxy and S3 servers, and ready-made checkpoints.

Test modules import helpers as ``from servers import ...`` and
``from checkpoints import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import json
import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from checkpoints import all_dtypes_tensors, llama_like_tensors, write_sharded, write_single
from reliability_helpers import private_tmp  # noqa: F401 -- autouse for every test: Leaks watches its own temp dir
from servers import FaultProxy, Faults, RangeHTTPServer, S3Server

# Host settings that must not leak into tests talking to the local S3 server.
_AWS_VARS_TO_CLEAR = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE",
    "AWS_USE_FIPS_ENDPOINT", "AWS_USE_DUALSTACK_ENDPOINT", "AWS_S3_ADDRESSING_STYLE",
)


# -- collection ------------------------------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when CUDA is not available."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA not available")
    for item in gpu_items:
        item.add_marker(skip)


# -- HTTP ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory ``http_server`` serves (shared by the whole session)."""
    return tmp_path_factory.mktemp("http_root")


_HTTP_SERVER = pytest.StashKey[RangeHTTPServer]()


@pytest.fixture(scope="session")
def http_server(request: pytest.FixtureRequest, http_root: Path) -> Iterator[RangeHTTPServer]:
    """A ranged file server over ``http_root``; log and faults are reset before each test."""
    with RangeHTTPServer(http_root) as server:
        request.config.stash[_HTTP_SERVER] = server
        try:
            yield server
        finally:
            del request.config.stash[_HTTP_SERVER]


@pytest.fixture(autouse=True)
def _reset_http_server(request: pytest.FixtureRequest) -> None:
    # Every test starts with a clean server once one runs, also when a test reaches it lazily
    # (``request.getfixturevalue``, the ``serve`` fixture): a fault rule left by the test before
    # would otherwise hang this one until its stall timeout.
    server = request.config.stash.get(_HTTP_SERVER, None)
    if server is not None:
        server.reset()
    elif "http_server" in request.fixturenames:
        request.getfixturevalue("http_server").reset()


@pytest.fixture
def http_dir(http_root: Path) -> Path:
    """A fresh, empty directory under ``http_root``; ``http_server.url_for(path)`` gives URLs."""
    directory = http_root / f"t-{uuid.uuid4().hex[:12]}"
    directory.mkdir()
    return directory


# -- S3 --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto S3 on 127.0.0.1 for the session, with the AWS environment pointed at it.

    Buckets persist across tests; use ``s3_bucket`` for a fresh one or call
    ``s3_server.reset()``.
    """
    no_file = tmp_path_factory.mktemp("aws") / "absent"
    with pytest.MonkeyPatch.context() as env, S3Server() as server:
        for name in _AWS_VARS_TO_CLEAR:
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL", server.endpoint_url)
        env.setenv("AWS_CONFIG_FILE", str(no_file))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(no_file))
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """The name of a new, empty bucket."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.ensure_bucket(name)
    return name


@pytest.fixture
def s3_proxy(s3_server: S3Server) -> Iterator[FaultProxy]:
    """A ``FaultProxy`` in front of ``s3_server`` with its own, empty ``Faults``.

    Point a client at it with ``s3_server.client(endpoint_url=s3_proxy.url)``.
    """
    with FaultProxy(s3_server.endpoint_url, Faults()) as proxy:
        yield proxy


# -- one checkpoint over any transport ----------------------------------------------

@pytest.fixture
def serve(request: pytest.FixtureRequest):
    """``serve(transport, path, as_dir=False)``: a source naming ``path`` over local/file/http/s3.

    HTTP copies it under ``http_root``; S3 uploads it to a fresh bucket. Servers start only when used.
    """

    def _serve(transport: str, path: Path, as_dir: bool = False) -> str:
        if transport == "local":
            return str(path)
        if transport == "file":
            return path.as_uri()
        if transport == "http":
            server = request.getfixturevalue("http_server")
            target = request.getfixturevalue("http_dir") / path.name
            (shutil.copytree if path.is_dir() else shutil.copy)(path, target)
            return server.url_for(target) + ("/" if as_dir else "")
        if transport == "s3":
            s3 = request.getfixturevalue("s3_server")
            bucket = request.getfixturevalue("s3_bucket")
            if path.is_dir():
                s3.upload_dir(bucket, path.name, path)
                return f"s3://{bucket}/{path.name}/"
            s3.put(bucket, path.name, path.read_bytes())
            return f"s3://{bucket}/{path.name}"
        raise AssertionError(transport)

    return _serve


# -- checkpoints -----------------------------------------------------------------


@pytest.fixture(scope="session")
def all_dtypes_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A single-file checkpoint of ``all_dtypes_tensors(seed=0)`` with metadata."""
    path = tmp_path_factory.mktemp("ckpt") / "all_dtypes.safetensors"
    return write_single(path, all_dtypes_tensors(seed=0), metadata={"format": "pt"})


@pytest.fixture(scope="session")
def llama_sharded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with ``llama_like_tensors(seed=0)`` in 3 shards plus the index."""
    return write_sharded(tmp_path_factory.mktemp("llama"), llama_like_tensors(seed=0), 3,
                         metadata={"format": "pt"})


@pytest.fixture
def moto_auth(s3_server):
    """moto checks every request's access key and signature (its IAM) until the test ends."""
    def post(value: str) -> str:
        request = urllib.request.Request(f"{s3_server.endpoint_url}/moto-api/reset-auth", data=value.encode(),
                                         method="POST", headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]

    previous = post("0")
    try:
        yield
    finally:
        post(str(previous))


@pytest.fixture(scope="module")
def otel_spans():
    """An in-memory exporter on the process's SDK tracer provider (made once if there is none); the SDK is a test
    extra."""
    from opentelemetry import trace as otel
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    if not isinstance(otel.get_tracer_provider(), TracerProvider):
        otel.set_tracer_provider(TracerProvider())
    exporter = InMemorySpanExporter()
    otel.get_tracer_provider().add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()
