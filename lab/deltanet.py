"""Gated DeltaNet (Yang, Kautz and Hatamizadeh, 2025): linear attention with a state.

Instead of keeping every past key and value, each head keeps one matrix ``S``
(key_head_dim x value_head_dim), a fast-weight memory that maps keys to values. Every
token first forgets (decays ``S`` by ``exp(g_t)``), then corrects what ``S`` recalls
for its key towards its value (the delta rule, a step of online regression with rate
``beta_t``), and reads ``S`` with its query::

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T
    o_t = S_t^T q_t

So decoding costs the same at every position and the cache is ``S`` (plus the last
inputs of a short convolution): its size does not grow with the sequence. Qwen3-Next
interleaves three such layers with one of full attention; with
``layer_overrides={3: {"attention_class_name": "CausalSelfAttention"}, ...}`` a lab
model does the same.

Around the rule (as in Qwen3-Next): one projection gives q, k, v, the output gate z,
beta and the decay input a; q, k and v pass a causal depthwise convolution (kernel 4)
and SiLU; q and k are L2-normalised (q also scaled by 1/sqrt(key_head_dim)); ``beta =
sigmoid(b)``, ``g = -exp(A_log) * softplus(a + dt_bias)`` (per value head); the output
is ``RMSNorm(o) * silu(z)``, then projected back.

Two exact ways to run the rule: token by token (``gated_delta_rule_recurrent``, for
decoding) and by chunks of 64 tokens (``gated_delta_rule_chunked``, for training and
prefill), which turns most of the work into matrix products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lab import registry
from lab.config import Config

# --- the rule, two ways ---------------------------------------------------------------------


def gated_delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule token by token: outputs (B, T, H, dv) and the final state (B, H, dk, dv).

    q, k (B, T, H, dk); v (B, T, H, dv); g (log decay, <= 0) and beta (B, T, H);
    ``state``: the state before the first token (zeros if None). Computed in at least
    fp32; the outputs have q's dtype, the state the computation's.
    """
    B, T, H, dk = k.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v, g, beta = (t.to(dtype) for t in (q, k, v, g, beta))
    S = q.new_zeros(B, H, dk, v.size(-1)) if state is None else state.to(dtype)
    out = []
    for t in range(T):
        S = S * g[:, t, :, None, None].exp()  # forget
        recalled = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        correction = beta[:, t, :, None] * (v[:, t] - recalled)
        S = S + k[:, t, :, :, None] * correction[:, :, None, :]  # write k -> corrected v
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(out, dim=1), S


def gated_delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same outputs and state as ``gated_delta_rule_recurrent``, by chunks.

    Within a chunk starting from state ``S0``, write ``G_t`` for the decay from the
    chunk's start through token t (``exp`` of a cumulative sum of g) and ``u_t =
    beta_t (v_t - exp(g_t) S_{t-1}^T k_t)`` for what token t writes. Unrolling the
    recurrence gives ``S_t = G_t S0 + sum_{i<=t} (G_t / G_i) k_i u_i^T``, so the u's
    solve one unit lower-triangular system per chunk (the WY / UT representation of
    the DeltaNet papers)::

        u_t + sum_{i<t} beta_t (G_t / G_i) (k_t . k_i) u_i = beta_t v_t - beta_t G_t S0^T k_t

    i.e. ``U = U0 - W S0`` with ``U0``, ``W`` independent of ``S0``. Then
    ``o_t = G_t S0^T q_t + sum_{i<=t} (G_t / G_i) (q_t . k_i) u_i`` and the next chunk
    starts from ``G_C S0 + sum_i (G_C / G_i) k_i u_i^T``. Only the last step runs
    chunk after chunk. Ratios ``G_t / G_i <= 1`` are formed in log space, so strong
    decay underflows to 0 instead of overflowing. The sequence is padded to whole
    chunks with tokens that change nothing (k = 0, beta = 0, g = 0).
    """
    B, T, H, dk = k.shape
    dv, C = v.size(-1), min(chunk_size, T)  # a short sequence is one short chunk
    out_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    pad = -T % C

    def chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, ...) -> (B, H, n, C, ...)
        x = x.to(dtype).transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad) if x.ndim == 4 else (0, pad))
        return x.reshape(B, H, -1, C, *x.shape[3:])

    q, k, v, g, beta = (chunks(t) for t in (q, k, v, g, beta))
    log_decay = g.cumsum(dim=-1)  # (B, H, n, C): log G_t
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    ratio = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, -math.inf)
    ratio = ratio.exp()  # (B, H, n, C, C): G_t / G_i for i <= t, else 0

    k_beta = k * beta[..., None]
    system = (k_beta @ k.transpose(-1, -2)) * ratio  # strictly lower part; diagonal ignored
    solve = torch.linalg.solve_triangular
    u0 = solve(system, v * beta[..., None], upper=False, unitriangular=True)
    w = solve(system, k_beta * log_decay.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * ratio  # (q_t . k_i) G_t / G_i, i <= t
    q_decayed = q * log_decay.exp()[..., None]  # G_t q_t: reads S0
    k_to_end = k * (log_decay[..., -1:] - log_decay).exp()[..., None]  # (G_C / G_i) k_i
    chunk_decay = log_decay[..., -1].exp()[..., None, None]  # G_C

    S = q.new_zeros(B, H, dk, dv) if state is None else state.to(dtype)
    out = []
    for n in range(q.size(2)):
        u = u0[:, :, n] - w[:, :, n] @ S
        out.append(q_decayed[:, :, n] @ S + attn[:, :, n] @ u)
        S = S * chunk_decay[:, :, n] + k_to_end[:, :, n].transpose(-1, -2) @ u
    o = torch.stack(out, dim=2).reshape(B, H, -1, dv)[:, :, :T]
    return o.transpose(1, 2).to(out_dtype), S


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(|x|^2 + eps)`` over the last dimension (as flash-linear-attention)."""
    return x * torch.rsqrt(x.square().sum(dim=-1, keepdim=True) + eps)


