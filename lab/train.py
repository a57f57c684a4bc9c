"""Training: ``fit(model, data, steps=...)`` for any module mapping token ids to logits.

One loop, readable top to bottom (nanoGPT's ``train.py`` in spirit)::

    for step in 1..steps:
        x, y = one global batch from data               (the same on every rank)
        for each micro-batch of this rank:              (gradient accumulation)
            loss = cross_entropy(model(x), y) [+ MoE auxiliary loss]; backward
        grad_norm = clip(gradients)
        stop on a non-finite loss, else optimizer.step() with lr = schedule(step)
        record history; callbacks; evaluate, checkpoint, early stop

The data protocol (what ``data`` may be):

- an object with ``sample(batch_size, generator) -> (x, y)``: a synthetic task
  (``lab.data.MQAR`` ...); evaluation draws fresh samples from its own generator;
- an object with ``get_batch(split, batch_size, [block_size,] generator) -> (x, y)``:
  a token stream (``lab.data.TokenDataset``), ``split`` being ``"train"`` or ``"val"``;
- a callable ``(batch_size, generator) -> (x, y)``.

``x`` is (B, T) token ids and ``y`` (B, T) targets, ``-100`` where unlabelled. Every
random draw must come from ``generator`` (a CPU ``torch.Generator`` seeded by ``seed``
and saved in checkpoints): that is what makes resume exact.

``batch_size`` is the global batch: sequences per optimizer step summed over
accumulation steps and devices, so changing ``grad_accum_steps`` or ``devices``
changes memory, not the optimisation. Every rank draws the whole global batch (cheap
next to the model) and keeps its slice, so the data stream does not depend on the
parallel layout either. The loss is the mean over all labelled tokens of the global
batch, so one device and two agree to rounding.

Multi-device runs (``devices=2, strategy="ddp"|"fsdp"``, or a group started by
``torchrun``/``fabric run``) go through Lightning Fabric: see ``lab.distributed``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lab.errors import NonFiniteLossError

IGNORE_INDEX = -100  # targets to skip, as in torch.nn.functional.cross_entropy
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
CHECKPOINT_PREFIX = "step-"

Batch = tuple[torch.Tensor, torch.Tensor]
Sampler = Callable[[str, int, torch.Generator], Batch]


# --- history and callback state -----------------------------------------------------------


@dataclass
class History:
    """Per-step records (parallel lists) and evaluation records, as plain numbers.

    ``evals`` holds one dict per evaluation: ``{"step", "val_loss", "val_accuracy"}``.
    ``aux_loss`` stays empty unless the model has MoE layers. ``stopped`` says why
    training ended: ``"finished"``, ``"target"``, ``"stopped"`` (by a callback) or
    ``"interrupted"`` (KeyboardInterrupt).
    """

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    aux_loss: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    stopped: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls(**{f.name: d[f.name] for f in fields(cls)})

    def metric(self, name: str) -> tuple[list[int], list[float]]:
        """Steps and values of one evaluation metric, e.g. ``history.metric("val_loss")``."""
        return [e["step"] for e in self.evals], [e[name] for e in self.evals]


@dataclass
class TrainState:
    """What callbacks see. Set ``should_stop = True`` to end training cleanly after
    this step (a final checkpoint is written when ``checkpoint_dir`` is set)."""

    step: int
    steps: int
    model: nn.Module
    history: History
    loss: float = math.nan
    lr: float = math.nan
    grad_norm: float = math.nan
    tokens_per_s: float = math.nan
    metrics: dict[str, float] = field(default_factory=dict)  # the latest evaluation
    should_stop: bool = False


def _callback_hooks(callbacks: Iterable[Any]) -> tuple[list[Callable], list[Callable]]:
    """Split callbacks into on-step and on-eval hooks: a plain callable is an on-step
    hook; an object contributes whichever of ``on_step``/``on_eval`` it defines."""
    on_step, on_eval = [], []
    for cb in callbacks:
        hooks = [getattr(cb, name, None) for name in ("on_step", "on_eval")]
        if hooks == [None, None]:
            if not callable(cb):
                raise TypeError(
                    f"callback {cb!r} is neither callable nor has on_step/on_eval; "
                    "pass a function of the TrainState or an object with those methods"
                )
            hooks[0] = cb
        on_step += hooks[:1] if hooks[0] else []
        on_eval += hooks[1:] if hooks[1] else []
    return on_step, on_eval


# --- schedule, optimizer, loss ------------------------------------------------------------


def learning_rate(
    step: int,
    *,
    lr: float,
    steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    min_lr: float = 0.0,
) -> float:
    """The learning rate for optimizer step ``step`` (1-based).

    Linear warmup ``lr * step / warmup_steps``, then with progress
    ``p = (step - warmup_steps) / (steps - warmup_steps)`` in (0, 1]:
    cosine ``min_lr + (lr - min_lr) (1 + cos(pi p)) / 2`` (Loshchilov and Hutter, 2017),
    linear ``lr - (lr - min_lr) p``, or constant ``lr``. A pure function of the step,
    so the schedule's whole state is the step number.
    """
    if step <= warmup_steps:
        return lr * step / warmup_steps
    if schedule == "constant":
        return lr
    p = (step - warmup_steps) / max(1, steps - warmup_steps)
    if schedule == "linear":
        return lr - (lr - min_lr) * p
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def optimizer_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay tensors with >= 2 dims, not the rest.

    Matrices (linear weights, embeddings, the head) are what weight decay is meant to
    shrink; gains and biases (1-D) set scales and offsets, and pulling them to zero
    only distorts the normalisation. Decaying embeddings too (nanoGPT, unlike minGPT)
    keeps the rule a shape test that works for any model and is consistent for tied
    embeddings, where the embedding *is* the output matrix. Frozen parameters
    (``requires_grad=False``, e.g. a base model under LoRA) are left out.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def _moe_auxiliary_loss(model: nn.Module) -> Callable[[nn.Module], torch.Tensor] | None:
    """``lab.moe.auxiliary_loss`` if the model has modules from ``lab.moe``, else None."""
    if not any(c.__module__ == "lab.moe" for m in model.modules() for c in type(m).__mro__):
        return None
    from lab.moe import auxiliary_loss

    return auxiliary_loss


def _as_sampler(data: Any, block_size: int | None) -> Sampler:
    """Adapt ``data`` (see the module docstring) to ``sample(split, batch_size, generator)``."""
    if hasattr(data, "sample"):
        return lambda split, n, g: data.sample(n, g)
    if hasattr(data, "get_batch"):
        if "block_size" not in inspect.signature(data.get_batch).parameters:
            return lambda split, n, g: data.get_batch(split, n, generator=g)
        if block_size is None:
            raise ValueError(
                "data.get_batch needs a block_size and the model has no config.block_size; "
                "pass fit(..., block_size=...)"
            )
        return lambda split, n, g: data.get_batch(split, n, block_size=block_size, generator=g)
    if callable(data):
        return lambda split, n, g: data(n, g)
    raise TypeError(
        f"data is a {type(data).__name__}; pass an object with sample(batch_size, generator), "
        "get_batch(split, batch_size, generator) or a callable (batch_size, generator) -> (x, y)"
    )


# --- the one-process engine (lab.distributed has Fabric's) ---------------------------------------------


class _Local:
    """One process, plain PyTorch: the subset of Fabric's interface that fit uses."""

    world_size, global_rank, is_global_zero = 1, 0, True

    def __init__(self, device: str | torch.device | None, precision: str) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        self._dtype = dtype
        # fp16's narrow range needs loss scaling: the scaler multiplies the loss, skips a
        # step whose gradients overflowed and lowers the scale (on CPU too, where fp16
        # autocast is slow but lets the path be tested without a GPU).
        scaled = precision == "16-mixed"
        self.scaler = torch.amp.GradScaler(self.device.type) if scaled else None

    def setup(self, model: nn.Module, make_optimizer: Callable) -> tuple[nn.Module, Any]:
        model.to(self.device)
        return model, make_optimizer(model)

    def autocast(self) -> AbstractContextManager:
        if self._dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self._dtype)

    def no_backward_sync(self, model: nn.Module, enabled: bool) -> AbstractContextManager:
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def clip_gradients(self, model: nn.Module, optimizer: Any, max_norm: float) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def optimizer_step(self, optimizer: Any) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def wrapped(self, model: nn.Module) -> nn.Module:
        return model

    state_dict_options = StateDictOptions(full_state_dict=True)


