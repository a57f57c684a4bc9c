"""LLaMA-Adapter (Zhang et al. 2023, arXiv:2303.16199), and adapter-only checkpoints.

From layer ``start_layer`` on, each attention learns a prefix of ``prompt_length``
vectors. Its keys and values come from the layer's own frozen projection (GQA
sizes, no positions: the prefix sits outside the sequence), every query attends to
them in a separate softmax, and the result is added through a gate per head that
starts at zero::

    y = attention(q, k, v)  +  gate[head] * softmax(q ak^T * scale) av
        ak, av = split(attn(prefix))                   prefix (prompt_length, C)

So at initialisation the adapted model computes exactly what the base model does,
and the gradient first reaches the gates, then (through them) the prefix. The
prefix starts N(0, 1), like the paper's ``nn.Embedding`` and like the unit-RMS
normed hidden states the projection normally sees. Unlike the guide's snippet, the
sequence length never changes.

Converting a model (also one from ``GPT.from_pretrained``) happens in place; the
base weights keep their names, so a base checkpoint still loads into it::

    apply_adapter(model, prompt_length=10, start_layer=2)
    mark_only_adapter_as_trainable(model)
    ... train ...
    save_adapter(model, "my-adapter")                       # only the new tensors
    load_adapter(GPT.from_pretrained("base"), "my-adapter")  # applies, then loads

``save_adapter``/``load_adapter`` serve all three methods (``lab.lora``,
``lab.adapter_v2`` too): the model records what was applied in ``model.adapters``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lab import model as base
from lab import registry
from lab.config import Config as BaseConfig
from lab.errors import AdapterError
from lab.model import _expand

ADAPTER_FILE = "adapter.safetensors"
SETTINGS_FILE = "adapter.json"
FORMAT = "lab-adapter/1"
# Parameters a method adds are named with these prefixes (``adapter_gate``, ``lora_A``).
OWN_PREFIXES = ("adapter_", "lora_")


@dataclass
class Config(BaseConfig):
    """A config that carries the adapter's settings (the guide's pattern); build with
    ``lab.adapter.GPT(config)``."""

    adapter_prompt_length: int = 10
    adapter_start_layer: int = 2


class CausalSelfAttention(base.CausalSelfAttention):
    """Attention plus the gated prefix term above; everything else is the base's.

    Only ``scaled_dot_product_attention`` is overridden, so the KV cache, positions and
    ``lab.generate``'s cache support are the base's.
    """

    def __init__(
        self, config: BaseConfig, block_idx: int = 0, prompt_length: int | None = None
    ) -> None:
        super().__init__(config, block_idx)
        self._add_prefix(prompt_length or _setting(config, "adapter_prompt_length"))

    @classmethod
    def from_attention(
        cls, attention: base.CausalSelfAttention, prompt_length: int
    ) -> CausalSelfAttention:
        """Turn ``attention`` (a ``lab.model.CausalSelfAttention``) into this class in
        place: its weights, cache and submodules stay the same objects (nothing is
        copied), and the prefix and gates are added."""
        attention.__class__ = cls
        attention._add_prefix(prompt_length)
        return attention

    def _add_prefix(self, prompt_length: int) -> None:
        kwargs = dict(device=self.attn.weight.device, dtype=self.attn.weight.dtype)
        self.adapter_prefix = nn.Parameter(torch.empty(prompt_length, self.n_embd, **kwargs))
        self.adapter_gate = nn.Parameter(torch.empty(self.n_head, **kwargs))
        self._prefix_cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Prefix N(0, 1), gates zero: the adapter starts as the identity. (Also what
        ``GPT.reset_parameters`` calls after building on the meta device.)"""
        nn.init.normal_(self.adapter_prefix)
        nn.init.zeros_(self.adapter_gate)

    @property
    def prompt_length(self) -> int:
        return self.adapter_prefix.size(0)

    def scaled_dot_product_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = super().scaled_dot_product_attention(q, k, v, mask=mask)  # (B, T, nh, hs)
        gate = self.adapter_gate.view(-1, 1)  # (nh, 1): one per head
        return y + gate * self.prefix_attention(q)

    def prefix_attention(self, q: torch.Tensor) -> torch.Tensor:
        """Every query attends to the prefix alone: (B, T, nh, hs) -> (B, T, nh, hs).
        No mask: the prefix is visible from every position (and from padding rows,
        whose outputs are discarded anyway)."""
        ak, av = self.prefix_keys_values()  # (1, P, ng, hs)
        q = q.transpose(1, 2)  # (B, nh, T, hs)
        ak = _expand(ak.transpose(1, 2), self.n_head)  # (1, nh, P, hs)
        av = _expand(av.transpose(1, 2), self.n_head)
        scores = (q @ ak.transpose(-2, -1)) * self.scale  # (B, nh, T, P)
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        pattern = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return (pattern @ av).transpose(1, 2)

    def prefix_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix's keys and values (1, P, ng, hs) through this layer's projection
        (and key norm, if any). They depend on parameters only, so without gradients
        (decoding) they are computed once and reused until a parameter changes (its
        storage or in-place version counter does); with gradients they are recomputed
        every forward pass, so each backward pass has its own graph."""
        if torch.is_grad_enabled():
            return self._project_prefix()
        key = tuple((p.data_ptr(), p.dtype, p._version) for p in self.parameters())
        if self._prefix_cache is None or self._prefix_cache[0] != key:
            self._prefix_cache = (key, *self._project_prefix())
        return self._prefix_cache[1], self._prefix_cache[2]

    def _project_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, ak, av = self.qkv(self.adapter_prefix.unsqueeze(0))
        return ak, av

    def extra_repr(self) -> str:
        return f"prompt_length={self.prompt_length}"


class GPT(base.GPT):
    """``GPT(config)`` with the adapter applied from ``config.adapter_start_layer`` on,
    ``config.adapter_prompt_length`` prefix vectors per layer (the guide's pattern)."""

    def __init__(self, config: BaseConfig) -> None:
        super().__init__(config)
        apply_adapter(
            self,
            prompt_length=_setting(config, "adapter_prompt_length"),
            start_layer=_setting(config, "adapter_start_layer"),
        )


def _setting(config: BaseConfig, name: str) -> int:
    if not hasattr(config, name):
        raise AdapterError(
            f"{type(config).__name__} has no {name}; use lab.adapter.Config (or add the "
            f"field to your Config subclass), or call apply_adapter(model, ...) on a GPT"
        )
    return getattr(config, name)


# --- applying and freezing ------------------------------------------------------------------


def apply_adapter(model: nn.Module, prompt_length: int = 10, start_layer: int = 2) -> nn.Module:
    """Add LLaMA-Adapter prefixes and gates to layers ``start_layer..n_layer-1`` of a
    ``lab`` GPT, in place; returns ``model``. The base weights are untouched and keep
    their names; call ``mark_only_adapter_as_trainable`` before training."""
    settings = {"prompt_length": prompt_length, "start_layer": start_layer}
    check_not_applied(model, "adapter")
    add_prefixes(blocks_of(model), prompt_length, start_layer)
    record_method(model, "adapter", settings)
    return model


def add_prefixes(blocks: list[nn.Module], prompt_length: int, start_layer: int) -> None:
    """Turn the attention of ``blocks[start_layer:]`` into the adapter's (checked first,
    so a refused layer leaves the model unchanged)."""
    _require_int("prompt_length", prompt_length, 1)
    if not 0 <= start_layer < len(blocks):
        raise AdapterError(
            f"start_layer ({start_layer}) must be a layer index, 0..{len(blocks) - 1}"
        )
    for i, block in enumerate(blocks[start_layer:], start_layer):
        if type(block.attn) is not base.CausalSelfAttention:
            raise AdapterError(
                f"layer {i}'s attention is {type(block.attn).__name__}; the adapter wraps "
                "lab.model.CausalSelfAttention (start from the base model)"
            )
    for block in blocks[start_layer:]:
        CausalSelfAttention.from_attention(block.attn, prompt_length)


def mark_only_adapter_as_trainable(model: nn.Module) -> None:
    """Freeze everything except the adapter's own parameters (prefixes, gates and, after
    ``lab.adapter_v2``, the scales, biases and every norm, as in LLaMA-Adapter V2)."""
    own = set(adapter_parameters(model))
    if not own:
        raise AdapterError("the model has no adapter parameters: call apply_adapter first")
    for name, param in model.named_parameters():
        param.requires_grad = name in own


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters the applied methods add or train: names whose last part starts
    with ``adapter_`` or ``lora_``, and with AdapterV2 the norms."""
    norms = tuple(registry.norm.get(name) for name in registry.norm.names())
    v2 = "adapter_v2" in getattr(model, "adapters", {})
    own = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if name.startswith(OWN_PREFIXES) or (v2 and isinstance(module, norms)):
                own[f"{module_name}.{name}" if module_name else name] = param
    return own


def check_not_applied(model: nn.Module, method: str) -> None:
    """Refuse to apply a method twice (or AdapterV2 on top of the adapter, or back)."""
    applied = getattr(model, "adapters", {})
    clash = {"adapter": "adapter_v2", "adapter_v2": "adapter"}.get(method)
    for name in (method, clash):
        if name in applied:
            raise AdapterError(
                f"{name} was already applied to this model with {applied[name]}; "
                f"start again from the base model to apply {method}"
            )


def record_method(model: nn.Module, method: str, settings: dict[str, Any]) -> None:
    """Note in ``model.adapters`` that ``method`` was applied with ``settings``: what
    ``save_adapter`` writes and ``load_adapter`` re-applies."""
    model.__dict__.setdefault("adapters", {})[method] = settings


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The blocks of a ``lab`` GPT (``model.transformer.h``), or a clear error."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.ModuleList) or not isinstance(
        getattr(model, "config", None), BaseConfig
    ):
        raise AdapterError(
            f"{type(model).__name__} is not a lab GPT (no config and transformer.h); "
            "adapters and LoRA convert lab.GPT models, e.g. GPT.from_pretrained(dir)"
        )
    return list(blocks)


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


def _require_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise AdapterError(f"{name} ({value!r}) must be an integer >= {minimum}")


# --- adapter-only checkpoints ---------------------------------------------------------------


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write only the adapter's tensors (``adapter_parameters`` plus anything else set
    to train, such as LoRA biases) to ``directory/adapter.safetensors``, atomically, and
    ``adapter.json``: the methods and settings, the tensor names, and a fingerprint of
    the base model (its config, every base tensor's shape, and a few values and mean
    magnitudes of some base weights) that ``load_adapter`` checks."""
    from lab.checkpoint import atomic_directory

    directory = Path(directory)
    if (directory / "model.safetensors").exists() or (directory / "config.json").exists():
        raise AdapterError(
            f"{directory} holds a model checkpoint; save the adapter in a directory of its own"
        )
    methods = getattr(model, "adapters", {})
    if not methods:
        raise AdapterError("the model has no adapter: apply_adapter/apply_lora/... first")
    if _is_merged(model):
        raise AdapterError("LoRA is merged into the base weights: call unmerge_lora(model) first")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors = {**adapter_parameters(model), **trainable}
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
    if not (directory / SETTINGS_FILE).is_file():
        raise AdapterError(f"{directory} has no {SETTINGS_FILE}: pass a save_adapter directory")
    settings = json.loads((directory / SETTINGS_FILE).read_text())
    if settings.get("format") != FORMAT:
        raise AdapterError(f"{directory / SETTINGS_FILE} is not a {FORMAT} file")
    saved = set(settings["tensors"])
    _check_base(settings["base"], fingerprint(model, exclude=saved))
    applied = getattr(model, "adapters", {})
    for method, values in settings["methods"].items():
        if method not in applied:
            _apply_function(method)(model, **values)
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


def _apply_function(method: str) -> Callable[..., nn.Module]:
    from lab import adapter_v2, lora  # they import this module

    functions = {
        "adapter": apply_adapter,
        "adapter_v2": adapter_v2.apply_adapter_v2,
        "lora": lora.apply_lora,
    }
    if method not in functions:
        raise AdapterError(f"unknown adapter method {method!r}; known: {sorted(functions)}")
    return functions[method]


def fingerprint(model: nn.Module, exclude: set[str], samples: int = 8) -> dict[str, Any]:
    """What identifies the base model: its config (the base ``Config`` fields but the
    name), every base tensor's shape and, for the first two and last two weight
    matrices, ``samples`` evenly spaced values and the mean magnitude of a strided
    subsample. Values, not a hash, so the same base in another dtype (bf16 vs fp32)
    still matches."""
    fields = {f.name for f in dataclasses.fields(BaseConfig) if f.init} - {"name"}
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


def _is_merged(model: nn.Module) -> bool:
    return any(getattr(m, "merged", False) for m in model.modules())
