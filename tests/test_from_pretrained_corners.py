"""Corners of fastload.from_pretrained against transformers' own from_pretrained of the same directory.

Tiny real models built here from configs (Llama, T5-backed BLIP-2, Hunyuan-v3 MoE), saved with
save_pretrained; no network. Each test compares with ``transformers.AutoModel*.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastload

transformers = pytest.importorskip("transformers")

TOKENS = {"input_ids": torch.tensor([[1, 5, 9, 33, 2, 70, 11]])}


def llama_config(**overrides):
    kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def differing(ours, theirs) -> list[str]:
    """Names whose tensor differs (dtype or value) between the two models' state dicts; also checks key sets."""
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    return [k for k in b if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def same_forward(ours, theirs, inputs: dict) -> bool:
    with torch.no_grad():
        out_a, out_b = ours(**inputs), theirs(**inputs)
    first = "logits" if "logits" in out_a else "last_hidden_state"
    return torch.equal(out_a[first], out_b[first])


def rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("llama-corners")
    transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16).save_pretrained(directory, max_shard_size="20KB")
    assert (directory / "model.safetensors.index.json").exists()
    return directory


# -- dtypes --------------------------------------------------------------------------------------------------


def test_composite_model_keeps_its_submodels_fp32_weights(tmp_path: Path) -> None:
    """BLIP-2 with a T5 language model (the blip2-flan-t5 family), loaded in float16.

    transformers keeps T5's ``wo`` in float32 inside the composite model too (``post_init`` merges the children's
    ``_keep_in_fp32_modules``), loading those float32 weights exactly; fastload must not round them through fp16.
    """
    torch.manual_seed(3)
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=8, patch_size=4),
        qformer_config=dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=37, encoder_hidden_size=32, max_position_embeddings=16),
        text_config=transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                                          decoder_start_token_id=0).to_dict(),
        num_query_tokens=4)
    transformers.Blip2ForConditionalGeneration(config).save_pretrained(tmp_path)  # float32

    ours = fastload.from_pretrained(tmp_path, dtype=torch.float16)
    theirs = transformers.Blip2ForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float16)
    wo = theirs.language_model.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype == torch.float32
    assert differing(ours, theirs) == []


def test_fp32_kept_weight_whose_checkpoint_name_is_renamed_on_load(tmp_path: Path) -> None:
    """Hunyuan-v3 MoE keeps ``e_score_correction_bias`` in float32 (``_keep_in_fp32_modules_strict``); its
    checkpoints store it as ``mlp.expert_bias``, renamed on load. Loaded in bfloat16, transformers keeps the stored
    float32 values exactly; fastload decides float32 from the checkpoint name and rounds it through bf16."""
    torch.manual_seed(4)
    config = transformers.HYV3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                     num_experts_per_tok=2, num_shared_experts=1, moe_intermediate_size=16,
                                     max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    bias = "model.layers.1.mlp.expert_bias"

    def realistic_bias(tensors: dict) -> None:
        assert bias in tensors  # the original checkpoint name, not the model's
        tensors[bias] = torch.randn(4) * 3  # float32, as real checkpoints store it

    rewrite(tmp_path / "model.safetensors", realistic_bias)
    for dtype in (torch.bfloat16, torch.float16):
        ours = fastload.from_pretrained(tmp_path, dtype=dtype)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
        assert theirs.model.layers[1].mlp.e_score_correction_bias.dtype == torch.float32
        assert differing(ours, theirs) == [], dtype


def test_auto_dtype_without_config_dtype_follows_the_checkpoints_first_tensor(tmp_path: Path) -> None:
    """config.json without a dtype: transformers' "auto" takes the first floating tensor of the first file in the
    file's key order (here bf16 ``model.embed_tokens.weight``). The float32 norms come first in byte order."""
    torch.manual_seed(5)
    transformers.LlamaForCausalLM(llama_config()).save_pretrained(tmp_path)
    body = json.loads((tmp_path / "config.json").read_text())
    body.pop("dtype", None), body.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(body))
    rewrite(tmp_path / "model.safetensors",
            lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items() if "norm" not in k}))
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert next(iter(f.keys())) == "model.embed_tokens.weight"

    for kwargs in ({}, {"dtype": "auto"}):
        ours = fastload.from_pretrained(tmp_path, **kwargs)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs)
        assert theirs.dtype == torch.bfloat16
        assert ours.dtype == theirs.dtype
        assert differing(ours, theirs) == []
        assert same_forward(ours, theirs, TOKENS)


# -- which weights ---------------------------------------------------------------------------------------------


def test_directory_without_transformers_weights_is_an_error(tmp_path: Path, llama_dir: Path, serve) -> None:
    """config.json plus a safetensors file transformers does not load (e.g. Mistral's consolidated.safetensors):
    transformers raises OSError (no model.safetensors); fastload must not return a randomly initialised model."""
    model_dir = tmp_path / "consolidated"
    model_dir.mkdir()
    shutil.copy(llama_dir / "config.json", model_dir)
    save_file({"tok_embeddings.weight": torch.ones(128, 32)}, model_dir / "consolidated.safetensors")
    with pytest.raises(OSError):
        transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    for transport in ("local", "s3"):
        with pytest.raises((fastload.SourceNotFoundError, OSError)):
            fastload.from_pretrained(serve(transport, model_dir, as_dir=True))


