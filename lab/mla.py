"""Multi-head latent attention (DeepSeek-V2, 2024; DeepSeek-V3): a small KV cache.

Keys and values are not projected from the input directly but from a shared,
normalised low-rank latent ``c`` of ``kv_lora_rank`` numbers per token; a second,
decoupled part of ``qk_rope_head_dim`` dimensions carries the positions, with one
rotary key head shared by every query head::

    x --kv_a_proj--> [c | k_rope] --kv_a_norm(c)--> c --kv_b_proj--> [k_nope | v] per head
    x --q_proj (or q_a_proj, q_a_norm, q_b_proj)--> [q_nope | q_rope] per head
    k = [k_nope | rope(k_rope) for every head],  q = [q_nope | rope(q_rope)]

The cache holds only ``c`` and the rotated ``k_rope``: ``kv_lora_rank +
qk_rope_head_dim`` numbers per token and layer (576 for DeepSeek-V3), where
multi-head attention would hold ``2 * n_head * head_size`` (32768 at its size).
Keys and values are re-expanded from the cached latent at every step. The softmax
scale is ``1/sqrt(qk_nope_head_dim + qk_rope_head_dim)``, and values may have
another size (``v_head_dim``) than queries and keys.

Everything after the projections (masks, sliding windows, sinks, gates, soft-capping,
probes) is ``CausalSelfAttention``'s, which this class extends.

transformers' DeepseekV3Attention names: ``q_proj``, ``q_a_proj``, ``q_a_layernorm``
(here ``q_a_norm``), ``q_b_proj``, ``kv_a_proj_with_mqa`` (``kv_a_proj``),
``kv_a_layernorm`` (``kv_a_norm``), ``kv_b_proj``, ``o_proj`` (``proj``). RoPE here
rotates halves, as transformers with ``rope_interleave=False``; DeepSeek's checkpoints
(``rope_interleave=True``) rotate pairs, which a converter turns into halves by
permuting the rotary rows of ``q_b_proj`` (per head) and ``kv_a_proj``. YaRN's
``mscale`` goes into ``attention_scale``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lab import registry
from lab.config import Config
from lab.model import CausalSelfAttention, KVCache, RMSNorm
from lab.positional import RotaryPositions


class LatentCache(KVCache):
    """MLA's cache: the normalised latent (B, S, kv_lora_rank) and the rotated shared
    key (B, S, qk_rope_head_dim) of past positions; otherwise a ``KVCache`` (one
    "head", the latent stored as keys and the rotary key as values)."""

    def __init__(
        self,
        batch_size: int,
        max_seq_length: int,
        kv_lora_rank: int,
        qk_rope_head_dim: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ) -> None:
        super().__init__(
            batch_size, max_seq_length, 1, kv_lora_rank, device, dtype, static,
            value_size=qk_rope_head_dim,
        )  # fmt: skip

    def forward(
        self, input_pos: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``latent`` (B, T, r) and ``k_rope`` (B, T, d) at ``input_pos``; return
        those of every position so far, (B, S, r) and (B, S, d)."""
        latent, k_rope = super().forward(input_pos, latent[:, :, None], k_rope[:, :, None])
        return latent[:, :, 0], k_rope[:, :, 0]


