"""Checkpoints: save and load models as safetensors + JSON, and speak Hugging Face.

A ``lab`` checkpoint is a directory::

    config.json          Config.to_dict(), so Config.load("dir/config.json") reads it
    model.safetensors    the state dict; a tensor shared by several names (tied
                         embeddings) is stored once; the header records the config class

``save_pretrained(model, dir, format="hf")`` writes a Hugging Face directory instead
(``config.json`` with ``model_type`` + ``model.safetensors`` in the family's tensor
names) that ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads, and
``load_pretrained(dir)`` reads either kind, telling them apart by ``model_type`` in
``config.json``. Supported Hugging Face families: see ``FAMILIES``.

Safety and atomicity: weights are read with ``safetensors`` (or, for ``.bin``/``.pt``
files, ``torch.load(weights_only=True)``), never by unpickling arbitrary objects. A
save writes into a temporary sibling directory, fsyncs it and swaps it into place
with two renames, so a crash mid-save leaves the previous checkpoint untouched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lab.config import Config
from lab.errors import CheckpointError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Files a save replaces; anything else in the directory (a tokenizer, notes) is kept.
CHECKPOINT_FILES = re.compile(
    r"(generation_)?config\.json|model(-[\w-]+)?\.safetensors|model\.(pt|bin)"
    r"|pytorch_model(-[\w-]+)?\.bin|(model\.safetensors|pytorch_model\.bin)\.index\.json"
)


# --- public API ----------------------------------------------------------------------------


def save_pretrained(
    model: nn.Module, directory: str | Path, format: str = "lab", model_type: str | None = None
) -> Path:
    """Write ``model`` (anything with a ``config`` and a ``state_dict``) to ``directory``,
    atomically: a crash leaves the old directory or the new one, never a mix.

    ``format="lab"`` keeps every config field; ``format="hf"`` writes the Hugging Face
    layout of ``model_type`` (inferred from the config when None), and raises
    ``CheckpointError`` naming the fields that family cannot express.
    """
    config = getattr(model, "config", None)
    if not isinstance(config, Config):
        raise CheckpointError(
            f"save_pretrained needs model.config to be a lab Config; {type(model).__name__} "
            f"has {type(config).__name__}: set self.config = config in your model's __init__"
        )
    with atomic_directory(directory) as tmp:
        write_model(tmp, config, model.state_dict(), format, model_type)
    return Path(directory)


def write_model(
    directory: Path,
    config: Config,
    state: dict[str, torch.Tensor],
    format: str = "lab",
    model_type: str | None = None,
) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (not atomically:
    callers write into ``atomic_directory``). ``state`` is a full state dict; tied tensors
    are stored once."""
    tensors, _ = unique_tensors(state)
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    if format == "lab":
        cls = type(config)
        metadata = {"format": "pt", "config_class": f"{cls.__module__}:{cls.__qualname__}"}
        config_json = config.to_dict()
    elif format == "hf":
        model_type = model_type or hf_model_type(config)
        config_json = config_to_hf(config, model_type)
        dtype = next(iter(tensors.values())).dtype
        config_json["torch_dtype"] = config_json["dtype"] = str(dtype).removeprefix("torch.")
        tensors = _to_hf(tensors, config, FAMILIES[model_type].layout)
        metadata = {"format": "pt"}
    else:
        raise CheckpointError(f"format ({format!r}) must be 'lab' or 'hf'")
    try:
        config_text = json.dumps(config_json, indent=2) + "\n"
    except TypeError as error:
        raise CheckpointError(f"the config cannot be written as JSON: {error}") from None
    save_file(tensors, directory / WEIGHTS_FILE, metadata=metadata)
    (directory / CONFIG_FILE).write_text(config_text)


