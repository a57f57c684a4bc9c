"""MemoryView driven as a user would, and the stacked-breakdown plot it draws."""

import base64

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from lab import plots
from lab.cache_size import per_token_beside_standard
from lab.config import Config
from lab.memory import estimate_memory, measure_memory
from lab.model import GPT
from lab.widgets import Composer, MemoryView


def small(**fields) -> Config:
    values = dict(n_layer=3, n_embd=32, n_head=4, vocab_size=256, block_size=64) | fields
    return Config(**values)


UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def stacks(view: MemoryView) -> dict[str, list[float]]:
    """Legend label -> bar heights of the view's figure, in bytes (read off the axis unit)."""
    ax = view.figure.axes[0]
    unit = UNITS[ax.get_ylabel().removeprefix("memory (").removesuffix(")")]
    return {c.get_label(): [bar.get_height() * unit for bar in c] for c in ax.containers}


def bar_labels(view: MemoryView) -> list[str]:
    return [t.get_text() for t in view.figure.axes[0].get_xticklabels()]


def test_a_named_model_against_two_gpus():
    view = MemoryView("Llama-3-8B", precision="bf16-true", device="T4 16 GB")
    # 8.03B published parameters in bf16 are 14.96 GiB: more than a T4's 15360 MiB
    # once gradients and AdamW's two states are added (4 x the weights).
    heights = stacks(view)
    assert heights["parameters"] == [pytest.approx(2 * 8_030_261_248)]
    assert heights["optimizer state"] == [pytest.approx(2 * heights["gradients"][0])]
    assert "kv cache" not in heights  # zero: not drawn
    # RMSNorm computes in fp32: the only weight copies of a bf16 model are its norms'
    assert heights["weight copies"] == [pytest.approx(4 * (2 * 32 + 1) * 4096)]
    assert view.figure.axes[0].get_ylabel() == "memory (GiB)"
    assert "does not fit" in view.verdict.value and "of 15.00 GiB" in view.verdict.value
    expected = estimate_memory(
        Config.from_name("Llama-3-8B"), 1, 2048, precision="bf16-true"
    ).as_dict()
    assert sum(h[0] for h in heights.values()) == pytest.approx(expected["total"])
    view.device.value = "H200 141 GB"
    assert view.verdict.value.startswith("<b style='color:#1b5e20'>fits</b> on H200 141 GB")
    limit = view.figure.axes[0].lines[0]
    assert limit.get_ydata()[0] == pytest.approx(143771 / 1024)  # in GiB
    assert repr(view) == (
        "MemoryView('Llama-3-8B', B=1, T=2048, bf16-true, full: 74.80 GiB, fits on H200 141 GB)"
    )


def test_fine_tuning_methods_change_the_breakdown():
    view = MemoryView("Llama-3-8B", precision="bf16-true", device="L4 24 GB")
    full = stacks(view)
    assert view.lora_r.disabled
    view.finetune.value = "lora"
    lora = stacks(view)
    # LoRA on query and value (lab.lora's default), a pair each: 32 x 8 x (2 C + 4096 + 1024)
    assert "trainable parameters: 3,407,872" in view.table.value
    assert lora["optimizer state"][0] < full["optimizer state"][0] / 1000
    view.lora_r.value = 16
    assert "trainable parameters: 6,815,744" in view.table.value
    view.finetune.value = "none"  # inference: a KV cache, no gradients
    inference = stacks(view)
    assert "kv cache" in inference and "gradients" not in inference
    assert view.optimizer.disabled and view.checkpointing.disabled
    assert "fits" in view.verdict.value and "does not" not in view.verdict.value
    view.finetune.value = "full"
    view.checkpointing.value = True
    assert stacks(view)["activations"][0] < full["activations"][0] / 5


def test_invalid_choices_show_inline_and_the_view_recovers():
    view = MemoryView("Llama-3.2-1B")
    figure = view.figure
    view.batch_size.value = 0
    assert "batch_size (0) must be a positive integer" in view.error.value
    assert view.figure is figure and repr(view) == "MemoryView('Llama-3.2-1B', invalid choice)"
    view.batch_size.value = 2
    assert view.error.value == "" and view.figure is not figure
    view.seq_len.value = 10**6
    assert "block_size (131072)" in view.error.value
    view.model_name.value = "gpt2"  # a shorter model: the sequence length follows
    assert view.seq_len.value == 1024 and view.error.value == ""
    view.device.value = "custom size"
    view.custom_gib.value = -1
    assert "custom (GiB) (-1.0) must be positive" in view.error.value
    view.custom_gib.value = 0.5
    assert view.error.value == "" and "of 512.00 MiB" in view.verdict.value


def test_the_display_carries_the_current_figure_for_front_ends_without_widgets():
    view = MemoryView("Llama-3.2-1B", device="T4 16 GB")
    bundle = view._repr_mimebundle_()
    assert bundle["text/plain"] == repr(view)
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == view.image.value  # the figure drawn
    view.batch_size.value = 4
    assert base64.b64decode(view._repr_mimebundle_()["image/png"]) == view.image.value
    assert view.image.value[:4] == b"\x89PNG"


