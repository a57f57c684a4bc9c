"""LLaMA-Adapter (Zhang et al. 2023, arXiv:2303.16199).

From layer ``start_layer`` on, each attention learns a prefix of ``prompt_length``
vectors. Its keys and values come from the layer's own frozen projection (GQA
sizes, no positions: the prefix sits outside the sequence), every query attends to
them in a separate softmax, and the result is added through a gate per head that
starts at zero::

    y = attention(q, k, v)  +  gate[head] * softmax(q ak^T * scale) av
        ak, av = split(attn(prefix))                   prefix (prompt_length, C)

So at initialisation the adapted model computes exactly what the base model does,
and the gradient first reaches the gates, then (through them) the prefix. The
prefix starts N(0, 1), like the paper's ``nn.Embedding`` and like the unit-RMS
normed hidden states the projection normally sees. Unlike the guide's snippet, the
sequence length never changes.

Converting a model (also one from ``GPT.from_pretrained``) happens in place; the
base weights keep their names, so a base checkpoint still loads into it::

    apply_adapter(model, prompt_length=10, start_layer=2)
    mark_only_adapter_as_trainable(model)
    ... train ...
    save_adapter(model, "my-adapter")                       # only the new tensors
    load_adapter(GPT.from_pretrained("base"), "my-adapter")  # applies, then loads

Freezing, saving and loading are ``lab.finetune.core``'s, shared by every method;
they are importable from here too, as LitGPT's ``adapter`` module and the notebooks
name them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lab import model as base
from lab.blocks import blocks_of
from lab.config import Config as BaseConfig
from lab.errors import AdapterError
from lab.finetune.core import (
    load_adapter,
    mark_only_adapter_as_trainable,
    register_method,
    require_int,
    save_adapter,
)
from lab.params import weights_version

__all__ = [
    "GPT",
    "CausalSelfAttention",
    "Config",
    "add_prefixes",
    "apply_adapter",
    "load_adapter",
    "mark_only_adapter_as_trainable",
    "save_adapter",
]


@dataclass
class Config(BaseConfig):
    """A config that carries the adapter's settings (the guide's pattern); build with
    ``lab.finetune.adapter.GPT(config)``."""

    adapter_prompt_length: int = 10
    adapter_start_layer: int = 2


class CausalSelfAttention(base.CausalSelfAttention):
    """Attention plus the gated prefix term above; everything else is the base's.

    Only ``scaled_dot_product_attention`` is overridden, so the KV cache, positions and
    ``lab.generate``'s cache support are the base's.
    """

    def __init__(
        self, config: BaseConfig, block_idx: int = 0, prompt_length: int | None = None
    ) -> None:
        super().__init__(config, block_idx)
        self._add_prefix(prompt_length or _setting(config, "adapter_prompt_length"))

    @classmethod
    def from_attention(
        cls, attention: base.CausalSelfAttention, prompt_length: int
    ) -> CausalSelfAttention:
        """Turn ``attention`` (a ``lab.model.CausalSelfAttention``) into this class in
        place: its weights, cache and submodules stay the same objects (nothing is
        copied), and the prefix and gates are added."""
        attention.__class__ = cls
        attention._add_prefix(prompt_length)
        return attention

    def _add_prefix(self, prompt_length: int) -> None:
        kwargs = dict(device=self.attn.weight.device, dtype=self.attn.weight.dtype)
        self.adapter_prefix = nn.Parameter(torch.empty(prompt_length, self.n_embd, **kwargs))
        self.adapter_gate = nn.Parameter(torch.empty(self.n_head, **kwargs))
        self._prefix_cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Prefix N(0, 1), gates zero: the adapter starts as the identity. (Also what
        ``GPT.reset_parameters`` calls after building on the meta device.)"""
        super().reset_parameters()  # the base attention's own (sinks)
        nn.init.normal_(self.adapter_prefix)
        nn.init.zeros_(self.adapter_gate)

    @property
    def prompt_length(self) -> int:
        return self.adapter_prefix.size(0)

    def scaled_dot_product_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = super().scaled_dot_product_attention(q, k, v, mask=mask)  # (B, T, nh, hs)
        gate = self.adapter_gate.view(-1, 1)  # (nh, 1): one per head
        return y + gate * self.prefix_attention(q)

    def prefix_attention(self, q: torch.Tensor) -> torch.Tensor:
        """Every query attends to the prefix alone: (B, T, nh, hs) -> (B, T, nh, hs).
        No mask: the prefix is visible from every position (and from padding rows,
        whose outputs are discarded anyway)."""
        ak, av = self.prefix_keys_values()  # (1, P, ng, hs)
        q = q.transpose(1, 2)  # (B, nh, T, hs)
        groups = self.n_head // self.n_query_groups  # each key/value head serves these
        ak = ak.transpose(1, 2).repeat_interleave(groups, dim=1)  # (1, nh, P, hs)
        av = av.transpose(1, 2).repeat_interleave(groups, dim=1)
        scores = (q @ ak.transpose(-2, -1)) * self.scale  # (B, nh, T, P)
        if self.softcap is not None:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        pattern = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
        return (pattern @ av).transpose(1, 2)

    def prefix_keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix's keys and values (1, P, ng, hs) through this layer's projection
        (and key norm, if any). They depend on parameters only, so without gradients
        (decoding) they are computed once and reused until a parameter changes (its
        storage or in-place version counter does); with gradients they are recomputed
        every forward pass, so each backward pass has its own graph."""
        if torch.is_grad_enabled():
            return self._project_prefix()
        key = weights_version(self)
        if self._prefix_cache is None or self._prefix_cache[0] != key:
            self._prefix_cache = (key, *self._project_prefix())
        return self._prefix_cache[1], self._prefix_cache[2]

    def _project_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        _, ak, av = self.qkv(self.adapter_prefix.unsqueeze(0))
        return ak, av

    def extra_repr(self) -> str:
        return f"prompt_length={self.prompt_length}"


class GPT(base.GPT):
    """``GPT(config)`` with the adapter applied from ``config.adapter_start_layer`` on,
    ``config.adapter_prompt_length`` prefix vectors per layer (the guide's pattern)."""

    def __init__(self, config: BaseConfig) -> None:
        super().__init__(config)
        apply_adapter(
            self,
            prompt_length=_setting(config, "adapter_prompt_length"),
            start_layer=_setting(config, "adapter_start_layer"),
        )


def _setting(config: BaseConfig, name: str) -> int:
    if not hasattr(config, name):
        raise AdapterError(
            f"{type(config).__name__} has no {name}; use lab.finetune.adapter.Config (or add the "
            f"field to your Config subclass), or call apply_adapter(model, ...) on a GPT"
        )
    return getattr(config, name)


# --- applying ------------------------------------------------------------------------------


@register_method("adapter", excludes=("adapter_v2",))
def apply_adapter(model: nn.Module, prompt_length: int = 10, start_layer: int = 2) -> nn.Module:
    """Add LLaMA-Adapter prefixes and gates to layers ``start_layer..n_layer-1`` of a
    ``lab`` GPT, in place; returns ``model``. The base weights are untouched and keep
    their names; call ``mark_only_adapter_as_trainable`` before training."""
    add_prefixes(blocks_of(model, "the adapter"), prompt_length, start_layer)
    return model


def add_prefixes(blocks: list[nn.Module], prompt_length: int, start_layer: int) -> None:
    """Turn the attention of ``blocks[start_layer:]`` into the adapter's (checked first,
    so a refused layer leaves the model unchanged)."""
    require_int("prompt_length", prompt_length, 1)
    if not 0 <= start_layer < len(blocks):
        raise AdapterError(
            f"start_layer ({start_layer}) must be a layer index, 0..{len(blocks) - 1}"
        )
    for i, block in enumerate(blocks[start_layer:], start_layer):
        if type(block.attn) is not base.CausalSelfAttention:
            raise AdapterError(
                f"layer {i}'s attention is {type(block.attn).__name__}; the adapter wraps "
                "lab.model.CausalSelfAttention (start from the base model)"
            )
    for block in blocks[start_layer:]:
        CausalSelfAttention.from_attention(block.attn, prompt_length)
