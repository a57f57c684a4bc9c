"""The model configuration: one dataclass that says what to build.

Every size and every component choice of a model lives here, as plain data, so a
config can be printed, saved as JSON, edited in a widget and compared.  Values that
follow from others (``head_size``, ``n_query_groups``, ...) may be left as ``None``
and are derived in ``__post_init__``.  Every field is checked against its annotation
(no None, string, float or bool where an int belongs), and every invalid value or
combination raises a ``ConfigError`` that names the field, the value and the fix,
before any tensor is allocated.

Subclass it to add your own fields (the guide's ``MyModelConfig``)::

    @dataclass
    class MyModelConfig(Config):
        custom_param: float = 0.1
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import registry
from lab.errors import ConfigError

# Fields that describe the whole model; the rest may differ per layer.
GLOBAL_FIELDS = frozenset(
    {
        "name", "block_size", "vocab_size", "padding_multiple", "padded_vocab_size",
        "n_layer", "n_embd", "tie_embeddings", "scale_embeddings", "lm_head_bias",
        "final_logit_softcapping", "layer_overrides",
    }
)  # fmt: skip
# Fields that ``__post_init__`` fills when left as None (see ``Config.replace``).
DERIVED_FIELDS = ("padded_vocab_size", "head_size", "n_query_groups", "intermediate_size")
# rope_scaling: per type, the keys it needs (as Hugging Face's rope validation asks) and
# the keys it may add; ``lab.positional.rope_frequencies`` reads them, defaulting the rest.
ROPE_SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "ntk": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"), ()),
    # truncate=False: GPT-OSS's ramp; mscale, mscale_all_dim: DeepSeek's attention factor
    "yarn": (
        ("factor",),
        (
            "original_max_seq_len",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "truncate",
            "mscale",
            "mscale_all_dim",
        ),
    ),
}
# What a dict-valued field looks like, for the error that rejects a value of another type.
EXAMPLES = {
    "rope_scaling": "{'type': 'linear', 'factor': 2.0}",
    "layer_overrides": "{0: {'mlp_class_name': 'GatedMLP'}}",
}
# Where a positional scheme acts (see lab.positional): the class attribute ``level``.
POSITIONAL_LEVELS = ("embedding", "attention", "none")
ROUTERS = ("topk_softmax", "softmax_topk", "sigmoid_bias", "expert_choice")
ATTENTION_GATES = ("elementwise", "headwise")  # one gate per output value, or per head


@dataclass
class Config:
    """Hyperparameters of a GPT-style decoder.

    The defaults describe a small LLaMA-style model (RMSNorm, gated SiLU MLP, full
    rotary embeddings, no biases); named configs (``Config.from_name``) carry the
    published values of real architectures.
    """

    name: str = ""
    # --- sizes -----------------------------------------------------------------
    block_size: int = 4096  # longest sequence the model is built for
    vocab_size: int = 32000  # tokens the tokenizer produces
    padding_multiple: int = 1  # embedding rows are rounded up to a multiple of this
    padded_vocab_size: int | None = None  # embedding rows = logits width (derived)
    n_layer: int = 16
    n_embd: int = 4096  # width of the residual stream
    n_head: int = 32  # query heads
    n_query_groups: int | None = None  # key/value heads: n_head = MHA, 1 = MQA (derived)
    head_size: int | None = None  # n_embd // n_head unless set (Gemma sets it)
    intermediate_size: int | None = None  # MLP hidden width, 4 * n_embd unless set
    # --- components, looked up in lab.registry ----------------------------------
    attention_class_name: str = "CausalSelfAttention"
    mlp_class_name: str = "GatedMLP"  # "MLP" | "GatedMLP" | "MoE" | registered
    norm_class_name: str = "RMSNorm"  # "RMSNorm" | "LayerNorm" | registered
    block_class_name: str = "Block"
    positional: str = "rope"  # "rope" | "alibi" | "sinusoidal" | "learned" | "none"
    activation: str = "silu"  # "gelu" | "gelu_tanh" | "silu" | "relu" | "relu2"
    # --- biases, norms, embeddings ----------------------------------------------
    bias: bool = False  # biases on every linear layer ...
    attn_bias: bool | None = None  # ... except the QKV projection, if set (Qwen2)
    lm_head_bias: bool = False
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight) (Gemma)
    tie_embeddings: bool = False  # lm_head shares the token embedding matrix
    scale_embeddings: bool = False  # multiply embeddings by sqrt(n_embd) (Gemma)
    # --- residual layout ----------------------------------------------------------
    parallel_residual: bool = False  # x + attn(norm(x)) + mlp(norm(x)) (GPT-NeoX, Phi)
    shared_attention_norm: bool = False  # parallel branches share norm_1 (Phi-2)
    post_attention_norm: bool = False  # norm the attention output (Gemma 2 "sandwich")
    post_mlp_norm: bool = False  # norm the MLP output (Gemma 2)
    pre_norm: bool = True  # norm each branch's input; False with the post norms: OLMo 2
    # --- attention ----------------------------------------------------------------
    rope_base: float = 10000.0
    rotary_percentage: float = 1.0  # fraction of each head that is rotated
    rope_scaling: dict[str, Any] | None = None  # {"type": "llama3"|"linear"|"ntk"|"yarn", ...}
    sliding_window_size: int | None = None  # attend to at most this many past tokens
    norm_qk: bool = False  # RMSNorm on queries and keys (Qwen3, Gemma 3, OLMo 2) ...
    norm_qk_per_head: bool = True  # ... per head, or False: over all heads at once (OLMo 2)
    attention_scale: float | None = None  # softmax scale; 1/sqrt(head_size) if None
    attention_logit_softcapping: float | None = None  # tanh cap on scores (Gemma 2)
    final_logit_softcapping: float | None = None  # tanh cap on logits (Gemma 2)
    # --- mixture of experts (mlp_class_name="MoE") ----------------------------------
    n_expert: int = 0
    n_expert_per_token: int = 0
    moe_intermediate_size: int | None = None  # expert hidden width; intermediate_size if None
    n_shared_expert: int = 0  # always-on experts (DeepSeekMoE)
    router: str = "topk_softmax"  # see ROUTERS; Mixtral routes top-k, then softmax
    moe_aux_loss_coef: float = 0.0  # Switch load-balancing loss weight
    moe_z_loss_coef: float = 0.0  # router z-loss weight
    moe_capacity_factor: float | None = None  # None: dropless
    moe_n_group: int = 1  # experts form this many groups ... (DeepSeek-V3)
    moe_topk_group: int = 1  # ... and a token routes within its best this-many groups
    moe_routed_scaling: float = 1.0  # routed experts' gates are scaled by this (DeepSeek-V3)
    moe_bias: bool = False  # router and experts have biases (GPT-OSS)
    moe_swiglu_limit: float | None = None  # GPT-OSS's clamped SwiGLU experts, clamped here
    shared_expert_gate: bool = False  # a sigmoid gate scales the shared experts (Qwen2/3-MoE)
    # --- attention variants and other token mixers (checked in _check_mixer_values) ----
    # Attention sinks (GPT-OSS) and output gates (Qwen3-Next) on CausalSelfAttention:
    attention_sinks: bool = False  # a learned per-head logit in the softmax denominator
    attention_gate: str | None = None  # see ATTENTION_GATES: sigmoid(x W) * attention output
    # Multi-head latent attention (attention_class_name="MLA", lab/mla.py); None = derived:
    q_lora_rank: int | None = None  # low-rank query; None: one plain query projection
    kv_lora_rank: int | None = None  # the cached latent; 4 * head_size if None
    qk_nope_head_dim: int | None = None  # query/key dims without RoPE; head_size if None
    qk_rope_head_dim: int | None = None  # rotated dims, one key head shared; head_size // 2
    v_head_dim: int | None = None  # value head size; head_size if None
    # Gated DeltaNet (attention_class_name="GatedDeltaNet", lab/deltanet.py):
    linear_num_key_heads: int | None = None  # query/key heads; n_head if None
    linear_num_value_heads: int | None = None  # value heads (a multiple); the key heads if None
    linear_key_head_dim: int | None = None  # head_size if None
    linear_value_head_dim: int | None = None  # head_size if None
    linear_conv_kernel_size: int = 4  # the short causal depthwise convolution
    # --- per-layer overrides ----------------------------------------------------------
    # {layer index: {field: value}}, e.g. {0: {"mlp_class_name": "GatedMLP"}} for a dense
    # first layer in an MoE model, or sliding windows on every other layer.
    layer_overrides: dict[int, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if isinstance(self.layer_overrides, dict):  # JSON writes layer indices as strings
            self.layer_overrides = {_layer_index(k): v for k, v in self.layer_overrides.items()}
        self._check_types()
        self._derived = {f for f in DERIVED_FIELDS if getattr(self, f) is None}
        self._check_sizes()
        if self.padded_vocab_size is None:
            multiple = self.padding_multiple
            self.padded_vocab_size = -(-self.vocab_size // multiple) * multiple
        if self.head_size is None:
            _require(
                self.n_embd % self.n_head == 0,
                "n_embd",
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                "change one of them or set head_size explicitly",
            )
            self.head_size = self.n_embd // self.n_head
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        self.layer_overrides = {i: dict(v) for i, v in self.layer_overrides.items()}
        self._check_values()
        self._layer_configs: dict[int, Config] = {}
        for i in self.layer_overrides:
            try:
                self.for_layer(i)  # validates every overridden layer up front
            except ConfigError as error:
                raise ConfigError(f"layer_overrides[{i}]: {error}", field=error.field) from None

    def _check_types(self) -> None:
        """Every field holds a value of its annotated type: no None, string, float or
        bool where an int belongs, only finite numbers in float fields. One check for
        all fields (a subclass's included), read from the dataclass annotations."""
        for name, expected in _field_types(type(self)).items():
            value = getattr(self, name)
            if not _has_type(value, expected):
                raise _type_error(name, value, expected)

    def _check_sizes(self) -> None:
        for name in ("block_size", "vocab_size", "padding_multiple", "n_layer", "n_embd", "n_head"):
            _require_positive(name, getattr(self, name))
        for name in ("padded_vocab_size", "head_size", "n_query_groups", "intermediate_size"):
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))

    def _check_values(self) -> None:
        _require(
            self.padded_vocab_size >= self.vocab_size,
            "padded_vocab_size",
            f"padded_vocab_size ({self.padded_vocab_size}) must be at least vocab_size "
            f"({self.vocab_size})",
        )
        self._check_layer_values()
        for name in self.layer_overrides:
            _require(
                0 <= name < self.n_layer,
                "layer_overrides",
                f"layer_overrides names layer {name}, but the model has layers "
                f"0..{self.n_layer - 1}",
            )
        for name, overrides in self.layer_overrides.items():
            bad = sorted(set(overrides) - _per_layer_fields(type(self)))
            _require(
                not bad,
                "layer_overrides",
                f"layer_overrides[{name}] sets {bad}, which cannot differ per layer; "
                f"per-layer fields are {sorted(_per_layer_fields(type(self)))}",
            )
        self.block_class  # noqa: B018 - resolving the name validates it
        for name in ("final_logit_softcapping",):
            value = getattr(self, name)
            _require(value is None or value > 0, name, f"{name} ({value}) must be > 0 or None")
        if self.positional_class.level == "embedding" and self.layer_overrides:
            for i, overrides in self.layer_overrides.items():
                _require(
                    "positional" not in overrides,
                    "layer_overrides",
                    f"layer_overrides[{i}] changes positional, but {self.positional!r} adds "
                    "positions to the embeddings, once for all layers",
                )

    def _check_layer_values(self) -> None:
        """Checks of the fields that may differ per layer (run for each layer)."""
        _require(
            self.n_head % self.n_query_groups == 0 and self.n_query_groups <= self.n_head,
            "n_query_groups",
            f"n_head ({self.n_head}) must be divisible by n_query_groups "
            f"({self.n_query_groups}); use a divisor of n_head (1 = MQA, n_head = MHA)",
        )
        _require(
            0 < self.rotary_percentage <= 1,
            "rotary_percentage",
            f"rotary_percentage ({self.rotary_percentage}) must be in (0, 1]",
        )
        if self.positional == "rope":
            _require(
                self.rope_n_elem >= 2 and self.rope_n_elem % 2 == 0,
                "rotary_percentage",
                f"rotary_percentage ({self.rotary_percentage}) of head_size ({self.head_size}) "
                f"rotates {self.rope_n_elem} dimensions; RoPE needs an even number >= 2",
            )
        _require(self.rope_base > 0, "rope_base", f"rope_base ({self.rope_base}) must be > 0")
        if self.rope_scaling is not None:
            self._check_rope_scaling()
        if self.sliding_window_size is not None:
            _require_positive("sliding_window_size", self.sliding_window_size)
        for name in ("attention_scale", "attention_logit_softcapping"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, f"{name} ({value}) must be > 0 or None")
        _require(self.norm_eps > 0, "norm_eps", f"norm_eps ({self.norm_eps}) must be > 0")
        _require(
            not self.shared_attention_norm or self.parallel_residual,
            "shared_attention_norm",
            "shared_attention_norm=True needs parallel_residual=True (only parallel "
            "branches can share a norm)",
        )
        if self.mlp_class_name == "MoE":
            _require(
                self.n_expert >= 1,
                "n_expert",
                f"n_expert ({self.n_expert}) must be >= 1 for mlp_class_name='MoE'",
            )
            _require(
                1 <= self.n_expert_per_token <= self.n_expert,
                "n_expert_per_token",
                f"n_expert_per_token ({self.n_expert_per_token}) must be between 1 and "
                f"n_expert ({self.n_expert})",
            )
            _require(
                not self.bias or self.moe_bias,
                "bias",
                "bias=True puts biases on every linear layer, but these MoE experts have none; "
                "set moe_bias=True too (GPT-OSS's experts and router have biases), or "
                "bias=False with attn_bias=True for biases on the QKV projection alone",
            )
        for name in ("n_expert", "n_expert_per_token", "n_shared_expert"):
            value = getattr(self, name)
            _require(value >= 0, name, f"{name} ({value}) must be >= 0")
        if self.moe_intermediate_size is not None:
            _require_positive("moe_intermediate_size", self.moe_intermediate_size)
        _require(
            self.router in ROUTERS,
            "router",
            f"router ({self.router!r}) must be one of {list(ROUTERS)}",
        )
        _require(
            self.moe_capacity_factor is None or self.moe_capacity_factor > 0,
            "moe_capacity_factor",
            f"moe_capacity_factor ({self.moe_capacity_factor}) must be > 0 or None (dropless)",
        )
        for name in ("moe_aux_loss_coef", "moe_z_loss_coef"):
            value = getattr(self, name)
            _require(value >= 0, name, f"{name} ({value}) must be >= 0 (0 turns the loss off)")
        self._check_expert_groups()
        registry.activation.get(self.activation)
        for getter in ("attention_class", "mlp_class", "norm_class", "positional_class"):
            getattr(self, getter)  # resolving a name validates it
        level = getattr(self.positional_class, "level", None)
        _require(
            level in POSITIONAL_LEVELS,
            "positional",
            f"the positional class registered as {self.positional!r} has level {level!r}; "
            f"give it a class attribute level, one of {list(POSITIONAL_LEVELS)}",
        )
        norm_options = {"unit_offset": True} if self.norm_unit_offset else {}
        _require(
            _accepts(self.norm_class, 1, eps=self.norm_eps, **norm_options),
            "norm_unit_offset" if norm_options else "norm_class_name",
            f"{self.norm_class_name} cannot be built as "
            f"{self.norm_class_name}(size, eps=norm_eps{', unit_offset=True' * bool(norm_options)}); "
            + (
                "set norm_unit_offset=False or use a norm that takes unit_offset (RMSNorm)"
                if norm_options
                else "register a norm class that takes (size, eps=...)"
            ),
        )
        self._check_mixer_values()

    def _check_rope_scaling(self) -> None:
        """``rope_scaling`` has a known type, the keys that type needs (and no others),
        and values that give finite frequencies."""
        scaling = self.rope_scaling
        kind = scaling.get("type")
        spelled_hf = (
            " (lab spells the key 'type', not 'rope_type')" if "rope_type" in scaling else ""
        )
        _require(
            kind in ROPE_SCALING_KEYS,
            "rope_scaling",
            f"rope_scaling type ({kind!r}) must be one of {list(ROPE_SCALING_KEYS)}{spelled_hf}",
        )
        required, optional = ROPE_SCALING_KEYS[kind]
        missing = [key for key in required if key not in scaling]
        _require(
            not missing,
            "rope_scaling",
            f"rope_scaling type {kind!r} needs the keys {list(required)}; {missing} missing",
        )
        unknown = sorted(set(scaling) - {"type", *required, *optional})
        _require(
            not unknown,
            "rope_scaling",
            f"rope_scaling type {kind!r} does not take {unknown}; its keys are "
            f"{list(required + optional)}",
        )
        for key, value in scaling.items():
            if key == "type" or (key == "attention_factor" and value is None):
                continue
            if key == "truncate":
                _require(
                    isinstance(value, bool),
                    "rope_scaling",
                    f"rope_scaling['truncate'] ({value!r}) must be True or False",
                )
                continue
            kind_of_value = int if key == "original_max_seq_len" else float
            _require(
                _has_type(value, kind_of_value) and value > 0,
                "rope_scaling",
                f"rope_scaling[{key!r}] ({value!r}) must be a positive "
                + ("integer" if kind_of_value is int else "number"),
            )
        if kind == "llama3":
            _require(
                scaling["high_freq_factor"] > scaling["low_freq_factor"],
                "rope_scaling",
                f"rope_scaling high_freq_factor ({scaling['high_freq_factor']}) must be greater "
                f"than low_freq_factor ({scaling['low_freq_factor']})",
            )
        if self.positional == "rope" and kind == "yarn":
            _require(
                self.rope_base != 1,
                "rope_base",
                "yarn rope_scaling divides by log(rope_base), so rope_base must not be 1",
            )
        if self.positional == "rope" and kind == "ntk":
            _require(
                self.rope_n_elem > 2,
                "rope_scaling",
                f"NTK rope_scaling needs at least 4 rotated dimensions, but rotary_percentage "
                f"({self.rotary_percentage}) of head_size ({self.head_size}) rotates "
                f"{self.rope_n_elem}; raise rotary_percentage or use type 'linear'",
            )

    def _check_expert_groups(self) -> None:
        """Group-limited routing, routed scaling and GPT-OSS's clamp (MoE variants)."""
        _require_positive("moe_n_group", self.moe_n_group)
        _require_positive("moe_topk_group", self.moe_topk_group)
        _require(
            self.moe_topk_group <= self.moe_n_group,
            "moe_topk_group",
            f"moe_topk_group ({self.moe_topk_group}) must be at most moe_n_group "
            f"({self.moe_n_group})",
        )
        if self.moe_n_group > 1 and self.mlp_class_name == "MoE":
            per_group = self.n_expert // self.moe_n_group
            _require(
                self.n_expert % self.moe_n_group == 0 and per_group >= 2,
                "moe_n_group",
                f"moe_n_group ({self.moe_n_group}) must divide n_expert ({self.n_expert}) into "
                "groups of at least 2 experts (a group is scored by its two best experts)",
            )
            _require(
                self.router == "sigmoid_bias",
                "moe_n_group",
                f"group-limited routing (moe_n_group={self.moe_n_group}) is DeepSeek-V3's, "
                f"for router='sigmoid_bias'; router is {self.router!r}",
            )
            _require(
                self.n_expert_per_token <= self.moe_topk_group * per_group,
                "moe_topk_group",
                f"n_expert_per_token ({self.n_expert_per_token}) experts cannot be found in "
                f"moe_topk_group ({self.moe_topk_group}) groups of {per_group}; raise "
                "moe_topk_group",
            )
        _require(
            self.moe_routed_scaling > 0,
            "moe_routed_scaling",
            f"moe_routed_scaling ({self.moe_routed_scaling}) must be > 0",
        )
        _require(
            self.moe_swiglu_limit is None or self.moe_swiglu_limit > 0,
            "moe_swiglu_limit",
            f"moe_swiglu_limit ({self.moe_swiglu_limit}) must be > 0 or None",
        )
        _require(
            not self.shared_expert_gate or self.n_shared_expert > 0,
            "shared_expert_gate",
            "shared_expert_gate=True gates the shared experts, but n_shared_expert is 0",
        )

    def _check_mixer_values(self) -> None:
        """Checks of the attention-variant and mixer fields (per layer)."""
        _require(
            self.attention_gate is None or self.attention_gate in ATTENTION_GATES,
            "attention_gate",
            f"attention_gate ({self.attention_gate!r}) must be None or one of "
            f"{list(ATTENTION_GATES)}",
        )
        for name in (
            "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
            "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
            "linear_value_head_dim", "linear_conv_kernel_size",
        ):  # fmt: skip
            if getattr(self, name) is not None:
                _require_positive(name, getattr(self, name))
        if self.attention_class_name == "MLA":
            _require(
                self.positional in ("rope", "none"),
                "positional",
                f"MLA rotates its decoupled RoPE part or nothing; positional "
                f"({self.positional!r}) must be 'rope' or 'none'",
            )
            _require(
                not self.norm_qk,
                "norm_qk",
                "MLA normalises its query and key-value latents (q_a_norm, kv_a_norm); "
                "set norm_qk=False",
            )
            rope = self.mla_sizes()["qk_rope_head_dim"]
            _require(
                self.positional != "rope" or (rope >= 2 and rope % 2 == 0),
                "qk_rope_head_dim",
                f"qk_rope_head_dim ({rope}) must be even and >= 2 for RoPE; set it explicitly",
            )
        if self.attention_class_name == "GatedDeltaNet":
            sizes = self.deltanet_sizes()
            keys, values = sizes["num_key_heads"], sizes["num_value_heads"]
            _require(
                values % keys == 0,
                "linear_num_value_heads",
                f"linear_num_value_heads ({values}) must be a multiple of linear_num_key_heads "
                f"({keys}): each key head serves a group of value heads",
            )

    def mla_sizes(self) -> dict[str, int | None]:
        """Multi-head latent attention's sizes, the ``None`` fields derived."""
        return dict(
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank or 4 * self.head_size,
            qk_nope_head_dim=self.qk_nope_head_dim or self.head_size,
            qk_rope_head_dim=self.qk_rope_head_dim or self.head_size // 2,
            v_head_dim=self.v_head_dim or self.head_size,
        )

    def deltanet_sizes(self) -> dict[str, int]:
        """Gated DeltaNet's sizes, the ``None`` fields derived."""
        keys = self.linear_num_key_heads or self.n_head
        return dict(
            num_key_heads=keys,
            num_value_heads=self.linear_num_value_heads or keys,
            key_head_dim=self.linear_key_head_dim or self.head_size,
            value_head_dim=self.linear_value_head_dim or self.head_size,
            conv_kernel_size=self.linear_conv_kernel_size,
        )

    # --- derived values and components -------------------------------------------------
    @property
    def rope_n_elem(self) -> int:
        """Dimensions of each head that RoPE rotates."""
        return int(self.rotary_percentage * self.head_size)

    @property
    def attention_class(self) -> type:
        return registry.attention.get(self.attention_class_name)

    @property
    def mlp_class(self) -> type:
        return registry.mlp.get(self.mlp_class_name)

    @property
    def norm_class(self) -> type:
        return registry.norm.get(self.norm_class_name)

    @property
    def block_class(self) -> type:
        return registry.block.get(self.block_class_name)

    @property
    def positional_class(self) -> type:
        return registry.positional.get(self.positional)

    def for_layer(self, block_idx: int) -> Config:
        """This config as layer ``block_idx`` sees it (its overrides applied)."""
        overrides = self.layer_overrides.get(block_idx)
        if not overrides:
            return self
        if block_idx not in self._layer_configs:
            self._layer_configs[block_idx] = self.replace(layer_overrides={}, **overrides)
        return self._layer_configs[block_idx]

    # --- copying, naming, saving ---------------------------------------------------------
    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes``; values that were derived are derived afresh, so
        ``config.replace(n_embd=512)`` also recomputes ``head_size``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        values.update({name: None for name in self._derived})
        values.update(changes)
        return type(self)(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Config:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> Config:
        """A named architecture (``"Llama-3.2-1B"``), optionally changed by ``overrides``."""
        return cls.from_dict({**registry.named_config(name), **overrides})

    @staticmethod
    def available() -> list[str]:
        """Names ``from_name`` accepts."""
        return sorted(registry.named_configs)


def _per_layer_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init} - GLOBAL_FIELDS


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The annotated type of each field of ``cls``. A subclass whose annotations name
    types that cannot be resolved gets its inherited fields checked, not its own."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name in hints}


