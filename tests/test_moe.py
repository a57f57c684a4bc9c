"""lab.moe against independent references: a per-token loop written from the routers'
definitions, Hugging Face Mixtral, and the loss formulas computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lab import GPT, Config, ConfigError, GatedMLP
from lab.config import ROUTERS
from lab.moe import (
    MoE,
    auxiliary_loss,
    routing_records,
)


def small_config(**overrides) -> Config:
    values = dict(
        block_size=16, vocab_size=64, n_layer=2, n_embd=8, n_head=2, intermediate_size=12,
        mlp_class_name="MoE", n_expert=4, n_expert_per_token=2, moe_intermediate_size=6,
    )  # fmt: skip
    return Config(**{**values, **overrides})


def make_layer(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(small_config(**overrides))
    with torch.no_grad():  # larger router weights so that routing is far from uniform
        layer.router.weight.normal_(std=1.0)
        layer.experts.fc_1.normal_(std=0.3)
        layer.experts.fc_2.normal_(std=0.3)
        if layer.router_type == "sigmoid_bias":
            layer.expert_bias.normal_(std=0.5)
    return layer


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """A per-token loop following each router's definition (module docstring)."""
    B, T, C = x.shape
    tokens = x.reshape(-1, C)
    N, E, k = len(tokens), layer.n_expert, layer.k
    fc_1, fc_2 = layer.experts.fc_1, layer.experts.fc_2

    def expert(e: int, v: torch.Tensor) -> torch.Tensor:
        gate, up = (fc_1[e] @ v).chunk(2)
        return fc_2[e] @ (F.silu(gate) * up)

    logits = [layer.router.weight @ v for v in tokens]
    factor = layer.capacity_factor
    assignments = []  # (token, expert, gate)
    if layer.router_type == "expert_choice":
        capacity = min(N, math.ceil((factor or 1.0) * N * k / E))
        for e in range(E):
            score = [torch.softmax(logits[n], 0)[e] for n in range(N)]
            chosen = sorted(range(N), key=lambda n: -score[n].item())[:capacity]
            assignments += [(n, e, score[n]) for n in chosen]
    else:
        choices = []
        for n in range(N):
            z = logits[n]
            if layer.router_type == "topk_softmax":
                experts = sorted(range(E), key=lambda e: -z[e].item())[:k]
                gates = torch.softmax(z[experts], 0)
            elif layer.router_type == "softmax_topk":
                p = torch.softmax(z, 0)
                experts = sorted(range(E), key=lambda e: -p[e].item())[:k]
                gates = p[experts]
            else:
                s = torch.sigmoid(z)
                biased = s + layer.expert_bias
                experts = sorted(range(E), key=lambda e: -biased[e].item())[:k]
                gates = s[experts] / s[experts].sum()
            choices.append((experts, gates))
        capacity = None if factor is None else math.ceil(factor * N * k / E)
        load = [0] * E
        for r in range(k):  # first choices of every token before any second choice
            for n in range(N):
                e = choices[n][0][r]
                if capacity is None or load[e] < capacity:
                    load[e] += 1
                    assignments.append((n, e, choices[n][1][r]))
    out = [torch.zeros(C) for _ in range(N)]
    if layer.shared_experts is not None:
        out = [layer.shared_experts(v) for v in tokens]
    for n, e, gate in assignments:
        out[n] = out[n] + gate * expert(e, tokens[n])
    return torch.stack(out).view(B, T, C)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("n_shared_expert", [0, 1])
@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_dispatch_equals_naive_loop(router, n_shared_expert, capacity_factor):
    layer = make_layer(
        router=router, n_shared_expert=n_shared_expert, moe_capacity_factor=capacity_factor
    ).eval()
    x = torch.randn(2, 5, 8)
    with routing_records(layer) as records:
        y = layer(x)
    torch.testing.assert_close(y, naive_moe(layer, x), atol=1e-5, rtol=1e-5)
    record = records[""]
    if capacity_factor is not None and router != "expert_choice":
        assert record.dropped.any(), "the capacity must actually drop assignments here"


