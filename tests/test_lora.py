"""LoRA: the update against an explicit reference (GQA parts of the fused QKV), identity
at init, exact merging, trainable counts (and lab.memory's estimate), freezing modes,
fine-tuning, adapter-only checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lab import GPT, Config
from lab.errors import AdapterError
from lab.finetune.core import load_adapter, save_adapter
from lab.finetune.lora import (
    TARGETS,
    LoRALinear,
    apply_lora,
    mark_only_lora_as_trainable,
    merge_lora,
    unmerge_lora,
)
from lab.memory import estimate_memory, measure_memory

TINY = dict(
    n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=40, block_size=32,
    intermediate_size=64,
)  # fmt: skip
C, H, V, HS = 32, 64, 40, 8
Q_OUT, KV_OUT = 4 * HS, 2 * HS  # GQA: 4 query heads, 2 key/value heads


def base_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config(**{**TINY, **overrides})).eval()


def tokens(T: int = 12, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def randomise_B(model: nn.Module) -> None:
    """B starts at zero; give it values so the update shows."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.1)


def test_lora_linear_matches_the_formula() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(16, 24, r=4, lora_alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 16)
    expected = x @ layer.weight.T + layer.bias + (8.0 / 4) * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)


def test_fused_qkv_is_adapted_per_gqa_part() -> None:
    """query and value adapted, key not: each part has its own rank-r pair (as peft on
    separate q_proj/v_proj layers), and the key rows get no update."""
    model = apply_lora(base_model(), r=2, lora_alpha=6.0, targets=["query", "value"])
    randomise_B(model)
    layer = model.transformer.h[0].attn.attn
    assert layer.lora_A.shape == (2 * 2, C) and layer.lora_B.shape == (Q_OUT + KV_OUT, 2)
    A_q, A_v = layer.lora_A.split(2)
    B_q, B_v = layer.lora_B.split([Q_OUT, KV_OUT])
    zero_k = torch.zeros(KV_OUT, C)
    delta = torch.cat([B_q @ A_q, zero_k, B_v @ A_v]) * 3.0
    x = torch.randn(2, 5, C)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.weight + delta).T)
        torch.testing.assert_close(layer.delta_weight(), delta)


