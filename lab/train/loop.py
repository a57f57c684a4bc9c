"""The training loop on one process (one rank of a group, or the only one)::

    run = Run(engine, model, data, settings, callbacks)    model and optimizer set up
    run.resume()                                           from the last checkpoint, if any
    while steps remain and nothing asked to stop:
        run.record(run.optimizer_step(), progress)
                                             one global batch: forward, backward, clip,
                                             update; then history and on-step callbacks
        run.evaluate()                       every eval_every steps; stops at the target
        run.agree_to_stop()                  a stop on rank 0 stops every rank
        run.checkpoint()                     every checkpoint_every steps and at the end

Everything device- or process-specific goes through the ``Engine``
(``lab.train.engine``), so this loop serves one device and Lightning Fabric alike.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lab.data import IGNORE_INDEX
from lab.errors import NonFiniteLossError
from lab.train.batches import (
    Batch,
    Sampler,
    as_sampler,
    check_chunked_loss,
    micro_batches,
    moe_auxiliary_loss,
)
from lab.train.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from lab.train.compiled import MicroSteps
from lab.train.engine import Engine
from lab.train.optim import SCHEDULES, adamw, learning_rate
from lab.train.state import History, Hook, TrainState, split_callbacks


@dataclass(frozen=True)
class Settings:
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
    compile: bool = False  # the model's part of each step through torch.compile
    loss_chunk_size: int | None = None  # lab.loss.chunked_cross_entropy's chunk, or None

    def __post_init__(self) -> None:
        positive = {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr}
        positive |= {"grad_accum_steps": self.grad_accum_steps, "eval_steps": self.eval_steps}
        positive |= {"keep_last": self.keep_last}
        for name in ("eval_every", "checkpoint_every", "grad_clip", "loss_chunk_size"):
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


def train(
    engine: Engine, model: nn.Module, data: Any, s: Settings, callbacks: Iterable[Any]
) -> History:
    """Train ``model`` on this process; return its History (see the module docstring)."""
    was_training = model.training
    run = Run(engine, model, data, s, callbacks)
    run.resume()
    progress = Progress(s.steps, run.step, s.progress and engine.is_global_zero)
    try:
        with run.micro.prepared():
            while run.step < s.steps and not run.state.should_stop:
                run.record(run.optimizer_step(), progress)
                run.evaluate()
                run.agree_to_stop()
                run.checkpoint()
        run.history.stopped = run.history.stopped or (
            "stopped" if run.state.should_stop else "finished"
        )
    except KeyboardInterrupt:
        run.history.stopped = "interrupted"
        if engine.is_global_zero:
            report_interrupt(run.step, run.last_checkpoint)
    finally:
        progress.close()
        model.train(was_training)
    return run.history


class Run:
    """One run of the loop: the model and optimizer as the engine set them up, the
    data generator, the state callbacks see, and the last checkpoint written."""

    def __init__(
        self, engine: Engine, model: nn.Module, data: Any, s: Settings, callbacks: Iterable[Any]
    ) -> None:
        if s.batch_size % (s.grad_accum_steps * engine.world_size):
            raise ValueError(
                f"batch_size={s.batch_size} is not divisible by grad_accum_steps "
                f"({s.grad_accum_steps}) x devices ({engine.world_size}); it is the global batch"
            )
        self.engine, self.s, self.raw_model = engine, s, model
        self.sample = as_sampler(data, s.block_size)
        self.on_step, self.on_eval = split_callbacks(callbacks)
        self.auxiliary_loss = moe_auxiliary_loss(model)
        check_chunked_loss(model, s.loss_chunk_size)
        self.micro = MicroSteps(model, engine.device, s.loss_chunk_size, s.compile)
        torch.manual_seed(s.seed + engine.global_rank)  # dropout: independent masks per rank
        self.generator = torch.Generator().manual_seed(s.seed)  # data: the same on every rank
        model.train()
        self.model, self.optimizer = engine.setup(model, self._make_optimizer)
        self.step, self.last_checkpoint = 0, None
        self.state = TrainState(step=0, steps=s.steps, model=model, history=History())

    @property
    def history(self) -> History:
        return self.state.history

    def _make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        s, device = self.s, self.engine.device.type
        # fused on CUDA and in the compiled step; eager CPU training keeps torch's
        # default, so that its results stay bit for bit what they were (see adamw)
        fused = device == "cuda" or (s.compile and device == "cpu")
        return adamw(
            model, lr=s.lr, weight_decay=s.weight_decay, betas=s.betas, fused=fused or None
        )

    def resume(self) -> None:
        """Continue from a checkpoint in ``checkpoint_dir`` (``resume=True``: the newest;
        a path: that one), or refuse one of an earlier run (``resume=False``)."""
        s = self.s
        if s.checkpoint_dir is None:
            return
        if s.resume is False:
            if latest_checkpoint(s.checkpoint_dir) is not None:
                raise FileExistsError(
                    f"{s.checkpoint_dir} holds checkpoints of an earlier run; pass resume=True "
                    "to continue it, or choose an empty checkpoint_dir"
                )
            return
        last = latest_checkpoint(s.checkpoint_dir)
        path = last if isinstance(s.resume, bool) else Path(s.resume)
        if path is not None:
            self.step, history = load_checkpoint(
                self.engine, self.model, self.raw_model, self.optimizer, path, self.generator
            )
            history.stopped = ""
            self.state.step, self.state.history, self.last_checkpoint = self.step, history, path

    def optimizer_step(self) -> dict[str, float]:
        """One optimizer step on the next global batch; return its numbers."""
        s, engine = self.s, self.engine
        started = time.perf_counter()
        lr = learning_rate(
            self.step + 1, lr=s.lr, steps=s.steps, warmup_steps=s.warmup_steps,
            schedule=s.schedule, min_lr=s.min_lr,
        )  # fmt: skip
        batch = self.sample("train", s.batch_size, self.generator)
        sums = self._backward(batch)
        grad_norm = engine.clip_gradients(self.model, self.optimizer, s.grad_clip or math.inf)
        sums = engine.all_reduce_sum(sums) / engine.world_size
        loss, aux_loss, norm = torch.cat([sums, grad_norm.detach().reshape(1).to(sums)]).tolist()
        self._refuse_non_finite(loss, norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        engine.optimizer_step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        tokens_per_s = batch[0].numel() / (time.perf_counter() - started)
        numbers = dict(step=self.step, loss=loss, lr=lr, grad_norm=norm, tokens_per_s=tokens_per_s)
        return numbers | ({"aux_loss": aux_loss} if self.auxiliary_loss else {})

    def _backward(self, batch: Batch) -> torch.Tensor:
        """Forward and backward passes over this rank's micro-batches; return the sums of
        their cross-entropy and auxiliary losses.

        Each micro-loss is (its summed CE) / (labelled tokens in the global batch),
        times world size because DDP/FSDP average gradients over ranks: the sum of
        gradients is then exactly the gradient of the global mean.
        """
        engine, accum = self.engine, self.s.grad_accum_steps
        labelled = (batch[1] != IGNORE_INDEX).sum().clamp(min=1)
        sums = torch.zeros(2, device=engine.device)  # CE, auxiliary loss
        for i, (x, y) in enumerate(micro_batches(batch, engine, accum)):
            with engine.no_backward_sync(self.model, enabled=i < accum - 1), engine.autocast():
                loss = self.micro.loss(self.model, x, y)
                loss = loss * (engine.world_size / labelled.to(loss.device))
                aux = None if self.auxiliary_loss is None else self.auxiliary_loss(self.raw_model)
                engine.backward(loss if aux is None else loss + aux / accum)
            sums[0] += loss.detach().float()
            if aux is not None:
                sums[1] += (aux / accum).detach().float()
        return sums

    def _refuse_non_finite(self, loss: float, grad_norm: float) -> None:
        """Raise ``NonFiniteLossError`` (gradients dropped, weights untouched) for a NaN or
        infinite loss, or gradient norm: fp16's scaler skips those steps itself."""
        bad = loss if not math.isfinite(loss) else None
        if bad is None and self.engine.scaler is None and not math.isfinite(grad_norm):
            bad = f"finite but the gradient norm is {grad_norm}"
        if bad is None:
            return
        self.optimizer.zero_grad(set_to_none=True)
        kept = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint
            else "there is no checkpoint (pass checkpoint_dir to keep one)"
        )
        raise NonFiniteLossError(
            f"loss is {bad} at step {self.step + 1}; the weights were not updated and {kept}. "
            "Lower lr, clip gradients (grad_clip) or use bf16 instead of fp16.",
            self.step + 1, self.history, self.last_checkpoint,
        )  # fmt: skip

    def record(self, numbers: dict[str, float], progress: Progress) -> None:
        """Append the step's numbers to the history, show them, call the on-step hooks."""
        for name, value in numbers.items():
            getattr(self.history, name).append(value)
            if hasattr(self.state, name):  # all but aux_loss
                setattr(self.state, name, value)
        progress.show(self.state)
        self._call(self.on_step)

    def evaluate(self) -> None:
        """Every ``eval_every`` steps and at the last: validation metrics, the on-eval
        hooks, and a stop once the target is reached."""
        s = self.s
        if s.eval_every is None or (self.step % s.eval_every and self.step != s.steps):
            return
        self.state.metrics = _evaluate(self.engine, self.model, self.micro, self.sample, s)
        self.history.evals.append({"step": self.step, **self.state.metrics})
        self._call(self.on_eval)
        if s.reached(self.state.metrics):
            self.history.stopped, self.state.should_stop = "target", True

    def agree_to_stop(self) -> None:
        """A stop asked on rank 0 (where callbacks run) stops every rank."""
        if self.engine.world_size > 1:
            stop = torch.tensor(float(self.state.should_stop), device=self.engine.device)
            self.state.should_stop = bool(self.engine.all_reduce_sum(stop).item())

    def checkpoint(self) -> None:
        """Write a checkpoint every ``checkpoint_every`` steps and when training ends."""
        s, stop = self.s, self.state.should_stop
        due = stop or self.step == s.steps or (s.checkpoint_every and self.step % s.checkpoint_every == 0)  # fmt: skip
        if s.checkpoint_dir is None or not due:
            return
        self.history.stopped = self.history.stopped or ("stopped" if stop else "")
        self.last_checkpoint = save_checkpoint(
            self.engine, self.model, self.raw_model, self.optimizer, s.checkpoint_dir,
            self.step, self.history, self.generator, s.keep_last,
        )  # fmt: skip

    def _call(self, hooks: list[Hook]) -> None:
        if self.engine.is_global_zero:  # callbacks run on rank 0 only
            for hook in hooks:
                hook(self.state)


