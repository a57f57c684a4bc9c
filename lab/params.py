"""Two facts about a module's parameters that several tools need: the device they live
on, and whether any of them changed since it was last asked (for caches of values
computed from weights: compiled decoding, the adapter's projected prefix)."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without any)."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def weights_version(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """A value that changes when any parameter may have: a replaced tensor has a new
    address, an in-place update bumps its version counter. (Tensors made under
    ``torch.inference_mode`` keep no version, but nothing can train them either.)"""
    return tuple(
        (p.data_ptr(), -1 if p.is_inference() else p._version) for p in module.parameters()
    )
