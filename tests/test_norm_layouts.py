"""Norm placements of 2025: OLMo 2 (post-norm only, QK-norm over whole projections)
and Gemma 3 (sandwich norms, per-head QK-norm with Gemma's unit offset), checked
against transformers' decoder layers with weights copied across."""

import pytest
import torch

from lab import Config
from lab.model import Block

transformers = pytest.importorskip("transformers")

C, NH, NG, HS = 32, 4, 2, 8


def copy_attention(block: Block, attn) -> None:
    block.attn.attn.weight.copy_(
        torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    )
    block.attn.proj.weight.copy_(attn.o_proj.weight)
    block.attn.norm_q.weight.copy_(attn.q_norm.weight)
    block.attn.norm_k.weight.copy_(attn.k_norm.weight)


def copy_mlp(block: Block, mlp) -> None:
    block.mlp.fc_1.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    block.mlp.fc_2.weight.copy_(mlp.down_proj.weight)


def randomise(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


def hf_rotary(model_cls, hf_config, x):
    rotary = model_cls(hf_config).rotary_emb
    positions = torch.arange(x.size(1))[None]
    return rotary(x, positions)


@torch.no_grad()
def test_olmo2_layer_matches_transformers():
    from transformers.models.olmo2 import modeling_olmo2 as olmo2

    hf_config = transformers.Olmo2Config(
        hidden_size=C, num_attention_heads=NH, num_key_value_heads=NG, intermediate_size=48,
        num_hidden_layers=1, vocab_size=64, rms_norm_eps=1e-6, attn_implementation="eager",
    )  # fmt: skip
    hf = olmo2.Olmo2DecoderLayer(hf_config, 0).eval()
    randomise(hf)
    config = Config(
        n_layer=1, n_embd=C, n_head=NH, n_query_groups=NG, intermediate_size=48,
        vocab_size=64, block_size=16, norm_eps=1e-6, pre_norm=False,
        post_attention_norm=True, post_mlp_norm=True, norm_qk=True, norm_qk_per_head=False,
    )  # fmt: skip
    ours = Block(config).eval()
    assert not list(ours.norm_1.parameters()) and not list(ours.norm_2.parameters())
    copy_attention(ours, hf.self_attn)
    copy_mlp(ours, hf.mlp)
    ours.post_attention_norm.weight.copy_(hf.post_attention_layernorm.weight)
    ours.post_mlp_norm.weight.copy_(hf.post_feedforward_layernorm.weight)
    x = torch.randn(2, 6, C)
    cos_sin = hf_rotary(olmo2.Olmo2Model, hf_config, x)
    causal = torch.full((6, 6), float("-inf")).triu(1)[None, None]
    expected = hf(x, position_embeddings=cos_sin, attention_mask=causal)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_gemma3_layer_matches_transformers():
    from transformers.models.gemma3 import modeling_gemma3 as gemma3

    hf_config = transformers.Gemma3TextConfig(
        hidden_size=C, num_attention_heads=NH, num_key_value_heads=NG, head_dim=HS,
        intermediate_size=48, num_hidden_layers=1, vocab_size=64, query_pre_attn_scalar=16,
        sliding_window=4, layer_types=["full_attention"], attn_implementation="eager",
    )  # fmt: skip
    hf = gemma3.Gemma3DecoderLayer(hf_config, 0).eval()
    randomise(hf)
    config = Config(
        n_layer=1, n_embd=C, n_head=NH, n_query_groups=NG, head_size=HS, intermediate_size=48,
        vocab_size=64, block_size=16, norm_eps=1e-6, norm_unit_offset=True,
        activation="gelu_tanh", post_attention_norm=True, post_mlp_norm=True, norm_qk=True,
        attention_scale=16**-0.5, rope_base=1e6,  # Gemma 3's global layers
    )  # fmt: skip
    ours = Block(config).eval()
    copy_attention(ours, hf.self_attn)
    copy_mlp(ours, hf.mlp)
    ours.norm_1.weight.copy_(hf.input_layernorm.weight)
    ours.post_attention_norm.weight.copy_(hf.post_attention_layernorm.weight)
    ours.norm_2.weight.copy_(hf.pre_feedforward_layernorm.weight)
    ours.post_mlp_norm.weight.copy_(hf.post_feedforward_layernorm.weight)
    x = torch.randn(2, 6, C)
    rotary = gemma3.Gemma3TextModel(hf_config).rotary_emb
    cos_sin = rotary(x, torch.arange(6)[None], layer_type="full_attention")
    causal = torch.full((6, 6), float("-inf")).triu(1)[None, None]
    expected = hf(x, position_embeddings=cos_sin, attention_mask=causal)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
