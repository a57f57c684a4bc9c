"""Hugging Face interop: tiny random `transformers` models of every supported family
load into lab with the same logits and greedy generations, and lab writes them back
in a form `transformers` loads, exactly."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lab
from lab import GPT, Config
from lab.checkpoint import save_pretrained
from lab.errors import CheckpointError
from lab.hf import FAMILIES, Layout, config_from_hf, config_to_hf, hf_model_type

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 97
LLAMA_LIKE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
)  # fmt: skip
# Each family with the features it should exercise; sequences are 14 tokens long.
CASES = {
    "llama-rope-llama3": ("llama", dict(
        LLAMA_LIKE, rope_theta=10000.0,
        # original length 32: wavelengths < 8 kept, 8..32 interpolated, > 32 divided
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32),
    )),
    "llama-yarn-untruncated": ("llama", dict(  # GPT-OSS's YaRN: the ramp's ends not rounded
        LLAMA_LIKE, rope_parameters=dict(rope_type="yarn", factor=8.0, rope_theta=1e4, truncate=False,
                                         original_max_position_embeddings=16),
    )),
    "mistral-sliding-window": ("mistral", dict(LLAMA_LIKE, sliding_window=4)),
    "mixtral": ("mixtral", dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=None)),
    "qwen2-qkv-bias": ("qwen2", dict(LLAMA_LIKE)),
    "qwen3-qk-norm": ("qwen3", dict(LLAMA_LIKE, head_dim=8)),
    "gemma-mqa-tied": ("gemma", dict(LLAMA_LIKE, num_key_value_heads=1, head_dim=32)),
    "gemma2-softcap-sandwich": ("gemma2", dict(
        LLAMA_LIKE, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
    )),
    "phi3-fused": ("phi3", dict(LLAMA_LIKE, sliding_window=5)),
    "phi-partial-rotary": ("phi", dict(LLAMA_LIKE, num_key_value_heads=4,
                                       partial_rotary_factor=0.5)),
    "gpt_neox-partial-rotary": ("gpt_neox", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=64, rotary_pct=0.25,
    )),
    "gpt2-tied-conv1d": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      vocab_size=VOCAB)),
    # --- 2025: layer patterns read from the config's own fields ---------------------------
    "qwen3_moe-dense-layer": ("qwen3_moe", dict(
        LLAMA_LIKE, num_hidden_layers=3, head_dim=8, moe_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
    )),
    "qwen3_moe-sparse-step": ("qwen3_moe", dict(
        LLAMA_LIKE, num_hidden_layers=4, head_dim=8, moe_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2,
    )),
    "gemma3_text-local-global": ("gemma3_text", dict(
        LLAMA_LIKE, num_hidden_layers=4, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e5),
            "sliding_attention": dict(rope_type="default", rope_theta=100.0),
        },
    )),
    "olmo2-post-norm": ("olmo2", dict(LLAMA_LIKE)),
    "gpt_oss-sinks-sliding-yarn": ("gpt_oss", dict(
        LLAMA_LIKE, head_dim=16, num_local_experts=4, num_experts_per_tok=2, swiglu_limit=0.5,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4, truncate=False,
                             beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=16),
    )),
    "deepseek_v3-mla-groups": ("deepseek_v3", dict(
        LLAMA_LIKE, num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        n_shared_experts=1, moe_intermediate_size=24, first_k_dense_replace=1, q_lora_rank=24,
        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
        rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4, mscale=1.0,
                             mscale_all_dim=1.0, original_max_position_embeddings=16),
    )),
    "deepseek_v3-no-q-lora": ("deepseek_v3", dict(
        LLAMA_LIKE, num_hidden_layers=2, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=2,
        moe_intermediate_size=24, first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
    )),
    "qwen3_next-hybrid": ("qwen3_next", dict(
        LLAMA_LIKE, num_hidden_layers=3, head_dim=16, partial_rotary_factor=0.25,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[2],
    )),
    "smollm3-nope": ("smollm3", dict(LLAMA_LIKE, num_hidden_layers=4, no_rope_layer_interval=2,
                                     rope_parameters=dict(rope_type="default", rope_theta=1e4))),
}  # fmt: skip


def hf_model(model_type: str, kwargs: dict):
    """A seeded random `transformers` model; weights are redrawn larger than its init
    (norm weights around 1, not at 1) so every tensor visibly matters."""
    config = transformers.AutoConfig.for_model(
        model_type, bos_token_id=None, eos_token_id=None, pad_token_id=0, **kwargs
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.normal_(1.0, 0.2)
            else:
                param.normal_(0.0, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek's selection-only bias
                buffer.normal_(0.0, 0.5)
    return model.eval()


def greedy(model: torch.nn.Module, idx: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding by full recomputation: the reference that needs no KV cache."""
    for _ in range(new_tokens):
        next_token = model(idx)[:, -1].argmax(dim=-1, keepdim=True)
        idx = torch.cat((idx, next_token), dim=1)
    return idx


