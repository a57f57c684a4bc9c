"""Hugging Face ``config.json`` <-> ``Config``, driven by the family table.

``config_from_hf`` reads a ``config.json`` (as a dict), ``config_to_hf`` writes one
and checks, by reading it back, that nothing was lost; ``hf_model_type`` names the
family a config belongs to. Every family-specific rule lives in ``lab.hf.families``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from lab.config import Config
from lab.errors import CheckpointError, ConfigError
from lab.hf.families import FAMILIES, Family, set_per_layer

# Hugging Face activation names -> lab's (``gelu_new`` is the tanh approximation).
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "relu2": "relu2",
}  # fmt: skip
LAB_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def model_type_of(config_json: dict[str, Any]) -> str:
    """The supported family a ``config.json`` belongs to (by ``model_type``, or for
    very old files by the class named in ``architectures``)."""
    model_type = config_json.get("model_type")
    if model_type is None:
        by_class = {f.architecture: name for name, f in FAMILIES.items()}
        architectures = config_json.get("architectures") or []
        model_type = next((by_class[a] for a in architectures if a in by_class), None)
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"Hugging Face model_type {model_type!r} is not supported; lab converts "
            f"{sorted(FAMILIES)}"
        )
    return model_type


def config_from_hf(config_json: dict[str, Any], config_class: type[Config] = Config) -> Config:
    """The ``Config`` of a Hugging Face ``config.json`` (as a dict)."""
    model_type = model_type_of(config_json)
    family = FAMILIES[model_type]
    if not isinstance(config_json.get("vocab_size"), int):
        raise CheckpointError(
            f"this {model_type} config.json has no integer vocab_size "
            f"({config_json.get('vocab_size')!r}); add the number of embedding rows"
        )
    values: dict[str, Any] = {
        "name": config_json.get("_name_or_path") or model_type,
        "vocab_size": config_json["vocab_size"],
        "padded_vocab_size": config_json["vocab_size"],
        **family.base,
    }
    for name, keys in family.keys.items():
        value = _first(config_json, keys)
        if value is not None:
            values[name] = value
        elif name in _REQUIRED:
            raise CheckpointError(
                f"this {model_type} config.json has no {' or '.join(keys)}; restore the file"
            )
    if config_json.get("quantization_config"):  # GPT-OSS's MXFP4, DeepSeek-V3's FP8 files
        raise CheckpointError(
            f"this {model_type} checkpoint is quantized (quantization_config="
            f"{config_json['quantization_config'].get('quant_method', '?')!r}); lab loads "
            "unquantized weights: dequantize it first (e.g. a bf16 copy of the checkpoint)"
        )
    for key, required in family.requires.items():
        value = config_json.get(key, required)
        _unsupported(value != required, model_type, key, value)
    hf_activation = _first(config_json, family.keys["activation"])
    if hf_activation is not None:  # else the family's default (a lab name) stands
        values["activation"] = HF_ACTIVATIONS.get(hf_activation)
        _unsupported(values["activation"] is None, model_type, "activation", hf_activation)
    n_layer = values["n_layer"]
    if family.rope == "layer_types":
        by_type = _rope_per_layer_type(config_json, family, model_type, n_layer)
        for name, per_layer in by_type.items():
            set_per_layer(values, name, per_layer)
    elif family.rope != "none":
        values.update(_rope_from_hf(config_json, family, model_type))
    set_per_layer(values, "sliding_window_size", _windows_from_hf(config_json, family, n_layer))
    if family.biases:
        attention = config_json.get("attention_bias", False)
        mlp = config_json.get("mlp_bias", False)
        _unsupported(attention != mlp, model_type, "attention_bias != mlp_bias", attention)
        values["bias"] = attention
    if family.read:
        family.read(config_json, values)
    return config_class.from_dict(values)


def config_to_hf(config: Config, model_type: str | None = None) -> dict[str, Any]:
    """A Hugging Face ``config.json`` (as a dict) for ``config`` in family
    ``model_type`` (default: ``hf_model_type(config)``); raises ``CheckpointError``
    naming every field the family cannot express."""
    model_type = model_type or hf_model_type(config)
    differences = _differences(config, model_type)
    if differences:
        raise CheckpointError(
            f"Hugging Face model_type {model_type!r} cannot express this config: "
            f"{', '.join(differences)}. Pass model_type= one of {sorted(FAMILIES)} that has "
            "these features, or save with format='lab'"
        )
    return _to_hf(config, model_type)


def hf_model_type(config: Config) -> str:
    """The first family in ``FAMILIES`` that expresses ``config`` without loss."""
    differences = {}
    for model_type in FAMILIES:
        try:
            differences[model_type] = _differences(config, model_type)
        except CheckpointError as error:  # e.g. a RoPE scaling the family has no key for
            differences[model_type] = [str(error)]
        if not differences[model_type]:
            return model_type
    closest = min(differences, key=lambda model_type: len(differences[model_type]))
    raise CheckpointError(
        "no Hugging Face family lab converts can express this config; the closest, "
        f"{closest!r}, differs in {', '.join(differences[closest])}. Save with format='lab'"
    )


def _to_hf(config: Config, model_type: str) -> dict[str, Any]:
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type ({model_type!r}) must be one of {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    values = config.to_dict()
    values["activation"] = LAB_ACTIVATIONS.get(config.activation, config.activation)
    config_json: dict[str, Any] = {
        "model_type": model_type, "architectures": [family.architecture],
        "vocab_size": config.padded_vocab_size,
        "pad_token_id": None,  # token ids belong to the tokenizer; some defaults exceed the vocab
        **family.requires,
    }  # fmt: skip
    for name, keys in family.keys.items():
        config_json.update(dict.fromkeys(keys, values[name]))
    windows = [config.for_layer(i).sliding_window_size for i in range(config.n_layer)]
    if family.rope == "layer_types":
        config_json["rope_parameters"] = _rope_parameters_per_layer_type(config, windows)
    elif family.rope != "none":
        config_json.update(_rope_to_hf(config, family))
    window = next((w for w in windows if w is not None), None)
    if family.windows:
        sliding = ["sliding_attention" if w is not None else "full_attention" for w in windows]
        no_window = config.block_size if family.windows == "layer_types" else None
        config_json["sliding_window"] = window if window is not None else no_window
        if family.windows in ("layer_types", "qwen"):
            config_json["layer_types"] = sliding
        if family.windows == "qwen":
            config_json["use_sliding_window"] = window is not None
            config_json["max_window_layers"] = 0
    if family.biases:
        config_json["attention_bias"] = config_json["mlp_bias"] = config.bias
    if family.write:
        family.write(config, config_json)
    return config_json


def _rope_from_hf(hf: dict[str, Any], family: Family, model_type: str) -> dict[str, Any]:
    """RoPE fields from either transformers 5's ``rope_parameters`` or the older
    top-level ``rope_theta``/``rope_scaling`` (``rotary_emb_base``/``rotary_pct``)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    _unsupported(
        any(isinstance(v, dict) for v in params.values()),
        model_type,
        "per-layer rope_parameters",
        params,
    )
    out: dict[str, Any] = {}
    base = params.get("rope_theta", _first(hf, ("rope_theta", "rotary_emb_base")))
    if base is not None:
        out["rope_base"] = float(base)
    if family.rope != "full":
        keys = ("rotary_pct",) if family.rope == "neox" else ("partial_rotary_factor",)
        partial = params.get("partial_rotary_factor", _first(hf, keys))
        if partial is not None:
            out["rotary_percentage"] = float(partial)
    kind = params.get("rope_type", params.get("type", "default"))
    original = params.get("original_max_position_embeddings") or _first(
        hf, ("original_max_position_embeddings", "max_position_embeddings")
    )
    try:
        if kind == "default":
            out["rope_scaling"] = None
        elif kind == "linear":
            out["rope_scaling"] = {"type": "linear", "factor": float(params["factor"])}
        elif kind == "llama3":
            out["rope_scaling"] = {
                "type": "llama3", "factor": float(params["factor"]),
                "low_freq_factor": float(params["low_freq_factor"]),
                "high_freq_factor": float(params["high_freq_factor"]),
                "original_max_seq_len": int(original),
            }  # fmt: skip
        elif kind == "yarn":
            out["rope_scaling"] = {
                "type": "yarn", "factor": float(params["factor"]), "original_max_seq_len": int(original),
                "beta_fast": float(params.get("beta_fast") or 32), "beta_slow": float(params.get("beta_slow") or 1),
                "attention_factor": params.get("attention_factor"),
                # GPT-OSS keeps the ramp's fractional ends; DeepSeek-V3 sets mscale(_all_dim)
                **{k: params[k] for k in _YARN_OPTIONS if params.get(k) is not None and params.get(k) is not True},
            }  # fmt: skip
        else:
            _unsupported(True, model_type, "rope type", kind)
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"this {model_type} config.json has an incomplete {kind!r} rope scaling "
            f"({params}): {error!r} is missing or not a number"
        ) from None
    return out


