"""Look inside a forward pass: record (or replace) activations by name.

    with lab.probe(model, "pattern", "routing") as cache:
        model(idx)
    cache["blocks.0.attn.pattern"]          # (B, n_head, T, S)

Names follow the module paths of TransformerLens, with ``model.transformer.h[i]``
called ``blocks.{i}``:

    blocks.{i}.resid_pre       block input  (B, T, C)
    blocks.{i}.attn.scores     attention logits before the softmax, scaled, biased and
                               masked (-inf where a query may not look) (B, nh, T, S)
    blocks.{i}.attn.pattern    softmax of the scores (B, nh, T, S)
    blocks.{i}.attn.out        attention output, before the residual add (B, T, C)
    blocks.{i}.mlp.post        hidden activations, the input of ``fc_2`` (B, T, hidden)
    blocks.{i}.mlp.out         MLP output, before the residual add (B, T, C)
    blocks.{i}.mlp.routing     MoE routing record of the layer (MoE layers only)
    blocks.{i}.resid_post      block output (B, T, C)

Only what the filters select is recorded, and hooks are installed only for it:
attention scores and patterns are materialised only in the selected layers (the
others keep PyTorch's fused kernel), and with no probe active nothing is installed
at all. A filter is a name, a dotted fragment matched segment by segment
(``"attn"``, ``"pattern"``, ``"blocks.2"``, ``"blocks.*.attn.pattern"``), or a
callable ``name -> bool``. ``hooks={filter: fn}`` replaces activations:
``fn(tensor, name)`` returns the tensor to use instead (or None to keep it), so a
head can be ablated or a residual stream patched; the cache holds what the model
used. Each call of the model overwrites the cache, so after generation it holds the
last step.
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lab.blocks import blocks_of
from lab.model import CausalSelfAttention

Filter = str | Callable[[str], bool]
Hook = Callable[[torch.Tensor, str], torch.Tensor | None]


class ActivationCache(dict):
    """``{name: tensor}`` recorded by a probe (tensors detached from the graph)."""

    def layers(self, suffix: str) -> list[torch.Tensor]:
        """The tensors named ``blocks.{i}.{suffix}``, by layer: ``cache.layers("attn.pattern")``."""
        found = {int(name.split(".")[1]): t for name, t in self.items()
                 if name.startswith("blocks.") and name.endswith("." + suffix)}  # fmt: skip
        return [found[i] for i in sorted(found)]

    def __repr__(self) -> str:
        rows = [f"  {name}: {_describe(value)}" for name, value in self.items()]
        return "ActivationCache(\n" + "\n".join(rows) + "\n)" if rows else "ActivationCache()"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    return type(value).__name__


# Activations read with ordinary module hooks: name -> (module path inside the block,
# "input" for its first argument or "output" for its return value).
MODULE_HOOKS = {
    "resid_pre": ("", "input"),
    "attn.out": ("attn", "output"),
    "mlp.post": ("mlp.fc_2", "input"),
    "mlp.out": ("mlp", "output"),
    "resid_post": ("", "output"),
}


def hook_points(model: nn.Module) -> list[str]:
    """Every name a probe can record on ``model``, by layer."""
    names = []
    for i, block in enumerate(blocks_of(model, "lab.probe")):
        prefix = f"blocks.{i}"
        for name, (path, _) in MODULE_HOOKS.items():
            if name == "mlp.out" and _has(block, "mlp") and _routes(block.mlp):
                names.append(f"{prefix}.mlp.routing")
            if _has(block, path):
                names.append(f"{prefix}.{name}")
            if name == "resid_pre":  # then what attention computes inside
                for attn_path, _ in _attention_modules(block):
                    names += [f"{prefix}.{attn_path}.scores", f"{prefix}.{attn_path}.pattern"]
    return names


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def matches(name: str, name_filter: Filter) -> bool:
    """Whether ``name`` is selected: a callable decides, a string matches when its
    dotted segments occur consecutively in the name's (``fnmatch`` patterns per segment)."""
    if callable(name_filter):
        return bool(name_filter(name))
    parts, want = name.split("."), name_filter.split(".")
    return any(
        all(fnmatch.fnmatchcase(part, w) for part, w in zip(parts[i:], want, strict=False))
        for i in range(len(parts) - len(want) + 1)
    )


