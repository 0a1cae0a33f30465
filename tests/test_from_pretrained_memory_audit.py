"""Audit: ``fastload.from_pretrained`` memory use and the model it returns, against ``transformers``' own
``from_pretrained`` of the same local directory (README "Drop-in from_pretrained": "the same model transformers
builds ... weights bit for bit, tied weights ... with the weights streamed by fastload and created once").

Tiny real models built from configs (``tests/checkpoints.py``) and saved with ``save_pretrained`` (safetensors).
The memory test runs each loader in a fresh subprocess and compares peak RSS (VmHWM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastload
from checkpoints import llama_config, llama_like_tensors

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 70, 11], [3, 4, 8, 15, 16, 23, 42]])
ALL_DTYPES = [None, "auto", torch.float16, torch.bfloat16, torch.float32]


# -- helpers ------------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def _assert_bit_identical(ours, theirs) -> None:
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    bad = [n for n in a if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or a[n].device != b[n].device
           or not torch.equal(_bits(a[n]), _bits(b[n]))]
    assert not bad, f"differ from transformers: {bad[:8]}"
    buffers_a, buffers_b = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert list(buffers_a) == list(buffers_b)
    assert all(buffers_a[k].dtype == buffers_b[k].dtype and torch.equal(_bits(buffers_a[k]), _bits(buffers_b[k]))
               for k in buffers_a)


def _same_object_groups(model) -> set[frozenset[str]]:
    """Names that are the very same Parameter object (ties)."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _storage_groups(model) -> set[frozenset[str]]:
    """Names (parameters and buffers, duplicates kept) whose tensors live in one storage."""
    groups: dict[tuple, set[str]] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t.numel():
            groups.setdefault((t.device, t.untyped_storage().data_ptr()), set()).add(name)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _oversized_storages(model) -> dict[str, tuple[int, int]]:
    """Parameters whose storage holds more than the parameter itself: views into a larger buffer."""
    out = {}
    for name, p in model.named_parameters():
        have, need = p.untyped_storage().nbytes(), p.numel() * p.element_size()
        if have != need:
            out[name] = (have, need)
    return out


def _load_both(directory: Path, cls, **kwargs):
    ours = fastload.from_pretrained(directory, model_class=cls, **kwargs)
    theirs = cls.from_pretrained(directory, **kwargs)
    return ours, theirs


def _save_llama(directory: Path, *, stored: torch.dtype, tie: bool, seed: int = 0, **sizes) -> Path:
    """A Llama built from ``llama_config`` with ``llama_like_tensors`` weights, saved with save_pretrained."""
    doc = llama_config(**sizes)
    doc["tie_word_embeddings"] = tie
    doc["torch_dtype"] = str(stored).removeprefix("torch.")
    config = transformers.LlamaConfig(**{k: v for k, v in doc.items() if k not in ("architectures", "model_type")})
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    tensors = llama_like_tensors(seed=seed, dtype=stored, **sizes)
    if tie:
        tensors.pop("lm_head.weight")
    model.load_state_dict(tensors, strict=False, assign=True)
    if tie:
        model.tie_weights()
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def tied_bf16_dir(tmp_path_factory) -> Path:
    return _save_llama(tmp_path_factory.mktemp("tied-bf16"), stored=torch.bfloat16, tie=True)


@pytest.fixture(scope="module")
def tied_f32_dir(tmp_path_factory) -> Path:
    return _save_llama(tmp_path_factory.mktemp("tied-f32"), stored=torch.float32, tie=True, seed=1)


@pytest.fixture(scope="module")
def untied_f32_dir(tmp_path_factory) -> Path:
    return _save_llama(tmp_path_factory.mktemp("untied-f32"), stored=torch.float32, tie=False, seed=2)


