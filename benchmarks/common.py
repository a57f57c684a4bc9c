"""What every benchmark here shares: the interleaved race and lab -> LitGPT weights."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def race(
    fns: dict[str, Callable[[], None]], rounds: int, repeats: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function, per round, after one warm-up call each.

    The functions take turns within a round and the order alternates between rounds,
    so a neighbour's load slows every contestant alike.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            for _ in range(repeats):
                fns[name]()
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def speedup(times: dict[str, list[float]], lab: str = "lab", other: str = "litgpt") -> str:
    """``other``'s time over lab's, round by round: "median [min-max]"."""
    ratios = sorted(o / t for t, o in zip(times[lab], times[other], strict=True))
    return f"{statistics.median(ratios):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]"


def litgpt_state(lab_model: nn.Module) -> dict[str, torch.Tensor]:
    """lab's weights under LitGPT 0.5's names. Both fuse attention as ``[Q | K | V]``
    (lab ``attn.attn``, LitGPT ``attn.qkv``); lab's gated ``fc_1`` holds ``[gate | up]``,
    which LitGPT's LLaMAMLP keeps as ``fc_1`` and ``fc_2``, with lab's ``fc_2`` as its
    ``proj``; a plain MLP's ``fc_1``/``fc_2`` are GptNeoxMLP's ``fc``/``proj``."""
    gated = lab_model.config.mlp_class_name == "GatedMLP"
    state = {}
    for name, tensor in lab_model.state_dict().items():
        name = name.replace("attn.attn.", "attn.qkv.")
        if gated and name.endswith("mlp.fc_1.weight"):
            state[name], state[name.replace("fc_1", "fc_2")] = tensor.chunk(2)
        elif gated and name.endswith("mlp.fc_2.weight"):
            state[name.replace("fc_2", "proj")] = tensor
        else:
            state[name.replace("mlp.fc_1.", "mlp.fc.").replace("mlp.fc_2.", "mlp.proj.")] = tensor
    return state
