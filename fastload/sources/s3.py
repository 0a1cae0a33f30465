"""S3 and S3-compatible stores.

botocore brings the standard AWS credential chain and environment
(``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION``, profiles, instance roles), signs,
and makes the LIST and (when the first look is refused, or checksums are
verified) the HEAD calls. An object is first looked at with a presigned ranged
GET of its first bytes, as HTTP files are. Tensor bytes go through the HTTP
transport on presigned GET URLs: one aiohttp session, our own retry and integrity checks,
and no per-request signing or response buffering (measured faster than
s3fs/aiobotocore's ``get_object``, which gathers each body into one bytes
object before we could copy it; see benchmarks/README.md). Presigned URLs never
appear in messages: errors name ``s3://bucket/key``.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from datetime import timezone
from email.utils import format_datetime
from functools import partial

from ..config import LoadConfig
from ..errors import ConfigError, FastloadError, SourceNotFoundError, SourcePermissionError, TransferError
from ..integrity import checksum_from_base64
from ..redact import describe, scrub
from ..runner import detached
from .base import ObjectInfo, Segment, unresolvable
from .http import BadRequest, HttpTransport
from .retry import RETRY_STATUSES, RetryPolicy, Transient, retry_after

_NOT_FOUND = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "401"}
# Error codes worth a retry; any status HTTP retries is too (408, 429, 5xx but 501/505/511).
_TRANSIENT = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
              "ThrottlingException", "RequestLimitExceeded"}


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key). The key is everything after the bucket's slash, as the AWS CLI
    reads it: ``?``, ``#`` and a leading ``/`` are part of it, not a query, fragment or separator."""
    bucket, _, key = url[5:].partition("/") if url[:5].lower() == "s3://" else ("", "", "")
    if not bucket:
        raise ConfigError(f"not an s3://bucket/key URL: {url!r}")
    return bucket, key


def make_client(options, *, connect_timeout: float = 10, read_timeout: float = 60, region: str | None = None):
    """A botocore S3 client honouring the AWS chain, with ``S3Options`` overriding it, and the CA bundle that
    chain names (``AWS_CA_BUNDLE``, a profile's ``ca_bundle``; None: the system's), for the presigned GETs.

    The load's timeouts apply to metadata calls too: a HEAD that hangs is a stall,
    retried by fastload's policy like any other (botocore's own retries are off).
    """
    import botocore.session
    from botocore import UNSIGNED
    from botocore import exceptions as bx
    from botocore.config import Config

    cfg = Config(
        # SigV4 always: botocore would presign with legacy SigV2 in us-east-1 and other old regions, which
        # S3 refuses for KMS-encrypted objects and many S3-compatible stores refuse outright.
        signature_version=UNSIGNED if options.anonymous else "s3v4",
        s3={"addressing_style": options.addressing_style},
        retries={"total_max_attempts": 1},  # fastload's RetryPolicy is the one retry loop
        connect_timeout=connect_timeout, read_timeout=read_timeout,
    )
    # AWS_REGION is the SDKs' newer name (botocore itself reads only AWS_DEFAULT_REGION and the profile).
    try:
        session = options.session or botocore.session.Session(profile=options.profile)
        # A region set on the caller's session is an override too; the environment's comes after it.
        region = (region or options.region or session.instance_variables().get("region")
                  or os.environ.get("AWS_REGION") or None)
        client = session.create_client("s3", region_name=region, endpoint_url=options.endpoint_url, config=cfg)
        return client, session.get_config_variable("ca_bundle")
    except bx.ProfileNotFound as exc:
        raise ConfigError(f"AWS profile {exc.kwargs.get('profile')!r} is not in the AWS config or credentials "
                          "files (S3Options.profile or AWS_PROFILE)") from None
    except bx.BotoCoreError as exc:  # a broken config file, an invalid endpoint or region
        raise ConfigError(f"cannot make an S3 client: {describe(scrub(exc))}") from None


def _translate(exc: Exception, url: str) -> Exception:
    from botocore import exceptions as bx

    if isinstance(exc, bx.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
        if code == "NoSuchBucket":
            return SourceNotFoundError(f"no such bucket: {url}", url=url)
        if code in _NOT_FOUND or status == "404":
            return SourceNotFoundError(f"no such object: {url}", url=url)
        if code in _DENIED or status == "403":
            return SourcePermissionError(f"access denied ({code}): {url}", url=url)
        if status == "400" and code in ("400", "BadRequest", "InvalidRequest"):  # (a HEAD's 400 has no body)
            return TransferError(f"S3 refused the request with 400 ({code}): {url} ({_WHY_400})", url=url)
        if code in _TRANSIENT or any(v.isdigit() and int(v) in RETRY_STATUSES for v in (code, status)):
            headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders") or {}
            return Transient(f"S3 {code or status}", retry_after=retry_after(headers))
        return TransferError(f"S3 error {code or status}", url=url)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return SourcePermissionError(
            f"no AWS credentials found for {url}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile, "
            "or, for a public bucket, pass LoadConfig(s3=S3Options(anonymous=True)) (command line: --anonymous)",
            url=url)
    if isinstance(exc, bx.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(exc):  # trust, not the network
        return TransferError(f"TLS certificate not trusted ({describe(scrub(exc))}); a private CA goes in "
                             "AWS_CA_BUNDLE or the AWS config's ca_bundle", url=url)
    if unresolvable(exc):  # the endpoint's host name does not exist: no retry finds it
        return TransferError(f"no such host: {describe(scrub(exc))}", url=url)
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.ReadTimeoutError,
                        bx.ConnectTimeoutError)):
        return Transient(describe(scrub(exc)))  # (botocore's message names the endpoint it could not reach)
    if isinstance(exc, bx.ParamValidationError):  # e.g. a bucket name S3 cannot have
        return ConfigError(f"invalid S3 request for {url}: {describe(scrub(exc))}")
    return TransferError(f"S3 request failed: {describe(scrub(exc))}", url=url)  # (e.g. "can't start new thread")


