"""Training checkpoints: a lab checkpoint directory with the training state beside it.

``checkpoint_dir/step-00000100/`` holds::

    config.json, model.safetensors   the model, as lab.checkpoint writes it (whole
                                     weights, gathered from shards; tied tensors once),
                                     so GPT.from_pretrained, LLM and load_weights read it
    optimizer.pt                     AdamW's state by parameter name (torch.save; read
                                     back with weights_only)
    rng-{rank}.safetensors           each rank's torch CPU/CUDA RNG states, and the
                                     data generator
    state.json                       step, the history so far (the schedule is a
                                     function of step) and fp16's gradient-scaler state

A model whose ``config`` is not a lab ``Config`` (any module fit can train) gets no
``config.json``: its weights still load with ``load_weights``, and fit resumes from it.
Each checkpoint is written by ``lab.checkpoint.atomic_directory`` (fsynced, then
renamed into place), so a crash leaves the previous ones whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lab import checkpoint
from lab.config import Config
from lab.errors import CheckpointError
from lab.train.engine import Engine
from lab.train.state import History

CHECKPOINT_PREFIX = "step-"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``checkpoint_dir`` (``step-00000100``), or None.

    Checkpoints appear under their final name only by an atomic rename, so a crash
    while writing leaves a hidden temporary directory, never a partial ``step-*``.
    """
    found = sorted(Path(checkpoint_dir).glob(f"{CHECKPOINT_PREFIX}*"))
    return found[-1] if found else None


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint's weights into ``model`` (``path``: a checkpoint directory, or
    a ``checkpoint_dir`` for its latest). E.g. to use a model trained with FSDP."""
    path = Path(path)
    if not (path / checkpoint.WEIGHTS_FILE).exists():
        path = latest_checkpoint(path) or path
    return checkpoint.load_weights(model, path)


def write_weights(directory: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Write the whole ``state`` of ``model`` into ``directory`` as a lab checkpoint
    (``config.json`` too when ``model.config`` is a lab ``Config``)."""
    state = tie_shared(model, state)
    config = getattr(model, "config", None)
    if isinstance(config, Config):
        checkpoint.write_model(directory, config, state)
    else:  # no config to write: the weights alone, which load_weights reads
        tensors, _ = checkpoint.unique_tensors(state)
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        save_file(tensors, directory / checkpoint.WEIGHTS_FILE, metadata={"format": "pt"})


def tie_shared(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the names of each parameter that ``model`` shares (tied
    embeddings) all pointing at one tensor, filled in where one is missing.

    A checkpoint stores a shared tensor once, under one name; and a state dict
    gathered from FSDP shards holds a separate copy under each name.
    """
    state = dict(state)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for group in names.values():
        present = [name for name in group if name in state]
        if len(group) > 1 and present:
            state.update(dict.fromkeys(group, state[present[0]]))
    return state


def save_checkpoint(
    engine: Engine,
    model: nn.Module,
    raw_model: nn.Module,
    optimizer: Any,
    checkpoint_dir: Path,
    step: int,
    history: History,
    generator: torch.Generator,
    keep_last: int,
) -> Path:
    """Write ``checkpoint_dir/step-{step:08d}`` (see the module docstring) and keep the
    newest ``keep_last``; every rank takes part. ``model`` is what the engine's
    ``setup`` returned for ``raw_model``."""
    wrapped = engine.wrapped(model)
    options = engine.state_dict_options
    # Gathering is collective under FSDP: every rank takes part, rank 0 receives.
    model_state = get_model_state_dict(wrapped, options=options)
    optim_state = get_optimizer_state_dict(wrapped, optimizer, options=options)
    path = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    with _shared_atomic_directory(engine, path) as tmp:
        save_file(_rng_state(generator), tmp / f"rng-{engine.global_rank}.safetensors")
        if engine.is_global_zero:
            write_weights(tmp, raw_model, model_state)
            torch.save(optim_state, tmp / OPTIMIZER_FILE)
            state = {"step": step, "world_size": engine.world_size, "history": history.to_dict()}
            if engine.scaler is not None:  # fp16's loss scale and its growth counter
                state["scaler"] = engine.scaler.state_dict()
            (tmp / STATE_FILE).write_text(json.dumps(state))
    if engine.is_global_zero:
        for old in sorted(checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep_last]:
            shutil.rmtree(old)
    engine.barrier()
    return path


def load_checkpoint(
    engine: Engine,
    model: nn.Module,
    raw_model: nn.Module,
    optimizer: Any,
    path: Path,
    generator: torch.Generator,
) -> tuple[int, History]:
    """Restore everything ``save_checkpoint`` wrote into the set-up ``model``,
    ``optimizer``, the engine's scaler, the RNGs and ``generator``; return
    ``(step, history)``."""
    for name in (STATE_FILE, OPTIMIZER_FILE):
        if not (path / name).is_file():
            raise CheckpointError(
                f"{path} is not a training checkpoint: it has no {name}. Resume from a "
                "step-* directory that fit wrote, or start afresh (resume=False with an "
                "empty checkpoint_dir)"
            )
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path / STATE_FILE} is not valid JSON ({error})") from None
    wrapped = engine.wrapped(model)
    tensors, _ = checkpoint.read_tensors(path)
    options = StateDictOptions(full_state_dict=True)  # every rank reads the whole file
    try:
        set_model_state_dict(wrapped, tie_shared(raw_model, tensors), options=options)
        optim_state = torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        set_optimizer_state_dict(wrapped, optimizer, optim_state, options=options)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(
            f"cannot resume from {path}: {e}\nIs it a checkpoint of this model? "
            "Use another checkpoint_dir or resume=False with an empty one."
        ) from e
    if engine.scaler is not None and "scaler" in state:
        engine.scaler.load_state_dict(state["scaler"])
    rank = engine.global_rank if state["world_size"] == engine.world_size else 0
    rng = load_file(path / f"rng-{rank}.safetensors")
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["data"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return state["step"], History.from_dict(state["history"])


@contextmanager
def _shared_atomic_directory(engine: Engine, path: Path) -> Iterator[Path]:
    """``lab.checkpoint.atomic_directory(path)`` on rank 0, its temporary directory
    shared with every rank: each writes its files into it, then rank 0 moves it into
    place."""
    with checkpoint.atomic_directory(path) if engine.is_global_zero else nullcontext() as tmp:
        tmp = engine.broadcast(tmp)
        yield tmp
        engine.barrier()


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return states
