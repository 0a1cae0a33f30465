"""The fastload error hierarchy.

One root, ``FastloadError``, mixed with the builtin that fits, so that user code
catching ``FileNotFoundError`` / ``ValueError`` / ``OSError`` keeps working.
Third-party exceptions (aiohttp, botocore, OS errors) are chained with
``raise ... from`` and never escape unwrapped.
"""

from __future__ import annotations

from .redact import redact_text, redact_url


def format_range(byte_range: tuple[int, int] | None) -> str:
    """Render a half-open byte range for messages: ``bytes [0, 8)``."""
    if byte_range is None:
        return ""
    return f"bytes [{byte_range[0]}, {byte_range[1]})"


class FastloadError(Exception):
    """Root of every error fastload raises."""


def _rebuilt(cls: type, args: tuple, state: dict) -> BaseException:
    """An error as it was pickled, without running ``__init__`` again (it would redact the message twice)."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class _Redacted:
    """Pickled and copied as built: ``.args`` and the attributes as they are (for multiprocessing, Ray)."""

    def __reduce__(self):
        return _rebuilt, (type(self), self.args, dict(self.__dict__))


class ConfigError(FastloadError, ValueError):
    """An invalid option or combination of options."""


class FormatError(FastloadError, ValueError):
    """A malformed or hostile safetensors file or shard index."""


class _UrlError(_Redacted, FastloadError):
    """An error about one source: the message and ``.url`` are redacted (no query strings, passwords)."""

    def __init__(self, message: str, *, url: str | None = None):
        super().__init__(redact_text(message))
        self.url = redact_url(url) if url else url

    def __str__(self) -> str:  # OSError subclasses would otherwise print "[Errno ...]"-style tuples
        return self.args[0] if self.args else ""


class SourceNotFoundError(_UrlError, FileNotFoundError):
    """A file, URL or object that does not exist (404, NoSuchKey, ENOENT)."""


class SourcePermissionError(_UrlError, PermissionError):
    """Access denied (403, AccessDenied, EACCES)."""


class _TransportError(_Redacted, FastloadError, OSError):
    """Common shape of the I/O errors: they name the URL and byte range."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        byte_range: tuple[int, int] | None = None,
        attempts: int | None = None,
    ):
        url = redact_url(url) if url else url  # never a presigned query string or a password
        parts = [redact_text(message)]
        if url:
            parts.append(f"url={url}")
        if byte_range is not None:
            parts.append(format_range(byte_range))
        if attempts:
            parts.append(f"attempts={attempts}")
        super().__init__("; ".join(parts))
        self.url = url
        self.byte_range = byte_range
        self.attempts = attempts

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


class TransferError(_TransportError):
    """A transfer failed for good: retries exhausted or a non-retryable reply."""


class SourceChangedError(_TransportError):
    """The object changed (size, ETag, Last-Modified) while it was being loaded."""


class IntegrityError(_TransportError):
    """Bytes that do not add up: short read, wrong length, checksum mismatch."""


class DeviceError(FastloadError, RuntimeError):
    """A device allocation or copy failed (e.g. CUDA out of memory)."""


__all__ = [
    "FastloadError",
    "ConfigError",
    "FormatError",
    "SourceNotFoundError",
    "SourcePermissionError",
    "TransferError",
    "SourceChangedError",
    "IntegrityError",
    "DeviceError",
    "format_range",
]
