"""LLaMA-Adapter and AdapterV2: identity at init, the gated prefix against a hand-written
reference, KV-cache decoding, trainable counts, fine-tuning, adapter-only checkpoints,
and the guide's adapter patterns."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lab import GPT, Config
from lab.blocks import blocks_of
from lab.errors import AdapterError
from lab.finetune.adapter import apply_adapter
from lab.finetune.adapter_v2 import AdapterV2Linear, apply_adapter_v2
from lab.finetune.core import (
    METHODS,
    load_adapter,
    mark_only_adapter_as_trainable,
    register_method,
    save_adapter,
)
from lab.formulas import trainable_parameters
from lab.generate import generate

TINY = dict(
    n_layer=3, n_embd=32, n_head=4, n_query_groups=2, vocab_size=40, block_size=32,
    intermediate_size=64,
)  # fmt: skip
VARIANTS = {
    "gqa": {},
    "mqa-qknorm-parallel": dict(
        n_query_groups=1, norm_qk=True, parallel_residual=True, mlp_class_name="MLP",
        norm_class_name="LayerNorm", bias=True, activation="gelu",
    ),
    "softcap-window-alibi": dict(
        positional="alibi", attention_logit_softcapping=20.0, sliding_window_size=4
    ),
}  # fmt: skip
APPLY = {
    "adapter": lambda m: apply_adapter(m, prompt_length=3, start_layer=1),
    "adapter_v2": lambda m: apply_adapter_v2(m, prompt_length=3, start_layer=1),
}


def base_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config(**{**TINY, **overrides})).eval()


def tokens(T: int = 12, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, TINY["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed)
    )


def perturb(model: nn.Module) -> None:
    """Move every adapter parameter away from its identity value."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "adapter_" in name:
                param.add_(torch.randn_like(param) * 0.5)


@pytest.mark.parametrize("method", APPLY)
@pytest.mark.parametrize("variant", VARIANTS)
def test_identity_at_initialisation(method: str, variant: str) -> None:
    model = base_model(**VARIANTS[variant])
    x = tokens()
    with torch.no_grad():
        before = model(x)
        APPLY[method](model)
        after = model(x)
    assert torch.equal(before, after)  # exactly: the gates are zero, scales one
    perturb(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), before, atol=1e-3)


