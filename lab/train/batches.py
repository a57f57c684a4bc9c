"""From ``data`` to losses: the data protocol, each rank's micro-batches, the loss.

What ``data`` may be:

- an object with ``sample(batch_size, generator) -> (x, y)``: a synthetic task
  (``lab.data.MQAR`` ...); evaluation draws fresh samples from its own generator;
- an object with ``get_batch(split, batch_size, [block_size,] generator) -> (x, y)``:
  a token stream (``lab.data.TokenDataset``), ``split`` being ``"train"`` or ``"val"``;
- a callable ``(batch_size, generator) -> (x, y)``.

``x`` is (B, T) token ids and ``y`` (B, T) targets, ``IGNORE_INDEX`` (-100) where
unlabelled. Every random draw must come from ``generator`` (a CPU
``torch.Generator`` seeded by ``seed`` and saved in checkpoints): that is what makes
resume exact.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lab.loss import chunked_cross_entropy, cross_entropy_sum
from lab.train.engine import Engine

Batch = tuple[torch.Tensor, torch.Tensor]
Sampler = Callable[[str, int, torch.Generator], Batch]


def as_sampler(data: Any, block_size: int | None) -> Sampler:
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


def micro_batches(batch: Batch, engine: Engine, accum: int) -> Iterator[Batch]:
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


def summed_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Cross-entropy summed over labelled positions. With ``chunk_size``, the head and
    the loss run ``chunk_size`` tokens at a time (``lab.loss.chunked_cross_entropy``,
    through ``model.hidden_states`` and ``model.head``), never holding the full logits."""
    if chunk_size is not None:
        return chunked_cross_entropy(model.hidden_states(x), model.head, y, chunk_size)
    return cross_entropy_sum(checked_logits(model, x, y), y)


def labelled_sums(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """(summed cross-entropy, correct next-token predictions) over labelled positions,
    without gradients; with ``chunk_size``, one chunk of logits at a time."""
    if chunk_size is None:
        pieces = [(checked_logits(model, x, y), y)]
    else:
        hidden = model.hidden_states(x).flatten(0, 1)
        pieces = [
            (model.head(h), t)
            for h, t in zip(hidden.split(chunk_size), y.flatten().split(chunk_size), strict=True)
        ]
    sums = [
        torch.stack([cross_entropy_sum(logits, t), (logits.argmax(-1) == t).sum().float()])
        for logits, t in pieces
    ]
    return torch.stack(sums).sum(0)


def checked_logits(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``model(x)``, which must be logits (B, T, V) for targets ``y`` (B, T)."""
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.shape[:2] != y.shape:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(
            f"model(x) returned {got} for x of shape {tuple(x.shape)}; fit needs logits of "
            "shape (batch, seq_len, vocab_size)"
        )
    return logits


def check_chunked_loss(model: nn.Module, chunk_size: int | None) -> None:
    """``loss_chunk_size`` needs a model split as ``head(hidden_states(x))`` (``lab.GPT``)."""
    missing = [
        name for name in ("hidden_states", "head") if not callable(getattr(model, name, None))
    ]
    if chunk_size is not None and missing:
        raise ValueError(
            f"loss_chunk_size={chunk_size} needs model.hidden_states(x) and model.head(h) "
            f"(as lab.GPT has); {type(model).__name__} lacks {' and '.join(missing)}: "
            "pass loss_chunk_size=None, or give the model both methods"
        )


def moe_auxiliary_loss(model: nn.Module) -> Callable[[nn.Module], torch.Tensor] | None:
    """``lab.moe.auxiliary_loss`` if the model has modules from ``lab.moe``, else None."""
    if not any(c.__module__ == "lab.moe" for m in model.modules() for c in type(m).__mro__):
        return None
    from lab.moe import auxiliary_loss

    return auxiliary_loss