# --- checkpoints ------------------------------------------------------------------------------


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint in ``checkpoint_dir`` (``step-00000100``), or None.

    Checkpoints appear under their final name only by an atomic rename, so a crash
    while writing leaves a hidden temporary directory, never a partial ``step-*``.
    """
    found = sorted(Path(checkpoint_dir).glob(f"{CHECKPOINT_PREFIX}*"))
    return found[-1] if found else None


def _unique_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Drop tied duplicates (safetensors refuses shared storage): ``(tensors, aliases)``
    with ``aliases[name] = the name kept for the same storage``."""
    kept: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.dtype)
        if key in kept:
            aliases[name] = kept[key]
        else:
            kept[key] = name
            tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint's weights into ``model`` (``path``: a checkpoint, or a
    ``checkpoint_dir`` for its latest). E.g. to use a model trained with FSDP."""
    path = Path(path)
    if not (path / "model.safetensors").exists():
        path = latest_checkpoint(path) or path / "model.safetensors"
    model.load_state_dict(_read_model_state(path))
    return model


def _write_weights(state: dict[str, torch.Tensor], file: Path) -> None:
    tensors, aliases = _unique_tensors(state)
    save_file(tensors, file, metadata={"aliases": json.dumps(aliases)})


def _read_model_state(path: Path) -> dict[str, torch.Tensor]:
    file = path / "model.safetensors"
    if not file.exists():
        raise FileNotFoundError(f"no model.safetensors in {path}; pass a checkpoint written by fit")
    from safetensors import safe_open

    with safe_open(file, "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    state = load_file(file)
    state.update({alias: state[name] for alias, name in aliases.items()})
    return state


def _save_checkpoint(
    engine: _Local,
    model: nn.Module,
    optimizer: Any,
    checkpoint_dir: Path,
    step: int,
    history: History,
    generator: torch.Generator,
    keep_last: int,
) -> Path:
    """Write ``step-{step:08d}`` atomically: into a temporary directory, then rename.

    model.safetensors   weights (full, gathered from shards)
    optimizer.pt        AdamW state by parameter name (torch.save; read with weights_only)
    rng-{rank}.safetensors   torch CPU/CUDA RNG states of each rank, and the data generator
    state.json          step, the history so far (the schedule is a function of step)
                        and fp16's gradient-scaler state
    """
    wrapped = engine.wrapped(model)
    options = engine.state_dict_options
    # Gathering is collective under FSDP: every rank takes part, rank 0 receives.
    model_state = get_model_state_dict(wrapped, options=options)
    optim_state = get_optimizer_state_dict(wrapped, optimizer, options=options)
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    tmp = checkpoint_dir / f".tmp-{final.name}"
    if engine.is_global_zero:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    engine.barrier()
    save_file(_rng_state(generator), tmp / f"rng-{engine.global_rank}.safetensors")
    if engine.is_global_zero:
        _write_weights(model_state, tmp / "model.safetensors")
        torch.save(optim_state, tmp / "optimizer.pt")
        state = {"step": step, "world_size": engine.world_size, "history": history.to_dict()}
        if engine.scaler is not None:  # fp16's loss scale and its growth counter
            state["scaler"] = engine.scaler.state_dict()
        (tmp / "state.json").write_text(json.dumps(state))
    engine.barrier()
    if engine.is_global_zero:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep_last]:
            shutil.rmtree(old)
    engine.barrier()
    return final


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return states


def _load_checkpoint(
    engine: _Local, model: nn.Module, optimizer: Any, path: Path, generator: torch.Generator
) -> tuple[int, History]:
    """Restore everything ``_save_checkpoint`` wrote; return ``(step, history)``."""
    state = json.loads((path / "state.json").read_text())
    wrapped = engine.wrapped(model)
    options = StateDictOptions(full_state_dict=True)  # every rank reads the whole file
    try:
        set_model_state_dict(wrapped, _read_model_state(path), options=options)
        optim_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        set_optimizer_state_dict(wrapped, optimizer, optim_state, options=options)
    except (RuntimeError, KeyError, ValueError) as e:
        raise RuntimeError(
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


# --- the loop ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """fit's hyperparameters, validated once."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    warmup_steps: int
    schedule: str
    min_lr: float
    grad_accum_steps: int
    grad_clip: float | None
    eval_every: int | None
    eval_steps: int
    target: dict[str, float] | None
    checkpoint_dir: Path | None
    checkpoint_every: int | None
    keep_last: int
    progress: bool
    seed: int
    block_size: int | None  # window length for get_batch streams
    resume: bool | str | os.PathLike[str]

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr}
        positive |= {"grad_accum_steps": self.grad_accum_steps, "eval_steps": self.eval_steps}
        positive |= {"keep_last": self.keep_last}
        for name in ("eval_every", "checkpoint_every", "grad_clip"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name}={value}; use a positive number")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; choose one of {SCHEDULES}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps}; use 0..steps ({self.steps})")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr}; use a value between 0 and lr ({self.lr})")
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir to write to")
        if self.target is not None:
            if self.eval_every is None:
                raise ValueError("target is checked at evaluations; pass eval_every as well")
            unknown = set(self.target) - {"val_loss", "val_accuracy"}
            if not isinstance(self.target, dict) or unknown:
                raise ValueError(
                    f"target={self.target!r}; use a dict like {{'val_accuracy': 0.99}} "
                    "or {'val_loss': 1.5}"
                )

    def reached(self, metrics: dict[str, float]) -> bool:
        """Every target met: losses at or below theirs, accuracies at or above."""
        return self.target is not None and all(
            metrics[k] <= v if k.endswith("loss") else metrics[k] >= v
            for k, v in self.target.items()
        )


