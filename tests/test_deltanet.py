"""Gated DeltaNet: chunked == recurrent == a naive loop, the state as the cache
(hybrid models generate the same with and without it), gradients, transformers parity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from decoding import assert_cache_equals_recomputation

from lab import GPT, Config
from lab.deltanet import GatedDeltaNet, gated_delta_rule_chunked, gated_delta_rule_recurrent
from lab.generate import generate, supports_kv_cache, supports_padding

DELTANET = dict(
    n_layer=4, n_embd=32, n_head=4, vocab_size=61, block_size=96,
    attention_class_name="GatedDeltaNet", linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=6, linear_value_head_dim=5,
    layer_overrides={3: {"attention_class_name": "CausalSelfAttention"}},  # 3 DeltaNet + 1
)  # fmt: skip


def hybrid(**overrides) -> Config:
    return Config(**{**DELTANET, **overrides})


def naive_rule(q, k, v, g, beta, state=None):
    """The gated delta rule one token and one head at a time, as in the paper:
    S <- exp(g) S;  S <- S + beta k (v - S^T k)^T;  o = S^T q."""
    B, T, H, dk = k.shape
    out = torch.zeros(B, T, H, v.size(-1), dtype=q.dtype)
    final = torch.zeros(B, H, dk, v.size(-1), dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(dk, v.size(-1), dtype=q.dtype) if state is None else state[b, h]
            for t in range(T):
                S = math.exp(g[b, t, h]) * S
                kt, vt = k[b, t, h], v[b, t, h]
                S = S + beta[b, t, h] * torch.outer(kt, vt - S.T @ kt)
                out[b, t, h] = S.T @ q[b, t, h]
            final[b, h] = S
    return out, final


def random_inputs(T: int, B: int = 2, H: int = 3, dk: int = 4, dv: int = 5, decay: float = 1.0):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, H, dk, generator=g, dtype=torch.float64)
    k = F.normalize(torch.randn(B, T, H, dk, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, dv, generator=g, dtype=torch.float64)
    log_decay = -decay * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    state = torch.randn(B, H, dk, dv, generator=g, dtype=torch.float64)
    return q, k, v, log_decay, beta, state


@pytest.mark.parametrize("T", [1, 7, 64, 65, 150])
def test_chunked_equals_recurrent_equals_naive(T):
    q, k, v, g, beta, state = random_inputs(T)
    expected, expected_state = naive_rule(q, k, v, g, beta, state)
    for o, S in (
        gated_delta_rule_recurrent(q, k, v, g, beta, state),
        gated_delta_rule_chunked(q, k, v, g, beta, state),  # chunks of 64
        gated_delta_rule_chunked(q, k, v, g, beta, state, chunk_size=16),
    ):
        torch.testing.assert_close(o, expected, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(S, expected_state, atol=1e-12, rtol=1e-10)


def test_chunked_without_a_state_starts_from_zero():
    q, k, v, g, beta, _ = random_inputs(20)
    expected, expected_state = naive_rule(q, k, v, g, beta)
    o, S = gated_delta_rule_chunked(q, k, v, g, beta, chunk_size=8)
    torch.testing.assert_close(o, expected, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(S, expected_state, atol=1e-12, rtol=1e-10)


def test_strong_decay_stays_finite_and_exact():
    """Decays of e^-40 a token underflow to zero over a chunk: no inf, no NaN."""
    q, k, v, g, beta, state = random_inputs(70, decay=80.0)
    o, S = gated_delta_rule_chunked(q.float(), k.float(), v.float(), g.float(), beta.float(),
                                    state.float())  # fmt: skip
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    expected, expected_state = gated_delta_rule_recurrent(q, k, v, g, beta, state)
    torch.testing.assert_close(o.double(), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S.double(), expected_state, atol=1e-4, rtol=1e-4)


def test_gradcheck_of_the_chunked_rule():
    q, k, v, g, beta, state = (t.requires_grad_() for t in random_inputs(6, B=1, H=1, dk=2, dv=2))

    def run(*args):
        return gated_delta_rule_chunked(*args, chunk_size=4)

    assert torch.autograd.gradcheck(run, (q, k, v, g, beta, state))


def naive_layer(layer: GatedDeltaNet, x: torch.Tensor) -> torch.Tensor:
    """Qwen3-Next's Gated DeltaNet written plainly, on ``naive_rule``."""
    B, T, _ = x.shape
    nk, nv, dk, dv = 2, 4, 6, 5
    qkv, z, b, a = (x @ layer.in_proj.weight.T).split((2 * nk * dk + nv * dv, nv * dv, nv, nv), -1)
    weight = layer.conv1d.weight[:, 0]  # (channels, 4)
    conv = torch.zeros_like(qkv)
    for t in range(T):
        for j in range(4):  # weight[:, 3] multiplies x_t, weight[:, 0] x_{t-3}
            if t - 3 + j >= 0:
                conv[:, t] += weight[:, j] * qkv[:, t - 3 + j]
    qkv = F.silu(conv)
    q, k, v = qkv.split((nk * dk, nk * dk, nv * dv), -1)

    def l2(t):  # x / sqrt(|x|^2 + 1e-6), as flash-linear-attention and Qwen3-Next
        return t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-6)

    q = l2(q.view(B, T, nk, dk)).repeat_interleave(2, 2) / math.sqrt(dk)
    k = l2(k.view(B, T, nk, dk)).repeat_interleave(2, 2)
    g = -layer.A_log.exp() * F.softplus(a + layer.dt_bias)
    o, _ = naive_rule(q, k, v.view(B, T, nv, dv), g, torch.sigmoid(b))
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.norm.eps) * layer.norm.weight
    o = o * F.silu(z.view(B, T, nv, dv))
    return o.reshape(B, T, -1) @ layer.proj.weight.T


