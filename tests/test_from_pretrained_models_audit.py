"""Audit: fastload.from_pretrained against transformers' own from_pretrained of the same local directory,
for a variety of tiny real architectures built from configs here (no downloads) and saved with
``save_pretrained`` (safetensors).

Each test checks, against ``transformers``: the class, every parameter and buffer (non-persistent ones too)
bit for bit with the same dtype, device and ``requires_grad``, the same weight tying (which names share one
tensor), ``model.training``, the config, the generation config, the loading info, and a forward pass with
identical outputs.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastload
from hub_server import minilm_dir  # noqa: F401 -- the real all-MiniLM-L6-v2 (a test dependency)

transformers = pytest.importorskip("transformers")

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 70, 11], [3, 4, 8, 15, 16, 23, 42]])


# -- helpers ------------------------------------------------------------------------------------------------------


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so -0.0 != 0.0 and NaN payloads count)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
            and torch.equal(_bits(a), _bits(b)))


def _tie_groups(model) -> set[frozenset[str]]:
    """Groups of parameter/buffer names that are the very same tensor object (ties), as a set of sets."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _ptr_groups(model) -> set[frozenset[str]]:
    """Groups of state-dict names sharing storage (data_ptr)."""
    groups: dict[tuple, set[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if t.numel():
            groups.setdefault((t.device, t.untyped_storage().data_ptr(), t.storage_offset()), set()).add(name)
    return {frozenset(g) for g in groups.values() if len(g) > 1}


def _outputs(out) -> dict:
    items = out.items() if hasattr(out, "items") else enumerate(out)
    flat = {}
    for k, v in items:
        if isinstance(v, torch.Tensor):
            flat[str(k)] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(x, torch.Tensor) for x in v):
            flat.update({f"{k}.{i}": x for i, x in enumerate(v)})
    return flat


def assert_same_model(ours, theirs, inputs: dict | None = None) -> None:
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    bad = [k for k in b if not _same(a[k], b[k])]
    assert bad == [], [(k, a[k].dtype, b[k].dtype) for k in bad[:5]]
    pa, pb = dict(ours.named_parameters(remove_duplicate=False)), dict(theirs.named_parameters(remove_duplicate=False))
    assert list(pa) == list(pb)
    assert [k for k in pb if pa[k].requires_grad != pb[k].requires_grad] == []
    assert [k for k in pb if type(pa[k]) is not type(pb[k])] == []
    ba, bb = dict(ours.named_buffers(remove_duplicate=False)), dict(theirs.named_buffers(remove_duplicate=False))
    assert list(ba) == list(bb)
    assert [k for k in bb if not _same(ba[k], bb[k])] == []
    assert _tie_groups(ours) == _tie_groups(theirs)
    assert _ptr_groups(ours) == _ptr_groups(theirs)
    assert ours.training == theirs.training
    assert [n for n, m in ours.named_modules() if m.training] == [n for n, m in theirs.named_modules() if m.training]
    ca, cb = ours.config.to_dict(), theirs.config.to_dict()
    ca.pop("_name_or_path", None), cb.pop("_name_or_path", None)
    assert ca == cb
    assert ours.config._attn_implementation == theirs.config._attn_implementation
    assert ours.can_generate() == theirs.can_generate()
    if theirs.can_generate():
        assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    if inputs is not None:
        with torch.no_grad():
            oa, ob = _outputs(ours(**inputs)), _outputs(theirs(**inputs))
        assert list(oa) == list(ob) and oa
        assert [k for k in ob if not _same(oa[k], ob[k])] == []


def load_both(directory: Path, hf_class, **kwargs):
    """(fastload's model, transformers' model), each built after the same seed (missing weights are random)."""
    torch.manual_seed(1234)
    ours = fastload.from_pretrained(directory, **kwargs)
    torch.manual_seed(1234)
    theirs = hf_class.from_pretrained(directory, **{k: v for k, v in kwargs.items() if k != "model_class"})
    return ours, theirs


def rewrite(path: Path, change) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


# -- tiny models ------------------------------------------------------------------------------------------------


def bert_config(**kw):
    return transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=64, **kw)


def gpt2_config(**kw):
    return transformers.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, **kw)


def t5_config(**kw):
    return transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                 decoder_start_token_id=0, **kw)


