"""Hugging Face families as data: one ``Family`` record per ``model_type``.

A record says everything lab knows about a family: which ``config.json`` keys hold
which ``Config`` field, the lab values the architecture implies, the values of keys a
``config.json`` may leave out, where each tensor lives, and the few rules only that
family has (as hooks). ``lab.hf.configs`` and ``lab.hf.weights`` read this table and
hold no family of their own; ``lab.configs`` builds its named architectures on the
same records (``Family.base``). Adding a family is one entry in ``FAMILIES``.

The table's order matters once: ``hf_model_type`` names the first family that can
express a config, so the plainer families come first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Config field -> the config.json keys that hold it (read: the first present; write: all).
LLAMA_KEYS = {
    "n_embd": ("hidden_size",), "n_layer": ("num_hidden_layers",),
    "n_head": ("num_attention_heads",), "n_query_groups": ("num_key_value_heads",),
    "head_size": ("head_dim",), "intermediate_size": ("intermediate_size",),
    "block_size": ("max_position_embeddings",), "norm_eps": ("rms_norm_eps",),
    "activation": ("hidden_act",), "tie_embeddings": ("tie_word_embeddings",),
}  # fmt: skip
GEMMA_KEYS = {**LLAMA_KEYS, "activation": ("hidden_activation", "hidden_act")}
GEMMA2_KEYS = {
    **GEMMA_KEYS, "attention_logit_softcapping": ("attn_logit_softcapping",),
    "final_logit_softcapping": ("final_logit_softcapping",),
}  # fmt: skip
MIXTRAL_KEYS = {
    **LLAMA_KEYS, "n_expert": ("num_local_experts",), "n_expert_per_token": ("num_experts_per_tok",),
}  # fmt: skip
NEOX_KEYS = {
    **{k: v for k, v in LLAMA_KEYS.items() if k not in ("n_query_groups", "head_size")},
    "norm_eps": ("layer_norm_eps",), "parallel_residual": ("use_parallel_residual",),
}  # fmt: skip
PHI_KEYS = {k: v for k, v in LLAMA_KEYS.items() if k != "head_size"} | {
    "norm_eps": ("layer_norm_eps",)
}
GPT2_KEYS = {
    "n_embd": ("n_embd",), "n_layer": ("n_layer",), "n_head": ("n_head",),
    "intermediate_size": ("n_inner",), "block_size": ("n_positions",),
    "norm_eps": ("layer_norm_epsilon",), "activation": ("activation_function",),
    "tie_embeddings": ("tie_word_embeddings",),
}  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Where a family keeps each ``lab`` tensor: Hugging Face names of the decoder
    (under ``base``) and of one layer (under ``base + layers + ".{i}."``). Several
    names for one lab tensor are concatenated along the output dimension (lab fuses
    ``attn`` = [Q | K | V] and a gated ``fc_1`` = [gate | up]); an empty name means
    the family has no such tensor."""

    base: str = "model."
    embed: str = "embed_tokens"
    wpe: str = ""
    final_norm: str = "norm"
    layers: str = "layers"
    lm_head: str = "lm_head"
    norm_1: str = "input_layernorm"
    norm_2: str = "post_attention_layernorm"
    post_attention_norm: str = ""
    post_mlp_norm: str = ""
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    qkv_per_head: bool = False  # GPT-NeoX: fused rows ordered (head, q|k|v, head_size)
    proj: str = "self_attn.o_proj"
    norm_q: str = "self_attn.q_norm"
    norm_k: str = "self_attn.k_norm"
    fc_1: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    fc_2: str = "mlp.down_proj"
    # Mixture of experts: the router, and expert e's projections under "{experts}.{e}."
    router: str = "block_sparse_moe.gate"
    experts: str = "block_sparse_moe.experts"
    expert_fc_1: tuple[str, ...] = ("w1", "w3")  # gate, up
    expert_fc_2: str = "w2"
    transposed: bool = False  # GPT-2's Conv1D stores linear weights as (in, out)


@dataclass(frozen=True)
class Family:
    """One Hugging Face ``model_type``.

    ``fields`` are the lab values the architecture implies and ``defaults`` the values
    of keys a ``config.json`` may leave out; together (``base``) they are the family's
    typical config, which named architectures start from. ``requires`` lists keys whose
    other values lab does not implement (a checkpoint setting them is refused; a saved
    ``config.json`` states them). ``read`` and ``write`` convert the keys only this
    family has (``read(config_json, values)`` fills lab values in place;
    ``write(config, config_json)`` adds keys).
    """

    architecture: str
    keys: dict[str, tuple[str, ...]] = field(default_factory=lambda: LLAMA_KEYS)
    fields: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    layout: Layout = Layout()
    rope: str = "full"  # "full" | "partial" (partial_rotary_factor) | "neox" | "none"
    # Sliding windows: "" (none), "all" (every layer), "layer_types" (as config.json's
    # layer_types says, else `sliding_layers`), "qwen" (use_sliding_window, and layers
    # from max_window_layers on)
    windows: str = ""
    sliding_layers: Callable[[int], list[bool]] | None = None
    biases: bool = False  # bias = attention_bias, which must equal mlp_bias (Llama)
    requires: dict[str, Any] = field(default_factory=dict)
    read: Callable[[dict[str, Any], dict[str, Any]], None] | None = None
    write: Callable[[Any, dict[str, Any]], None] | None = None

    @property
    def base(self) -> dict[str, Any]:
        """The family's typical ``Config`` values (a fresh dict)."""
        return {**self.fields, **self.defaults}