def load_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load the weights of a lab checkpoint directory into an existing ``model``, checking
    names and shapes (tied tensors, stored once, fill every name they are tied to)."""
    tensors, _ = read_tensors(Path(directory))
    load_state(model, tensors, source=str(directory))
    return model


def load_pretrained(
    directory: str | Path,
    config_class: type[Config] | None = None,
    model_class: Callable[[Config], nn.Module] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build a model from a ``lab`` or Hugging Face checkpoint directory.

    ``config_class``: the Config subclass to rebuild (default: the class recorded in
    the checkpoint if it is already imported, else ``Config``); ``model_class``
    (default ``lab.GPT``) is called with the config; ``dtype`` defaults to the dtype
    the weights were stored in. Raises ``CheckpointError`` listing missing,
    unexpected and shape-mismatched tensors when checkpoint and config disagree.
    """
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{directory} is not a checkpoint directory: it has no {CONFIG_FILE}; pass the "
            "directory that save_pretrained wrote (or a Hugging Face model directory)"
        )
    if model_class is None:
        from lab.model import GPT

        model_class = GPT
    values = json.loads((directory / CONFIG_FILE).read_text())
    tensors, metadata = read_tensors(directory, device)
    if "model_type" in values or "architectures" in values:
        values.setdefault("_name_or_path", directory.name)
        config = config_from_hf(values, config_class or Config)
        model = _build(model_class, config, device)
        names = list(unique_state(model)[0])
        tensors = _from_hf(tensors, names, config, FAMILIES[_model_type(values)].layout)
    else:
        config_class = config_class or _recorded_class(metadata.get("config_class"))
        try:
            config = config_class.from_dict(values)
        except (TypeError, ValueError) as error:
            raise CheckpointError(
                f"{directory / CONFIG_FILE} does not fit {config_class.__name__}: {error}. "
                "If the checkpoint was saved with a Config subclass, import it first or pass "
                "config_class=YourConfig"
            ) from error
        model = _build(model_class, config, device)
    dtype = dtype or _stored_dtype(tensors)
    if dtype is not None:
        _cast_weights(model, dtype)
    load_state(model, tensors, source=str(directory))
    return model


# --- state dicts ------------------------------------------------------------------------------


def unique_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model.state_dict()`` with every shared tensor kept once; see ``unique_tensors``."""
    return unique_tensors(model.state_dict())


def unique_tensors(
    state: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` with every shared tensor kept once, and ``{alias: kept name}`` for the
    names dropped. Tied embeddings are kept under the input embedding
    (``transformer.wte.weight``), as Hugging Face stores them."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        shared = t.numel() > 0 and t.device.type != "meta"
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if shared else (name,)
        groups.setdefault(key, []).append(name)
    aliases = {}
    for names in groups.values():
        kept = min(names, key=lambda n: n.startswith("lm_head"))
        aliases.update({name: kept for name in names if name != kept})
    return {n: t for n, t in state.items() if n not in aliases}, aliases


def load_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy ``tensors`` into ``model`` after checking that the names and shapes match
    exactly; otherwise raise ``CheckpointError`` listing every difference."""
    expected, aliases = unique_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(expected[name].shape)}"
        for name, t in tensors.items()
        if name in expected and t.shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the model:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        lines.append(
            "Check that the config (n_layer, n_embd, n_head, ...) is the one it was saved with."
        )
        raise CheckpointError("\n".join(lines))
    full = {**tensors, **{alias: tensors[name] for alias, name in aliases.items()}}
    model.load_state_dict(full, strict=True)


def read_tensors(
    directory: Path, device: torch.device | str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a checkpoint directory (one file, or shards listed in an index),
    and the safetensors header metadata of the first file."""
    device = str(device or "cpu")
    files = _weight_files(directory)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(path, "pt") as handle:
                metadata = metadata or dict(handle.metadata() or {})
            tensors.update(load_file(path, device=device))
        else:  # weights_only refuses anything but tensors and plain containers
            tensors.update(torch.load(path, map_location=device, weights_only=True))
    return tensors, metadata


def _weight_files(directory: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).is_file():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            return [directory / name for name in sorted(set(weight_map.values()))]
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors (or shards listed in "
        "model.safetensors.index.json), pytorch_model.bin or model.pt"
    )


def _build(model_class: Callable[[Config], nn.Module], config: Config, device: Any) -> nn.Module:
    with torch.device(device or "cpu"):
        return model_class(config)


def _cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast parameters and saved buffers to ``dtype``. Unlike ``model.to(dtype)`` this
    leaves recomputed buffers (RoPE's inverse frequencies) in fp32: rounded to bf16
    they would put positions in the thousands off by radians."""
    saved = set(model.state_dict())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and (name in saved or isinstance(tensor, nn.Parameter)):
            tensor.data = tensor.data.to(dtype)


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype | None:
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _recorded_class(path: str | None) -> type[Config]:
    """The Config subclass a lab checkpoint names, if its module is already imported
    (importing a module named by a file would run code the user did not choose)."""
    if not path:
        return Config
    module_name, _, qualname = path.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, Config) else Config


