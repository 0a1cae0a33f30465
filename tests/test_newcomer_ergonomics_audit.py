"""A first-time user's mistakes with the public API and the CLI: plausible wrong values for every public parameter
(``source``, ``device``, ``dtype``, ``names``, ``shard``, ``config``, ``progress``, ``trace``, ``pull``'s ``to``
and ``config``, ``from_pretrained``'s keyword arguments, ``Trace(path, otel=)``), the same through the
``fastload`` command, and the interpreters a user may run it under (``python -OO``, ``-I``, ``-X utf8=0`` in the
C locale).

Each wrong value must be accepted with its documented meaning, or refused before any byte of tensor data is read
(the HTTP server's request log says what was sent) with a typed error (a ``FastloadError``, ``TypeError`` or
``ValueError``) that names the parameter. Complements test_api_semantics_audit.py, test_contract.py,
test_error_objects_audit.py, test_cli_corners.py, test_cli_audit2.py and test_config_matrix_audit.py (dtype and
device spellings, names iterables, config field types, progress callables, CLI exit codes are covered there).

Real files, the suite's HTTP Range server, real subprocesses; nothing of fastload is mocked.
"""

from __future__ import annotations

import inspect
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fastload
from checkpoints import chunky_tensors, llama_config, llama_like_tensors, write_single
from fastload.cli import main

FASTLOAD = str(Path(sys.executable).with_name("fastload"))
TIMEOUT = 60
TYPED = (fastload.FastloadError, TypeError, ValueError)


def base_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTLOAD_")}
    env.update(extra)
    return env


