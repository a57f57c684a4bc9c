"""Config fuzzing: any mix of field types and values either raises ``ConfigError`` or
gives a config that builds on the meta device and runs a forward pass for real.

Unlike ``test_config.py``'s property test, nothing here is valid by construction: every
field is drawn over its range (combinations included, such as NTK scaling on two rotated
dimensions or unit-offset LayerNorm), and up to three fields are replaced by a value of
any type (None, strings, floats, bools, lists, dicts). Sizes stay tiny so each accepted
config runs in milliseconds.
"""

from __future__ import annotations

import dataclasses

import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from lab import GPT, Config, ConfigError
from lab.config import GLOBAL_FIELDS, ROUTERS

NUMBERS = [0.5, 1.0, 2.0, 4.0]
# A value of any type, for any field: wrong types, zero, negatives, non-finite numbers.
JUNK = st.sampled_from(
    [None, "8", "1e-5", "x", "", 2.5, 0.0, -1.0, float("nan"), float("inf"), True, False,
     0, -1, 3, 10**30, [], [1], {}, {"type": "linear"}, ("a",)]
)  # fmt: skip


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | strategy


@st.composite
def rope_scalings(draw) -> dict:
    """A rope_scaling dict: a known or unknown type, any subset of the known keys."""
    complete = {
        "linear": {"factor": 2.0},
        "ntk": {"factor": 2.0},
        "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_seq_len": 8},
        "yarn": {"factor": 4.0, "original_max_seq_len": 8, "beta_fast": 32.0, "beta_slow": 1.0,
                 "attention_factor": None},
    }  # fmt: skip
    kind = draw(st.sampled_from([*complete, "magic"]))
    scaling = {"type": kind, **complete.get(kind, {})}
    keys = sorted({key for keys in complete.values() for key in keys})
    if draw(st.booleans()):  # a key changed, added or removed
        key = draw(st.sampled_from(keys))
        scaling[key] = draw(st.sampled_from([*NUMBERS, 8, 16]) | JUNK)
        if draw(st.booleans()):
            del scaling[draw(st.sampled_from(sorted(scaling)))]
    return scaling


FIELDS = {
    "name": st.sampled_from(["", "tiny"]),
    "attention_class_name": st.sampled_from(["CausalSelfAttention", "MLA", "GatedDeltaNet"]),
    "block_class_name": st.just("Block"),
    "n_layer": st.integers(1, 2),
    "n_embd": st.sampled_from([4, 8, 12, 16]),
    "n_head": st.integers(1, 4),
    "n_query_groups": maybe(st.integers(1, 4)),
    "head_size": maybe(st.sampled_from([2, 4, 6, 8])),
    "vocab_size": st.integers(1, 20),
    "padding_multiple": st.integers(1, 8),
    "padded_vocab_size": maybe(st.integers(1, 24)),
    "block_size": st.integers(1, 12),
    "intermediate_size": maybe(st.integers(1, 16)),
    "mlp_class_name": st.sampled_from(["MLP", "GatedMLP", "MoE"]),
    "norm_class_name": st.sampled_from(["RMSNorm", "LayerNorm"]),
    "positional": st.sampled_from(["rope", "alibi", "learned", "sinusoidal", "none"]),
    "activation": st.sampled_from(["gelu", "gelu_tanh", "silu", "relu", "relu2"]),
    "bias": st.booleans(),
    "attn_bias": maybe(st.booleans()),
    "lm_head_bias": st.booleans(),
    "norm_eps": st.sampled_from([1e-6, 1e-5, 0.1]),
    "norm_unit_offset": st.booleans(),
    "tie_embeddings": st.booleans(),
    "scale_embeddings": st.booleans(),
    "parallel_residual": st.booleans(),
    "shared_attention_norm": st.booleans(),
    "post_attention_norm": st.booleans(),
    "post_mlp_norm": st.booleans(),
    "pre_norm": st.booleans(),
    "rope_base": st.sampled_from([10000.0, 500000.0, 2.0, 1.0, 0.5]),
    "rotary_percentage": st.sampled_from([0.125, 0.25, 0.5, 1.0]),
    "rope_scaling": maybe(rope_scalings()),
    "sliding_window_size": maybe(st.integers(1, 6)),
    "norm_qk": st.booleans(),
    "norm_qk_per_head": st.booleans(),
    "attention_scale": maybe(st.sampled_from(NUMBERS)),
    "attention_logit_softcapping": maybe(st.sampled_from([5.0, 50.0])),
    "final_logit_softcapping": maybe(st.sampled_from([5.0, 30.0])),
    "n_expert": st.integers(0, 4),
    "n_expert_per_token": st.integers(0, 4),
    "moe_intermediate_size": maybe(st.integers(1, 8)),
    "n_shared_expert": st.integers(0, 2),
    "router": st.sampled_from(ROUTERS),
    "moe_aux_loss_coef": st.sampled_from([0.0, 0.01]),
    "moe_z_loss_coef": st.sampled_from([0.0, 0.001]),
    "moe_capacity_factor": maybe(st.sampled_from([0.5, 1.0, 2.0])),
    "moe_n_group": st.integers(1, 3),
    "moe_topk_group": st.integers(1, 3),
    "moe_routed_scaling": st.sampled_from([1.0, 2.5, 0.0]),
    "moe_bias": st.booleans(),
    "moe_swiglu_limit": maybe(st.sampled_from([7.0, 0.5, -1.0])),
    "shared_expert_gate": st.booleans(),
    "attention_sinks": st.booleans(),
    "attention_gate": maybe(st.sampled_from(["elementwise", "headwise", "nope"])),
    "q_lora_rank": maybe(st.integers(1, 8)),
    "kv_lora_rank": maybe(st.integers(1, 8)),
    "qk_nope_head_dim": maybe(st.integers(1, 8)),
    "qk_rope_head_dim": maybe(st.sampled_from([1, 2, 4])),
    "v_head_dim": maybe(st.integers(1, 8)),
    "linear_num_key_heads": maybe(st.integers(1, 4)),
    "linear_num_value_heads": maybe(st.integers(1, 4)),
    "linear_key_head_dim": maybe(st.integers(1, 8)),
    "linear_value_head_dim": maybe(st.integers(1, 8)),
    "linear_conv_kernel_size": st.integers(1, 4),
}
PER_LAYER = sorted(set(FIELDS) - GLOBAL_FIELDS)


