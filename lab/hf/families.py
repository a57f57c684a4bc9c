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

from lab.errors import CheckpointError
from lab.positional import yarn_mscale

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
GPT_OSS_KEYS = {**MIXTRAL_KEYS, "moe_swiglu_limit": ("swiglu_limit",)}
DEEPSEEK_KEYS = {
    **{k: v for k, v in LLAMA_KEYS.items() if k != "head_size"},
    "n_expert": ("n_routed_experts",),
    "n_expert_per_token": ("num_experts_per_tok",),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "n_shared_expert": ("n_shared_experts",),
    "moe_n_group": ("n_group",),
    "moe_topk_group": ("topk_group",),
    "moe_routed_scaling": ("routed_scaling_factor",),
    "q_lora_rank": ("q_lora_rank",),
    "kv_lora_rank": ("kv_lora_rank",),
    "qk_nope_head_dim": ("qk_nope_head_dim",),
    "qk_rope_head_dim": ("qk_rope_head_dim",),
    "v_head_dim": ("v_head_dim",),
}
QWEN_MOE_KEYS = {
    **LLAMA_KEYS, "n_expert": ("num_experts", "num_local_experts"), "n_expert_per_token": ("num_experts_per_tok",),
    "moe_intermediate_size": ("moe_intermediate_size",),
}  # fmt: skip
QWEN3_NEXT_KEYS = {
    **QWEN_MOE_KEYS,
    "linear_num_key_heads": ("linear_num_key_heads",),
    "linear_num_value_heads": ("linear_num_value_heads",),
    "linear_key_head_dim": ("linear_key_head_dim",),
    "linear_value_head_dim": ("linear_value_head_dim",),
    "linear_conv_kernel_size": ("linear_conv_kernel_dim",),
}
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
    # The stacked experts as transformers >= 5 holds them in memory, (E, 2I, C) [gate | up]
    # and (E, C, I); read where a file has them instead of per-expert tensors. GPT-OSS's
    # files hold only these, as (E, C, 2I) with gate and up interleaved, and (E, I, C).
    fused_experts: tuple[str, str] = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    experts_interleaved: bool = False
    expert_bias: str = "mlp.gate.e_score_correction_bias"  # DeepSeek-V3's selection bias
    shared_experts: str = "mlp.shared_experts"  # named like the dense MLP's fc_1 and fc_2
    shared_gate: str = "mlp.shared_expert_gate"
    sinks: str = "self_attn.sinks"  # GPT-OSS
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
    # "full" | "partial" (partial_rotary_factor) | "neox" | "none" | "layer_types" (full
    # RoPE with rope_parameters per layer type, Gemma 3: see ``_rope_from_hf``)
    rope: str = "full"
    # Sliding windows: "" (none), "all" (every layer), "layer_types" (as config.json's
    # layer_types says, else `sliding_layers(config_json, n_layer)`), "qwen"
    # (use_sliding_window, and layers from max_window_layers on)
    windows: str = ""
    sliding_layers: Callable[[dict[str, Any], int], list[bool]] | None = None
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


def every_nth_global(n_layer: int, n: int) -> list[bool]:
    """Gemma 3 (``sliding_window_pattern`` = 6): ``n - 1`` local layers, then a global one."""
    return [(i + 1) % n != 0 for i in range(n_layer)]


def set_per_layer(values: dict[str, Any], name: str, per_layer: Sequence[Any]) -> None:
    """Set field ``name`` to ``per_layer[i]`` on each layer ``i`` of the config ``values``:
    the most common value (the first layer's on a tie) for the whole model, the others
    as ``layer_overrides``."""
    distinct: list[Any] = []
    for value in per_layer:
        if value not in distinct:
            distinct.append(value)
    common = max(distinct, key=lambda value: sum(v == value for v in per_layer))
    values[name] = common
    overrides = values.setdefault("layer_overrides", {})
    for i, value in enumerate(per_layer):
        if value != common:
            overrides.setdefault(i, {})[name] = value


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


