"""Configuration: one frozen object, validated on construction.

A ``LoadConfig`` never comes from environment variables inside the library:
:func:`from_env` is the one place that reads ``FASTLOAD_*``, and only the CLI
calls it. (The AWS credential chain reads its own variables, and ``hf://``
sources the Hub's ``HF_*``: that is the standard users expect.)
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from typing import Any

from .errors import ConfigError
from .redact import redact_url

MiB = 1 << 20
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # longer than any wait makes sense for; sockets and timers overflow far beyond
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110 token)


class Headers(Mapping):
    """``LoadConfig.http_headers``: a read-only copy of the caller's mapping, checked (names are HTTP tokens,
    values carry no CR, LF or NUL), hashable with the config, and shown without its values."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str]):
        _check(isinstance(items, Mapping), "http_headers must be a mapping of names to values, got "
               + type(items).__name__)  # not the items: they hold the secrets
        for name, value in items.items():
            _check(isinstance(name, str) and _TOKEN.fullmatch(name) is not None,
                   f"http_headers: {name!r} is not an HTTP header name")
            _check(isinstance(value, str) and not any(c in value for c in "\r\n\0"),
                   f"http_headers[{name!r}] must be a str without CR, LF or NUL")
        self._items = dict(items)

    def __getitem__(self, name: str) -> str:
        return self._items[name]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:  # values are credentials more often than not
        return "{" + ", ".join(f"{name!r}: '***'" for name in self._items) + "}"


@dataclass(frozen=True)
class RetryConfig:
    """Per-chunk retries: exponential backoff with full jitter."""

    max_attempts: int = 8  # attempts per chunk, counting the first
    backoff_base_s: float = 0.1
    backoff_max_s: float = 10.0
    deadline_s: float | None = 600.0  # give up on a chunk after this long, all attempts (and the one in flight)
    max_concurrent_retries: int = 4  # retries in flight at once, across the load

    def __post_init__(self) -> None:
        _check(is_int(self.max_attempts) and self.max_attempts >= 1, "retry.max_attempts must be an int >= 1")
        _check(_is_num(self.backoff_base_s) and _is_num(self.backoff_max_s)
               and 0 <= self.backoff_base_s <= self.backoff_max_s,
               "need 0 <= retry.backoff_base_s <= retry.backoff_max_s (numbers of seconds)")
        _check(self.deadline_s is None or (_is_num(self.deadline_s) and self.deadline_s > 0),
               "retry.deadline_s must be a number > 0, or None")
        _check(is_int(self.max_concurrent_retries) and self.max_concurrent_retries >= 1,
               "retry.max_concurrent_retries must be an int >= 1")
        _check(self.backoff_max_s <= MAX_TIMEOUT_S and (self.deadline_s is None or self.deadline_s <= MAX_TIMEOUT_S),
               "retry.backoff_max_s and retry.deadline_s must be at most 7 days")
        _plain(self)


@dataclass(frozen=True)
class S3Options:
    """Overrides for the AWS credential chain and environment (``None`` = use the chain)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    anonymous: bool = False
    addressing_style: str = "auto"  # "auto" | "path" | "virtual"
    presign_expiry_s: int = 3600
    # A botocore Session to make clients from. Reusing one across loads in a process skips botocore's
    # model loading (50-130 ms per load on our test VM, 3 ms with a reused session). Default: a new one.
    session: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.session is None or self.profile is None,
               "s3.session and s3.profile exclude each other (make the session with the profile)")
        _check(self.session is None or callable(getattr(self.session, "create_client", None)),
               "s3.session must be a botocore.session.Session")
        _check(self.addressing_style in ("auto", "path", "virtual"), "s3.addressing_style must be auto, path or virtual")
        _check(
            self.endpoint_url is None
            or (isinstance(self.endpoint_url, str) and self.endpoint_url.startswith(("http://", "https://"))),
            "s3.endpoint_url must be an http(s) URL, got " + (repr(redact_url(self.endpoint_url))
                                                              if isinstance(self.endpoint_url, str)
                                                              else type(self.endpoint_url).__name__),
        )
        for name in ("region", "profile"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and value.strip()),  # "" was taken as "not given"
                   f"s3.{name} must be a non-empty str or None, got {value!r}")
        _check(isinstance(self.anonymous, bool), f"s3.anonymous must be True or False, got {self.anonymous!r}")
        _check(is_int(self.presign_expiry_s) and 60 <= self.presign_expiry_s <= 7 * 24 * 3600,
               "s3.presign_expiry_s must be an int between 60 s and 7 days")
        _plain(self)

    def __reduce__(self):
        """Pickled (a config sent to a spawned worker) without ``session``, which belongs to its process (it
        cannot be pickled: the config failed to reach the worker at all). The worker makes its own, with the
        session's profile; credentials set on the session object itself do not travel."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        session = values.pop("session")
        if session is not None and values["profile"] is None:
            values["profile"] = getattr(session, "profile", None)
        return (functools.partial(S3Options, **values), ())

    def __copy__(self) -> "S3Options":  # frozen, and the session is shared by design: a copy is this object
        return self

    def __deepcopy__(self, memo) -> "S3Options":  # (not __reduce__'s: that one leaves the session behind)
        return self


