"""What training records (``History``) and what callbacks see (``TrainState``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from torch import nn


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


Hook = Callable[[TrainState], Any]


def split_callbacks(callbacks: Iterable[Any]) -> tuple[list[Hook], list[Hook]]:
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
