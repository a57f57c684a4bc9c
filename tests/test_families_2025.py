"""The families of 2025 decode incrementally: with the KV cache (or a mixer's own state)
the logits equal those of a full forward pass, and greedy generation is the same with
and without it. Each tiny model is read from a config.json of its family, so the layer
pattern under test is the one that family's files describe."""

from __future__ import annotations

import pytest
import torch

from lab import GPT, Config, ConfigError
from lab.generate import generate, supports_kv_cache
from lab.hf import config_from_hf

VOCAB = 64
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=48, max_position_embeddings=64,
)  # fmt: skip
# Windows of 4 tokens against 20-token sequences: the sliding layers really slide.
FAMILIES_2025 = {
    "qwen3_moe": dict(
        TINY, num_hidden_layers=3, head_dim=8, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
    ),
    "gemma3_text": dict(
        TINY, num_hidden_layers=4, head_dim=8, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
            "sliding_attention": dict(rope_type="default", rope_theta=1e4),
        },
    ),
    "olmo2": dict(TINY, num_hidden_layers=2),
    "smollm3": dict(TINY, num_hidden_layers=4, no_rope_layer_interval=2),
    # sinks, sliding and full layers alternating, YaRN, biased experts
    "gpt_oss": dict(
        TINY, num_hidden_layers=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=4, swiglu_limit=1.0,
        rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4, truncate=False,
                             original_max_position_embeddings=16),
    ),
    # MLA (its latent cache), group-limited routing, a dense first layer
    "deepseek_v3": dict(
        TINY, num_hidden_layers=2, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1, q_lora_rank=16,
        kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
    ),
    # Gated DeltaNet (its recurrent state) and gated full attention, every other layer
    "qwen3_next": dict(
        TINY, num_hidden_layers=2, head_dim=8, layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, norm_topk_prob=True,
    ),
}  # fmt: skip


def tiny_model(model_type: str) -> GPT:
    """A random model of the family, norm weights and biases away from their init so
    that every tensor matters, and logits spread wide so greedy choices are not ties."""
    config = config_from_hf({"model_type": model_type, **FAMILIES_2025[model_type]})
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.ndim == 1 and tensor.is_floating_point():
                tensor.normal_(0.0 if name.endswith(("bias", "sinks")) else 1.0, 0.2)
        model.lm_head.weight.mul_(20)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES_2025))
def model(request) -> GPT:
    return tiny_model(request.param)