def _rope_to_hf(config: Config, family: Family) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if family.rope == "neox":
        out["rotary_emb_base"], out["rotary_pct"] = config.rope_base, config.rotary_percentage
    else:
        out["rope_theta"] = config.rope_base
        if family.rope == "partial":
            out["partial_rotary_factor"] = config.rotary_percentage
    scaling = config.rope_scaling
    if not scaling:
        return out
    kind, factor = scaling["type"], float(scaling.get("factor", 1.0))
    original = int(scaling.get("original_max_seq_len", 4096))
    hf_scaling: dict[str, Any] = {"rope_type": kind, "factor": factor}
    if kind == "llama3":
        hf_scaling.update(
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=original,
        )
    elif kind == "yarn":
        hf_scaling.update(
            original_max_position_embeddings=original, attention_factor=scaling.get("attention_factor"),
            beta_fast=float(scaling.get("beta_fast", 32)), beta_slow=float(scaling.get("beta_slow", 1)),
            **{k: scaling[k] for k in _YARN_OPTIONS if scaling.get(k) is not None and scaling.get(k) is not True},
        )  # fmt: skip
    elif kind != "linear":
        raise CheckpointError(f"rope_scaling type {kind!r} has no Hugging Face equivalent")
    out["rope_scaling"] = hf_scaling
    return out