@pytest.mark.parametrize("case", CASES)
def test_hf_parity_and_round_trip(case, tmp_path):
    model_type, kwargs = CASES[case]
    reference = hf_model(model_type, kwargs)
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    model = GPT.from_pretrained(tmp_path / "hf").eval()
    assert hf_model_type(model.config) in (model_type, "mistral")  # Phi-3 == Mistral here

    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 14))
    with torch.no_grad():
        expected = reference(idx).logits
        torch.testing.assert_close(model(idx), expected, atol=1e-4, rtol=0)

        prompt = idx[:, :6]
        reference.generation_config.eos_token_id = None
        hf_tokens = reference.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
        assert torch.equal(greedy(model, prompt, 8), hf_tokens)

    # lab -> Hugging Face: transformers loads it with nothing missing and the same logits
    save_pretrained(model, tmp_path / "back", format="hf", model_type=model_type)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == model_type
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "back", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(idx).logits, expected, atol=1e-4, rtol=0)

    # ... and lab -> Hugging Face -> lab is exact
    again = GPT.from_pretrained(tmp_path / "back")
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_sharded_hf_checkpoint_loads(tmp_path):
    reference = hf_model("llama", LLAMA_LIKE)
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", Config.available())
def test_every_named_config_has_a_hugging_face_form(name):
    """Each named architecture maps to some family and back without losing a field
    (``config_to_hf`` checks that by converting back)."""
    hf = config_to_hf(Config.from_name(name))
    assert hf["model_type"] in FAMILIES


def test_inexpressible_config_names_the_fields():
    config = Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, norm_unit_offset=True)
    with pytest.raises(CheckpointError, match="norm_unit_offset"):
        config_to_hf(config, "llama")
    with pytest.raises(CheckpointError, match="must be one of"):
        config_to_hf(config, "bert")


def test_unsupported_hf_features_are_refused(tmp_path):
    reference = hf_model("gpt2", dict(CASES["gpt2-tied-conv1d"][1]))
    reference.config.scale_attn_by_inverse_layer_idx = True
    reference.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx"):
        GPT.from_pretrained(tmp_path)


def test_hf_weights_not_matching_their_config_are_listed(tmp_path):
    reference = hf_model("llama", LLAMA_LIKE)
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing \(9\): model\.layers\.2\."):
        GPT.from_pretrained(tmp_path)


def write_hf_config(tmp_path, **changes) -> None:
    """A tiny Llama checkpoint whose config.json is edited by ``changes`` (None deletes)."""
    hf_model("llama", LLAMA_LIKE).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(changes)
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(vocab_size=None), "has no integer vocab_size"),
        (dict(num_hidden_layers=None), r"llama config\.json has no num_hidden_layers"),
        (
            dict(rope_parameters=dict(rope_type="llama3", factor=8.0, rope_theta=1e4)),
            r"incomplete 'llama3' rope scaling .*low_freq_factor",
        ),
        (dict(num_attention_heads=0), r"config\.json does not describe a valid config"),
        (dict(attention_bias=True, mlp_bias=False), "attention_bias != mlp_bias"),
        (dict(model_type="bert"), r"model_type 'bert' is not supported"),
        (dict(quantization_config=dict(quant_method="mxfp4")), "quantized.*'mxfp4'"),
    ],
)
def test_bad_hf_config_json_is_a_checkpoint_error(tmp_path, changes, match):
    write_hf_config(tmp_path, **changes)
    with pytest.raises(CheckpointError, match=match):
        GPT.from_pretrained(tmp_path)


