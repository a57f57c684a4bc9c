"""Checkers for RMSNorm and the SwiGLU MLP; references ``lab.RMSNorm`` and
``lab.GatedMLP``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lab.config import Config
from lab.exercises.core import call, close, fail, passed, randn, tensor_result
from lab.model import GatedMLP, RMSNorm


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.size(-1), eps=eps)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


def check_rms_norm(fn: Callable) -> None:
    """``fn(x, weight, eps) -> y``: normalise the last dimension by its root mean square,
    then scale by ``weight``; same shape and dtype as ``x``."""
    cases = [
        ("B=2, T=4, C=8", (2, 4, 8), 1.0, 1e-6, torch.float32, 0),
        ("small inputs (|x| ~ 0.001, where eps matters)", (2, 3, 16), 1e-3, 1e-5, torch.float32, 1),
        ("one token, batch 1", (1, 1, 8), 1.0, 1e-6, torch.float32, 2),
        ("bfloat16 inputs", (2, 4, 8), 1.0, 1e-6, torch.bfloat16, 3),
    ]  # fmt: skip
    for case, shape, size, eps, dtype, seed in cases:
        x = (randn(*shape, seed=seed) * size + 0.5 * size).to(dtype)  # a mean to subtract
        weight = 1 + randn(shape[-1], seed=seed + 10) / 2
        expected = reference_rms_norm(x, weight, eps)
        y = tensor_result(call(fn, x, weight, eps, case=case), expected, "rms_norm", case)
        if close(y, expected):
            continue
        xf = x.double()
        centred = reference_rms_norm(xf - xf.mean(-1, keepdim=True), weight.double(), eps)
        if close(y.double(), centred) or close(
            y.double(), F.layer_norm(xf, shape[-1:], weight.double(), None, eps)
        ):
            fail("you subtract the mean: that is LayerNorm. RMSNorm only divides by the root "
                 "mean square")  # fmt: skip
        if close(y, reference_rms_norm(x, torch.ones_like(weight), eps)):
            fail("the result is not multiplied by weight")
        outside = xf / (xf.square().mean(-1, keepdim=True).sqrt() + eps) * weight.double()
        if close(y.double(), outside):
            fail("eps belongs inside the square root: sqrt(mean(x^2) + eps), not sqrt(mean(x^2)) + eps "
                 "(the difference shows on small inputs)")  # fmt: skip
        if y.dtype != torch.float32:
            fail(f"on {case} the result is off by more than rounding: compute in float32 "
                 "(x.float()) and convert back at the end")  # fmt: skip
        fail(f"on {case} your result differs from lab's RMSNorm: normalise over the last "
             "dimension (one root mean square per token) and check the mean of x squared")  # fmt: skip
    passed("RMSNorm", "small inputs where eps matters, batch 1 and bfloat16")


def reference_swiglu(x: torch.Tensor, fc_1: nn.Linear, fc_2: nn.Linear) -> torch.Tensor:
    config = Config(n_layer=1, n_embd=fc_1.in_features, n_head=1, vocab_size=8,
                    intermediate_size=fc_2.in_features, activation="silu", bias=fc_1.bias is not None)  # fmt: skip
    mlp = GatedMLP(config)
    mlp.load_state_dict({"fc_1." + k: v for k, v in fc_1.state_dict().items()}
                        | {"fc_2." + k: v for k, v in fc_2.state_dict().items()})  # fmt: skip
    with torch.no_grad():
        return mlp(x)


def check_swiglu(fn: Callable) -> None:
    """``fn(x, fc_1, fc_2) -> y``: ``fc_1`` (C -> 2H) gives ``[gate | up]``, ``fc_2``
    (H -> C) projects back; the gate goes through SiLU."""
    for case, shape, bias, seed in [("B=2, T=3, C=8, H=12", (2, 3, 8), False, 0),
                                    ("with biases, batch 1, T=1", (1, 1, 8), True, 1)]:  # fmt: skip
        torch.manual_seed(seed)
        fc_1, fc_2 = nn.Linear(8, 24, bias=bias), nn.Linear(12, 8, bias=bias)
        x = randn(*shape, seed=seed)
        expected = reference_swiglu(x, fc_1, fc_2)
        with torch.no_grad():
            y = tensor_result(call(fn, x, fc_1, fc_2, case=case), expected, "swiglu", case)
            if close(y, expected):
                continue
            gate, up = fc_1(x).chunk(2, dim=-1)
            if close(y, fc_2(F.silu(up) * gate)):
                fail("SiLU is applied to the second half: fc_1 gives [gate | up], and the "
                     "activation goes on the gate")  # fmt: skip
            if close(y, fc_2(F.gelu(gate) * up)) or close(y, fc_2(F.relu(gate) * up)):
                fail("the activation is not SiLU (x * sigmoid(x)): SwiGLU is the Swish/SiLU gate")
            if close(y, fc_2(F.silu(gate) + up)):
                fail("you add the gate to the up half; a gate multiplies")
            if close(y, fc_2(F.silu(fc_1(x)[..., :12]))):
                fail("you use only the gate half: the up half is multiplied by the activated gate")
        fail(f"on {case} your MLP differs from lab's GatedMLP: split fc_1's output into two "
             "halves along the last dimension, [gate | up]")  # fmt: skip
    passed("SwiGLU MLP", "the gate/up split, biases, batch 1 and T=1")
