"""The test servers themselves: ranges, status codes, every fault, the proxy, S3."""

from __future__ import annotations

import http.client
import threading
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.exceptions import ClientError

from servers import FaultProxy, Faults, RangeHTTPServer, S3Server

DATA = bytes(range(256)) * 12 + b"tail"  # 3076 bytes, no two neighbours alike
SIZE = len(DATA)

Response = tuple[int, http.client.HTTPMessage, bytes]


def get(port: int, path: str, headers: dict[str, str] | None = None,
        method: str = "GET") -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def url_path(server: RangeHTTPServer, file: Path) -> str:
    return urlsplit(server.url_for(file)).path


@pytest.fixture
def served(http_server: RangeHTTPServer, http_dir: Path) -> str:
    """The URL path of a file holding DATA."""
    (http_dir / "data.bin").write_bytes(DATA)
    return url_path(http_server, http_dir / "data.bin")


# -- plain serving ---------------------------------------------------------------


def test_full_get_and_head(http_server: RangeHTTPServer, served: str) -> None:
    status, headers, body = get(http_server.port, served)
    assert (status, body) == (200, DATA)
    assert headers["Content-Length"] == str(SIZE)
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["ETag"].startswith('"') and headers["ETag"].endswith('"')
    parsedate_to_datetime(headers["Last-Modified"])

    status, head_headers, body = get(http_server.port, served, method="HEAD")
    assert (status, body) == (200, b"")
    assert head_headers["Content-Length"] == str(SIZE)
    assert head_headers["ETag"] == headers["ETag"]


@pytest.mark.parametrize(("header", "first", "last"), [
    ("bytes=0-9", 0, 9),
    ("bytes=100-", 100, SIZE - 1),
    ("bytes=-5", SIZE - 5, SIZE - 1),
    ("bytes=-99999", 0, SIZE - 1),
    ("bytes=3000-99999", 3000, SIZE - 1),
    ("bytes=7-7", 7, 7),
])
def test_single_ranges(http_server: RangeHTTPServer, served: str, header: str,
                       first: int, last: int) -> None:
    status, headers, body = get(http_server.port, served, {"Range": header})
    assert status == 206
    assert headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
    assert headers["Content-Length"] == str(last - first + 1)
    assert body == DATA[first:last + 1]


@pytest.mark.parametrize("header", ["bytes=5-2", "bytes=0-1,4-5", "items=0-1", "bytes=x-"])
def test_ignorable_ranges_get_everything(http_server: RangeHTTPServer, served: str,
                                         header: str) -> None:
    status, _, body = get(http_server.port, served, {"Range": header})
    assert (status, body) == (200, DATA)


def test_unsatisfiable_range(http_server: RangeHTTPServer, http_dir: Path, served: str) -> None:
    status, headers, _ = get(http_server.port, served, {"Range": f"bytes={SIZE}-"})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{SIZE}"
    (http_dir / "empty").write_bytes(b"")
    empty = url_path(http_server, http_dir / "empty")
    assert get(http_server.port, empty, {"Range": "bytes=-1"})[0] == 416
    assert get(http_server.port, empty)[:3:2] == (200, b"")


def test_missing_and_traversal(http_server: RangeHTTPServer, http_root: Path) -> None:
    (http_root.parent / "secret.txt").write_text("no")
    assert get(http_server.port, "/nope.bin")[0] == 404
    assert get(http_server.port, "/../secret.txt")[0] == 403
    assert get(http_server.port, "/%2e%2e/secret.txt")[0] == 403
    assert get(http_server.port, "/")[0] == 404  # no directory listings


def test_streams_large_file_and_keeps_alive(http_server: RangeHTTPServer, http_dir: Path) -> None:
    big = bytes(range(251)) * 12_000  # ~3 MiB: several blocks
    (http_dir / "big.bin").write_bytes(big)
    path = url_path(http_server, http_dir / "big.bin")
    conn = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=10)
    bodies, sockets = [], []
    for header in (f"bytes={(1 << 20) - 3}-{(2 << 20) + 5}", "bytes=-10"):
        conn.request("GET", path, headers={"Range": header})
        bodies.append(conn.getresponse().read())
        sockets.append(conn.sock)
    conn.close()
    assert sockets[0] is not None and sockets[0] is sockets[1]  # one keep-alive connection
    assert bodies == [big[(1 << 20) - 3:(2 << 20) + 6], big[-10:]]


