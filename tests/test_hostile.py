"""Hostile checkpoints: every case of the attack corpus is a FormatError, quickly, in bounded memory.

The corpus (``attacks/make.py``) is generated into a temporary directory: malformed
and adversarial safetensors headers, and shard indexes that try to escape the
checkpoint directory or name another host. Each is loaded from disk and over
HTTP; over HTTP the server log also shows that no tensor byte and no path
outside the checkpoint was ever requested.
"""

from __future__ import annotations

import re
import shutil
import struct
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

import fastload
from attacks.make import Case, case_names, write_corpus
from reliability_helpers import QUICK

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Case]:
    return {c.name: c for c in write_corpus(tmp_path_factory.mktemp("attacks"))}


@pytest.fixture(scope="module")
def served_corpus(corpus, http_root) -> Path:
    """The corpus copied under the HTTP server's root (once per module)."""
    root = Path(next(iter(corpus.values())).path).parents[1]
    target = http_root / "attacks"
    if not target.exists():
        shutil.copytree(root, target)
    return target


CASES = case_names()


def _declared_end(path: Path) -> int:
    """Where the header says the data starts (capped at the file size): no byte past it is needed."""
    raw = path.read_bytes()[:8]
    size = path.stat().st_size
    if len(raw) < 8:
        return size
    return min(size, 8 + struct.unpack("<Q", raw)[0])


def _load_bounded(source: str, budget_bytes: int) -> tuple[BaseException | None, float, int]:
    before = set(threading.enumerate())
    tracemalloc.start()
    start = time.monotonic()
    try:
        fastload.load(source, config=QUICK)
        error = None
    except BaseException as exc:  # noqa: BLE001 - the test inspects whatever was raised
        error = exc
    seconds = time.monotonic() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    left = [t for t in threading.enumerate() if t not in before and "process_request" not in t.name]
    assert not left, f"threads left running: {left}"
    assert peak < budget_bytes, f"peak Python memory {peak / 1e6:.1f} MB over the {budget_bytes / 1e6:.1f} MB bound"
    return error, seconds, peak


def _budget(case: Case) -> int:
    size = case.path.stat().st_size if case.path.is_file() else (
        case.path / "model.safetensors.index.json").stat().st_size
    return 32 * 2**20 + 4 * min(size, 64 << 20)  # fixed overhead + a few copies of what was read


@pytest.mark.parametrize("name", CASES)
def test_hostile_local_is_format_error(corpus, name):
    case = corpus[name]
    error, seconds, _ = _load_bounded(str(case.path), _budget(case))
    assert isinstance(error, fastload.FormatError), f"{name}: {type(error).__name__}: {error}"
    assert isinstance(error, ValueError)
    assert re.search(case.match, str(error)), f"{name}: {error}"
    assert seconds < 5.0, f"{name} took {seconds:.2f} s"


@pytest.mark.parametrize("name", CASES)
def test_hostile_over_http_is_format_error(corpus, served_corpus, http_server, name):
    case = corpus[name]
    relative = case.path.relative_to(case.path.parents[1])
    served = served_corpus / relative
    url = http_server.url_for(served) + ("/" if case.kind == "index" else "")
    error, seconds, _ = _load_bounded(url, _budget(case))
    assert isinstance(error, fastload.FormatError), f"{name}: {type(error).__name__}: {error}"
    assert re.search(case.match, str(error)), f"{name}: {error}"
    assert seconds < 5.0, f"{name} took {seconds:.2f} s"
    log = http_server.log
    body = sum(r.body_bytes for r in log if 200 <= r.status < 300)  # object bytes, not error pages
    if case.kind == "file":
        # Only the header was read: never a tensor byte, never twice.
        assert body <= _declared_end(case.path) + 1, [(r.range, r.body_bytes) for r in log]
    else:
        prefix = "/" + str(served.relative_to(http_server.root)) + "/"
        assert all(r.path.startswith(prefix) for r in log), [r.path for r in log]  # nothing outside the directory
        index_size = (case.path / "model.safetensors.index.json").stat().st_size
        assert body <= min(index_size, 64 << 20) + 2 + 2 * 256


def test_error_messages_stay_short(corpus):
    """A hostile value is quoted, not dumped: messages stay readable whatever the header holds."""
    for case in corpus.values():
        try:
            fastload.plan(str(case.path))
        except fastload.FormatError as exc:
            assert len(str(exc)) < 600, (case.name, len(str(exc)))
        except fastload.FastloadError:
            pass


def test_format_errors_are_not_retried(http_server, corpus, served_corpus):
    case = corpus["unknown_dtype"]
    url = http_server.url_for(served_corpus / case.path.relative_to(case.path.parents[1]))
    trace = fastload.Trace()
    with pytest.raises(fastload.FormatError):
        fastload.load(url, config=QUICK, trace=trace)
    assert not trace.summary().counters.get("retries")
    # The size probe (it brings the 8-byte length prefix), the header: then the error.
    assert [r.range for r in http_server.log] == ["bytes=0-7", f"bytes=8-{http_server.log[1].range.split('-')[-1]}"]