# --- atomic directories -------------------------------------------------------------------------


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``target``; when the block ends
    without error, fsync it and put it in place of ``target`` (files of the old
    ``target`` that are not checkpoint files, such as a tokenizer, are carried over).

    The swap is two renames (old away, new in); between them, for an instant, only
    the old copy exists, as ``.NAME.old-*`` beside it. On error the temporary
    directory is removed and ``target`` is untouched.
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory; choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            _carry_over(target, tmp)
        _fsync_tree(tmp)
        _swap_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _carry_over(old: Path, new: Path) -> None:
    for entry in old.iterdir():
        if (new / entry.name).exists() or CHECKPOINT_FILES.fullmatch(entry.name):
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name, copy_function=os.link)
        else:
            os.link(entry, new / entry.name)  # same file system: a link, not a copy


def _swap_into_place(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
    else:
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(target, old)
        try:
            os.rename(new, target)
        except BaseException:
            os.rename(old, target)
            raise
        shutil.rmtree(old)
    _fsync(target.parent)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before their folders
        _fsync(path)
    _fsync(root)


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file or, on POSIX, a directory entry list) to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on Windows; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- Hugging Face: configs ------------------------------------------------------------------------

# Hugging Face activation names -> lab's (``gelu_new`` is the tanh approximation).
HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "relu2": "relu2",
}  # fmt: skip
LAB_ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}

# Config field -> the config.json keys that hold it (read: first present; write: all).
LLAMA_KEYS = {
    "n_embd": ("hidden_size",), "n_layer": ("num_hidden_layers",),
    "n_head": ("num_attention_heads",), "n_query_groups": ("num_key_value_heads",),
    "head_size": ("head_dim",), "intermediate_size": ("intermediate_size",),
    "block_size": ("max_position_embeddings",), "norm_eps": ("rms_norm_eps",),
    "activation": ("hidden_act",), "tie_embeddings": ("tie_word_embeddings",),
}  # fmt: skip
GEMMA_KEYS = {**LLAMA_KEYS, "activation": ("hidden_activation", "hidden_act")}
GEMMA2_KEYS = {
    **GEMMA_KEYS, "attention_logit_softcapping": ("attn_logit_softcapping",),
    "final_logit_softcapping": ("final_logit_softcapping",),
}  # fmt: skip
MIXTRAL_KEYS = {
    **LLAMA_KEYS, "n_expert": ("num_local_experts",), "n_expert_per_token": ("num_experts_per_tok",),
}  # fmt: skip
NEOX_KEYS = {
    **{k: v for k, v in LLAMA_KEYS.items() if k not in ("n_query_groups", "head_size")},
    "norm_eps": ("layer_norm_eps",), "parallel_residual": ("use_parallel_residual",),
}  # fmt: skip
PHI_KEYS = {**LLAMA_KEYS, "norm_eps": ("layer_norm_eps",)}
del PHI_KEYS["head_size"]
GPT2_KEYS = {
    "n_embd": ("n_embd",), "n_layer": ("n_layer",), "n_head": ("n_head",),
    "intermediate_size": ("n_inner",), "block_size": ("n_positions",),
    "norm_eps": ("layer_norm_epsilon",), "activation": ("activation_function",),
    "tie_embeddings": ("tie_word_embeddings",),
}  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """Where a family keeps each ``lab`` tensor: Hugging Face names of the decoder
    (under ``base``) and of one layer (under ``base + layers + ".{i}."``). Several
    names for one lab tensor are concatenated along the output dimension (lab fuses
    ``attn`` = [Q | K | V] and a gated ``fc_1`` = [gate | up])."""

    base: str = "model."
    embed: str = "embed_tokens"
    wpe: str = ""
    final_norm: str = "norm"
    layers: str = "layers"
    lm_head: str = "lm_head"
    norm_1: str = "input_layernorm"
    norm_2: str = "post_attention_layernorm"
    post_attention_norm: str = ""
    post_mlp_norm: str = ""
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    qkv_per_head: bool = False  # GPT-NeoX: fused rows ordered (head, q|k|v, head_size)
    proj: str = "self_attn.o_proj"
    norm_q: str = "self_attn.q_norm"
    norm_k: str = "self_attn.k_norm"
    fc_1: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    fc_2: str = "mlp.down_proj"
    experts: str = "block_sparse_moe"  # Mixtral: .gate, .experts.{e}.w1 (gate) w3 (up) w2
    transposed: bool = False  # GPT-2's Conv1D stores linear weights as (in, out)