def _has_type(value: Any, expected: Any) -> bool:
    """Whether ``value`` fits the annotation ``expected``. bool is not an int here, an
    int is a float (PEP 484), every int fits torch's int64, and annotations it does not
    know accept anything."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if expected is Any:
        return True
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool) and _is_int64(value)
    if expected is float:
        if isinstance(value, int) and not isinstance(value, bool):
            return _is_int64(value)
        return isinstance(value, float) and math.isfinite(value)
    if origin is dict and args:
        return isinstance(value, dict) and all(
            _has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items()
        )
    if origin is typing.Literal:
        return value in args
    cls = origin or expected
    return isinstance(value, cls) if isinstance(cls, type) else True


def _type_error(name: str, value: Any, expected: Any) -> ConfigError:
    """The error for a value of the wrong type, with the fix where one is plain, e.g.
    ``norm_eps ('1e-5') must be a finite number; write it without quotes``."""
    hint = f", e.g. {name}={EXAMPLES[name]}" if name in EXAMPLES else ""
    if isinstance(value, int) and not _is_int64(value):
        hint = "; it must fit in 64 bits (torch's int64)"
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            if _has_type(json.loads(value), expected):
                hint = "; write it without quotes"
    return ConfigError(f"{name} ({value!r}) must be {_describe(expected)}{hint}", field=name)


def _is_int64(value: int) -> bool:
    return -(2**63) <= value < 2**63


def _describe(expected: Any) -> str:
    """``int | None`` -> "an integer or None", ``dict[str, Any]`` -> "a dict from a string
    to anything", for error messages."""
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(expected))
    names = {int: "an integer", float: "a finite number", bool: "True or False", str: "a string"}
    if expected in names:
        return names[expected]
    if expected is type(None):
        return "None"
    if expected is Any:
        return "anything"
    if typing.get_origin(expected) is dict and typing.get_args(expected):
        key, value = typing.get_args(expected)
        return f"a dict from {_describe(key)} to {_describe(value)}"
    return f"a {getattr(expected, '__name__', expected)}"


def _layer_index(key: Any) -> Any:
    """A layer index from ``layer_overrides``: JSON object keys are strings ("0")."""
    return int(key) if isinstance(key, str) and key.isdecimal() else key


def _accepts(cls: type, *args: Any, **kwargs: Any) -> bool:
    """Whether ``cls(*args, **kwargs)`` matches its signature (without calling it)."""
    try:
        inspect.signature(cls).bind(*args, **kwargs)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): assume it fits
        return True
    return True


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(message, field=field_name)


def _require_positive(name: str, value: int) -> None:
    _require(value > 0, name, f"{name} ({value!r}) must be a positive integer")
