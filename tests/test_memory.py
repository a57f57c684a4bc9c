"""lab.memory: estimates (a step on fake tensors) checked against measurements of the
real step, for stock and registered components alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lab.moe  # noqa: F401  (registers mlp_class_name="MoE")
from lab import formulas, registry
from lab.adapter import apply_adapter, mark_only_adapter_as_trainable
from lab.adapter_v2 import apply_adapter_v2
from lab.config import Config
from lab.configs import configs
from lab.lora import apply_lora, mark_only_lora_as_trainable
from lab.memory import (
    estimate_memory,
    format_bytes,
    measure_memory,
    parameter_count,
    trainable_parameters,
)
from lab.model import GPT

SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=96, block_size=64, intermediate_size=128)
ARCHITECTURES = {
    "gpt2_like": dict(
        SMALL, mlp_class_name="MLP", positional="learned", norm_class_name="LayerNorm",
        bias=True, activation="gelu_tanh", tie_embeddings=True,
    ),
    "gqa_gated": dict(SMALL, n_query_groups=2),
    "mqa_qk_norm_parallel": dict(
        SMALL, n_query_groups=1, norm_qk=True, parallel_residual=True, rotary_percentage=0.5
    ),
    "gemma2_like": dict(
        SMALL, post_attention_norm=True, post_mlp_norm=True, attention_logit_softcapping=50.0,
        sliding_window_size=8, layer_overrides={1: {"sliding_window_size": None}},
    ),
    "moe": dict(
        SMALL, n_query_groups=2, mlp_class_name="MoE", n_expert=4, n_expert_per_token=2,
        n_shared_expert=1, moe_intermediate_size=64, layer_overrides={0: {"mlp_class_name": "GatedMLP"}},
    ),
}  # fmt: skip
B, T = 4, 32


def batch(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randint(0, config.vocab_size, (B, T), generator=generator) for _ in "xy")


def assert_close(estimate, measured, rel=0.15) -> None:
    for name, value in measured.as_dict().items():
        assert getattr(estimate, name) == pytest.approx(value, rel=rel, abs=4096), name


@pytest.mark.parametrize(
    ("name", "optimizer"),
    [(name, "adamw") for name in ARCHITECTURES if name != "gqa_gated"] + [("gqa_gated", "sgd")],
)
def test_estimate_matches_cpu_measurement(name: str, optimizer: str) -> None:
    torch.manual_seed(0)
    config = Config(**ARCHITECTURES[name])
    measured = measure_memory(GPT(config), batch(config), optimizer=optimizer)
    estimate = estimate_memory(config, B, T, optimizer=optimizer)
    assert measured.parameters == sum(p.numel() for p in GPT(config).parameters()) * 4
    assert measured.activations > measured.parameters / 4  # really measured something
    assert_close(estimate, measured)
    assert estimate.activations_per_layer == pytest.approx(measured.activations_per_layer, rel=0.15)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_estimate_matches_cpu_measurement_in_16_bit(precision: str) -> None:
    torch.manual_seed(0)
    config = Config(**ARCHITECTURES["gqa_gated"])
    model = GPT(config)
    model = model.to(torch.bfloat16) if precision == "bf16-true" else model
    measured = measure_memory(model, batch(config), precision=precision)
    assert_close(estimate_memory(config, B, T, precision=precision), measured)
    if precision == "bf16-mixed":  # autocast's bf16 weight copies are found and counted
        assert measured.weight_copies > 0.9 * measured.parameters / 2


FINE_TUNING = {
    "lora": lambda model, targets, start: apply_lora(model, r=4, targets=targets),
    "adapter": lambda model, targets, start: apply_adapter(model, 3, start),
    "adapter_v2": lambda model, targets, start: apply_adapter_v2(model, 3, start),
}
CASES = [
    ("gqa_gated", "lora", ("query", "key", "value", "projection", "mlp", "head"), 2),
    ("mqa_qk_norm_parallel", "lora", ("key", "mlp"), 2),
    ("gemma2_like", "adapter", (), 1),
    ("mqa_qk_norm_parallel", "adapter_v2", (), 0),
]  # fmt: skip


def fine_tuned(name: str, method: str, targets: tuple, start: int) -> tuple[Config, nn.Module]:
    """A real lab.lora / lab.adapter / lab.adapter_v2 model, frozen as for training."""
    torch.manual_seed(0)
    config = Config(**ARCHITECTURES[name])
    model = FINE_TUNING[method](GPT(config), targets, start)
    if method == "lora":
        mark_only_lora_as_trainable(model)
    else:
        mark_only_adapter_as_trainable(model)
    return config, model


@pytest.mark.parametrize(("name", "method", "targets", "start"), CASES)
def test_fine_tuning_estimate_matches_the_real_modules(name, method, targets, start) -> None:
    config, model = fine_tuned(name, method, targets, start)
    options = dict(finetune=method, lora_r=4, adapter_prompt_length=3, adapter_start_layer=start)
    if targets:
        options["lora_targets"] = targets
    requires_grad = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_parameters(config, **options) == requires_grad
    measured = measure_memory(model, batch(config))
    estimate = estimate_memory(config, B, T, **options)
    assert estimate.trainable_parameters == measured.trainable_parameters == requires_grad
    assert estimate.parameters == measured.parameters
    assert_close(estimate, measured, rel=0.05)
    assert estimate.activations_per_layer == pytest.approx(measured.activations_per_layer, rel=0.05)
    full = estimate_memory(config, B, T)
    assert estimate.optimizer_state < full.optimizer_state / 5


def test_blocks_before_the_first_trainable_one_save_nothing() -> None:
    _, model = fine_tuned("gqa_gated", "adapter", (), 1)
    config = model.config
    measured = measure_memory(model, batch(config)).activations_per_layer
    estimate = estimate_memory(config, B, T, finetune="adapter", adapter_prompt_length=3,
                               adapter_start_layer=1).activations_per_layer  # fmt: skip
    assert measured[0] == estimate[0] == 0 and measured[1] > 0


def test_fine_tuning_estimate_in_mixed_precision() -> None:
    config, model = fine_tuned("gqa_gated", "lora", ("query", "value"), 2)
    measured = measure_memory(model, batch(config), precision="bf16-mixed")
    estimate = estimate_memory(config, B, T, precision="bf16-mixed", finetune="lora", lora_r=4)
    assert measured.weight_copies > 0  # autocast's copies of frozen weights are found
    assert_close(estimate, measured, rel=0.05)


def test_lora_counts_one_pair_per_enabled_qkv_part() -> None:
    """Llama-3-8B (C 4096, 32 query heads, 8 key/value heads of 128): per layer, query
    r (C + 4096), value r (C + 1024); all three parts r (3 C + 4096 + 2 x 1024)."""
    llama, r = Config.from_name("Llama-3-8B"), 8
    assert trainable_parameters(llama, "lora") == 32 * r * (4096 + 4096 + 4096 + 1024)
    qkv = trainable_parameters(llama, "lora", lora_targets=("query", "key", "value"))
    assert qkv == 32 * r * (3 * 4096 + 4096 + 2 * 1024)


def test_parameter_count_matches_published_counts() -> None:
    """Counted on the fake model (and by the formula, which explains it)."""
    for name in ("pythia-70m", "Llama-3.2-1B", "Gemma-2-2b", "Mixtral-8x7B-v0.1"):
        published = configs[name]["published_params"]
        assert parameter_count(Config.from_name(name)) == published, name
    for name, entry in configs.items():  # the closed forms, where they describe the model
        config = Config.from_name(name)
        if formulas.covers(config):
            assert formulas.parameter_count(config) == entry["published_params"], name


def test_a_1b_model_in_seconds_nothing_allocated() -> None:
    llama = Config.from_name("Llama-3.2-1B")
    train = estimate_memory(llama, 4, 2048, precision="bf16-mixed")  # ~1 s on an idle core
    assert train.parameters == 4 * 1_235_814_400
    assert train.activations_per_layer == (train.activations_per_layer[0],) * 16
    llama_70b = estimate_memory(Config.from_name("Llama-3-70B"), 1, 8192, precision="bf16-true")
    assert llama_70b.parameters == 2 * 70_553_706_496
    assert llama_70b.optimizer_state == 2 * llama_70b.parameters  # AdamW: two bf16 states


def test_kv_cache_of_llama_3_70b() -> None:
    # Widely quoted: 2 (k, v) x 80 layers x 8 KV heads x 128 x 2 bytes = 320 KiB per token.
    inference = estimate_memory(
        Config.from_name("Llama-3-70B"), 1, 8192, precision="bf16-true", finetune="none"
    )
    assert inference.kv_cache == 8192 * 320 * 1024
    assert inference.gradients == inference.optimizer_state == 0


def test_options_change_memory_as_they_should() -> None:
    config = Config.from_name("Llama-3.2-1B", n_layer=2)
    plain = estimate_memory(config, 4, 2048)
    checkpointed = estimate_memory(config, 4, 2048, activation_checkpointing=True)
    assert checkpointed.activations_per_layer == (4 * 2048 * config.n_embd * 4,) * 2  # inputs
    assert checkpointed.activations < plain.activations
    unfused = estimate_memory(config, 4, 2048, fused_attention=False)
    scores = 4 * config.n_head * 2048**2 * 4 * config.n_layer  # one fp32 score matrix per layer
    assert unfused.activations > plain.activations + scores
    assert estimate_memory(config, 4, 2048, optimizer="sgd").optimizer_state == plain.gradients
    eight_bit = estimate_memory(config, 4, 2048, optimizer="adamw8bit").optimizer_state
    assert eight_bit == pytest.approx(plain.optimizer_state / 4, rel=0.01)
    mixed = estimate_memory(config, 4, 2048, precision="bf16-mixed")
    assert mixed.weight_copies > 0 and mixed.activations < plain.activations
    assert "GiB" in repr(plain) and format_bytes(1536) == "1.50 KiB"


def test_bad_arguments_name_the_argument() -> None:
    config = Config(**SMALL)
    with pytest.raises(ValueError, match="precision"):
        estimate_memory(config, 1, 8, precision="fp8")
    with pytest.raises(ValueError, match="finetune"):
        estimate_memory(config, 1, 8, finetune="qlora")
    with pytest.raises(ValueError, match="batch_size"):
        estimate_memory(config, 0, 8)
    for targets in (("wte",), ("attn",), ()):  # lab.lora's names only (query, key, ...)
        with pytest.raises(ValueError, match=r"lora_targets.*'query', 'key', 'value'"):
            estimate_memory(config, 1, 8, finetune="lora", lora_targets=targets)
    with pytest.raises(ValueError, match="drop 'mlp'"):
        estimate_memory(Config(**ARCHITECTURES["moe"]), 1, 8, finetune="lora", lora_targets="mlp")
    with pytest.raises(ValueError, match="adapter_start_layer"):
        estimate_memory(config, 1, 8, finetune="adapter", adapter_start_layer=2)
    with pytest.raises(ValueError, match=r"model.to\(torch.bfloat16\)"):
        measure_memory(GPT(config), batch(config), precision="bf16-true")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_estimate_against_the_cuda_allocator(tmp_path) -> None:
    torch.manual_seed(0)
    config = Config(**ARCHITECTURES["gqa_gated"])
    model = GPT(config).cuda()
    x, y = (t.cuda() for t in batch(config))
    snapshot = tmp_path / "snapshot.pickle"
    measured = measure_memory(model, (x, y), memory_history=snapshot)
    estimate = estimate_memory(config, B, T)
    assert_close(estimate, measured)
    assert measured.peak == pytest.approx(estimate.total, rel=0.5)
    assert snapshot.stat().st_size > 0


# --- registered components: no formula, counted as they compute ----------------------------


class Narrow(nn.Module):
    """An 8-wide MLP: ``out(relu(fc(x)))`` (the issue's example)."""

    def __init__(self, config: Config, block_idx: int = 0) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 8, bias=False)
        self.out = nn.Linear(8, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc(x)))