@dataclass(frozen=True)
class Family:
    """One Hugging Face ``model_type``: its class, keys, fixed lab fields and layout."""

    architecture: str
    keys: dict[str, tuple[str, ...]] = field(default_factory=lambda: LLAMA_KEYS)
    fields: dict[str, Any] = field(default_factory=dict)  # lab values the family implies
    defaults: dict[str, Any] = field(default_factory=dict)  # lab values of absent keys
    layout: Layout = Layout()
    rope: str = "full"  # "full" | "partial" (partial_rotary_factor) | "neox" | "none"
    windows: str = ""  # "all" | "alternate" (Gemma 2) | "qwen" | "" (no sliding window)
    biases: bool = False  # reads attention_bias / mlp_bias (Llama)


LLAMA_FIELDS = dict(positional="rope", norm_class_name="RMSNorm", mlp_class_name="GatedMLP")
GEMMA_FIELDS = dict(LLAMA_FIELDS, norm_unit_offset=True, scale_embeddings=True)
GEMMA_DEFAULTS = dict(activation="gelu_tanh", tie_embeddings=True)
NEOX_LAYOUT = Layout(
    base="gpt_neox.", embed="embed_in", final_norm="final_layer_norm", lm_head="embed_out",
    qkv=("attention.query_key_value",), qkv_per_head=True, proj="attention.dense",
    fc_1=("mlp.dense_h_to_4h",), fc_2="mlp.dense_4h_to_h",
)  # fmt: skip
GPT2_LAYOUT = Layout(
    base="transformer.", embed="wte", wpe="wpe", final_norm="ln_f", layers="h",
    norm_1="ln_1", norm_2="ln_2", qkv=("attn.c_attn",), proj="attn.c_proj",
    fc_1=("mlp.c_fc",), fc_2="mlp.c_proj", transposed=True,
)  # fmt: skip

FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", fields=LLAMA_FIELDS, biases=True),
    "mistral": Family("MistralForCausalLM", fields=LLAMA_FIELDS, windows="all"),
    "mixtral": Family(
        "MixtralForCausalLM", MIXTRAL_KEYS, dict(LLAMA_FIELDS, mlp_class_name="MoE", router="topk_softmax"),
        dict(rope_base=1e6, n_expert=8, n_expert_per_token=2), windows="all",
    ),
    "qwen2": Family(
        "Qwen2ForCausalLM", fields=dict(LLAMA_FIELDS, attn_bias=True, bias=False), windows="qwen"
    ),
    "qwen3": Family(
        "Qwen3ForCausalLM", fields=dict(LLAMA_FIELDS, norm_qk=True), windows="qwen", biases=True
    ),
    "gemma": Family("GemmaForCausalLM", GEMMA_KEYS, GEMMA_FIELDS, GEMMA_DEFAULTS),
    "gemma2": Family(
        "Gemma2ForCausalLM", GEMMA2_KEYS,
        dict(GEMMA_FIELDS, post_attention_norm=True, post_mlp_norm=True),
        GEMMA_DEFAULTS, Layout(
            norm_2="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
            post_mlp_norm="post_feedforward_layernorm",
        ),
        windows="alternate",
    ),
    "phi3": Family(
        "Phi3ForCausalLM", fields=LLAMA_FIELDS, rope="partial", windows="all",
        layout=Layout(qkv=("self_attn.qkv_proj",), fc_1=("mlp.gate_up_proj",)),
    ),
    "phi": Family(
        "PhiForCausalLM", PHI_KEYS,
        dict(
            positional="rope", norm_class_name="LayerNorm", mlp_class_name="MLP", bias=True,
            parallel_residual=True, shared_attention_norm=True, lm_head_bias=True,
        ),
        dict(activation="gelu_tanh", rotary_percentage=0.5),
        Layout(
            final_norm="final_layernorm", norm_2="", proj="self_attn.dense",
            fc_1=("mlp.fc1",), fc_2="mlp.fc2",
        ),
        rope="partial",
    ),
    "gpt_neox": Family(
        "GPTNeoXForCausalLM", NEOX_KEYS,
        dict(positional="rope", norm_class_name="LayerNorm", mlp_class_name="MLP", bias=True),
        dict(activation="gelu", rotary_percentage=0.25, parallel_residual=True),
        NEOX_LAYOUT, rope="neox",
    ),
    "gpt2": Family(
        "GPT2LMHeadModel", GPT2_KEYS,
        dict(positional="learned", norm_class_name="LayerNorm", mlp_class_name="MLP", bias=True),
        dict(activation="gelu_tanh", tie_embeddings=True), GPT2_LAYOUT, rope="none",
    ),
}  # fmt: skip