def _layers(config: Any, name: str) -> list[Any]:
    return [getattr(config.for_layer(i), name) for i in range(config.n_layer)]


# Qwen-style MoE routers: softmax, top k, renormalised over the k (norm_topk_prob) or not.
_QWEN_ROUTERS = {True: "topk_softmax", False: "softmax_topk"}


def _read_qwen_moe(config_json: dict[str, Any], values: dict[str, Any]) -> None:
    """Qwen2/3-MoE: a layer is sparse unless listed in ``mlp_only_layers``, and only every
    ``decoder_sparse_step``-th layer is; the router renormalises if ``norm_topk_prob``."""
    values["router"] = _QWEN_ROUTERS[bool(config_json.get("norm_topk_prob", False))]
    dense = set(config_json.get("mlp_only_layers") or ())
    step = config_json.get("decoder_sparse_step") or 1
    sparse = [
        i not in dense and values["n_expert"] > 0 and (i + 1) % step == 0
        for i in range(values["n_layer"])
    ]
    set_per_layer(values, "mlp_class_name", ["MoE" if s else "GatedMLP" for s in sparse])


def _write_qwen_moe(config: Any, config_json: dict[str, Any]) -> None:
    config_json["moe_intermediate_size"] = config.moe_intermediate_size or config.intermediate_size
    mlps = _layers(config, "mlp_class_name")
    config_json["mlp_only_layers"] = [i for i, mlp in enumerate(mlps) if mlp != "MoE"]
    config_json["decoder_sparse_step"] = 1
    routers = {r for r, mlp in zip(_layers(config, "router"), mlps, strict=True) if mlp == "MoE"}
    config_json["norm_topk_prob"] = routers != {"softmax_topk"}  # another one: not read back


def mla_attention_scale(qk_head_dim: int, rope_scaling: dict[str, Any] | None) -> float:
    """DeepSeek's softmax scale: ``1/sqrt(qk_head_dim)``, and with YaRN times
    ``yarn_mscale(factor, mscale_all_dim)^2`` (the longer context's sharper softmax)."""
    scaling = rope_scaling or {}
    scale = qk_head_dim**-0.5
    if scaling.get("type") == "yarn" and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale


def _read_deepseek_v3(config_json: dict[str, Any], values: dict[str, Any]) -> None:
    """DeepSeek-V3: the first ``first_k_dense_replace`` layers are dense; with YaRN the
    softmax scale of MLA grows by ``mscale(factor, mscale_all_dim)^2``."""
    if "q_lora_rank" in config_json:  # null: one plain query projection (DeepSeek-V2-Lite)
        values["q_lora_rank"] = config_json["q_lora_rank"]
    dense = config_json.get("first_k_dense_replace") or 0
    mlps = ["GatedMLP" if i < dense else "MoE" for i in range(values["n_layer"])]
    set_per_layer(values, "mlp_class_name", mlps)
    qk_head_dim = values["qk_nope_head_dim"] + values["qk_rope_head_dim"]
    values["attention_scale"] = mla_attention_scale(qk_head_dim, values.get("rope_scaling"))


def _write_deepseek_v3(config: Any, config_json: dict[str, Any]) -> None:
    mlps = _layers(config, "mlp_class_name")
    config_json["first_k_dense_replace"] = mlps.index("MoE") if "MoE" in mlps else len(mlps)


def _read_qwen3_next(config_json: dict[str, Any], values: dict[str, Any]) -> None:
    """Qwen3-Next: Qwen-MoE layers with a gated shared expert, and Gated DeltaNet on every
    layer that ``layer_types`` calls ``linear_attention`` (3 of 4 by default)."""
    _read_qwen_moe(config_json, values)
    n_layer, interval = values["n_layer"], config_json.get("full_attention_interval") or 4
    types = config_json.get("layer_types") or [
        "linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layer)
    ]
    mixers = {"linear_attention": "GatedDeltaNet", "full_attention": "CausalSelfAttention"}
    unknown = sorted(set(types) - set(mixers))
    if unknown:
        raise CheckpointError(
            f"this qwen3_next config.json has layer_types {unknown}, which lab does not implement"
        )
    set_per_layer(values, "attention_class_name", [mixers[t] for t in types])
    shared = config_json.get("shared_expert_intermediate_size") or 0
    experts = values.get("moe_intermediate_size") or 1
    if shared % experts:
        raise CheckpointError(
            f"this qwen3_next config.json has shared_expert_intermediate_size={shared}, not a "
            f"multiple of moe_intermediate_size ({experts}); lab's shared experts are whole experts"
        )
    values["n_shared_expert"], values["shared_expert_gate"] = shared // experts, shared > 0