def test_the_fuzz_covers_every_field():
    assert set(FIELDS) | {
        "name",
        "attention_class_name",
        "block_class_name",
        "layer_overrides",
    } == {f.name for f in dataclasses.fields(Config)}


def usually(draw, consistent, strategy: st.SearchStrategy):
    """``consistent`` (a value that fits the fields drawn so far) three times in four,
    else a free draw, so that most examples reach the model and some probe the checks."""
    return consistent if draw(st.sampled_from([True, True, True, False])) else draw(strategy)


@st.composite
def config_values(draw) -> dict:
    values = {name: draw(strategy) for name, strategy in FIELDS.items()}
    # Keep the constraints between fields, usually, so that many examples build a model.
    n_head = values["n_head"]
    divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
    values["n_query_groups"] = usually(
        draw, draw(maybe(st.sampled_from(divisors))), FIELDS["n_query_groups"]
    )
    if values["head_size"] is None:
        width = n_head * draw(st.sampled_from([2, 4, 8]))
        values["n_embd"] = usually(draw, width, FIELDS["n_embd"])
    values["padded_vocab_size"] = usually(draw, None, FIELDS["padded_vocab_size"])
    values["shared_attention_norm"] = usually(
        draw, values["parallel_residual"] and values["shared_attention_norm"], st.booleans()
    )
    values["norm_unit_offset"] = usually(
        draw, values["norm_unit_offset"] and values["norm_class_name"] == "RMSNorm", st.booleans()
    )
    values["rotary_percentage"] = usually(draw, 1.0, FIELDS["rotary_percentage"])
    if values["mlp_class_name"] == "MoE":
        values["n_expert"] = usually(draw, max(values["n_expert"], 1), FIELDS["n_expert"])
        k = min(max(values["n_expert_per_token"], 1), max(values["n_expert"], 1))
        values["n_expert_per_token"] = usually(draw, k, FIELDS["n_expert_per_token"])
        values["bias"] = usually(draw, False, st.booleans())
    overrides = {}
    layers = [0, 1, "1", 2] if draw(st.booleans()) else list(range(values["n_layer"]))
    for layer in draw(st.lists(st.sampled_from(layers), unique=True, max_size=2)):
        names = draw(st.lists(st.sampled_from(PER_LAYER), min_size=1, max_size=2, unique=True))
        overrides[layer] = {name: draw(FIELDS[name] | JUNK) for name in names}
    values["layer_overrides"] = usually(draw, overrides, JUNK)
    # Then up to three fields get a value of any type.
    for name in draw(st.lists(st.sampled_from(sorted(values)), max_size=3, unique=True)):
        values[name] = usually(draw, values[name], JUNK)
    return values


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=config_values(), seq_len=st.integers(1, 12))
def test_any_config_raises_config_error_or_builds_and_runs(values, seq_len):
    note(repr(values))
    try:
        config = Config(**values)
    except ConfigError as error:
        assert error.field is not None
        return
    with torch.device("meta"):
        GPT(config)
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (2, min(seq_len, config.block_size)))
    logits = model(idx)
    assert logits.shape == (*idx.shape, config.padded_vocab_size)
    assert torch.isfinite(logits).all()