@torch.no_grad()
def _evaluate(
    engine: Engine, model: nn.Module, micro: MicroSteps, sample: Sampler, s: Settings
) -> dict[str, float]:
    """Token-weighted loss and accuracy on ``eval_steps`` validation batches, the same
    batches at every evaluation (their generator is re-seeded) so values compare."""
    model.eval()
    generator = torch.Generator().manual_seed(s.seed + 1)
    totals = torch.zeros(3, device=engine.device)  # loss sum, correct, labelled
    for _ in range(s.eval_steps):
        batch = sample("val", s.batch_size, generator)
        for x, y in micro_batches(batch, engine, s.grad_accum_steps):
            with engine.autocast():
                loss_and_correct = micro.sums(model, x, y).float()
            labelled = (y != IGNORE_INDEX).sum().float()
            totals += torch.cat([loss_and_correct, labelled.reshape(1)])
    loss_sum, correct, labelled = engine.all_reduce_sum(totals).tolist()
    model.train()
    return {"val_loss": loss_sum / labelled, "val_accuracy": correct / labelled}


class Progress:
    """fit's progress bar (tqdm): the step, its loss and throughput."""

    def __init__(self, steps: int, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=steps, initial=initial, desc="fit", disable=not enabled)

    def show(self, state: TrainState) -> None:
        self.bar.update(state.step - self.bar.n)
        self.bar.set_postfix(
            loss=f"{state.loss:.4f}", tok_s=f"{state.tokens_per_s:,.0f}", refresh=False
        )

    def close(self) -> None:
        self.bar.close()


def report_interrupt(step: int, checkpoint: Path | None) -> None:
    """Say where an interrupted run stopped and what it kept."""
    kept = f"the last checkpoint is {checkpoint}" if checkpoint else "no checkpoint"
    print(f"fit: interrupted after step {step}; returning the history so far ({kept})")