def _write_qwen3_next(config: Any, config_json: dict[str, Any]) -> None:
    _write_qwen_moe(config, config_json)
    kinds = {"GatedDeltaNet": "linear_attention", "CausalSelfAttention": "full_attention"}
    config_json["layer_types"] = [kinds.get(a, a) for a in _layers(config, "attention_class_name")]
    config_json["shared_expert_intermediate_size"] = config.n_shared_expert * (
        config.moe_intermediate_size or config.intermediate_size
    )
    sizes = config.deltanet_sizes()
    config_json.update(
        linear_num_key_heads=sizes["num_key_heads"],
        linear_num_value_heads=sizes["num_value_heads"],
        linear_key_head_dim=sizes["key_head_dim"],
        linear_value_head_dim=sizes["value_head_dim"],
        linear_conv_kernel_dim=sizes["conv_kernel_size"],
    )


def _gemma3_sliding(config_json: dict[str, Any], n_layer: int) -> list[bool]:
    return every_nth_global(n_layer, config_json.get("sliding_window_pattern", 6))


def _read_smollm3(config_json: dict[str, Any], values: dict[str, Any]) -> None:
    """SmolLM3's NoPE layers: ``no_rope_layers[i]`` is 1 where layer i rotates, 0 where it
    has no positions (by default every ``no_rope_layer_interval``-th layer)."""
    n_layer, interval = values["n_layer"], config_json.get("no_rope_layer_interval") or 4
    rope = config_json.get("no_rope_layers") or [(i + 1) % interval != 0 for i in range(n_layer)]
    if len(rope) != n_layer:
        raise CheckpointError(
            f"this smollm3 config.json lists {len(rope)} no_rope_layers for {n_layer} layers; "
            "give one entry (1 = RoPE, 0 = none) per layer"
        )
    set_per_layer(values, "positional", ["rope" if r else "none" for r in rope])


def _write_smollm3(config: Any, config_json: dict[str, Any]) -> None:
    config_json["no_rope_layers"] = [int(p == "rope") for p in _layers(config, "positional")]


