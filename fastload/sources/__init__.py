"""Transports, one per scheme, created per load inside its event loop."""

from __future__ import annotations

import importlib
import sys

from ..config import LoadConfig, without_credentials
from ..errors import ConfigError
from ..runner import in_worker
from ..trace import Trace
from .base import ObjectInfo, Segment, Transport, http_range, read_bytes
from .local import LocalTransport
from .retry import RetryPolicy


_SCHEMES = ("http", "https", "s3", "hf", "file")


def normalize_url(url: str) -> str:
    """``url`` with its scheme in lower case (``S3://b/k`` is ``s3://b/k``: schemes are case-insensitive);
    a remote URL's undecodable bytes as UTF-8 (a URL typed in a shell under the C locale reaches Python with
    ``ü`` as the surrogate escapes of its UTF-8 bytes, which became a request for another name: a 404);
    anything else unchanged."""
    scheme, sep, rest = url.partition("://")
    if not (sep and scheme.lower() in _SCHEMES):
        return url
    if scheme.lower() != "file":
        try:
            rest = rest.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no byte stands for: left as it is
            pass
    return scheme.lower() + sep + rest


def scheme_of(url: str) -> str:
    if url.startswith(("http://", "https://")):
        return "http"
    if url.startswith("s3://"):
        return "s3"
    if url.startswith("hf://"):
        return "hf"
    if "://" in url and not url.startswith("file://"):
        raise ConfigError(f"unsupported source scheme: {url.split('://', 1)[0]}:// (use a path, file://, "
                          "http(s)://, s3:// or hf://)")
    return "local"


_MODULES = {"http": (".http",), "s3": (".http", ".s3"), "hf": (".http", ".hub")}  # what each scheme imports


def _import(modules: list[str]) -> None:
    for name in modules:
        importlib.import_module(name, __name__)


class Transports:
    """Owns the transports of one load; ``aclose`` releases every socket, thread and file."""

    def __init__(self, config: LoadConfig, trace: Trace):
        self.config = config
        self.trace = trace
        self.policy = RetryPolicy(config.retry, trace, requests=config.max_concurrency)
        self._made: dict[str, Transport] = {}
        self._closed = False
        self.verification = None  # checksums of whole objects, checked as they stream (integrity.py)
        if config.verify_checksums:
            from ..integrity import Verification

            self.verification = Verification(trace)

    async def prepare(self, url: str) -> None:
        """Import what ``url``'s transport needs on a worker thread: aiohttp and botocore take 0.1-0.3 s to
        import (over a second on a busy machine), which the first network load of a process spent in
        ``for_url``, blocking the caller's event loop (asyncio's debug mode reports it as a slow callback)."""
        needed = [m for m in _MODULES.get(scheme_of(url), ()) if f"{__name__}{m}" not in sys.modules]
        if needed:
            await in_worker(_import, needed)

    def for_url(self, url: str) -> Transport:
        if self._closed:  # a straggler of a failed load must not open what the load has closed
            raise RuntimeError("the load's transports are closed")
        scheme = scheme_of(url)
        if scheme not in self._made:
            if scheme == "local":
                self._made[scheme] = LocalTransport(self.config.local_threads, self.trace, direct_io=self.config.direct_io,
                                                    direct_budget=self.config.host_buffer_bytes,
                                                    cold_readers=self.config.local_cold_readers)
            elif scheme == "http":  # network transports import aiohttp/botocore only when a load needs them
                from .http import HttpTransport

                self._made[scheme] = HttpTransport(self.config, self.policy, self.trace)
            elif scheme == "s3":
                from .http import HttpTransport
                from .s3 import S3Transport

                plain = without_credentials(self.config)  # presigned URLs carry their own signature
                if plain is self.config:
                    self.for_url("http://")
                    http = self._made["http"]
                else:  # an Authorization meant for HTTP sources must not reach S3 (it refuses two auths)
                    http = self._made["s3-bodies"] = HttpTransport(plain, self.policy, self.trace)
                self._made[scheme] = S3Transport(self.config, self.policy, http)
            elif scheme == "hf":
                from .hub import HubTransport

                self._made[scheme] = HubTransport(self.config, self.policy, self.trace)
            else:
                raise ConfigError(f"no transport for {url}")
        made = self._made[scheme]
        return made if self.verification is None else self.verification.wrap(made)

    def set_direct_budget(self, nbytes: int) -> None:
        """Give the local transport's O_DIRECT scratch ``nbytes`` of the buffer budget (the staging pool
        takes the rest); no-op without local files or ``direct_io``."""
        local = self._made.get("local")
        if local is not None:
            local.set_direct_budget(nbytes)

    def expect(self, plan) -> None:
        """Tell checksum verification which files the plan reads whole (no-op when it is off)."""
        if self.verification is not None:
            self.verification.expect(plan)

    async def aclose(self) -> None:
        """Close every transport, even when closing one fails or the caller is cancelled meanwhile (a stream
        left as its load ends); the first such error goes up once all are closed."""
        self._closed = True
        first: BaseException | None = None
        for transport in reversed(list(self._made.values())):
            try:
                await transport.aclose()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others are closed
                first = first or exc
        self._made.clear()
        if first is not None:
            raise first


__all__ = ["ObjectInfo", "Segment", "Transport", "Transports", "http_range", "read_bytes", "scheme_of"]
