"""lab.widgets driven as a user would: set values, click, check what comes out."""

import base64

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

import lab
from lab import registry
from lab.probe import probe
from lab.widgets import AttentionView, Composer, RoutingView


def small(**fields) -> lab.Config:
    values = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=256, block_size=64) | fields
    return lab.Config(**values)


def test_composer_edits_build_the_config_and_model():
    composer = Composer(small())
    composer.fields["n_embd"].value = 64
    assert composer.config.n_embd == 64 and composer.config.intermediate_size == 256  # derived
    assert composer.fields["intermediate_size"].value == 256  # shown back
    composer.fields["n_query_groups"].value = 2
    composer.fields["positional"].value = "alibi"
    composer.build_button.click()
    model = composer.model
    assert "build 1: <b>GPT</b>" in composer.status.value and composer.layer.value == 0
    assert isinstance(model, lab.GPT) and model.config is composer.config
    assert model.transformer.h[1].attn.n_query_groups == 2
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{n_params:,}" in composer.stats.value
    assert "Total params" in composer.summary.value
    assert repr(composer) == "Composer(config='scratch', built=True)"


def test_composer_shows_config_errors_inline_and_recovers():
    composer = Composer(small())
    composer.fields["n_head"].value = 5
    assert composer.config is None and composer.build_button.disabled
    assert "n_embd (32) must be divisible by n_head (5)" in composer.error.value
    composer.build()
    assert composer.model is None
    composer.fields["n_head"].value = 8
    assert composer.error.value == "" and composer.config.head_size == 4
    composer.build_button.click()
    assert composer.model.config.n_head == 8


def test_composer_starts_from_named_configs_and_refuses_huge_builds():
    composer = Composer()
    composer.start.value = "pythia-70m"
    assert (
        composer.fields["n_layer"].value == 6
        and composer.fields["norm_class_name"].value == "LayerNorm"
    )
    composer.start.value = "Llama-3.1-8B"
    assert composer.fields["n_query_groups"].value == 8
    composer.build_button.click()
    assert composer.model is None and "max_build_params" in composer.status.value


def test_composer_per_layer_components_include_registered_ones():
    class QuietAttention(lab.CausalSelfAttention):
        pass

    registry.attention.register("quiet", QuietAttention)
    composer = Composer(small(n_expert=4, n_expert_per_token=2))
    composer.layer.value = 1
    composer.layer_fields["attention_class_name"].value = "quiet"
    composer.layer_fields["mlp_class_name"].value = "MoE"
    assert composer.config.layer_overrides == {
        1: {"attention_class_name": "quiet", "mlp_class_name": "MoE"}
    }
    model = composer.build()
    assert type(model.transformer.h[1].attn) is QuietAttention
    assert type(model.transformer.h[0].attn) is lab.CausalSelfAttention
    composer.layer.value = 0
    assert composer.layer_fields["mlp_class_name"].value == "(model default)"
    composer.fields["n_layer"].value = 1  # the override of layer 1 no longer applies
    assert composer.config.layer_overrides == {}


def test_attention_view_shows_the_probed_pattern_and_follows_the_controls():
    torch.manual_seed(0)
    model = lab.GPT(small())
    view = AttentionView(model, text="abcabc")
    with torch.no_grad(), probe(model, "pattern") as cache:
        model(torch.tensor([list(b"abcabc")]))
    torch.testing.assert_close(view.pattern, cache["blocks.0.attn.pattern"][0])
    assert view.tokens == list("abcabc") and view.heatmap.value[:4] == b"\x89PNG"
    shown = view.figures["heatmap"].axes[0].images[0].get_array()
    np.testing.assert_allclose(shown, cache["blocks.0.attn.pattern"][0, 0])
    view.layer.value, view.head.value = 1, 3
    np.testing.assert_allclose(
        view.figures["heatmap"].axes[0].images[0].get_array(), cache["blocks.1.attn.pattern"][0, 3]
    )
    view.head.value = "all"
    assert len(view.figures["heatmap"].axes) == 4 + 1  # and a colorbar
    view.text.value = "hello"
    assert (
        view.pattern.shape == (4, 5, 5)
        and repr(view) == "AttentionView(blocks.1, head='all', tokens=5)"
    )


def test_attention_view_refreshes_from_a_training_callback():
    model = lab.GPT(small())
    view = AttentionView(model, text="abcd")
    before = view.pattern.clone()
    with torch.no_grad():
        model.transformer.h[0].attn.attn.weight.mul_(20)
    callback = view.callback(every=5)
    callback(type("State", (), {"step": 3})())
    assert torch.equal(view.pattern, before)
    callback(type("State", (), {"step": 5})())
    assert not torch.allclose(view.pattern, before) and model.training


def test_routing_view_shows_assignments_and_load_over_time():
    torch.manual_seed(0)
    config = small(mlp_class_name="MoE", n_expert=4, n_expert_per_token=2,
                   layer_overrides={0: {"mlp_class_name": "GatedMLP"}})  # fmt: skip
    model = lab.GPT(config)
    view = RoutingView(model, text="abcdef")
    assert list(view.layer.options) == [("blocks.1", "blocks.1.mlp.routing")]
    record = view.record
    assert int(record.load.sum()) == 6 * 2
    shown = view.figures["routing"].axes[0].images[0].get_array()
    np.testing.assert_allclose(shown, record.combine_weights[0])
    view.callback(every=2)(type("State", (), {"step": 4})())
    assert view.steps == [0, 4]
    bands = view.figures["history"].axes[0].collections  # one stacked band per expert
    assert len(bands) == 4
    top = bands[-1].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(1.0)  # the shares stack up to all tokens
    bars = [b.get_height() for b in view.figures["load"].axes[0].patches]
    assert bars == record.load.tolist()


def test_routing_view_needs_an_moe_model():
    with pytest.raises(ValueError, match="no MoE layer"):
        RoutingView(lab.GPT(small()))


def test_views_say_which_model_and_carry_a_picture_for_front_ends_without_widgets():
    torch.manual_seed(0)
    view = AttentionView(lab.GPT(small()), text="abcabc", title="RoPE")
    assert repr(view) == "AttentionView('RoPE', blocks.0, head=0, tokens=6)"
    assert view.figures["heatmap"].axes[0].get_title().startswith("RoPE: blocks.0")
    bundle = view._repr_mimebundle_()
    assert bundle["text/plain"] == repr(view)
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert base64.b64decode(bundle["image/png"]) == view.heatmap.value  # the current figure
    config = small(mlp_class_name="MoE", n_expert=4, n_expert_per_token=2)
    routing = RoutingView(lab.GPT(config), text="abc", title="MoE")
    assert routing.figures["routing"].axes[0].get_title() == "MoE: blocks.0 routing"
    assert base64.b64decode(routing._repr_mimebundle_()["image/png"])[:4] == b"\x89PNG"