@pytest.mark.parametrize("tokens", [5, 1])  # one token leaves experts idle
def test_gradients_equal_naive_loop(tokens):
    layer = make_layer(router="topk_softmax", moe_capacity_factor=0.75, n_shared_expert=1)
    x = torch.randn(2, tokens, 8, requires_grad=True)
    params = [x, layer.router.weight, layer.experts.fc_1, layer.experts.fc_2]
    grads = torch.autograd.grad(layer(x).square().sum(), params)
    expected = torch.autograd.grad(naive_moe(layer, x).square().sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_grouped_mm_path_equals_loop(monkeypatch):
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    # widths in multiples of 16 bytes; capacity so that some experts get few tokens
    layer = make_layer(n_expert=6, moe_intermediate_size=8, moe_capacity_factor=0.5)
    x = torch.randn(2, 7, 8, requires_grad=True)
    results = []
    for grouped in (False, True):
        monkeypatch.setattr(layer.experts, "use_grouped_mm", grouped)
        y = layer(x)
        results.append((y, *torch.autograd.grad(y.sum(), [x, layer.experts.fc_1])))
    for loop, grouped in zip(*results, strict=True):
        torch.testing.assert_close(grouped, loop, atol=1e-5, rtol=1e-5)


def test_matches_hugging_face_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import (
        MixtralSparseMoeBlock,
        load_balancing_loss_func,
    )

    hf_config = MixtralConfig(
        hidden_size=8, intermediate_size=6, num_local_experts=4, num_experts_per_tok=2
    )
    torch.manual_seed(0)
    hf = MixtralSparseMoeBlock(hf_config).eval()
    for param in hf.parameters():
        torch.nn.init.normal_(param, std=0.5)
    layer = MoE(small_config(router="topk_softmax")).eval()
    layer.load_state_dict(
        {
            "router.weight": hf.gate.weight,
            "experts.fc_1": hf.experts.gate_up_proj,
            "experts.fc_2": hf.experts.down_proj,
        }
    )
    x = torch.randn(3, 5, 8)
    with routing_records(layer) as records:
        y = layer(x)
    torch.testing.assert_close(y, hf(x), atol=1e-5, rtol=1e-5)
    hf_loss = load_balancing_loss_func((hf.gate(x)[0],), num_experts=4, top_k=2)
    torch.testing.assert_close(records[""].aux_losses["load_balancing"], hf_loss)


def test_losses_match_formulas():
    layer = make_layer(router="softmax_topk", moe_aux_loss_coef=0.01, moe_z_loss_coef=0.001)
    x = torch.randn(2, 6, 8)
    with routing_records(layer) as records:
        layer(x)
    logits = x.reshape(-1, 8) @ layer.router.weight.T
    probs = logits.softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    # Switch: E * sum_i (tokens choosing i / N) * mean prob of i
    f = torch.stack([(chosen == i).any(-1).float().mean() for i in range(4)])
    balance = 4 * (f * probs.mean(0)).sum()
    z = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits]).mean()
    losses = records[""].aux_losses
    torch.testing.assert_close(losses["load_balancing"], balance)
    torch.testing.assert_close(losses["z"], z)
    torch.testing.assert_close(layer.aux_loss, 0.01 * balance + 0.001 * z)


def test_sigmoid_bias_moves_towards_balance():
    layer = make_layer(router="sigmoid_bias", n_expert=4, n_expert_per_token=1)
    layer.bias_update_rate = 0.05
    with torch.no_grad():
        layer.expert_bias.zero_()
        layer.router.weight[0] += 2.0 * layer.router.weight[1:].abs().max()  # skew to 0
    x = torch.randn(1, 64, 8).abs()
    with routing_records(layer) as records:
        layer(x)
    start = records[""].load
    assert layer.expert_bias[0] == -0.05 and (layer.expert_bias[1:] == 0.05).all()
    layer.record_routing = True
    loads = []
    for _ in range(60):
        layer(x)
        loads.append(layer.routing.load.float())
    end = torch.stack(loads[-20:]).mean(0)  # fixed-size sign steps oscillate: average
    assert end.max() - end.min() < (start.max() - start.min()) / 4, (start, end)


