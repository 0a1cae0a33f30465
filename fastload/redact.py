"""Keep secrets out of messages, exception chains and traces.

Presigned URLs carry their credentials in the query string
(``X-Amz-Signature=...``), URLs may carry ``user:password@``, and request
headers carry ``Authorization``. fastload shows URLs only through
:func:`redact_url`, and scrubs third-party exceptions (aiohttp puts the request
URL, query string included, into some messages and the request headers into
``ClientResponseError``) before chaining them with ``raise ... from``.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import SplitResult, urlsplit

HIDDEN = "***"

# A URL inside free text: scheme://, then anything up to whitespace or a quote; punctuation that ends a
# sentence or clause (";", ",", ".", ")") after it is the text's, not the URL's.
_URL_IN_TEXT = re.compile(r"""[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'"<>]*[^\s'"<>;,.)]""")
# Credentials that can appear outside a URL (a header echoed in a message).
_SECRET_IN_TEXT = re.compile(
    r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:[a-z0-9-]+\s+)?|bearer\s+|"
    r"x-amz-signature=|x-amz-credential=|x-amz-security-token=|signature=|awsaccesskeyid=|credential=)"
    r"([^\s&,;'\"]+)")


def redact_url(url: str) -> str:
    """``url`` with its password and query values hidden; plain paths are returned unchanged.

    ``https://u:pw@h/p?X-Amz-Signature=abc&x=1`` -> ``https://u:***@h/p?X-Amz-Signature=***&x=***``.
    """
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return _redact_unparsable(url)
    if parts.scheme in ("file", "s3"):  # an S3 key is literal: "?" and "#" in it are not a query or fragment
        return url
    netloc = parts.netloc
    if "@" not in netloc and "@" in url.partition("://")[2].partition("/")[0]:
        return _redact_unparsable(url)  # a raw "?" or "#" inside a password: the parser cut the authority there
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{HIDDEN}@{host}" if ":" in userinfo else f"{HIDDEN}@{host}"
    query = "&".join(f"{item.split('=', 1)[0]}={HIDDEN}" if item else item
                     for item in parts.query.split("&")) if parts.query else ""
    fragment = HIDDEN if parts.fragment else ""
    return SplitResult(parts.scheme, netloc, parts.path, query, fragment).geturl()


def _redact_unparsable(url: str) -> str:
    """The credentials (all of the authority up to its last ``@``), query and fragment of a URL the parser
    cannot read, or reads wrongly (a raw ``?`` or ``#`` in a password), hidden."""
    scheme, _, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = f"{HIDDEN}@{authority.rpartition('@')[2]}"
    text = f"{scheme}://{authority}{slash}{path}"
    cut = re.search(r"[?#]", text)
    return text if cut is None else f"{text[:cut.start()]}{cut.group()}{HIDDEN}"


def printable(text: str) -> str:
    """``text`` safe for a terminal line: control characters (escape sequences, newlines) escaped, as ``repr``
    writes them. Tensor names and metadata come from the file, which anyone may have written."""
    return text if text.isprintable() else repr(text)[1:-1]


def columns(text: str) -> int:
    """Terminal columns ``text`` takes: two for an East Asian wide or fullwidth character (a CJK tensor name),
    none for a combining mark or a format character (a zero-width joiner), one for the others."""
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) == "Cf" else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def pad(text: str, width: int) -> str:
    """``text`` and spaces up to ``width`` terminal columns (``str.ljust`` counts characters, not columns)."""
    return text + " " * (width - columns(text))


def redact_text(text: str) -> str:
    """Hide every URL's secrets and any credential-looking ``name=value`` in free text."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _SECRET_IN_TEXT.sub(lambda m: m.group(1) + HIDDEN, text)


def describe(exc: BaseException, limit: int = 300) -> str:
    """A one-line, secret-free description of a (third-party) exception: ``Type: message``."""
    try:
        text = str(exc)
    except Exception:  # a broken __str__ must not hide the real error
        text = ""
    text = redact_text(" ".join(text.split()))
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def scrub(exc: BaseException, _depth: int = 0) -> BaseException:
    """Remove URLs' secrets and request headers from ``exc`` and its chain, in place; returns ``exc``.

    Used on third-party exceptions before they are chained to a fastload error,
    so that a printed traceback cannot show a presigned URL or a header value.
    """
    if exc is None or _depth > 8:
        return exc
    request_info = getattr(exc, "request_info", None)
    if request_info is not None:  # aiohttp ClientResponseError: str() and repr() show URL and headers
        try:
            exc.request_info = _scrubbed_request_info(request_info)
        except Exception:  # not aiohttp's RequestInfo after all
            exc.request_info = None
        for name in ("headers", "history"):
            if hasattr(exc, name):
                setattr(exc, name, None if name == "headers" else ())
        exc.args = (exc.request_info, ())
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError: S3's error body echoes the access key id, the
        error = response.get("Error") or {}  # signature and the canonical request; keep code and status only
        exc.response = {"Error": {k: error[k] for k in ("Code", "Message") if k in error},
                        "ResponseMetadata": {k: v for k, v in (response.get("ResponseMetadata") or {}).items()
                                             if k == "HTTPStatusCode"}}
    if hasattr(exc, "_url"):  # aiohttp InvalidURL
        exc._url = redact_url(str(exc._url))
    exc.args = tuple(redact_text(a) if isinstance(a, str) else a for a in exc.args)
    for name in ("url", "real_url", "endpoint_url", "filename", "filename2"):
        value = exc.__dict__.get(name) if hasattr(exc, "__dict__") else None
        if isinstance(value, str):
            setattr(exc, name, redact_url(value))
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None and linked is not exc:
            scrub(linked, _depth + 1)
    return exc


def _scrubbed_request_info(info):
    from aiohttp import RequestInfo
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    url = URL(redact_url(str(info.url)), encoded=True)
    real_url = URL(redact_url(str(getattr(info, "real_url", info.url))), encoded=True)
    return RequestInfo(url, info.method, CIMultiDictProxy(CIMultiDict()), real_url)


__all__ = ["HIDDEN", "describe", "redact_text", "redact_url", "scrub"]
