"""Several loads at once, from different threads of one process: each correct, none affecting another."""

from __future__ import annotations

import threading

import pytest

import fastload
from fastload.trace import NULL_TRACE
from reliability_helpers import QUICK, Leaks, assert_bit_exact, private_tmp, write_checkpoint  # noqa: F401


@pytest.fixture
def sources(http_server, http_dir, s3_server, s3_bucket, tmp_path):
    """Four different checkpoints, one per transport: name -> (source, tensors, config)."""
    out = {}
    for i, kind in enumerate(("local", "file", "http", "s3")):
        directory = http_dir if kind == "http" else tmp_path
        path, tensors = write_checkpoint(directory / f"{kind}.safetensors", seed=i, count=4 + i)
        if kind == "local":
            source = str(path)
        elif kind == "file":
            source = path.as_uri()
        elif kind == "http":
            source = http_server.url_for(path)
        else:
            s3_server.put(s3_bucket, "m.safetensors", path.read_bytes())
            source = f"s3://{s3_bucket}/m.safetensors"
        out[kind] = (source, tensors, path.stat().st_size)
    return out


def run_threads(jobs: dict) -> dict:
    """Run each job in its own thread, all released at once; returns name -> result or exception."""
    barrier = threading.Barrier(len(jobs))
    results: dict = {}

    def target(name, job):
        barrier.wait()
        try:
            results[name] = job()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[name] = exc

    threads = [threading.Thread(target=target, args=item, name=f"job-{item[0]}") for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    return results


def test_loads_in_parallel_threads_are_independent(sources, http_server):
    # The HTTP checkpoint also suffers random errors: its retries must not disturb the others.
    http_server.faults.random_errors(0.2, (503,), seed=3, path="*http.safetensors")
    traces = {name: fastload.Trace() for name in sources}
    config = QUICK.replace(retry=fastload.RetryConfig(max_attempts=12, backoff_base_s=0.01, backoff_max_s=0.05))
    jobs = {}
    for round_ in range(2):
        for name, (source, _, _) in sources.items():
            jobs[f"{name}-{round_}"] = (lambda s=source, n=name, r=round_:
                                        fastload.load(s, config=config, trace=traces[n] if r == 0 else None))
    jobs["missing"] = lambda: fastload.load(sources["http"][0] + ".absent", config=QUICK)
    jobs["streamed"] = lambda: dict(_stream_all(sources["local"][0]))
    with Leaks({http_server.port}) as leaks:
        results = run_threads(jobs)
        leaks.check(grace_s=0.5)
    for job, result in results.items():
        if job == "missing":
            assert isinstance(result, fastload.SourceNotFoundError), result
            continue
        name = job.split("-")[0] if job != "streamed" else "local"
        assert not isinstance(result, BaseException), f"{job}: {type(result).__name__}: {result}"
        assert_bit_exact(result, sources[name][1])
    for name, trace in traces.items():  # each trace saw its own load and nothing else
        summary = trace.summary()
        expected = sources[name][2]
        assert summary.bytes_fetched == expected, (name, summary.bytes_fetched, expected)
    assert traces["http"].summary().counters.get("retries", 0) >= 1
    assert not NULL_TRACE.summary().counters, "the shared no-op trace must never record anything"


def _stream_all(source):
    with fastload.stream(source, config=QUICK) as s:
        yield from s


def test_many_concurrent_streams_share_nothing(sources):
    """Eight streams of the same file at once, each handing out its own tensors (no shared buffers)."""
    source, tensors, _ = sources["local"]
    results = run_threads({i: (lambda: dict(_stream_all(source))) for i in range(8)})
    pointers = set()
    for result in results.values():
        assert not isinstance(result, BaseException), result
        assert_bit_exact(result, tensors)
        pointers.update(t.untyped_storage().data_ptr() for t in result.values())
    assert len(pointers) == 8 * len(tensors)
