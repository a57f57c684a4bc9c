"""Hugging Face tensors <-> lab tensors: one rule per lab tensor, made from the
family's ``Layout``.

A rule names the Hugging Face tensors a lab tensor is made of and how: transposed
(GPT-2's Conv1D), concatenated along the output dimension (lab's fused QKV and
gate|up), regrouped per head (GPT-NeoX) or stacked per expert (Mixtral, Qwen-MoE,
DeepSeek; or taken stacked as transformers >= 5 holds them). The families of 2025 add
three reorderings: GPT-OSS's experts interleave gate and up rows, DeepSeek's MLA
rotates pairs of rows where lab rotates halves, and Qwen3-Next groups its DeltaNet
projections per key head and its attention gate inside ``q_proj`` per head. The same
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
    # DeepSeek's rotary rows, pairwise in its files, halves in lab: (heads, rows per
    # head, rotary rows at the end of each head)
    rope_rows: tuple[int, int, int] | None = None
    # Qwen3-Next's DeltaNet: each hf tensor's rows come in ``n`` groups (one per key head)
    # of parts (sizes given per tensor); lab holds part by part, each over all groups.
    groups: tuple[int, tuple[tuple[int, ...], ...]] | None = None
    # Qwen3-Next's gated attention: the first hf tensor holds, per head, ``count`` blocks
    # of rows, of which this lab tensor is block ``index``: (n_head, index, count).
    head_block: tuple[int, int, int] | None = None

    def _rope_order(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        heads, rows, rope = self.rope_rows
        order = torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))
        order = order.argsort() if inverse else order
        x = x.reshape(heads, rows, *x.shape[1:]).clone()
        x[:, rows - rope :] = x[:, rows - rope :][:, order]
        return x.reshape(heads * rows, *x.shape[2:])

    def to_lab(self, parts: list[torch.Tensor]) -> torch.Tensor:
        parts = [_transposed(p) if self.transpose else p for p in parts]
        if self.head_block:
            n_head, index, count = self.head_block
            first = parts[0].reshape(n_head, count, -1, *parts[0].shape[1:])[:, index]
            parts = [first.reshape(-1, *parts[0].shape[1:]), *parts[1:]]
        if self.groups:
            n, sizes = self.groups
            parts = [
                piece.reshape(-1, *p.shape[1:])
                for p, split in zip(parts, sizes, strict=True)
                for piece in p.reshape(n, -1, *p.shape[1:]).split(split, dim=1)
            ]
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
        if self.rope_rows:
            x = self._rope_order(x, inverse=False)
        return x.contiguous()

    def to_hf(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.rope_rows:
            x = self._rope_order(x, inverse=True)
        if self.interleaved:
            x = torch.stack(x.chunk(2, dim=1), dim=2).flatten(1, 2)
        if self.per_head:
            n_head, head_size = self.per_head
            x = x.reshape(3, n_head, head_size, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
        rows = list(x.unbind(0)) if self.experts else [x]
        parts = [p for row in rows for p in (row.split(self.sizes) if self.sizes else [row])]
        if self.groups:
            n, sizes = self.groups
            pieces = iter(x.split([n * size for split in sizes for size in split]))
            parts = [
                torch.cat(
                    [next(pieces).reshape(n, -1, *x.shape[1:]) for _ in split], dim=1
                ).reshape(-1, *x.shape[1:])
                for split in sizes
            ]
        return [(_transposed(p) if self.transpose else p).contiguous() for p in parts]


def _transposed(x: torch.Tensor) -> torch.Tensor:
    """The last two dimensions swapped (a 1-D tensor, e.g. GPT-2's norm weight, unchanged)."""
    return x.transpose(-2, -1) if x.ndim > 1 else x


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
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, dict[int, torch.Tensor]] = {}  # per-head blocks of one hf tensor
    for rule in _rules(list(tensors), config, FAMILIES[model_type].layout):
        converted = dict(zip(rule.hf, rule.to_hf(tensors[rule.lab]), strict=True))
        if rule.head_block:
            n_head, index, count = rule.head_block
            first = rule.hf[0]
            blocks.setdefault(first, {})[index] = converted.pop(first)
            if len(blocks[first]) == count:
                parts = [blocks[first][i] for i in range(count)]
                stacked = torch.stack([p.reshape(n_head, -1, *p.shape[1:]) for p in parts], 1)
                out[first] = stacked.reshape(-1, *parts[0].shape[1:])
        out.update(converted)
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
    if local in _MLA:  # DeepSeek's multi-head latent attention
        return _mla_rule(name, local, kind, prefix, config)
    if config.attention_class_name == "GatedDeltaNet" and (local + ".").startswith("attn."):
        return _deltanet_rule(name, local, kind, prefix, config)
    if local == "attn.gate" and config.attention_gate == "elementwise":  # in q_proj (Qwen3-Next)
        return _Rule(name, (f"{prefix}{layout.qkv[0]}.{kind}",), head_block=(config.n_head, 1, 2))
    if single.get(local):
        return _Rule(name, (f"{prefix}{single[local]}.{kind}",), transpose=transpose)
    if whole.get(f"{local}.{kind}"):
        return _Rule(name, (f"{prefix}{whole[f'{local}.{kind}']}",))
    if local == "attn.attn":
        q, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
        per_head = (config.n_head, config.head_size) if layout.qkv_per_head else None
        hf = tuple(f"{prefix}{part}.{kind}" for part in layout.qkv)
        sizes = (q, kv, kv) if len(hf) == 3 else None
        if config.attention_gate == "elementwise":  # q_proj holds [query | gate] per head
            return _Rule(name, hf, sizes, head_block=(config.n_head, 0, 2))
        return _Rule(name, hf, sizes, per_head, transpose)
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