LLAMA_FIELDS = dict(positional="rope", norm_class_name="RMSNorm", mlp_class_name="GatedMLP")
LLAMA_DEFAULTS = dict(
    rope_base=10000.0, rotary_percentage=1.0, norm_eps=1e-6, activation="silu", bias=False
)
NO_BIAS_DEFAULTS = {k: v for k, v in LLAMA_DEFAULTS.items() if k != "bias"}  # fields say
GEMMA_FIELDS = dict(LLAMA_FIELDS, norm_unit_offset=True, scale_embeddings=True)
GEMMA_DEFAULTS = dict(LLAMA_DEFAULTS, activation="gelu_tanh", tie_embeddings=True)
GEMMA2_LAYOUT = Layout(
    norm_2="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
    post_mlp_norm="post_feedforward_layernorm",
)  # fmt: skip
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
        GEMMA_DEFAULTS, GEMMA2_LAYOUT, windows="layer_types",
        sliding_layers=lambda config_json, n_layer: alternating(n_layer),
        read=_read_gemma2, write=_write_gemma2,
    ),
    # --- the families of 2025 -----------------------------------------------------------
    "qwen3_moe": Family(
        "Qwen3MoeForCausalLM", QWEN_MOE_KEYS,
        dict(LLAMA_FIELDS, norm_qk=True, bias=False, mlp_class_name="MoE"),
        dict(LLAMA_DEFAULTS, rope_base=1e6, router="topk_softmax"),
        Layout(router="mlp.gate", experts="mlp.experts", expert_fc_1=("gate_proj", "up_proj"),
               expert_fc_2="down_proj"),
        requires={"attention_bias": False, "use_sliding_window": False},
        read=_read_qwen_moe, write=_write_qwen_moe,
    ),
    "gemma3_text": Family(
        "Gemma3ForCausalLM", GEMMA2_KEYS,
        dict(GEMMA_FIELDS, post_attention_norm=True, post_mlp_norm=True, norm_qk=True),
        dict(GEMMA_DEFAULTS, rope_base=1e6), GEMMA2_LAYOUT, rope="layer_types",
        windows="layer_types", sliding_layers=_gemma3_sliding,
        requires={"attention_bias": False, "use_bidirectional_attention": False},
        read=_read_gemma2, write=_write_gemma2,
    ),
    "olmo2": Family(
        "Olmo2ForCausalLM",
        fields=dict(
            LLAMA_FIELDS, pre_norm=False, post_attention_norm=True, post_mlp_norm=True,
            norm_qk=True, norm_qk_per_head=False, bias=False,
        ),
        defaults=dict(LLAMA_DEFAULTS, norm_eps=1e-5),
        layout=Layout(norm_1="", norm_2="", post_attention_norm="post_attention_layernorm",
                      post_mlp_norm="post_feedforward_layernorm"),
        requires={"attention_bias": False},
    ),
    "gpt_oss": Family(
        "GptOssForCausalLM", GPT_OSS_KEYS,
        dict(
            LLAMA_FIELDS, mlp_class_name="MoE", router="topk_softmax", bias=True, moe_bias=True,
            attention_sinks=True,
        ),
        dict(NO_BIAS_DEFAULTS, rope_base=150000.0, norm_eps=1e-5, moe_swiglu_limit=7.0),
        Layout(router="mlp.router", experts="", experts_interleaved=True),
        windows="layer_types", sliding_layers=lambda config_json, n_layer: alternating(n_layer),
        requires={"attention_bias": True, "swiglu_alpha": 1.702}, write=_write_mixtral,
    ),
    "deepseek_v3": Family(
        "DeepseekV3ForCausalLM", DEEPSEEK_KEYS,
        dict(
            LLAMA_FIELDS, attention_class_name="MLA", mlp_class_name="MoE", router="sigmoid_bias",
            bias=False,
        ),
        dict(
            LLAMA_DEFAULTS, n_shared_expert=1, q_lora_rank=1536, kv_lora_rank=512,
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        ),
        Layout(
            router="mlp.gate", experts="mlp.experts", expert_fc_1=("gate_proj", "up_proj"),
            expert_fc_2="down_proj",
        ),
        requires={"attention_bias": False, "norm_topk_prob": True, "rope_interleave": True},
        read=_read_deepseek_v3, write=_write_deepseek_v3,
    ),
    "qwen3_next": Family(
        "Qwen3NextForCausalLM", QWEN3_NEXT_KEYS,
        dict(
            LLAMA_FIELDS, attention_class_name="GatedDeltaNet", norm_qk=True,
            norm_unit_offset=True, attention_gate="elementwise", mlp_class_name="MoE", bias=False,
        ),
        dict(LLAMA_DEFAULTS, rope_base=1e7, rotary_percentage=0.25, router="topk_softmax"),
        Layout(router="mlp.gate", experts="mlp.experts", expert_fc_1=("gate_proj", "up_proj"),
               expert_fc_2="down_proj", shared_experts="mlp.shared_expert"),
        rope="partial", requires={"attention_bias": False},
        read=_read_qwen3_next, write=_write_qwen3_next,
    ),
    "smollm3": Family(
        "SmolLM3ForCausalLM", fields=LLAMA_FIELDS,
        defaults=dict(LLAMA_DEFAULTS, rope_base=2e6, tie_embeddings=True), biases=True,
        requires={"use_sliding_window": False}, read=_read_smollm3, write=_write_smollm3,
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