def config_from_hf(hf_config: dict[str, Any], config_class: type[Config] = Config) -> Config:
    """The ``Config`` of a Hugging Face ``config.json`` (as a dict)."""
    model_type = _model_type(hf_config)
    family = FAMILIES[model_type]
    values: dict[str, Any] = {
        "name": hf_config.get("_name_or_path") or model_type,
        "vocab_size": hf_config["vocab_size"],
        "padded_vocab_size": hf_config["vocab_size"],
        **family.fields,
        **family.defaults,
    }
    for name, keys in family.keys.items():
        value = next((hf_config[k] for k in keys if hf_config.get(k) is not None), None)
        if value is not None:
            values[name] = value
    act = values["activation"] = HF_ACTIVATIONS.get(values.get("activation", "silu"))
    _unsupported(
        act is None, model_type, "activation", _first(hf_config, family.keys["activation"])
    )
    if family.rope != "none":
        values.update(_rope_from_hf(hf_config, family, model_type))
    values.update(_windows_from_hf(hf_config, family, values["n_layer"]))
    if family.biases:
        attention, mlp = hf_config.get("attention_bias", False), hf_config.get("mlp_bias", False)
        _unsupported(
            attention != mlp and model_type != "qwen3",
            model_type,
            "attention_bias != mlp_bias",
            attention,
        )
        _unsupported(attention and model_type == "qwen3", model_type, "attention_bias", attention)
        values["bias"] = attention
    _read_family_extras(hf_config, model_type, values)
    return config_class.from_dict(values)


def _read_family_extras(hf: dict[str, Any], model_type: str, values: dict[str, Any]) -> None:
    """The few keys only one family has."""
    if model_type == "gemma2":
        values["attention_scale"] = hf.get("query_pre_attn_scalar", 256) ** -0.5
    elif model_type == "gpt_neox":
        _unsupported(not hf.get("attention_bias", True), model_type, "attention_bias", False)
    elif model_type == "phi":
        _unsupported(hf.get("qk_layernorm", False), model_type, "qk_layernorm", True)
    elif model_type == "gpt2":
        _unsupported(
            not hf.get("scale_attn_weights", True), model_type, "scale_attn_weights", False
        )
        _unsupported(
            hf.get("scale_attn_by_inverse_layer_idx", False), model_type,
            "scale_attn_by_inverse_layer_idx", True,
        )  # fmt: skip


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
    elif kind == "yarn" and not params.get("mscale") and params.get("truncate", True):
        out["rope_scaling"] = {
            "type": "yarn", "factor": float(params["factor"]), "original_max_seq_len": int(original),
            "beta_fast": float(params.get("beta_fast") or 32), "beta_slow": float(params.get("beta_slow") or 1),
            "attention_factor": params.get("attention_factor"),
        }  # fmt: skip
    else:
        _unsupported(True, model_type, "rope type", kind)
    return out


