"""Memory and FLOPs: estimate them from a config, measure them on a model.

Training memory has five parts, and the first question ("will it fit?") needs
them all before anything is allocated::

    parameters       P_all  x bytes(param dtype)
    weight copies    P_mat  x 2          16-bit copies autocast keeps (mixed precision)
    gradients        P_train x bytes(param dtype)
    optimizer state  P_train x states x bytes(state)   AdamW 2, SGD+momentum 1, 8-bit AdamW 2 x 1 B
    activations      what autograd saves for the backward pass, per layer
    logits           (B, T, V) logits and the log-probabilities the loss keeps

``estimate_memory(config, ...)`` computes each part analytically in microseconds;
``measure_memory(model, batch, ...)`` measures the same parts from the tensors
themselves (and, on CUDA, the allocator's peak), so the two can be compared on any
machine. ``flops`` counts FLOPs with PyTorch's counter, ``flops_per_token`` gives
the analytic count, and ``mfu`` turns a step time into model FLOP utilisation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from lab import lora, registry
from lab.config import Config

# precision -> (bytes per parameter, bytes per activation in matmuls), Lightning's names.
PRECISIONS = {"32-true": (4, 4), "bf16-true": (2, 2), "bf16-mixed": (4, 2), "16-mixed": (4, 2)}
# optimizer -> (states per trainable parameter, bytes per state or None = parameter dtype)
OPTIMIZERS = {"adamw": (2, None), "sgd": (1, None), "adamw8bit": (2, 1), None: (0, None)}
FINETUNE = ("full", "lora", "adapter", "adapter_v2", "none")
LORA_TARGETS = lora.TARGETS
# bitsandbytes keeps one fp32 scale per block of 2048 values of each 8-bit state
# (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").
BLOCKWISE_8BIT = 2048


def _choice(name: str, value: object, allowed: Iterable) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


# --- the breakdown ---------------------------------------------------------------------


@dataclass
class MemoryBreakdown:
    """Bytes per component of one training step (or of inference). ``total`` is the
    sum: a step holds its parameters, gradients and optimizer state while the
    activations of the whole forward pass wait for the backward pass. The allocator's
    real peak (``peak``, measured on CUDA) also holds temporaries and fragmentation,
    and gradients of early layers appear only as late activations are freed."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    logits: int
    weight_copies: int = 0
    kv_cache: int = 0
    activations_per_layer: tuple[int, ...] = ()
    peak: int | None = None
    trainable_parameters: int = 0
    notes: str = ""

    COMPONENTS = (
        "parameters", "weight_copies", "gradients", "optimizer_state",
        "activations", "logits", "kv_cache",
    )  # fmt: skip

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self.COMPONENTS)

    def as_dict(self) -> dict[str, int]:
        """Component -> bytes, ``total`` last (what a plot or widget stacks)."""
        return {**{name: getattr(self, name) for name in self.COMPONENTS}, "total": self.total}

    def __repr__(self) -> str:
        rows = [f"{name:<16}{format_bytes(size):>12}" for name, size in self.as_dict().items()]
        if self.peak is not None:
            rows.append(f"{'peak (allocator)':<16}{format_bytes(self.peak):>12}")
        return "MemoryBreakdown(\n  " + "\n  ".join(rows) + "\n)"


COMPONENTS = MemoryBreakdown.COMPONENTS