class OneHead(nn.Module):
    """One 16-wide causal attention head with separate projections and explicit scores."""

    def __init__(self, config: Config, block_idx: int = 0) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(config.n_embd, 16, bias=False) for _ in "qkv")
        self.o = nn.Linear(16, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, input_pos=None, mask=None) -> torch.Tensor:
        T = x.size(1)
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / 4.0
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        pattern = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        return self.o(pattern @ self.v(x))


registry.mlp.register("test-memory-narrow", Narrow)
registry.attention.register("test-memory-one-head", OneHead)
CUSTOM = dict(
    n_layer=2, n_embd=128, n_head=4, vocab_size=96, block_size=64,
    mlp_class_name="test-memory-narrow", attention_class_name="test-memory-one-head",
)  # fmt: skip


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_registered_components_are_counted_as_they_compute(precision: str) -> None:
    """The issue's fault: a custom 8-wide MLP was estimated as the stock one (5.68 MB of
    activations where 3.60 MB were measured). Counted on the model, within 2%."""
    torch.manual_seed(0)
    config = Config(**CUSTOM)
    model = GPT(config)
    measured = measure_memory(model, batch(config), precision=precision)
    estimate = estimate_memory(config, B, T, precision=precision)
    for name in ("parameters", "weight_copies", "gradients", "activations", "logits"):
        assert getattr(estimate, name) == pytest.approx(getattr(measured, name), rel=0.02), name
    assert estimate.activations_per_layer == pytest.approx(measured.activations_per_layer, rel=0.02)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    assert trainable_parameters(config) == parameter_count(config)
    stock = formulas.memory(config, B, T, precision)  # what the class-name formulas said
    assert stock["activations"] > 1.2 * measured.activations


