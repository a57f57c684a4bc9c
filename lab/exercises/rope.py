"""Checker for rotary position embeddings (RoPE) in lab's "rotate half" layout.

The learner writes ``apply_rope(x, positions, base)``: x (B, T, n_head, head_size),
positions (T,) ints; every dimension is rotated (no partial rotary). The reference is
``lab.positional.RotaryPositions``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lab.config import Config
from lab.exercises.core import call, close, fail, passed, randn, tensor_result
from lab.positional import RotaryPositions


def reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    nh, hs = x.size(2), x.size(3)
    config = Config(n_layer=1, n_embd=nh * hs, n_head=nh, vocab_size=8, rope_base=base,
                    block_size=int(positions.max()) + 1)  # fmt: skip
    return RotaryPositions(config)(x, x, positions)[0]


def interleaved_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on neighbouring pairs (0, 1), (2, 3), ... (the GPT-J / original paper layout)."""
    hs = x.size(-1)
    theta = base ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    angle = positions.double()[:, None] * theta  # (T, hs/2)
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    x1, x2 = x.double()[..., 0::2], x.double()[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2)
    return out.to(x.dtype)


def check_rope(fn: Callable) -> None:
    """``fn(x, positions, base) -> x rotated``, the shape and dtype of ``x``."""
    cases = [
        ("B=2, T=5, 2 heads of 8, positions 0..4", (2, 5, 2, 8), torch.arange(5), 10000.0, 0),
        ("positions 7..10 (a KV-cache step)", (2, 4, 2, 8), torch.arange(7, 11), 10000.0, 1),
        ("T=1 at position 3, batch 1", (1, 1, 4, 4), torch.tensor([3]), 10000.0, 2),
        ("base=100", (2, 5, 2, 8), torch.arange(5), 100.0, 3),
        ("float64", (2, 3, 2, 16), torch.arange(3), 10000.0, 4),
    ]
    for case, shape, positions, base, seed in cases:
        x = randn(*shape, seed=seed, dtype=torch.float64 if case == "float64" else torch.float32)
        before = x.clone()
        expected = reference(x, positions, base)
        y = tensor_result(call(fn, x, positions, base, case=case), expected, "apply_rope", case)
        if not torch.equal(x, before):
            fail("apply_rope changed its input x in place: return a new tensor instead")
        if close(y, expected):
            continue
        if bool((positions == 0).any()) and not close(y[:, 0], x[:, 0]):
            fail("at position 0 the angle is 0, so RoPE must leave x unchanged; yours changes it")
        lengths = (y.double().norm(dim=-1) - x.double().norm(dim=-1)).abs().max()
        if lengths > 1e-3:
            fail(f"on {case} your output has different vector lengths than its input: RoPE "
                 "rotates, and a rotation never changes a length")  # fmt: skip
        if close(y, interleaved_rope(x, positions, base)):
            fail("you rotate neighbouring dimensions (0, 1), (2, 3), ... together: lab, LLaMA and "
                 "Hugging Face use the 'rotate half' layout, where dimension i pairs with "
                 "i + head_size / 2")  # fmt: skip
        if close(reference(y, positions, base), x):  # rotating back gives x: y turned by -angle
            fail("your rotation turns the wrong way: check the signs of the sin terms")
        if positions[0] != 0 and close(y, reference(x, positions - positions[0], base)):
            fail("right for positions 0..T-1, wrong when the positions start later (a KV-cache "
                 "step): use the positions you are given, not arange(T)")  # fmt: skip
        if base != 10000.0 and close(y, reference(x, positions, 10000.0)):
            fail("you ignore the base argument: the frequencies are base ** (-2i / head_size)")
        half = x.size(-1) // 2
        pairs = [i for i in range(half) if not (close(y[..., i], expected[..., i])
                                                and close(y[..., i + half], expected[..., i + half]))]  # fmt: skip
        fail(f"on {case} dimension pairs {pairs[:4]}{'...' if len(pairs) > 4 else ''} are rotated "
             "by the wrong angle: check the frequency of each pair (pair i turns by "
             "position * theta_i)")  # fmt: skip
    passed("RoPE", "positions that start later, T=1, batch 1, another base and float64")