def format_bytes(size: float) -> str:
    """``1536`` -> ``'1.50 KiB'`` (binary units, as GPU memory is sold and reported)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} B" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# --- parameters, analytically -------------------------------------------------------------


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _norm(config: Config, size: int) -> int:
    return 2 * size if config.norm_class_name == "LayerNorm" else size  # LayerNorm has a bias


def _mlp_linears(config: Config) -> dict[str, tuple[int, int, int]]:
    """name -> (in, out, copies) of the MLP's linear layers; a MoE counts every expert
    (gated, as Mixtral's and DeepSeek's are) plus its router."""
    C = config.n_embd
    if config.mlp_class_name == "MoE":
        H = config.moe_intermediate_size or config.intermediate_size
        experts = config.n_expert + config.n_shared_expert
        return {
            "router": (C, config.n_expert, 1),
            "fc_1": (C, 2 * H, experts),
            "fc_2": (H, C, experts),
        }
    H = config.intermediate_size
    return {"fc_1": (C, 2 * H if config.mlp_class_name == "GatedMLP" else H, 1), "fc_2": (H, C, 1)}


def _attention_linears(config: Config) -> dict[str, tuple[int, int, int]]:
    q, kv = config.n_head * config.head_size, config.n_query_groups * config.head_size
    return {"attn": (config.n_embd, q + 2 * kv, 1), "proj": (q, config.n_embd, 1)}


_KNOWN = {
    "attention_class_name": ("CausalSelfAttention",),
    "mlp_class_name": ("MLP", "GatedMLP", "MoE"),
    "norm_class_name": ("RMSNorm", "LayerNorm"),
    "block_class_name": ("Block",),
}


def _is_known(config: Config) -> bool:
    return all(getattr(config, name) in known for name, known in _KNOWN.items())


def layer_parameters(config: Config, block_idx: int) -> int:
    """Parameters of block ``block_idx``: the fused QKV ``C (nh + 2 ng) hs`` and output
    ``nh hs C`` projections, the MLP (``2 C H``, gated ``3 C H``, MoE ``E`` times a gated
    expert plus a ``C E`` router), norms and biases. A block built from components the
    formula does not know (your registered classes) is built on the meta device and
    counted instead, which allocates nothing."""
    cfg = config.for_layer(block_idx)
    if not _is_known(cfg):
        with torch.device("meta"):
            block = registry.build(cfg.block_class, config, block_idx)
        return sum(p.numel() for p in block.parameters())
    attn_bias = cfg.bias if cfg.attn_bias is None else cfg.attn_bias
    total = _linear(*_attention_linears(cfg)["attn"][:2], attn_bias)
    total += _linear(*_attention_linears(cfg)["proj"][:2], cfg.bias)
    for name, (n_in, n_out, copies) in _mlp_linears(cfg).items():
        total += copies * _linear(n_in, n_out, cfg.bias and name != "router")
    return total + _layer_norm_parameters(cfg)


def parameter_count(config: Config) -> int:
    """All parameters of ``GPT(config)``, tied embeddings counted once."""
    C, V = config.n_embd, config.padded_vocab_size
    total = V * C + _norm(config, C)  # wte, ln_f
    total += 0 if config.tie_embeddings else V * C
    total += V if config.lm_head_bias else 0
    total += config.block_size * C if config.positional == "learned" else 0  # wpe
    return total + sum(layer_parameters(config, i) for i in range(config.n_layer))


def _matmul_weights(config: Config, method: FineTuning) -> int:
    """Parameters of linear layers whose 16-bit copies (autocast, mixed precision) the
    backward pass keeps: a frozen layer's only when its input needs a gradient, so
    from the first trainable block on (its QKV too only if its input or the adapter's
    prefix needs one)."""
    total = 0
    for i in range(config.n_layer):
        if method.input_grad(i) or method.trains_in_layer(i):
            cfg = config.for_layer(i)
            linears = {**_attention_linears(cfg), **_mlp_linears(cfg)}
            if not (method.input_grad(i) or method.prefix(i) or method.method == "adapter_v2"):
                del linears["attn"]
            total += sum(n_in * n_out * copies for n_in, n_out, copies in linears.values())
    head = method.input_grad(config.n_layer)
    return total + config.padded_vocab_size * config.n_embd * head


def _layer_norm_parameters(cfg: Config) -> int:
    """Parameters of a block's norms (RMSNorm on q and k per head, with ``norm_qk``)."""
    norms = 1 + (not cfg.shared_attention_norm) + cfg.post_attention_norm + cfg.post_mlp_norm
    return norms * _norm(cfg, cfg.n_embd) + (2 * cfg.head_size if cfg.norm_qk else 0)