def test_layer_equals_the_naive_reference():
    torch.manual_seed(0)
    layer = GatedDeltaNet(hybrid()).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_layer(layer, x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize(
    "overrides", [{}, dict(layer_overrides={})], ids=["hybrid", "all-deltanet"]
)
def test_state_cache_decoding_equals_full_recomputation(overrides):
    torch.manual_seed(0)
    model = GPT(hybrid(**overrides)).eval()
    idx = torch.randint(0, 61, (2, 80))  # longer than a chunk
    # a chunked prefill of 70, 3 tokens at once, then the recurrent step one at a time
    assert_cache_equals_recomputation(model, idx, prompt=70, chunk=3)


def test_the_cache_has_the_same_size_at_every_length():
    model = GPT(hybrid())
    model.set_kv_cache(batch_size=3, max_seq_length=40)
    small = {n: tuple(b.shape) for n, b in model.transformer.h[0].attn.kv_cache.named_buffers()}
    model.set_kv_cache(batch_size=3, max_seq_length=4000)
    large = {n: tuple(b.shape) for n, b in model.transformer.h[0].attn.kv_cache.named_buffers()}
    conv_dim = 2 * 2 * 6 + 4 * 5
    assert small == large == {"conv": (3, 3, conv_dim), "state": (3, 4, 6, 5)}


def test_the_state_restarts_at_zero_and_refuses_gaps():
    torch.manual_seed(0)
    model = GPT(hybrid(layer_overrides={})).eval()
    idx = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        model.set_kv_cache(batch_size=1)
        first = model(idx, input_pos=torch.arange(6))
        again = model(idx, input_pos=torch.arange(6))  # position 0: a new sequence
        torch.testing.assert_close(again, first)
        with pytest.raises(ValueError, match="consecutive"):
            model(idx[:, :1], input_pos=torch.tensor([9]))


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = GPT(hybrid())
    idx = torch.randint(0, 61, (2, 12))
    F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_generation_with_the_state_equals_recomputation_and_padding():
    torch.manual_seed(0)
    model = GPT(hybrid())
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # far from ties
    assert supports_kv_cache(model) and supports_padding(model)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(61, (n,), generator=g) for n in (5, 9, 1)]
    cached = generate(model, prompts, 8, temperature=0)  # batched, left-padded
    recomputed = generate(model, prompts, 8, temperature=0, kv_cache=False)
    alone = [generate(model, p, 8, temperature=0) for p in prompts]
    for a, b, c in zip(cached, recomputed, alone, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_matches_transformers_qwen3_next_gated_deltanet():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    torch.manual_seed(0)
    hf_config = transformers.Qwen3NextConfig(
        hidden_size=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=6,
        linear_value_head_dim=5, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, num_hidden_layers=1,
        layer_types=["linear_attention"], num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    theirs = hf.Qwen3NextGatedDeltaNet(hf_config, layer_idx=0).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = GatedDeltaNet(hybrid(norm_eps=1e-6)).eval()
    # transformers groups the projections by key head: [q k v z] and [b a] per group
    nk, r, dk, dv = 2, 2, 6, 5
    qkvz = theirs.in_proj_qkvz.weight.view(nk, 2 * dk + 2 * r * dv, 32)
    q, k, v, z = qkvz.split((dk, dk, r * dv, r * dv), dim=1)
    b, a = theirs.in_proj_ba.weight.view(nk, 2 * r, 32).split((r, r), dim=1)
    with torch.no_grad():
        ours.in_proj.weight.copy_(torch.cat([t.reshape(-1, 32) for t in (q, k, v, z, b, a)]))
        ours.conv1d.weight.copy_(theirs.conv1d.weight)
        for name in ("A_log", "dt_bias", "norm.weight"):
            ours.get_parameter(name).copy_(theirs.get_parameter(name))
        ours.proj.weight.copy_(theirs.out_proj.weight)
        x = torch.randn(2, 70, 32)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-4)


def test_compiled_decoding_is_refused_with_a_clear_error():
    model = GPT(hybrid())
    with pytest.raises(ValueError, match=r"0 \(GatedDeltaNet\), 1 \(GatedDeltaNet\)"):
        generate(model, torch.tensor([1, 2, 3]), 2, compile=True)


def test_meta_device_build_then_reset_initialises_every_parameter():
    with torch.device("meta"):
        model = GPT(hybrid())
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.reset_parameters()
    layer = model.transformer.h[0].attn
    A = layer.A_log.exp()
    dt = F.softplus(layer.dt_bias)
    assert ((A >= 1) & (A <= 16)).all() and ((dt >= 1e-3 - 1e-9) & (dt <= 0.1 + 1e-9)).all()
    assert torch.equal(layer.norm.weight, torch.ones(5))
    assert torch.isfinite(model(torch.randint(0, 61, (1, 7)))).all()


def test_bfloat16_model_runs_and_decodes_close_to_fp32():
    torch.manual_seed(0)
    model = GPT(hybrid()).eval()
    idx = torch.randint(0, 61, (2, 70))
    with torch.no_grad():
        reference = model(idx)
        model.to(torch.bfloat16)
        full = model(idx)
        model.set_kv_cache(batch_size=2)
        model(idx[:, :69], input_pos=torch.arange(69))
        last = model(idx[:, 69:], input_pos=torch.tensor([69]))
    assert full.dtype == torch.bfloat16
    assert model.transformer.h[0].attn.kv_cache.state.dtype == torch.float32
    torch.testing.assert_close(full.float(), reference, atol=0.05, rtol=0.05)
    torch.testing.assert_close(last.float()[:, -1], reference[:, -1], atol=0.05, rtol=0.05)


def test_gradcheck_of_the_whole_layer():
    torch.manual_seed(0)
    config = hybrid(n_embd=8, linear_num_key_heads=1, linear_num_value_heads=2,
                    linear_key_head_dim=2, linear_value_head_dim=2)  # fmt: skip
    layer = GatedDeltaNet(config).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def run(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x,))

    assert torch.autograd.gradcheck(run, (x, *layer.parameters()), fast_mode=True)
