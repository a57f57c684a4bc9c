"""Training: ``fit(model, data, steps=...)`` for any module mapping token ids to logits.

One loop, readable top to bottom (nanoGPT's ``train.py`` in spirit)::

    for step in 1..steps:
        x, y = one global batch from data               (the same on every rank)
        for each micro-batch of this rank:              (gradient accumulation)
            loss = cross_entropy(model(x), y) [+ MoE auxiliary loss]; backward
        grad_norm = clip(gradients)
        stop on a non-finite loss, else optimizer.step() with lr = schedule(step)
        record history; callbacks; evaluate, checkpoint, early stop

``data`` is a task with ``sample(batch_size, generator)``, a token stream with
``get_batch(split, batch_size, ...)`` or a callable ``(batch_size, generator) -> (x, y)``:
see ``lab.train.batches``.

``batch_size`` is the global batch: sequences per optimizer step summed over
accumulation steps and devices, so changing ``grad_accum_steps`` or ``devices``
changes memory, not the optimisation. Every rank draws the whole global batch (cheap
next to the model) and keeps its slice, so the data stream does not depend on the
parallel layout either. The loss is the mean over all labelled tokens of the global
batch, so one device and two agree to rounding.

The parts, one idea each:

    state.py        History (what training records), TrainState (what callbacks see)
    optim.py        AdamW's parameter groups and the learning-rate schedule
    batches.py      the data protocol, each rank's micro-batches, the loss
    engine.py       the Engine interface the loop runs on; LocalEngine (one device)
    loop.py         the loop itself, as short steps (Run)
    compiled.py     the model's part of a step, eager or through torch.compile
    checkpoints.py  training checkpoints: lab checkpoint directories plus training state
    fabric.py       FabricEngine: the Engine on Lightning Fabric (DDP, FSDP)
    distributed.py  multi-device runs: launched, joined under torchrun, or forked from
                    a notebook
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lab.errors import NonFiniteLossError
from lab.train.checkpoints import CHECKPOINT_PREFIX, latest_checkpoint, load_weights
from lab.train.engine import PRECISIONS, Engine, LocalEngine
from lab.train.loop import Settings, train
from lab.train.optim import SCHEDULES, adamw, learning_rate, optimizer_groups
from lab.train.state import History, TrainState

__all__ = [
    "CHECKPOINT_PREFIX",
    "PRECISIONS",
    "SCHEDULES",
    "Engine",
    "History",
    "LocalEngine",
    "NonFiniteLossError",
    "TrainState",
    "adamw",
    "fit",
    "latest_checkpoint",
    "learning_rate",
    "load_weights",
    "optimizer_groups",
]


def fit(
    model: nn.Module,
    data: Any,
    *,
    steps: int,
    batch_size: int = 32,
    block_size: int | None = None,
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    warmup_steps: int = 0,
    schedule: Literal["cosine", "linear", "constant"] = "cosine",
    min_lr: float = 0.0,
    grad_accum_steps: int = 1,
    grad_clip: float | None = 1.0,
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true",
    eval_every: int | None = None,
    eval_steps: int = 10,
    target: dict[str, float] | None = None,
    callbacks: Iterable[Any] = (),
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every: int | None = None,
    keep_last: int = 2,
    resume: bool | str | os.PathLike[str] = True,
    progress: bool = True,
    device: str | torch.device | None = None,
    seed: int = 0,
    devices: int | str | None = None,
    strategy: str | None = None,
    accelerator: str = "auto",
    num_nodes: int = 1,
    compile: bool = False,
    loss_chunk_size: int | None = None,
) -> History:
    """Train ``model`` (token ids (B, T) -> logits (B, T, V)) on ``data``; return the History.

    Data: see the module docstring (a task with ``sample``, a ``get_batch`` stream,
    or a callable). ``block_size`` (default ``model.config.block_size``) is the window
    length for ``get_batch`` streams. ``batch_size`` is the global batch per optimizer
    step, split into ``grad_accum_steps`` micro-batches on each of the devices.

    Optimisation: AdamW (``betas``, decoupled ``weight_decay`` on tensors with >= 2 dims,
    see ``optimizer_groups``; torch's fused kernel on CUDA and with ``compile=True``, see
    ``adamw``) with ``lr`` warmed up linearly for ``warmup_steps``, then
    ``schedule`` down to ``min_lr`` (see ``learning_rate``); gradients clipped to a global
    norm of ``grad_clip`` (None: no clipping). ``precision``: ``"32-true"``, ``"bf16-mixed"``
    (CPU or CUDA autocast) or ``"16-mixed"`` (fp16 autocast with a gradient scaler: for
    GPUs without bf16; it runs on a CPU too, slowly). Models with
    ``lab.moe`` layers get ``lab.moe.auxiliary_loss(model)`` added to the loss.

    Evaluation every ``eval_every`` steps (and at the last) on ``eval_steps`` fixed
    validation batches gives ``val_loss`` and ``val_accuracy`` (next-token accuracy
    on labelled positions); ``target={"val_accuracy": 0.99}`` stops once reached.
    ``callbacks``: functions called with a ``TrainState`` after every step, or
    objects with ``on_step(state)``/``on_eval(state)``; run on rank 0 only.

    Checkpoints: with ``checkpoint_dir``, one every ``checkpoint_every`` steps and at
    the end (the newest ``keep_last`` are kept), written atomically. Each
    ``step-XXXXXXXX`` is a lab checkpoint directory (``GPT.from_pretrained``,
    ``load_pretrained`` and ``load_weights`` read it) with the training state beside the
    weights; see ``lab.train.checkpoints``. ``resume=True``
    continues from the newest (bit-exactly on CPU), ``resume=path`` from that one,
    ``resume=False`` refuses a directory that already holds checkpoints.
    KeyboardInterrupt returns the history so far (``history.stopped == "interrupted"``),
    keeping the last checkpoint; a NaN/inf loss raises ``NonFiniteLossError`` before
    the weights are touched.

    Devices: one process on ``device`` (default CUDA if available) unless ``devices``
    or ``strategy`` is given, or the process was started by ``torchrun``/``fabric run``;
    then Lightning Fabric runs ``strategy`` (``"ddp"`` by default, ``"fsdp"``) on
    ``devices`` of ``accelerator`` per node. From a script ``fit(..., devices=2)``
    relaunches the script once per extra device; with FSDP the model ends up sharded
    (``load_weights(fresh_model, checkpoint_dir)`` gives a whole one). From a notebook
    or another interactive session it forks one worker per device instead, and
    afterwards ``model`` holds rank 0's final (whole) weights. There the callbacks run
    in the notebook's process on rank 0's numbers, sent after each step: the workers do
    not wait for them, so ``state.model`` keeps the old weights until the end, changes
    to ``state`` other than ``should_stop`` are not seen, and a stop lands a few steps
    later. Ctrl-C stops the workers after their current step (twice: kills them); a
    worker's error is raised with its traceback as a note. Forking needs a platform
    with fork (not Windows), CUDA unused in the kernel before the call, and one machine;
    CPU workers run one thread each.

    Speed and memory (one device): ``compile=True`` runs each micro-batch's forward,
    loss and backward through ``torch.compile`` (see ``lab.train.compiled``): the same
    losses to float rounding, faster after a first step that compiles (tens of seconds
    on a CPU); it falls back to eager, with a warning saying why, where it cannot
    compile. ``loss_chunk_size`` computes the loss ``loss_chunk_size`` tokens at a time
    (``lab.loss.chunked_cross_entropy``, for models with ``hidden_states`` and
    ``head`` such as ``lab.GPT``): the full (batch, seq_len, vocab) logits are never
    held, which matters for large vocabularies, at the cost of recomputing the head
    in the backward pass.
    """
    if block_size is None:
        block_size = getattr(getattr(model, "config", None), "block_size", None)
    settings = Settings(
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        betas=tuple(betas), warmup_steps=warmup_steps, schedule=schedule, min_lr=min_lr,
        grad_accum_steps=grad_accum_steps, grad_clip=grad_clip, eval_every=eval_every,
        eval_steps=eval_steps, target=target,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        checkpoint_every=checkpoint_every, keep_last=keep_last, progress=progress, seed=seed,
        block_size=block_size, resume=resume, compile=compile, loss_chunk_size=loss_chunk_size,
    )  # fmt: skip
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {PRECISIONS}")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if devices is None and strategy is None and num_nodes == 1 and not launched:
        return train(LocalEngine(device, precision), model, data, settings, callbacks)
    if device is not None:
        raise ValueError("pass accelerator= (and devices=) for multi-device runs, not device=")
    if compile or loss_chunk_size is not None:
        raise ValueError(
            "compile=True and loss_chunk_size run on one device for now; leave them out "
            "for multi-device runs (devices, strategy, torchrun)"
        )
    from lab.train.distributed import fit_distributed  # imports Lightning Fabric: only when needed

    return fit_distributed(
        model, data, settings, callbacks, accelerator=accelerator, devices=devices,
        strategy=strategy, num_nodes=num_nodes, precision=precision,
    )  # fmt: skip