def test_config_no_family_expresses_names_the_closest():
    config = Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, norm_qk=True, bias=True)
    with pytest.raises(
        CheckpointError, match=r"express this config; the closest, 'llama', differs in norm_qk=True"
    ):
        hf_model_type(config)


def test_a_new_family_is_one_entry(tmp_path, monkeypatch):
    """Adding a family is one record in the table: here a Llama with other tensor
    names, written and read back exactly without touching any other code."""
    family = dataclasses.replace(
        FAMILIES["llama"],
        architecture="RenamedLlamaForCausalLM",
        layout=Layout(base="decoder.", layers="blocks", qkv=("attn.wq", "attn.wk", "attn.wv")),
    )
    monkeypatch.setitem(FAMILIES, "renamed_llama", family)
    torch.manual_seed(0)
    model = GPT(Config(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=50))
    save_pretrained(model, tmp_path, format="hf", model_type="renamed_llama")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "renamed_llama"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "decoder.blocks.1.attn.wk.weight" in set(f.keys())
    again = GPT.from_pretrained(tmp_path)
    assert again.config.replace(name=model.config.name) == model.config
    ours, theirs = model.state_dict(), again.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_family_knowledge_lives_in_the_family_table():
    """No ``model_type ==`` branch outside ``lab/hf/families.py``."""
    lab_dir = Path(lab.__file__).parent
    offenders = [
        str(path.relative_to(lab_dir))
        for path in lab_dir.rglob("*.py")
        if re.search(r"model_type\s*[!=]=", path.read_text()) and path.name != "families.py"
    ]
    assert offenders == []


def reference_logits(model_type: str, kwargs: dict, directory: Path) -> tuple[torch.Tensor, ...]:
    """Save a tiny random model of the family; return an input and its logits."""
    reference = hf_model(model_type, kwargs)
    reference.save_pretrained(directory)
    idx = torch.randint(0, VOCAB, (1, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return idx, reference(idx).logits


def edit_config_json(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if v is not None})
    )


def test_gemma3_hub_config_form_loads(tmp_path):
    """The config.json of Gemma 3 on the hub predates layer_types and per-type
    rope_parameters: sliding_window_pattern, rope_local_base_freq and a rope_scaling that
    applies to the global layers only."""
    kwargs = dict(
        LLAMA_LIKE, num_hidden_layers=4, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=4.0, rope_theta=1e5),
            "sliding_attention": dict(rope_type="default", rope_theta=100.0),
        },
    )  # fmt: skip
    idx, expected = reference_logits("gemma3_text", kwargs, tmp_path)
    edit_config_json(
        tmp_path, layer_types=None, rope_parameters=None, sliding_window_pattern=3,
        rope_theta=1e5, rope_local_base_freq=100.0, rope_scaling=dict(rope_type="linear", factor=4.0),
    )  # fmt: skip
    model = GPT.from_pretrained(tmp_path).eval()
    assert [model.config.for_layer(i).rope_base for i in range(4)] == [100.0, 100.0, 1e5, 100.0]
    with torch.no_grad():
        torch.testing.assert_close(model(idx), expected, atol=1e-4, rtol=0)


def test_stacked_expert_tensors_load(tmp_path):
    """A file of transformers >= 5's in-memory tensors (experts stacked as gate_up_proj and
    down_proj) loads like the hub's per-expert one."""
    kwargs = CASES["qwen3_moe-dense-layer"][1]
    reference = hf_model("qwen3_moe", kwargs)
    reference.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, tmp_path / "model.safetensors")
    idx = torch.randint(0, VOCAB, (1, 14), generator=torch.Generator().manual_seed(3))
    model = GPT.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(idx).logits, atol=1e-4, rtol=0)


FIRST_CASE = {model_type: kwargs for model_type, kwargs in reversed(CASES.values())}