def test_log_bytes_sent_and_reset(http_server: RangeHTTPServer, served: str) -> None:
    get(http_server.port, served, {"Range": "bytes=10-19"})
    get(http_server.port, served, method="HEAD")
    assert [(r.method, r.path, r.range, r.status, r.body_bytes) for r in http_server.log] == [
        ("GET", served, "bytes=10-19", 206, 10), ("HEAD", served, None, 200, 0)]
    assert http_server.bytes_sent(served) == http_server.bytes_sent() == 10
    assert http_server.bytes_sent("/elsewhere/*") == 0
    assert len(http_server.requests("*/data.bin")) == 2
    http_server.faults.fail_first(1)
    http_server.reset()
    assert http_server.log == [] and http_server.faults.rules == []


def test_conditional_requests(http_server: RangeHTTPServer, served: str) -> None:
    etag = get(http_server.port, served, method="HEAD")[1]["ETag"]
    assert get(http_server.port, served, {"If-Match": '"other"'})[0] == 412
    assert get(http_server.port, served, {"If-Match": etag, "Range": "bytes=0-0"})[0] == 206
    assert get(http_server.port, served, {"If-Range": etag, "Range": "bytes=0-0"})[0] == 206
    assert get(http_server.port, served, {"If-Range": '"old"', "Range": "bytes=0-0"})[0] == 200


# -- faults ----------------------------------------------------------------------


def test_fail_first_with_retry_after(http_server: RangeHTTPServer, served: str) -> None:
    rule = http_server.faults.fail_first(2, 503, retry_after=1)
    first, second, third = (get(http_server.port, served) for _ in range(3))
    assert [first[0], second[0], third[0]] == [503, 503, 200]
    assert first[1]["Retry-After"] == "1"
    assert third[2] == DATA
    assert (rule.seen, rule.fired) == (3, 2)


def test_random_errors_are_seeded(http_server: RangeHTTPServer, served: str) -> None:
    def run() -> list[int]:
        http_server.reset()
        rule = http_server.faults.random_errors(0.5, seed=7, retry_after=2)
        statuses = [get(http_server.port, served)[0] for _ in range(30)]
        assert rule.fired == sum(s != 200 for s in statuses)
        return statuses

    statuses = run()
    assert set(statuses) <= {200, 500, 503, 429}
    assert 5 < statuses.count(200) < 25
    assert run() == statuses


def test_cut_after(http_server: RangeHTTPServer, served: str) -> None:
    rule = http_server.faults.cut_after(100, times=1)
    with pytest.raises(http.client.IncompleteRead) as cut:
        get(http_server.port, served)
    assert len(cut.value.partial) == 100 and cut.value.partial == DATA[:100]
    assert get(http_server.port, served)[2] == DATA
    assert rule.fired == 1
    assert http_server.bytes_sent(served) == 100 + SIZE


def test_short_body(http_server: RangeHTTPServer, served: str) -> None:
    http_server.faults.short_body(missing=10)
    conn = http.client.HTTPConnection("127.0.0.1", http_server.port, timeout=10)
    conn.request("GET", served, headers={"Range": "bytes=0-99"})
    response = conn.getresponse()
    assert response.headers["Content-Length"] == "100"
    with pytest.raises(http.client.IncompleteRead) as short:
        response.read()
    conn.close()
    assert short.value.partial == DATA[:90]


def test_ignore_range(http_server: RangeHTTPServer, served: str) -> None:
    http_server.faults.ignore_range()
    status, headers, body = get(http_server.port, served, {"Range": "bytes=0-9"})
    assert (status, body) == (200, DATA)
    assert "Content-Range" not in headers


def test_wrong_content_range(http_server: RangeHTTPServer, served: str) -> None:
    http_server.faults.wrong_content_range(shift=8)
    status, headers, body = get(http_server.port, served, {"Range": "bytes=10-19"})
    assert status == 206
    assert headers["Content-Range"] == f"bytes 18-27/{SIZE}"
    assert body == DATA[10:20]


def test_slow_first_byte(http_server: RangeHTTPServer, served: str) -> None:
    http_server.faults.slow_first_byte(0.3, times=1)
    started = time.monotonic()
    get(http_server.port, served)
    slow = time.monotonic() - started
    started = time.monotonic()
    get(http_server.port, served)
    assert slow >= 0.3 > time.monotonic() - started


def test_change_etag_after(http_server: RangeHTTPServer, served: str) -> None:
    rule = http_server.faults.change_etag_after(1)
    _, before, _ = get(http_server.port, served, method="HEAD")
    _, after, body = get(http_server.port, served)
    assert body == DATA
    assert after["ETag"] != before["ETag"]
    assert parsedate_to_datetime(after["Last-Modified"]) > \
        parsedate_to_datetime(before["Last-Modified"])
    old, new = before["ETag"], after["ETag"]
    assert get(http_server.port, served, {"If-Match": old})[0] == 412
    assert get(http_server.port, served, {"If-Match": new, "Range": "bytes=0-3"})[0] == 206
    assert get(http_server.port, served, {"If-Range": old, "Range": "bytes=0-3"})[0] == 200
    assert get(http_server.port, served, {"If-Range": new, "Range": "bytes=0-3"})[0] == 206
    assert (rule.seen, rule.fired) == (6, 5)


