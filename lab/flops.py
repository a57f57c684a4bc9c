"""FLOPs: counted on a model, estimated from a config, and model FLOP utilisation.

``flops(model, batch)`` counts a real forward (and backward) pass with PyTorch's
``FlopCounterMode``. ``flops_per_token(config)`` counts the same on ``GPT(config)``
built on fake tensors (nothing allocated; each distinct block run once, see
``lab.memory``), so a registered component needs no formula; ``lab.formulas``
derives the figure for the stock components. ``mfu`` turns a step time into model
FLOP utilisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from lab import formulas, memory
from lab.config import Config


def _register_cpu_attention_flops() -> None:
    """PyTorch's counter knows the CUDA attention kernels but not the CPU flash kernel
    (as of 2.13); count it like the others: two matmuls forward, four backward."""
    aten = torch.ops.aten
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if forward is None or forward in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(forward, get_raw=True)
    def _forward(query, key, value, *args, out_val=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)

    @flop_counter.register_flop_formula(
        aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True
    )
    def _backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(
            grad_out.shape, query.shape, key.shape, value.shape
        )


_register_cpu_attention_flops()


@dataclass
class FlopCount:
    """FLOPs of a forward (and backward) pass: totals and ``by_module``, module path ->
    FLOPs of the forward pass (``"transformer.h.0.attn"``; parents include children)."""

    forward: int
    backward: int
    by_module: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _by_module(counter: FlopCounterMode) -> dict[str, int]:
    """Module path -> FLOPs so far: FlopCounterMode names modules "GPT.transformer.h.0"
    plus a "Global" total; the root ("GPT") becomes "", the rest their paths."""
    return {
        name.partition(".")[2]: sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        if name != "Global"
    }


def flops(
    model: nn.Module, batch: torch.Tensor | tuple[torch.Tensor, ...], backward: bool = True
) -> FlopCount:
    """Count FLOPs of ``model`` on ``batch`` (token ids, or ``(x, y)``) with
    ``torch.utils.flop_counter.FlopCounterMode``, which counts matrix multiplications
    and attention (2 FLOPs per multiply-add) and ignores elementwise work. With
    ``backward``, ``logits.sum()`` is backpropagated and counted separately."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    with FlopCounterMode(display=False) as counter:
        logits = model(x)
    by_module = _by_module(counter)
    forward = counter.get_total_flops()
    backward_flops = 0
    if backward:
        with FlopCounterMode(display=False) as counter:
            logits.float().sum().backward()
        backward_flops = counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    return FlopCount(forward, backward_flops, by_module)


def flops_per_token(config: Config, seq_len: int | None = None, training: bool = False) -> int:
    """Matmul and attention FLOPs per token of a forward pass of ``GPT(config)`` on
    ``seq_len`` tokens (default ``block_size``); with ``training`` of the forward and
    backward pass of a training step (about 3x: the backward pass computes two matmuls
    for each of the forward's). Counted by ``FlopCounterMode`` on fake tensors, so
    every registered component counts as it computes; ``lab.formulas.flops_per_token``
    derives the same figure for the stock components. A mixture of experts routes by
    the data, which fake tensors do not have: a model with MoE layers is counted by
    ``lab.formulas`` (each token through its ``n_expert_per_token`` experts).
    """
    T = seq_len or config.block_size
    try:
        model, mode = memory.fake_model(config)
        with mode, FlopCounterMode(display=False) as counter:
            forward: list[dict[str, int]] = []  # the counts before the backward pass

            def count_forward() -> None:
                forward.append(_by_module(counter))

            _, _, runs = memory.fake_step(model, 1, T, on_forward=count_forward)
            total = _by_module(counter)
    except memory.DATA_DEPENDENT:
        memory.require_formulas(config, "flops(model, batch)")
        return formulas.flops_per_token(config, T, training)
    counts = total if training else forward[0]
    count = counts[""] + sum(counts[f"transformer.h.{first}"] for first in runs.values())
    return count // T


# --- utilisation -----------------------------------------------------------------------------

# Dense (no sparsity) peak FLOP/s from NVIDIA's datasheets; "bf16"/"fp16" are tensor-core
# rates (FP32 accumulate for the RTX 4090), "fp32" the non-tensor-core rate. SXM parts.
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12},
    "H100 PCIe": {"bf16": 756.0e12, "fp16": 756.0e12, "fp32": 51.2e12},
    "H100": {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 66.9e12},
    "A100": {"bf16": 312.0e12, "fp16": 312.0e12, "fp32": 19.5e12},
    "L4": {"bf16": 121.0e12, "fp16": 121.0e12, "fp32": 30.3e12},
    "T4": {"fp16": 65.0e12, "fp32": 8.1e12},  # Turing: no bf16
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "fp32": 82.6e12},
}
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def measure_cpu_peak_flops(
    size: int = 1024, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> float:
    """FLOP/s of the best of ``repeats`` ``size x size`` matmuls on this CPU (with
    the current ``torch.get_num_threads()``): a practical peak, ``2 n^3`` FLOPs each."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> float:
    """Peak FLOP/s of ``device`` for ``dtype``: the published dense figure for known
    GPUs (``GPU_PEAK_FLOPS``, bf16 by default), a measured matmul for the CPU (fp32 by
    default)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        return measure_cpu_peak_flops(dtype=dtype or torch.float32)
    dtype = dtype or torch.bfloat16
    name = torch.cuda.get_device_name(device)
    kind = _DTYPE_NAMES.get(dtype)
    for gpu, table in GPU_PEAK_FLOPS.items():  # "H100 PCIe" is listed before "H100"
        if gpu in name and kind in table:
            return table[kind]
    raise ValueError(
        f"no published {kind or dtype} peak for {name!r}; pass peak= to mfu() "
        f"(known: {', '.join(GPU_PEAK_FLOPS)})"
    )


def mfu(flops_per_step: float, step_seconds: float, peak: float) -> float:
    """Model FLOP utilisation (Chowdhery et al. 2022): the FLOPs the model needs per
    step (``flops_per_token(config, T, training=True) * tokens``, or ``flops(...).total``)
    divided by what the device could do in that time, ``step_seconds * peak``."""
    if step_seconds <= 0 or peak <= 0:
        raise ValueError(f"step_seconds ({step_seconds}) and peak ({peak}) must be > 0")
    return flops_per_step / (step_seconds * peak)