@dataclass(frozen=True)
class FineTuning:
    """What trains, exactly as ``lab.lora``, ``lab.adapter`` and ``lab.adapter_v2`` set
    it up (with their ``mark_only_*_as_trainable``, biases frozen):

    - ``full``: every parameter; ``none``: none (inference).
    - ``lora`` (Hu et al. 2021): ``lora_targets`` are ``lab.lora.TARGETS``. The fused QKV
      gets one pair ``A (r, C)``, ``B (part, r)`` per enabled part (``query`` nh hs,
      ``key`` and ``value`` ng hs rows), so ``r (C + part)`` each; ``projection``,
      each of ``fc_1``/``fc_2`` (``mlp``) and ``lm_head`` (``head``) one pair of
      ``r (n_in + n_out)``.
    - ``adapter`` (LLaMA-Adapter, Zhang et al. 2023): from ``adapter_start_layer`` on,
      ``adapter_prompt_length`` prefix vectors of width C and one gate per head.
    - ``adapter_v2`` (Gao et al. 2023): the adapter's prefixes and gates, a scale and a
      bias per output of every linear layer but the embedding, and every norm.
    """

    method: str = "full"
    lora_r: int = 8
    lora_targets: tuple[str, ...] = lora.DEFAULT_TARGETS
    adapter_prompt_length: int = 10
    adapter_start_layer: int = 2

    def __post_init__(self) -> None:
        _choice("finetune", self.method, FINETUNE)
        targets = [self.lora_targets] if isinstance(self.lora_targets, str) else self.lora_targets
        object.__setattr__(self, "lora_targets", tuple(sorted(set(targets))))
        if self.method == "lora" and (not self.lora_targets or set(targets) - set(LORA_TARGETS)):
            raise ValueError(
                f"lora_targets={tuple(targets)!r} is not supported: choose a non-empty subset "
                f"of lab.lora.TARGETS {LORA_TARGETS} (the fused QKV is 'query', 'key', "
                "'value'; 'mlp' is fc_1 and fc_2; 'head' is lm_head)"
            )
        for name in ("lora_r", "adapter_prompt_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")

    def prefix(self, block_idx: int) -> bool:
        """Whether block ``block_idx`` has the adapter's gated prefix."""
        return self.method in ("adapter", "adapter_v2") and block_idx >= self.adapter_start_layer

    def trains_in_layer(self, block_idx: int) -> bool:
        """Whether block ``block_idx`` holds a trainable parameter."""
        if self.method == "lora":
            return bool(set(self.lora_targets) - {"head"})
        if self.method == "adapter":
            return self.prefix(block_idx)
        return self.method in ("full", "adapter_v2")

    def input_grad(self, block_idx: int) -> bool:
        """Whether the residual stream entering block ``block_idx`` (``n_layer``: the
        final norm) needs a gradient: always when the embedding trains, else only
        after a block that trains. Before that, frozen layers save nothing. ``none``
        counts as if it did: one layer's working set."""
        if self.method in ("full", "none"):
            return True
        return any(self.trains_in_layer(i) for i in range(block_idx))

    def counts(self, config: Config) -> tuple[int, int]:
        """(trainable parameters, parameters the method adds to the model)."""
        if self.method in ("full", "none"):
            return (parameter_count(config) if self.method == "full" else 0), 0
        if self.method != "lora" and not 0 <= self.adapter_start_layer < config.n_layer:
            raise ValueError(
                f"adapter_start_layer ({self.adapter_start_layer}) must be a layer index, "
                f"0..{config.n_layer - 1}"
            )
        r, C, targets = self.lora_r, config.n_embd, set(self.lora_targets)
        v2 = self.method == "adapter_v2"
        added, norms = 0, _norm(config, C) if v2 else 0  # ln_f
        for i in range(config.n_layer):
            cfg = config.for_layer(i)
            Q, K = cfg.n_head * cfg.head_size, cfg.n_query_groups * cfg.head_size
            added += self.adapter_prompt_length * C + cfg.n_head if self.prefix(i) else 0
            if v2 or "mlp" in targets:
                mlp = _dense_mlp_linears(cfg, i, "finetune='adapter_v2'" if v2 else "'mlp'")
            if self.method == "lora":
                parts = {"query": Q, "key": K, "value": K}
                added += sum(r * (C + size) for name, size in parts.items() if name in targets)
                added += r * (Q + C) if "projection" in targets else 0
                added += sum(r * (n_in + n_out) for n_in, n_out in mlp) if "mlp" in targets else 0
            elif v2:  # a scale and a bias per output of QKV, proj, fc_1, fc_2
                added += 2 * (Q + 2 * K + C + sum(n_out for _, n_out in mlp))
                norms += _layer_norm_parameters(cfg)
        V = config.padded_vocab_size
        added += r * (C + V) if self.method == "lora" and "head" in targets else 0
        added += 2 * V if v2 else 0
        return added + norms, added


def _dense_mlp_linears(cfg: Config, block_idx: int, what: str) -> list[tuple[int, int]]:
    """(in, out) of ``fc_1`` and ``fc_2``; a MoE has none (as ``lab.lora`` refuses it)."""
    if cfg.mlp_class_name == "MoE":
        raise ValueError(
            f"layer {block_idx}'s MoE has no fc_1/fc_2 linear layers for {what}; "
            "drop 'mlp' from lora_targets (AdapterV2 needs a dense MLP)"
        )
    return [(n_in, n_out) for n_in, n_out, _ in _mlp_linears(cfg).values()]


def trainable_parameters(
    config: Config,
    finetune: str = "full",
    lora_r: int = 8,
    lora_targets: Iterable[str] = lora.DEFAULT_TARGETS,
    adapter_prompt_length: int = 10,
    adapter_start_layer: int = 2,
) -> int:
    """Parameters that get gradients and optimizer state after ``finetune`` is set up
    (see ``FineTuning``): equal to the count of ``requires_grad`` parameters of a model
    after ``apply_lora`` + ``mark_only_lora_as_trainable`` (``apply_adapter`` or
    ``apply_adapter_v2`` + ``mark_only_adapter_as_trainable``) with these settings."""
    method = FineTuning(finetune, lora_r, lora_targets, adapter_prompt_length, adapter_start_layer)
    return method.counts(config)[0]