def reference_attention(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The adapter attention written out from the weights (no positions): causal softmax
    over the sequence plus the gate times a separate softmax over the prefix keys."""
    nh, ng, hs = attention.n_head, attention.n_query_groups, attention.head_size
    W = attention.attn.weight
    Wq, Wk, Wv = W.split([nh * hs, ng * hs, ng * hs])

    def heads(h: torch.Tensor, n: int) -> torch.Tensor:  # (B, T, n hs) -> (B, nh, T, hs)
        return h.view(*h.shape[:2], n, hs).transpose(1, 2).repeat_interleave(nh // n, dim=1)

    q, k, v = heads(x @ Wq.T, nh), heads(x @ Wk.T, ng), heads(x @ Wv.T, ng)
    prefix = attention.adapter_prefix[None]
    ak, av = heads(prefix @ Wk.T, ng), heads(prefix @ Wv.T, ng)
    T = x.size(1)
    scores = (q @ k.transpose(-1, -2)) / hs**0.5
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = scores.softmax(-1) @ v
    y_prefix = ((q @ ak.transpose(-1, -2)) / hs**0.5).softmax(-1) @ av
    y = y + attention.adapter_gate.view(1, nh, 1, 1) * y_prefix
    return y.transpose(1, 2).reshape(*x.shape[:2], nh * hs) @ attention.proj.weight.T


def test_prefix_attention_matches_a_reference() -> None:
    model = apply_adapter(base_model(positional="none"), prompt_length=5, start_layer=0)
    perturb(model)
    attention = model.transformer.h[0].attn
    x = torch.randn(2, 7, TINY["n_embd"])
    with torch.no_grad():
        torch.testing.assert_close(attention(x), reference_attention(attention, x))


@pytest.mark.parametrize("method", APPLY)
@pytest.mark.parametrize("variant", ["gqa", "mqa-qknorm-parallel"])
def test_kv_cache_decoding_equals_full_recompute(method: str, variant: str) -> None:
    model = APPLY[method](base_model(**VARIANTS[variant]))
    perturb(model)
    x = tokens(T=10, B=2)
    with torch.no_grad():
        full = model(x)
        model.set_kv_cache(batch_size=2, max_seq_length=10)
        steps = [model(x[:, :6], input_pos=torch.arange(6))]
        steps += [model(x[:, t : t + 1], input_pos=torch.tensor([t])) for t in range(6, 10)]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_prefix_keys_are_computed_once_per_generation(monkeypatch) -> None:
    from lab.finetune import adapter

    model = apply_adapter(base_model(), prompt_length=3, start_layer=1)
    perturb(model)
    calls = []
    project = adapter.CausalSelfAttention._project_prefix
    monkeypatch.setattr(
        adapter.CausalSelfAttention,
        "_project_prefix",
        lambda self: calls.append(self.block_idx) or project(self),
    )
    cached = generate(model, tokens(T=5, B=1)[0], 6, temperature=0, kv_cache=True)
    assert sorted(calls) == [1, 2]  # once per adapted layer, not once per step
    uncached = generate(model, tokens(T=5, B=1)[0], 6, temperature=0, kv_cache=False)
    assert torch.equal(cached, uncached)
    with torch.no_grad():  # an in-place update invalidates the cached keys
        model.transformer.h[1].attn.adapter_prefix.mul_(2.0)
        model(tokens())
    assert sorted(calls) == [1, 1, 2]  # only the changed layer recomputes


def test_trainable_parameter_counts() -> None:
    C, nh, P, adapted = TINY["n_embd"], TINY["n_head"], 3, 2  # layers 1 and 2
    model = APPLY["adapter"](base_model())
    mark_only_adapter_as_trainable(model)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == adapted * (P * C + nh)
    estimate = trainable_parameters(
        model.config, "adapter", adapter_prompt_length=P, adapter_start_layer=1
    )
    assert count == estimate  # lab.formulas agrees with the module

    model = APPLY["adapter_v2"](base_model())
    mark_only_adapter_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    count = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    qkv_out = (nh + 2 * TINY["n_query_groups"]) * (C // nh)
    # scale + bias per output of attn, proj, fc_1 (gated: 2 H), fc_2 in 3 layers, head
    per_layer = 2 * (qkv_out + C + 2 * TINY["intermediate_size"] + C)
    norms = 3 * 2 * C + C  # norm_1, norm_2 per layer, ln_f
    assert count == adapted * (P * C + nh) + 3 * per_layer + 2 * TINY["vocab_size"] + norms
    assert not any(n.endswith(("wte.weight", "attn.attn.weight")) for n in trainable)


@pytest.mark.parametrize("method", APPLY)
def test_fine_tuning_lowers_loss_and_keeps_base_weights(method: str) -> None:
    model = APPLY[method](base_model()).train()
    mark_only_adapter_as_trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert "transformer.h.1.attn.attn.weight" in frozen
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = tokens(T=16, B=4)
    y = x % 4  # a new task for the random base: only 4 of the 40 tokens are ever right
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # (the random base's attention outputs are tiny, so the prefix alone learns slowly)
    assert losses[-1] < losses[0] - 0.1
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


@pytest.mark.parametrize("method", APPLY)
def test_adapter_checkpoint_round_trip(method: str, tmp_path) -> None:
    base_dir = tmp_path / "base"
    base_model().save_pretrained(base_dir)
    model = APPLY[method](GPT.from_pretrained(base_dir).eval())
    mark_only_adapter_as_trainable(model)
    perturb(model)
    save_adapter(model, tmp_path / "adapter")
    files = {p.name: p.stat().st_size for p in (tmp_path / "adapter").iterdir()}
    assert set(files) == {"adapter.safetensors", "adapter.json"}
    assert files["adapter.safetensors"] < (base_dir / "model.safetensors").stat().st_size / 4

    restored = load_adapter(GPT.from_pretrained(base_dir).eval(), tmp_path / "adapter")
    assert restored.adapters == model.adapters
    x = tokens()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_loading_onto_a_different_base_fails_clearly(tmp_path) -> None:
    model = APPLY["adapter"](base_model())
    mark_only_adapter_as_trainable(model)
    save_adapter(model, tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"values of .* differ"):
        load_adapter(base_model(seed=1), tmp_path / "adapter")
    with pytest.raises(AdapterError, match="config n_layer"):
        load_adapter(base_model(n_layer=4), tmp_path / "adapter")
    other = apply_adapter(base_model(), prompt_length=4, start_layer=1)
    with pytest.raises(AdapterError, match="saved with"):
        load_adapter(other, tmp_path / "adapter")
    same_base_bf16 = base_model().to(torch.bfloat16)  # the same base in another dtype is fine
    load_adapter(same_base_bf16, tmp_path / "adapter")
    base_model().save_pretrained(tmp_path / "base")
    with pytest.raises(AdapterError, match="directory of its own"):
        save_adapter(model, tmp_path / "base")  # would replace the base checkpoint


def test_a_fourth_method_is_a_peer(tmp_path) -> None:
    """A user's method, registered in a few lines, is applied, frozen, saved, refused
    twice and loaded again by the shared core, like LoRA and the adapters."""

    @register_method("ia3")
    def apply_ia3(model: nn.Module, init: float = 1.0) -> None:
        """(IA)^3 in brief (Liu et al. 2022): a learned scale per channel of each MLP's output."""
        for block in blocks_of(model, "IA3"):
            block.mlp.ia3_scale = nn.Parameter(torch.full((model.config.n_embd,), init))
            block.mlp.register_forward_hook(lambda mlp, args, out: out * mlp.ia3_scale)

    try:
        base_dir = tmp_path / "base"
        base_model().save_pretrained(base_dir)
        model = GPT.from_pretrained(base_dir).eval()
        x = tokens()
        with torch.no_grad():
            before = model(x)
            assert torch.equal(apply_ia3(model)(x), before)  # scale 1: the base model
        mark_only_adapter_as_trainable(model)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == {f"transformer.h.{i}.mlp.ia3_scale" for i in range(3)}
        with pytest.raises(AdapterError, match="already applied"):
            apply_ia3(model)
        with torch.no_grad():
            for name in trainable:
                model.get_parameter(name).uniform_(0.5, 1.5)
            tuned = model(x)
        save_adapter(model, tmp_path / "ia3")
        restored = load_adapter(GPT.from_pretrained(base_dir).eval(), tmp_path / "ia3")
        assert restored.adapters == {"ia3": {"init": 1.0}}
        with torch.no_grad():
            assert torch.equal(restored(x), tuned)
    finally:
        del METHODS["ia3"]
    with pytest.raises(AdapterError, match="'ia3', which is not registered"):
        load_adapter(GPT.from_pretrained(base_dir), tmp_path / "ia3")


def test_bad_arguments_fail_clearly() -> None:
    with pytest.raises(AdapterError, match="start_layer"):
        apply_adapter(base_model(), start_layer=3)
    with pytest.raises(AdapterError, match="prompt_length"):
        apply_adapter(base_model(), prompt_length=0)
    model = apply_adapter(base_model())
    with pytest.raises(AdapterError, match="already applied"):
        apply_adapter_v2(model)
    with pytest.raises(AdapterError, match="not a lab GPT"):
        apply_adapter(nn.Linear(2, 2))
    with pytest.raises(AdapterError, match="MLP"):
        apply_adapter_v2(base_model(mlp_class_name="MoE", n_expert=2, n_expert_per_token=1))


# --- the guide's patterns (seed/custom-models.md, "Real Example: Adapter Fine-tuning") ---


def test_guide_adapter_config_pattern() -> None:
    from lab.config import Config as BaseConfig
    from lab.finetune.adapter import GPT as AdapterGPT

    @dataclass
    class Config(BaseConfig):
        """Adds adapter-specific parameters."""

        adapter_prompt_length: int = 10
        adapter_start_layer: int = 2

    config = Config(**TINY)
    assert (config.adapter_prompt_length, config.adapter_start_layer) == (10, 2)
    torch.manual_seed(0)
    model = AdapterGPT(config).eval()
    prefixes = {n: p.shape for n, p in model.named_parameters() if "adapter_prefix" in n}
    assert prefixes == {"transformer.h.2.attn.adapter_prefix": (10, TINY["n_embd"])}
    base = base_model()
    base.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.equal(model(tokens()), base(tokens()))
    with pytest.raises(AdapterError, match="adapter_prompt_length"):
        AdapterGPT(BaseConfig(**TINY))


def test_guide_adapter_v2_linear_pattern() -> None:
    in_features, out_features = 16, 24
    layer = AdapterV2Linear(in_features, out_features)
    plain = nn.Linear(in_features, out_features)
    plain.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(3, in_features)
    assert torch.equal(layer(x), plain(x))  # identity at initialisation
    with torch.no_grad():
        layer.adapter_scale.fill_(2.0)
        layer.adapter_bias.fill_(0.5)
    torch.testing.assert_close(layer(x), 2.0 * (plain(x) + 0.5))
    with pytest.raises(AdapterError, match="LoRALinear"):
        AdapterV2Linear(in_features, out_features, adapter_rank=8)


def test_adapter_attention_resets_the_base_attention_too():
    config = Config(**{**TINY, "attention_sinks": True})
    model = apply_adapter(GPT(config), prompt_length=2, start_layer=0)
    attention = model.transformer.h[0].attn
    with torch.no_grad():
        attention.sinks.fill_(3.0)
    attention.reset_parameters()
    assert torch.equal(attention.sinks, torch.zeros_like(attention.sinks))
