"""lab.formulas explains the stock components: its closed forms agree with what
lab.memory and lab.flops count on the model itself."""

from __future__ import annotations

import pytest

from lab import formulas
from lab.config import Config
from lab.flops import flops_per_token
from lab.formulas import FineTuning
from lab.memory import estimate_memory, parameter_count, trainable_parameters
from tests.test_memory import ARCHITECTURES, B, T

STOCK = [name for name in ARCHITECTURES if name != "moe"]  # MoE is counted by the formulas


@pytest.mark.parametrize("name", STOCK)
def test_formulas_agree_with_the_fake_step(name: str) -> None:
    config = Config(**ARCHITECTURES[name])
    assert formulas.covers(config)
    assert formulas.parameter_count(config) == parameter_count(config)
    assert formulas.flops_per_token(config, T) == flops_per_token(config, T)
    assert formulas.flops_per_token(config, T, training=True) == pytest.approx(
        flops_per_token(config, T, training=True), rel=0.03
    )
    for precision in ("32-true", "bf16-mixed") if name == "gqa_gated" else ("32-true",):
        estimate = estimate_memory(config, B, T, precision=precision)
        parts = formulas.memory(config, B, T, precision)
        for part in ("parameters", "weight_copies", "gradients", "optimizer_state", "logits"):
            assert parts[part] == pytest.approx(getattr(estimate, part), rel=0.01, abs=8), part
        assert parts["activations_per_layer"] == pytest.approx(
            estimate.activations_per_layer, rel=0.15
        )


@pytest.mark.parametrize(
    "method",
    [
        FineTuning("lora", lora_r=4, lora_targets=("query", "value", "mlp", "head")),
        FineTuning("adapter", adapter_prompt_length=3, adapter_start_layer=1),
        FineTuning("adapter_v2", adapter_prompt_length=3, adapter_start_layer=0),
    ],
)
def test_fine_tuning_formulas_agree_with_the_modules(method: FineTuning) -> None:
    config = Config(**ARCHITECTURES["gqa_gated"])
    options = dict(
        finetune=method.method, lora_r=method.lora_r, lora_targets=method.lora_targets,
        adapter_prompt_length=method.adapter_prompt_length,
        adapter_start_layer=method.adapter_start_layer,
    )  # fmt: skip
    assert formulas.trainable_parameters(config, **options) == trainable_parameters(
        config, **options
    )
    estimate = estimate_memory(config, B, T, **options)
    parts = formulas.memory(config, B, T, method=method)
    assert parts["parameters"] == estimate.parameters
    assert parts["activations"] == pytest.approx(estimate.activations, rel=0.05)