# --- activations, analytically --------------------------------------------------------------


@dataclass
class _Bytes:
    """Byte widths of the tensors of a step: ``param``, ``compute`` (matmul inputs and
    outputs), ``residual`` (the residual stream: fp32 under autocast)."""

    param: int
    compute: int

    @property
    def residual(self) -> int:
        return self.param


def _norm_saved(
    cfg: Config, rows: int, size: int, input_bytes: int, grad: bool, trains: bool
) -> int:
    """Bytes a norm saves when its input needs a gradient (``grad``) or its weight
    trains; ``input_bytes`` 0 when its input is saved elsewhere."""
    if not (grad or trains):
        return 0
    if cfg.norm_class_name == "LayerNorm":
        return rows * size * input_bytes + 8 * rows  # input, fp32 mean and rstd
    # RMSNorm: x.float() (x itself when fp32) and rsqrt for the input's gradient,
    # the normed value for the weight's.
    fp32_input = 4 if input_bytes and grad else 0
    return rows * size * (fp32_input + 4 * trains) + 4 * rows * grad


def layer_activations(
    config: Config,
    block_idx: int,
    batch_size: int,
    seq_len: int,
    precision: str = "32-true",
    fused_attention: bool = True,
    finetune: str | FineTuning = "full",
) -> dict[str, int]:
    """Bytes autograd saves for the backward pass of one block, by tensor.

    The method is Korthikanti et al. (2022, "Reducing Activation Recomputation in
    Large Transformer Models", section 4.1): list every tensor an operation saves
    and add up their sizes. Their total, ``s b h (34 + 5 a s / h)`` bytes in 16 bit,
    is for Megatron's GPT with dropout; this model has no dropout and differs in
    detail, so the terms below are read off ``lab/model.py`` (N = B T tokens, C width,
    Q = nh hs, K = ng hs, H hidden, all in elements x bytes):

    - a norm saves its input (RMSNorm computes in fp32 and also saves the normed
      value when its weight trains; LayerNorm saves the input only), ``2 N C`` / ``N C``;
    - a linear layer saves its input when its weight trains (or a LoRA adapter
      reads it): ``N C`` for ``attn`` and ``fc_1``; ``proj`` reads the attention output;
    - attention keeps the fused ``N (Q + 2K)`` QKV output (v is a view of it), new q
      and k when RoPE or QK-norm made them (``N (Q + K)``), the output ``N Q`` and
      fp32 log-sum-exp ``B nh T``. Fused SDPA never stores the ``T x T`` scores; the
      materialised path (``fused_attention=False``, soft-capping, ALiBi) keeps the
      fp32 softmax, its cast and a capped copy, ``B nh T S`` each, and the keys and
      values expanded to every head. A sliding window adds its ``T x S`` mask;
    - MLP: ``fc_1`` output and activation output, ``2 N H``; gated: ``[gate|up]``,
      act(gate) and the product, ``4 N H``; MoE: routed tokens ``N k`` go through a
      gated expert each, plus the router's ``N E`` probabilities, indices, and the
      gathered inputs, outputs and gated outputs ``3 N k C``.

    ``finetune`` (a method name or a ``FineTuning``) decides what is kept, as in the
    modules of ``lab.lora``/``lab.adapter``/``lab.adapter_v2``: a frozen layer keeps
    no input, and an operation none of whose inputs needs a gradient keeps nothing,
    so blocks before the first trainable one save nothing at all. LoRA adds its
    input and ``N r`` per pair (``x A^T``); the adapter's prefix attention a copy of
    q, the gated prefix output (``2 N Q``), the ``B nh T P`` fp32 softmax (and its
    16-bit cast) and the prefix keys and values expanded to the batch; AdapterV2
    also every linear layer's output (for its scale; fp32 under autocast, where the
    fp32 bias promotes it) and each norm's normed value.
    """
    ft = finetune if isinstance(finetune, FineTuning) else FineTuning(finetune)
    cfg = config.for_layer(block_idx)
    bytes_ = _Bytes(*PRECISIONS[precision])
    N, C, T = batch_size * seq_len, cfg.n_embd, seq_len
    nh, hs, width = cfg.n_head, cfg.head_size, bytes_.compute
    Q, K = nh * hs, cfg.n_query_groups * hs
    full, v2 = ft.method == "full", ft.method == "adapter_v2"
    adapted = set(ft.lora_targets) if ft.method == "lora" else set()
    qkv_adapted = len(adapted & {"query", "key", "value"})
    norms_train = full or v2
    prefix = ft.prefix(block_idx)

    def norm(rows: int, size: int, input_bytes: int, grad: bool) -> int:
        return _norm_saved(cfg, rows, size, input_bytes, grad, norms_train)

    grad = ft.input_grad(block_idx)
    terms = {"norm_1": norm(N, C, bytes_.residual, grad)}
    qkv_grad = grad or norms_train or qkv_adapted > 0 or v2  # the fused QKV output's
    terms["attn_input"] = N * C * width if full or qkv_adapted else 0
    lora_hidden = N * ft.lora_r * width * qkv_adapted  # x A^T of each adapted part
    materialised = not fused_attention or cfg.attention_logit_softcapping is not None
    if cfg.norm_qk:
        # q and k are views of the QKV output: only a 16-bit one is copied to fp32
        input_bytes = 0 if width == 4 else width
        terms["norm_qk"] = norm(N * nh, hs, input_bytes, qkv_grad) + norm(
            N * K // hs, hs, input_bytes, qkv_grad
        )
    if qkv_grad and cfg.positional == "rope":
        terms["rope_cos_sin"] = 2 * T * cfg.rope_n_elem * width
    if qkv_grad and cfg.positional == "alibi":  # approximate: the kernel keeps the bias
        terms["alibi_bias"] = nh * T * T * width
    if qkv_grad and materialised:
        # q @ k^T and weights @ v save contiguous copies of q and of k, v expanded to
        # every head; then the fp32 softmax, its 16-bit cast, the capped scores' tanh
        # and the bool causal mask. The QKV output itself is freed (unless an fp32
        # QK-norm keeps a view of it).
        if cfg.norm_qk and width == 4:
            terms["qkv"] = N * (Q + 2 * K) * width
        terms["q_k_v"] = (N * Q + 2 * batch_size * nh * T * hs) * width
        scores = 4 + (width if width != 4 else 0)
        scores += width if cfg.attention_logit_softcapping is not None else 0
        terms["attention_scores"] = batch_size * nh * T * T * scores + T * T
    elif qkv_grad:
        # SDPA saves q, k, v (views of the QKV output unless RoPE or QK-norm made new
        # q and k), its output and the fp32 log-sum-exp; a sliding window its mask.
        terms["qkv"] = N * (Q + 2 * K) * width
        if cfg.positional == "rope" or cfg.norm_qk:
            terms["q_k"] = N * (Q + K) * width
        terms["attention_lse"] = batch_size * nh * T * 4
        if cfg.sliding_window_size is not None:
            terms["mask"] = T * T * width
    # The fused kernel keeps its output, which is also proj's input unless the prefix
    # term was added to it or the materialised path copied it.
    proj_keeps = full or "projection" in adapted
    kernel_output = qkv_grad and not materialised
    separate = materialised or prefix or not kernel_output
    terms["attention_output"] = N * Q * width * (kernel_output + (proj_keeps and separate))
    lora_hidden += N * ft.lora_r * width if "projection" in adapted else 0
    if prefix:
        P = ft.adapter_prompt_length
        cast = width if width != 4 else 0
        capped = width if cfg.attention_logit_softcapping is not None else 0
        terms["adapter_prefix"] = (
            2 * N * Q * width  # q copied for q ak^T, and the prefix output the gate scales
            + batch_size * nh * T * P * (4 + cast + capped)  # fp32 softmax, cast, tanh
            + batch_size * nh * P * hs * width * (1 + qkv_grad)  # av (and ak) expanded
        )
    attention_grad = qkv_grad or prefix or proj_keeps or v2  # the attention branch output's
    if cfg.post_attention_norm:  # Gemma 2's sandwich norms, on each branch's output
        terms["post_attention_norm"] = norm(N, C, width, attention_grad)
    mlp_grad = grad if cfg.parallel_residual else grad or attention_grad  # norm_2's input
    if not cfg.shared_attention_norm:
        # Parallel branches normalise the same x: its saved copy is shared when fp32.
        shared = cfg.parallel_residual and (
            bytes_.residual == 4 or cfg.norm_class_name == "LayerNorm"
        )
        terms["norm_2"] = norm(N, C, 0 if shared else bytes_.residual, mlp_grad)
    keeps_mlp = full or "mlp" in adapted
    terms["mlp_input"] = N * C * width if keeps_mlp else 0
    lora_hidden += 2 * N * ft.lora_r * width if "mlp" in adapted else 0
    mlp_grad = mlp_grad or norms_train or keeps_mlp  # fc_1's output
    if mlp_grad:
        terms.update(_mlp_activations(cfg, N, width, keeps_mlp))
    if cfg.post_mlp_norm:
        terms["post_mlp_norm"] = norm(N, C, width, mlp_grad)
    if adapted:
        terms["lora"] = lora_hidden
    if v2:  # each linear layer's output, kept for its scale
        fc_1 = _mlp_linears(cfg)["fc_1"][1]
        terms["adapter_v2_outputs"] = N * (Q + 2 * K + C + fc_1 + C) * bytes_.param
    return terms


