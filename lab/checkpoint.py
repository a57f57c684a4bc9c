"""Checkpoints: save and load models as safetensors + JSON, and speak Hugging Face.

A ``lab`` checkpoint is a directory::

    config.json          Config.to_dict(), so Config.load("dir/config.json") reads it
    model.safetensors    the state dict; a tensor shared by several names (tied
                         embeddings) is stored once; the header records the config class

``save_pretrained(model, dir, format="hf")`` writes a Hugging Face directory instead
(``config.json`` with ``model_type`` + ``model.safetensors`` in the family's tensor
names) that ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` loads, and
``load_pretrained(dir, GPT)`` reads either kind, telling them apart by ``model_type`` in
``config.json``. The conversion itself is data in ``lab.hf`` (families: ``lab.hf.FAMILIES``;
the language model of a multimodal checkpoint such as Gemma 3's: ``lab.hf.MULTIMODAL``).

Safety and atomicity: weights are read with ``safetensors`` (or, for ``.bin``/``.pt``
files, ``torch.load(weights_only=True)``), never by unpickling arbitrary objects. A
save writes into a temporary sibling directory, fsyncs it and swaps it into place
with two renames, so a crash mid-save leaves the previous checkpoint untouched.
A missing, truncated or corrupt file is a ``CheckpointError`` that names it.

This module builds no model class of its own: ``GPT.from_pretrained`` passes itself
as ``model_class``, so the dependency runs one way (model -> checkpoint).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lab import hf
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
        model_type = model_type or hf.hf_model_type(config)
        config_json = hf.config_to_hf(config, model_type)
        dtype = next(iter(tensors.values())).dtype
        config_json["torch_dtype"] = config_json["dtype"] = str(dtype).removeprefix("torch.")
        tensors = hf.weights_to_hf(tensors, config, model_type)
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
    model_class: Callable[[Config], nn.Module],
    config_class: type[Config] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build a ``model_class`` (``lab.GPT`` or your own, called with the config) from a
    ``lab`` or Hugging Face checkpoint directory.

    ``config_class``: the Config subclass to rebuild (default: the class recorded in
    the checkpoint if it is already imported, else ``Config``); ``dtype`` defaults to
    the dtype the weights were stored in. Raises ``CheckpointError`` listing missing,
    unexpected and shape-mismatched tensors when checkpoint and config disagree.
    """
    directory = Path(directory)
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{directory} is not a checkpoint directory: it has no {CONFIG_FILE}; pass the "
            "directory that save_pretrained wrote (or a Hugging Face model directory)"
        )
    values = _read_json(directory / CONFIG_FILE)
    tensors, metadata = read_tensors(directory, device)
    is_hf = "model_type" in values or "architectures" in values
    try:
        if is_hf:
            values.setdefault("_name_or_path", directory.name)
            values, tensors = hf.text_model(values, tensors)
            config = hf.config_from_hf(values, config_class or Config)
        else:
            config_class = config_class or _recorded_class(metadata.get("config_class"))
            config = config_class.from_dict(values)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as error:  # ConfigError included
        raise CheckpointError(
            f"{directory / CONFIG_FILE} does not describe a valid config: {error}. If the "
            "checkpoint was saved with a Config subclass, import it first or pass "
            "config_class=YourConfig"
        ) from error
    with torch.device(device or "cpu"):
        model = model_class(config)
    if is_hf:
        names = list(unique_state(model)[0])
        tensors = hf.weights_from_hf(tensors, names, config, hf.model_type_of(values))
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
    exactly; otherwise raise ``CheckpointError`` listing every difference. A tensor
    the model ties to another may be stored once under either name, or under both
    with equal values (a plain ``torch.save(model.state_dict())``)."""
    expected, aliases = unique_state(model)
    tensors = dict(tensors)
    for alias, kept in aliases.items():
        if alias not in tensors:
            continue
        value = tensors.pop(alias)
        if kept not in tensors:
            tensors[kept] = value
        elif value.shape != tensors[kept].shape or not torch.equal(value, tensors[kept]):
            raise CheckpointError(
                f"{source} holds different {alias} and {kept}, but the model ties them; "
                "build the model untied (e.g. tie_embeddings=False) to load both"
            )
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
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for path in _weight_files(Path(directory)):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt") as handle:
                    metadata = metadata or dict(handle.metadata() or {})
                tensors.update(load_file(path, device=device))
            else:  # weights_only refuses anything but tensors and plain containers
                state = torch.load(path, map_location=device, weights_only=True)
                tensors.update(_tensor_dict(path, state))
        except pickle.UnpicklingError as error:
            raise CheckpointError(
                f"{path} is corrupt or holds objects other than tensors, which lab does not "
                "unpickle (that could run code): save the weights as safetensors, or as a "
                f"plain dict of tensors ({error})"
            ) from error
        except (SafetensorError, RuntimeError, EOFError, OSError) as error:
            raise CheckpointError(
                f"{path} cannot be read ({type(error).__name__}: {error}); it is truncated "
                "or corrupt: copy it again, or save the checkpoint again"
            ) from error
    return tensors, metadata


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a ``CheckpointError`` naming the file."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"{path} is not readable JSON ({error}); it is truncated or corrupt: restore it "
            "or save the checkpoint again"
        ) from error
    if not isinstance(values, dict):
        raise CheckpointError(
            f"{path} holds a JSON {type(values).__name__}, not an object of config fields; "
            "restore it or save the checkpoint again"
        )
    return values


def _tensor_dict(path: Path, state: Any) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{path} does not hold a state dict (names -> tensors) but a {type(state).__name__}; "
            "save model.state_dict()"
        )
    return state


def _weight_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass a checkpoint directory")
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(
                    f"{index} has no weight_map (tensor name -> shard file); restore it, or "
                    "delete it if the weights are in one file"
                )
            files = [directory / str(shard) for shard in sorted(set(weight_map.values()))]
            missing = [file.name for file in files if not file.is_file()]
            if missing:
                raise CheckpointError(
                    f"{index} lists shards that are not in {directory}: {', '.join(missing)}; "
                    "copy every shard of the checkpoint"
                )
            return files
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.bin"):
        if (directory / name).is_file():
            return [directory / name]
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors (or shards listed in "
        "model.safetensors.index.json), pytorch_model.bin or model.pt"
    )


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