def test_repeated_blocks_run_once_and_count_exactly() -> None:
    """Blocks built alike run once on fake tensors; the count equals the real step's,
    block by block, also where they differ (a sliding window on every other layer)."""
    torch.manual_seed(0)
    config = Config(**dict(ARCHITECTURES["gemma2_like"], n_layer=5,
                           layer_overrides={i: {"sliding_window_size": None} for i in (1, 3)}))  # fmt: skip
    measured = measure_memory(GPT(config), batch(config))
    estimate = estimate_memory(config, B, T)
    assert estimate.activations_per_layer == measured.activations_per_layer
    for name in ("parameters", "weight_copies", "gradients", "activations", "logits"):
        assert getattr(estimate, name) == getattr(measured, name), name


def test_moe_routing_falls_back_to_the_formulas() -> None:
    config = Config(**ARCHITECTURES["moe"])
    estimate = estimate_memory(config, B, T)
    assert "lab.formulas" in estimate.notes
    bad = Config(**dict(ARCHITECTURES["moe"], attention_class_name="test-memory-one-head"))
    with pytest.raises(ValueError, match="measure_memory"):
        estimate_memory(bad, B, T)


def test_every_precision_fit_accepts_is_estimated() -> None:
    """lab.train owns the names fit accepts; lab.formulas.DTYPES says what each means."""
    from lab.train import PRECISIONS

    assert set(PRECISIONS) <= set(formulas.DTYPES)


def test_a_chunked_loss_keeps_no_logits_estimated_as_measured() -> None:
    config = Config(**dict(SMALL, vocab_size=4096))  # a vocabulary that dominates
    plain = measure_memory(GPT(config), batch(config))
    chunked = measure_memory(GPT(config), batch(config), loss_chunk_size=16)
    estimate = estimate_memory(config, B, T, loss_chunk_size=16)
    assert chunked.logits < plain.logits / 20  # B*T*V fp32 logits and log-softmax gone
    assert chunked.logits >= B * T * config.n_embd * 4  # the final hidden states stay
    assert_close(estimate, chunked, rel=0.02)
    with pytest.raises(ValueError, match="not both"):
        measure_memory(GPT(config), batch(config), loss_fn=lambda a, b: a.sum(), loss_chunk_size=8)