@dataclass(frozen=True)
class LoadConfig:
    """How a load runs. Every field has a measured or conservative default."""

    chunk_bytes: int = 64 * MiB  # target size of one ranged read (measured: benchmarks/README.md)
    max_concurrency: int = 16  # ranged reads in flight at once
    host_buffer_bytes: int = 256 * MiB  # budget for staging buffers (memory in flight beyond the outputs)
    local_threads: int = 4  # threads issuing preadv for local files (direct_io: >= host_buffer_bytes // 32 MiB)
    # Threads that may read uncached local ranges at once, smallest offset first (1: one sequential
    # stream, for a real spinning disk). None: no limit (measured: benchmarks/README.md).
    local_cold_readers: int | None = None
    direct_io: bool = False  # O_DIRECT for local ranges not in the page cache: faster cold, leaves no cache
    http_engine: str = "threads"  # HTTP(S)/S3 bodies: "threads" (recv_into the tensors) or "aiohttp"
    connect_timeout_s: float = 10.0
    stall_timeout_s: float = 30.0  # no byte for this long (first byte included) -> retried; also S3 HEAD/LIST
    verify_checksums: bool = False  # check published sha256 of files read whole (integrity.py: one in-order hash pass)
    retry: RetryConfig = field(default_factory=RetryConfig)
    s3: S3Options = field(default_factory=S3Options)
    http_headers: Mapping[str, str] = field(default_factory=lambda: Headers({}))  # e.g. Authorization; never logged

    def __post_init__(self) -> None:
        _check(is_int(self.chunk_bytes) and MiB // 16 <= self.chunk_bytes <= 1 << 30,
               "chunk_bytes must be an int between 64 KiB and 1 GiB")
        _check(self.chunk_bytes % 64 == 0, "chunk_bytes must be a multiple of 64")
        _check(is_int(self.max_concurrency) and 1 <= self.max_concurrency <= 1024,
               "max_concurrency must be an int between 1 and 1024")
        _check(is_int(self.local_threads) and 1 <= self.local_threads <= 256,
               "local_threads must be an int between 1 and 256")
        _check(self.local_cold_readers is None or (is_int(self.local_cold_readers)
                                                   and 1 <= self.local_cold_readers <= 256),
               "local_cold_readers must be None or an int between 1 and 256")
        _check(is_int(self.host_buffer_bytes) and self.host_buffer_bytes >= 2 * self.chunk_bytes,
               "host_buffer_bytes must be an int that holds at least two chunks (2 * chunk_bytes)")
        for name in ("direct_io", "verify_checksums"):
            value = getattr(self, name)
            _check(isinstance(value, bool), f"{name} must be True or False, got {value!r}")
        _check(self.http_engine in ("threads", "aiohttp"), "http_engine must be 'threads' or 'aiohttp'")
        _check(all(_is_num(t) and 0 < t <= MAX_TIMEOUT_S for t in (self.connect_timeout_s, self.stall_timeout_s)),
               "timeouts must be numbers of seconds > 0 and at most 7 days")
        _check(isinstance(self.retry, RetryConfig), "retry must be a RetryConfig")
        _check(isinstance(self.s3, S3Options), "s3 must be an S3Options")
        if not isinstance(self.http_headers, Headers):
            object.__setattr__(self, "http_headers", Headers(self.http_headers))
        _plain(self)

    def replace(self, **changes: Any) -> LoadConfig:
        return replace(self, **changes)