def sliding_window_fields(window: int, sliding: Sequence[bool]) -> dict[str, Any]:
    """Config values for layers that attend over the last ``window`` tokens where
    ``sliding[i]`` is true and to everything before them elsewhere."""
    if not any(sliding):
        return {"sliding_window_size": None}
    full = {i: {"sliding_window_size": None} for i, slides in enumerate(sliding) if not slides}
    return {"sliding_window_size": int(window), "layer_overrides": full}


def alternating(n_layer: int) -> list[bool]:
    """Gemma 2: local (sliding) attention on even layers, global on odd ones."""
    return [i % 2 == 0 for i in range(n_layer)]


def _read_gemma2(config_json: dict[str, Any], values: dict[str, Any]) -> None:
    values["attention_scale"] = config_json.get("query_pre_attn_scalar", 256) ** -0.5


def _write_gemma2(config: Any, config_json: dict[str, Any]) -> None:
    scalar = (config.attention_scale or config.head_size**-0.5) ** -2
    # transformers wants an int (Gemma 2's are 256 and 144)
    config_json["query_pre_attn_scalar"] = (
        round(scalar) if math.isclose(scalar, round(scalar)) else scalar
    )


def _write_mixtral(config: Any, config_json: dict[str, Any]) -> None:
    config_json["intermediate_size"] = config.moe_intermediate_size or config.intermediate_size


LLAMA_FIELDS = dict(positional="rope", norm_class_name="RMSNorm", mlp_class_name="GatedMLP")
LLAMA_DEFAULTS = dict(
    rope_base=10000.0, rotary_percentage=1.0, norm_eps=1e-6, activation="silu", bias=False
)
GEMMA_FIELDS = dict(LLAMA_FIELDS, norm_unit_offset=True, scale_embeddings=True)
GEMMA_DEFAULTS = dict(LLAMA_DEFAULTS, activation="gelu_tanh", tie_embeddings=True)
LAYERNORM_FIELDS = dict(norm_class_name="LayerNorm", mlp_class_name="MLP", bias=True)

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", fields=LLAMA_FIELDS, defaults=LLAMA_DEFAULTS, biases=True),
    "mistral": Family(
        "MistralForCausalLM", fields=LLAMA_FIELDS, defaults=LLAMA_DEFAULTS, windows="all"
    ),
    "mixtral": Family(
        "MixtralForCausalLM", MIXTRAL_KEYS, dict(LLAMA_FIELDS, mlp_class_name="MoE", router="topk_softmax"),
        dict(LLAMA_DEFAULTS, rope_base=1e6, n_expert=8, n_expert_per_token=2), windows="all",
        write=_write_mixtral,
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM", fields=dict(LLAMA_FIELDS, attn_bias=True, bias=False),
        defaults=LLAMA_DEFAULTS, windows="qwen",
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM", fields=dict(LLAMA_FIELDS, norm_qk=True, bias=False),
        defaults=LLAMA_DEFAULTS, windows="qwen", requires={"attention_bias": False},
    ),
    "gemma": Family("GemmaForCausalLM", GEMMA_KEYS, GEMMA_FIELDS, GEMMA_DEFAULTS),
    "gemma2": Family(
        "Gemma2ForCausalLM", GEMMA2_KEYS,
        dict(GEMMA_FIELDS, post_attention_norm=True, post_mlp_norm=True),
        GEMMA_DEFAULTS,
        Layout(
            norm_2="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
            post_mlp_norm="post_feedforward_layernorm",
        ),
        windows="layer_types", sliding_layers=alternating, read=_read_gemma2, write=_write_gemma2,
    ),
    "phi3": Family(
        "Phi3ForCausalLM", fields=LLAMA_FIELDS, defaults=LLAMA_DEFAULTS, rope="partial",
        windows="all", layout=Layout(qkv=("self_attn.qkv_proj",), fc_1=("mlp.gate_up_proj",)),
    ),
    "phi": Family(
        "PhiForCausalLM", PHI_KEYS,
        dict(
            LAYERNORM_FIELDS, positional="rope", parallel_residual=True,
            shared_attention_norm=True, lm_head_bias=True,
        ),
        dict(activation="gelu_tanh", rotary_percentage=0.5),
        Layout(
            final_norm="final_layernorm", norm_2="", proj="self_attn.dense",
            fc_1=("mlp.fc1",), fc_2="mlp.fc2",
        ),
        rope="partial", requires={"qk_layernorm": False},
    ),
    "gpt_neox": Family(
        "GPTNeoXForCausalLM", NEOX_KEYS, dict(LAYERNORM_FIELDS, positional="rope"),
        dict(activation="gelu", rotary_percentage=0.25, parallel_residual=True),
        Layout(
            base="gpt_neox.", embed="embed_in", final_norm="final_layer_norm",
            lm_head="embed_out", qkv=("attention.query_key_value",), qkv_per_head=True,
            proj="attention.dense", fc_1=("mlp.dense_h_to_4h",), fc_2="mlp.dense_4h_to_h",
        ),
        rope="neox", requires={"attention_bias": True},
    ),
    "gpt2": Family(
        "GPT2LMHeadModel", GPT2_KEYS, dict(LAYERNORM_FIELDS, positional="learned"),
        dict(activation="gelu_tanh", tie_embeddings=True),
        Layout(
            base="transformer.", embed="wte", wpe="wpe", final_norm="ln_f", layers="h",
            norm_1="ln_1", norm_2="ln_2", qkv=("attn.c_attn",), proj="attn.c_proj",
            fc_1=("mlp.c_fc",), fc_2="mlp.c_proj", transposed=True,
        ),
        rope="none", requires={"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False},
    ),
}  # fmt: skip
