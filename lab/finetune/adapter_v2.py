"""LLaMA-Adapter V2 (Gao et al. 2023, arXiv:2304.15010): the adapter's gated prefix
plus "bias tuning" of every linear layer, and trainable norms.

Each frozen linear layer of the attention (fused QKV and output projection), the
MLP and the head learns a scale and a bias per output feature::

    y = scale * (W x + b + adapter_bias)       scale = 1, adapter_bias = 0 at start

so, with the prefix gates at zero (``lab.finetune.adapter``), the adapted model starts out
equal to the base model. ``mark_only_adapter_as_trainable`` trains the prefixes,
gates, scales, biases and every norm's parameters, as the paper does.

    apply_adapter_v2(model, prompt_length=10, start_layer=2)
    mark_only_adapter_as_trainable(model)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lab import registry
from lab.blocks import blocks_of
from lab.errors import AdapterError
from lab.finetune.adapter import add_prefixes
from lab.finetune.core import (
    mark_only_adapter_as_trainable,
    mlp_linears,
    qkv_linear,
    register_method,
)

__all__ = ["AdapterV2Linear", "apply_adapter_v2", "mark_only_adapter_as_trainable"]


class AdapterV2Linear(nn.Linear):
    """``nn.Linear`` with a learned per-output ``adapter_scale`` (ones) and
    ``adapter_bias`` (zeros): identity at initialisation. ``weight`` and ``bias`` keep
    their names, so base checkpoints load unchanged."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_rank: None = None,
    ) -> None:
        if adapter_rank is not None:
            raise AdapterError(
                "AdapterV2Linear learns a scale and a bias per output, not a low-rank "
                "update: drop adapter_rank, or use lab.finetune.lora.LoRALinear(in_features, "
                "out_features, r=...) for a low-rank adapter"
            )
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_scale_and_bias()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> AdapterV2Linear:
        """Turn ``linear`` into an ``AdapterV2Linear`` in place: its weight and bias stay
        the same tensors (not copied); the scale and bias are added."""
        linear.__class__ = cls
        linear._add_scale_and_bias()
        return linear

    def _add_scale_and_bias(self) -> None:
        kwargs = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.adapter_bias = nn.Parameter(torch.zeros(self.out_features, **kwargs))
        self.adapter_scale = nn.Parameter(torch.ones(self.out_features, **kwargs))

    def reset_adapter_parameters(self) -> None:
        """Back to the identity (``GPT.reset_parameters`` calls this, e.g. after
        ``to_empty`` on a model built on the meta device)."""
        nn.init.zeros_(self.adapter_bias)
        nn.init.ones_(self.adapter_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter_scale * (F.linear(x, self.weight, self.bias) + self.adapter_bias)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is one of the registered norms (AdapterV2 trains them all)."""
    return isinstance(module, tuple(registry.norm.get(name) for name in registry.norm.names()))


@register_method("adapter_v2", prefix="adapter_", trains=is_norm, excludes=("adapter",))
def apply_adapter_v2(model: nn.Module, prompt_length: int = 10, start_layer: int = 2) -> nn.Module:
    """Add the adapter prefixes (layers ``start_layer`` on) and scale-and-bias to every
    linear layer but the embedding, in place; returns ``model``. Base weights keep their
    values and names; call ``mark_only_adapter_as_trainable`` before training."""
    blocks = blocks_of(model, "AdapterV2")
    linears = [model.lm_head]
    for i, block in enumerate(blocks):
        linears += [qkv_linear(block, i, "AdapterV2")[0], block.attn.proj, *mlp_linears(block, i)]
    for linear in linears:
        if type(linear) is not nn.Linear:
            raise AdapterError(
                f"AdapterV2 wraps plain nn.Linear layers; this model has a "
                f"{type(linear).__name__} (start from the base model)"
            )
    add_prefixes(blocks, prompt_length, start_layer)
    for linear in linears:
        AdapterV2Linear.from_linear(linear)
    return model