def data_start(path: Path) -> int:
    """Where the tensor bytes of a safetensors file begin: what a load may read before them is its header."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """~0.5 MB: two f32 200x300 tensors, a bf16 and an int64 one."""
    return write_single(tmp_path_factory.mktemp("newcomer") / "model.safetensors",
                        chunky_tensors(seed=5, layers=2, shape=(200, 300)))


@pytest.fixture
def served(ckpt, http_server, http_dir):
    """(URL, path on the server, first tensor byte): ``ckpt`` behind the HTTP Range server."""
    target = http_dir / "model.safetensors"
    target.write_bytes(ckpt.read_bytes())
    http_server.reset()
    return http_server.url_for(target), "/" + target.relative_to(http_dir.parent).as_posix(), data_start(target)


def sent(http_server, path_glob: str) -> int:
    """Body bytes the server sent for the paths matching ``path_glob``."""
    return http_server.bytes_sent(path_glob)


# -- every public parameter given a plausible wrong value: refused before any tensor byte, naming itself -----------


class _BytesPathLike:
    def __fspath__(self):
        return b"/tmp/x.safetensors"


WRONG = [
    ("source-int", {"source": 5}, "source"),
    ("source-none", {"source": None}, "source"),
    ("source-bytes", {"source": b"model.safetensors"}, "source"),
    ("source-bytes-pathlike", {"source": _BytesPathLike()}, "source"),
    ("source-generator", {"source": (s for s in ["a"])}, "source"),
    ("source-empty-list", {"source": []}, "source"),
    ("source-set", {"source": {"a.safetensors"}}, "source"),
    ("source-list-with-none", {"source": ["URL", None]}, "source"),
    ("source-list-with-ftp", {"source": ["URL", "ftp://host/m.safetensors"]}, "ftp"),
    ("device-gpu", {"device": "gpu"}, "device"),
    ("device-meta", {"device": "meta"}, "meta"),
    ("device-mps", {"device": "mps"}, "mps"),
    ("device-none", {"device": None}, "device"),
    ("dtype-bf16", {"dtype": "bf16"}, "dtype"),
    ("dtype-int8", {"dtype": torch.int8}, "dtype"),
    ("dtype-numpy", {"dtype": "NUMPY"}, "dtype"),
    ("dtype-python-float", {"dtype": float}, "dtype"),
    ("names-int", {"names": 5}, "names"),
    ("names-bytes", {"names": b"layer0.weight"}, "names"),
    ("names-prefix-string", {"names": "layer"}, "layer"),
    ("shard-tuple", {"shard": (0, 2)}, "shard"),
    ("shard-class", {"shard": fastload.Shard}, "shard"),
    ("shard-dim-out-of-range", {"shard": fastload.Shard(0, 2, {"weight": 2})}, "dim"),
    ("config-dict", {"config": {"chunk_bytes": 1 << 20}}, "config"),
    ("progress-str", {"progress": "tqdm"}, "progress"),
    ("trace-true", {"trace": True}, "trace"),
    ("trace-txt", {"trace": "load.txt"}, "trace"),
    ("trace-class", {"trace": fastload.Trace}, "trace"),
    ("kwarg-chunk_bytes", {"chunk_bytes": 1 << 20}, "chunk_bytes"),
    ("kwarg-verify", {"verify": True}, "verify"),
]
if not torch.cuda.is_available():  # with CUDA these load; without, they are the classic first mistake
    WRONG += [("device-cuda", {"device": "cuda"}, "CUDA"), ("device-cuda0", {"device": "cuda:0"}, "CUDA")]


@pytest.mark.parametrize("kwargs,needle", [(k, n) for _, k, n in WRONG], ids=[i for i, _, _ in WRONG])
def test_wrong_values_are_refused_before_any_tensor_byte(served, http_server, kwargs, needle):
    url, path, start = served
    kwargs = dict(kwargs)
    source = kwargs.pop("source", url)
    if isinstance(source, list):
        source = [url if s == "URL" else s for s in source]
    if kwargs.get("dtype") == "NUMPY":
        import numpy as np

        kwargs["dtype"] = np.dtype("float16")
    with pytest.raises(TYPED) as caught:
        fastload.load(source, **kwargs)
    assert needle in str(caught.value), (kwargs, str(caught.value))
    assert sent(http_server, path) <= start, (kwargs, sent(http_server, path), start)


#: Mistakes only the headers can reveal (an unknown name, a dim the tensor lacks) or the device itself.
LATE = {"names-prefix-string", "shard-dim-out-of-range", "device-cuda", "device-cuda0"}


@pytest.mark.parametrize("case", [c for c in WRONG if "source" not in c[1]], ids=lambda c: c[0])
def test_stream_refuses_them_at_the_call_or_before_any_tensor_byte(served, http_server, case):
    """``stream(...)`` refuses an argument mistake at the call, before the with block; what only the headers or
    the device can tell comes out of the iteration, typed, before any tensor byte."""
    ident, kwargs, needle = case
    url, path, start = served
    kwargs = dict(kwargs)
    if kwargs.get("dtype") == "NUMPY":
        kwargs["dtype"] = "also-not-a-dtype"
    if ident in LATE:
        with fastload.stream(url, **kwargs) as s:
            with pytest.raises(TYPED) as caught:
                list(s)
    else:
        with pytest.raises(TYPED) as caught:
            fastload.stream(url, **kwargs)
    assert needle in str(caught.value), (kwargs, str(caught.value))
    assert sent(http_server, path) <= start


def test_accepted_spellings_keep_their_documented_meaning(ckpt):
    """A path-like object, a tuple, ``torch.device("cpu")``, ``"cpu:0"``, ``"torch.float16"`` and a single name
    as a plain string (not its characters) are all accepted and mean what the README says."""
    want = safetensors.torch.load_file(str(ckpt))

    class Where:
        def __fspath__(self):
            return str(ckpt)

    for source in (ckpt, Where(), (str(ckpt),), [ckpt], ckpt.as_uri()):
        got = fastload.load(source)
        assert list(got) == list(want) and all(torch.equal(got[n], want[n]) for n in want), source
    for device in (torch.device("cpu"), "cpu:0"):
        got = fastload.load(ckpt, device=device)
        assert all(t.device.type == "cpu" for t in got.values())
    got = fastload.load(ckpt, dtype="torch.float16")
    assert got["layer0.weight"].dtype == torch.float16 and got["positions"].dtype == torch.int64
    got = fastload.load(ckpt, names="layer1.weight")
    assert list(got) == ["layer1.weight"] and torch.equal(got["layer1.weight"], want["layer1.weight"])


# -- Trace(path): a trace file that cannot be written is found out after the whole load ------------------------------


@pytest.mark.parametrize("where", ["missing-dir", "not-json", "empty"])
def test_trace_object_with_an_unwritable_path_is_refused_before_the_load(served, http_server, tmp_path, where):
    """``load(src, trace="/no/such/dir/t.json")`` is refused at once (``check_path``); the same path given as
    ``Trace("/no/such/dir/t.json")`` -- the README's own ``Trace("out.json")`` spelling -- is accepted, the whole
    checkpoint is fetched, and then the load fails with ConfigError and its tensors are lost."""
    url, path, start = served
    bad = {"missing-dir": str(tmp_path / "nope" / "t.json"), "not-json": str(tmp_path / "t.txt"), "empty": ""}[where]
    try:
        trace = fastload.Trace(bad)
    except TYPED:
        return  # refused where it was given: fine
    with pytest.raises(fastload.ConfigError):
        fastload.load(url, trace=trace)
    assert sent(http_server, path) <= start, \
        f"Trace({bad!r}) was refused only after {sent(http_server, path)} bytes (tensor data from {start})"


@pytest.mark.parametrize("value", [0, "no", "false"])
def test_trace_otel_takes_a_bool_not_any_value(ckpt, otel_spans, value):
    """``Trace(otel=0)`` (a flag read from the environment as an int) or ``otel="false"``: either refused, or off.
    Only ``otel is False`` turns the spans off, so these silently emit spans."""
    try:
        trace = fastload.Trace(otel=value)
    except TYPED:
        return
    otel_spans.clear()
    fastload.load(ckpt, trace=trace)
    spans = [s.name for s in otel_spans.get_finished_spans() if s.name == "fastload.load"]
    assert spans == [], f"Trace(otel={value!r}) was accepted and emitted {spans}"


def test_cli_empty_trace_path_fails_before_fetching(served, http_server):
    """``fastload load URL --trace "$OUT"`` with OUT unset: ``--trace ''`` skips the CLI's own path check (an
    empty string is falsy) and fails only after the whole load."""
    url, path, start = served
    proc = subprocess.run([FASTLOAD, "load", url, "--trace", ""], capture_output=True, text=True, timeout=TIMEOUT,
                          env=base_env())
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert sent(http_server, path) <= start, (sent(http_server, path), start, proc.stderr)


# -- from_pretrained: load()'s own arguments go to transformers, after the whole checkpoint is read -------------------


@pytest.fixture
def llama_served(tmp_path, http_server, http_dir):
    d = http_dir / "llama"
    d.mkdir()
    write_single(d / "model.safetensors", llama_like_tensors())
    (d / "config.json").write_text(json.dumps(llama_config()))
    http_server.reset()
    return http_server.url_for(d) + "/", data_start(d / "model.safetensors")


@pytest.mark.parametrize("kwargs", [{"names": ["model.norm.weight"]}, {"shard": fastload.Shard(0, 2)},
                                    {"chunk_bytes": 1 << 20}, {"verify": True}],
                         ids=["names", "shard", "chunk_bytes", "verify"])
def test_from_pretrained_refuses_load_arguments_before_reading_the_weights(llama_served, http_server, kwargs):
    """``load``'s ``names=``/``shard=``, a ``LoadConfig`` field or ``pull``'s ``verify=`` given to its sibling
    ``from_pretrained`` go to transformers, which fails in the model's constructor -- after every weight was
    fetched. ``progress=`` is refused up front for exactly this reason; these are not."""
    url, start = llama_served
    with pytest.raises(TYPED) as caught:
        fastload.from_pretrained(url, **kwargs)
    key = next(iter(kwargs))
    assert key in str(caught.value), str(caught.value)
    got = sent(http_server, "*/llama/model.safetensors")
    assert got <= start, f"{key}= was refused after {got} bytes of model.safetensors (tensor data from {start})"


# -- pull: destination and config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [{}, 0, ""], ids=["dict", "zero", "empty-str"])
def test_pull_config_must_be_a_load_config(ckpt, tmp_path, config):
    """``load(config={})`` is a ConfigError; ``pull(config={})`` (``config or LoadConfig()``) pulls with the
    defaults, as if nothing had been given."""
    with pytest.raises(fastload.ConfigError, match="config"):
        fastload.pull(ckpt, to=tmp_path / "out", config=config)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_pull_to_an_empty_string_is_refused(ckpt, tmp_path, monkeypatch):
    """``pull(src, to="")`` (``--to "$DEST"`` with DEST unset) is ``Path("")``, the current directory: the files
    land straight in the working directory, not even in ``./<name>`` as with no ``to`` at all."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(fastload.ConfigError, match="to|destination"):
        fastload.pull(ckpt, to="")
    assert os.listdir(work) == []