@torch.no_grad()
def test_cache_equals_full_forward(model):
    assert supports_kv_cache(model)
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    expected = model(idx)
    model.set_kv_cache(batch_size=2, max_seq_length=24)
    try:
        steps = [model(idx[:, :7], input_pos=torch.arange(7))]  # a prefill, then one at a time
        steps += [model(idx[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(7, 20)]
    finally:
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_and_without_cache(model):
    prompt = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(2))
    cached = generate(model, prompt, 12, temperature=0, kv_cache=True)
    recomputed = generate(model, prompt, 12, temperature=0, kv_cache=False)
    assert torch.equal(cached, recomputed)


def test_layer_patterns_come_from_the_config_json():
    """What the cache tests rely on: the tiny models have both kinds of layer."""
    gemma = tiny_model("gemma3_text").config
    windows = [gemma.for_layer(i).sliding_window_size for i in range(4)]
    assert windows == [4, 4, None, 4]
    assert [gemma.for_layer(i).rope_base for i in range(4)] == [1e4, 1e4, 1e6, 1e4]
    smol = tiny_model("smollm3").config
    assert [smol.for_layer(i).positional for i in range(4)] == ["rope", "none", "rope", "none"]
    qwen = tiny_model("qwen3_moe").config
    assert [qwen.for_layer(i).mlp_class_name for i in range(3)] == ["MoE", "GatedMLP", "MoE"]
    oss = tiny_model("gpt_oss").config
    assert [oss.for_layer(i).sliding_window_size for i in range(2)] == [4, None]
    assert oss.attention_sinks and oss.moe_bias
    deepseek = tiny_model("deepseek_v3").config
    assert [deepseek.for_layer(i).mlp_class_name for i in range(2)] == ["GatedMLP", "MoE"]
    next_ = tiny_model("qwen3_next").config
    mixers = [next_.for_layer(i).attention_class_name for i in range(2)]
    assert mixers == ["GatedDeltaNet", "CausalSelfAttention"]


@torch.no_grad()
def test_caches_hold_what_each_mixer_needs():
    """MLA caches the normalised latent and the one rotary key, not keys and values per
    head; Gated DeltaNet keeps a state whose size does not depend on the length."""
    deepseek = tiny_model("deepseek_v3")
    deepseek.set_kv_cache(batch_size=1, max_seq_length=24)
    cache = deepseek.transformer.h[0].attn.kv_cache
    assert (cache.k.shape, cache.v.shape) == ((1, 1, 24, 12), (1, 1, 24, 4))
    qwen = tiny_model("qwen3_next")
    qwen.set_kv_cache(batch_size=1, max_seq_length=24)
    state = qwen.transformer.h[0].attn.kv_cache
    assert state.state.shape == (1, 4, 8, 8) and state.conv.shape == (1, 3, 2 * 16 + 32)
    qwen.set_kv_cache(batch_size=1, max_seq_length=48)
    assert qwen.transformer.h[0].attn.kv_cache.state.shape == (1, 4, 8, 8)
    oss = tiny_model("gpt_oss")
    assert oss.transformer.h[0].attn.sinks.abs().sum() > 0  # the sinks take part below


def test_yarn_options_of_gpt_oss_and_deepseek_are_config_values():
    """GPT-OSS's untruncated ramp and DeepSeek's mscale are ``rope_scaling`` keys."""
    base = dict(n_layer=1, n_embd=32, n_head=4, vocab_size=VOCAB)
    yarn = {"type": "yarn", "factor": 4.0, "truncate": False, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert Config(**base, rope_scaling=yarn).rope_scaling["truncate"] is False
    with pytest.raises(ConfigError, match="truncate"):
        Config(**base, rope_scaling=dict(yarn, truncate="no"))


def test_hub_forms_of_the_layer_patterns():
    """Older config.json forms: Qwen3-Next's full_attention_interval, SmolLM3's explicit
    no_rope_layers, Qwen3-MoE's decoder_sparse_step, DeepSeek's first_k_dense_replace."""
    next_ = config_from_hf(
        {"model_type": "qwen3_next", **dict(FAMILIES_2025["qwen3_next"], layer_types=None),
         "num_hidden_layers": 4, "full_attention_interval": 2}
    )  # fmt: skip
    mixers = [next_.for_layer(i).attention_class_name for i in range(4)]
    assert mixers == ["GatedDeltaNet", "CausalSelfAttention"] * 2
    smol = config_from_hf(
        {"model_type": "smollm3", **FAMILIES_2025["smollm3"], "no_rope_layers": [0, 1, 1, 1]}
    )
    assert [smol.for_layer(i).positional for i in range(4)] == ["none", "rope", "rope", "rope"]
    qwen = config_from_hf(
        {"model_type": "qwen3_moe", **FAMILIES_2025["qwen3_moe"], "mlp_only_layers": [],
         "decoder_sparse_step": 3}
    )  # fmt: skip
    assert [qwen.for_layer(i).mlp_class_name for i in range(3)] == ["GatedMLP"] * 2 + ["MoE"]
    deepseek = config_from_hf(
        {"model_type": "deepseek_v3", **FAMILIES_2025["deepseek_v3"], "first_k_dense_replace": 2}
    )
    assert {deepseek.for_layer(i).mlp_class_name for i in range(2)} == {"GatedMLP"}
