"""How a transformer knows where each token is.

Two families, told apart by ``level``:

- ``"embedding"`` schemes add a position vector to the token embeddings once, before
  the first block (learned: GPT-2; sinusoidal: the original Transformer);
- ``"attention"`` schemes act inside every attention layer: RoPE rotates queries
  and keys by an angle proportional to their position, ALiBi adds a bias that
  grows with the distance between query and key.

``"none"`` (NoPE) relies on the causal mask alone. Every scheme is registered in
``lab.registry.positional`` under the name a config's ``positional`` field uses.
Positions are computed on the fly from ``input_pos`` (or ``0..T-1``), so nothing of
size ``block_size`` is cached per layer.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lab import registry
from lab.config import Config


def positions(input_pos: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
    """Absolute positions of the ``T`` tokens being processed."""
    return torch.arange(T, device=device) if input_pos is None else input_pos


class Fp32Constant:
    """A small fp32 table (frequencies, slopes) that follows the model's device but
    not its dtype: ``model.to(torch.bfloat16)`` would otherwise round RoPE frequencies,
    and angles at positions in the thousands would be off by whole radians. A plain
    attribute, not a buffer, so ``Module.to`` leaves it alone and a model built on
    the meta device still has real values; it moves to the device on first use."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values.to("cpu", torch.float32)

    def on(self, device: torch.device) -> torch.Tensor:
        if self.values.device != device:
            self.values = self.values.to(device)
        return self.values


@registry.positional.register("none")
class NoPositions(nn.Module):
    """NoPE: no explicit positions; causal attention alone breaks the symmetry."""

    level = "none"

    def __init__(self, config: Config) -> None:
        super().__init__()


@registry.positional.register("learned")
class LearnedPositions(nn.Module):
    """A trained vector per position, added to the token embeddings (GPT-2's ``wpe``)."""

    level = "embedding"

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.block_size, config.n_embd))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.weight[positions(input_pos, x.size(1), x.device)]


@registry.positional.register("sinusoidal")
class SinusoidalPositions(nn.Module):
    """Fixed sines and cosines of geometrically spaced frequencies (Vaswani et al., 2017):
    ``pe[p, 2i] = sin(p / 10000^(2i/d))``, ``pe[p, 2i+1] = cos(p / 10000^(2i/d))``."""

    level = "embedding"

    def __init__(self, config: Config) -> None:
        super().__init__()
        exponents = torch.arange(0, config.n_embd, 2, device="cpu") / config.n_embd
        self.inv_freq = Fp32Constant(10000.0**-exponents)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        pos = positions(input_pos, x.size(1), x.device)
        angles = pos.float()[:, None] * self.inv_freq.on(x.device)
        encoding = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
        return x + encoding[:, : x.size(-1)].to(x.dtype)