@pytest.mark.parametrize(
    "model_type, changes, key",
    [
        ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
        ("qwen3_moe", dict(use_sliding_window=True, sliding_window=4), "use_sliding_window"),
        ("smollm3", dict(use_sliding_window=True, sliding_window=4), "use_sliding_window"),
        ("olmo2", dict(attention_bias=True), "attention_bias"),
        ("smollm3", dict(no_rope_layers=[1, 0, 1]), "no_rope_layers"),
        ("gpt_oss", dict(swiglu_alpha=1.5), "swiglu_alpha"),
        ("deepseek_v3", dict(norm_topk_prob=False), "norm_topk_prob"),
        ("deepseek_v3", dict(rope_interleave=False), "rope_interleave"),
        ("qwen3_next", dict(layer_types=["linear_attention", "sliding_attention", "full_attention"]),
         "sliding_attention"),
        ("qwen3_next", dict(shared_expert_intermediate_size=20), "shared_expert_intermediate_size"),
    ],
)  # fmt: skip
def test_2025_features_lab_lacks_are_refused(model_type, changes, key):
    config_json = transformers.AutoConfig.for_model(model_type, **FIRST_CASE[model_type]).to_dict()
    with pytest.raises(CheckpointError, match=key):
        config_from_hf({**config_json, **changes})


# A Gemma 3 multimodal model with a tiny vision tower; the text model leaves heads, head_dim,
# query_pre_attn_scalar, the RoPE bases and the layer pattern (5 local : 1 global) at
# Gemma3TextConfig's defaults, so lab must fill them in as the hub's config.json requires.
GEMMA3_TEXT = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=6, vocab_size=VOCAB,
    max_position_embeddings=64, sliding_window=4,
    rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0)},
)  # fmt: skip
TINY_SIGLIP = dict(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    image_size=28, patch_size=14,
)  # fmt: skip


def sparse_text_config(directory: Path) -> dict:
    """Rewrite ``text_config`` as the hub's files hold it (transformers 4.x): only the keys
    that differ from Gemma3TextConfig's defaults, with RoPE as ``rope_scaling`` for the
    global layers and no ``layer_types``. Returns the keys it kept."""
    config = json.loads((directory / "config.json").read_text())
    defaults = transformers.Gemma3TextConfig().to_dict()
    text = {
        k: v
        for k, v in config["text_config"].items()
        if v != defaults.get(k) and k not in ("layer_types", "rope_parameters")
    }
    text["rope_scaling"] = dict(rope_type="linear", factor=4.0)
    config["text_config"] = text
    (directory / "config.json").write_text(json.dumps(config))
    return text


@pytest.mark.parametrize("names", ["saved", "in-memory"])
def test_gemma3_multimodal_checkpoint_loads_its_text_model(tmp_path, names):
    """Gemma 3 4B/12B/27B are Gemma3ForConditionalGeneration: lab loads the language model,
    with the logits transformers gives for text-only input, from a sparse text_config and
    either tensor naming: the hub's (``language_model.model.*``, lm_head left out, as
    save_pretrained writes) or transformers >= 4.52's (``model.language_model.*`` and
    ``lm_head.weight``), skipping the vision tower and projector."""
    config = transformers.Gemma3Config(
        text_config=GEMMA3_TEXT, vision_config=TINY_SIGLIP, mm_tokens_per_image=4,
        image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(1.0 if param.ndim == 1 else 0.0, 0.2 if param.ndim == 1 else 0.1)
    reference.save_pretrained(tmp_path)
    if names == "in-memory":
        state = {k: v.clone().contiguous() for k, v in reference.state_dict().items()}
        save_file(state, tmp_path / "model.safetensors")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        stored = set(f.keys())
    prefix = {"saved": "language_model.model.", "in-memory": "model.language_model."}[names]
    assert any(k.startswith(prefix) for k in stored)
    assert any("vision_tower" in k for k in stored)
    assert ("lm_head.weight" in stored) == (names == "in-memory")
    text = sparse_text_config(tmp_path)
    assert not {"num_attention_heads", "head_dim", "query_pre_attn_scalar"} & set(text)

    model = GPT.from_pretrained(tmp_path).eval()
    assert (model.config.n_head, model.config.n_query_groups, model.config.head_size) == (8, 4, 256)
    assert [model.config.for_layer(i).rope_base for i in range(6)] == [1e4] * 5 + [1e6]
    idx = torch.randint(0, VOCAB - 3, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference(input_ids=idx).logits, atol=1e-4, rtol=0)


def test_unsupported_multimodal_model_is_named(tmp_path):
    write_hf_config(
        tmp_path, model_type="llava", text_config=dict(model_type="llama"), vision_config={}
    )
    with pytest.raises(CheckpointError, match=r"'llava' is a multimodal model.*lab loads text"):
        GPT.from_pretrained(tmp_path)