def _mlp_activations(cfg: Config, N: int, width: int, keeps_fc_2: bool) -> dict[str, int]:
    if cfg.mlp_class_name == "MoE":
        H = cfg.moe_intermediate_size or cfg.intermediate_size
        M = N * cfg.n_expert_per_token  # routed (token, expert) pairs, dropless
        return {
            # fp32 probabilities (N, E); top-k gates and indices; sort and gather indices
            "router": N * cfg.n_expert * 4 + N * cfg.n_expert_per_token * 12 + M * 20,
            # gathered inputs, concatenated outputs, gate-weighted outputs (M, C)
            "dispatch": 3 * M * cfg.n_embd * width,
            "experts": M * H * width * (3 + keeps_fc_2),
            "shared_experts": N * cfg.n_shared_expert * H * width * (3 + keeps_fc_2),
        }
    H = cfg.intermediate_size
    if cfg.mlp_class_name == "GatedMLP":
        return {"mlp_hidden": N * H * width * (3 + keeps_fc_2)}
    return {"mlp_hidden": N * H * width * (1 + keeps_fc_2)}


def estimate_memory(
    config: Config,
    batch_size: int,
    seq_len: int | None = None,
    precision: str = "32-true",
    optimizer: str | None = "adamw",
    activation_checkpointing: bool = False,
    finetune: str = "full",
    fused_attention: bool = True,
    lora_r: int = 8,
    lora_targets: Iterable[str] = lora.DEFAULT_TARGETS,
    adapter_prompt_length: int = 10,
    adapter_start_layer: int = 2,
) -> MemoryBreakdown:
    """Memory of one training step (or, with ``finetune="none"``, of inference with a
    KV cache of ``seq_len`` positions), from the config alone.

    - ``precision`` (Lightning's names): ``32-true`` keeps everything in fp32;
      ``bf16-true`` everything in bf16 (optimizer state too); ``bf16-mixed`` and
      ``16-mixed`` keep fp32 weights, gradients and state, run matmuls on 16-bit copies
      of the weights (``weight_copies``, kept by autocast for the step) and save
      16-bit activations, while the residual stream and norms stay fp32.
    - ``optimizer``: ``adamw`` keeps two states per trainable parameter, ``sgd`` (with
      momentum) one, ``adamw8bit`` two of one byte plus an fp32 scale per 2048 values
      (bitsandbytes), ``None`` none.
    - ``activation_checkpointing``: each block keeps only its input, and recomputes
      one block at a time during the backward pass (Chen et al. 2016), so the
      activations are ``n_layer`` residual streams plus the largest block.
    - ``finetune``: ``full``, ``lora`` (``lora_r``, ``lora_targets``: ``lab.lora``'s
      names and default), ``adapter`` or ``adapter_v2`` (``adapter_prompt_length``,
      ``adapter_start_layer``), ``none``; counted as ``lab.lora``/``lab.adapter``/
      ``lab.adapter_v2`` build them (see ``FineTuning``). Frozen weights need no
      gradients or state, and frozen layers keep less (see ``layer_activations``).

    Logits: the ``(B, T, V)`` logits in the compute dtype, and the log-softmax that
    cross-entropy saves (fp32 under autocast); the final norm and the head's input count as
    activations. Approximations: temporaries of the backward pass (a layer's
    gradients in flight) are not counted; under autocast, AdapterV2's fp32 outputs
    and the weight copies of frozen layers are counted roughly.
    """
    _choice("precision", precision, PRECISIONS)
    _choice("optimizer", optimizer, OPTIMIZERS)
    method = FineTuning(finetune, lora_r, lora_targets, adapter_prompt_length, adapter_start_layer)
    seq_len = seq_len or config.block_size
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be a positive integer")
    param_bytes, compute_bytes = PRECISIONS[precision]
    trainable, added = method.counts(config)
    N, V = batch_size * seq_len, config.padded_vocab_size
    mixed = precision.endswith("mixed")
    result = dict(
        parameters=(parameter_count(config) + added) * param_bytes,
        weight_copies=_matmul_weights(config, method) * 2 if mixed else 0,
        trainable_parameters=trainable,
    )
    per_layer = [
        sum(layer_activations(config, i, batch_size, seq_len, precision, fused_attention, method).values())
        for i in range(config.n_layer)
    ]  # fmt: skip
    if finetune == "none":
        kv = sum(2 * batch_size * seq_len * config.for_layer(i).n_query_groups
                 * config.for_layer(i).head_size for i in range(config.n_layer))  # fmt: skip
        return MemoryBreakdown(
            **result, gradients=0, optimizer_state=0,
            activations=max(per_layer),  # one layer's working set, freed as it goes
            activations_per_layer=(), logits=N * V * compute_bytes, kv_cache=kv * param_bytes,
            notes="inference: activations are the working set of one layer",
        )  # fmt: skip
    recompute = 0
    if activation_checkpointing:
        recompute = max(per_layer)
        per_layer = [N * config.n_embd * param_bytes if a else 0 for a in per_layer]
    C, r, trains = config.n_embd, method.lora_r, finetune in ("full", "adapter_v2")
    head = _norm_saved(config, N, C, param_bytes, method.input_grad(config.n_layer), trains)
    lora_head = finetune == "lora" and "head" in method.lora_targets
    head += N * C * compute_bytes if finetune == "full" or lora_head else 0  # its input
    head += N * r * compute_bytes if lora_head else 0  # x A^T
    head += N * V * param_bytes if finetune == "adapter_v2" else 0  # kept for its scale
    if config.final_logit_softcapping is not None:
        head += N * V * compute_bytes  # tanh keeps its output
    states, state_bytes = OPTIMIZERS[optimizer]
    state = trainable * states * (state_bytes or param_bytes)
    if optimizer == "adamw8bit":
        state += -(-trainable // BLOCKWISE_8BIT) * states * 4
    return MemoryBreakdown(
        **result,
        gradients=trainable * param_bytes,
        optimizer_state=state,
        activations=sum(per_layer) + recompute + head,
        activations_per_layer=tuple(per_layer),
        logits=N * V * (compute_bytes + (4 if mixed else compute_bytes)),
    )


# --- measurement ----------------------------------------------------------------------------


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights counted once)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


