"""The core model: shapes, KV-cache equality, gradients, components, compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from decoding import assert_cache_equals_recomputation

from lab import GPT, Block, CausalSelfAttention, Config, ConfigError, GatedMLP, RMSNorm
from lab.model import causal_mask
from lab.positional import alibi_slopes, rope_frequencies

TINY = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=61, block_size=24)

VARIANTS = {
    "mha-rope": {},
    "gqa": dict(n_query_groups=2),
    "mqa": dict(n_query_groups=1),
    "partial-rotary-parallel": dict(
        rotary_percentage=0.25, parallel_residual=True, mlp_class_name="MLP",
        norm_class_name="LayerNorm", bias=True, activation="gelu",
    ),
    "sliding-window": dict(sliding_window_size=5, n_query_groups=2),
    "alibi": dict(positional="alibi"),
    "learned": dict(positional="learned", tie_embeddings=True),
    "sinusoidal": dict(positional="sinusoidal"),
    "nope": dict(positional="none"),
    "gemma2-like": dict(
        head_size=16, norm_unit_offset=True, scale_embeddings=True, post_attention_norm=True,
        post_mlp_norm=True, attention_logit_softcapping=50.0, final_logit_softcapping=30.0,
        activation="gelu_tanh", layer_overrides={0: {"sliding_window_size": 4}},
    ),
    "qk-norm": dict(norm_qk=True, n_query_groups=2),
    "rope-llama3": dict(
        rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_seq_len=8),
    ),
    "rope-yarn": dict(rope_scaling=dict(type="yarn", factor=4.0, original_max_seq_len=8)),
    "shared-norm": dict(parallel_residual=True, shared_attention_norm=True),
}  # fmt: skip


def tiny(**overrides) -> Config:
    return Config(**{**TINY, **overrides})


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_decoding_equals_full_recomputation(name):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[name])).eval()
    assert_cache_equals_recomputation(model, torch.randint(0, 61, (2, 14)))


@pytest.mark.parametrize("name", VARIANTS)
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[name]))
    idx = torch.randint(0, 61, (2, 12))
    F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_causality_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = GPT(tiny(n_query_groups=2)).eval()
    a = torch.randint(0, 61, (1, 12))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % 61
    with torch.no_grad():
        torch.testing.assert_close(model(a)[:, :7], model(b)[:, :7])
        assert not torch.allclose(model(a)[:, 7:], model(b)[:, 7:])


def naive_attention(q, k, v, scale, allowed, bias=None):
    """Reference: explicit softmax(q k^T) with GQA groups expanded by repeating heads."""
    rep = q.size(2) // k.size(2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_naive_softmax(window):
    torch.manual_seed(0)
    attn = CausalSelfAttention(tiny(n_query_groups=2, sliding_window_size=window))
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    expected = naive_attention(q, k, v, 1 / math.sqrt(8), causal_mask(9, 9, "cpu", window))
    torch.testing.assert_close(attn.scaled_dot_product_attention(q, k, v), expected)


def test_alibi_bias_matches_paper():
    torch.manual_seed(0)
    attn = CausalSelfAttention(tiny(positional="alibi"))
    q, k, v = torch.randn(1, 6, 4, 8), torch.randn(1, 6, 4, 8), torch.randn(1, 6, 4, 8)
    slopes = torch.tensor([2**-2, 2**-4, 2**-6, 2**-8])  # 2^(-8i/n) for n = 4 heads
    i = torch.arange(6)
    bias = -slopes[:, None, None] * (i[:, None] - i[None, :]).float()
    expected = naive_attention(q, k, v, 1 / math.sqrt(8), causal_mask(6, 6, "cpu"), bias)
    torch.testing.assert_close(attn.scaled_dot_product_attention(q, k, v), expected)
    torch.testing.assert_close(alibi_slopes(4), slopes)
    assert alibi_slopes(6).shape == (6,)


def test_padding_mask_hides_keys():
    torch.manual_seed(0)
    attn = CausalSelfAttention(tiny())
    q, k, v = torch.randn(1, 5, 4, 8), torch.randn(1, 5, 4, 8), torch.randn(1, 5, 4, 8)
    hide_first = torch.tensor([False, True, True, True, True])
    out = attn.scaled_dot_product_attention(q, k, v, mask=hide_first)
    changed_v = v.clone()
    changed_v[:, 0] += 10  # a hidden value cannot matter to queries 1..4
    again = attn.scaled_dot_product_attention(q, k, changed_v, mask=hide_first)
    torch.testing.assert_close(out[:, 1:], again[:, 1:])


def test_rope_rotation_preserves_norm_and_relative_position():
    torch.manual_seed(0)
    rope = CausalSelfAttention(tiny()).positional
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    dots = []
    for offset in (0, 5):
        q_rot, _ = rope(q, q, torch.tensor([3 + offset]))
        _, k_rot = rope(k, k, torch.tensor([1 + offset]))
        dots.append((q_rot * k_rot).sum())
        torch.testing.assert_close(q_rot.norm(), q.norm())
    torch.testing.assert_close(dots[0], dots[1])  # depends on 3 - 1 only


def test_rope_scaling_frequencies():
    base, _ = rope_frequencies(8, 10000.0, None)
    linear, _ = rope_frequencies(8, 10000.0, {"type": "linear", "factor": 4.0})
    torch.testing.assert_close(linear, base / 4)
    llama3, _ = rope_frequencies(
        8, 10000.0,
        {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_seq_len": 64},
    )  # fmt: skip
    assert llama3[0] == base[0]  # the highest frequency is kept
    torch.testing.assert_close(llama3[-1], base[-1] / 8)  # the lowest is divided
    _, attention_factor = rope_frequencies(8, 10000.0, {"type": "yarn", "factor": 4.0})
    assert attention_factor == pytest.approx(0.1 * math.log(4) + 1)


def test_rms_norm_formula_and_unit_offset():
    x = torch.randn(3, 8)
    norm = RMSNorm(8, eps=1e-6)
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt())
    offset = RMSNorm(8, eps=1e-6, unit_offset=True)
    torch.testing.assert_close(offset(x), norm(x))  # zero weight + 1 == unit weight


def test_gated_mlp_is_swiglu():
    torch.manual_seed(0)
    mlp = GatedMLP(tiny(intermediate_size=20))
    x = torch.randn(2, 3, 32)
    gate_w, up_w = mlp.fc_1.weight.split(20)
    expected = (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ mlp.fc_2.weight.T
    torch.testing.assert_close(mlp(x), expected)


def test_parameter_layout_and_counts():
    config = tiny(n_query_groups=2, intermediate_size=48)
    model = GPT(config)
    attn = model.transformer.h[0].attn.attn
    assert attn.weight.shape == ((4 + 2 + 2) * 8, 32)
    assert model.transformer.h[0].mlp.fc_1.weight.shape == (96, 32)
    tied = GPT(tiny(tie_embeddings=True))
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied_count = sum(p.numel() for p in GPT(tiny()).parameters())
    assert sum(p.numel() for p in tied.parameters()) == untied_count - 61 * 32


def test_per_layer_overrides_mix_components():
    config = tiny(n_layer=3, layer_overrides={1: {"mlp_class_name": "MLP", "n_query_groups": 1}})
    model = GPT(config)
    assert type(model.transformer.h[0].mlp).__name__ == "GatedMLP"
    assert type(model.transformer.h[1].mlp).__name__ == "MLP"
    assert model.transformer.h[1].attn.n_query_groups == 1
    assert model.transformer.h[2].attn.n_query_groups == 4
    assert model(torch.randint(0, 61, (1, 5))).shape == (1, 5, 61)


def test_block_accepts_the_guides_calls():
    config = tiny()
    block = Block(config)
    x = torch.randn(2, 6, 32)
    assert block(x).shape == x.shape
    assert block(x, input_pos=None, mask=None).shape == x.shape
    assert CausalSelfAttention(config)(x).shape == x.shape


def test_sequence_longer_than_block_size_is_a_clear_error():
    model = GPT(tiny(block_size=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("positional", ["rope", "alibi", "sinusoidal"])
def test_meta_device_build_and_reset_parameters(positional):
    with torch.device("meta"):
        model = GPT(tiny(positional=positional))
    model.to_empty(device="cpu")
    model.reset_parameters()
    idx = torch.randint(0, 61, (1, 7))
    assert torch.isfinite(model(idx)).all()
    proj = model.transformer.h[0].attn.proj.weight
    assert proj.std() < 0.02  # residual outputs are scaled down by 1/sqrt(2 n_layer)
    built_on_cpu = GPT(tiny(positional=positional))
    built_on_cpu.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(idx), built_on_cpu(idx))  # same fixed tables


def test_bad_config_is_reported_before_building():
    with pytest.raises(ConfigError, match="n_embd"):
        GPT(tiny(n_embd=30))


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = GPT(tiny(n_query_groups=2)).eval()
    idx = torch.randint(0, 61, (2, 10))
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx))


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    model = GPT(tiny()).to(torch.bfloat16)
    rope = model.transformer.h[0].attn.positional
    assert rope.inv_freq.values.dtype == torch.float32
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    q_rot, _ = rope(q, q, torch.tensor([3000]))
    expected, _ = (
        GPT(tiny()).transformer.h[0].attn.positional(q.float(), q.float(), torch.tensor([3000]))
    )
    torch.testing.assert_close(q_rot.float(), expected, atol=0.05, rtol=0.05)