@pytest.mark.parametrize(
    "targets", [["query", "value"], ["key"], list(TARGETS)], ids=["qv", "k", "all"]
)
def test_identity_at_init_and_exact_merge(targets: list[str]) -> None:
    model = base_model(bias=True)
    x = tokens()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(x)
        apply_lora(model, r=4, targets=targets)
        assert torch.equal(model(x), before)  # B = 0: exactly the base model
        randomise_B(model)
        unmerged = model(x)
        assert not torch.allclose(unmerged, before, atol=1e-3)
        merge_lora(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    for name, param in model.named_parameters():  # back to the base, up to rounding
        if name in base_weights:
            torch.testing.assert_close(param, base_weights[name], atol=1e-6, rtol=0)


def test_trainable_counts_and_freezing_modes() -> None:
    r, L = 4, TINY["n_layer"]
    model = apply_lora(
        base_model(bias=True, norm_class_name="LayerNorm"), r=r, targets=list(TARGETS)
    )
    mark_only_lora_as_trainable(model)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    per_layer = (
        r * (3 * C + Q_OUT + 2 * KV_OUT)  # query, key, value: an A and a B each
        + r * (Q_OUT + C)  # proj
        + r * (C + 2 * H) + r * (H + C)  # fc_1 ([gate | up]) and fc_2
    )  # fmt: skip
    assert sum(trainable.values()) == L * per_layer + r * (C + V)  # + head
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for n in trainable)

    mark_only_lora_as_trainable(model, bias="lora_only")
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert "transformer.h.0.attn.attn.bias" in biases
    assert not any("norm" in n for n in biases)
    mark_only_lora_as_trainable(model, bias="all")
    all_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert all_biases == {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert biases < all_biases  # norms (LayerNorm) have biases too
    with pytest.raises(AdapterError, match="bias"):
        mark_only_lora_as_trainable(model, bias="some")


def test_memory_estimate_matches_measured_lora() -> None:
    """lab.memory's LoRA estimate (same target names) against the real modules; the
    thorough comparison is in tests/test_memory.py."""
    for targets in (["projection", "mlp", "head"], ["query", "key", "value"]):
        model = apply_lora(base_model(), r=4, targets=targets)
        mark_only_lora_as_trainable(model)
        x = tokens(T=16, B=2)
        measured = measure_memory(model, (x, x))
        estimate = estimate_memory(
            model.config, 2, 16, finetune="lora", lora_r=4, lora_targets=targets
        )
        assert measured.trainable_parameters == estimate.trainable_parameters
        assert measured.parameters == estimate.parameters
        assert measured.gradients == estimate.gradients
        assert estimate.activations == pytest.approx(measured.activations, rel=0.05)


def test_reset_parameters_after_the_meta_device_initialises_A_and_B() -> None:
    with torch.device("meta"):
        model = apply_lora(GPT(Config(**TINY)), r=4, targets=["query", "value", "head"])
    model.to_empty(device="cpu")
    with torch.no_grad():  # what to_empty leaves behind: garbage, here made obvious
        for param in model.parameters():
            param.fill_(float("nan"))
    model.reset_parameters()
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 3
    for layer in layers:
        assert torch.all(layer.lora_B == 0)  # B zero: LoRA starts as the identity
        bound = 1 / layer.in_features**0.5  # Kaiming-uniform(a=sqrt(5)), as nn.Linear
        assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert not any(p.isnan().any() for p in model.parameters())
    x = tokens()
    base = GPT(Config(**TINY))
    base.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(model(x), base(x))


def test_fine_tuning_lowers_loss_and_keeps_base_weights() -> None:
    model = apply_lora(base_model(), r=4, targets=["query", "value", "mlp"]).train()
    mark_only_lora_as_trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    x = tokens(T=16, B=4)
    y = x % 4  # a new task: only 4 of the 40 tokens are ever right
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert len(frozen) == len(base_model().state_dict())  # every base tensor is frozen
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_dropout_only_in_training() -> None:
    model = apply_lora(base_model(), r=4, lora_dropout=0.5, targets=["query"])
    randomise_B(model)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # applied to a model in eval mode: no dropout
        model.eval()
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))


def test_adapter_checkpoint_round_trip_from_pretrained(tmp_path) -> None:
    base_dir = tmp_path / "base"
    base_model(bias=True).save_pretrained(base_dir)
    model = apply_lora(GPT.from_pretrained(base_dir).eval(), r=2, targets=["key", "head"])
    mark_only_lora_as_trainable(model, bias="lora_only")
    randomise_B(model)
    with torch.no_grad():
        model.transformer.h[0].attn.attn.bias.add_(0.5)  # a trained bias is saved too
    save_adapter(model, tmp_path / "lora")
    restored = load_adapter(GPT.from_pretrained(base_dir).eval(), tmp_path / "lora")
    assert restored.adapters["lora"] == {
        "r": 2,
        "lora_alpha": 16.0,
        "lora_dropout": 0.0,
        "targets": ["key", "head"],
    }
    x = tokens()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    merge_lora(model)
    with pytest.raises(AdapterError, match="unmerge"):
        save_adapter(model, tmp_path / "merged")


def test_adapters_saved_before_the_keywords_were_renamed_load(tmp_path) -> None:
    """lab-adapter/1 files spelled lora_alpha and lora_dropout "alpha" and "dropout"."""
    model = apply_lora(base_model(), r=2, lora_alpha=4.0, lora_dropout=0.1, targets=["value"])
    randomise_B(model)
    save_adapter(model, tmp_path / "lora")
    path = tmp_path / "lora" / "adapter.json"
    settings = json.loads(path.read_text())
    settings["format"] = "lab-adapter/1"
    settings["methods"]["lora"] = {"r": 2, "alpha": 4.0, "dropout": 0.1, "targets": ["value"]}
    path.write_text(json.dumps(settings))
    restored = load_adapter(base_model(), tmp_path / "lora")
    assert restored.adapters == model.adapters
    with torch.no_grad():
        assert torch.equal(restored(tokens()), model(tokens()))


