"""The 2025 MoE variants against transformers' own layers, weights copied across:
DeepSeek-V3 (group-limited sigmoid routing, routed scaling, shared experts), GPT-OSS
(biased router, experts with biases and the clamped SwiGLU, interleaved gate/up),
Qwen3-MoE (renormalised top-k) and Qwen3-Next (a sigmoid-gated shared expert)."""

import pytest
import torch

from lab import Config, ConfigError
from lab.moe import MoE

transformers = pytest.importorskip("transformers")

C, HIDDEN, E = 32, 16, 8  # width, expert width, experts


def lab_moe(**fields) -> MoE:
    base = dict(n_layer=1, n_embd=C, n_head=4, vocab_size=64, block_size=16)
    config = Config(
        **base, mlp_class_name="MoE", n_expert=E, moe_intermediate_size=HIDDEN, **fields
    )
    return MoE(config).eval()


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)


def copy_gated_mlp(lab_mlp, hf_mlp) -> None:
    lab_mlp.fc_1.weight.copy_(torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight]))
    lab_mlp.fc_2.weight.copy_(hf_mlp.down_proj.weight)


def inputs(scale: float = 1.0) -> torch.Tensor:
    return torch.randn(2, 5, C, generator=torch.Generator().manual_seed(1)) * scale


@torch.no_grad()
def test_deepseek_v3_group_limited_routing_matches_transformers():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_config = transformers.DeepseekV3Config(
        hidden_size=C, moe_intermediate_size=HIDDEN, n_routed_experts=E, num_experts_per_tok=3,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1,
        norm_topk_prob=True,
    )  # fmt: skip
    hf = DeepseekV3MoE(hf_config).eval()
    randomise(hf)
    ours = lab_moe(
        n_expert_per_token=3, router="sigmoid_bias", moe_n_group=4, moe_topk_group=2,
        moe_routed_scaling=2.5, n_shared_expert=1,
    )  # fmt: skip
    ours.router.weight.copy_(hf.gate.weight)
    ours.expert_bias.copy_(hf.gate.e_score_correction_bias)
    ours.experts.fc_1.copy_(hf.experts.gate_up_proj)
    ours.experts.fc_2.copy_(hf.experts.down_proj)
    copy_gated_mlp(ours.shared_experts, hf.shared_experts)
    x = inputs()
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)
    # the correction bias really decided: without it the choice (and output) differs
    ours.expert_bias.zero_()
    assert not torch.allclose(ours(x), hf(x), atol=1e-4)


def test_group_limited_routing_picks_only_from_the_best_groups():
    moe = lab_moe(n_expert_per_token=2, router="sigmoid_bias", moe_n_group=4, moe_topk_group=1)
    logits = torch.randn(64, E)
    _, indices, _ = moe.choose_experts(logits)
    groups = indices // (E // 4)
    assert (groups == groups[:, :1]).all()  # one group allowed: both experts from it


@torch.no_grad()
def test_gpt_oss_experts_match_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    hf_config = transformers.GptOssConfig(
        hidden_size=C, intermediate_size=HIDDEN, num_local_experts=E, num_experts_per_tok=2,
        swiglu_limit=0.7,
    )  # fmt: skip
    hf = GptOssMLP(hf_config).eval()
    randomise(hf)
    ours = lab_moe(n_expert_per_token=2, moe_bias=True, moe_swiglu_limit=0.7)
    ours.router.weight.copy_(hf.router.weight)
    ours.router.bias.copy_(hf.router.bias)
    gate_up, gate_up_bias = hf.experts.gate_up_proj, hf.experts.gate_up_proj_bias  # interleaved
    ours.experts.fc_1.copy_(torch.cat([gate_up[..., ::2], gate_up[..., 1::2]], -1).transpose(1, 2))
    ours.experts.fc_1_bias.copy_(torch.cat([gate_up_bias[:, ::2], gate_up_bias[:, 1::2]], -1))
    ours.experts.fc_2.copy_(hf.experts.down_proj.transpose(1, 2))
    ours.experts.fc_2_bias.copy_(hf.experts.down_proj_bias)
    x = inputs(scale=3.0)  # large enough that the clamp at 0.7 bites
    torch.testing.assert_close(ours(x), hf(x)[0], rtol=1e-5, atol=1e-5)
    ours.experts.swiglu_limit = None  # the stock SwiGLU instead: the clamp mattered
    assert not torch.allclose(ours(x), hf(x)[0], atol=1e-3)


