"""What every fine-tuning method shares: a registry of methods, applying one to a lab
GPT, choosing what trains, merging, and adapter-only checkpoints.

A method is a function that converts a ``lab`` GPT in place. ``register_method``
turns it into a peer of LoRA and the adapters: the decorated function refuses a
model that is not a lab GPT or already has the method (or a clashing one), records
its settings in ``model.adapters``, and from then on ``mark_only_adapter_as_trainable``,
``save_adapter`` and ``load_adapter`` know it::

    @register_method("ia3")                  # its new parameters are named ia3_*
    def apply_ia3(model, init: float = 1.0):
        for block in blocks_of(model, "IA3"):
            block.mlp.ia3_scale = nn.Parameter(torch.full(..., init))
            ...

    apply_ia3(model)
    mark_only_adapter_as_trainable(model)     # only the ia3_* parameters train
    save_adapter(model, "my-ia3")             # the ia3_* tensors, settings, base fingerprint
    load_adapter(GPT.from_pretrained("base"), "my-ia3")   # applies, then loads

An adapter directory holds ``adapter.safetensors`` (only the new or trained tensors)
and ``adapter.json``: the methods and their settings, the tensor names, and a
fingerprint of the base model that ``load_adapter`` checks. (LoRA can also be
written in peft's format: ``lab.finetune.peft``.)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lab.checkpoint import atomic_directory
from lab.config import Config
from lab.errors import AdapterError

ADAPTER_FILE = "adapter.safetensors"
SETTINGS_FILE = "adapter.json"
FORMAT = "lab-adapter/2"  # /1 spelled LoRA's lora_alpha and lora_dropout "alpha", "dropout"


@dataclass(frozen=True)
class Method:
    """A registered fine-tuning method.

    ``apply(model, **settings)`` converts a model in place. The parameters it adds are
    named ``prefix...`` (``lora_A``, ``adapter_gate``); ``trains`` picks modules whose
    own parameters it trains as well (AdapterV2: the norms). ``excludes`` names methods
    it cannot be combined with."""

    name: str
    apply: Callable[..., nn.Module]
    prefix: str
    trains: Callable[[nn.Module], bool] | None = None
    excludes: frozenset[str] = frozenset()


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    *,
    prefix: str | None = None,
    trains: Callable[[nn.Module], bool] | None = None,
    excludes: Iterable[str] = (),
) -> Callable[[Callable[..., Any]], Callable[..., nn.Module]]:
    """Register ``apply(model, **settings)`` as the method ``name`` (see the module's
    docstring); its parameters are named ``prefix`` + ... (default ``name + "_"``).

    The decorated function checks the model, applies, records the settings (which must
    be JSON values, so ``load_adapter`` can apply the method again) and returns the
    model. Registering a name again replaces the method, so a notebook cell can be re-run.
    """

    def register(apply: Callable[..., Any]) -> Callable[..., nn.Module]:
        signature = inspect.signature(apply)

        @functools.wraps(apply)
        def apply_method(model: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
            try:
                bound = signature.bind(model, *args, **kwargs)
            except TypeError as error:
                settings = ", ".join(list(signature.parameters)[1:])
                raise AdapterError(f"{error}; the settings of {name} are: {settings}") from None
            bound.apply_defaults()
            settings = dict(list(bound.arguments.items())[1:])  # all but the model
            try:
                recorded = json.loads(json.dumps(settings))
            except TypeError as error:
                raise AdapterError(f"{name}'s settings must be JSON values: {error}") from None
            check_applicable(model, name)
            apply(model, *args, **kwargs)
            model.__dict__.setdefault("adapters", {})[name] = recorded
            return model

        METHODS[name] = Method(
            name, apply_method, prefix or f"{name}_", trains, frozenset(excludes)
        )
        return apply_method

    return register


def check_applicable(model: nn.Module, method: str) -> None:
    """Refuse a model that is not a lab GPT, or that has ``method`` (or one it clashes
    with, as AdapterV2 with the adapter) already."""
    if not isinstance(getattr(model, "config", None), Config):
        raise AdapterError(
            f"{type(model).__name__} is not a lab GPT (no lab Config in model.config); "
            "fine-tuning methods convert lab.GPT models, e.g. GPT.from_pretrained(dir)"
        )
    applied = getattr(model, "adapters", {})
    for name in applied:
        if name == method or name in METHODS[method].excludes or method in _excludes(name):
            raise AdapterError(
                f"{name} was already applied to this model with {applied[name]}; "
                f"start again from the base model to apply {method}"
            )


def _excludes(name: str) -> frozenset[str]:
    return METHODS[name].excludes if name in METHODS else frozenset()


def require_int(name: str, value: Any, minimum: int) -> None:
    """An ``AdapterError`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise AdapterError(f"{name} ({value!r}) must be an integer >= {minimum}")


def qkv_linear(block: nn.Module, index: int, method: str) -> tuple[nn.Linear, tuple[int, ...]]:
    """The fused ``[Q | K | V]`` projection of a layer's attention and its part sizes; an
    error for mixers without one (MLA's latent projections, Gated DeltaNet)."""
    linear = getattr(block.attn, "attn", None)
    sizes = getattr(block.attn, "qkv_sizes", None)
    if not isinstance(linear, nn.Linear) or sizes is None:
        raise AdapterError(
            f"layer {index}'s attention ({type(block.attn).__name__}) has no fused QKV "
            f"projection for {method} to adapt; adapt its output projection, the MLP or the "
            "head instead (LoRA targets 'projection', 'mlp', 'head')"
        )
    return linear, sizes


def mlp_linears(block: nn.Module, index: int) -> list[nn.Linear]:
    """``fc_1`` and ``fc_2`` of a dense MLP (``MLP``, ``GatedMLP``); an error otherwise
    (a MoE keeps its experts as stacked tensors, not linear layers)."""
    layers = [getattr(block.mlp, name, None) for name in ("fc_1", "fc_2")]
    if not all(isinstance(layer, nn.Linear) for layer in layers):
        raise AdapterError(
            f"layer {index}'s MLP ({type(block.mlp).__name__}) has no fc_1/fc_2 linear "
            "layers to adapt; leave the MLP out (e.g. drop 'mlp' from LoRA's targets)"
        )
    return layers


# --- what trains ------------------------------------------------------------------------------


def adapter_parameters(
    model: nn.Module, methods: Iterable[str] | None = None
) -> dict[str, nn.Parameter]:
    """The parameters the methods (default: every registered one) add or train: those
    whose own name starts with a method's prefix, and every parameter of the modules an
    applied method also trains (AdapterV2's norms)."""
    chosen = [METHODS[name] for name in (METHODS if methods is None else methods)]
    prefixes = tuple(method.prefix for method in chosen)
    applied = getattr(model, "adapters", {})
    also = [method.trains for method in chosen if method.trains and method.name in applied]
    own = {}
    for module_name, module in model.named_modules():
        trained = any(trains(module) for trains in also)
        for name, param in module.named_parameters(recurse=False):
            if name.startswith(prefixes) or trained:
                own[f"{module_name}.{name}" if module_name else name] = param
    return own


def mark_only_adapter_as_trainable(model: nn.Module, methods: Iterable[str] | None = None) -> None:
    """Freeze everything except the parameters of the applied methods (or of
    ``methods``): prefixes, gates, LoRA's A and B, and with AdapterV2 its scales, biases
    and every norm, as in LLaMA-Adapter V2."""
    own = set(adapter_parameters(model, methods))
    if not own:
        names = sorted(METHODS) if methods is None else list(methods)
        raise AdapterError(
            f"the model has no parameters of {names}: apply one first "
            "(apply_lora, apply_adapter, apply_adapter_v2, ...)"
        )
    for name, param in model.named_parameters():
        param.requires_grad = name in own


# --- merging ----------------------------------------------------------------------------------


def mergeable_layers(model: nn.Module) -> list[nn.Module]:
    """The layers that can fold their update into their base weight: those with
    ``merge()``, ``unmerge()`` and a ``merged`` flag (``LoRALinear``)."""
    return [m for m in model.modules() if hasattr(m, "merged") and hasattr(m, "merge")]


def merge(model: nn.Module) -> None:
    """Fold every mergeable update into its base weight (inference at the base model's
    cost). Refused for a weight shared with another layer (a head tied to the embedding):
    merging would change both."""
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for layer in mergeable_layers(model):
        shared = names.get(id(layer.weight), [])
        if len(shared) > 1:
            raise AdapterError(
                f"{shared[0]} is shared with {', '.join(shared[1:])} (tie_embeddings): "
                "merging would change both; keep the update unmerged"
            )
    for layer in mergeable_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Take every merged update out of its base weight again."""
    for layer in mergeable_layers(model):
        layer.unmerge()


# --- adapter-only checkpoints -------------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write only the adapter's tensors (``adapter_parameters`` plus anything else set
    to train, such as LoRA biases) to ``directory/adapter.safetensors``, atomically, and
    ``adapter.json``: the methods and settings, the tensor names, and a fingerprint of
    the base model (its config, every base tensor's shape, and a few values and mean
    magnitudes of some base weights) that ``load_adapter`` checks."""
    directory = Path(directory)
    if (directory / "model.safetensors").exists() or (directory / "config.json").exists():
        raise AdapterError(
            f"{directory} holds a model checkpoint; save the adapter in a directory of its own"
        )
    methods = getattr(model, "adapters", {})
    if not methods:
        raise AdapterError("the model has no adapter: apply_adapter/apply_lora/... first")
    if any(layer.merged for layer in mergeable_layers(model)):
        raise AdapterError("LoRA is merged into the base weights: call unmerge_lora(model) first")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors = {**adapter_parameters(model, methods), **trainable}
    settings = {
        "format": FORMAT,
        "methods": methods,
        "tensors": sorted(tensors),
        "base": fingerprint(model, exclude=set(tensors)),
    }
    with atomic_directory(directory) as tmp:
        save_file(
            {n: t.detach().cpu().contiguous() for n, t in tensors.items()}, tmp / ADAPTER_FILE
        )
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n")
    return directory


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Put a saved adapter on ``model``: check that ``model`` is the base it was trained
    on (raising ``AdapterError`` listing what differs), apply the recorded methods that
    ``model`` does not have yet, and load the tensors. Returns ``model``."""
    directory = Path(directory)
    settings = _read_settings(directory)
    saved = set(settings["tensors"])
    _check_base(settings["base"], fingerprint(model, exclude=saved))
    applied = getattr(model, "adapters", {})
    for method, values in settings["methods"].items():
        if method not in METHODS:
            raise AdapterError(
                f"{directory / SETTINGS_FILE} uses the method {method!r}, which is not "
                f"registered (known: {sorted(METHODS)}): import the module that registers it"
            )
        if method not in applied:
            METHODS[method].apply(model, **values)
        elif applied[method] != values:
            raise AdapterError(
                f"the model has {method} with {applied[method]}, but this adapter was saved "
                f"with {values}; load it into the base model instead"
            )
    params = dict(model.named_parameters())
    missing = sorted(saved - set(params))
    if missing:
        raise AdapterError(f"the model has no parameters {missing} that {directory} holds")
    with torch.no_grad():
        for name, tensor in load_file(directory / ADAPTER_FILE).items():
            params[name].copy_(tensor)
    return model


def _read_settings(directory: Path) -> dict[str, Any]:
    path = directory / SETTINGS_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} has no {SETTINGS_FILE}: pass a save_adapter directory")
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path} is not valid JSON ({error}); save the adapter again") from None
    if settings.get("format") == "lab-adapter/1" and "lora" in settings["methods"]:
        lora = settings["methods"]["lora"]
        for old, new in (("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
            lora[new] = lora.pop(old)
    elif settings.get("format") != FORMAT:
        raise AdapterError(f"{path} is not a {FORMAT} file")
    return settings


def fingerprint(model: nn.Module, exclude: set[str], samples: int = 8) -> dict[str, Any]:
    """What identifies the base model: its config (the base ``Config`` fields but the
    name), every base tensor's shape and, for the first two and last two weight
    matrices, ``samples`` evenly spaced values and the mean magnitude of a strided
    subsample. Values, not a hash, so the same base in another dtype (bf16 vs fp32)
    still matches."""
    fields = {f.name for f in dataclasses.fields(Config) if f.init} - {"name"}
    config = {k: v for k, v in model.config.to_dict().items() if k in fields}
    base_tensors = dict(_base_tensors(model, exclude))
    matrices = [name for name, t in base_tensors.items() if t.ndim == 2]
    probes = {}
    for name in dict.fromkeys(matrices[:2] + matrices[-2:]):
        flat = base_tensors[name].detach().flatten()
        index = torch.linspace(0, flat.numel() - 1, samples, device=flat.device).long()
        subsample = flat[:: max(1, flat.numel() // 65536)]  # cheap even for a huge embedding
        probes[name] = {
            "mean_abs": subsample.double().abs().mean().item(),
            "values": flat[index].double().tolist(),
        }
    return {
        "config": json.loads(json.dumps(config)),
        "shapes": {name: list(t.shape) for name, t in base_tensors.items()},
        "probes": probes,
    }


def _base_tensors(model: nn.Module, exclude: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    own = set(adapter_parameters(model))
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in exclude and name not in own:
            yield name, tensor


def _check_base(saved: dict[str, Any], actual: dict[str, Any]) -> None:
    problems = [
        f"config {key}: adapter's base {saved['config'].get(key)!r}, model "
        f"{actual['config'].get(key)!r}"
        for key in sorted(set(saved["config"]) | set(actual["config"]))
        if saved["config"].get(key) != actual["config"].get(key)
    ]
    if not problems:
        shapes, have = saved["shapes"], actual["shapes"]
        problems += [f"missing tensor {n}" for n in sorted(set(shapes) - set(have))]
        problems += [f"unexpected tensor {n}" for n in sorted(set(have) - set(shapes))]
        problems += [
            f"{n}: shape {shapes[n]} vs {have[n]}"
            for n in sorted(set(shapes) & set(have))
            if shapes[n] != have[n]
        ]
    if not problems:
        for name, probe in saved["probes"].items():
            mine = actual["probes"].get(name)
            close = mine is not None and torch.allclose(
                torch.tensor([probe["mean_abs"], *probe["values"]]),
                torch.tensor([mine["mean_abs"], *mine["values"]]),
                rtol=1e-2,
                atol=1e-6,
            )
            if not close:
                problems.append(f"the values of {name} differ (a different base model?)")
    if problems:
        raise AdapterError(
            "this adapter was trained on a different base model:\n  "
            + "\n  ".join(problems[:20])
            + "\nload it into the model it was saved from (e.g. GPT.from_pretrained(base_dir))"
        )
