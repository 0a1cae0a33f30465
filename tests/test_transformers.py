"""fastload.from_pretrained equals transformers' own from_pretrained of the same directory.

Real weights (all-MiniLM-L6-v2) served over HTTP and S3, and tiny random Llama
and Mixtral (MoE) models built here and saved sharded with an index.
"""

from __future__ import annotations

import collections
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import fastload
from hub_server import HubServer, hub, hub_session, minilm_dir, repo_name  # noqa: F401 -- fixtures
from servers import RangeHTTPServer
from servers.faults import SlowFirstByte

transformers = pytest.importorskip("transformers")


def assert_equal_models(ours, theirs, *, inputs: dict | None = None) -> None:
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].device == b[name].device, name
        assert torch.equal(a[name], b[name]), name
    buffers_a, buffers_b = dict(ours.named_buffers()), dict(theirs.named_buffers())  # non-persistent ones too
    assert list(buffers_a) == list(buffers_b)
    assert all(torch.equal(buffers_a[k], buffers_b[k]) for k in buffers_a)
    config_a, config_b = ours.config.to_dict(), theirs.config.to_dict()
    config_a.pop("_name_or_path"), config_b.pop("_name_or_path")
    assert config_a == config_b
    assert ours.can_generate() == theirs.can_generate()
    if theirs.can_generate():
        assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    assert ours.training is theirs.training is False
    if inputs is not None:
        with torch.no_grad():
            out_a, out_b = ours(**inputs), theirs(**inputs)
        first = "logits" if "logits" in out_a else "last_hidden_state"
        assert torch.equal(out_a[first], out_b[first])


