"""LoRA adapters in peft's files, for lab models whose layout is a Hugging Face family.

peft keeps one LoRA pair per Hugging Face linear layer, in ``adapter_model.safetensors``
as ``base_model.model.<layer>.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r),
and its settings (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``: the
layers' last names) in ``adapter_config.json``. lab's ``LoRALinear`` keeps one pair per
adapted part of its output, and the parts are those layers::

    lab transformer.h.{i}.attn.attn   [Q | K | V]    ->  self_attn.q_proj, k_proj, v_proj
        transformer.h.{i}.attn.proj                  ->  self_attn.o_proj
        transformer.h.{i}.mlp.fc_1    [gate | up]    ->  mlp.gate_proj, mlp.up_proj
        transformer.h.{i}.mlp.fc_2                   ->  mlp.down_proj
        lm_head                                      ->  lm_head

(names of the Llama family; each family's come from ``lab.hf.FAMILIES``). lab
adapts a gated ``fc_1`` as one layer with one ``A``, so its two halves are written
with the same ``A``, and a peft adapter whose ``gate_proj`` and ``up_proj`` have
different ``A`` cannot be read. A family that fuses Q, K and V into one Hugging Face
layer (Phi-3, GPT-NeoX) or stores transposed weights (GPT-2) has no peft equivalent
of lab's per-part pairs: use ``save_adapter`` there.

    save_peft(model, "my-lora")                                  # after apply_lora
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), "my-lora")
    load_peft(GPT.from_pretrained(base_dir), "peft-adapter-dir")  # applies, then loads
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lab.checkpoint import atomic_directory
from lab.config import Config
from lab.errors import AdapterError
from lab.finetune.lora import LoRALinear, apply_lora, lora_layers
from lab.hf import FAMILIES, Layout, hf_model_type

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's name for the wrapped Hugging Face model
FLAT = torch.contiguous_format
# peft settings that change what a LoRA computes, with the value lab's LoRA matches
UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
               "lora_bias": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
               "modules_to_save": None, "layers_to_transform": None}  # fmt: skip


@dataclass(frozen=True)
class Pair:
    """One peft LoRA pair: the Hugging Face layer ``hf`` is the rows ``rows`` of the
    adapted part ``part`` (its ``A_part``, ``B_part``) of the lab ``layer``."""

    layer: LoRALinear
    part: int
    rows: slice
    hf: str

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This pair's (A, B) as views of the lab layer's parameters."""
        r, layer = self.layer.r, self.layer
        B = layer.lora_B.split(layer.adapted_parts())[self.part]
        return layer.lora_A[self.part * r : (self.part + 1) * r], B[self.rows]


