"""The fused expert path (``Experts.fused``, ``fuse_experts``) against the default one:
same outputs and gradients for every router, top-k, biases and GPT-OSS's clamped
SwiGLU, experts that receive no tokens, and capacity dropping; its kernels compile
once whatever the routing, and an outer ``torch.compile`` runs it without recompiling.

The kernels compile with inductor on first use (a few seconds each, cached on disk
after), once per nonlinearity and width."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from lab import Config
from lab.moe import MoE, fuse_experts, glu_kernels


def config(**overrides) -> Config:
    values = dict(
        block_size=16, vocab_size=64, n_layer=1, n_embd=16, n_head=2, mlp_class_name="MoE",
        n_expert=6, n_expert_per_token=2, moe_intermediate_size=8, router="topk_softmax",
    )  # fmt: skip
    return Config(**{**values, **overrides})


def pair(seed: int = 0, **overrides) -> tuple[MoE, MoE]:
    """A default layer with far-from-uniform routing, and a fused copy of it."""
    torch.manual_seed(seed)
    layer = MoE(config(**overrides))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.5)
        if layer.router_type == "sigmoid_bias":
            layer.expert_bias.normal_(std=0.5)
    return layer, fuse_experts(copy.deepcopy(layer))


def run(layer: MoE, x: torch.Tensor, grad: torch.Tensor):
    """Output, input gradient and every parameter's gradient of one forward+backward."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = layer(x)
    out.backward(grad)
    return out, x.grad, {name: p.grad for name, p in layer.named_parameters()}


def assert_same(default: MoE, fused: MoE, x: torch.Tensor) -> None:
    grad = torch.randn_like(x)
    out, x_grad, grads = run(default, x, grad)
    fused_out, fused_x_grad, fused_grads = run(fused, x, grad)
    torch.testing.assert_close(fused_out, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_x_grad, x_grad, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == grads.keys()
    for name, g in grads.items():
        if g is None:
            assert fused_grads[name] is None, name
        else:
            torch.testing.assert_close(fused_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # Mixtral: top-2 of softmax
        dict(n_expert_per_token=1, router="softmax_topk"),  # Switch
        dict(n_expert_per_token=3, router="sigmoid_bias", moe_routed_scaling=2.0),
        dict(router="expert_choice", moe_capacity_factor=1.0),
        dict(moe_capacity_factor=0.5),  # drops assignments
        dict(n_shared_expert=1, shared_expert_gate=True),
        dict(moe_bias=True, moe_swiglu_limit=1.5),  # GPT-OSS: biases, clamped SwiGLU
        dict(activation="gelu"),  # GeGLU experts
    ],
    ids=["top2", "top1", "top3", "expert-choice", "capacity", "shared", "gpt-oss", "gelu"],
)
def test_fused_equals_default(overrides):
    default, fused = pair(**overrides)
    x = torch.randn(2, 7, 16)
    assert_same(default, fused, x)


def test_experts_without_tokens_get_zero_gradients():
    default, fused = pair(moe_bias=True)
    with torch.no_grad():  # the router's bias shuts out the last two experts
        for layer in (default, fused):
            layer.router.bias[-2:] = -1e4
    x = torch.randn(1, 5, 16)
    assert_same(default, fused, x)
    _, _, grads = run(fused, x, torch.randn_like(x))
    for name in ("experts.fc_1", "experts.fc_2", "experts.fc_1_bias", "experts.fc_2_bias"):
        assert grads[name][-2:].eq(0).all(), name
        assert grads[name][:-2].ne(0).any(), name


def test_bf16_matches_default_within_bf16_tolerance():
    default, fused = pair()
    default, fused = default.to(torch.bfloat16), fused.to(torch.bfloat16)
    x = torch.randn(2, 7, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(fused(x), default(x), rtol=2e-2, atol=2e-2)


def test_kernels_compile_once_for_every_routing_and_batch_size():
    default, fused = pair()
    torch._dynamo.reset()  # so the counter sees this test's compiles
    kernels = glu_kernels("silu", None)
    kernels.compiled = {
        name: torch.compile(fn, dynamic=False) for name, fn in kernels.eager.items()
    }
    counters = torch._dynamo.utils.counters
    counters.clear()
    for step, tokens in enumerate([7, 9, 7, 12, 3]):  # new routing (and row count) each step
        x = torch.randn(1, tokens, 16, generator=torch.Generator().manual_seed(step))
        assert_same(default, fused, x)
    assert counters["stats"]["unique_graphs"] == 2  # the kernel and its gradient, once each


def test_uncompilable_kernels_warn_once_and_run_eagerly(monkeypatch):
    default, fused = pair(activation="relu")  # a kernel pair of its own
    kernels = glu_kernels("relu", None)

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "compiled", {"forward": no_compiler, "backward": no_compiler})
    x = torch.randn(2, 7, 16)
    with pytest.warns(UserWarning, match="fused experts run uncompiled.*no C\\+\\+ compiler"):
        assert_same(default, fused, x)
    assert kernels.compiled is None  # later calls go straight to the eager functions


def test_outer_compile_runs_the_fused_path_without_recompiling():
    """What ``fit(compile=True)`` meets in a model whose MoE experts are fused: the
    graph breaks at the experts, which run their own kernels, and new routings do not
    recompile the step."""
    default, fused = pair(n_shared_expert=1)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda x: fused(x).square().mean(), backend=counter)
    for seed in range(3):
        x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(seed))
        loss = step(x)
        loss.backward()
        expected = default(x).square().mean()
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(fused.named_parameters(), default.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        fused.zero_grad(), default.zero_grad()
        if seed == 0:
            frames = counter.frame_count
    assert counter.frame_count == frames  # later routings compiled nothing new


def test_default_path_is_unfused_and_switch_is_reversible():
    layer = MoE(config())
    assert not layer.experts.fused
    assert fuse_experts(layer) is layer and layer.experts.fused
    fuse_experts(layer, fused=False)
    assert not layer.experts.fused