def test_cli_pull_to_an_empty_string_is_refused(ckpt, tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run([FASTLOAD, "pull", str(ckpt), "--to", ""], capture_output=True, text=True,
                          timeout=TIMEOUT, env=base_env(), cwd=work)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, (proc.returncode, proc.stdout, proc.stderr)
    assert sorted(os.listdir(work)) == [], os.listdir(work)


@pytest.mark.parametrize("to", [5, b"/tmp/out"], ids=["int", "bytes"])
def test_pull_destination_of_a_wrong_type_names_to(ckpt, to):
    """A typed error, but "expected str, bytes or os.PathLike object, not int" says nothing of ``to``."""
    with pytest.raises(TYPED) as caught:
        fastload.pull(ckpt, to=to)
    assert "to=" in str(caught.value) or "destination" in str(caught.value), str(caught.value)


# -- the CLI: a flag's bad value names the flag ----------------------------------------------------------------------


@pytest.mark.parametrize("argv,flag", [(["--concurrency", "0"], "--concurrency"),
                                       (["--chunk-size", "16"], "--chunk-size"),
                                       (["--chunk-size", "2GiB"], "--chunk-size")])
def test_cli_bad_flag_value_names_the_flag(capsys, monkeypatch, ckpt, argv, flag):
    """``FASTLOAD_MAX_CONCURRENCY=0`` is reported as "FASTLOAD_MAX_CONCURRENCY='0': ..."; ``--concurrency 0`` as
    "max_concurrency must be ...", a name the user never typed."""
    for var in list(os.environ):
        if var.startswith("FASTLOAD_"):
            monkeypatch.delenv(var)
    rc = main(["load", str(ckpt), *argv])
    out, err = capsys.readouterr()
    assert rc != 0 and out == "" and err.count("\n") == 1, err
    assert flag in err, err


# -- interpreters --------------------------------------------------------------------------------------------------


def test_file_url_of_a_non_utf8_path_as_typed(tmp_path):
    """A ``file://`` URL typed (not percent-encoded) for a file whose name is not UTF-8: Python hands it over with
    a surrogate escape, as it does for the plain path, which loads. ``to_path`` calls ``unquote_to_bytes`` on
    the str, which encodes it as strict UTF-8: UnicodeEncodeError, not a fastload error."""
    d = Path(os.fsdecode(bytes(tmp_path) + b"/d\xff"))
    d.mkdir()
    path = write_single(d / "model.safetensors", {"w": torch.arange(6.0)})
    assert list(fastload.load(str(path))) == ["w"]
    got = fastload.load("file://" + str(path))
    assert torch.equal(got["w"], torch.arange(6.0))


def test_cli_file_url_with_non_ascii_name_in_the_c_locale(tmp_path):
    """``LC_ALL=C python -X utf8=0 fastload load file:///.../ü/model.safetensors``: argv arrives with surrogate
    escapes (the file system encoding is ASCII). The plain path loads; the ``file://`` URL ends in a traceback."""
    d = tmp_path / "ü"
    d.mkdir()
    path = write_single(d / "model.safetensors", {"w": torch.arange(6.0)})
    env = base_env(LC_ALL="C", LANG="C", PYTHONCOERCECLOCALE="0")
    env.pop("PYTHONUTF8", None)
    for source in (os.fsencode(path), b"file://" + os.fsencode(path)):
        proc = subprocess.run([sys.executable, "-X", "utf8=0", FASTLOAD, "load", source, "--json"],
                              capture_output=True, timeout=TIMEOUT, env=env)
        err = proc.stderr.decode(errors="replace")
        assert proc.returncode == 0 and "Traceback" not in err, (source, err[-600:])


def test_bench_checkpoint_module_runs_under_python_OO(tmp_path):
    """``python -OO`` strips docstrings; ``fastload/bench/checkpoint.py`` builds its parser from
    ``__doc__.splitlines()``: AttributeError on None."""
    proc = subprocess.run([sys.executable, "-OO", "-m", "fastload.bench.checkpoint", "--help"], capture_output=True,
                          text=True, timeout=TIMEOUT, env=base_env(), cwd=tmp_path)
    assert proc.returncode == 0 and "--size-gb" in proc.stdout, proc.stderr[-600:]


def test_every_entry_point_works_under_OO_and_isolated_mode(ckpt, tmp_path):
    """``python -OO -I`` (no docstrings, no asserts, no user site, no cwd on sys.path): load, stream, aload, plan,
    pull and a trace's table, and the command through ``python -m fastload``."""
    script = tmp_path / "run.py"
    script.write_text(
        "import asyncio, sys, fastload\n"
        "p = sys.argv[1]\n"
        "t = fastload.Trace()\n"
        "a = fastload.load(p, trace=t, dtype='bfloat16')\n"
        "with fastload.stream(p) as s:\n"
        "    b = dict(s)\n"
        "c = asyncio.run(fastload.aload(p, names='positions'))\n"
        "print(len(a), len(b), list(c), len(fastload.plan(p).tensors), fastload.pull(p, to=sys.argv[2]).name,\n"
        "      t.summary().table().startswith('wall'), sys.flags.optimize)\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, "-OO", "-I", str(script), str(ckpt), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=TIMEOUT, env=base_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-800:]
    assert proc.stdout.split() == ["4", "4", "['positions']", "4", "model.safetensors", "True", "2"], proc.stdout
    for argv in (["inspect", str(ckpt), "--json"], ["load", str(ckpt), "--json"], ["--help"]):
        proc = subprocess.run([sys.executable, "-OO", "-I", "-m", "fastload", *argv], capture_output=True,
                              text=True, timeout=TIMEOUT, env=base_env(), cwd=tmp_path)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (argv, proc.stderr[-600:])


def test_public_signatures_match_the_readme():
    """What ``help(fastload.load)`` shows is what the README's argument table and ``pull`` signature say."""
    load_params = ["source", "device", "dtype", "names", "shard", "config", "trace", "progress"]
    for name in ("load", "aload", "stream"):
        sig = inspect.signature(getattr(fastload, name))
        assert list(sig.parameters) == load_params, (name, sig)
        assert all(p.kind is p.KEYWORD_ONLY for p in list(sig.parameters.values())[1:]), (name, sig)
        assert sig.parameters["device"].default == "cpu"
        assert getattr(fastload, name).__doc__, name
    pull = inspect.signature(fastload.pull)
    assert [(p.name, p.default) for p in pull.parameters.values()][1:] == [
        ("to", None), ("cache_dir", None), ("revision", None), ("config", None), ("trace", None),
        ("progress", None), ("verify", False)], pull
    assert list(inspect.signature(fastload.apull).parameters) == list(pull.parameters)
    assert list(inspect.signature(fastload.plan).parameters) == ["source", "names", "shard", "config", "trace"]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for field in inspect.signature(fastload.LoadConfig).parameters:
        assert f"`{field}`" in readme, field


# -- found by this audit's report, fixed with it ---------------------------------------------------------------


def test_shard_takes_numpy_ints_as_load_config_does(ckpt):
    """A rank read from an array (``np.int64``) is an int to ``LoadConfig`` and now to ``Shard`` too, stored as
    Python's int (a plan's JSON cannot hold numpy's); a bool is still no rank."""
    import numpy as np

    shard = fastload.Shard(np.int64(1), np.int32(2), {r"weight": np.int64(0)})
    assert (type(shard.rank), type(shard.world_size), type(shard.rules[0][1])) == (int, int, int)
    json.dumps(fastload.plan(ckpt).to_dict())
    got = fastload.load(ckpt, shard=shard)
    want = safetensors.torch.load_file(str(ckpt))
    for name, tensor in got.items():
        expected = want[name].tensor_split(2, 0)[1] if "weight" in name else want[name]
        assert torch.equal(tensor, expected), name
    with pytest.raises(fastload.ConfigError, match="rank"):
        fastload.Shard(True, 2)


@pytest.mark.parametrize("field", ["region", "profile"])
@pytest.mark.parametrize("value", ["", "  "])
def test_s3_region_or_profile_empty_is_refused(field, value):
    with pytest.raises(fastload.ConfigError, match=f"s3.{field}"):
        fastload.S3Options(**{field: value})


def test_the_tensorizer_child_entry_point_refuses_options(tmp_path):
    """``python -m fastload.bench.others --help`` wrote a file named ``--help`` (its first argument taken as the
    destination); it now prints its usage and writes nothing."""
    done = subprocess.run([sys.executable, "-m", "fastload.bench.others", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "usage" in done.stderr, done
    assert list(tmp_path.iterdir()) == []


def test_http_url_typed_under_the_c_locale_names_the_same_file(ckpt, http_server, http_dir):
    """Under ``LC_ALL=C`` a shell hands Python ``ü`` as the surrogate escapes of its UTF-8 bytes. A local path
    keeps them (they are the file system's bytes); a URL's non-ASCII is UTF-8 by definition, so they are read as
    UTF-8 again. They used to be requested as another name, and the load ended in a 404."""
    target = http_dir / "grüße.safetensors"
    target.write_bytes(ckpt.read_bytes())
    from urllib.parse import unquote

    url = unquote(http_server.url_for(target))  # as typed: grüße, not gr%C3%BC%C3%9Fe
    fastload.load(url)  # (typed in a UTF-8 locale)
    as_argv = url.encode("utf-8").decode("ascii", "surrogateescape")
    assert as_argv != url
    got = fastload.load(as_argv)
    want = safetensors.torch.load_file(str(ckpt))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