# lab's MLA tensors -> DeepSeek's (under the layer's prefix)
_MLA = {
    "attn.q_proj": "self_attn.q_proj", "attn.q_a_proj": "self_attn.q_a_proj",
    "attn.q_a_norm": "self_attn.q_a_layernorm", "attn.q_b_proj": "self_attn.q_b_proj",
    "attn.kv_a_proj": "self_attn.kv_a_proj_with_mqa", "attn.kv_a_norm": "self_attn.kv_a_layernorm",
    "attn.kv_b_proj": "self_attn.kv_b_proj",
}  # fmt: skip


def _mla_rule(name: str, local: str, kind: str, prefix: str, config: Config) -> _Rule:
    """MLA's projections; the rows that RoPE rotates change order (``rope_interleave``)."""
    sizes = config.mla_sizes()
    rope = sizes["qk_rope_head_dim"]
    rope_rows = None
    if local in ("attn.q_proj", "attn.q_b_proj"):
        rope_rows = (config.n_head, sizes["qk_nope_head_dim"] + rope, rope)
    elif local == "attn.kv_a_proj":
        rope_rows = (1, sizes["kv_lora_rank"] + rope, rope)
    return _Rule(name, (f"{prefix}{_MLA[local]}.{kind}",), rope_rows=rope_rows)


# lab's Gated DeltaNet tensors -> Qwen3-Next's linear attention
_DELTANET = {
    "attn.conv1d": "linear_attn.conv1d", "attn.norm": "linear_attn.norm",
    "attn.proj": "linear_attn.out_proj", "attn.A_log": "linear_attn.A_log",
    "attn.dt_bias": "linear_attn.dt_bias",
}  # fmt: skip


def _deltanet_rule(name: str, local: str, kind: str, prefix: str, config: Config) -> _Rule:
    """Qwen3-Next's linear attention. Its two input projections hold, per key head,
    ``[q | k | v | z]`` and ``[b | a]`` (v, z, b, a for that head's value heads); lab's one
    ``in_proj`` holds ``[q | k | v | z | b | a]``, each over all heads."""
    if local == "attn.in_proj":
        sizes = config.deltanet_sizes()
        nk, dk, dv = sizes["num_key_heads"], sizes["key_head_dim"], sizes["value_head_dim"]
        per_key = sizes["num_value_heads"] // nk
        hf = tuple(f"{prefix}linear_attn.{p}.{kind}" for p in ("in_proj_qkvz", "in_proj_ba"))
        groups = (nk, ((dk, dk, per_key * dv, per_key * dv), (per_key, per_key)))
        return _Rule(name, hf, groups=groups)
    whole = {"attn.A_log", "attn.dt_bias"}
    key = f"{local}.{kind}" if f"{local}.{kind}" in whole else local
    if key not in _DELTANET:
        raise CheckpointError(f"lab tensor {name} has no Hugging Face counterpart in this family")
    suffix = "" if key in whole else f".{kind}"
    return _Rule(name, (f"{prefix}{_DELTANET[key]}{suffix}",))


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
