"""LoRA: low-rank adaptation (Hu et al. 2021, arXiv:2106.09685).

A frozen linear layer ``W`` (out, in) learns a low-rank update instead of itself::

    y = W x + b + (lora_alpha / r) * B A dropout(x)      A (r, in) random, B (out, r) zero

so at initialisation ``B A = 0`` and the model is unchanged, and only ``r (in + out)``
values per layer train. ``merge_lora`` folds ``(lora_alpha / r) B A`` into ``W`` for
inference at no extra cost; ``unmerge_lora`` takes it out again.

The fused QKV projection ``attn`` (``[Q | K | V]``, GQA sizes ``nh hs | ng hs | ng hs``)
is adapted per part: each enabled part gets its own ``A_i`` and ``B_i``, as a LoRA on
separate ``q_proj``/``k_proj``/``v_proj`` layers would (and as ``peft`` does)::

    delta W = [ B_q A_q ]   nh hs rows      (zeros for a part that is not a target)
              [ B_k A_k ]   ng hs rows
              [ B_v A_v ]   ng hs rows

Targets: ``query``, ``key``, ``value`` (parts of ``attn``), ``projection`` (``proj``),
``mlp`` (``fc_1`` and ``fc_2``; ``GatedMLP.fc_1`` is the fused ``[gate | up]``, adapted
as one layer) and ``head`` (``lm_head``). Hu et al. adapt query and value, the default.

    apply_lora(model, r=8, lora_alpha=16, targets=("query", "value"))
    mark_only_lora_as_trainable(model)

The keywords are LitGPT's and peft's: ``r``, ``lora_alpha``, ``lora_dropout``.
``lab.finetune.peft`` reads and writes peft's files.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lab.blocks import blocks_of
from lab.errors import AdapterError
from lab.finetune.core import (
    mark_only_adapter_as_trainable,
    merge,
    mlp_linears,
    qkv_linear,
    register_method,
    require_int,
    unmerge,
)

TARGETS = ("query", "key", "value", "projection", "mlp", "head")
DEFAULT_TARGETS = ("query", "value")  # Hu et al.'s choice
BIAS_MODES = ("none", "all", "lora_only")


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a LoRA update; ``weight`` and ``bias`` keep their names, so
    the base state dict loads unchanged.

    ``parts``/``enabled`` split the output into consecutive parts (the fused QKV's
    ``[Q | K | V]``) of which only the enabled ones are adapted, each with its own
    rank-``r`` pair; by default the whole output is one adapted part.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        parts: Sequence[int] | None = None,
        enabled: Sequence[bool] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_lora(r, lora_alpha, lora_dropout, parts, enabled)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        parts: Sequence[int] | None = None,
        enabled: Sequence[bool] | None = None,
    ) -> LoRALinear:
        """Turn ``linear`` into a ``LoRALinear`` in place: its weight and bias stay the
        same tensors (not copied, not reinitialised); ``A`` and ``B`` are added."""
        if type(linear) is not nn.Linear:
            raise AdapterError(
                f"LoRA wraps a plain nn.Linear, not {type(linear).__name__} (a layer can "
                "carry one adapter: start from the base model)"
            )
        linear.__class__ = cls
        linear._add_lora(r, lora_alpha, lora_dropout, parts, enabled)
        return linear

    def _add_lora(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        parts: Sequence[int] | None,
        enabled: Sequence[bool] | None,
    ) -> None:
        require_int("r", r, 1)
        if not 0 <= lora_dropout < 1:
            raise AdapterError(f"lora_dropout ({lora_dropout}) must be in [0, 1)")
        self.parts = tuple(parts or (self.out_features,))
        self.enabled = tuple(enabled or (True,) * len(self.parts))
        if sum(self.parts) != self.out_features or len(self.enabled) != len(self.parts):
            raise AdapterError(
                f"parts {self.parts} must sum to out_features ({self.out_features}), with "
                f"one enabled flag each (got {self.enabled})"
            )
        if not any(self.enabled):
            raise AdapterError("enabled has no True entry: no part would be adapted")
        self.r, self.lora_alpha, self.scaling = r, lora_alpha, lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_dropout.train(self.training)  # a model in eval mode stays in eval mode
        kwargs = dict(device=self.weight.device, dtype=self.weight.dtype)
        adapted_out = sum(self.adapted_parts())
        self.lora_A = nn.Parameter(torch.empty(sum(self.enabled) * r, self.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(adapted_out, r, **kwargs))
        self.merged = False
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """A as ``nn.Linear`` initialises weights (Kaiming-uniform), B zero (Hu et al.),
        so the update starts at zero. ``GPT.reset_parameters`` calls this too (after
        ``to_empty`` on a meta-device model), once it has initialised ``weight``."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        h = self.lora_dropout(x) @ self.lora_A.transpose(0, 1)  # (..., n_adapted r)
        pairs = zip(h.split(self.r, -1), self._split_B(), strict=True)
        return y + self._with_zeros([a @ b.transpose(0, 1) for a, b in pairs], -1) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``(lora_alpha / r) B A`` laid out like ``weight`` (out, in): what merging adds."""
        pairs = zip(self.lora_A.split(self.r, 0), self._split_B(), strict=True)
        return self._with_zeros([b @ a for a, b in pairs], 0) * self.scaling

    def adapted_parts(self) -> list[int]:
        """The sizes of the adapted parts of the output, in order (one B_i each)."""
        return [p for p, on in zip(self.parts, self.enabled, strict=True) if on]

    def _split_B(self) -> tuple[torch.Tensor, ...]:
        return self.lora_B.split(self.adapted_parts())

    def _with_zeros(self, adapted: list[torch.Tensor], dim: int) -> torch.Tensor:
        """The adapted parts' outputs concatenated along ``dim``, with zeros in place of
        the parts that are not adapted."""
        pieces, outputs = [], iter(adapted)
        for size, on in zip(self.parts, self.enabled, strict=True):
            if on:
                pieces.append(next(outputs))
            else:
                shape = list(adapted[0].shape)
                shape[dim] = size
                pieces.append(adapted[0].new_zeros(shape))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)

    def merge(self) -> None:
        """Add the update to ``weight`` (exact up to rounding); LoRA is then skipped."""
        if not self.merged:
            with torch.no_grad():
                self.weight += self.delta_weight().to(self.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        """Subtract the update again (``weight`` comes back up to rounding)."""
        if self.merged:
            with torch.no_grad():
                self.weight -= self.delta_weight().to(self.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        parts = "" if len(self.parts) == 1 else f", parts={self.parts}, enabled={self.enabled}"
        return f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha}{parts}"


@register_method("lora")
def apply_lora(
    model: nn.Module,
    r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    targets: Iterable[str] = DEFAULT_TARGETS,
) -> nn.Module:
    """Add LoRA to the ``targets`` (see ``TARGETS``) of every layer of a ``lab`` GPT, in
    place; returns ``model``. Base weights are untouched and keep their names; call
    ``mark_only_lora_as_trainable`` before training."""
    layers = _target_layers(model, _check_targets(targets))  # all checked before any change
    for linear, extra in layers:
        LoRALinear.from_linear(
            linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **extra
        )
    return model


def _check_targets(targets: Iterable[str]) -> list[str]:
    targets = sorted(set([targets] if isinstance(targets, str) else targets))
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise AdapterError(f"targets {targets} must be a non-empty subset of {list(TARGETS)}")
    return targets


def _target_layers(model: nn.Module, targets: list[str]) -> list[tuple[nn.Linear, dict]]:
    """(linear layer, extra LoRALinear arguments) for every layer to adapt."""
    layers = []
    qkv = [name in targets for name in ("query", "key", "value")]
    for i, block in enumerate(blocks_of(model, "LoRA")):
        if any(qkv):
            linear, sizes = qkv_linear(block, i, "LoRA")
            layers.append((linear, {"parts": sizes, "enabled": qkv}))
        if "projection" in targets:
            layers.append((block.attn.proj, {}))
        if "mlp" in targets:
            layers += [(linear, {}) for linear in mlp_linears(block, i)]
    if "head" in targets:
        layers.append((model.lm_head, {}))
    for linear, _ in layers:
        if type(linear) is not nn.Linear:
            raise AdapterError(
                f"LoRA wraps plain nn.Linear layers; this model has a {type(linear).__name__} "
                "(a layer can carry one adapter: start from the base model)"
            )
    return layers


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """Every ``LoRALinear`` of ``model``."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze everything but ``lora_A``/``lora_B``; ``bias="all"`` also trains every
    bias, ``"lora_only"`` the biases of the adapted layers (as ``loralib`` does)."""
    if bias not in BIAS_MODES:
        raise AdapterError(f"bias ({bias!r}) must be one of {list(BIAS_MODES)}")
    if not lora_layers(model):
        raise AdapterError("the model has no LoRA layers: call apply_lora first")
    mark_only_adapter_as_trainable(model, methods=["lora"])
    if bias == "all":
        for name, param in model.named_parameters():
            param.requires_grad |= name.endswith(".bias")
    if bias == "lora_only":
        for layer in lora_layers(model):
            if layer.bias is not None:
                layer.bias.requires_grad = True


# LitGPT's names for the shared core's merge: LoRA is the method whose layers merge.
merge_lora, unmerge_lora = merge, unmerge