@registry.attention.register("MLA")
class MultiHeadLatentAttention(CausalSelfAttention):
    """DeepSeek's multi-head latent attention; sizes from ``config.mla_sizes()``."""

    supports_kv_cache = True  # forward handles input_pos and mask as the base does

    def __init__(self, config: Config, block_idx: int = 0) -> None:
        super().__init__(config, block_idx)
        config = self.config
        self.n_query_groups = self.n_head  # keys and values are expanded to every head
        self.head_size = self.qk_head_dim
        self.scale = config.attention_scale or 1.0 / math.sqrt(self.qk_head_dim)
        if self.positional is not None:  # RoPE on the decoupled part only
            self.positional = RotaryPositions(config, n_elem=self.qk_rope_head_dim)

    def build_projections(self, config: Config) -> None:
        sizes = config.mla_sizes()
        self.q_lora_rank: int | None = sizes["q_lora_rank"]
        self.kv_lora_rank: int = sizes["kv_lora_rank"]
        self.qk_nope_head_dim: int = sizes["qk_nope_head_dim"]
        self.qk_rope_head_dim: int = sizes["qk_rope_head_dim"]
        self.v_head_dim: int = sizes["v_head_dim"]
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        C, nh, eps = config.n_embd, config.n_head, config.norm_eps
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(C, nh * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(C, self.q_lora_rank, bias=self.attn_bias)
            self.q_a_norm = RMSNorm(self.q_lora_rank, eps=eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, nh * self.qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(
            C, self.kv_lora_rank + self.qk_rope_head_dim, bias=self.attn_bias
        )
        self.kv_a_norm = RMSNorm(self.kv_lora_rank, eps=eps)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, nh * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.proj = nn.Linear(nh * self.v_head_dim, C, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.query(x)  # (B, T, nh, qk_head_dim)
        latent, k_rope = self.kv_a_proj(x).split((self.kv_lora_rank, self.qk_rope_head_dim), -1)
        latent = self.kv_a_norm(latent)  # (B, T, kv_lora_rank)
        q, k_rope = self.add_positions(q, k_rope, input_pos)
        if self.kv_cache is not None and input_pos is not None:
            latent, k_rope = self.kv_cache(input_pos, latent, k_rope)
        if T == 1:  # decoding: attend in the latent space, nothing expanded
            y = self.latent_attention(q, latent, k_rope, mask)
        else:
            k, v = self.expand(latent, k_rope)
            y = self.scaled_dot_product_attention(q, k, v, mask=mask)  # (B, T, nh, v_head_dim)
        return self.proj(self.gated(x, y).reshape(B, T, -1))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Queries (B, T, nh, qk_nope_head_dim + qk_rope_head_dim), through the low-rank
        bottleneck and its norm when ``q_lora_rank`` is set."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        return q.view(*x.shape[:2], self.n_head, self.qk_head_dim)

    def add_positions(
        self, q: torch.Tensor, k_rope: torch.Tensor, input_pos: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate the last ``qk_rope_head_dim`` dims of each query head and the shared
        rotary key (B, T, qk_rope_head_dim)."""
        if self.positional is None:
            return q, k_rope
        q_nope, q_rope = q.split((self.qk_nope_head_dim, self.qk_rope_head_dim), dim=-1)
        q_rope, k_rope = self.positional(q_rope, k_rope[:, :, None], input_pos)
        return torch.cat((q_nope, q_rope), dim=-1), k_rope[:, :, 0]

    def expand(
        self, latent: torch.Tensor, k_rope: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (B, S, nh, qk_head_dim) and values (B, S, nh, v_head_dim) from the latent
        (B, S, kv_lora_rank) and the shared rotary key (B, S, qk_rope_head_dim)."""
        B, S, _ = latent.shape
        kv = self.kv_b_proj(latent).view(B, S, self.n_head, -1)
        k_nope, v = kv.split((self.qk_nope_head_dim, self.v_head_dim), dim=-1)
        k_rope = k_rope[:, :, None].expand(B, S, self.n_head, self.qk_rope_head_dim)
        return torch.cat((k_nope, k_rope), dim=-1), v

    def latent_attention(
        self,
        q: torch.Tensor,
        latent: torch.Tensor,
        k_rope: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The same attention as ``expand`` then ``scaled_dot_product_attention``, with
        ``kv_b_proj`` absorbed (DeepSeek-V2, section 2.1.2): ``q_nope . (W_UK c)`` is
        ``(W_UK^T q_nope) . c``, and ``sum_s p_s W_UV c_s`` is ``W_UV sum_s p_s c_s``.
        So each query head attends to one shared key ``[c | k_rope]`` and value ``c``
        (multi-query attention over the cached latent) and the per-head matrices apply
        to T queries instead of S cached positions: cheaper when T is much smaller than
        S, as in decoding."""
        w = self.kv_b_proj.weight.view(self.n_head, -1, self.kv_lora_rank)
        w_uk, w_uv = w.split((self.qk_nope_head_dim, self.v_head_dim), dim=1)
        q_nope, q_rope = q.split((self.qk_nope_head_dim, self.qk_rope_head_dim), dim=-1)
        q = torch.cat((torch.einsum("bthn,hnr->bthr", q_nope, w_uk), q_rope), dim=-1)
        k = torch.cat((latent, k_rope), dim=-1)[:, :, None]  # (B, S, 1, r + rope)
        y = self.scaled_dot_product_attention(q, k, latent[:, :, None], mask=mask)
        return torch.einsum("bthr,hvr->bthv", y, w_uv)  # (B, T, nh, v_head_dim)

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ) -> None:
        self.kv_cache = LatentCache(
            batch_size, max_seq_length, self.kv_lora_rank, self.qk_rope_head_dim,
            device, dtype, static,
        )  # fmt: skip
        if hasattr(self.positional, "reserve"):
            self.positional.reserve(max_seq_length, device or self.proj.weight.device)