def _micro_batches(batch: Batch, engine: _Local, accum: int) -> Iterator[Batch]:
    """This rank's ``accum`` slices of the global batch: micro-step ``a`` of rank ``r``
    takes rows ``[(a W + r) m, (a W + r + 1) m)`` with ``m = B / (accum W)``."""
    x, y = batch
    world = engine.world_size
    m = x.size(0) // (accum * world)
    for a in range(accum):
        start = (a * world + engine.global_rank) * m
        rows = slice(start, start + m)
        yield (
            x[rows].to(engine.device, non_blocking=True),
            y[rows].to(engine.device, non_blocking=True),
        )


def _summed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Cross-entropy summed over labelled positions, and the logits."""
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.shape[:2] != y.shape:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(
            f"model(x) returned {got} for x of shape {tuple(x.shape)}; fit needs logits of "
            "shape (batch, seq_len, vocab_size)"
        )
    loss = F.cross_entropy(
        logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return logits, loss


@torch.no_grad()
def _evaluate(engine: _Local, model: nn.Module, sample: Sampler, s: _Settings) -> dict[str, float]:
    """Token-weighted loss and accuracy on ``eval_steps`` validation batches, the same
    batches at every evaluation (their generator is re-seeded) so values compare."""
    model.eval()
    generator = torch.Generator().manual_seed(s.seed + 1)
    totals = torch.zeros(3, device=engine.device)  # loss sum, correct, labelled
    for _ in range(s.eval_steps):
        for x, y in _micro_batches(
            sample("val", s.batch_size, generator), engine, s.grad_accum_steps
        ):
            with engine.autocast():
                logits, loss = _summed_loss(model, x, y)
            labelled = y != IGNORE_INDEX
            correct = (logits.argmax(-1) == y)[labelled].sum()
            totals += torch.stack([loss.float(), correct.float(), labelled.sum().float()])
    loss_sum, correct, labelled = engine.all_reduce_sum(totals).tolist()
    model.train()
    return {"val_loss": loss_sum / labelled, "val_accuracy": correct / labelled}


def _progress_bar(steps: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=steps, initial=initial, desc="fit", disable=not enabled)


def _show_step(bar: Any, state: TrainState) -> None:
    bar.update(state.step - bar.n)
    bar.set_postfix(loss=f"{state.loss:.4f}", tok_s=f"{state.tokens_per_s:,.0f}", refresh=False)


def _report_interrupt(step: int, checkpoint: Path | None) -> None:
    kept = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint"
    print(f"fit: interrupted after step {step}; returning the history so far ({kept})")


def _train(
    engine: _Local, model: nn.Module, data: Any, s: _Settings, callbacks: Iterable[Any]
) -> History:
    """The training loop on this process (one rank of a group, or the only one)."""
    if s.batch_size % (s.grad_accum_steps * engine.world_size):
        raise ValueError(
            f"batch_size={s.batch_size} is not divisible by grad_accum_steps "
            f"({s.grad_accum_steps}) x devices ({engine.world_size}); it is the global batch"
        )
    sample = _as_sampler(data, s.block_size)
    on_step, on_eval = _callback_hooks(callbacks)
    auxiliary_loss = _moe_auxiliary_loss(model)
    torch.manual_seed(s.seed + engine.global_rank)  # dropout: independent masks per rank
    generator = torch.Generator().manual_seed(s.seed)  # data: the same on every rank
    was_training = model.training
    model.train()

    def make_optimizer(m: nn.Module) -> torch.optim.Optimizer:
        fused = {"fused": True} if engine.device.type == "cuda" else {}
        return torch.optim.AdamW(
            optimizer_groups(m, s.weight_decay), lr=s.lr, betas=s.betas, **fused
        )

    raw_model = model
    model, optimizer = engine.setup(model, make_optimizer)

    step, history, last_checkpoint = 0, History(), None
    checkpoint_dir = s.checkpoint_dir
    if checkpoint_dir is not None and s.resume is not False:
        last_checkpoint = (
            Path(s.resume) if not isinstance(s.resume, bool) else latest_checkpoint(checkpoint_dir)
        )
    elif checkpoint_dir is not None and latest_checkpoint(checkpoint_dir) is not None:
        raise FileExistsError(
            f"{checkpoint_dir} holds checkpoints of an earlier run; pass resume=True to "
            "continue it, or choose an empty checkpoint_dir"
        )
    if last_checkpoint is not None:
        step, history = _load_checkpoint(engine, model, optimizer, last_checkpoint, generator)
    history.stopped = ""
    state = TrainState(step=step, steps=s.steps, model=raw_model, history=history)
    bar = _progress_bar(s.steps, step, s.progress and engine.is_global_zero)
    accum, scaled = s.grad_accum_steps, engine.scaler is not None
    try:
        while step < s.steps and not state.should_stop:
            started = time.perf_counter()
            lr = learning_rate(
                step + 1, lr=s.lr, steps=s.steps, warmup_steps=s.warmup_steps,
                schedule=s.schedule, min_lr=s.min_lr,
            )  # fmt: skip
            batch = sample("train", s.batch_size, generator)
            # Each micro-loss is (its summed CE) / (labelled tokens in the global batch),
            # times world size because DDP/FSDP average gradients over ranks: the sum of
            # gradients is then exactly the gradient of the global mean.
            labelled = (batch[1] != IGNORE_INDEX).sum().clamp(min=1)
            sums = torch.zeros(2, device=engine.device)  # CE sum, auxiliary loss
            for i, (x, y) in enumerate(_micro_batches(batch, engine, accum)):
                with engine.no_backward_sync(model, enabled=i < accum - 1), engine.autocast():
                    _, loss = _summed_loss(model, x, y)
                    loss = loss * (engine.world_size / labelled.to(loss.device))
                    if auxiliary_loss is not None:
                        aux = auxiliary_loss(raw_model) / accum
                        loss = loss + aux
                        sums[1] += aux.detach().float()
                    engine.backward(loss)
                sums[0] += (
                    loss.detach().float()
                    if auxiliary_loss is None
                    else (loss - aux).detach().float()
                )
            grad_norm = engine.clip_gradients(model, optimizer, s.grad_clip or math.inf)
            sums = engine.all_reduce_sum(sums) / engine.world_size
            loss_value, aux_value, norm_value = torch.cat(
                [sums, grad_norm.detach().reshape(1).to(sums)]
            ).tolist()
            bad = loss_value if not math.isfinite(loss_value) else None
            if bad is None and not scaled and not math.isfinite(norm_value):
                bad = f"finite but the gradient norm is {norm_value}"
            if bad is not None:
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    f"loss is {bad} at step {step + 1}; the weights were not updated and "
                    + (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
                       else "there is no checkpoint (pass checkpoint_dir to keep one)")
                    + ". Lower lr, clip gradients (grad_clip) or use bf16 instead of fp16.",
                    step + 1, history, last_checkpoint,
                )  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            engine.optimizer_step(optimizer)
            optimizer.zero_grad(set_to_none=True)
            step += 1

            tokens_per_s = batch[0].numel() / (time.perf_counter() - started)
            for name, value in (
                ("step", step), ("loss", loss_value), ("lr", lr),
                ("grad_norm", norm_value), ("tokens_per_s", tokens_per_s),
            ):  # fmt: skip
                getattr(history, name).append(value)
                setattr(state, name, value)
            if auxiliary_loss is not None:
                history.aux_loss.append(aux_value)
            _show_step(bar, state)
            if engine.is_global_zero:
                for hook in on_step:
                    hook(state)

            if s.eval_every is not None and (step % s.eval_every == 0 or step == s.steps):
                state.metrics = _evaluate(engine, model, sample, s)
                history.evals.append({"step": step, **state.metrics})
                if engine.is_global_zero:
                    for hook in on_eval:
                        hook(state)
                if s.reached(state.metrics):
                    history.stopped = "target"
                    state.should_stop = True
            if engine.world_size > 1:  # a callback's stop on rank 0 stops every rank
                stop = torch.tensor(float(state.should_stop), device=engine.device)
                state.should_stop = bool(engine.all_reduce_sum(stop).item())
            finishing = state.should_stop or step == s.steps
            if checkpoint_dir is not None and (
                finishing or (s.checkpoint_every and step % s.checkpoint_every == 0)
            ):
                history.stopped = history.stopped or ("stopped" if state.should_stop else "")
                last_checkpoint = _save_checkpoint(
                    engine, model, optimizer, checkpoint_dir, step, history, generator, s.keep_last
                )
        history.stopped = history.stopped or ("stopped" if state.should_stop else "finished")
    except KeyboardInterrupt:
        history.stopped = "interrupted"
        if engine.is_global_zero:
            _report_interrupt(step, last_checkpoint)
    finally:
        bar.close()
        raw_model.train(was_training)
    return history


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
) -> History:
    """Train ``model`` (token ids (B, T) -> logits (B, T, V)) on ``data``; return the History.

    Data: see the module docstring (a task with ``sample``, a ``get_batch`` stream,
    or a callable). ``block_size`` (default ``model.config.block_size``) is the window
    length for ``get_batch`` streams. ``batch_size`` is the global batch per optimizer
    step, split into ``grad_accum_steps`` micro-batches on each of the devices.

    Optimisation: AdamW (``betas``, decoupled ``weight_decay`` on tensors with >= 2 dims,
    see ``optimizer_groups``) with ``lr`` warmed up linearly for ``warmup_steps``, then
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
    the end (the newest ``keep_last`` are kept), written atomically. ``resume=True``
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
    """
    if block_size is None:
        block_size = getattr(getattr(model, "config", None), "block_size", None)
    settings = _Settings(
        steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        betas=tuple(betas), warmup_steps=warmup_steps, schedule=schedule, min_lr=min_lr,
        grad_accum_steps=grad_accum_steps, grad_clip=grad_clip, eval_every=eval_every,
        eval_steps=eval_steps, target=target,
        checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
        checkpoint_every=checkpoint_every, keep_last=keep_last, progress=progress, seed=seed,
        block_size=block_size, resume=resume,
    )  # fmt: skip
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {PRECISIONS}")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if devices is None and strategy is None and num_nodes == 1 and not launched:
        engine = _Local(device, precision)
        return _train(engine, model, data, settings, callbacks)
    if device is not None:
        raise ValueError("pass accelerator= (and devices=) for multi-device runs, not device=")
    from lab.distributed import fit_distributed  # imports Lightning Fabric: only when needed

    return fit_distributed(
        model, data, settings, callbacks, accelerator=accelerator, devices=devices,
        strategy=strategy, num_nodes=num_nodes, precision=precision,
    )  # fmt: skip