class _SavedTensors:
    """Records, by bucket, the storages autograd saves for backward (through
    ``torch.autograd.graph.saved_tensors_hooks``). Parameters and the inputs are not
    activations; 16-bit copies of weights that autocast makes go to ``weight_copies``."""

    def __init__(self, model: nn.Module, excluded: Iterable[torch.Tensor], autocast: bool) -> None:
        self.autocast = autocast  # asked up front: autocast's own kernels turn it off inside
        self.excluded = {t.untyped_storage().data_ptr() for t in excluded}
        self.param_shapes = {tuple(p.shape) for p in model.parameters()}
        self.buckets: dict[str, dict[int, int]] = {}
        self.bucket = "other"

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.excluded and storage.device.type != "meta":
            bucket = "weight_copies" if self._is_weight_copy(t) else self.bucket
            if not any(ptr in seen for seen in self.buckets.values()):
                self.buckets.setdefault(bucket, {})[ptr] = storage.nbytes()
        return t

    def _is_weight_copy(self, t: torch.Tensor) -> bool:
        t = t if t._base is None else t._base  # linear layers save weight.t(), a view
        node = t.grad_fn
        if node is not None and node.name() == "ToCopyBackward0":
            source = node.next_functions[0][0]
            return source is not None and hasattr(source, "variable")  # AccumulateGrad
        # a frozen weight's autocast copy: 16-bit, no history, a parameter's shape
        return (
            node is None
            and self.autocast
            and t.dtype in (torch.bfloat16, torch.float16)
            and tuple(t.shape) in self.param_shapes
        )

    def total(self, bucket: str) -> int:
        return sum(self.buckets.get(bucket, {}).values())

    def enter(self, bucket: str) -> Callable:
        def hook(*_: object) -> None:
            self.bucket = bucket

        return hook