def _windows_from_hf(hf: dict[str, Any], family: Family, n_layer: int) -> dict[str, Any]:
    """``sliding_window_size`` and per-layer overrides from ``sliding_window`` and
    ``layer_types`` (or each family's rule when ``layer_types`` is absent)."""
    window = hf.get("sliding_window") if family.windows else None
    if family.windows == "qwen" and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return {"sliding_window_size": None}
    types = hf.get("layer_types")
    if family.windows == "all":  # Mistral, Mixtral, Phi-3 ignore layer_types
        types = ["sliding_attention"] * n_layer
    elif types is None and family.windows == "alternate":  # Gemma 2: even layers slide
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
    elif types is None:  # Qwen: layers from max_window_layers on slide
        first = hf.get("max_window_layers", 0)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layer)]
    full = [i for i, kind in enumerate(types) if kind != "sliding_attention"]
    if len(full) == n_layer:
        return {"sliding_window_size": None}
    overrides = {i: {"sliding_window_size": None} for i in full}
    return {"sliding_window_size": int(window), "layer_overrides": overrides}


def hf_model_type(config: Config) -> str:
    """The Hugging Face family whose architecture ``config`` most likely describes."""
    windows = {config.for_layer(i).sliding_window_size for i in range(config.n_layer)}
    if config.mlp_class_name == "MoE":
        return "mixtral"
    if config.positional == "learned":
        return "gpt2"
    if config.parallel_residual:
        return "phi" if config.shared_attention_norm else "gpt_neox"
    if config.norm_unit_offset:
        gemma2 = config.post_attention_norm or config.attention_logit_softcapping is not None
        return "gemma2" if gemma2 else "gemma"
    if config.norm_qk:
        return "qwen3"
    if config.attn_bias and not config.bias:
        return "qwen2"
    return "mistral" if windows != {None} else "llama"


def config_to_hf(config: Config, model_type: str | None = None) -> dict[str, Any]:
    """A Hugging Face ``config.json`` (as a dict) for ``config`` in family
    ``model_type``; raises ``CheckpointError`` naming every field the family cannot
    express (checked by converting back with ``config_from_hf``)."""
    model_type = model_type or hf_model_type(config)
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type ({model_type!r}) must be one of {sorted(FAMILIES)}")
    family = FAMILIES[model_type]
    values = config.to_dict()
    values["activation"] = LAB_ACTIVATIONS.get(config.activation, config.activation)
    hf: dict[str, Any] = {
        "model_type": model_type, "architectures": [family.architecture],
        "vocab_size": config.padded_vocab_size,
        "pad_token_id": None,  # token ids belong to the tokenizer; some defaults exceed the vocab
    }  # fmt: skip
    for name, keys in family.keys.items():
        hf.update(dict.fromkeys(keys, values[name]))
    if family.rope != "none":
        hf.update(_rope_to_hf(config, family))
    windows = [config.for_layer(i).sliding_window_size for i in range(config.n_layer)]
    window = next((w for w in windows if w is not None), None)
    if family.windows:
        sliding = ["sliding_attention" if w is not None else "full_attention" for w in windows]
        hf["sliding_window"] = (
            window if window is not None or family.windows != "alternate" else config.block_size
        )
        if family.windows in ("alternate", "qwen"):
            hf["layer_types"] = sliding
        if family.windows == "qwen":
            hf["use_sliding_window"], hf["max_window_layers"] = window is not None, 0
    if family.biases:
        hf["attention_bias"] = hf["mlp_bias"] = config.bias
    if model_type == "gemma2":
        scale = config.attention_scale or config.head_size**-0.5
        scalar = scale**-2  # transformers wants an int; Gemma 2's are 256 and 144
        hf["query_pre_attn_scalar"] = (
            round(scalar) if math.isclose(scalar, round(scalar)) else scalar
        )
    elif model_type == "mixtral":
        hf["intermediate_size"] = config.moe_intermediate_size or config.intermediate_size
    _check_expressible(config, config_from_hf(hf), model_type)
    return hf


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
        )  # fmt: skip
    elif kind != "linear":
        raise CheckpointError(f"rope_scaling type {kind!r} has no Hugging Face equivalent")
    out["rope_scaling"] = hf_scaling
    return out


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