def tied(model) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.fixture(scope="module")
def minilm_inputs(minilm_dir: Path) -> dict:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    return dict(tokenizer(["fastload streams weights", "a second, longer sentence here"], padding=True,
                          return_tensors="pt"))


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir: Path):
    return transformers.BertModel.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with tied embeddings and its own generation config, in bf16, sharded + index."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = transformers.GenerationConfig(do_sample=True, temperature=0.7, top_k=5,
                                                            bos_token_id=1, eos_token_id=2, max_new_tokens=9)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory, max_shard_size="20KB")
    assert len(list(directory.glob("*.safetensors"))) > 2 and (directory / "model.safetensors.index.json").exists()
    return directory


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Mixtral-style MoE; its checkpoint stores experts one by one, transformers fuses them on load."""
    torch.manual_seed(1)
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    directory = tmp_path_factory.mktemp("tiny-mixtral")
    transformers.MixtralForCausalLM(config).save_pretrained(directory, max_shard_size="30KB")
    names = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj" not in names
    assert any(".experts.3." in n for n in names)  # per-expert keys: the fusion happens at load
    return directory


TOKENS = {"input_ids": torch.tensor([[1, 5, 9, 33, 2, 70, 11]])}


# -- real weights over HTTP and S3 -----------------------------------------------------------------


def test_real_model_over_http(http_server: RangeHTTPServer, http_dir: Path, minilm_dir: Path, minilm_reference,
                              minilm_inputs: dict) -> None:
    shutil.copytree(minilm_dir, http_dir / "minilm")
    url = http_server.url_for(http_dir / "minilm")
    model = fastload.from_pretrained(url)
    assert_equal_models(model, minilm_reference, inputs=minilm_inputs)
    assert model.config.name_or_path == url
    fetched = {r.path.rsplit("/", 1)[-1] for r in http_server.log}
    assert {"config.json", "model.safetensors"} <= fetched  # config came through the source layer too


class _Arrivals(SlowFirstByte):
    """Holds the first four requests ``seconds`` before answering, and notes when each request arrived."""

    def __init__(self, pattern: str, seconds: float) -> None:
        super().__init__(pattern=pattern, methods=frozenset({"GET", "HEAD"}), seconds=seconds, times=4)
        self.arrived: list[float] = []

    def take(self) -> bool:
        self.arrived.append(time.monotonic())
        return super().take()


def test_model_files_and_weights_names_are_asked_for_at_once(http_server: RangeHTTPServer, http_dir: Path,
                                                            minilm_dir: Path) -> None:
    """config.json, generation_config.json and the two standard weights names are four round trips on a remote
    source before the first weight byte: asked one after another they added up (six, with the files' reads).
    Each request is held a second here, so ones asked in turn arrive a second apart, ones asked at once together."""
    shutil.copytree(minilm_dir, http_dir / "minilm-at-once")
    url = http_server.url_for(http_dir / "minilm-at-once")
    held = http_server.faults._add(_Arrivals("*/minilm-at-once/*", 1.0))
    fastload.from_pretrained(url)
    first = held.arrived[:4]
    assert first[-1] - first[0] < 0.9, [round(at - first[0], 2) for at in first]


def test_real_model_over_s3(s3_server, s3_bucket: str, minilm_dir: Path, minilm_reference,
                            minilm_inputs: dict) -> None:
    s3_server.upload_dir(s3_bucket, "minilm", minilm_dir)
    model, info = fastload.from_pretrained(f"s3://{s3_bucket}/minilm", model_class=transformers.AutoModel,
                                           output_loading_info=True)
    assert_equal_models(model, minilm_reference, inputs=minilm_inputs)
    _, want = transformers.BertModel.from_pretrained(minilm_dir, output_loading_info=True)
    assert info == want


class _Copies(TorchDispatchMode):
    """Bytes produced by copying ops (copies, casts, concatenations) on real tensors."""

    COPYING = ("aten.copy_", "aten._to_copy", "aten.clone", "aten.cat", "aten.stack", "aten._copy_from")

    def __init__(self):
        super().__init__()
        self.bytes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if isinstance(out, torch.Tensor) and out.device.type != "meta" and name.startswith(self.COPYING):
            self.bytes[name] += out.numel() * out.element_size()
        return out


def test_weights_are_not_copied(minilm_dir: Path) -> None:
    with _Copies() as copies:
        model = fastload.from_pretrained(minilm_dir)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights > 80e6
    assert sum(copies.bytes.values()) < 64 << 10, copies.bytes  # a few small buffers at most, no weight


# -- tiny models: dtypes, ties, generation config, fusions, loading info -------------------------


@pytest.mark.parametrize("dtype", [None, "auto", torch.float32, "float16"])
def test_llama_dtypes_ties_and_generation_config(llama_dir: Path, dtype) -> None:
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours, info = fastload.from_pretrained(llama_dir, output_loading_info=True, **kwargs)
    theirs, want = transformers.LlamaForCausalLM.from_pretrained(llama_dir, output_loading_info=True, **kwargs)
    assert_equal_models(ours, theirs, inputs=TOKENS)
    assert info == want
    assert ours.dtype == {None: torch.bfloat16, "auto": torch.bfloat16}.get(dtype, theirs.dtype)
    assert tied(ours) and tied(theirs)
    assert ours.generation_config.temperature == 0.7 and ours.generation_config.top_k == 5


@pytest.mark.parametrize("stored", ["float32", "same"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weights_kept_in_float32(tmp_path: Path, dtype: torch.dtype, stored: str) -> None:
    """T5 keeps "wo" in float32 under float16. Stored in float32, fastload reads it as float32 (never through
    float16); stored in the dtype asked for, it is widened after the load, which is exact."""
    torch.manual_seed(2)
    config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    model = transformers.T5ForConditionalGeneration(config)
    (model if stored == "float32" else model.to(dtype)).save_pretrained(tmp_path)
    ours = fastload.from_pretrained(tmp_path, dtype=dtype)
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, dtype=dtype)
    inputs = {"input_ids": TOKENS["input_ids"], "decoder_input_ids": TOKENS["input_ids"][:, :3]}
    assert_equal_models(ours, theirs, inputs=inputs)
    wo = ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype
    assert wo == (torch.float32 if dtype == torch.float16 else dtype)


def test_mixtral_experts_are_fused(http_server: RangeHTTPServer, http_dir: Path, mixtral_dir: Path) -> None:
    shutil.copytree(mixtral_dir, http_dir / "mixtral")
    ours = fastload.from_pretrained(http_server.url_for(http_dir / "mixtral") + "/",
                                    model_class=transformers.AutoModelForCausalLM)
    theirs = transformers.MixtralForCausalLM.from_pretrained(mixtral_dir)
    assert_equal_models(ours, theirs, inputs=TOKENS)
    assert any("experts.gate_up_proj" in name for name in ours.state_dict())


def test_other_class_than_architectures(llama_dir: Path) -> None:
    ours = fastload.from_pretrained(llama_dir, model_class=transformers.LlamaModel)  # drops lm_head, strips prefix
    theirs = transformers.LlamaModel.from_pretrained(llama_dir)
    assert_equal_models(ours, theirs, inputs=TOKENS)


def test_missing_and_unexpected_keys_are_reported(llama_dir: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama_dir, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.up_proj.weight"
    shard = broken / index["weight_map"].pop(victim)
    tensors = load_file(shard)
    del tensors[victim]
    tensors["model.layers.1.mlp.surprise.weight"] = torch.ones(3, dtype=torch.bfloat16)
    index["weight_map"]["model.layers.1.mlp.surprise.weight"] = shard.name
    save_file(tensors, shard, metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))

    ours, info = fastload.from_pretrained(broken, output_loading_info=True)
    theirs, want = transformers.LlamaForCausalLM.from_pretrained(broken, output_loading_info=True)
    assert info == want
    assert victim in info["missing_keys"] and "model.layers.1.mlp.surprise.weight" in info["unexpected_keys"]
    a, b = ours.state_dict(), theirs.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != victim)  # the missing one is randomly initialised


# -- hf:// -----------------------------------------------------------------------------------------


def test_hub_streams_then_uses_the_cache(hub: HubServer, llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = repo_name("llama")
    hub.add_repo(repo, llama_dir, revision="v1")
    theirs = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    assert_equal_models(fastload.from_pretrained(f"hf://{repo}", revision="v1"), theirs, inputs=TOKENS)
    assert any(r.path.endswith("/generation_config.json") for r in hub.log)
    hub.add_repo(repo, llama_dir)  # main, same commit
    fastload.pull(f"hf://{repo}", config=fastload.LoadConfig(chunk_bytes=1 << 20))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.reset()
    assert_equal_models(fastload.from_pretrained(f"hf://{repo}"), theirs, inputs=TOKENS)
    assert hub.log == []


def test_errors(tmp_path: Path, llama_dir: Path, minilm_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(fastload.SourceNotFoundError, match="config.json"):
        fastload.from_pretrained(tmp_path / "empty")
    with pytest.raises(fastload.SourceNotFoundError):
        fastload.from_pretrained(llama_dir / "model.safetensors.index.json")
    with pytest.raises(fastload.ConfigError, match="model_class"):
        fastload.from_pretrained(llama_dir, model_class=dict)
    with pytest.raises(fastload.ConfigError, match="has no model"):
        fastload.from_pretrained(minilm_dir, model_class=transformers.AutoModelForImageClassification)
    with pytest.raises(fastload.ConfigError, match="state_dict"):
        fastload.from_pretrained(llama_dir, state_dict={})
    with pytest.raises(fastload.ConfigError, match="dtype"):
        fastload.from_pretrained(llama_dir, dtype="int8")
    with pytest.raises(fastload.ConfigError, match="hf://"):
        fastload.from_pretrained(llama_dir, revision="v1")


# -- the weights stream while transformers imports ----------------------------------------------------

_OVERLAP_CHILD = r"""
import importlib.abc, importlib.machinery, json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from servers import RangeHTTPServer
import fastload

root = Path(sys.argv[2])
want = fastload.plan(root).total_bytes
seen = {}


class WaitForTheWeights(importlib.abc.MetaPathFinder):
    # Holds the first import of transformers until the server has sent every weight byte (at most 30 s). Held
    # where an import spends its time, running the module: find_spec runs under the interpreter's global import
    # lock, and waiting there held up every import in every thread (the load's own lazy ones too).
    def find_spec(self, name, path=None, target=None):
        if name != "transformers" or "sent" in seen:
            return None
        seen["sent"] = 0
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        run = spec.loader.exec_module

        def exec_module(module):
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and seen["sent"] < want:
                time.sleep(0.01)
                seen["sent"] = server.bytes_sent("*.safetensors")
            run(module)

        spec.loader.exec_module = exec_module
        return spec


assert "transformers" not in sys.modules
sys.meta_path.insert(0, WaitForTheWeights())
with RangeHTTPServer(root.parent) as server:
    model = fastload.from_pretrained(server.url_for(root) + "/")
print(json.dumps({"sent": seen["sent"], "want": want, "params": sum(p.numel() for p in model.parameters())}))
"""


def test_weights_stream_while_transformers_imports(llama_dir: Path) -> None:
    """A fresh process spends seconds importing transformers' config and model modules: the weights are on
    their way meanwhile. Here the first import of transformers waits until the server has sent every weight
    byte, which only happens if the load started before it."""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", _OVERLAP_CHILD, str(Path(__file__).parent), str(llama_dir)],
                           capture_output=True, text=True, timeout=180)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["sent"] >= result["want"] > 0, result
    assert result["params"] > 0


@pytest.mark.parametrize("config_json", [
    {"dtype": "float16"},
    {"torch_dtype": "float16"},
    {"dtype": "float16", "torch_dtype": "bfloat16"},
    {"dtype": None, "torch_dtype": "bfloat16"},
    {},
    {"dtype": "bfloat16", "quantization_config": {"quant_method": "bitsandbytes", "load_in_8bit": True}},
])
@pytest.mark.parametrize("dtype", [None, "auto", "float32"])
def test_config_dtype_read_as_transformers_reads_it(tmp_path: Path, config_json: dict, dtype) -> None:
    """The dtype the weights stream in is read from config.json before transformers is imported; it must be the
    one transformers' parsed config gives (a mismatch would cost a second load)."""
    from fastload.integrations.transformers import _dtypes, _raw_config

    doc = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                   num_attention_heads=2).to_dict()
    doc.pop("dtype", None), doc.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps({**doc, **config_json}))
    parsed = transformers.AutoConfig.from_pretrained(tmp_path)
    assert _dtypes(dtype, _raw_config(tmp_path)) == _dtypes(dtype, parsed)