@torch.no_grad()
def test_qwen3_moe_renormalised_top_k_is_topk_softmax():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_config = transformers.Qwen3MoeConfig(
        hidden_size=C, moe_intermediate_size=HIDDEN, num_experts=E, num_experts_per_tok=2,
        norm_topk_prob=True,
    )  # fmt: skip
    hf = Qwen3MoeSparseMoeBlock(hf_config).eval()
    randomise(hf)
    ours = lab_moe(n_expert_per_token=2, router="topk_softmax")
    ours.router.weight.copy_(hf.gate.weight)
    ours.experts.fc_1.copy_(hf.experts.gate_up_proj)
    ours.experts.fc_2.copy_(hf.experts.down_proj)
    x = inputs()
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_qwen3_next_gated_shared_expert_matches_transformers():
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    hf_config = transformers.Qwen3NextConfig(
        hidden_size=C, moe_intermediate_size=HIDDEN, shared_expert_intermediate_size=2 * HIDDEN,
        num_experts=E, num_experts_per_tok=2, norm_topk_prob=True,
    )  # fmt: skip
    hf = Qwen3NextSparseMoeBlock(hf_config).eval()
    randomise(hf)
    ours = lab_moe(n_expert_per_token=2, n_shared_expert=2, shared_expert_gate=True)
    ours.router.weight.copy_(hf.gate.weight)
    ours.experts.fc_1.copy_(hf.experts.gate_up_proj)
    ours.experts.fc_2.copy_(hf.experts.down_proj)
    copy_gated_mlp(ours.shared_experts, hf.shared_expert)
    ours.shared_gate.weight.copy_(hf.shared_expert_gate.weight)
    x = inputs()
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-5)


def test_expert_biases_get_gradients():
    moe = lab_moe(n_expert_per_token=2, moe_bias=True, moe_swiglu_limit=7.0).train()
    moe(inputs()).square().sum().backward()
    for tensor in (moe.router.bias, moe.experts.fc_1_bias, moe.experts.fc_2_bias):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (dict(router="sigmoid_bias", moe_n_group=3), "moe_n_group"),  # 8 experts, 3 groups
        (dict(router="topk_softmax", moe_n_group=4, moe_topk_group=2), "moe_n_group"),
        (dict(router="sigmoid_bias", moe_n_group=4, moe_topk_group=5), "moe_topk_group"),
        (dict(router="sigmoid_bias", n_expert_per_token=3, moe_n_group=4), "moe_topk_group"),
        (dict(moe_routed_scaling=0.0), "moe_routed_scaling"),
        (dict(moe_swiglu_limit=-1.0), "moe_swiglu_limit"),
        (dict(shared_expert_gate=True), "shared_expert_gate"),
    ],
)
def test_invalid_variants_name_their_field(fields, field):
    fields = {"n_expert_per_token": 2, **fields}
    with pytest.raises(ConfigError) as caught:
        lab_moe(**fields)
    assert caught.value.field == field


def test_gpt_oss_style_biases_everywhere_need_moe_bias():
    with pytest.raises(ConfigError, match="moe_bias=True"):
        lab_moe(n_expert_per_token=2, bias=True)
    layer = lab_moe(n_expert_per_token=2, bias=True, moe_bias=True)
    assert layer.router.bias is not None and layer.experts.fc_2_bias is not None