def save_peft(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    model_type: str | None = None,
) -> Path:
    """Write the LoRA of ``model`` as a peft adapter of the Hugging Face family
    ``model_type`` (inferred from the config when None), atomically;
    ``base_model_name_or_path`` is what peft records as the base model."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers: call apply_lora first")
    if any(layer.merged for layer in layers):
        raise AdapterError("LoRA is merged into the base weights: call unmerge_lora(model) first")
    settings = {layer.r for layer in layers}, {layer.lora_alpha for layer in layers}
    if len(settings[0]) > 1 or len(settings[1]) > 1:
        raise AdapterError(f"peft's files hold one r and lora_alpha; this model has {settings}")
    pairs = peft_pairs(model, model_type)
    tensors = {}
    for pair in pairs:
        A, B = pair.tensors()
        # copies: a fused fc_1's halves share one A, and safetensors stores no shared memory
        tensors[f"{PREFIX}{pair.hf}.lora_A.weight"] = A.detach().clone(memory_format=FLAT).cpu()
        tensors[f"{PREFIX}{pair.hf}.lora_B.weight"] = B.detach().clone(memory_format=FLAT).cpu()
    dropout = layers[0].lora_dropout
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": layers[0].r,
        "lora_alpha": layers[0].lora_alpha,
        "lora_dropout": dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        "target_modules": sorted({pair.hf.rsplit(".", 1)[-1] for pair in pairs}),
        "inference_mode": True,
        **UNSUPPORTED,
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def load_peft(model: nn.Module, directory: str | Path, model_type: str | None = None) -> nn.Module:
    """Apply the LoRA of a peft adapter directory to ``model`` (a lab GPT without LoRA,
    the base the adapter was trained on, in the family ``model_type``) and load its
    tensors. Returns ``model``."""
    directory = Path(directory)
    config = _read_config(directory)
    targets = _lab_targets(config["target_modules"], _layout(model, model_type), directory)
    tensors = _read_tensors(directory)
    apply_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets)
    pairs = peft_pairs(model, model_type)
    names = {f"{PREFIX}{pair.hf}.lora_{ab}.weight" for pair in pairs for ab in "AB"}
    # peft also stores the base weight of a targeted head ("base_layer"): the base's own
    unexpected = sorted(n for n in set(tensors) - names if ".base_layer." not in n)
    missing = sorted(names - set(tensors))
    if missing or unexpected:
        raise AdapterError(
            f"{directory / WEIGHTS_FILE} does not match its {CONFIG_FILE} on this model:"
            + (f"\n  missing: {', '.join(missing[:10])}" if missing else "")
            + (f"\n  unexpected: {', '.join(unexpected[:10])}" if unexpected else "")
        )
    loaded_A = set()  # (layer, part) whose A was read: a fused fc_1's halves share it
    with torch.no_grad():
        for pair in pairs:
            A, B = pair.tensors()
            for ab, param in (("A", A), ("B", B)):
                name = f"{PREFIX}{pair.hf}.lora_{ab}.weight"
                tensor = tensors[name]
                if tensor.shape != param.shape:
                    raise AdapterError(
                        f"{name} in {directory / WEIGHTS_FILE} has shape {tuple(tensor.shape)}, "
                        f"this model needs {tuple(param.shape)}: a different base model?"
                    )
                shared = ab == "A" and (id(pair.layer), pair.part) in loaded_A
                if shared and not torch.equal(param, tensor.to(param.dtype)):
                    raise AdapterError(
                        f"{name} differs from the lora_A of the layer it shares one lab layer "
                        "with (lab adapts a fused [gate | up] with one A): this adapter "
                        "cannot be expressed in lab"
                    )
                param.copy_(tensor)
            loaded_A.add((id(pair.layer), pair.part))
    return model


def peft_pairs(model: nn.Module, model_type: str | None = None) -> list[Pair]:
    """Every LoRA pair of ``model`` as peft names it in the family ``model_type``."""
    layout = _layout(model, model_type)
    pairs = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoRALinear):
            continue
        hf = _hf_layers(name, layout)
        if len(hf) == len(layer.parts):  # one Hugging Face layer per lab part
            spans = [(i, slice(None), h) for i, h in enumerate(hf)]
        elif len(layer.parts) == 1:  # lab fuses them: the halves of one part
            size = layer.out_features // len(hf)
            spans = [(0, slice(j * size, (j + 1) * size), h) for j, h in enumerate(hf)]
        else:
            raise AdapterError(
                f"{name} has {len(layer.parts)} LoRA parts but the Hugging Face layout has "
                f"{len(hf)} layer(s) there ({', '.join(hf)}); use save_adapter instead"
            )
        adapted = [i for i, on in enumerate(layer.enabled) if on]
        for part, rows, hf_name in spans:
            if layer.enabled[part]:
                pairs.append(Pair(layer, adapted.index(part), rows, hf_name))
    return pairs


def _layout(model: nn.Module, model_type: str | None) -> Layout:
    if not isinstance(getattr(model, "config", None), Config):
        raise AdapterError(
            f"{type(model).__name__} is not a lab GPT (no lab Config in model.config)"
        )
    model_type = model_type or hf_model_type(model.config)
    if model_type not in FAMILIES:
        raise AdapterError(f"model_type ({model_type!r}) must be one of {sorted(FAMILIES)}")
    layout = FAMILIES[model_type].layout
    if layout.transposed or layout.qkv_per_head:
        raise AdapterError(
            f"{model_type} stores its linear layers in a layout peft's LoRA pairs do not "
            "match lab's (transposed or per-head rows); use save_adapter/load_adapter"
        )
    return layout


def _hf_layers(name: str, layout: Layout) -> list[str]:
    """The Hugging Face layers (full names) that lab's linear layer ``name`` fuses."""
    if name == "lm_head":
        return [layout.lm_head]
    match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", name)
    local = {"attn.attn": layout.qkv, "attn.proj": (layout.proj,), "mlp.fc_1": layout.fc_1,
             "mlp.fc_2": (layout.fc_2,)}  # fmt: skip
    if match is None or match[2] not in local:
        raise AdapterError(f"lab layer {name} has no Hugging Face counterpart for peft")
    return [f"{layout.base}{layout.layers}.{match[1]}.{part}" for part in local[match[2]]]


def _lab_targets(modules: Any, layout: Layout, directory: Path) -> list[str]:
    """lab's LoRA targets for peft's ``target_modules`` (last names of layers)."""
    hf = {"projection": [layout.proj], "mlp": [*layout.fc_1, layout.fc_2], "head": [layout.lm_head]}
    if len(layout.qkv) == 3:  # separate q, k, v layers (a fused one has no lab target)
        hf.update(query=[layout.qkv[0]], key=[layout.qkv[1]], value=[layout.qkv[2]])
    last = {target: {name.rsplit(".", 1)[-1] for name in names} for target, names in hf.items()}
    if not isinstance(modules, list) or not modules:
        raise AdapterError(
            f"target_modules in {directory / CONFIG_FILE} must be a list of layer names "
            f"(got {modules!r}); lab cannot read a regular expression there"
        )
    targets = sorted(t for t in last if last[t] <= set(modules))
    covered = set().union(*(last[t] for t in targets))
    if set(modules) - covered:
        raise AdapterError(
            f"target_modules {sorted(set(modules) - covered)} in {directory / CONFIG_FILE} "
            f"have no lab LoRA target in this layout: lab adapts "
            + ", ".join(f"{t} = {sorted(names)}" for t, names in last.items())
        )
    return targets


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} has no {CONFIG_FILE}: pass a peft adapter directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AdapterError(f"{path} is not valid JSON ({error})") from None
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path} is a {config.get('peft_type')} adapter; lab reads LORA")
    different = {k: config[k] for k, v in UNSUPPORTED.items() if config.get(k, v) not in (v, None)}
    if different:
        raise AdapterError(f"{path} uses peft options lab's LoRA does not have: {different}")
    return config


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{directory} has no {WEIGHTS_FILE} (lab reads peft's safetensors)")
    try:
        return load_file(path)
    except SafetensorError as error:
        raise AdapterError(f"{path} is not a readable safetensors file ({error})") from None
