"""Config validation: every valid config runs, every invalid one says why."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab import GPT, Config, ConfigError
from lab.registry import mlp, positional, register

BASE = dict(n_layer=1, n_embd=16, n_head=2, vocab_size=11, block_size=8, intermediate_size=8)


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        (dict(n_embd=100, n_head=3), "n_embd", "n_embd (100) must be divisible by n_head (3)"),
        (dict(n_query_groups=3, n_head=4, n_embd=16), "n_query_groups", "divisible by n_query_groups (3)"),
        (dict(rotary_percentage=1.5), "rotary_percentage", "must be in (0, 1]"),
        (dict(rotary_percentage=0.1), "rotary_percentage", "needs an even number"),
        (dict(mlp_class_name="Nope"), "mlp_class_name", "choose one of ['GatedMLP', 'MLP'"),
        (dict(norm_class_name="BatchNorm"), "norm_class_name", "RMSNorm"),
        (dict(positional="relative"), "positional", "'alibi'"),
        (dict(activation="swish"), "activation", "'silu'"),
        (dict(mlp_class_name="MoE", n_expert=4, n_expert_per_token=5), "n_expert_per_token", "between 1 and n_expert (4)"),
        (dict(mlp_class_name="MoE", n_expert=0), "n_expert", "n_expert (0) must be >= 1"),
        (dict(n_layer=0), "n_layer", "n_layer (0) must be a positive integer"),
        (dict(n_embd=-8), "n_embd", "n_embd (-8) must be a positive integer"),
        (dict(vocab_size=2.5), "vocab_size", "vocab_size (2.5) must be an integer"),
        (dict(padded_vocab_size=5), "padded_vocab_size", "at least vocab_size (11)"),
        (dict(sliding_window_size=0), "sliding_window_size", "positive integer"),
        (dict(rope_scaling={"type": "magic"}), "rope_scaling", "must be one of"),
        (dict(norm_eps=0.0), "norm_eps", "must be > 0"),
        (dict(shared_attention_norm=True), "shared_attention_norm", "parallel_residual=True"),
        (dict(layer_overrides={3: {"n_head": 1}}), "layer_overrides", "layers 0..0"),
        (dict(layer_overrides={0: {"n_embd": 8}}), "layer_overrides", "cannot differ per layer"),
        (dict(layer_overrides={0: {"n_query_groups": 3}}), "n_query_groups", "n_query_groups (3)"),
        (dict(router="random"), "router", "must be one of"),
    ],
)  # fmt: skip
def test_invalid_configs_name_the_field_and_the_fix(overrides, field, message):
    with pytest.raises(ConfigError) as error:
        Config(**{**BASE, **overrides})
    assert error.value.field == field
    assert message in str(error.value)


# The escapes measured in issue 13: each raised a raw Python or torch error (some only in
# GPT() or in the forward pass) before Config checked it.
ISSUE_BASE = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=50, block_size=16)
MOE = dict(mlp_class_name="MoE", n_expert=4, n_expert_per_token=2)


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        (dict(rope_scaling={"type": "llama3", "factor": 8.0}), "rope_scaling",
         "['low_freq_factor', 'high_freq_factor', 'original_max_seq_len'] missing"),
        (dict(rope_scaling="linear"), "rope_scaling", "must be a dict from a string to anything or None, e.g."),
        (dict(MOE, n_expert=2.5), "n_expert", "n_expert (2.5) must be an integer"),
        (dict(MOE, n_expert=True), "n_expert", "n_expert (True) must be an integer"),
        (dict(MOE, n_shared_expert=0.5), "n_shared_expert", "n_shared_expert (0.5) must be an integer"),
        (dict(MOE, n_expert_per_token=1.5), "n_expert_per_token", "(1.5) must be an integer"),
        (dict(MOE, n_expert=None), "n_expert", "n_expert (None) must be an integer"),
        (dict(MOE, n_expert_per_token=None), "n_expert_per_token", "(None) must be an integer"),
        (dict(MOE, n_shared_expert=None), "n_shared_expert", "(None) must be an integer"),
        (dict(rope_base=None), "rope_base", "rope_base (None) must be a finite number"),
        (dict(norm_eps="1e-5"), "norm_eps", "must be a finite number; write it without quotes"),
        (dict(norm_class_name="LayerNorm", norm_unit_offset=True), "norm_unit_offset",
         "set norm_unit_offset=False or use a norm that takes unit_offset"),
        (dict(rotary_percentage=0.125, rope_scaling={"type": "ntk", "factor": 2.0}), "rope_scaling",
         "NTK rope_scaling needs at least 4 rotated dimensions"),
        (dict(MOE, bias=True), "bias", "these MoE experts have none"),
        # found by tests/test_config_fuzz.py
        (dict(rope_base=1.0, rope_scaling={"type": "yarn", "factor": 4.0}), "rope_base", "must not be 1"),
        (dict(MOE, moe_intermediate_size=10**30), "moe_intermediate_size", "fit in 64 bits"),
        (dict(rope_base=10**30), "rope_base", "fit in 64 bits"),
    ],
)  # fmt: skip
def test_issue_13_escapes_are_config_errors_before_any_tensor(overrides, field, message):
    with pytest.raises(ConfigError) as error:
        Config(**{**ISSUE_BASE, **overrides})
    assert error.value.field == field
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"factor": 2.0}, "type (None) must be one of ['linear', 'ntk', 'llama3', 'yarn']"),
        ({"rope_type": "linear", "factor": 2.0}, "lab spells the key 'type', not 'rope_type'"),
        ({"type": "linear"}, "needs the keys ['factor']; ['factor'] missing"),
        ({"type": "linear", "factor": 2.0, "original_max_seq_len": 8}, "does not take ['original_max_seq_len']"),
        ({"type": "yarn", "factor": "4"}, "rope_scaling['factor'] ('4') must be a positive number"),
        ({"type": "yarn", "factor": 4.0, "original_max_seq_len": 8.5}, "must be a positive integer"),
        ({"type": "yarn", "factor": 4.0, "beta_fast": -1}, "rope_scaling['beta_fast'] (-1)"),
        ({"type": "linear", "factor": float("nan")}, "rope_scaling['factor'] (nan)"),
        ({"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
          "original_max_seq_len": 8}, "high_freq_factor (4.0) must be greater than low_freq_factor"),
    ],
)  # fmt: skip
def test_rope_scaling_needs_its_keys_and_positive_values(scaling, message):
    with pytest.raises(ConfigError) as error:
        Config(**ISSUE_BASE, rope_scaling=scaling)
    assert error.value.field == "rope_scaling"
    assert message in str(error.value)


def test_every_field_rejects_values_of_the_wrong_type():
    """One generic check from the annotations: for every field, None (unless allowed), a
    string, a float, a bool and a list each fail where they do not fit, and the error
    names that field."""
    hints = typing.get_type_hints(Config)
    fields = [f.name for f in dataclasses.fields(Config) if f.init]
    assert set(fields) <= set(hints)
    samples = {
        "None": None,
        "str": "8",
        "float": 2.5,
        "bool": True,
        "list": [1],
        "nan": float("nan"),
    }
    rejected = 0
    for name in fields:
        allowed = str(hints[name])
        for kind, value in samples.items():
            fits = (
                (kind == "None" and "None" in allowed)
                or (kind == "str" and hints[name] is str)
                or (kind == "float" and hints[name] in (float, float | None))
                or (kind == "bool" and hints[name] in (bool, bool | None))
            )
            if fits:
                continue
            with pytest.raises(ConfigError) as error:
                Config(**{**ISSUE_BASE, name: value})
            assert error.value.field == name, (name, value, str(error.value))
            rejected += 1
    assert rejected > 5 * len(fields)


@pytest.mark.parametrize("value", [None, "1e-5", True, [1e-5]])
def test_per_layer_overrides_are_type_checked_and_name_their_layer(value):
    with pytest.raises(ConfigError) as error:
        Config(**{**ISSUE_BASE, "n_layer": 2}, layer_overrides={1: {"norm_eps": value}})
    assert error.value.field == "norm_eps"
    assert str(error.value).startswith(f"layer_overrides[1]: norm_eps ({value!r}) must be")


def test_layer_override_keys_from_json_are_layer_indices(tmp_path):
    config = Config(**{**ISSUE_BASE, "n_layer": 2}, layer_overrides={1: {"sliding_window_size": 4}})
    config.save(tmp_path / "config.json")  # JSON object keys are strings: "1"
    assert Config.load(tmp_path / "config.json").layer_overrides == {1: {"sliding_window_size": 4}}
    for key in (1.0, True, "one"):
        with pytest.raises(ConfigError) as error:
            Config(**ISSUE_BASE, layer_overrides={key: {}})
        assert error.value.field == "layer_overrides"


def test_subclass_fields_are_type_checked_too():
    @dataclasses.dataclass
    class MyModelConfig(Config):
        custom_param: float = 0.1

    with pytest.raises(ConfigError) as error:
        MyModelConfig(**ISSUE_BASE, custom_param="0.5")
    assert error.value.field == "custom_param"
    assert "write it without quotes" in str(error.value)
    assert MyModelConfig(**ISSUE_BASE, custom_param=1).custom_param == 1  # an int is a float


def test_a_registered_positional_class_needs_a_level():
    class NoLevel(torch.nn.Module):
        pass

    register("positional", "test-no-level", NoLevel)
    try:
        with pytest.raises(ConfigError, match="give it a class attribute level") as error:
            Config(**ISSUE_BASE, positional="test-no-level")
        assert error.value.field == "positional"
    finally:
        del positional._classes["test-no-level"]


def test_derived_values():
    config = Config(**BASE)
    assert (config.head_size, config.n_query_groups, config.padded_vocab_size) == (8, 2, 11)
    assert Config(**{**BASE, "padding_multiple": 8}).padded_vocab_size == 16
    assert Config(n_embd=16, n_head=2).intermediate_size == 64


def test_replace_recomputes_derived_values_but_keeps_explicit_ones():
    config = Config(**BASE)
    wider = config.replace(n_embd=32)
    assert wider.head_size == 16 and wider.intermediate_size == 8  # given, so kept
    assert Config(n_embd=16, n_head=2).replace(n_embd=32).intermediate_size == 128


def test_subclass_with_extra_fields_round_trips(tmp_path):
    @dataclasses.dataclass
    class MyModelConfig(Config):
        custom_param: float = 0.1

    config = MyModelConfig(**BASE, custom_param=0.5)
    config.save(tmp_path / "config.json")
    assert MyModelConfig.load(tmp_path / "config.json") == config
    with pytest.raises(ConfigError, match="unknown config fields \\['custom_param'\\]"):
        Config.load(tmp_path / "config.json")


def test_registered_component_is_accepted_and_listed():
    from lab.model import MLP

    class Wide(MLP):
        pass

    register("mlp", "test-wide", Wide)
    try:
        model = GPT(Config(**BASE, mlp_class_name="test-wide"))
        assert type(model.transformer.h[0].mlp) is Wide
    finally:
        del mlp._classes["test-wide"]


# --- property test: valid configs run, invalid ones raise ConfigError ------------------

# One bad value per field; each makes any otherwise valid config invalid.
CORRUPTIONS = [
    ("n_layer", 0), ("n_head", -1), ("n_embd", 0), ("vocab_size", 0), ("block_size", -3),
    ("n_query_groups", 0), ("head_size", 0), ("intermediate_size", -1),
    ("rotary_percentage", 0.0), ("rotary_percentage", 1.5), ("positional", "xyz"),
    ("mlp_class_name", "Unknown"), ("norm_class_name", "Unknown"), ("activation", "Unknown"),
    ("sliding_window_size", 0), ("attention_logit_softcapping", -1.0), ("norm_eps", -1e-5),
    ("padded_vocab_size", 1), ("attention_scale", 0.0), ("rope_base", -1.0),
]  # fmt: skip


@st.composite
def configs(draw):
    """A valid config by construction, and maybe one corrupted field."""
    n_query_groups = draw(st.sampled_from([1, 2, 3]))
    n_head = n_query_groups * draw(st.integers(1, 3))
    head_size = draw(st.sampled_from([2, 4, 6, 8]))
    values = dict(
        n_layer=draw(st.integers(1, 2)),
        n_head=n_head,
        n_query_groups=n_query_groups,
        n_embd=draw(st.sampled_from([n_head * head_size, 12])),
        head_size=head_size,
        vocab_size=draw(st.integers(2, 20)),
        block_size=draw(st.integers(1, 12)),
        intermediate_size=draw(st.none() | st.integers(1, 20)),
        rotary_percentage=draw(st.sampled_from([0.5, 1.0])) if head_size % 4 == 0 else 1.0,
        positional=draw(st.sampled_from(["rope", "alibi", "learned", "sinusoidal", "none"])),
        mlp_class_name=draw(st.sampled_from(["MLP", "GatedMLP"])),
        norm_class_name=draw(st.sampled_from(["RMSNorm", "LayerNorm"])),
        activation=draw(st.sampled_from(["gelu", "gelu_tanh", "silu", "relu", "relu2"])),
        sliding_window_size=draw(st.none() | st.integers(1, 4)),
        parallel_residual=draw(st.booleans()),
        norm_qk=draw(st.booleans()),
        attention_logit_softcapping=draw(st.none() | st.just(5.0)),
        bias=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        post_attention_norm=draw(st.booleans()),
    )
    values["shared_attention_norm"] = values["parallel_residual"] and draw(st.booleans())
    corruption = draw(st.none() | st.sampled_from(CORRUPTIONS))
    if corruption is not None:
        values[corruption[0]] = corruption[1]
    return values, corruption


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=configs(), seq_len=st.integers(1, 12))
def test_valid_configs_run_and_invalid_ones_raise_config_error(case, seq_len):
    values, corruption = case
    if corruption is not None:
        with pytest.raises(ConfigError) as error:
            Config(**values)
        assert error.value.field is not None
        return
    config = Config(**values)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, min(seq_len, config.block_size)))
    logits = model(idx)
    assert logits.shape == (*idx.shape, config.padded_vocab_size)
    assert torch.isfinite(logits).all()