@registry.positional.register("rope")
class RotaryPositions(nn.Module):
    """Rotary position embedding (Su et al., 2021), in the "rotate half" layout that
    GPT-NeoX, LLaMA and Hugging Face use.

    The first ``rope_n_elem`` dimensions of each head are split in two halves
    ``(x1, x2)`` and rotated by ``theta_i * p``: ``(x1 cos - x2 sin, x2 cos + x1 sin)``
    with ``theta_i = base^(-2i / rope_n_elem)``; the rest (partial rotary, Pythia and
    Phi) pass through. ``rope_scaling`` stretches the frequencies for longer contexts:
    ``linear`` (position interpolation), ``ntk`` (a larger base), ``llama3`` (per
    frequency band) and ``yarn`` (ramped interpolation plus an attention factor).
    """

    level = "attention"

    def __init__(self, config: Config, n_elem: int | None = None) -> None:
        """``n_elem``: rotate this many dimensions instead of ``config.rope_n_elem``
        (MLA rotates its decoupled RoPE part)."""
        super().__init__()
        self.n_elem = n_elem or config.rope_n_elem
        inv_freq, self.attention_factor = rope_frequencies(
            self.n_elem, config.rope_base, config.rope_scaling
        )
        self.inv_freq = Fp32Constant(inv_freq)
        self._cos_sin_table: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, input_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` (B, T, n_head, hs) and ``k`` (B, T, n_query_groups, hs)."""
        cos, sin = self.cos_sin(input_pos, q.size(1), q.device)
        cos, sin = cos.to(q.dtype)[:, None, :], sin.to(q.dtype)[:, None, :]  # (T, 1, n_elem)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def cos_sin(
        self, input_pos: torch.Tensor | None, T: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos and sin (T, n_elem) of the angles at these positions.

        Rows come from a table that grows (doubling) to the furthest position seen, so
        a step reads it instead of recomputing, and a model built for 128k tokens holds
        only as many rows as it has used. A plain attribute, like ``inv_freq``. A
        compiled step cannot grow it: ``reserve`` (called by ``set_kv_cache``) has.
        """
        if not torch.compiler.is_compiling():
            self.reserve(T if input_pos is None else int(input_pos.max()) + 1, device)
        cos, sin = self._cos_sin_table
        if input_pos is None:
            return cos[:T], sin[:T]
        return cos[input_pos], sin[input_pos]

    def reserve(self, rows: int, device: torch.device | str) -> None:
        """Make the table hold at least ``rows`` positions, on ``device``."""
        table = self._cos_sin_table
        if table is None or table[0].size(0) < rows or table[0].device != torch.device(device):
            rows = max(rows, 2 * table[0].size(0) if table is not None else 0)
            angles = torch.arange(rows, device=device).float()[:, None] * self.inv_freq.on(device)
            angles = torch.cat((angles, angles), dim=-1)  # (rows, n_elem)
            self._cos_sin_table = (
                angles.cos() * self.attention_factor,
                angles.sin() * self.attention_factor,
            )

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = self.n_elem
        rot, rest = (x, None) if n == x.size(-1) else (x[..., :n], x[..., n:])
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = rot * cos + torch.cat((-x2, x1), dim=-1) * sin
        return rotated if rest is None else torch.cat((rotated, rest), dim=-1)


def rope_frequencies(n_elem: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies ``theta_i`` and the factor applied to cos/sin."""
    exponents = torch.arange(0, n_elem, 2, device="cpu") / n_elem
    if not scaling:
        return base**-exponents, 1.0
    kind, factor = scaling["type"], float(scaling.get("factor", 1.0))
    if kind == "linear":  # Chen et al., 2023: positions divided by factor
        return base**-exponents / factor, 1.0
    if kind == "ntk":  # "NTK-aware": a larger base stretches low frequencies most
        return (base * factor ** (n_elem / (n_elem - 2))) ** -exponents, 1.0
    original = float(scaling.get("original_max_seq_len", 4096))
    inv_freq = base**-exponents
    if kind == "llama3":
        # Keep high frequencies, divide low ones by factor, interpolate in between.
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling["high_freq_factor"])
        wavelength = 2 * math.pi / inv_freq
        smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0
    # yarn (Peng et al., 2023): ramp from extrapolation (high freq) to interpolation.
    beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))

    def dim_for(rotations: float) -> float:
        return n_elem * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = dim_for(beta_fast), dim_for(beta_slow)
    if scaling.get("truncate", True):  # GPT-OSS keeps the fractional ramp ends
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, n_elem - 1)
    ramp = ((torch.arange(n_elem // 2, device="cpu") - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, yarn_attention_factor(scaling)


def yarn_mscale(factor: float, weight: float = 1.0) -> float:
    """YaRN's magnitude correction for a context ``factor`` times longer:
    ``0.1 weight ln(factor) + 1`` (1 when not stretched)."""
    return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0


def yarn_attention_factor(scaling: dict) -> float:
    """YaRN's factor on cos and sin: ``attention_factor`` if given, else
    ``yarn_mscale(factor)``, or with DeepSeek's ``mscale``/``mscale_all_dim`` the ratio of
    two such terms (1 when they are equal: DeepSeek-V3 scales its softmax instead)."""
    if scaling.get("attention_factor"):
        return float(scaling["attention_factor"])
    factor = float(scaling.get("factor", 1.0))
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        mscale, all_dim = float(scaling["mscale"]), float(scaling["mscale_all_dim"])
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim)
    return yarn_mscale(factor)


@registry.positional.register("alibi")
class ALiBi(nn.Module):
    """Attention with linear biases (Press et al., 2022): score(q_i, k_j) gets
    ``-m_h * (i - j)`` with one slope ``m_h`` per head from a geometric sequence."""

    level = "attention"

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.slopes = Fp32Constant(alibi_slopes(config.n_head))

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, input_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k  # ALiBi leaves queries and keys alone; see ``bias``

    def bias(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        """Additive scores (n_head, T, S) for queries and keys at these positions."""
        distance = (key_pos[None, :] - query_pos[:, None]).float()  # <= 0 where causal
        return self.slopes.on(distance.device)[:, None, None] * distance


def alibi_slopes(n_head: int) -> torch.Tensor:
    """``2^(-8/n), 2^(-16/n), ...`` for the nearest power of two ``n`` below ``n_head``,
    then every other slope of ``2n`` for the remaining heads (the paper's recipe)."""
    power = 2 ** math.floor(math.log2(n_head))
    slopes = [2 ** (-8 * (i + 1) / power) for i in range(power)]
    extra = [2 ** (-4 * (2 * i + 1) / power) for i in range(n_head - power)]
    return torch.tensor(slopes + extra, dtype=torch.float32, device="cpu")