# --- the layer ---------------------------------------------------------------------------------


class GatedRMSNorm(nn.Module):
    """``RMSNorm(x) * silu(z)``: the output norm, gated by the layer's input (in at
    least fp32)."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        y = F.rms_norm(x.to(dtype), self.weight.shape, self.weight.to(dtype), self.eps)
        return (y * F.silu(z.to(dtype))).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class DeltaNetState(nn.Module):
    """A Gated DeltaNet layer's cache: the last ``kernel - 1`` inputs of its convolution
    (B, kernel - 1, conv_dim) and the recurrent state (B, H, dk, dv), kept in at least
    fp32. Unlike a KV cache it has the same size at every length; it continues from
    the position it reached (``position``), or starts afresh at position 0."""

    def __init__(
        self,
        batch_size: int,
        conv_shape: tuple[int, int],
        state_shape: tuple[int, int, int],
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        state_dtype = torch.promote_types(dtype or torch.get_default_dtype(), torch.float32)
        conv = torch.zeros(batch_size, *conv_shape, device=device, dtype=dtype)
        state = torch.zeros(batch_size, *state_shape, device=device, dtype=state_dtype)
        self.register_buffer("conv", conv, persistent=False)
        self.register_buffer("state", state, persistent=False)
        self.position = 0  # the next position to process

    def read(
        self, input_pos: torch.Tensor, B: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The saved (conv, state) to continue from, or (None, None) at position 0."""
        start = int(input_pos[0])
        if self.conv.size(0) < B:
            raise ValueError(
                f"the DeltaNet cache holds {self.conv.size(0)} sequences; got {B}: call "
                "set_kv_cache with more"
            )
        if start == 0:
            return None, None
        if start != self.position:
            raise ValueError(
                f"a DeltaNet layer's state is at position {self.position}, but the input "
                f"starts at {start}: a recurrent state cannot skip or go back, so feed "
                "consecutive positions (or restart at 0)"
            )
        return self.conv[:B], self.state[:B]

    def write(self, conv: torch.Tensor, state: torch.Tensor, end: int) -> None:
        B = conv.size(0)
        self.conv[:B].copy_(conv)
        self.state[:B].copy_(state)
        self.position = end