def llama_config(**kw):
    kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    kwargs.update(kw)
    return transformers.LlamaConfig(**kwargs)


def qwen2_moe_config(**kw):
    return transformers.Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                       num_experts_per_tok=2, moe_intermediate_size=16,
                                       shared_expert_intermediate_size=24, max_position_embeddings=64, **kw)


def vit_config(**kw):
    return transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                  image_size=16, patch_size=4, num_labels=3, **kw)


def save(model, directory: Path, **kw) -> Path:
    model.save_pretrained(directory, **kw)
    return directory


@pytest.fixture(scope="module")
def bert_mlm_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save(transformers.BertForMaskedLM(bert_config()), tmp_path_factory.mktemp("bert-mlm"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    return save(transformers.GPT2LMHeadModel(gpt2_config()), tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def gpt2_bf16_sharded_dir(tmp_path_factory) -> Path:
    torch.manual_seed(2)
    d = save(transformers.GPT2LMHeadModel(gpt2_config()).to(torch.bfloat16), tmp_path_factory.mktemp("gpt2-bf16"),
             max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").exists() and not (d / "model.safetensors").exists()
    return d


@pytest.fixture(scope="module")
def qwen_moe_dir(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    d = save(transformers.Qwen2MoeForCausalLM(qwen2_moe_config()), tmp_path_factory.mktemp("qwen-moe"),
             max_shard_size="50KB")
    names = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".experts.3." in n for n in names)  # stored expert by expert: transformers fuses them on load
    return d


# -- BERT ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", [None, transformers.AutoModelForMaskedLM, transformers.BertForMaskedLM])
def test_bert_masked_lm_tied_decoder(bert_mlm_dir: Path, model_class) -> None:
    kwargs = {} if model_class is None else {"model_class": model_class}
    ours, theirs = load_both(bert_mlm_dir, transformers.BertForMaskedLM, **kwargs)
    inputs = {"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS)}
    assert_same_model(ours, theirs, inputs)
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    assert "bert.embeddings.position_ids" not in load_file(bert_mlm_dir / "model.safetensors")


def test_bert_head_class_with_missing_head_and_unused_mlm_head(bert_mlm_dir: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """AutoModelForSequenceClassification on an MLM checkpoint: the classifier is missing (initialised from the
    seed), the MLM head is unexpected; the loading info and the report transformers logs are the same."""
    cls = transformers.AutoModelForSequenceClassification
    with caplog.at_level(logging.WARNING):
        torch.manual_seed(5)
        ours, info = fastload.from_pretrained(bert_mlm_dir, model_class=cls, num_labels=4, output_loading_info=True)
        ours_log = [r.getMessage() for r in caplog.records if r.name.startswith("transformers")]
        caplog.clear()
        torch.manual_seed(5)
        theirs, want = cls.from_pretrained(bert_mlm_dir, num_labels=4, output_loading_info=True)
        theirs_log = [r.getMessage() for r in caplog.records if r.name.startswith("transformers")]
    assert info == want
    assert "classifier.weight" in info["missing_keys"] and info["unexpected_keys"]
    assert_same_model(ours, theirs, {"input_ids": TOKENS})
    norm = [m.replace(str(bert_mlm_dir), "<dir>") for m in theirs_log]
    assert len(ours_log) == len(norm)


def test_real_minilm_in_half_precision_locally(minilm_dir: Path) -> None:
    for dtype in (torch.float16, "bfloat16"):
        ours, theirs = load_both(minilm_dir, transformers.AutoModel, dtype=dtype)
        assert ours.dtype == theirs.dtype != torch.float32
        assert_same_model(ours, theirs, {"input_ids": TOKENS[:, :5], "attention_mask": torch.ones(2, 5, dtype=int)})


def test_real_minilm_as_masked_lm_initialises_the_head_like_transformers(minilm_dir: Path) -> None:
    ours, theirs = load_both(minilm_dir, transformers.AutoModelForMaskedLM,
                             model_class=transformers.AutoModelForMaskedLM)
    assert_same_model(ours, theirs, {"input_ids": TOKENS[:, :5]})


# -- GPT-2 ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, "auto", torch.float16])
def test_gpt2_conv1d_and_tied_lm_head(gpt2_dir: Path, dtype) -> None:
    kwargs = {"model_class": transformers.AutoModelForCausalLM}
    if dtype is not None:
        kwargs["dtype"] = dtype
    ours, theirs = load_both(gpt2_dir, transformers.AutoModelForCausalLM, **kwargs)
    assert_same_model(ours, theirs, {"input_ids": TOKENS})
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert isinstance(ours.transformer.h[0].attn.c_attn, transformers.pytorch_utils.Conv1D)


@pytest.mark.parametrize("dtype", [torch.float32, "float32", "auto", None, torch.float16])
def test_bf16_sharded_gpt2(gpt2_bf16_sharded_dir: Path, dtype) -> None:
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours, info = fastload.from_pretrained(gpt2_bf16_sharded_dir, output_loading_info=True, **kwargs)
    theirs, want = transformers.GPT2LMHeadModel.from_pretrained(gpt2_bf16_sharded_dir, output_loading_info=True,
                                                                **kwargs)
    assert info == want
    assert ours.dtype == theirs.dtype
    assert_same_model(ours, theirs, {"input_ids": TOKENS})


def test_gpt2_base_model_from_lm_checkpoint(gpt2_dir: Path) -> None:
    ours, theirs = load_both(gpt2_dir, transformers.GPT2Model, model_class=transformers.AutoModel)
    assert_same_model(ours, theirs, {"input_ids": TOKENS})


# -- T5 -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_t5_ties_and_fp32_modules(tmp_path: Path, tie: bool, dtype) -> None:
    torch.manual_seed(4)
    save(transformers.T5ForConditionalGeneration(t5_config(tie_word_embeddings=tie)), tmp_path,
         max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    kwargs = {"model_class": transformers.AutoModelForSeq2SeqLM}
    if dtype is not None:
        kwargs["dtype"] = dtype
    ours, theirs = load_both(tmp_path, transformers.AutoModelForSeq2SeqLM, **kwargs)
    inputs = {"input_ids": TOKENS, "decoder_input_ids": TOKENS[:, :3]}
    assert_same_model(ours, theirs, inputs)
    assert (ours.encoder.embed_tokens.weight is ours.shared.weight) == \
        (theirs.encoder.embed_tokens.weight is theirs.shared.weight)
    assert (ours.lm_head.weight is ours.shared.weight) == (theirs.lm_head.weight is theirs.shared.weight)


def test_t5_encoder_model_from_seq2seq_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(5)
    save(transformers.T5ForConditionalGeneration(t5_config()).to(torch.float16), tmp_path)
    ours, theirs = load_both(tmp_path, transformers.T5EncoderModel, model_class=transformers.T5EncoderModel)
    assert_same_model(ours, theirs, {"input_ids": TOKENS})


# -- Llama ----------------------------------------------------------------------------------------------------------


def test_llama_tied_rotary_buffers_and_eager(tmp_path: Path) -> None:
    torch.manual_seed(6)
    save(transformers.LlamaForCausalLM(llama_config()), tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in stored and not any("inv_freq" in k for k in stored)
    ours, theirs = load_both(tmp_path, transformers.LlamaForCausalLM, attn_implementation="eager",
                             low_cpu_mem_usage=True, trust_remote_code=False)
    assert_same_model(ours, theirs, {"input_ids": TOKENS})
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert ours.model.rotary_emb.inv_freq.dtype == theirs.model.rotary_emb.inv_freq.dtype


def test_torch_dtype_alias_and_dtype_together(tmp_path: Path) -> None:
    """``torch_dtype=`` is transformers' old spelling of ``dtype=``; with both, transformers takes ``dtype``."""
    torch.manual_seed(7)
    save(transformers.LlamaForCausalLM(llama_config()), tmp_path)
    for kwargs in ({"torch_dtype": torch.bfloat16}, {"torch_dtype": "float16"},
                   {"dtype": torch.float16, "torch_dtype": torch.bfloat16}):
        ours, theirs = load_both(tmp_path, transformers.AutoModelForCausalLM, **kwargs)
        assert ours.dtype == theirs.dtype
        assert_same_model(ours, theirs, {"input_ids": TOKENS})


# -- MoE --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_qwen2_moe_experts_fused(qwen_moe_dir: Path, dtype) -> None:
    kwargs = {"model_class": transformers.AutoModelForCausalLM, "output_loading_info": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    torch.manual_seed(0)
    ours, info = fastload.from_pretrained(qwen_moe_dir, **kwargs)
    kwargs.pop("model_class")
    torch.manual_seed(0)
    theirs, want = transformers.AutoModelForCausalLM.from_pretrained(qwen_moe_dir, **kwargs)
    assert info == want
    assert_same_model(ours, theirs, {"input_ids": TOKENS})
    assert any("experts.gate_up_proj" in k for k in ours.state_dict())


def test_mixtral_bf16_checkpoint_loaded_as_float32(tmp_path: Path) -> None:
    torch.manual_seed(8)
    config = transformers.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=64)
    save(transformers.MixtralForCausalLM(config).to(torch.bfloat16), tmp_path, max_shard_size="30KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    for dtype in (torch.float32, "auto", torch.float16):
        ours, theirs = load_both(tmp_path, transformers.MixtralForCausalLM, dtype=dtype)
        assert_same_model(ours, theirs, {"input_ids": TOKENS})


# -- vision -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_vit_image_classification(tmp_path: Path, dtype) -> None:
    torch.manual_seed(9)
    save(transformers.ViTForImageClassification(vit_config()), tmp_path)
    kwargs = {"model_class": transformers.AutoModelForImageClassification}
    if dtype is not None:
        kwargs["dtype"] = dtype
    ours, theirs = load_both(tmp_path, transformers.AutoModelForImageClassification, **kwargs)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(theirs.dtype)
    assert_same_model(ours, theirs, {"pixel_values": pixels})


def test_vit_model_from_classifier_checkpoint_adds_pooler(tmp_path: Path) -> None:
    torch.manual_seed(10)
    save(transformers.ViTForImageClassification(vit_config()), tmp_path)
    ours, theirs = load_both(tmp_path, transformers.ViTModel, model_class=transformers.ViTModel)
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    assert_same_model(ours, theirs, {"pixel_values": pixels})


def test_resnet_batchnorm_buffers(tmp_path: Path) -> None:
    """Persistent BatchNorm buffers (float running stats, int64 num_batches_tracked) saved with the weights."""
    torch.manual_seed(11)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = transformers.ResNetForImageClassification(config)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))  # non-trivial running stats
    save(model, tmp_path)
    for dtype in (None, torch.bfloat16, torch.float16):
        kwargs = {} if dtype is None else {"dtype": dtype}
        ours, theirs = load_both(tmp_path, transformers.ResNetForImageClassification, **kwargs)
        pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(theirs.dtype)
        assert_same_model(ours, theirs, {"pixel_values": pixels})


# -- which weights, which keys -----------------------------------------------------------------------------------


def test_directory_with_both_single_file_and_index_loads_what_transformers_loads(tmp_path: Path) -> None:
    """transformers looks for ``model.safetensors`` first and only then for the index (local dirs and the Hub
    alike, ``_get_resolved_checkpoint_files``); a directory holding both (a re-save, a copy) gives its model from
    ``model.safetensors``. The README promises the model transformers builds from that directory."""
    torch.manual_seed(12)
    save(transformers.LlamaForCausalLM(llama_config()), tmp_path)
    other = tmp_path.parent / (tmp_path.name + "-other")
    torch.manual_seed(13)
    save(transformers.LlamaForCausalLM(llama_config()), other, max_shard_size="20KB")
    for f in other.glob("model*"):
        shutil.copy(f, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "model.safetensors.index.json").exists()
    ours, theirs = load_both(tmp_path, transformers.LlamaForCausalLM)
    assert_same_model(ours, theirs, {"input_ids": TOKENS})


def test_missing_key_warning_and_initialisation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(14)
    save(transformers.GPT2LMHeadModel(gpt2_config()), tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    victim = "transformer.h.1.mlp.c_fc.weight"
    shard = tmp_path / index["weight_map"].pop(victim)
    rewrite(shard, lambda t: t.pop(victim))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.manual_seed(3)
    with caplog.at_level(logging.WARNING):
        ours, info = fastload.from_pretrained(tmp_path, output_loading_info=True)
    ours_msgs = " ".join(r.getMessage() for r in caplog.records)
    caplog.clear()
    torch.manual_seed(3)
    with caplog.at_level(logging.WARNING):
        theirs, want = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    theirs_msgs = " ".join(r.getMessage() for r in caplog.records)
    assert info == want and victim in info["missing_keys"]
    assert_same_model(ours, theirs, {"input_ids": TOKENS})
    assert (victim in ours_msgs) == (victim in theirs_msgs)


def test_unexpected_extra_key_is_dropped_and_reported(tmp_path: Path) -> None:
    torch.manual_seed(15)
    save(transformers.BertModel(bert_config()), tmp_path)
    rewrite(tmp_path / "model.safetensors",
            lambda t: t.update({"encoder.layer.0.surprise.weight": torch.arange(6.0),
                                "totally.unrelated": torch.ones(2, dtype=torch.int32)}))
    for dtype in (None, torch.float16):
        kwargs = {"output_loading_info": True} | ({} if dtype is None else {"dtype": dtype})
        torch.manual_seed(0)
        ours, info = fastload.from_pretrained(tmp_path, **kwargs)
        torch.manual_seed(0)
        theirs, want = transformers.BertModel.from_pretrained(tmp_path, **kwargs)
        assert info == want and "totally.unrelated" in info["unexpected_keys"]
        assert_same_model(ours, theirs, {"input_ids": TOKENS})


def test_bert_legacy_gamma_beta_names_are_renamed(tmp_path: Path) -> None:
    """Old BERT checkpoints name LayerNorm weights ``gamma``/``beta``; transformers renames them on load."""
    torch.manual_seed(16)
    save(transformers.BertModel(bert_config()), tmp_path)

    def legacy(t: dict) -> None:
        for k in [k for k in t if "LayerNorm" in k]:
            t[k.replace(".weight", ".gamma").replace(".bias", ".beta")] = t.pop(k)

    rewrite(tmp_path / "model.safetensors", legacy)
    for dtype in (None, torch.bfloat16):
        kwargs = {"output_loading_info": True} | ({} if dtype is None else {"dtype": dtype})
        torch.manual_seed(0)
        ours, info = fastload.from_pretrained(tmp_path, **kwargs)
        torch.manual_seed(0)
        theirs, want = transformers.BertModel.from_pretrained(tmp_path, **kwargs)
        assert info == want
        assert_same_model(ours, theirs, {"input_ids": TOKENS})


def test_generation_config_absent_is_made_from_config(tmp_path: Path) -> None:
    """No generation_config.json: transformers makes one from config.json (bos/eos/pad from the model config)."""
    torch.manual_seed(17)
    save(transformers.GPT2LMHeadModel(gpt2_config(bos_token_id=3, eos_token_id=4)), tmp_path)
    (tmp_path / "generation_config.json").unlink()
    ours, theirs = load_both(tmp_path, transformers.GPT2LMHeadModel)
    assert_same_model(ours, theirs, {"input_ids": TOKENS})
    assert ours.generation_config.eos_token_id == 4


@pytest.mark.parametrize("cls", ["LlamaForCausalLM", "AutoModelForCausalLM"])
def test_config_kwargs_reach_the_generation_config_as_in_transformers(tmp_path: Path, cls: str) -> None:
    """Keyword arguments go to transformers' from_pretrained. Called on a concrete class, transformers passes the
    leftover ones (config overrides such as ``eos_token_id``) to ``GenerationConfig.from_pretrained`` too
    (``adjust_generation_fn``), so they also update the generation config; an Auto class absorbs them into the
    config first. fastload with ``model_class=`` that class must give what that class gives."""
    torch.manual_seed(18)
    save(transformers.LlamaForCausalLM(llama_config()), tmp_path)
    hf_class = getattr(transformers, cls)
    for kwargs in ({"eos_token_id": 9}, {"pad_token_id": 5, "bos_token_id": 6}):
        ours, theirs = load_both(tmp_path, hf_class, model_class=hf_class, **kwargs)
        assert_same_model(ours, theirs, {"input_ids": TOKENS})


def test_weights_file_named_by_config_transformers_weights(tmp_path: Path) -> None:
    """config.json may name the weights file itself (``transformers_weights``); transformers then loads that file
    (``_get_resolved_checkpoint_files``, local dirs and the Hub) instead of model.safetensors."""
    torch.manual_seed(19)
    save(transformers.LlamaForCausalLM(llama_config()), tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "custom.safetensors")
    doc = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**doc, "transformers_weights": "custom.safetensors"}))
    ours, theirs = load_both(tmp_path, transformers.LlamaForCausalLM)
    assert_same_model(ours, theirs, {"input_ids": TOKENS})


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_bart_shared_embeddings_and_final_logits_bias(tmp_path: Path, dtype) -> None:
    """BART: shared/encoder/decoder embeddings and lm_head tied, a persistent float buffer (final_logits_bias),
    and a generation config made from config.json (no generation_config.json)."""
    torch.manual_seed(20)
    config = transformers.BartConfig(vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                                     decoder_ffn_dim=37, max_position_embeddings=64, forced_bos_token_id=0,
                                     no_repeat_ngram_size=3, num_beams=2)
    model = transformers.BartForConditionalGeneration(config)
    with torch.no_grad():
        model.final_logits_bias.normal_()
    save(model, tmp_path)
    (tmp_path / "generation_config.json").unlink(missing_ok=True)
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours, theirs = load_both(tmp_path, transformers.BartForConditionalGeneration, **kwargs)
    assert_same_model(ours, theirs, {"input_ids": TOKENS, "decoder_input_ids": TOKENS[:, :4]})


def test_config_dtype_differs_from_stored_dtype_with_fp32_modules(tmp_path: Path) -> None:
    """config.json says float16, the tensors are bfloat16 (a converted checkpoint): "auto" gives float16 with
    T5's ``wo`` kept in float32, each weight converted once from its stored bfloat16."""
    torch.manual_seed(21)
    save(transformers.T5ForConditionalGeneration(t5_config()).to(torch.bfloat16), tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps({**doc, "dtype": "float16"}))
    ours, theirs = load_both(tmp_path, transformers.T5ForConditionalGeneration)
    assert theirs.dtype == torch.float16
    assert_same_model(ours, theirs, {"input_ids": TOKENS, "decoder_input_ids": TOKENS[:, :3]})


def test_subfolder_and_variant_locally(tmp_path: Path) -> None:
    torch.manual_seed(23)
    save(transformers.GPT2LMHeadModel(gpt2_config()), tmp_path / "sub")  # the plain weights, which variant skips
    torch.manual_seed(22)
    save(transformers.GPT2LMHeadModel(gpt2_config()), tmp_path / "sub", variant="v1", max_shard_size="20KB")
    assert (tmp_path / "sub" / "model.safetensors").exists()
    assert (tmp_path / "sub" / "model.safetensors.index.v1.json").exists()
    for kwargs in ({"subfolder": "sub"}, {"subfolder": "sub", "variant": "v1"}):
        ours, theirs = load_both(tmp_path, transformers.GPT2LMHeadModel, **kwargs)
        assert_same_model(ours, theirs, {"input_ids": TOKENS})


def test_legacy_persistent_position_ids_in_checkpoint(tmp_path: Path) -> None:
    """Older BERT checkpoints store ``embeddings.position_ids`` (int64; a non-persistent buffer today)."""
    torch.manual_seed(24)
    save(transformers.BertModel(bert_config()), tmp_path)
    rewrite(tmp_path / "model.safetensors",
            lambda t: t.update({"embeddings.position_ids": torch.arange(64).unsqueeze(0)}))
    for dtype in (None, torch.bfloat16):
        kwargs = {"output_loading_info": True} | ({} if dtype is None else {"dtype": dtype})
        ours, info = fastload.from_pretrained(tmp_path, **kwargs)
        theirs, want = transformers.BertModel.from_pretrained(tmp_path, **kwargs)
        assert info == want
        assert_same_model(ours, theirs, {"input_ids": TOKENS})
        assert ours.embeddings.position_ids.dtype == torch.int64


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_cuda_device_matches_transformers_device_map(tmp_path: Path, dtype) -> None:
    """device="cuda": every parameter and buffer where transformers' ``device_map="cuda"`` puts it, same ties."""
    torch.manual_seed(25)
    save(transformers.T5ForConditionalGeneration(t5_config()), tmp_path, max_shard_size="30KB")
    kwargs = {} if dtype is None else {"dtype": dtype}
    ours = fastload.from_pretrained(tmp_path, device="cuda", **kwargs)
    theirs = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, device_map="cuda", **kwargs)
    assert_same_model(ours, theirs)
    assert {t.device.type for t in ours.state_dict().values()} == {"cuda"}