def test_directory_with_no_weights_is_a_typed_error_over_http_and_s3(tmp_path: Path, llama_dir: Path,
                                                                     serve) -> None:
    model_dir = tmp_path / "configonly"
    model_dir.mkdir()
    shutil.copy(llama_dir / "config.json", model_dir)
    for transport in ("local", "http", "s3"):
        with pytest.raises(fastload.SourceNotFoundError):
            fastload.from_pretrained(serve(transport, model_dir, as_dir=True))


def test_missing_weights_are_initialised_exactly_like_transformers(tmp_path: Path) -> None:
    """Untied lm_head and one layer weight missing; a head class whose head is missing; config kwargs through."""
    torch.manual_seed(6)
    transformers.LlamaForCausalLM(llama_config(tie_word_embeddings=False)).to(torch.bfloat16).save_pretrained(tmp_path)
    missing = {"lm_head.weight", "model.layers.1.mlp.up_proj.weight"}
    rewrite(tmp_path / "model.safetensors", lambda t: [t.pop(k) for k in missing])

    torch.manual_seed(123)
    ours, info = fastload.from_pretrained(tmp_path, output_loading_info=True)
    torch.manual_seed(123)
    theirs, want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info == want and missing <= set(info["missing_keys"])
    assert differing(ours, theirs) == []  # the missing ones too: initialised, not empty memory
    assert all(torch.isfinite(ours.state_dict()[k].float()).all() and ours.state_dict()[k].abs().sum() > 0
               for k in missing)
    assert same_forward(ours, theirs, TOKENS)

    cls = transformers.AutoModelForSequenceClassification
    torch.manual_seed(9)
    ours = fastload.from_pretrained(tmp_path, model_class=cls, num_labels=3, pad_token_id=0)
    torch.manual_seed(9)
    theirs = cls.from_pretrained(tmp_path, num_labels=3, pad_token_id=0)
    assert type(ours) is transformers.LlamaForSequenceClassification and ours.config.num_labels == 3
    assert differing(ours, theirs) == [] and not ours.training
    assert same_forward(ours, theirs, TOKENS)


def test_checkpoint_holding_only_the_tied_lm_head(tmp_path: Path, llama_dir: Path) -> None:
    shutil.copytree(llama_dir, tmp_path, dirs_exist_ok=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop("model.embed_tokens.weight")
    index["weight_map"]["lm_head.weight"] = shard
    rewrite(tmp_path / shard, lambda t: t.update({"lm_head.weight": t.pop("model.embed_tokens.weight")}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))

    ours = fastload.from_pretrained(tmp_path, model_class=transformers.LlamaForCausalLM)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert differing(ours, theirs) == []
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert same_forward(ours, theirs, TOKENS)


def test_size_mismatch_raises_like_transformers_and_can_be_ignored(tmp_path: Path, llama_dir: Path) -> None:
    shutil.copytree(llama_dir, tmp_path, dirs_exist_ok=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    rewrite(tmp_path / index["weight_map"]["model.norm.weight"],
            lambda t: t.update({"model.norm.weight": torch.ones(16, dtype=torch.bfloat16)}))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        fastload.from_pretrained(tmp_path)
    torch.manual_seed(1)
    ours, info = fastload.from_pretrained(tmp_path, ignore_mismatched_sizes=True, output_loading_info=True)
    torch.manual_seed(1)
    theirs, want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True,
                                                                    output_loading_info=True)
    assert info == want and info["mismatched_keys"]
    assert differing(ours, theirs) == []


@pytest.mark.parametrize("kwargs", [{"num_hidden_layers": 1}, {"tie_word_embeddings": False},
                                    {"torch_dtype": "float16"}, {"dtype": "bfloat16", "attn_implementation": "eager"}])
def test_config_overrides_and_dtype_spellings_pass_through(llama_dir: Path, kwargs: dict) -> None:
    torch.manual_seed(11)  # untied: lm_head is missing from the checkpoint and initialised
    ours, info = fastload.from_pretrained(llama_dir, output_loading_info=True, **kwargs)
    torch.manual_seed(11)
    theirs, want = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, output_loading_info=True, **kwargs)
    assert info == want
    assert type(ours) is type(theirs) and ours.dtype == theirs.dtype
    assert ours.config.num_hidden_layers == theirs.config.num_hidden_layers
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == \
        (theirs.lm_head.weight is theirs.model.embed_tokens.weight)
    assert differing(ours, theirs) == [] and not ours.training
    assert same_forward(ours, theirs, TOKENS)


# -- trace ------------------------------------------------------------------------------------------------------


def test_trace_records_every_shard_over_http(llama_dir: Path, serve, tmp_path: Path) -> None:
    url = serve("http", llama_dir)
    trace = fastload.Trace(otel=False)
    ours = fastload.from_pretrained(url, trace=trace)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
    assert differing(ours, theirs) == []
    s = trace.summary()
    files = sorted(p.name for p in llama_dir.glob("model*.safetensors*"))  # the shards and the index
    assert sorted(u.rsplit("/", 1)[-1] for u in s.bytes_by_file) == files
    for file_url, n in s.bytes_by_file.items():  # every byte of every file, once (the index too: the probe
        # that found it brought it whole, and the load took it from there)
        assert n == (llama_dir / file_url.rsplit("/", 1)[-1]).stat().st_size, file_url
    assert s.chunks >= 1 and s.errors == ()
    path = tmp_path / "load.json"
    fastload.from_pretrained(url, trace=str(path))
    assert json.loads(path.read_text())["fastload"]["summary"]["bytes_fetched"] == s.bytes_fetched
