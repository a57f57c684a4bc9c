"""The model configuration: one dataclass that says what to build.

Every size and every component choice of a model lives here, as plain data, so a
config can be printed, saved as JSON, edited in a widget and compared.  Values that
follow from others (``head_size``, ``n_query_groups``, ...) may be left as ``None``
and are derived in ``__post_init__``; every invalid combination raises a
``ConfigError`` that names the field, the value and the fix, before any tensor is
allocated.

Subclass it to add your own fields (the guide's ``MyModelConfig``)::

    @dataclass
    class MyModelConfig(Config):
        custom_param: float = 0.1
"""

from __future__ import annotations

import dataclasses
import json
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
ROPE_SCALING_TYPES = ("linear", "ntk", "llama3", "yarn")
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
    # --- attention ----------------------------------------------------------------
    rope_base: float = 10000.0
    rotary_percentage: float = 1.0  # fraction of each head that is rotated
    rope_scaling: dict[str, Any] | None = None  # {"type": "llama3"|"linear"|"ntk"|"yarn", ...}
    sliding_window_size: int | None = None  # attend to at most this many past tokens
    norm_qk: bool = False  # RMSNorm on queries and keys per head (Qwen3, Gemma 3)
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
        self.layer_overrides = {int(k): dict(v) for k, v in self.layer_overrides.items()}
        self._check_values()
        self._layer_configs: dict[int, Config] = {}
        for i in self.layer_overrides:
            self.for_layer(i)  # validates every overridden layer up front

    def _check_sizes(self) -> None:
        for name in ("block_size", "vocab_size", "padding_multiple", "n_layer", "n_embd", "n_head"):
            _require_positive_int(name, getattr(self, name))
        for name in ("padded_vocab_size", "head_size", "n_query_groups", "intermediate_size"):
            if getattr(self, name) is not None:
                _require_positive_int(name, getattr(self, name))

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
            isinstance(self.rotary_percentage, (int, float)) and 0 < self.rotary_percentage <= 1,
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
            kind = self.rope_scaling.get("type")
            _require(
                kind in ROPE_SCALING_TYPES,
                "rope_scaling",
                f"rope_scaling type ({kind!r}) must be one of {list(ROPE_SCALING_TYPES)}",
            )
            factor = self.rope_scaling.get("factor", 1.0)
            _require(factor > 0, "rope_scaling", f"rope_scaling factor ({factor}) must be > 0")
        if self.sliding_window_size is not None:
            _require_positive_int("sliding_window_size", self.sliding_window_size)
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
            self.n_expert >= 0 and self.n_expert_per_token >= 0 and self.n_shared_expert >= 0,
            "n_expert",
            "n_expert, n_expert_per_token and n_shared_expert must be >= 0",
        )
        if self.moe_intermediate_size is not None:
            _require_positive_int("moe_intermediate_size", self.moe_intermediate_size)
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
        registry.activation.get(self.activation)
        for getter in ("attention_class", "mlp_class", "norm_class", "positional_class"):
            getattr(self, getter)  # resolving a name validates it
        self._check_mixer_values()

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
                _require_positive_int(name, getattr(self, name))
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
        from lab.configs import named_config

        return cls.from_dict({**named_config(name), **overrides})

    @staticmethod
    def available() -> list[str]:
        """Names ``from_name`` accepts."""
        from lab.configs import configs

        return sorted(configs)


def _per_layer_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init} - GLOBAL_FIELDS


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(message, field=field_name)


def _require_positive_int(name: str, value: Any) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        name,
        f"{name} ({value!r}) must be a positive integer",
    )
