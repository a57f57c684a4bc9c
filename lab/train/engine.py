"""The engine: what the training loop asks of the hardware, and its one-device form.

The loop (``lab.train.loop``) never touches a device, a wrapper or a process group
itself; it calls an ``Engine``. ``LocalEngine`` is one process in plain PyTorch;
``lab.train.fabric.FabricEngine`` is the same interface on Lightning Fabric (DDP,
FSDP), so one loop serves both.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


class Engine(Protocol):
    """The interface ``lab.train.loop.train`` runs on (the subset of Lightning Fabric's
    that fit needs). ``world_size`` processes run the loop, each with its
    ``global_rank``; rank 0 (``is_global_zero``) writes files and calls callbacks."""

    device: torch.device
    world_size: int
    global_rank: int
    is_global_zero: bool
    scaler: torch.amp.GradScaler | None  # fp16's loss scaler, saved in checkpoints
    state_dict_options: StateDictOptions  # how to gather whole state dicts for a checkpoint

    def setup(
        self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    ) -> tuple[nn.Module, Any]:
        """Move (and wrap) ``model``, then build its optimizer; return both."""
        ...

    def autocast(self) -> AbstractContextManager:
        """The context of forward passes: the precision's autocast, or nothing."""
        ...

    def no_backward_sync(self, model: nn.Module, enabled: bool) -> AbstractContextManager:
        """Skip the gradient all-reduce of a backward pass that is not the last of a step."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass of ``loss`` (scaled first under fp16)."""
        ...

    def clip_gradients(self, model: nn.Module, optimizer: Any, max_norm: float) -> torch.Tensor:
        """Clip the gradients to a global norm of ``max_norm``; return the norm before."""
        ...

    def optimizer_step(self, optimizer: Any) -> None:
        """Apply the gradients (through fp16's scaler, which skips overflowing steps)."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks."""
        ...

    def barrier(self) -> None:
        """Wait until every rank is here."""
        ...

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable), on every rank."""
        ...

    def wrapped(self, model: nn.Module) -> nn.Module:
        """The module the state-dict API reads and writes (inside any wrapper ``setup``
        added)."""
        ...


class LocalEngine(Engine):
    """One process, plain PyTorch, on ``device`` (default CUDA if available)."""

    world_size, global_rank, is_global_zero = 1, 0, True
    state_dict_options = StateDictOptions(full_state_dict=True)

    def __init__(self, device: str | torch.device | None, precision: str) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        # fp16's narrow range needs loss scaling: the scaler multiplies the loss, skips a
        # step whose gradients overflowed and lowers the scale (on CPU too, where fp16
        # autocast is slow but lets the path be tested without a GPU).
        scaled = precision == "16-mixed"
        self.scaler = torch.amp.GradScaler(self.device.type) if scaled else None

    def setup(
        self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    ) -> tuple[nn.Module, Any]:
        model.to(self.device)
        return model, make_optimizer(model)

    def autocast(self) -> AbstractContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

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

    def broadcast(self, obj: Any) -> Any:
        return obj

    def wrapped(self, model: nn.Module) -> nn.Module:
        return model