class _Float32Config(transformers.LlamaConfig):
    """A config class that settles the dtype itself, whatever config.json says (as some remote configs do)."""

    model_type = "fastload-test-float32"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dtype = torch.float32


class _Float32Llama(transformers.LlamaForCausalLM):
    config_class = _Float32Config


def test_config_that_overrides_its_dtype_loads_again(llama_dir: Path, tmp_path: Path) -> None:
    """config.json says bfloat16, the parsed config float32: the streamed weights do not match what transformers
    keeps, so they are loaded again in float32 and the model equals transformers' own load."""
    transformers.AutoConfig.register(_Float32Config.model_type, _Float32Config, exist_ok=True)
    shutil.copytree(llama_dir, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    assert doc.get("dtype", doc.get("torch_dtype")) == "bfloat16"
    (tmp_path / "m" / "config.json").write_text(json.dumps({**doc, "model_type": _Float32Config.model_type}))
    trace = fastload.Trace()
    ours = fastload.from_pretrained(tmp_path / "m", model_class=_Float32Llama, trace=trace)
    theirs = _Float32Llama.from_pretrained(tmp_path / "m")
    assert ours.dtype == theirs.dtype == torch.float32
    assert_equal_models(ours, theirs, inputs=TOKENS)
    assert trace.summary().bytes_fetched > 2 * sum(p.stat().st_size for p in (tmp_path / "m").glob("*.safetensors")) * 0.9


def test_failed_config_cancels_the_streaming_load(llama_dir: Path, tmp_path: Path) -> None:
    """transformers refusing the config (an unknown model type) stops the load already streaming: the error is
    transformers' own, and no fastload thread is left running."""
    import threading

    shutil.copytree(llama_dir, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**doc, "model_type": "no-such-model-type"}))
    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="no-such-model-type"):
        fastload.from_pretrained(tmp_path / "m")
    assert [t for t in threading.enumerate() if t not in before] == []
