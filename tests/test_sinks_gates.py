"""Attention sinks (GPT-OSS) and gated attention (Qwen3-Next) on CausalSelfAttention:
naive references, both attention paths, cache == recomputation, transformers parity;
and the per-layer patterns of 2025 models built from ``layer_overrides``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from decoding import assert_cache_equals_recomputation

from lab import GPT, CausalSelfAttention, Config, ConfigError, probe
from lab.generate import generate

TINY = dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=61, block_size=24)


def tiny(**overrides) -> Config:
    return Config(**{**TINY, **overrides})


def naive_attention(attn: CausalSelfAttention, x: torch.Tensor, window: int | None = None):
    """Each head's softmax written out, with the sink's exp(s_h) in the denominator and
    the gate sigmoid(x W_g) on the output (no positions: NoPE keeps it short)."""
    B, T, _ = x.shape
    nh, ng, hs = attn.n_head, attn.n_query_groups, attn.head_size
    q, k, v = (x @ attn.attn.weight.T).split(attn.qkv_sizes, dim=-1)
    q, k, v = q.view(B, T, nh, hs), k.view(B, T, ng, hs), v.view(B, T, ng, hs)
    out = torch.zeros(B, T, nh, hs, dtype=x.dtype)
    for h in range(nh):
        g = h // (nh // ng)
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hs)  # (B, T, T)
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        allowed = (j <= i) if window is None else (j <= i) & (j > i - window)
        weights = scores.exp() * allowed
        denominator = weights.sum(-1, keepdim=True)
        if attn.sinks is not None:
            denominator = denominator + attn.sinks[h].exp()
        out[:, :, h] = (weights / denominator) @ v[:, :, g]
    if attn.gate is not None:
        gate = torch.sigmoid(x @ attn.gate.weight.T).view(B, T, nh, -1)  # (.., hs) or (.., 1)
        out = out * gate
    return out.reshape(B, T, -1) @ attn.proj.weight.T


CASES = {
    "sinks": dict(attention_sinks=True),
    "sinks-window": dict(attention_sinks=True, sliding_window_size=3),
    "gate-elementwise": dict(attention_gate="elementwise"),
    "gate-headwise": dict(attention_gate="headwise"),
    "both": dict(attention_sinks=True, attention_gate="elementwise"),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("path", ["fused", "explicit"])
def test_attention_equals_the_naive_reference(name, path):
    torch.manual_seed(0)
    config = tiny(positional="none", **CASES[name])
    attn = CausalSelfAttention(config).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.5)  # sinks far from zero
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    if path == "explicit":  # what a probe sees: the materialised pattern
        attn.attention_hook = lambda kind, value: value
    window = config.sliding_window_size
    torch.testing.assert_close(attn(x), naive_attention(attn, x, window), atol=1e-12, rtol=1e-10)


def test_sinks_take_probability_mass_and_probes_see_it():
    torch.manual_seed(0)
    model = GPT(tiny(attention_sinks=True)).eval()
    idx = torch.randint(0, 61, (1, 6))
    for value, expected_mass in ((-1e4, 1.0), (1e4, 0.0)):
        with torch.no_grad():
            model.transformer.h[0].attn.sinks.fill_(value)
        with probe(model, "blocks.0.attn.pattern") as cache:
            model(idx)
        rows = cache["blocks.0.attn.pattern"].sum(-1)
        torch.testing.assert_close(rows, torch.full_like(rows, expected_mass))


def test_a_very_negative_sink_is_plain_attention():
    torch.manual_seed(0)
    model = GPT(tiny(attention_sinks=True))
    plain = GPT(tiny())
    plain.load_state_dict(model.state_dict(), strict=False)
    for block in model.transformer.h:
        torch.nn.init.constant_(block.attn.sinks, -1e4)
    idx = torch.randint(0, 61, (2, 9))
    torch.testing.assert_close(model(idx), plain(idx))


@pytest.mark.parametrize("name", [*CASES, "gpt-oss-like", "gemma3-like", "smollm3-like"])
def test_kv_cache_decoding_equals_full_recomputation(name):
    torch.manual_seed(0)
    model = GPT(tiny(**{**CASES, **LAYER_PATTERNS}[name])).eval()
    idx = torch.randint(0, 61, (2, 14))
    with torch.no_grad():
        for block in model.transformer.h:  # nonzero sinks
            if block.attn.sinks is not None:
                block.attn.sinks.normal_()
    assert_cache_equals_recomputation(model, idx)


def test_generation_with_sinks_and_gates_equals_recomputation():
    torch.manual_seed(0)
    model = GPT(tiny(block_size=40, attention_sinks=True, attention_gate="elementwise"))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(61, (n,), generator=g) for n in (5, 9, 1)]
    cached = generate(model, prompts, 8, temperature=0)
    recomputed = generate(model, prompts, 8, temperature=0, kv_cache=False)
    for a, b in zip(cached, recomputed, strict=True):
        assert torch.equal(a, b)


def test_sinks_and_gates_get_gradients_and_start_neutral():
    torch.manual_seed(0)
    model = GPT(tiny(attention_sinks=True, attention_gate="headwise"))
    attn = model.transformer.h[0].attn
    assert torch.equal(attn.sinks, torch.zeros(4)) and attn.gate.weight.shape == (4, 32)
    idx = torch.randint(0, 61, (2, 12))
    F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_bad_gate_is_a_config_error():
    with pytest.raises(ConfigError, match="attention_gate"):
        tiny(attention_gate="per-token")


# --- transformers parity -----------------------------------------------------------------------


def test_sinks_match_transformers_gpt_oss_attention():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss import modeling_gpt_oss as hf

    torch.manual_seed(0)
    hf_config = transformers.GptOssConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        sliding_window=3, layer_types=["sliding_attention"], num_hidden_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    hf_config._attn_implementation = "eager"
    theirs = hf.GptOssAttention(hf_config, layer_idx=0).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = CausalSelfAttention(tiny(bias=True, attention_sinks=True, sliding_window_size=3))
    with torch.no_grad():
        for kind in ("weight", "bias"):
            parts = [getattr(theirs, f"{n}_proj").get_parameter(kind) for n in "qkv"]
            ours.attn.get_parameter(kind).copy_(torch.cat(parts))
            ours.proj.get_parameter(kind).copy_(theirs.o_proj.get_parameter(kind))
        ours.sinks.copy_(theirs.sinks)
        x = torch.randn(2, 7, 32)
        cos_sin = hf.GptOssRotaryEmbedding(hf_config)(x, torch.arange(7)[None].expand(2, -1))
        i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
        allowed = (j <= i) & (j > i - 3)
        mask = torch.zeros(7, 7).masked_fill(~allowed, float("-inf"))[None, None]
        expected, _ = theirs(x, position_embeddings=cos_sin, attention_mask=mask)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


def test_gate_matches_transformers_qwen3_next_attention():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_next import modeling_qwen3_next as hf

    torch.manual_seed(0)
    hf_config = transformers.Qwen3NextConfig(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_hidden_layers=1, layer_types=["full_attention"], rms_norm_eps=1e-6,
        partial_rotary_factor=0.25,
    )  # fmt: skip
    hf_config._attn_implementation = "eager"
    theirs = hf.Qwen3NextAttention(hf_config, layer_idx=0).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    config = tiny(attention_gate="elementwise", norm_qk=True, norm_eps=1e-6,
                  rotary_percentage=0.25)  # fmt: skip
    ours = CausalSelfAttention(config)
    with torch.no_grad():
        # transformers' q_proj holds [query | gate] per head; its QK norms scale by 1 + w
        q, gate = theirs.q_proj.weight.view(4, 2, 8, 32).unbind(1)
        weight = torch.cat([q.reshape(-1, 32), theirs.k_proj.weight, theirs.v_proj.weight])
        ours.attn.weight.copy_(weight)
        ours.gate.weight.copy_(gate.reshape(-1, 32))
        ours.proj.weight.copy_(theirs.o_proj.weight)
        ours.norm_q.weight.copy_(1 + theirs.q_norm.weight)
        ours.norm_k.weight.copy_(1 + theirs.k_norm.weight)
        x = torch.randn(2, 7, 32)
        cos_sin = hf.Qwen3NextRotaryEmbedding(hf_config)(x, torch.arange(7)[None].expand(2, -1))
        causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
        expected, _ = theirs(x, position_embeddings=cos_sin, attention_mask=causal)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


# --- per-layer patterns -------------------------------------------------------------------------

LAYER_PATTERNS = {
    # GPT-OSS: sinks everywhere, sliding (window 4) and full layers alternating
    "gpt-oss-like": dict(
        n_layer=4, attention_sinks=True, sliding_window_size=4,
        layer_overrides={1: {"sliding_window_size": None}, 3: {"sliding_window_size": None}},
    ),
    # Gemma 3: local layers (window, base 10k) and a global one (base 1M) every 4th
    "gemma3-like": dict(
        n_layer=4, sliding_window_size=4, rope_base=10_000.0,
        layer_overrides={3: {"sliding_window_size": None, "rope_base": 1_000_000.0}},
    ),
    # SmolLM3: no positions (NoPE) in every 4th layer
    "smollm3-like": dict(n_layer=4, layer_overrides={3: {"positional": "none"}}),
}  # fmt: skip


def test_layer_patterns_build_what_they_say():
    gpt_oss = GPT(tiny(**LAYER_PATTERNS["gpt-oss-like"]))
    windows = [block.attn.sliding_window_size for block in gpt_oss.transformer.h]
    assert windows == [4, None, 4, None]
    assert all(block.attn.sinks is not None for block in gpt_oss.transformer.h)
    gemma3 = GPT(tiny(**LAYER_PATTERNS["gemma3-like"]))
    bases = [block.attn.config.rope_base for block in gemma3.transformer.h]
    assert bases == [10_000.0] * 3 + [1_000_000.0]
    freqs = [block.attn.positional.inv_freq.values[1] for block in gemma3.transformer.h]
    assert freqs[0] == pytest.approx(10_000.0 ** (-2 / 8)) and freqs[3] < freqs[0]
    smollm3 = GPT(tiny(**LAYER_PATTERNS["smollm3-like"]))
    assert [block.attn.positional is None for block in smollm3.transformer.h] == [0, 0, 0, 1]