def test_faults_compose_and_match_paths(http_server: RangeHTTPServer, served: str) -> None:
    other = http_server.faults.fail_first(5, 500, path="*.json")
    fail = http_server.faults.fail_first(1, 503, path="*/data.bin")
    cut = http_server.faults.cut_after(10, times=1)
    assert get(http_server.port, served)[0] == 503
    with pytest.raises(http.client.IncompleteRead):
        get(http_server.port, served)
    assert get(http_server.port, served)[2] == DATA
    assert (other.seen, fail.fired, cut.seen, cut.fired) == (0, 1, 2, 1)


def test_stop_is_prompt_with_a_hanging_request(http_dir: Path) -> None:
    (http_dir / "x").write_bytes(b"x")
    server = RangeHTTPServer(http_dir).start()
    server.faults.hang()
    errors: list[BaseException] = []

    def client() -> None:
        try:
            get(server.port, "/x")
        except (OSError, http.client.HTTPException) as exc:
            errors.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.log and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.status for r in server.log] == [0]  # in flight, nothing sent
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.0
    thread.join(timeout=5)
    assert not thread.is_alive() and len(errors) == 1


# -- proxy and S3 ----------------------------------------------------------------


def test_proxy_forwards_ranges_and_applies_faults(http_server: RangeHTTPServer,
                                                  served: str) -> None:
    with FaultProxy(http_server.url, Faults()) as proxy:
        status, headers, body = get(proxy.port, served, {"Range": "bytes=5-9"})
        assert (status, headers["Content-Range"], body) == (206, f"bytes 5-9/{SIZE}", DATA[5:10])
        proxy.faults.cut_after(3, times=1)
        with pytest.raises(http.client.IncompleteRead):
            get(proxy.port, served, {"Range": "bytes=0-99"})
        assert get(proxy.port, "/missing")[0] == 404
    assert [(r.status, r.body_bytes) for r in proxy.log] == [(206, 5), (206, 3), (404, 14)]
    assert http_server.bytes_sent(served) == 5 + 100


def test_s3_environment_and_upload(s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"a")
    (tmp_path / "sub" / "b.bin").write_bytes(b"bb")
    keys = s3_server.upload_dir(s3_bucket, "ckpt", tmp_path)
    assert keys == ["ckpt/a.bin", "ckpt/sub/b.bin"]
    plain = boto3.client("s3")  # endpoint, region and keys all come from the environment
    listed = plain.list_objects_v2(Bucket=s3_bucket, Prefix="ckpt/")
    assert [o["Key"] for o in listed["Contents"]] == keys
    s3_server.put("fresh-bucket-for-put", "k", b"v")
    assert plain.get_object(Bucket="fresh-bucket-for-put", Key="k")["Body"].read() == b"v"


def test_s3_ranged_get_through_proxy(s3_server: S3Server, s3_proxy: FaultProxy,
                                     s3_bucket: str) -> None:
    s3_server.put(s3_bucket, "model.safetensors", DATA)
    client = s3_server.client(endpoint_url=s3_proxy.url,
                              retries={"mode": "standard", "max_attempts": 3})
    s3_proxy.faults.fail_first(1, 503)
    reply = client.get_object(Bucket=s3_bucket, Key="model.safetensors", Range="bytes=10-19")
    assert reply["ContentRange"] == f"bytes 10-19/{SIZE}"
    assert reply["Body"].read() == DATA[10:20]
    path = f"/{s3_bucket}/model.safetensors"
    assert [(r.status, r.range) for r in s3_proxy.requests(path)] == [
        (503, "bytes=10-19"), (206, "bytes=10-19")]

    s3_proxy.faults.change_etag_after(0)
    etag = client.head_object(Bucket=s3_bucket, Key="model.safetensors")["ETag"]
    stale = s3_server.client().head_object(Bucket=s3_bucket, Key="model.safetensors")["ETag"]
    assert etag != stale
    with pytest.raises(ClientError) as failed:
        client.get_object(Bucket=s3_bucket, Key="model.safetensors", IfMatch=stale)
    assert failed.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    ok = client.get_object(Bucket=s3_bucket, Key="model.safetensors", IfMatch=etag)
    assert ok["Body"].read() == DATA
