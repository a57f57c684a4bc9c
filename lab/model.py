"""A GPT-style decoder in one file: read it top to bottom.

    idx (B, T) --wte--> x (B, T, C) --[Block] x n_layer--> ln_f --lm_head--> logits (B, T, V)

    Block (sequential residual, LLaMA):     Block (parallel residual, GPT-NeoX):
        x = x + attn(norm_1(x))                 x = x + attn(norm_1(x)) + mlp(norm_2(x))
        x = x + mlp(norm_2(x))

Every component is looked up by name in ``lab.registry`` (``config.mlp_class`` etc.),
so a registered class replaces it, for the whole model or per layer
(``config.layer_overrides``). Shapes use B batch, T new tokens, S keys (T plus the
cached past), C ``n_embd``, nh ``n_head``, ng ``n_query_groups``, hs ``head_size``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from lab import checkpoint, registry
from lab.config import Config

# --- activations, norms ---------------------------------------------------------------


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al., 2021, "Primer")."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


registry.activation.register("gelu", nn.GELU)
registry.activation.register("gelu_tanh", partial(nn.GELU, approximate="tanh"))
registry.activation.register("silu", nn.SiLU)
registry.activation.register("relu", nn.ReLU)
registry.activation.register("relu2", ReLUSquared)


@registry.norm.register("RMSNorm")
class RMSNorm(nn.Module):
    """``x / rms(x) * weight`` (Zhang and Sennrich, 2019), computed in fp32 (fp64 stays
    fp64). ``unit_offset`` scales by ``1 + weight`` instead (Gemma stores weights that way)."""

    def __init__(self, size: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size) if unit_offset else torch.ones(size))
        self.eps = eps
        self.unit_offset = unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(dtype) + 1 if self.unit_offset else self.weight.to(dtype)
        return F.rms_norm(x.to(dtype), weight.shape, weight, self.eps).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 0.0 if self.unit_offset else 1.0)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}, unit_offset={self.unit_offset}"


LayerNorm = nn.LayerNorm
registry.norm.register("LayerNorm", LayerNorm)


def make_norm(config: Config, size: int | None = None) -> nn.Module:
    """The config's norm over ``size`` features (default ``n_embd``)."""
    kwargs = {"unit_offset": True} if config.norm_unit_offset else {}
    return config.norm_class(size or config.n_embd, eps=config.norm_eps, **kwargs)


# --- feed-forward -----------------------------------------------------------------------


@registry.mlp.register("MLP")
class MLP(nn.Module):
    """``fc_2(act(fc_1(x)))``: GPT-2, GPT-NeoX, Phi."""

    def __init__(self, config: Config, intermediate_size: int | None = None) -> None:
        super().__init__()
        hidden = intermediate_size or config.intermediate_size
        self.fc_1 = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = registry.activation.get(config.activation)()
        self.fc_2 = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_2(self.act(self.fc_1(x)))