def _rope_per_layer_type(
    hf: dict[str, Any], family: Family, model_type: str, n_layer: int
) -> dict[str, list]:
    """Gemma 3: RoPE fields per layer from ``rope_parameters`` keyed by layer type
    (transformers 5), or from the older keys: ``rope_theta`` and ``rope_scaling`` for
    global layers, ``rope_local_base_freq`` (unscaled) for local ones."""
    params = hf.get("rope_parameters")
    if not (
        isinstance(params, dict) and params and all(isinstance(p, dict) for p in params.values())
    ):
        params = {
            "full_attention": dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 1e6)),
            "sliding_attention": {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 1e4)},
        }  # fmt: skip
    full = dataclasses.replace(family, rope="full")
    keep = {k: hf[k] for k in ("max_position_embeddings",) if k in hf}
    per_type = {t: _rope_from_hf({**keep, "rope_parameters": p}, full, model_type) for t, p in params.items()}  # fmt: skip
    types = _layer_types(hf, family, n_layer)
    missing = sorted(set(types) - set(per_type))
    _unsupported(missing, model_type, "rope_parameters without layer types", missing)
    return {name: [per_type[t][name] for t in types] for name in ("rope_base", "rope_scaling")}


def _rope_parameters_per_layer_type(config: Config, windows: list[int | None]) -> dict[str, Any]:
    out = {}
    for i, window in enumerate(windows):
        kind = "full_attention" if window is None else "sliding_attention"
        if kind not in out:
            rope = _rope_to_hf(config.for_layer(i), FAMILIES["llama"])
            out[kind] = dict(
                rope.get("rope_scaling") or {"rope_type": "default"}, rope_theta=rope["rope_theta"]
            )
    return out