# -- peak RSS, in subprocesses --------------------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent("""
    import gc, json, sys, time
    which = sys.argv[1]

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    import torch, transformers, fastload
    from transformers import AutoModelForCausalLM
    import transformers.models.llama.modeling_llama  # noqa: F401 -- imported before the baseline, in both
    directory = sys.stdin.readline().strip()  # the imports overlap with the parent writing the checkpoint
    results = {}
    for dtype in ("none", "float16"):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
            f.write("5")
        base = status("VmRSS")
        kwargs = {} if dtype == "none" else {"dtype": getattr(torch, dtype)}
        t0 = time.perf_counter()
        if which == "fastload":
            model = fastload.from_pretrained(directory, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
        took = time.perf_counter() - t0
        # touch every weight (transformers' parameters may be lazily mapped file pages until first used)
        params = sum(p.numel() * p.element_size() for p in model.parameters() if p.view(-1)[::512].sum() is not None)
        results[dtype] = {"base": base, "hwm": status("VmHWM"), "params": params, "seconds": took,
                          "dtype": str(model.dtype)}
        del model
    print(json.dumps(results))
""")


@pytest.fixture(scope="module")
def _rss_runs(tmp_path_factory):
    """The two subprocesses import transformers while this process writes the checkpoint."""
    """Peak RSS above the baseline of fastload's and transformers' from_pretrained, each in a fresh process (run
    side by side), for dtype=None and dtype=float16, of a ~220 MB bf16 Llama (8 layers, hidden 1024, vocab 8192,
    untied) in one model.safetensors."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")  # freed tensors go back to the OS
    procs = {w: subprocess.Popen([sys.executable, "-c", _RSS_SCRIPT, w], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for w in ("fastload", "transformers")}
    try:
        directory = _save_llama(tmp_path_factory.mktemp("big-llama"), stored=torch.bfloat16, tie=False, layers=8,
                                hidden=1024, intermediate=2816, vocab=8192, heads=8, kv_heads=4)
        for proc in procs.values():
            proc.stdin.write(str(directory) + "\n")
            proc.stdin.flush()
        yield directory, procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def rss(_rss_runs) -> dict:
    directory, procs = _rss_runs
    got = {"file": (directory / "model.safetensors").stat().st_size}
    for w, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        got[w] = json.loads(out.strip().splitlines()[-1])
    return got


# -- bit-identical weights, ties, storage sharing ------------------------------------------------------------------


@pytest.mark.parametrize("stored", ["bf16", "f32"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_tied_llama_bit_identical_and_tied_storage(tied_bf16_dir: Path, tied_f32_dir: Path, stored: str,
                                                     dtype) -> None:
    directory = tied_bf16_dir if stored == "bf16" else tied_f32_dir
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours, theirs = _load_both(directory, transformers.LlamaForCausalLM, **kwargs)
    _assert_bit_identical(ours, theirs)
    assert ours.dtype == theirs.dtype
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    assert _same_object_groups(ours) == _same_object_groups(theirs)
    assert _storage_groups(ours) == _storage_groups(theirs)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_untied_llama_no_param_is_a_view_into_a_shared_buffer(untied_f32_dir: Path, dtype) -> None:
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours, theirs = _load_both(untied_f32_dir, transformers.LlamaForCausalLM, **kwargs)
    _assert_bit_identical(ours, theirs)
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    assert _storage_groups(ours) == _storage_groups(theirs) == set()
    # README: "every tensor owns its memory (no views into reused buffers)"
    assert _oversized_storages(ours) == {}


def test_checkpoint_with_both_embeddings_and_tied_config(tmp_path: Path, untied_f32_dir: Path) -> None:
    """A checkpoint that stores lm_head.weight too (identical bytes) while the config ties them: transformers
    ties (one tensor); fastload must too, and not keep the file's second copy alive."""
    from safetensors.torch import load_file, save_file

    sd = load_file(untied_f32_dir / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    doc = json.loads((untied_f32_dir / "config.json").read_text())
    doc["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(doc))
    for dtype in (None, torch.bfloat16):
        kwargs = {} if dtype is None else {"dtype": dtype}
        ours, theirs = _load_both(tmp_path, transformers.LlamaForCausalLM, **kwargs)
        _assert_bit_identical(ours, theirs)
        assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == \
            (theirs.lm_head.weight is theirs.model.embed_tokens.weight)
        assert _storage_groups(ours) == _storage_groups(theirs)


# -- generate -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float32], ids=str)
def test_generate_gives_transformers_tokens(tied_bf16_dir: Path, untied_f32_dir: Path, dtype) -> None:
    kwargs = {} if dtype is None else {"dtype": dtype}
    for directory in (tied_bf16_dir, untied_f32_dir):
        ours, theirs = _load_both(directory, transformers.AutoModelForCausalLM, **kwargs)
        prompt = TOKENS[:, :4]
        gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            a = ours.generate(prompt, **gen)
            b = theirs.generate(prompt, **gen)
        assert a.shape == (2, 10)
        assert torch.equal(a, b), (directory.name, a, b)
        assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()


def _t5_dir(directory: Path, stored: torch.dtype) -> Path:
    torch.manual_seed(7)
    config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    model = transformers.T5ForConditionalGeneration(config).to(stored)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16], ids=str)
def test_t5_keep_in_fp32_modules_weights_and_generate(tmp_path: Path, stored, dtype) -> None:
    directory = _t5_dir(tmp_path, stored)
    assert transformers.T5ForConditionalGeneration._keep_in_fp32_modules
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours, theirs = _load_both(directory, transformers.AutoModelForSeq2SeqLM, **kwargs)
    _assert_bit_identical(ours, theirs)
    wo_ours = ours.encoder.block[0].layer[1].DenseReluDense.wo.weight
    wo_theirs = theirs.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo_ours.dtype == wo_theirs.dtype
    assert _same_object_groups(ours) == _same_object_groups(theirs)
    assert _storage_groups(ours) == _storage_groups(theirs)
    with torch.no_grad():
        a = ours.generate(TOKENS[:, :5], max_new_tokens=4, do_sample=False)
        b = theirs.generate(TOKENS[:, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


# -- device and device_map ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"device": "cpu"}, {"device": torch.device("cpu")}, {"device": "cpu:0"}],
                         ids=lambda k: repr(k))
def test_cpu_device(tied_bf16_dir: Path, kwargs: dict) -> None:
    ours = fastload.from_pretrained(tied_bf16_dir, **kwargs)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tied_bf16_dir)
    _assert_bit_identical(ours, theirs)
    assert ours.device == theirs.device == torch.device("cpu")
    assert getattr(ours, "hf_device_map", None) == getattr(theirs, "hf_device_map", None)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.parametrize("device_map", ["cpu", {"": "cpu"}, {"": torch.device("cpu")}, "auto", "sequential"],
                         ids=repr)
def test_device_map_behaves_like_transformers(tied_bf16_dir: Path, device_map) -> None:
    """Whatever transformers does with device_map= (load on CPU, or refuse it, e.g. without accelerate),
    fastload does the same."""
    try:
        theirs = transformers.LlamaForCausalLM.from_pretrained(tied_bf16_dir, device_map=device_map)
    except Exception as exc:  # noqa: BLE001
        with pytest.raises(type(exc)):
            fastload.from_pretrained(tied_bf16_dir, device_map=device_map)
        return
    ours = fastload.from_pretrained(tied_bf16_dir, device_map=device_map)
    _assert_bit_identical(ours, theirs)
    assert getattr(ours, "hf_device_map", None) == getattr(theirs, "hf_device_map", None)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


def test_cuda_device_needs_nothing_the_transformers_extra_does_not_install() -> None:
    """``fastload.from_pretrained(src, device="cuda")`` hands transformers ``device_map={"": device}``
    (integrations/transformers.py); transformers >= 5 refuses any device_map without ``accelerate``, which
    ``pip install 'fastload[transformers]'`` does not install. The README promises device="cuda" works with
    that extra. Runs without a GPU: it is transformers' own check of the kwargs fastload passes."""
    from transformers.integrations.accelerate import check_and_set_device_map

    check_and_set_device_map({"": torch.device("cuda", 0)})  # what fastload passes for device="cuda:0"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.float16], ids=str)
def test_cuda_device_model_equals_transformers(tied_bf16_dir: Path, dtype) -> None:
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours = fastload.from_pretrained(tied_bf16_dir, device="cuda", **kwargs)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tied_bf16_dir, **kwargs).to("cuda")
    _assert_bit_identical(ours, theirs)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert _oversized_storages(ours) == {}
    with torch.no_grad():
        a = ours.generate(TOKENS[:, :4].cuda(), max_new_tokens=5, do_sample=False, pad_token_id=0)
        b = theirs.generate(TOKENS[:, :4].cuda(), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


# -- the trace counts the weights once ----------------------------------------------------------------------------


def _file_layout(directory: Path) -> tuple[int, int, int]:
    """(bytes of the *.safetensors files, bytes of their tensors, number of files)."""
    import struct

    files = sorted(directory.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    headers = sum(8 + struct.unpack("<Q", f.read_bytes()[:8])[0] for f in files)
    return size, size - headers, len(files)


def _trace_of(tmp_path: Path, untied_f32_dir: Path, case: str):
    if case == "keep-fp32":
        directory, kwargs = _t5_dir(tmp_path / "t5", torch.float32), {"dtype": torch.float16}
    else:
        directory = untied_f32_dir
        kwargs = {} if case == "as-stored" else {"dtype": torch.bfloat16}
    trace = fastload.Trace()
    fastload.from_pretrained(directory, trace=trace, **kwargs)
    return directory, trace, trace.summary()


CASES = ["as-stored", "converted", "keep-fp32"]


@pytest.mark.parametrize("case", CASES)
def test_trace_counts_each_weight_byte_once(tmp_path: Path, untied_f32_dir: Path, case: str) -> None:
    directory, trace, summary = _trace_of(tmp_path, untied_f32_dir, case)
    file_bytes, tensor_bytes, _ = _file_layout(directory)
    chunk_bytes = sum(c["nbytes"] for c in trace.chunks if c.get("filled") is not None)
    print(f"{case}: file {file_bytes} B, tensors {tensor_bytes} B, chunk reads {chunk_bytes} B, "
          f"fetched {summary.bytes_fetched} B, copied {summary.counters.get('bytes_copied', 0)} B")
    assert chunk_bytes == tensor_bytes, summary.table()
    assert summary.bytes_fetched >= tensor_bytes
    assert sum(summary.bytes_by_file.values()) == summary.bytes_fetched
    assert summary.counters.get("bytes_copied", 0) <= tensor_bytes
    assert summary.counters.get("bytes_converted", 0) <= tensor_bytes
    assert sum(summary.breakdown.values()) == pytest.approx(summary.wall_s, abs=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_trace_reads_each_header_once(tmp_path: Path, untied_f32_dir: Path, case: str) -> None:
    """bytes_fetched: the files once (header and tensors), plus the 8-byte probe from_pretrained makes of the
    weights' name. A from_pretrained that converts must not read every shard's header again per target dtype
    (pipeline.LoadRequest.select exists "so that a load can choose by what the headers say without reading
    them twice")."""
    directory, trace, summary = _trace_of(tmp_path, untied_f32_dir, case)
    file_bytes, _, files = _file_layout(directory)
    print(f"{case}: file {file_bytes} B, fetched {summary.bytes_fetched} B")
    assert summary.bytes_fetched <= file_bytes + 8 * files, summary.table()


@pytest.mark.parametrize("case", CASES)
def test_one_from_pretrained_is_one_load_span_counting_the_weights_once(tmp_path: Path, untied_f32_dir: Path,
                                                                         otel_spans, case: str) -> None:
    """README (Tracing): "each load also becomes a fastload.load OpenTelemetry span with the summary as
    attributes". One from_pretrained is one load: one span whose bytes_fetched is the trace's."""
    otel_spans.clear()
    directory, trace, summary = _trace_of(tmp_path, untied_f32_dir, case)
    roots = [s for s in otel_spans.get_finished_spans() if s.name == "fastload.load"]
    print(case, [(r.attributes["fastload.bytes_fetched"], r.attributes["fastload.chunks"]) for r in roots])
    assert sum(r.attributes["fastload.bytes_fetched"] for r in roots) == summary.bytes_fetched
    assert len(roots) == 1, [dict(r.attributes) for r in roots]


# -- peak RSS (the subprocesses started with the module) ----------------------------------------------------


@pytest.mark.parametrize("dtype", ["none", "float16"])
def test_peak_rss_is_one_copy_of_the_weights_like_transformers(rss: dict, dtype: str) -> None:
    """README: weights "created once, in the dtype and on the device the model keeps"; peak RSS must stay near one
    copy of the result (not a state dict plus a second set of parameters), and no worse than transformers'."""
    weights_file = rss["file"]
    assert weights_file > 180e6
    ours, theirs = rss["fastload"][dtype], rss["transformers"][dtype]
    assert ours["params"] == theirs["params"] and ours["dtype"] == theirs["dtype"]
    result = ours["params"]
    ours_peak, theirs_peak = ours["hwm"] - ours["base"], theirs["hwm"] - theirs["base"]
    report = (f"dtype={dtype}: result {result / 1e6:.0f} MB, file {weights_file / 1e6:.0f} MB; "
              f"fastload peak +{ours_peak / 1e6:.0f} MB ({ours['seconds']:.2f} s), "
              f"transformers peak +{theirs_peak / 1e6:.0f} MB ({theirs['seconds']:.2f} s)")
    print(report)
    # one copy of the result, plus the staging budget only when converting (README: host_buffer_bytes), plus slack
    staging = 256 << 20 if dtype != "none" else 0
    assert ours_peak < 1.25 * result + staging + (48 << 20), report
    assert ours_peak < theirs_peak * 1.15 + (48 << 20), report