#: What a 400 that gives no reason (a HEAD's has no body) or survives signing again usually means.
_WHY_400 = ("an object encrypted with a customer-provided key (SSE-C), which fastload cannot supply, or "
            "temporary credentials that expired and cannot be refreshed")


def _http_date(when) -> str | None:
    """botocore's datetime as the HTTP-date a GET's Last-Modified carries (whole seconds: a listing's
    milliseconds are dropped, as the HTTP-date has none)."""
    return format_datetime(when.astimezone(timezone.utc), usegmt=True) if when else None


def _whole_object_sha256(head: dict) -> str | None:
    """``ChecksumSHA256`` as ``"sha256:<hex>"`` when it covers the whole object.

    A multipart upload's SHA-256 is a checksum of the parts' checksums
    (``COMPOSITE``, value ``...-N``, ETag ``...-N``): not comparable to a hash of
    the bytes, so it is not used.
    """
    value = head.get("ChecksumSHA256")
    if not value or "-" in value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    if str(head.get("ETag", "")).strip('"').rpartition("-")[1]:
        return None
    return checksum_from_base64(value)


class S3Transport:
    def __init__(self, config: LoadConfig, policy: RetryPolicy, http: HttpTransport):
        self.config = config
        self.policy = policy
        self.http = http
        self._clients: dict[str | None, object] = {}  # by region: None is the configured one
        self._client_lock = asyncio.Lock()
        self._bucket_regions: dict[str, str] = {}  # buckets found in another region than the client's
        self._presigned: dict[str, tuple[str, float]] = {}  # s3:// URL -> (its GET URL, when it was signed)
        self._own_http: HttpTransport | None = None  # GETs trusting the CA bundle botocore trusts, if one is set

    async def client(self, region: str | None = None):
        async with self._client_lock:
            if region not in self._clients:
                client, ca_bundle = await detached(
                    partial(make_client, self.config.s3, connect_timeout=self.config.connect_timeout_s,
                            read_timeout=self.config.stall_timeout_s, region=region))
                client.meta.events.register("after-call.s3", self._note_redirect)  # HEAD, LIST: any call
                if ca_bundle and self._own_http is None:  # HEAD/LIST and GET trust the same CAs
                    self._own_http = self.http = HttpTransport(self.http.config, self.policy, self.http.trace,
                                                               ca_file=ca_bundle)
                self._clients[region] = client
        return self._clients[region]

    def _note_redirect(self, context=None, **_) -> None:
        """botocore signed a call (HEAD, LIST) for another region than the client's: it followed the bucket
        there, now or earlier (it remembers), so presign the bucket's GETs for that region too."""
        redirect = (context or {}).get("s3_redirect") or {}
        region = ((context or {}).get("signing") or {}).get("region")
        bucket = redirect.get("bucket")
        client = self._clients.get(None)
        if bucket and region and (redirect.get("redirected") or client is None
                                  or region != client.meta.region_name):
            self._bucket_regions[bucket] = region

    async def _call(self, url: str, method: str, **params):
        client = await self.client()

        async def once():
            try:
                return await detached(getattr(client, method), **params)  # a cancel never waits for botocore
            except Exception as exc:  # botocore raises many types; all are translated
                # Without its traceback: botocore's frames hold the response, and with it a pooled
                # connection that stays open for as long as the caller keeps our exception.
                raise _translate(exc, url) from scrub(exc).with_traceback(None)

        return await self.policy.run(once, url=url, byte_range=None, request=True)

    async def _presign(self, url: str) -> str:
        """A GET URL for ``url``, signed for its bucket's own region (botocore follows a HEAD to another
        region, but would sign the GET for the client's, and S3 would refuse it)."""
        bucket, key = split_url(url)
        client = await self.client(self._bucket_regions.get(bucket))
        fetch_url = client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.config.s3.presign_expiry_s)
        self._presigned[url] = fetch_url, time.monotonic()
        return fetch_url

    async def stat(self, url: str) -> ObjectInfo:
        bucket, key = split_url(url)
        if not key:
            raise SourceNotFoundError(f"{url} names a bucket, not an object", url=url)
        if not self.config.verify_checksums:
            probed = await self._probe(url)
            if probed is not None:
                return probed
        return await self._head(url, bucket, key)

    async def _probe(self, url: str) -> ObjectInfo | None:
        """The object as a presigned ranged GET of its first bytes sees it: its size (``Content-Range``), ETag
        and Last-Modified, as a HEAD gives them, and the first bytes with them (a safetensors header's length,
        an index whole), so the header read follows at once: one round trip fewer than HEAD, then GET.

        A 404 is the answer (no such object; resolve asks whether the bucket exists). Anything else the GET
        meets (a refusal, a 5xx, a stall), or a failure to sign, returns None after that one attempt and the HEAD
        asks, retried as any request: botocore follows a bucket to its region, refreshes credentials, and names
        the error exactly (a GET's 403 may be a stale signature, a 400 a region or SSE-C, a 416 an empty
        object). Not with ``verify_checksums``: the object's ChecksumSHA256 comes with a HEAD only."""
        try:
            fetch_url = await self._presign(url)
        except Exception:  # noqa: BLE001 -- no credentials, a bad config: the HEAD raises it, translated
            return None
        try:
            info = await self.http.probe(fetch_url, url)
        except SourceNotFoundError:
            raise SourceNotFoundError(f"no such object: {url}", url=url) from None
        return None if info is None else replace(info, url=url, fetch_url=fetch_url)

    async def _head(self, url: str, bucket: str, key: str) -> ObjectInfo:
        # Checksum mode only when asked: it needs kms:Decrypt on KMS-encrypted objects.
        extra = {"ChecksumMode": "ENABLED"} if self.config.verify_checksums else {}
        head = await self._call(url, "head_object", Bucket=bucket, Key=key, **extra)
        return ObjectInfo(url=url, size=int(head["ContentLength"]), etag=head.get("ETag"),
                          last_modified=_http_date(head.get("LastModified")),
                          fetch_url=await self._presign(url), checksum=_whole_object_sha256(head))

    async def no_such_bucket(self, url: str) -> bool:
        """Whether S3 says the bucket of ``url`` does not exist: asked once an object named was not found, as a
        HEAD's 404 has no body to say which of the two is missing."""
        try:
            await self._call(url, "head_bucket", Bucket=split_url(url)[0])
        except SourceNotFoundError:
            return True
        except FastloadError:  # denied, unreachable: the object's own error says enough
            return False
        return False

    async def read(self, info: ObjectInfo, segments: list[Segment], record=None) -> int:
        fetch_url, signed = self._presigned.get(info.url, (None, 0.0))
        if fetch_url is None or time.monotonic() - signed > 0.8 * self.config.s3.presign_expiry_s:
            # A load (or a stream read slowly) that outlives its GET URLs: sign again before S3 says 403. An object
            # another load looked up (from_pretrained's probes) is signed here once, so that this one can renew it.
            fetch_url = await self._presign(info.url)
        if fetch_url != info.fetch_url:
            info = replace(info, fetch_url=fetch_url)
        try:
            return await self.http.read(info, segments, record)
        except (SourcePermissionError, BadRequest):  # 403 expired; 400 ExpiredToken (temporary credentials)
            pass
        # S3 refused a URL it took before: expired early (temporary credentials end with their session),
        # or its signature went stale. Once more with a URL signed now (botocore refreshes credentials).
        self.http.trace.count("retries")  # an attempt the record counts (as every retry is)
        try:
            return await self.http.read(replace(info, fetch_url=await self._presign(info.url)), segments, record)
        except SourcePermissionError as exc:
            raise SourcePermissionError(f"access denied to the presigned GET, signed again: {info.url} (expired "
                                        "credentials, or no s3:GetObject on it?)", url=info.url) from exc
        except BadRequest as exc:
            raise TransferError(f"S3 refused the presigned GET with 400, signed again: {info.url} ({_WHY_400})",
                                url=info.url, byte_range=exc.byte_range) from exc

    async def list(self, url: str) -> list[str] | None:
        return [info.url for info in await self.objects(url)]

    async def objects(self, url: str, *, recursive: bool = False) -> list[ObjectInfo]:
        """The objects under a prefix, one level or all of them, as the listing describes them: size, ETag and
        Last-Modified, what a HEAD would say (no checksum: a listing has none), so a pull that trusts it asks
        nothing more before the bytes. Their GETs are signed when first read."""
        bucket, prefix = split_url(url)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        out: list[ObjectInfo] = []
        params = {"Bucket": bucket, "Prefix": prefix, **({} if recursive else {"Delimiter": "/"})}
        while True:
            page = await self._call(url, "list_objects_v2", **params)
            out.extend(ObjectInfo(url=f"s3://{bucket}/{obj['Key']}", size=int(obj.get("Size") or 0),
                                  etag=obj.get("ETag"), last_modified=_http_date(obj.get("LastModified")))
                       for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return out
            params["ContinuationToken"] = token

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
        if self._own_http is not None:
            await self._own_http.aclose()