@registry.mlp.register("GatedMLP")
class GatedMLP(nn.Module):
    """``fc_2(act(gate) * up)`` with ``gate, up = fc_1(x)`` (Shazeer, 2020): SwiGLU for
    LLaMA (silu), GeGLU for Gemma (gelu_tanh). Gate and up share one matmul."""

    def __init__(self, config: Config, intermediate_size: int | None = None) -> None:
        super().__init__()
        hidden = intermediate_size or config.intermediate_size
        self.fc_1 = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)  # [gate | up]
        self.act = registry.activation.get(config.activation)()
        self.fc_2 = nn.Linear(hidden, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc_1(x).chunk(2, dim=-1)
        return self.fc_2(self.act(gate) * up)


# --- attention ----------------------------------------------------------------------------


class KVCache(nn.Module):
    """Keys and values of past positions, preallocated as (B, ng, max_seq_length, hs).

    By default a step reads the keys up to its last position, so their number S
    grows step by step. ``static=True`` returns the whole buffer instead, so every
    step has the same shapes (what ``torch.compile`` needs, see
    ``lab.generate.decode_steps(compile=True)``); the caller's ``mask`` must then hide
    the positions not written yet (``key_pos <= input_pos``).
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_length: int,
        n_query_groups: int,
        head_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
        value_size: int | None = None,
    ) -> None:
        """``value_size``: the values' head size, if not ``head_size``."""
        super().__init__()
        shape = (batch_size, n_query_groups, max_seq_length, head_size)
        v_shape = (*shape[:3], value_size or head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer(
            "v", torch.zeros(v_shape, device=device, dtype=dtype), persistent=False
        )
        self.static = static

    def forward(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` (B, T, ng, hs) at ``input_pos``; return every key and value up
        to the last of them (the whole buffer if static), (B, S, ng, hs).
        ``input_pos`` must be consecutive."""
        B = k.size(0)
        if not torch.compiler.is_compiling():  # a compiled step's positions were checked
            end = int(input_pos[-1]) + 1
            if end > self.k.size(2) or self.k.size(0) < B:
                raise ValueError(
                    f"the KV cache holds {self.k.size(0)} sequences of {self.k.size(2)} "
                    f"positions; got {B} sequences up to position {end - 1}: call "
                    "set_kv_cache with more"
                )
        self.k[:B].index_copy_(2, input_pos, k.transpose(1, 2).to(self.k.dtype))
        self.v[:B].index_copy_(2, input_pos, v.transpose(1, 2).to(self.v.dtype))
        if self.static:
            return self.k[:B].transpose(1, 2), self.v[:B].transpose(1, 2)
        return self.k[:B, :, :end].transpose(1, 2), self.v[:B, :, :end].transpose(1, 2)


@registry.attention.register("CausalSelfAttention")
class CausalSelfAttention(nn.Module):
    """Multi-head attention with grouped keys and values.

    ``n_query_groups`` key/value heads are shared by ``n_head`` query heads:
    ``ng == nh`` is multi-head (MHA), ``ng == 1`` multi-query (MQA), anything between
    grouped-query attention (GQA)::

        queries  q0 q1 | q2 q3 | q4 q5 | q6 q7      nh = 8
        keys       k0  |   k1  |   k2  |   k3       ng = 4: two queries per key

    One fused projection ``attn`` computes ``[Q | K | V]``; ``forward`` reads as the
    steps a subclass may override one at a time. Two options act around the softmax:
    ``attention_sinks`` (GPT-OSS) adds a learned logit per head to its denominator, so
    a head may attend to "nothing"; ``attention_gate`` (Qwen3-Next) multiplies the
    output by ``sigmoid(gate(x))``, per value or per head.
    """

    def __init__(self, config: Config, block_idx: int = 0) -> None:
        super().__init__()
        config = config.for_layer(block_idx)
        self.config, self.block_idx = config, block_idx
        self.n_embd, self.n_head = config.n_embd, config.n_head
        self.n_query_groups, self.head_size = config.n_query_groups, config.head_size
        self.build_projections(config)
        positional = config.positional_class
        self.positional = positional(config) if positional.level == "attention" else None
        self.scale = config.attention_scale or 1.0 / math.sqrt(config.head_size)
        self.softcap = config.attention_logit_softcapping
        self.sliding_window_size = config.sliding_window_size
        self.sinks = nn.Parameter(torch.zeros(config.n_head)) if config.attention_sinks else None
        self.gate = None
        if config.attention_gate is not None:  # one gate per output value, or per head
            width = self.proj.in_features if config.attention_gate == "elementwise" else self.n_head
            self.gate = nn.Linear(config.n_embd, width, bias=self.attn_bias)
        self.kv_cache: KVCache | None = None

    def build_projections(self, config: Config) -> None:
        """The learned maps around the attention: ``attn`` (Q|K|V), the output ``proj``
        and the QK norms. A variant with other projections (``lab.mla``) replaces this."""
        self.qkv_sizes = (
            config.n_head * config.head_size,
            config.n_query_groups * config.head_size,
            config.n_query_groups * config.head_size,
        )
        self.attn = nn.Linear(config.n_embd, sum(self.qkv_sizes), bias=self.attn_bias)
        self.proj = nn.Linear(config.n_head * config.head_size, config.n_embd, bias=config.bias)
        if config.norm_qk:  # per head (Qwen3, Gemma 3), or over all heads at once (OLMo 2)
            q_size, k_size = (
                (config.head_size, config.head_size)
                if config.norm_qk_per_head
                else self.qkv_sizes[:2]
            )
            offset = config.norm_unit_offset
            self.norm_q = RMSNorm(q_size, eps=config.norm_eps, unit_offset=offset)
            self.norm_k = RMSNorm(k_size, eps=config.norm_eps, unit_offset=offset)

    @property
    def attn_bias(self) -> bool:
        """Whether the input projections have biases (``attn_bias``, else ``bias``)."""
        return self.config.bias if self.config.attn_bias is None else self.config.attn_bias

    def reset_parameters(self) -> None:
        """Sinks start at zero (the linear layers are reset by ``GPT._init_weights``)."""
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    # Set by ``lab.probe`` to see (and maybe replace) the scores and the pattern:
    # ``hook("scores" | "pattern", tensor) -> tensor``. None keeps the fused kernel.
    attention_hook: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def forward(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q, k = self.add_positions(q, k, input_pos)
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache(input_pos, k, v)
        y = self.scaled_dot_product_attention(q, k, v, mask=mask)  # (B, T, nh, hs)
        return self.proj(self.gated(x, y).reshape(B, T, -1))

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project and split: q (B, T, nh, hs), k and v (B, T, ng, hs)."""
        B, T, _ = x.shape
        q, k, v = self.attn(x).split(self.qkv_sizes, dim=-1)
        norm_whole = self.config.norm_qk and not self.config.norm_qk_per_head
        if norm_whole:
            q, k = self.norm_q(q), self.norm_k(k)
        q = q.view(B, T, self.n_head, self.head_size)
        k = k.view(B, T, self.n_query_groups, self.head_size)
        v = v.view(B, T, self.n_query_groups, self.head_size)
        if self.config.norm_qk and not norm_whole:
            q, k = self.norm_q(q), self.norm_k(k)
        return q, k, v

    def add_positions(
        self, q: torch.Tensor, k: torch.Tensor, input_pos: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply an attention-level positional scheme (RoPE rotates q and k)."""
        return (q, k) if self.positional is None else self.positional(q, k, input_pos)

    def gated(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attention output y (B, T, nh, hv) times ``sigmoid(gate(x))`` of the layer's
        input x (Qiu et al., 2025, as in Qwen3-Next); y itself without a gate."""
        if self.gate is None:
            return y
        return y * torch.sigmoid(self.gate(x)).view(*y.shape[:3], -1)

    def scaled_dot_product_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """softmax(q k^T * scale + bias) v, causal: the one place attention is computed.

        q (B, T, nh, hs); k, v (B, S, ng, hs) with S >= T, the T queries being the
        last T of the S positions; returns (B, T, nh, hs). ``mask`` (bool, True =
        may attend, broadcastable to (B, nh, T, S)) is combined with the causal mask,
        e.g. to hide padding. Uses PyTorch's fused kernel unless scores must be seen
        (soft-capping, or a probe's ``attention_hook``).
        """
        T, S = q.size(1), k.size(1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # heads first
        bias = self.attention_bias(T, S, q.device, q.dtype, mask)
        if self.softcap is None and self.attention_hook is None:
            if self.sinks is not None:
                q, k, v, bias = self.add_sink_key(q, k, v, bias)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, is_causal=bias is None and T > 1,
                scale=self.scale, enable_gqa=k.size(1) != q.size(1),
            )  # fmt: skip
        else:
            y = self.attention_weights(q, k, bias) @ _expand(v, self.n_head)
        return y.transpose(1, 2)

    def add_sink_key(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, ...]:
        """The sinks as one more key, seen by every query, whose value is zero: then the
        fused kernel adds ``exp(sink)`` to each softmax denominator. Its score must be
        the head's sink logit whatever the query, so queries and keys get one more
        dimension: ``sink / scale`` in every query of the head, 1 in the sink key, 0 in
        the others. q (B, nh, T, hs), k and v (B, ng, S, hs) -> S + 1 keys, sink first."""
        B, nh, T, _ = q.shape
        extra = (self.sinks / self.scale).to(q.dtype).view(1, nh, 1, 1).expand(B, nh, T, 1)
        q = torch.cat((q, extra), dim=-1)
        k = F.pad(k, (0, 1, 1, 0))  # (B, ng, 1 + S, hs + 1), zeros around
        k[:, :, 0, -1] = 1.0
        v = F.pad(v, (0, 0, 1, 0))
        if bias is None and T > 1:
            bias = causal_mask(T, k.size(2) - 1, q.device)
        if bias is not None:
            bias = F.pad(bias, (1, 0), value=True if bias.dtype == torch.bool else 0.0)
        return q, k, v, bias

    def attention_weights(
        self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The attention pattern (B, nh, T, S), materialised: the unfused path."""
        T, S, hook = q.size(-2), k.size(-2), self.attention_hook
        scores = (q @ _expand(k, self.n_head).transpose(-2, -1)) * self.scale
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        if bias is None:
            bias = causal_mask(T, S, q.device)
        if bias.dtype == torch.bool:
            scores = scores.masked_fill(~bias, float("-inf"))
        else:
            scores = scores + bias
        if hook is not None:
            scores = hook("scores", scores)
        dtype = torch.promote_types(scores.dtype, torch.float32)  # fp32, or fp64
        if self.sinks is None:
            pattern = scores.softmax(dim=-1, dtype=dtype)
        else:  # the sink is one more logit per head in the denominator, attending to nothing
            sink = self.sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
            pattern = torch.cat((scores, sink), dim=-1).softmax(dim=-1, dtype=dtype)[..., :-1]
        pattern = pattern.to(q.dtype)
        return pattern if hook is None else hook("pattern", pattern)

    def attention_bias(
        self,
        T: int,
        S: int,
        device: torch.device,
        dtype: torch.dtype,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """What to add to the scores: None when plain causal attention will do, else a
        bool mask or a float bias of shape broadcastable to (B, nh, T, S)."""
        alibi = isinstance(self.positional, nn.Module) and hasattr(self.positional, "bias")
        if T == 1 and mask is None and not alibi and self.sliding_window_size is None:
            return None  # one new token may see every cached key
        if T == S and mask is None and not alibi and self.sliding_window_size is None:
            return None  # SDPA's own is_causal
        allowed = causal_mask(T, S, device, self.sliding_window_size)
        if mask is not None:
            allowed = allowed & mask
        if not alibi:
            return allowed
        query_pos = torch.arange(S - T, S, device=device)
        bias = self.positional.bias(query_pos, torch.arange(S, device=device)).to(dtype)
        return bias.masked_fill(~allowed, float("-inf"))

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ) -> None:
        self.kv_cache = KVCache(
            batch_size, max_seq_length, self.n_query_groups, self.head_size, device, dtype, static
        )
        if hasattr(self.positional, "reserve"):  # RoPE's table: no growing mid-decode
            self.positional.reserve(max_seq_length, device or self.proj.weight.device)


def causal_mask(T: int, S: int, device: torch.device, window: int | None = None) -> torch.Tensor:
    """(T, S) bool, True where query i (at position S - T + i) may see key j: j <= its
    position and, with a sliding window, j > its position - window::

        window=3   k0 k1 k2 k3 k4
             q0     x
             q1     x  x
             q2     x  x  x
             q3        x  x  x
             q4           x  x  x
    """
    query_pos = torch.arange(S - T, S, device=device)[:, None]
    key_pos = torch.arange(S, device=device)[None, :]
    allowed = key_pos <= query_pos
    if window is not None:
        allowed &= key_pos > query_pos - window
    return allowed


def _expand(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, ng, S, hs) -> (B, nh, S, hs): each key/value head serves nh // ng queries."""
    return x.repeat_interleave(n_head // x.size(1), dim=1) if x.size(1) != n_head else x


# --- block and model ---------------------------------------------------------------------


@registry.block.register("Block")
class Block(nn.Module):
    """Attention then MLP, each on a normed input and added to the residual stream.

    ``pre_norm=False`` drops the input norms: with ``post_attention_norm`` and
    ``post_mlp_norm`` that is OLMo 2's layout, ``x + norm(attn(x))``; with both pre- and
    post-norms it is Gemma 2 and 3's "sandwich"."""

    def __init__(self, config: Config, block_idx: int = 0) -> None:
        super().__init__()
        config = config.for_layer(block_idx)
        self.config = config
        self.norm_1 = self.input_norm(config)
        self.attn = registry.build(config.attention_class, config, block_idx)
        self.norm_2 = None if config.shared_attention_norm else self.input_norm(config)
        self.mlp = registry.build(config.mlp_class, config, block_idx)
        self.post_attention_norm = make_norm(config) if config.post_attention_norm else None
        self.post_mlp_norm = make_norm(config) if config.post_mlp_norm else None

    def forward(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_normed = self.norm_1(x)
        h = self.attn(x_normed, input_pos=input_pos, mask=mask)
        if self.post_attention_norm is not None:
            h = self.post_attention_norm(h)
        if self.config.parallel_residual:
            mlp_in = x_normed if self.norm_2 is None else self.norm_2(x)
            return x + h + self._mlp(mlp_in)
        x = x + h
        return x + self._mlp(self.norm_2(x))

    @staticmethod
    def input_norm(config: Config) -> nn.Module:
        """The norm on a branch's input; none (identity) when ``pre_norm=False``."""
        return make_norm(config) if config.pre_norm else nn.Identity()

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        return y if self.post_mlp_norm is None else self.post_mlp_norm(y)


class GPT(nn.Module):
    """Token embedding, ``n_layer`` blocks, final norm and the language-model head."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=config.lm_head_bias)
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                h=nn.ModuleList(
                    registry.build(config.for_layer(i).block_class, config, i)
                    for i in range(config.n_layer)
                ),
                ln_f=make_norm(config),
            )
        )
        if config.positional_class.level == "embedding":
            self.transformer["wpe"] = config.positional_class(config)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.reset_parameters()

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPT:
        """``GPT.from_name("pythia-70m")``: a randomly initialised named architecture."""
        return cls(Config.from_name(name, **overrides))

    @classmethod
    def from_pretrained(cls, directory, **kwargs) -> GPT:
        """Load a ``lab`` or Hugging Face checkpoint directory; ``kwargs`` (``config_class``,
        ``device``, ``dtype``) go to ``lab.checkpoint.load_pretrained``, which knows the files."""
        return checkpoint.load_pretrained(directory, model_class=cls, **kwargs)

    def save_pretrained(self, directory, format: str = "lab") -> None:
        """Write a checkpoint directory, atomically; ``format="hf"`` for transformers."""
        checkpoint.save_pretrained(self, directory, format=format)

    def reset_parameters(self) -> None:
        """Initialise every weight (also after ``to_empty`` on a meta-device model)."""
        if self.lm_head.weight.is_meta:
            return  # nothing to fill yet; building on the meta device stays instant
        self.apply(self._init_weights)
        # Residual-branch outputs scaled by 1/sqrt(2 n_layer), so the variance of the
        # residual stream does not grow with depth (GPT-2).
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.fc_2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, 0.02) weights and zero biases for linear and embedding layers (GPT-2),
        then what a subclass adds (``reset_adapter_parameters``: LoRA's A and B); other
        modules reset themselves."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
            if hasattr(module, "reset_adapter_parameters"):
                module.reset_adapter_parameters()
        elif module is not self and hasattr(module, "reset_parameters"):
            module.reset_parameters()

    def forward(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, padded_vocab_size) for token ids ``idx`` (B, T). With
        ``input_pos`` (T,) (the positions of these tokens) the KV cache is used.
        ``mask`` (bool, broadcastable to (B, nh, T, S)) goes to every block's attention,
        e.g. to hide left padding (see ``CausalSelfAttention.scaled_dot_product_attention``)."""
        return self.head(self.hidden_states(idx, input_pos, mask))

    def hidden_states(
        self,
        idx: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final-normed residual stream (B, T, n_embd): ``forward`` without the head,
        for losses that apply the head a chunk at a time (``lab.loss``)."""
        if not torch.compiler.is_compiling():  # a compiled decode step checked its positions
            last = idx.size(1) if input_pos is None else int(input_pos[-1]) + 1
            if last > self.config.block_size:
                raise ValueError(
                    f"position {last - 1} is beyond block_size ({self.config.block_size}); "
                    "use a shorter sequence or a config with a larger block_size"
                )
        x = self.transformer.wte(idx)
        if self.config.scale_embeddings:
            x = x * torch.tensor(math.sqrt(self.config.n_embd), dtype=x.dtype)
        if "wpe" in self.transformer:
            x = self.transformer.wpe(x, input_pos)
        for block in self.transformer.h:
            x = block(x, input_pos=input_pos, mask=mask)
        return self.transformer.ln_f(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for hidden states ``x`` (..., n_embd): ``lm_head``, then soft-capping."""
        logits = self.lm_head(x)
        if self.config.final_logit_softcapping is not None:
            cap = self.config.final_logit_softcapping
            logits = cap * torch.tanh(logits / cap)
        return logits

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ) -> None:
        """Preallocate every layer's KV cache for incremental decoding (``static``: see
        ``KVCache``)."""
        max_seq_length = max_seq_length or self.config.block_size
        weight = self.lm_head.weight
        for block in self.transformer.h:
            block.attn.set_kv_cache(
                batch_size, max_seq_length, device or weight.device, dtype or weight.dtype, static
            )

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None