#: Request headers that are credentials: they go to the origin they are for, never to another (as browsers,
#: curl, requests and aiohttp drop them on a redirect elsewhere).
CREDENTIAL_HEADERS = ("authorization", "cookie", "proxy-authorization")


def without_credentials(config: "LoadConfig") -> "LoadConfig":
    """``config`` minus the credentials in ``http_headers`` (``CREDENTIAL_HEADERS``): for requests to another
    origin than the one they are for (presigned S3 URLs carry their own signature; the Hub's CDN)."""
    headers = {k: v for k, v in config.http_headers.items() if k.lower() not in CREDENTIAL_HEADERS}
    return config if len(headers) == len(config.http_headers) else config.replace(http_headers=headers)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _plain(config: Any) -> None:
    """Checked numbers as Python's own int and float: numpy's are accepted, but would reach plans, traces and
    JSON files (``json`` cannot write an ``np.int64``)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if is_int(value) and type(value) is not int:
            object.__setattr__(config, f.name, int(value))
        elif isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) \
                and type(value) is not float:
            object.__setattr__(config, f.name, float(value))


def is_int(value: Any) -> bool:
    """An integer, numpy's included; not a bool (``True`` is an int to Python, never a count to us)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


_SIZE_SUFFIXES = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB, "mib": MiB,
                  "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """``"16MiB"`` / ``"16m"`` / ``"1048576"`` -> bytes (binary units)."""
    raw = text.strip().lower().replace(" ", "")
    digits = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    suffix = raw[len(digits):]
    try:  # exact: a decimal, not a float (2**53 + 1 bytes stays itself)
        if not digits.isascii() or len(digits) > 40:
            raise ValueError(digits)
        return int(Decimal(digits) * _SIZE_SUFFIXES[suffix])
    except (KeyError, ValueError, ArithmeticError):
        raise ConfigError(f"not a size: {text!r} (try 16MiB, 512k, 1g)") from None


#: Environment variables read by :func:`from_env` (documented in the README).
ENV_VARS = {
    "FASTLOAD_CHUNK_BYTES": "chunk_bytes",
    "FASTLOAD_MAX_CONCURRENCY": "max_concurrency",
    "FASTLOAD_HOST_BUFFER_BYTES": "host_buffer_bytes",
    "FASTLOAD_LOCAL_THREADS": "local_threads",
    "FASTLOAD_STALL_TIMEOUT_S": "stall_timeout_s",
    "FASTLOAD_HTTP_ENGINE": "http_engine",
}


def from_env(environ: Mapping[str, str] | None = None, **overrides: Any) -> LoadConfig:
    """Build a config from ``FASTLOAD_*`` variables, then explicit overrides. CLI only."""
    env = os.environ if environ is None else environ
    kwargs: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(LoadConfig)}
    for var, name in ENV_VARS.items():
        if var in env:
            value = env[var]
            if name.endswith("_bytes"):
                try:
                    kwargs[name] = parse_size(value)
                except ConfigError as exc:
                    raise ConfigError(f"{var}: {exc}") from None
                continue
            if "str" in str(types[name]):
                kwargs[name] = value
                continue
            kind = float if "float" in str(types[name]) else int
            try:
                kwargs[name] = kind(value)
            except (ValueError, OverflowError):
                raise ConfigError(f"{var} must be a number, got {value!r}") from None
    for var, name in ENV_VARS.items():  # a value refused on its own: say which variable holds it
        if name in kwargs:
            try:
                LoadConfig(**{name: kwargs[name]})
            except ConfigError as exc:
                if "two chunks" not in str(exc):  # that one is about chunk_bytes and host_buffer_bytes together
                    raise ConfigError(f"{var}={env[var]!r}: {exc}") from None
    from_vars = {name: var for var, name in ENV_VARS.items() if var in env}
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return LoadConfig(**kwargs)
    except ConfigError as exc:  # chunk_bytes and host_buffer_bytes together: name the variables involved
        named = [f"{from_vars[n]}={env[from_vars[n]]!r}" for n in ("chunk_bytes", "host_buffer_bytes")
                 if n in from_vars and overrides.get(n) is None]
        if "two chunks" not in str(exc) or not named:
            raise
        raise ConfigError(f"{', '.join(named)}: {exc}") from None