@contextmanager
def probe(
    model: nn.Module, *names: Filter, hooks: dict[Filter, Hook] | None = None
) -> Iterator[ActivationCache]:
    """Record the activations selected by ``names`` (and apply ``hooks``) during the
    forward passes run inside the ``with`` block; every hook is removed on exit."""
    hooks = hooks or {}
    if not names and not hooks:
        raise ValueError(
            "lab.probe records nothing unless told what: pass names such as 'pattern', "
            "'attn', 'blocks.0.resid_post' (or '*' for everything) or hooks={name: fn}"
        )
    available = hook_points(model)
    for name_filter in [*names, *hooks]:
        if not any(matches(n, name_filter) for n in available):
            raise ValueError(
                f"{name_filter!r} selects nothing on this model; names look like "
                f"{available[:4] + available[-1:]} (hook_points(model) from lab.probe lists them all)"
            )
    cache = ActivationCache()
    record = {n for n in available if any(matches(n, f) for f in names)}
    edits = {n: [fn for f, fn in hooks.items() if matches(n, f)] for n in available}
    wanted = record | {n for n, fns in edits.items() if fns}

    def capture(name: str, value: torch.Tensor) -> torch.Tensor:
        for fn in edits[name]:
            replaced = fn(value, name)
            value = value if replaced is None else replaced
        if name in record:
            cache[name] = value.detach() if isinstance(value, torch.Tensor) else value
        return value

    undo = _install(model, wanted, capture)
    try:
        yield cache
    finally:
        for remove in reversed(undo):
            remove()


def _install(
    model: nn.Module, wanted: set[str], capture: Callable[[str, Any], Any]
) -> list[Callable[[], None]]:
    """Put hooks exactly where ``wanted`` names are produced; return their removers."""
    undo: list[Callable[[], None]] = []
    for i, block in enumerate(blocks_of(model, "lab.probe")):
        prefix = f"blocks.{i}"
        for suffix, (path, where) in MODULE_HOOKS.items():
            name = f"{prefix}.{suffix}"
            if name not in wanted:
                continue
            module = block.get_submodule(path)
            if where == "input":
                hook = _input_hook(name, capture)
                handle = module.register_forward_pre_hook(hook, with_kwargs=True)
            else:
                handle = module.register_forward_hook(_output_hook(name, capture))
            undo.append(handle.remove)
        for path, module in _attention_modules(block):
            if wanted & {f"{prefix}.{path}.scores", f"{prefix}.{path}.pattern"}:
                undo.append(_set_attention_hook(module, f"{prefix}.{path}", wanted, capture))
        if f"{prefix}.mlp.routing" in wanted:
            undo.append(_set_routing_hook(block.mlp, f"{prefix}.mlp.routing", capture))
    return undo


def _input_hook(name: str, capture: Callable) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            new = capture(name, args[0])
            return None if new is args[0] else ((new, *args[1:]), kwargs)
        key = next(iter(inspect.signature(module.forward).parameters))  # passed by keyword
        new = capture(name, kwargs[key])
        return None if new is kwargs[key] else (args, {**kwargs, key: new})

    return hook


def _output_hook(name: str, capture: Callable) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        new = capture(name, output)
        return None if new is output else new

    return hook


def _set_attention_hook(
    module: CausalSelfAttention, prefix: str, wanted: set[str], capture: Callable
) -> Callable[[], None]:
    """Route this attention through its unfused path for the duration of the probe."""

    def attention_hook(kind: str, value: torch.Tensor) -> torch.Tensor:
        name = f"{prefix}.{kind}"
        return capture(name, value) if name in wanted else value

    module.attention_hook = attention_hook
    return lambda: delattr(module, "attention_hook")


def _set_routing_hook(mlp: nn.Module, name: str, capture: Callable) -> Callable[[], None]:
    """Ask an MoE layer for its routing record (``lab.moe``'s ``record_routing`` flag)
    and copy it into the cache after each forward pass."""
    before = mlp.record_routing
    mlp.record_routing = True

    def after_forward(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        capture(name, module.routing)

    handle = mlp.register_forward_hook(after_forward)

    def undo() -> None:
        handle.remove()
        mlp.record_routing = before

    return undo


def _attention_modules(block: nn.Module) -> list[tuple[str, CausalSelfAttention]]:
    """Attention modules in a block that a probe can see inside, by relative path."""
    return [(path, m) for path, m in block.named_modules() if isinstance(m, CausalSelfAttention)]


def _routes(mlp: nn.Module) -> bool:
    """Whether an MLP keeps routing records (as ``lab.moe.MoE`` does)."""
    return hasattr(mlp, "record_routing") and hasattr(mlp, "routing")


# --- ready-made hooks ------------------------------------------------------------------------


def ablate_heads(*heads: int) -> Hook:
    """A pattern hook that zeroes the attention of ``heads``, so they contribute nothing:
    ``hooks={"blocks.0.attn.pattern": ablate_heads(3)}``."""

    def hook(pattern: torch.Tensor, name: str) -> torch.Tensor:
        if not name.endswith(".pattern"):
            raise ValueError(f"ablate_heads acts on attention patterns, not {name!r}")
        pattern = pattern.clone()
        pattern[:, list(heads)] = 0
        return pattern

    return hook


def patch(replacement: torch.Tensor) -> Hook:
    """A hook that substitutes ``replacement`` (same shape), e.g. a residual stream
    recorded on another input: activation patching."""

    def hook(value: torch.Tensor, name: str) -> torch.Tensor:
        if value.shape != replacement.shape:
            raise ValueError(
                f"patch for {name!r} has shape {tuple(replacement.shape)}, but the model "
                f"produced {tuple(value.shape)}; record it on an input of the same length"
            )
        return replacement.to(value.dtype)

    return hook
