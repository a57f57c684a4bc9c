"""Checkers for LoRA (a linear layer with a low-rank update, and merging it) and the
LLaMA-Adapter's gated prefix attention. References: ``lab.lora.LoRALinear`` and
``lab.adapter.CausalSelfAttention``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lab.config import Config
from lab.exercises.core import call, close, fail, passed, randn, tensor_result
from lab.finetune.adapter import CausalSelfAttention as AdapterAttention
from lab.finetune.lora import LoRALinear as ReferenceLoRA


def _reference_lora(
    base: nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float
) -> ReferenceLoRA:
    ref = ReferenceLoRA(base.in_features, base.out_features, bias=base.bias is not None,
                        r=A.size(0), lora_alpha=alpha)  # fmt: skip
    with torch.no_grad():
        ref.weight.copy_(base.weight)
        if base.bias is not None:
            ref.bias.copy_(base.bias)
        ref.lora_A.copy_(A)
        ref.lora_B.copy_(B)
    return ref


def check_lora(cls: Callable) -> None:
    """``cls(base: nn.Linear, r, alpha)`` -> a module with ``lora_A`` (r, in), ``lora_B``
    (out, r), ``forward(x)`` and ``merge()``; ``base``'s weight stays frozen."""
    for case, bias, r, alpha, seed in [("16 -> 12, r=4, alpha=8", True, 4, 8.0, 0),
                                       ("no bias, r=1, alpha=2", False, 1, 2.0, 1)]:  # fmt: skip
        torch.manual_seed(seed)
        base = nn.Linear(16, 12, bias=bias)
        original = base.weight.detach().clone()
        x = randn(2, 3, 16, seed=seed)
        with torch.no_grad():
            base_out = base(x)
        layer = call(cls, base, r, alpha, case=case)
        for name, shape in (("lora_A", (r, 16)), ("lora_B", (12, r))):
            tensor = getattr(layer, name, None)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                fail(f"{name} should be a parameter of shape {shape} (r={r}, 16 inputs, 12 "
                     f"outputs); got {None if tensor is None else tuple(tensor.shape)}")  # fmt: skip
        A, B = layer.lora_A, layer.lora_B
        if not (A.requires_grad and B.requires_grad):
            fail("lora_A and lora_B must be trainable (nn.Parameter, requires_grad=True)")
        trainable = [n for n, p in layer.named_parameters() if p.requires_grad and "lora_" not in n]
        if trainable:
            fail(f"{trainable} still train: freeze the base layer (requires_grad=False); only "
                 "lora_A and lora_B learn")  # fmt: skip
        with torch.no_grad():
            out = tensor_result(call(layer, x, case=case), base_out, "forward", case)
            if not close(out, base_out):
                fail("at initialisation your layer already changes the output: one of A and B "
                     "must start at zero, so fine-tuning starts from the base model")  # fmt: skip
            if bool((A == 0).all()):
                fail("lora_A is all zeros: with lora_B zero too, both gradients are zero and "
                     "nothing ever trains; start A random")  # fmt: skip
            B.copy_(randn(12, r, seed=seed + 5))
            expected = _reference_lora(base, A, B, alpha)(x)
            out = call(layer, x, case=case)
            if not close(out, expected):
                delta = out - base_out
                right = expected - base_out
                if r > 1 and close(delta, right * r):
                    fail(f"your update is r={r} times too large: scale B A x by alpha / r")
                if close(delta, right * r / alpha):
                    fail("your update is not scaled: multiply B A x by alpha / r")
                if close(delta, right.flip(-1)) or not close(delta.abs().sum(), right.abs().sum()):
                    fail("forward should add (alpha / r) * B A x to the base layer's output; "
                         "yours adds something else: check the order of A and B and their transposes")  # fmt: skip
                fail("forward differs from W x + b + (alpha / r) B A x")
            call(layer.merge, case="merge()")
            if torch.equal(base.weight, original) and torch.equal(layer.weight, original):
                fail("merge() did not change the weight: it should add (alpha / r) B A to it")
            merged = call(layer, x, case="after merge()")
            if close(merged - base_out, 2 * (expected - base_out)):
                fail("after merge() your forward still adds B A x: the update is now counted twice")
            if not close(merged, expected):
                fail("after merge() the outputs changed: merging must add to W exactly what "
                     "forward added, (alpha / r) B A")  # fmt: skip
    passed("LoRALinear with merging", "zero at start, the alpha / r scale, biases, r=1 and merge()")


def _adapter_attention(nh: int, ng: int, hs: int, P: int, seed: int) -> AdapterAttention:
    torch.manual_seed(seed)
    config = Config(n_layer=1, n_embd=nh * hs, n_head=nh, n_query_groups=ng, vocab_size=8,
                    block_size=16)  # fmt: skip
    attention = AdapterAttention(config, prompt_length=P)
    with torch.no_grad():
        attention.adapter_gate.copy_(randn(nh, seed=seed + 1))
    return attention


def check_adapter_gate(fn: Callable) -> None:
    """``fn(q, prefix_k, prefix_v, gate, scale) -> (B, T, nh, hs)``: every query attends
    to the learned prefix alone (no mask), and each head's result is multiplied by its
    gate. q (B, T, nh, hs); prefix_k, prefix_v (1, P, ng, hs); gate (nh,)."""
    for case, B, T, nh, ng, hs, P, seed in [("B=2, T=5, 4 heads, prefix of 3", 2, 5, 4, 4, 8, 3, 0),
                                            ("grouped queries (4 heads, 2 key heads), batch 1", 1, 4, 4, 2, 8, 6, 1),
                                            ("T=1", 2, 1, 2, 2, 8, 2, 2)]:  # fmt: skip
        attention = _adapter_attention(nh, ng, hs, P, seed)
        q = randn(B, T, nh, hs, seed=seed + 2)
        with torch.no_grad():
            pk, pv = attention.prefix_keys_values()
            gate = attention.adapter_gate.detach().clone()
            expected = gate.view(-1, 1) * attention.prefix_attention(q)
            zero = call(fn, q, pk, pv, torch.zeros_like(gate), attention.scale, case=case)
            if not (
                isinstance(zero, torch.Tensor)
                and zero.shape == expected.shape
                and bool((zero == 0).all())
            ):
                fail("with every gate at 0 your prefix term is not exactly zero: the gate multiplies "
                     "the whole term, which is what lets the adapter start as the base model")  # fmt: skip
            y = tensor_result(call(fn, q, pk, pv, gate, attention.scale, case=case), expected,
                              "gated_prefix_attention", case)  # fmt: skip
        if close(y, expected):
            continue
        ungated = expected / gate.view(-1, 1)
        if close(y, ungated * gate.tanh().view(-1, 1)):
            fail("you squash the gate (tanh?): lab multiplies head h's output by gate[h] itself")
        if ng != nh:
            fail("right when n_query_groups == n_head, wrong for grouped queries: check how the "
                 "prefix's key heads are shared")  # fmt: skip
        fail(f"on {case} your term differs from lab's adapter: softmax(q prefix_k^T * scale) "
             "prefix_v over the prefix only, times the head's gate")  # fmt: skip
    passed("LLaMA-Adapter gate", "a zero gate gives exactly zero, per-head gates, GQA and T=1")
