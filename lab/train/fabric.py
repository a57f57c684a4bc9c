"""``FabricEngine``: the training loop's ``Engine`` on Lightning Fabric (DDP, FSDP),
launched by Fabric, joined under ``torchrun``/``fabric run``, or forked from a notebook."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions

from lab.train.engine import Engine


class FabricEngine(Engine):
    """Lightning Fabric: DDP, FSDP and friends, launched or joined.

    ``fork=True`` (a notebook) makes Fabric's launcher fork the workers
    (``_MultiProcessingLauncher``) instead of re-running the script.
    """

    state_dict_options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    def __init__(
        self,
        accelerator: str,
        devices: int | str,
        strategy: str,
        num_nodes: int,
        precision: str,
        fork: bool = False,
    ) -> None:
        from lightning_fabric import Fabric  # imported here: a second or two, only when needed
        from lightning_fabric.strategies import ModelParallelStrategy
        from lightning_fabric.strategies.launchers.multiprocessing import (
            _MultiProcessingLauncher,
        )

        class ForkedModelParallel(ModelParallelStrategy):
            def _configure_launcher(self) -> None:  # its own choice is the script launcher
                self._launcher = _MultiProcessingLauncher(self, start_method="fork")

        if strategy == "fsdp":
            # FSDP2 (torch.distributed.fsdp.fully_shard) through Fabric's ModelParallelStrategy:
            # unlike Fabric's "fsdp" (FSDP1, GPU only) it also runs on CPU with gloo.
            if not isinstance(devices, int):
                raise ValueError(f"strategy='fsdp' needs devices as a number, got {devices!r}")
            strategy = (ForkedModelParallel if fork else ModelParallelStrategy)(
                _fully_shard_blocks, data_parallel_size=devices * num_nodes, tensor_parallel_size=1
            )
        elif strategy == "ddp" and fork:
            strategy = "ddp_notebook"  # DDP with forked workers
        self.fabric = Fabric(
            accelerator=accelerator,
            devices=devices,
            strategy=strategy,
            num_nodes=num_nodes,
            precision=precision,
        )

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The gradient scaler of Fabric's "16-mixed" precision (None otherwise)."""
        return getattr(self.fabric.strategy.precision, "scaler", None)

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def global_rank(self) -> int:
        return self.fabric.global_rank

    @property
    def is_global_zero(self) -> bool:
        return self.fabric.is_global_zero

    def setup(
        self, model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    ) -> tuple[nn.Module, Any]:
        # FSDP replaces parameters by sharded DTensors (same names, same global shapes),
        # so the optimizer is built after setup_module.
        module = self.fabric.setup_module(model)
        return module, self.fabric.setup_optimizers(make_optimizer(model))

    def autocast(self) -> AbstractContextManager:
        return self.fabric.autocast()

    def no_backward_sync(self, model: nn.Module, enabled: bool) -> AbstractContextManager:
        return self.fabric.no_backward_sync(model, enabled=enabled)

    def backward(self, loss: torch.Tensor) -> None:
        self.fabric.backward(loss)

    def clip_gradients(self, model: nn.Module, optimizer: Any, max_norm: float) -> torch.Tensor:
        # error_if_nonfinite=False: fit raises its own NonFiniteLossError, on every rank.
        norm = self.fabric.clip_gradients(
            model, optimizer, max_norm=max_norm, error_if_nonfinite=False
        )
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor

    def optimizer_step(self, optimizer: Any) -> None:
        optimizer.step()  # Fabric's optimizer wrapper applies its precision's scaler

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.fabric.all_reduce(tensor, reduce_op="sum")

    def barrier(self) -> None:
        self.fabric.barrier()

    def broadcast(self, obj: Any) -> Any:
        return self.fabric.broadcast(obj, src=0)

    def wrapped(self, model: nn.Module) -> nn.Module:
        """The DDP/FSDP module inside Fabric's wrapper, as the state-dict API needs it."""
        return model._forward_module


def _fully_shard_blocks(model: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2 policy for any model: shard every element of every ``nn.ModuleList`` (the
    blocks, and experts inside them), innermost first, then the root for the rest."""
    from torch.distributed.fsdp import fully_shard

    units = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]
    for unit in reversed(units):  # modules() is pre-order: reversed puts children first
        fully_shard(unit, mesh=mesh["data_parallel"])
    return fully_shard(model, mesh=mesh["data_parallel"])