def test_expert_choice_fills_every_expert_and_is_not_causal():
    layer = make_layer(router="expert_choice", moe_capacity_factor=1.0).eval()
    x = torch.randn(1, 8, 8)
    with routing_records(layer) as records:
        y = layer(x)
    assert records[""].load.tolist() == [4, 4, 4, 4]  # ceil(1.0 * 8 * 2 / 4)
    assert records[""].expert_indices is None
    # a future token that outscores everyone takes a slot from earlier tokens
    x_future = x.clone()
    x_future[0, -1] = 100 * layer.router.weight.sum(0)
    assert not torch.allclose(layer(x_future)[0, :-1], y[0, :-1])


def test_auxiliary_loss_collects_every_layer_and_trains_the_router():
    config = small_config(
        moe_aux_loss_coef=0.01,
        moe_z_loss_coef=0.001,
        layer_overrides={0: {"mlp_class_name": "GatedMLP"}},
    )
    torch.manual_seed(0)
    model = GPT(config)
    assert isinstance(model.transformer.h[0].mlp, GatedMLP)
    assert isinstance(model.transformer.h[1].mlp, MoE)
    idx = torch.randint(0, 64, (2, 8))
    model(idx)
    moe = model.transformer.h[1].mlp
    total = auxiliary_loss(model)
    assert total.item() > 0
    torch.testing.assert_close(total, moe.aux_loss)
    total.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    model.eval()
    model(idx)
    assert moe.aux_loss is None and auxiliary_loss(model).item() == 0.0
    assert auxiliary_loss(GPT(small_config(mlp_class_name="GatedMLP"))).item() == 0.0


def test_records_only_when_asked_and_consistent():
    model = GPT(small_config(moe_capacity_factor=0.5))
    idx = torch.randint(0, 64, (2, 8))
    model(idx)
    assert all(block.mlp.routing is None for block in model.transformer.h)
    with routing_records(model) as records:
        model(idx)
    assert sorted(records) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert all(
        block.mlp.routing is None and not block.mlp.record_routing for block in model.transformer.h
    )
    record = records["transformer.h.1.mlp"]
    assert record.expert_indices.shape == (2, 8, 2) and record.combine_weights.shape == (2, 8, 4)
    capacity = math.ceil(0.5 * 16 * 2 / 4)
    assert record.load.tolist() == [
        min(capacity, int((record.expert_indices == e).sum())) for e in range(4)
    ]
    processed = record.combine_weights > 0
    assert int(processed.sum()) == int(record.load.sum())
    selected = F.one_hot(record.expert_indices, 4).bool().any(-2)
    assert torch.equal(processed | record.dropped, selected)
    assert not (processed & record.dropped).any()
    torch.testing.assert_close(record.router_probs.sum(-1), torch.ones(2, 8))


def test_reset_parameters_scales_down_projections():
    torch.manual_seed(0)
    config = small_config(
        n_layer=8, n_embd=64, n_head=4, n_expert=8, moe_intermediate_size=64, n_shared_expert=2
    )
    moe = GPT(config).transformer.h[0].mlp
    down = 0.02 / math.sqrt(2 * 8)
    assert moe.experts.fc_2.std().item() == pytest.approx(down, rel=0.05)
    assert moe.shared_experts.fc_2.weight.std().item() == pytest.approx(down, rel=0.05)
    assert moe.experts.fc_1.std().item() == pytest.approx(0.02, rel=0.05)


def test_mixtral_builds_on_meta_with_published_size():
    config = Config.from_name("Mixtral-8x7B-v0.1")
    with torch.device("meta"):
        model = GPT(config)
    assert sum(p.numel() for p in model.parameters()) == 46_702_792_704


def test_bias_is_refused():
    with pytest.raises(ConfigError, match="bias=False"):
        MoE(small_config(bias=True))