def _layer_types(hf: dict[str, Any], family: Family, n_layer: int) -> list[str]:
    """``layer_types`` of a config.json, or the family's rule where it has none."""
    if hf.get("layer_types") is not None:
        return list(hf["layer_types"])
    sliding = family.sliding_layers(hf, n_layer) if family.sliding_layers else [True] * n_layer
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _windows_from_hf(hf: dict[str, Any], family: Family, n_layer: int) -> list[int | None]:
    """Each layer's ``sliding_window_size`` from ``sliding_window`` and ``layer_types``
    (or the family's rule when ``layer_types`` is absent)."""
    window = hf.get("sliding_window") if family.windows else None
    if family.windows == "qwen" and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return [None] * n_layer
    if family.windows == "all":  # Mistral, Mixtral, Phi-3 ignore layer_types
        sliding = [True] * n_layer
    elif family.windows == "qwen" and hf.get("layer_types") is None:
        sliding = [i >= hf.get("max_window_layers", 0) for i in range(n_layer)]  # these slide
    else:
        sliding = [kind == "sliding_attention" for kind in _layer_types(hf, family, n_layer)]
    return [int(window) if s else None for s in sliding]


# YaRN's optional keys, the same in lab's rope_scaling and Hugging Face's (truncate=True,
# the default, is left out).
_YARN_OPTIONS = ("truncate", "mscale", "mscale_all_dim")
# Fields a config.json must state (every other one has a default).
_REQUIRED = ("n_layer", "n_embd", "n_head")
# Fields that do not change what a model computes from its weights.
_NOT_COMPARED = {
    "name",
    "vocab_size",
    "padding_multiple",
    "layer_overrides",
    "moe_aux_loss_coef",
    "moe_z_loss_coef",
}
_MOE_FIELDS = {"n_expert", "n_expert_per_token", "moe_intermediate_size", "n_shared_expert", "router", "moe_capacity_factor"}  # fmt: skip
_ROPE_FIELDS = {"rope_base", "rotary_percentage", "rope_scaling"}


def _differences(config: Config, model_type: str) -> list[str]:
    """``field=value (would be other)`` for each field that family ``model_type``
    loses: the config is written in that family and read back."""
    try:
        converted = config_from_hf(_to_hf(config, model_type))
    except ConfigError as error:
        return [f"{error.field or 'the config'} ({error})"]
    differences: dict[str, str] = {}
    for i in range(config.n_layer):
        ours, theirs = _comparable(config.for_layer(i)), _comparable(converted.for_layer(i))
        for name in ours:
            a, b = ours[name], theirs.get(name)
            same = (
                math.isclose(a, b, rel_tol=1e-9)
                if isinstance(a, float) and isinstance(b, float)
                else a == b
            )
            if not same:
                differences.setdefault(name, f"{name}={a!r} (would be {b!r})")
    return list(differences.values())


def _comparable(config: Config) -> dict[str, Any]:
    skip = set(_NOT_COMPARED)
    if config.mlp_class_name != "MoE":
        skip |= _MOE_FIELDS
    elif not config.n_shared_expert:  # the dense width is unused; compare the experts'
        skip.add("intermediate_size")
    if config.positional != "rope":
        skip |= _ROPE_FIELDS
    values = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(Config) if f.name not in skip
    }
    values["attention_scale"] = config.attention_scale or config.head_size**-0.5
    if "moe_intermediate_size" in values:
        values["moe_intermediate_size"] = config.moe_intermediate_size or config.intermediate_size
    values["attn_bias"] = config.bias if config.attn_bias is None else config.attn_bias
    if "rope_scaling" in values:  # compared in Hugging Face terms, defaults filled in
        values["rope_scaling"] = _rope_to_hf(config, FAMILIES["llama"]).get("rope_scaling")
    return values


def _first(hf: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((hf[k] for k in keys if hf.get(k) is not None), None)


def _unsupported(condition: Any, model_type: str, key: str, value: Any) -> None:
    if condition:
        raise CheckpointError(
            f"this {model_type} checkpoint sets {key}={value!r}, which lab's model does not implement"
        )