def test_a_config_from_the_composer():
    composer = Composer(small())
    view = MemoryView(config=composer.config, batch_size=2, seq_len=32, precision="32-true")
    assert view.model_name.value == "(given config)"
    assert stacks(view)["parameters"] == [pytest.approx(composer.n_params * 4)]
    composer.on_build.append(lambda model, config: view.set_config(config))
    composer.fields["n_layer"].value = 6
    composer.build_button.click()
    assert stacks(view)["parameters"][0] == pytest.approx(composer.n_params * 4)
    named = MemoryView("pythia-70m")
    named.set_config(small())
    assert (
        named.model_name.value == "(given config)" and "(given config)" in named.model_name.options
    )


def test_measure_on_cpu_shows_measured_bars_beside_the_estimate():
    config = small()
    view = MemoryView(config=config, batch_size=2, seq_len=16, precision="32-true",
                      measure_device="cpu")  # fmt: skip
    view.measure_button.click()
    assert bar_labels(view) == ["estimate", "measured"]
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 16))
    reference = measure_memory(GPT(config), (x, x)).as_dict()
    heights = stacks(view)
    for name in ("parameters", "gradients", "optimizer state", "activations"):
        assert heights[name][1] == pytest.approx(reference[name.replace(" ", "_")]), name
    n_params = sum(p.numel() for p in GPT(config).parameters())
    assert heights["parameters"][1] == pytest.approx(4 * n_params)
    view.batch_size.value = 4  # the measurement no longer applies
    assert bar_labels(view) == ["estimate"]


def test_measure_cuts_layers_to_the_budget_and_explains_what_it_cannot_measure():
    config = small()
    one_layer = estimate_memory(config.replace(n_layer=1), 2, 16, precision="32-true").total
    view = MemoryView(config=config, batch_size=2, seq_len=16, precision="32-true",
                      measure_device="cpu", measure_budget=one_layer)  # fmt: skip
    view.measure()
    assert bar_labels(view)[1:] == ["estimate\n1 of 3 layers", "measured\n1 of 3 layers"]
    measured = stacks(view)["activations"]
    assert measured[2] == pytest.approx(measured[1], rel=0.15) and measured[1] < measured[0] / 2
    view.finetune.value = "lora"
    assert view.measure() is None and "choose full fine-tuning" in view.error.value
    view.finetune.value = "full"
    view.measure_budget = 1024
    view.measure()
    assert "measure_budget" in view.error.value


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_measuring_needs_a_device():
    view = MemoryView("gpt2")
    assert view.measure_button.disabled and view.measure() is None
    assert "this GPU" not in " ".join(view.device.options)


def test_memory_breakdown_plot():
    figure = plots.memory_breakdown(
        {"a": {"parameters": 3 * 2**20, "gradients": 0, "total": 99}, "b": {"gradients": 2**20}},
        limit=4 * 2**20, limit_label="GPU", title="t",
    )  # fmt: skip
    ax = figure.axes[0]
    assert ax.get_ylabel() == "memory (MiB)" and ax.get_title() == "t"
    assert [c.get_label() for c in ax.containers] == ["parameters", "gradients"]
    assert [b.get_height() for b in ax.containers[0]] == [3, 0]
    assert [b.get_y() for b in ax.containers[1]] == [3, 0]  # stacked on the first
    assert [t.get_text() for t in ax.texts] == ["3", "1"]  # totals ("total" ignored)
    assert ax.lines[0].get_ydata()[0] == 4 and "GPU" in [
        t.get_text() for t in ax.get_legend().get_texts()
    ]
    far = plots.memory_breakdown({"a": {"parameters": 2**20}}, limit=80 * 2**30, limit_label="GPU")
    assert far.axes[0].get_ylabel() == "memory (MiB)" and not far.axes[0].lines
    assert far.axes[0].texts[-1].get_text() == "GPU: 81,920 MiB, off the scale"
    with pytest.raises(ValueError, match="bars is empty"):
        plots.memory_breakdown({})


def test_the_view_compares_the_kv_cache_per_token_with_mha_and_gqa():
    mla = small(n_embd=128, n_head=8).replace(
        attention_class_name="MLA", kv_lora_rank=16, qk_rope_head_dim=8
    )  # 8 heads of 16: a latent of 16 + 8 beats even 2 key-value groups (2 x 2 x 16)
    view = MemoryView(config=mla, batch_size=1, seq_len=16, precision="32-true")
    line = view.table.value.split("<br>")[-1]
    sizes = per_token_beside_standard(mla, torch.float32)
    layers = mla.n_layer
    assert sizes["this model"] == layers * (16 + 8) * 4  # the latent and the rotary key
    assert sizes["MHA"] == layers * 2 * mla.n_head * mla.head_size * 4
    assert sizes["this model"] < min(v for k, v in sizes.items() if k.startswith("GQA"))
    assert line.startswith("KV cache per token: this model ") and "MHA" in line and "GQA" in line