@registry.attention.register("GatedDeltaNet")
class GatedDeltaNet(nn.Module):
    """Qwen3-Next's linear-attention mixer; sizes from ``config.deltanet_sizes()``.

    A drop-in for the attention of a ``Block``: ``forward(x, input_pos, mask)`` and
    ``set_kv_cache`` as ``CausalSelfAttention`` has them. ``mask`` is read only for
    left padding (the keys the last query may see are the real tokens): padding is
    zeroed before the convolution, so it writes nothing into the state. Fields that
    only attention reads (positions, windows, sinks, gates, soft-capping) are ignored:
    the order of tokens is in the recurrence itself.

    Parameters (transformers' Qwen3-Next names in brackets): ``in_proj`` [in_proj_qkvz
    and in_proj_ba, whose rows transformers groups by key head], ``conv1d``, ``A_log``,
    ``dt_bias``, ``norm`` and ``proj`` [out_proj].
    """

    supports_kv_cache = True
    chunk_size = 64

    def __init__(self, config: Config, block_idx: int = 0) -> None:
        super().__init__()
        config = config.for_layer(block_idx)
        self.config, self.block_idx = config, block_idx
        sizes = config.deltanet_sizes()
        self.num_key_heads, self.num_value_heads = sizes["num_key_heads"], sizes["num_value_heads"]
        self.key_head_dim, self.value_head_dim = sizes["key_head_dim"], sizes["value_head_dim"]
        self.kernel_size = sizes["conv_kernel_size"]
        key_dim = self.num_key_heads * self.key_head_dim
        value_dim = self.num_value_heads * self.value_head_dim
        self.conv_dim = 2 * key_dim + value_dim  # [q | k | v] go through the convolution
        nv = self.num_value_heads
        self.split_sizes = (self.conv_dim, value_dim, nv, nv)  # [q k v | z | b | a]
        attn_bias = config.bias if config.attn_bias is None else config.attn_bias
        self.in_proj = nn.Linear(config.n_embd, sum(self.split_sizes), bias=attn_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.kernel_size, groups=self.conv_dim, bias=False
        )
        self.A_log = nn.Parameter(torch.empty(self.num_value_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.num_value_heads))
        self.norm = GatedRMSNorm(self.value_head_dim, eps=config.norm_eps)
        self.proj = nn.Linear(value_dim, config.n_embd, bias=config.bias)
        self.kv_cache: DeltaNetState | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Decay rates as in Mamba 2 / flash-linear-attention: ``A`` uniform in [1, 16],
        ``softplus(dt_bias)`` log-uniform in [0.001, 0.1] (the linear layers and the
        convolution are reset by ``GPT._init_weights``)."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
            dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def forward(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        qkv, z, b, a = self.in_proj(x).split(self.split_sizes, dim=-1)
        real = real_tokens(mask, input_pos, T)
        if real is not None:  # left padding writes nothing into the state
            qkv = qkv * real[..., None].to(qkv.dtype)
        cache = self.kv_cache if input_pos is not None else None
        past_conv, past_state = (None, None) if cache is None else cache.read(input_pos, B)
        qkv, conv = self.convolve(qkv, past_conv)
        q, k, v, g, beta = self.rule_inputs(qkv, a, b)
        rule = gated_delta_rule_recurrent if T == 1 else gated_delta_rule_chunked
        o, state = rule(q, k, v, g, beta, past_state)
        if cache is not None:
            cache.write(conv, state, int(input_pos[-1]) + 1)
        o = self.norm(o.to(x.dtype), z.view(B, T, self.num_value_heads, self.value_head_dim))
        return self.proj(o.reshape(B, T, -1))

    def convolve(
        self, x: torch.Tensor, past: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``silu(causal depthwise conv)`` of x (B, T, conv_dim), continuing from the
        ``kernel - 1`` inputs before it (zeros if None); also returns the last
        ``kernel - 1`` inputs, the next step's ``past``."""
        if past is None:
            past = x.new_zeros(x.size(0), self.kernel_size - 1, x.size(2))
        x = torch.cat((past.to(x.dtype), x), dim=1)
        y = F.conv1d(x.transpose(1, 2), self.conv1d.weight, groups=self.conv_dim)
        return F.silu(y.transpose(1, 2)), x[:, x.size(1) - (self.kernel_size - 1) :]

    def rule_inputs(
        self, qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """q, k (B, T, H, dk) (normalised; q scaled; repeated to the H value heads),
        v (B, T, H, dv), g and beta (B, T, H), in at least fp32."""
        B, T, _ = qkv.shape
        dtype = torch.promote_types(qkv.dtype, torch.float32)
        nk, dk = self.num_key_heads, self.key_head_dim
        q, k, v = qkv.to(dtype).split((nk * dk, nk * dk, qkv.size(-1) - 2 * nk * dk), dim=-1)
        q = l2_normalize(q.view(B, T, nk, dk)) / math.sqrt(dk)
        k = l2_normalize(k.view(B, T, nk, dk))
        repeat = self.num_value_heads // nk
        q, k = q.repeat_interleave(repeat, dim=2), k.repeat_interleave(repeat, dim=2)
        v = v.view(B, T, self.num_value_heads, self.value_head_dim)
        g = -self.A_log.to(dtype).exp() * F.softplus(a.to(dtype) + self.dt_bias.to(dtype))
        return q, k, v, g, torch.sigmoid(b.to(dtype))

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ) -> None:
        """A fresh state (its size does not depend on ``max_seq_length`` or ``static``)."""
        H, dk, dv = self.num_value_heads, self.key_head_dim, self.value_head_dim
        self.kv_cache = DeltaNetState(
            batch_size, (self.kernel_size - 1, self.conv_dim), (H, dk, dv),
            device or self.proj.weight.device, dtype or self.proj.weight.dtype,
        )  # fmt: skip


def real_tokens(
    mask: torch.Tensor | None, input_pos: torch.Tensor | None, T: int
) -> torch.Tensor | None:
    """Which of the T tokens are real, (B, T) or (1, T) bool, from an attention ``mask``
    (bool, broadcastable to (B, heads, T, S)): those the last query may see. None
    without a mask."""
    if mask is None:
        return None
    pos = torch.arange(T, device=mask.device) if input_pos is None else input_pos
    seen = mask[..., -1, :][..., pos]  # (T,), (B, 1, T) or (B, heads, T)
    if seen.ndim == 1:
        return seen[None]
    return seen.all(dim=1) if seen.ndim == 3 else seen