def _make_optimizer(name: str | None, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
    _choice("optimizer", name, OPTIMIZERS)
    if name is None or not params:
        return None
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError(
            "optimizer='adamw8bit' needs bitsandbytes: pip install bitsandbytes"
        ) from error
    return bnb.optim.AdamW8bit(params, lr=1e-4)


def measure_memory(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: str | torch.optim.Optimizer | None = "adamw",
    precision: str = "32-true",
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    memory_history: str | Path | None = None,
) -> MemoryBreakdown:
    """Run one training step of ``model`` on ``batch = (x, y)`` and measure what
    ``estimate_memory`` estimates, from the tensors themselves:

    - parameters, gradients and optimizer state: bytes of the distinct storages of
      ``model.parameters()``, their ``.grad`` and the optimizer's state after a step;
      trainable parameters are those with ``requires_grad`` (freeze for LoRA first);
    - activations: every tensor autograd saves for backward during the forward pass
      (``saved_tensors_hooks``), per block of ``model.transformer.h`` when the model
      has them; ``logits`` is the logits tensor plus what the loss saves;
    - on CUDA also ``peak``: the allocator's ``max_memory_allocated`` over the step,
      and with ``memory_history`` a snapshot of every allocation written to that
      pickle file (drag it onto https://pytorch.org/memory_viz).

    ``precision`` ``*-mixed`` runs the forward pass under ``torch.autocast``; for
    ``*-true`` convert the model first (``model.to(torch.bfloat16)``). ``optimizer``
    is a name (as for ``estimate_memory``; ``sgd`` with momentum) or an optimizer
    over the model's trainable parameters. The model's gradients are cleared after.
    """
    _choice("precision", precision, PRECISIONS)
    x, y = batch
    params = list(model.parameters())
    device = params[0].device
    trainable = [p for p in params if p.requires_grad]
    if precision.endswith("true"):
        want = {"32-true": torch.float32, "bf16-true": torch.bfloat16}[precision]
        if any(p.dtype != want for p in params):
            raise ValueError(
                f"precision={precision!r} needs a {want} model; call model.to({want}) first "
                "or use a mixed precision"
            )
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = _make_optimizer(optimizer, trainable)
    loss_fn = loss_fn or (lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        if memory_history is not None:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
    autocast = (
        torch.autocast(
            device.type, dtype=torch.float16 if precision == "16-mixed" else torch.bfloat16
        )
        if precision.endswith("mixed")
        else nullcontext()
    )
    saved = _SavedTensors(model, [*params, x, y], precision.endswith("mixed"))
    blocks = list(getattr(getattr(model, "transformer", None), "h", []))
    handles = [b.register_forward_pre_hook(saved.enter(f"layer{i}")) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(saved.enter("other")) for b in blocks]
    try:
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), autocast:
            logits = model(x)
            saved.bucket = "loss"
            loss = loss_fn(logits, y)
        loss.backward()
        gradients = _storage_bytes(p.grad for p in params if p.grad is not None)
        if optimizer is not None:
            optimizer.step()
        if cuda:
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            if memory_history is not None:
                torch.cuda.memory._dump_snapshot(str(memory_history))
        else:
            peak = None
    finally:
        for handle in handles:
            handle.remove()
        if cuda and memory_history is not None:
            torch.cuda.memory._record_memory_history(enabled=None)
    state = [] if optimizer is None else optimizer.state.values()
    result = MemoryBreakdown(
        parameters=_storage_bytes(params),
        weight_copies=saved.total("weight_copies"),
        gradients=gradients,
        optimizer_state=_storage_bytes(
            t for s in state for t in s.values() if isinstance(t, torch.Tensor)
        ),
        activations=sum(saved.total(f"layer{i}") for i in range(len(blocks)))
        + saved.total("other"),
        activations_per_layer=tuple(saved.total(f"layer{i}") for i in range(len(blocks))),
        logits=logits.untyped_storage().nbytes() + saved.total("loss"),
        peak=peak,
        trainable_parameters=sum(p.numel() for p in trainable),
    )
    model.zero_grad(set_to_none=True)
    return result


# --- FLOPs ------------------------------------------------------------------------------------


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
    # FlopCounterMode names modules "GPT.transformer.h.0" plus a "Global" total; the
    # root ("GPT") becomes "", the rest their paths in named_modules().
    by_module = {
        name.partition(".")[2]: sum(ops.values())
        for name, ops in counter.get_flop_counts().items()
        if name != "Global"
    }
    forward = counter.get_total_flops()
    backward_flops = 0
    if backward:
        with FlopCounterMode(display=False) as counter:
            logits.float().sum().backward()
        backward_flops = counter.get_total_flops()
        model.zero_grad(set_to_none=True)
    return FlopCount(forward, backward_flops, by_module)


def flops_per_token(config: Config, seq_len: int | None = None, training: bool = False) -> int:
    """Analytic matmul FLOPs per token of a forward pass (``3x`` with ``training``:
    the backward pass computes two matmuls for each of the forward's).

    ``2 x`` (multiply-adds of every matmul weight: QKV, projection, MLP, the experts a
    token is routed to, router, lm_head) ``+ 4 nh hs T`` per layer for attention
    (``q k^T`` and ``attention @ v`` over ``T`` keys). This is the accounting of
    Kaplan et al. (2020) and PaLM (Chowdhery et al. 2022, appendix B: ``6 N + 12 L H Q T``
    for training); like PyTorch's counter it counts all ``T`` keys, although causal
    attention needs only half of them, and the embedding lookup costs nothing.
    """
    T = seq_len or config.block_size
    total = 2 * config.n_embd * config.padded_vocab_size  # lm_head
    for i in range(config.n_layer):
        cfg = config.for_layer(i)
        for name, (n_in, n_out, copies) in {**_attention_linears(cfg), **_mlp_linears(cfg)}.items():
            if cfg.mlp_class_name == "MoE" and name in ("fc_1", "fc_2"):
                copies = cfg.n_expert_per_token + cfg.n_shared_expert  # routed experts only
            total += 2 * n_in * n_out * copies
        total += 4 * cfg.n_head * cfg.head_size * T
    return 3 * total if training else total


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