def _check_expressible(config: Config, converted: Config, model_type: str) -> None:
    differences = []
    for i in range(config.n_layer):
        ours, theirs = _comparable(config.for_layer(i)), _comparable(converted.for_layer(i))
        for name in ours:
            a, b = ours[name], theirs[name]
            same = (
                math.isclose(a, b, rel_tol=1e-9)
                if isinstance(a, float) and isinstance(b, float)
                else a == b
            )
            if not same and name not in (d[0] for d in differences):
                differences.append((name, a, b))
    if differences:
        listed = ", ".join(f"{name}={a!r} (would be {b!r})" for name, a, b in differences)
        raise CheckpointError(
            f"Hugging Face model_type {model_type!r} cannot express this config: {listed}. "
            f"Pass model_type= one of {sorted(FAMILIES)} that has these features, or save "
            "with format='lab'"
        )


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


def _model_type(hf_config: dict[str, Any]) -> str:
    model_type = hf_config.get("model_type")
    if model_type is None:  # very old configs name only the class
        by_class = {f.architecture: name for name, f in FAMILIES.items()}
        model_type = next(
            (by_class[a] for a in hf_config.get("architectures", []) if a in by_class), None
        )
    if model_type not in FAMILIES:
        raise CheckpointError(
            f"Hugging Face model_type {model_type!r} is not supported; lab converts "
            f"{sorted(FAMILIES)}"
        )
    return model_type


