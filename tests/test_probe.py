"""lab.probe: captured patterns equal a naive softmax(QK^T) computed from the weights,
only what was asked for is materialised, hooks can edit, and nothing is left behind."""

import math

import pytest
import torch

import lab
from lab.model import CausalSelfAttention
from lab.positional import alibi_slopes
from lab.probe import ablate_heads, hook_points, patch, probe

V, T = 61, 10


def tiny(**fields) -> lab.GPT:
    torch.manual_seed(0)
    values = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=V, block_size=32) | fields
    return lab.GPT(lab.Config(**values)).eval()


def ids(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


def naive_pattern(attn: CausalSelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + bias) for normed input x (B, T, C), from the weights.
    RoPE is applied as a complex rotation of (x_i, x_{i + hs/2}) pairs, independently of
    lab.positional's rotate-half code."""
    cfg = attn.config
    nh, ng, hs = cfg.n_head, cfg.n_query_groups, cfg.head_size
    w_q, w_k, _ = attn.attn.weight.split((nh * hs, ng * hs, ng * hs))
    q = (x @ w_q.T).view(*x.shape[:2], nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = (x @ w_k.T).view(*x.shape[:2], ng, hs).transpose(1, 2)  # (B, ng, T, hs)
    pos = torch.arange(x.size(1), dtype=torch.float64)
    if cfg.positional == "rope":
        freqs = cfg.rope_base ** -(torch.arange(hs // 2, dtype=torch.float64) * 2 / hs)
        turn = torch.polar(torch.ones(len(pos), hs // 2, dtype=torch.float64), pos[:, None] * freqs)

        def rotate(t: torch.Tensor) -> torch.Tensor:
            z = torch.complex(t[..., : hs // 2].double(), t[..., hs // 2 :].double()) * turn
            return torch.cat((z.real, z.imag), dim=-1).float()

        q, k = rotate(q), rotate(k)
    rows = []
    for h in range(nh):
        kh = k[:, h // (nh // ng)]  # query head h reads key/value group h // (nh / ng)
        rows.append(q[:, h] @ kh.transpose(-1, -2) / math.sqrt(hs))
    scores = torch.stack(rows, dim=1)
    distance = pos[:, None] - pos[None, :]  # query position - key position
    if cfg.positional == "alibi":
        scores = scores - alibi_slopes(nh)[:, None, None] * distance.float()
    allowed = distance >= 0
    if cfg.sliding_window_size is not None:
        allowed &= distance < cfg.sliding_window_size
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1)


@pytest.mark.parametrize(
    "fields",
    [
        dict(n_query_groups=4),  # MHA
        dict(n_query_groups=2),  # GQA
        dict(n_query_groups=1),  # MQA
        dict(n_query_groups=2, positional="alibi"),
        dict(sliding_window_size=3),
    ],
    ids=["mha-rope", "gqa-rope", "mqa-rope", "gqa-alibi", "window-rope"],
)
def test_pattern_equals_naive_softmax_of_qk(fields):
    model = tiny(**fields)
    with torch.no_grad(), probe(model, "pattern", "resid_pre") as cache:
        model(ids())
    assert set(cache) == {f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn.pattern", "resid_pre")}
    for i, block in enumerate(model.transformer.h):
        expected = naive_pattern(block.attn, block.norm_1(cache[f"blocks.{i}.resid_pre"]))
        torch.testing.assert_close(cache[f"blocks.{i}.attn.pattern"], expected, atol=1e-5, rtol=0)


def test_scores_are_the_masked_logits_of_the_pattern():
    model = tiny(n_query_groups=2)
    with torch.no_grad(), probe(model, "blocks.1.attn") as cache:
        model(ids())
    assert set(cache) == {"blocks.1.attn.scores", "blocks.1.attn.pattern", "blocks.1.attn.out"}
    scores = cache["blocks.1.attn.scores"]
    assert scores.shape == (2, 4, T, T)
    assert torch.isneginf(scores.triu(1)[..., torch.ones(T, T).triu(1).bool()]).all()
    torch.testing.assert_close(scores.softmax(-1), cache["blocks.1.attn.pattern"])


def test_residual_stream_and_mlp_activations_match_a_recomputation():
    model = tiny(n_query_groups=2)
    idx = ids()
    with torch.no_grad(), probe(model, "blocks.0") as cache:
        model(idx)
    block = model.transformer.h[0]
    torch.testing.assert_close(cache["blocks.0.resid_pre"], model.transformer.wte(idx))
    mid = cache["blocks.0.resid_pre"] + cache["blocks.0.attn.out"]
    gate, up = block.mlp.fc_1(block.norm_2(mid)).chunk(2, dim=-1)
    torch.testing.assert_close(cache["blocks.0.mlp.post"], torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(cache["blocks.0.resid_post"], mid + cache["blocks.0.mlp.out"])


def hooks_left(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or "attention_hook" in vars(m)
    ]


def test_probe_off_gives_identical_logits_and_leaves_no_hooks():
    model = tiny(n_query_groups=2)
    idx = ids()
    with torch.no_grad():
        before = model(idx)
        with probe(model, "*") as cache:
            during = model(idx)
            assert hooks_left(model)
        after = model(idx)
    assert len(cache) == len(hook_points(model)) == 14
    assert torch.equal(before, after)
    torch.testing.assert_close(during, before, atol=1e-5, rtol=0)  # unfused vs fused kernel
    assert hooks_left(model) == []


def test_hooks_are_removed_when_the_forward_pass_fails():
    model = tiny()
    with pytest.raises(ValueError, match="block_size"), probe(model, "attn", "resid_post"):
        model(torch.zeros(1, 40, dtype=torch.long))
    assert hooks_left(model) == []


def test_layers_not_asked_for_keep_the_fused_kernel(monkeypatch):
    model = tiny()
    calls = []
    original = CausalSelfAttention.attention_weights

    def spy(self, *args):
        calls.append(self.block_idx)
        return original(self, *args)

    monkeypatch.setattr(CausalSelfAttention, "attention_weights", spy)
    with torch.no_grad(), probe(model, "blocks.1.attn.pattern") as cache:
        model(ids())
    assert list(cache) == ["blocks.1.attn.pattern"] and calls == [1]
    calls.clear()
    with torch.no_grad(), probe(model, "resid_post", "mlp.post") as cache:
        model(ids())
    assert calls == [] and len(cache) == 4


def test_callable_filter_and_glob():
    model = tiny()
    with (
        torch.no_grad(),
        probe(model, lambda n: n.endswith("resid_post"), "blocks.*.attn.scores") as c,
    ):
        model(ids())
    assert sorted(c) == [
        "blocks.0.attn.scores", "blocks.0.resid_post", "blocks.1.attn.scores", "blocks.1.resid_post"
    ]  # fmt: skip


def test_ablating_a_head_equals_zeroing_its_slice_of_the_output_projection():
    model, idx = tiny(n_query_groups=2), ids()
    with torch.no_grad(), probe(model, hooks={"blocks.0.attn.pattern": ablate_heads(1, 3)}):
        ablated = model(idx)
    reference = tiny(n_query_groups=2)
    hs = reference.config.head_size
    with torch.no_grad():
        for head in (1, 3):
            reference.transformer.h[0].attn.proj.weight[:, head * hs : (head + 1) * hs] = 0
        expected = reference(idx)
        assert not torch.allclose(expected, model(idx), atol=1e-4)  # the heads mattered
    torch.testing.assert_close(ablated, expected, atol=1e-5, rtol=0)


def test_patching_a_residual_stream_transplants_the_rest_of_the_forward_pass():
    model, clean, corrupt = tiny(), ids(1), ids(2)
    with torch.no_grad():
        with probe(model, "blocks.1.resid_pre") as cache:
            clean_logits = model(clean)
        hooks = {"blocks.1.resid_pre": patch(cache["blocks.1.resid_pre"])}
        with probe(model, "blocks.1.resid_pre", hooks=hooks) as patched:
            patched_logits = model(corrupt)
    assert torch.equal(patched["blocks.1.resid_pre"], cache["blocks.1.resid_pre"])
    torch.testing.assert_close(patched_logits, clean_logits)
    with pytest.raises(ValueError, match="shape"), probe(model, hooks=hooks):
        model(corrupt[:, :5])


def test_probe_sees_one_new_token_against_the_kv_cache():
    model, idx = tiny(), ids(batch=1)
    model.set_kv_cache(1, 16)
    with torch.no_grad():
        model(idx, input_pos=torch.arange(T))
        with probe(model, "blocks.0.attn.pattern") as cache:
            model(idx[:, :1], input_pos=torch.tensor([T]))
    pattern = cache["blocks.0.attn.pattern"]
    assert pattern.shape == (1, 4, 1, T + 1)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(1, 4, 1))


def test_bad_requests_name_the_fix():
    model = tiny()
    with pytest.raises(ValueError, match="records nothing"), probe(model):
        pass
    with pytest.raises(ValueError, match=r"'blocks\.7' selects nothing"), probe(model, "blocks.7"):
        pass
    with pytest.raises(TypeError, match=r"transformer\.h"), probe(torch.nn.Linear(2, 2), "*"):
        pass


def test_routing_records_only_moe_layers_and_match_the_router():
    model = tiny(
        mlp_class_name="MoE", n_expert=4, n_expert_per_token=2, intermediate_size=48,
        layer_overrides={0: {"mlp_class_name": "GatedMLP"}},
    )  # fmt: skip
    with torch.no_grad(), probe(model, "routing", "blocks.1.resid_pre", "blocks.1.attn.out") as c:
        model(ids())
    assert sorted(c) == ["blocks.1.attn.out", "blocks.1.mlp.routing", "blocks.1.resid_pre"]
    block = model.transformer.h[1]
    mid = c["blocks.1.resid_pre"] + c["blocks.1.attn.out"]
    expected = block.mlp.router(block.norm_2(mid)).topk(2, dim=-1).indices.sort(-1).values
    record = c["blocks.1.mlp.routing"]
    assert torch.equal(record.expert_indices.sort(-1).values, expected)
    assert int(record.load.sum()) == 2 * 2 * T
    assert block.mlp.record_routing is False and hooks_left(model) == []