def test_bad_arguments_fail_clearly() -> None:
    with pytest.raises(AdapterError, match="targets"):
        apply_lora(base_model(), targets=["qkv"])
    with pytest.raises(AdapterError, match="r "):
        apply_lora(base_model(), r=0)
    with pytest.raises(AdapterError, match=r"'alpha'.* r, lora_alpha, lora_dropout, targets"):
        apply_lora(base_model(), alpha=16)  # LitGPT's and peft's spelling is lora_alpha
    model = apply_lora(base_model())
    with pytest.raises(AdapterError, match="already applied"):
        apply_lora(model)
    with pytest.raises(AdapterError, match="MLP"):
        apply_lora(
            base_model(mlp_class_name="MoE", n_expert=2, n_expert_per_token=1), targets=["mlp"]
        )
    tied = apply_lora(base_model(tie_embeddings=True), targets=["head"])
    with pytest.raises(AdapterError, match="tie_embeddings"):
        merge_lora(tied)
    with pytest.raises(AdapterError, match="no LoRA layers"):
        mark_only_lora_as_trainable(base_model())


def test_matches_peft() -> None:
    """The same A and B in a peft LoRA on a plain linear layer give the same outputs."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(16, 24))
    wrapped = peft.get_peft_model(
        reference, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], lora_dropout=0.0)
    )
    peft_layer = wrapped.base_model.model[0]
    ours = LoRALinear(16, 24, r=4, lora_alpha=8.0)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
        ours.weight.copy_(peft_layer.base_layer.weight)
        ours.bias.copy_(peft_layer.base_layer.bias)
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
        x = torch.randn(3, 16)
        torch.testing.assert_close(ours(x), wrapped(x))


def test_matches_litgpt_lora_on_gqa() -> None:
    """The same base weights, A and B in LitGPT's LoRA (query and value on the fused,
    GQA-sized QKV) give the same logits: an independent implementation of the layout."""
    litgpt_lora = pytest.importorskip("litgpt.lora")
    model = apply_lora(base_model(), r=2, lora_alpha=4.0, targets=["query", "value"])
    randomise_B(model)
    config = litgpt_lora.Config(
        **TINY, padded_vocab_size=V, bias=False, norm_class_name="RMSNorm", norm_eps=1e-5,
        mlp_class_name="LLaMAMLP", rotary_percentage=1.0, parallel_residual=False,
        lora_r=2, lora_alpha=4, lora_query=True, lora_value=True,
    )  # fmt: skip
    reference = litgpt_lora.GPT(config).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("attn.attn.", "attn.qkv.").replace("qkv.weight", "qkv.linear.weight")
        if name.endswith("mlp.fc_1.weight"):  # lab fuses LLaMA's [gate | up]
            state[name], state[name.replace("fc_1", "fc_2")] = tensor.chunk(2)
        else:
            state[name.replace("mlp.fc_2.", "mlp.proj.")] = tensor
    reference.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), reference(tokens()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mixer", ["MLA", "GatedDeltaNet"])
def test_mixers_without_a_fused_qkv_are_refused_by_name(mixer):
    from lab.finetune.adapter_v2 import apply_adapter_v2

    config = Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, block_size=16,
                    attention_class_name=mixer)  # fmt: skip
    with pytest.raises(
        AdapterError, match=r"layer 0's attention .* no fused QKV projection for LoRA"
    ):
        apply_lora(GPT(config), r=2, targets=("query", "value"))
    with pytest.raises(AdapterError, match="no fused QKV projection for AdapterV2"):
        apply_adapter_v2(GPT(config), start_layer=1)
    lora = apply_lora(GPT(config), r=2, targets=("projection", "mlp"))  # what it can adapt
    assert any("lora_A" in name for name, _ in lora.named_parameters())