def _first(hf: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((hf[k] for k in keys if hf.get(k) is not None), None)


def _unsupported(condition: Any, model_type: str, key: str, value: Any) -> None:
    if condition:
        raise CheckpointError(
            f"this {model_type} checkpoint sets {key}={value!r}, which lab's model does not implement"
        )


# --- Hugging Face: weights ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """One lab tensor made of ``hf`` tensors: transposed (Conv1D), concatenated along
    dim 0 (split back by ``sizes``), for GPT-NeoX regrouped from per-head
    ``(n_head, q|k|v, head_size)`` rows to lab's ``[Q | K | V]``, and for Mixtral
    stacked: ``experts`` consecutive groups of parts, one (concatenated) per expert."""

    lab: str
    hf: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    per_head: tuple[int, int] | None = None  # (n_head, head_size)
    transpose: bool = False
    experts: int = 0

    def to_lab(self, parts: list[torch.Tensor]) -> torch.Tensor:
        parts = [p.t() if self.transpose else p for p in parts]
        if self.experts:
            group = len(parts) // self.experts
            x = torch.stack(
                [torch.cat(parts[e * group : (e + 1) * group]) for e in range(self.experts)]
            )
        else:
            x = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.per_head:
            n_head, head_size = self.per_head
            x = x.reshape(n_head, 3, head_size, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        return x.contiguous()

    def to_hf(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.per_head:
            n_head, head_size = self.per_head
            x = x.reshape(3, n_head, head_size, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        rows = list(x.unbind(0)) if self.experts else [x]
        parts = [p for row in rows for p in (row.split(self.sizes) if self.sizes else [row])]
        return [(p.t() if self.transpose else p).contiguous() for p in parts]


def _rules(names: list[str], config: Config, layout: Layout) -> list[_Rule]:
    top = {
        "transformer.wte": layout.base + layout.embed,
        "transformer.wpe": layout.base + layout.wpe,
        "transformer.ln_f": layout.base + layout.final_norm,
        "lm_head": layout.lm_head,
    }
    rules = []
    for name in names:
        stem, _, kind = name.rpartition(".")
        match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", stem)
        if match is None:
            hf = top.get(stem) if stem != "transformer.wpe" or layout.wpe else None
            if not hf:
                raise CheckpointError(f"lab tensor {name} has no Hugging Face counterpart")
            rules.append(_Rule(name, (f"{hf}.{kind}",)))
            continue
        i, local = int(match[1]), match[2]
        prefix = f"{layout.base}{layout.layers}.{i}."
        layer = config.for_layer(i)
        rules.append(_layer_rule(name, local, kind, prefix, layer, layout))
    return rules


def _layer_rule(
    name: str, local: str, kind: str, prefix: str, config: Config, layout: Layout
) -> _Rule:
    transpose = layout.transposed and kind == "weight"  # (a 1-D norm weight stays as it is)
    single = {
        "norm_1": layout.norm_1, "norm_2": layout.norm_2,
        "post_attention_norm": layout.post_attention_norm, "post_mlp_norm": layout.post_mlp_norm,
        "attn.proj": layout.proj, "attn.norm_q": layout.norm_q, "attn.norm_k": layout.norm_k,
        "mlp.fc_2": layout.fc_2,
    }  # fmt: skip
    if single.get(local):
        return _Rule(name, (f"{prefix}{single[local]}.{kind}",), transpose=transpose)
    if local == "attn.attn":
        q, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
        per_head = (config.n_head, config.head_size) if layout.qkv_per_head else None
        hf = tuple(f"{prefix}{part}.{kind}" for part in layout.qkv)
        return _Rule(name, hf, (q, kv, kv) if len(hf) == 3 else None, per_head, transpose)
    if local == "mlp.fc_1":
        hf = tuple(f"{prefix}{part}.{kind}" for part in layout.fc_1)
        size = config.intermediate_size
        return _Rule(name, hf, (size,) * len(hf) if len(hf) > 1 else None, transpose=transpose)
    if local == "mlp.router":
        return _Rule(name, (f"{prefix}{layout.experts}.gate.{kind}",))
    if local == "mlp.experts" and kind in ("fc_1", "fc_2"):
        n_expert = config.n_expert
        size = config.moe_intermediate_size or config.intermediate_size
        projections = ("w1", "w3") if kind == "fc_1" else ("w2",)
        hf = tuple(
            f"{prefix}{layout.experts}.experts.{e}.{w}.weight"
            for e in range(n_expert)
            for w in projections
        )
        return _Rule(name, hf, (size, size) if kind == "fc_1" else None, experts=n_expert)
    raise CheckpointError(f"lab tensor {name} has no Hugging Face counterpart in this family")


# Hugging Face buffers that some checkpoints store and lab recomputes.
_HF_BUFFERS = re.compile(
    r".*(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias|attention\.bias|attention\.masked_bias)"
)


def _from_hf(
    tensors: dict[str, torch.Tensor], names: list[str], config: Config, layout: Layout
) -> dict[str, torch.Tensor]:
    if not any(k.startswith(layout.base) for k in tensors):  # old GPT-2 files omit the prefix
        tensors = {
            k if k.startswith(layout.lm_head) else layout.base + k: v for k, v in tensors.items()
        }
    rules = _rules(names, config, layout)
    used = {hf for rule in rules for hf in rule.hf}
    missing = sorted(hf for hf in used if hf not in tensors)
    ignored = {f"{layout.lm_head}.weight"} if config.tie_embeddings else set()
    unexpected = sorted(
        k for k in tensors if k not in used and k not in ignored and not _HF_BUFFERS.fullmatch(k)
    )
    if missing or unexpected:
        raise CheckpointError(
            "the Hugging Face weights do not match their config.json:"
            + (f"\n  missing ({len(missing)}): {', '.join(missing)}" if missing else "")
            + (f"\n  unexpected ({len(unexpected)}): {', '.join(unexpected)}" if unexpected else "")
        )
    out = {}
    for rule in rules:
        try:
            out[rule.lab] = rule.to_lab([tensors[hf] for hf in rule.hf])
        except RuntimeError as error:
            shapes = ", ".join(f"{hf} {tuple(tensors[hf].shape)}" for hf in rule.hf)
            raise CheckpointError(f"cannot build {rule.lab} from {shapes}: {error}") from None
    return out


def _to_hf(
    tensors: dict[str, torch.Tensor], config: Config, layout: Layout
) -> dict[str, torch.Tensor]:
    out = {}
    for rule in _rules(list(tensors), config, layout):
        out.update(zip(rule.hf, rule.to_hf(tensors[rule.lab]), strict=True))
    return out
