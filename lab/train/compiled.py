"""``fit(..., compile=True)``: the model's part of a training step through ``torch.compile``.

What is compiled: the loss of a micro-batch (forward and summed cross-entropy,
``batches.summed_loss``) and, through AOTAutograd, its backward; evaluation's
``batches.labelled_sums`` separately. Gradient clipping and AdamW stay eager: they are
a few per cent of a step at workshop sizes and would add their own compilation.

Guards, so that nothing recompiles after the first step and the first evaluation:

- training and evaluation are two functions with their own compiled code, so eval
  mode and ``no_grad`` are a first compilation of the second one, not a recompile
  of the first;
- the batch dimension is marked dynamic (``maybe_mark_dynamic``), so a shorter last
  batch (of 2 rows or more) runs the same code;
- MoE layers (``lab.moe``) run eagerly inside the compiled step
  (``torch.compiler.disable`` for the length of the run): their dispatch's shapes
  follow the routing, which changes every step. The dense parts around them compile,
  and on a CPU the experts take the fused path for the run (``lab.moe.fuse_experts``:
  compiled SwiGLU kernels, dynamic in the rows, with a hand-written backward). On a
  GPU they keep the default path, whose grouped matmul suits them better there.

Where compiling is impossible (no C++ compiler for inductor's CPU kernels, no Triton
for CUDA, or a component dynamo cannot trace without a graph break) the run falls
back to eager with one warning that says why. Dense models compile as one graph
(``fullgraph``), so an untraceable component is reported rather than silently
splitting the step; models with MoE layers compile around them.

Each run compiles its own copy of the two functions, so one run's models and
decisions (dynamo never retries a frame it once skipped) do not carry over to the
next. Within a run, a change of sequence length or dtype recompiles, up to
``torch._dynamo.config.cache_size_limit`` (8) variants. Around MoE layers the model's
own methods are compiled too, and their variants are shared by all runs of the
process: after many MoE runs, ``torch.compiler.reset()`` starts afresh.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lab.train.batches import labelled_sums, summed_loss


class MicroSteps:
    """The loop's two calls of the model on a micro-batch, ``loss`` (training) and
    ``sums`` (evaluation): eager, or compiled with a fallback to eager."""

    def __init__(
        self, model: nn.Module, device: torch.device, chunk_size: int | None, compile: bool
    ) -> None:
        self.chunk_size, self.reserved = chunk_size, 0
        self.moe = _moe_layers(model) if compile else []
        self.compiled: dict[Any, Any] = {}
        problem = compile_problem(device) if compile else None
        self.fuse_experts = compile and problem is None and device.type == "cpu"
        if problem is not None:
            self._fall_back(problem)
        elif compile:
            # CPU: the step's kernels called from one C++ function (cpp_wrapper), which
            # also halves the compilation (one C++ build instead of one per kernel).
            options = {"cpp_wrapper": True} if device.type == "cpu" else {}
            self.compiled = {
                fn: torch.compile(_own_copy(fn), fullgraph=not self.moe, options=options)
                for fn in (summed_loss, labelled_sums)
            }

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of the micro-batch, with its graph for backward."""
        return self._call(summed_loss, model, x, y)

    def sums(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(summed cross-entropy, correct predictions), for evaluation under no_grad."""
        return self._call(labelled_sums, model, x, y)

    @contextmanager
    def prepared(self) -> Iterator[None]:
        """While the run lasts: MoE layers opt out of compilation and, on a CPU, fuse
        their experts (see the module docstring); restored afterwards."""
        was_fused = [layer.experts.fused for layer in self.moe]
        for layer in self.moe:
            layer.forward = torch.compiler.disable(layer.forward, recursive=True)
            layer.experts.fused = layer.experts.fused or self.fuse_experts
        try:
            yield
        finally:
            for layer, fused in zip(self.moe, was_fused, strict=True):
                del layer.forward  # the instance attribute: the class's forward again
                layer.experts.fused = fused

    def _call(self, fn: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        compiled = self.compiled.get(fn)
        if compiled is None:
            return fn(model, x, y, self.chunk_size)
        if x.size(1) > self.reserved:  # before compiling: tables a compiled step cannot grow
            reserve_positions(model, x.size(1), x.device)
            self.reserved = x.size(1)
        for tensor in (x, y):
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        try:
            return compiled(model, x, y, self.chunk_size)
        except torch._dynamo.exc.TorchDynamoException as error:  # raised while compiling
            self._fall_back(f"torch.compile failed ({_first_line(error)})")
            return fn(model, x, y, self.chunk_size)

    def _fall_back(self, why: str) -> None:
        self.compiled = {}
        warnings.warn(f"fit(compile=True): {why}; training eagerly instead", stacklevel=2)


def compile_problem(device: torch.device) -> str | None:
    """Why inductor cannot compile for ``device`` here, or None if it can (as far as
    can be told without compiling)."""
    if device.type == "cpu":
        from torch._inductor import cpp_builder, exc

        try:
            cpp_builder.get_cpp_compiler()
        except exc.InvalidCxxCompiler:
            return (
                "no C++ compiler was found, and inductor needs one for CPU kernels "
                "(install g++ or clang++, or point the CXX environment variable at one)"
            )
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is not installed, and inductor needs it for CUDA kernels"
    return None


def _own_copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled code, and decisions
    such as never compiling a frame again, per code object for the whole process: a
    copy per run starts clean and is freed with the run."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _first_line(error: BaseException) -> str:
    """The gist of a compilation error: the backend's own error where it wrapped one."""
    error = getattr(error, "inner_exception", None) or error
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def reserve_positions(model: nn.Module, rows: int, device: torch.device) -> None:
    """Grow every position table (RoPE's cos and sin, ``reserve``) to ``rows``: eager
    code grows them as it goes, a compiled step only reads them."""
    for module in model.modules():
        if callable(getattr(module, "reserve", None)):
            module.reserve(rows, device)


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    from lab.moe import moe_layers  # only when compiling

    return [layer for _, layer in moe_layers(model)]
