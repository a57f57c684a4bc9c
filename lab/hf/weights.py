"""Hugging Face tensors <-> lab tensors: one rule per lab tensor, made from the
family's ``Layout``.

A rule names the Hugging Face tensors a lab tensor is made of and how: transposed
(GPT-2's Conv1D), concatenated along the output dimension (lab's fused QKV and
gate|up), regrouped per head (GPT-NeoX) or stacked per expert (Mixtral). The same
rule converts both ways, so import and export cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from lab.config import Config
from lab.errors import CheckpointError
from lab.hf.families import FAMILIES, Layout

# Hugging Face buffers that some checkpoints store and lab recomputes.
_HF_BUFFERS = re.compile(
    r".*(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias|attention\.bias|attention\.masked_bias)"
)


@dataclass(frozen=True)
class _Rule:
    """One lab tensor made of ``hf`` tensors: transposed (Conv1D; GPT-OSS's stacked
    experts), concatenated along dim 0 (split back by ``sizes``), for GPT-NeoX regrouped
    from per-head ``(n_head, q|k|v, head_size)`` rows to lab's ``[Q | K | V]``, for
    experts stacked: ``experts`` consecutive groups of parts, one (concatenated) per
    expert, and for GPT-OSS's experts de-interleaved: rows ``g0 u0 g1 u1 ...`` along
    dim 1 to lab's ``[gate | up]``."""

    lab: str
    hf: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    per_head: tuple[int, int] | None = None  # (n_head, head_size)
    transpose: bool = False
    experts: int = 0
    interleaved: bool = False

    def to_lab(self, parts: list[torch.Tensor]) -> torch.Tensor:
        parts = [p.transpose(-2, -1) if self.transpose else p for p in parts]
        if self.experts:
            group = len(parts) // self.experts
            x = torch.stack(
                [torch.cat(parts[e * group : (e + 1) * group]) for e in range(self.experts)]
            )
        else:
            x = torch.cat(parts) if len(parts) > 1 else parts[0]
        if self.per_head:
            n_head, head_size = self.per_head
            x = x.reshape(n_head, 3, head_size, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        if self.interleaved:
            x = torch.cat((x[:, 0::2], x[:, 1::2]), dim=1)
        return x.contiguous()

    def to_hf(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.interleaved:
            x = torch.stack(x.chunk(2, dim=1), dim=2).flatten(1, 2)
        if self.per_head:
            n_head, head_size = self.per_head
            x = x.reshape(3, n_head, head_size, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        rows = list(x.unbind(0)) if self.experts else [x]
        parts = [p for row in rows for p in (row.split(self.sizes) if self.sizes else [row])]
        return [(p.transpose(-2, -1) if self.transpose else p).contiguous() for p in parts]


def weights_from_hf(
    tensors: dict[str, torch.Tensor], names: list[str], config: Config, model_type: str
) -> dict[str, torch.Tensor]:
    """The lab tensors ``names`` (a model's state dict, tied tensors once) made from a
    Hugging Face checkpoint's ``tensors``; raises ``CheckpointError`` listing missing
    and unexpected tensors."""
    layout = FAMILIES[model_type].layout
    if not any(k.startswith(layout.base) for k in tensors):  # old GPT-2 files omit the prefix
        tensors = {
            k if k.startswith(layout.lm_head) else layout.base + k: v for k, v in tensors.items()
        }
    rules = _rules(names, config, layout, set(tensors))
    used = {hf for rule in rules for hf in rule.hf}
    missing = sorted(hf for hf in used if hf not in tensors)
    ignored = {f"{layout.lm_head}.weight"} if config.tie_embeddings else set()
    unexpected = sorted(
        k for k in tensors if k not in used and k not in ignored and not _HF_BUFFERS.fullmatch(k)
    )
    if missing or unexpected:
        raise CheckpointError(
            "the Hugging Face weights do not match their config.json:"
            + (f"\n  missing ({len(missing)}): {', '.join(missing)}" if missing else "")
            + (f"\n  unexpected ({len(unexpected)}): {', '.join(unexpected)}" if unexpected else "")
        )
    out = {}
    for rule in rules:
        try:
            out[rule.lab] = rule.to_lab([tensors[hf] for hf in rule.hf])
        except RuntimeError as error:
            shapes = ", ".join(f"{hf} {tuple(tensors[hf].shape)}" for hf in rule.hf)
            raise CheckpointError(f"cannot build {rule.lab} from {shapes}: {error}") from None
    return out


def weights_to_hf(
    tensors: dict[str, torch.Tensor], config: Config, model_type: str
) -> dict[str, torch.Tensor]:
    """Lab tensors (tied tensors once) in family ``model_type``'s names and shapes."""
    out = {}
    for rule in _rules(list(tensors), config, FAMILIES[model_type].layout):
        out.update(zip(rule.hf, rule.to_hf(tensors[rule.lab]), strict=True))
    return out


def _rules(
    names: list[str], config: Config, layout: Layout, present: set[str] | None = None
) -> list[_Rule]:
    """One rule for each lab tensor name; ``present`` (the names in a checkpoint being
    read) picks between forms a family's files come in."""
    top = {
        "transformer.wte": layout.base + layout.embed,
        "transformer.wpe": layout.base + layout.wpe,
        "transformer.ln_f": layout.base + layout.final_norm,
        "lm_head": layout.lm_head,
    }
    rules = []
    for name in names:
        stem, _, kind = name.rpartition(".")
        match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", stem)
        if match is None:
            hf = top.get(stem) if stem != "transformer.wpe" or layout.wpe else None
            if not hf:
                raise CheckpointError(f"lab tensor {name} has no Hugging Face counterpart")
            rules.append(_Rule(name, (f"{hf}.{kind}",)))
            continue
        i, local = int(match[1]), match[2]
        prefix = f"{layout.base}{layout.layers}.{i}."
        rules.append(_layer_rule(name, local, kind, prefix, config.for_layer(i), layout, present))
    return rules


def _layer_rule(
    name: str,
    local: str,
    kind: str,
    prefix: str,
    config: Config,
    layout: Layout,
    present: set[str] | None,
) -> _Rule:
    transpose = layout.transposed and kind == "weight"  # (a 1-D norm weight stays as it is)
    single = {
        "norm_1": layout.norm_1, "norm_2": layout.norm_2,
        "post_attention_norm": layout.post_attention_norm, "post_mlp_norm": layout.post_mlp_norm,
        "attn.proj": layout.proj, "attn.norm_q": layout.norm_q, "attn.norm_k": layout.norm_k,
        "mlp.fc_2": layout.fc_2, "mlp.router": layout.router,
        "mlp.shared_experts.fc_2": f"{layout.shared_experts}.{layout.fc_2.rpartition('.')[2]}",
        "mlp.shared_gate": layout.shared_gate,
    }  # fmt: skip
    whole = {"attn.sinks": layout.sinks, "mlp.expert_bias": layout.expert_bias}
    if single.get(local):
        return _Rule(name, (f"{prefix}{single[local]}.{kind}",), transpose=transpose)
    if whole.get(f"{local}.{kind}"):
        return _Rule(name, (f"{prefix}{whole[f'{local}.{kind}']}",))
    if local == "attn.attn":
        q, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
        per_head = (config.n_head, config.head_size) if layout.qkv_per_head else None
        hf = tuple(f"{prefix}{part}.{kind}" for part in layout.qkv)
        return _Rule(name, hf, (q, kv, kv) if len(hf) == 3 else None, per_head, transpose)
    if local == "mlp.fc_1":
        hf = tuple(f"{prefix}{part}.{kind}" for part in layout.fc_1)
        size = config.intermediate_size
        return _Rule(name, hf, (size,) * len(hf) if len(hf) > 1 else None, transpose=transpose)
    if local == "mlp.shared_experts.fc_1":
        size = config.n_shared_expert * (config.moe_intermediate_size or config.intermediate_size)
        parts = (part.rpartition(".")[2] for part in layout.fc_1)
        hf = tuple(f"{prefix}{layout.shared_experts}.{part}.{kind}" for part in parts)
        return _Rule(name, hf, (size,) * len(hf))
    if local == "mlp.experts":
        return _expert_rule(name, kind, prefix, config, layout, present)
    raise CheckpointError(f"lab tensor {name} has no Hugging Face counterpart in this family")


def _expert_rule(
    name: str, kind: str, prefix: str, config: Config, layout: Layout, present: set[str] | None
) -> _Rule:
    """The stacked experts: per-expert tensors (hub files of Mixtral, Qwen-MoE, DeepSeek),
    or stacked ones (transformers >= 5 in memory; GPT-OSS's files, interleaved)."""
    down = kind.startswith("fc_2")
    fused = f"{prefix}{layout.fused_experts[down]}" + ("_bias" if kind.endswith("bias") else "")
    if layout.experts_interleaved:  # GPT-OSS: (E, C, 2I) and (E, I, C), biases (E, 2I), (E, C)
        return _Rule(name, (fused,), transpose=kind in ("fc_1", "fc_2"), interleaved=not down)
    if kind.endswith("bias"):
        raise CheckpointError(f"lab tensor {name} has no Hugging Face counterpart in this family")
    if present is not None and fused in present:  # transformers >= 5's stacked tensors
        return _Rule(name, (fused,))
    size = config.moe_intermediate_size or config.intermediate_size
    parts = layout.expert_fc_1 if kind == "fc_1" else (layout.expert_fc_2,)
    hf = tuple(
        f"{prefix}{layout.experts}.{e}.{part}.weight"
        for e in range(config.n_expert)
        for part in parts
    )
    sizes = (size,) * len(parts) if len(parts) > 1 else None
    return _Rule(name, hf, sizes, experts=config.n_expert)
