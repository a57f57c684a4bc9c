"""The closed forms behind the stock components' figures: parameters, FLOPs and the
bytes autograd saves, derived term by term from ``lab/model.py``, ``lab/moe.py`` and
the fine-tuning modules.

``lab.memory`` and ``lab.flops`` do not use these: they run the model itself on fake
tensors, so any registered component is counted without a formula. This module is the
explanation of what they measure for the stock components (tests check the two agree),
and the fallback for what cannot run without data: a mixture of experts routes by the
values of its inputs, so its layers are counted here, with every token routed (dropless).

Training memory has these parts, all known before anything is allocated::

    parameters       P_all  x bytes(param dtype)
    weight copies    P_mat  x 2          16-bit copies autocast keeps (mixed precision)
    gradients        P_train x bytes(param dtype)
    optimizer state  P_train x states x bytes(state)   AdamW 2, SGD+momentum 1, 8-bit AdamW 2 x 1 B
    activations      what autograd saves for the backward pass, per layer
    logits           (B, T, V) logits and the log-probabilities the loss keeps
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lab import lora
from lab.config import Config

# precision (Lightning's names) -> (parameter dtype, autocast dtype or None): fp32 or bf16
# weights, and under ``*-mixed`` matmuls on 16-bit copies of them.
DTYPES = {
    "32-true": (torch.float32, None),
    "bf16-true": (torch.bfloat16, None),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "16-mixed": (torch.float32, torch.float16),
}
# optimizer -> (states per trainable parameter, bytes per state or None = parameter dtype)
OPTIMIZERS = {"adamw": (2, None), "sgd": (1, None), "adamw8bit": (2, 1), None: (0, None)}
FINETUNE = ("full", "lora", "adapter", "adapter_v2", "none")
# bitsandbytes keeps one fp32 scale per block of 2048 values of each 8-bit state
# (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization").
BLOCKWISE_8BIT = 2048


def choice(name: str, value: object, allowed: Iterable) -> None:
    """``ValueError`` naming the argument unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(allowed)}")


def widths(precision: str) -> tuple[int, int]:
    """(bytes per parameter, bytes per activation in matmuls) of ``precision``."""
    choice("precision", precision, DTYPES)
    param, compute = DTYPES[precision]
    return param.itemsize, (compute or param).itemsize


def optimizer_state(trainable: int, optimizer: str | None, param_bytes: int) -> int:
    """Bytes of the optimizer's state for ``trainable`` parameters: ``adamw`` two states,
    ``sgd`` (with momentum) one, ``adamw8bit`` two of one byte plus an fp32 scale per
    2048 values (bitsandbytes), ``None`` none."""
    choice("optimizer", optimizer, OPTIMIZERS)
    states, state_bytes = OPTIMIZERS[optimizer]
    state = trainable * states * (state_bytes or param_bytes)
    if optimizer == "adamw8bit":
        state += -(-trainable // BLOCKWISE_8BIT) * states * 4
    return state


# --- parameters -----------------------------------------------------------------------------


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


STOCK = {
    "attention_class_name": ("CausalSelfAttention",),
    "mlp_class_name": ("MLP", "GatedMLP", "MoE"),
    "norm_class_name": ("RMSNorm", "LayerNorm"),
    "block_class_name": ("Block",),
}


# Variants the formulas leave out (MoE biases, clamps and gates; attention sinks and
# gates; OLMo 2's norm placement): each field must hold this value (read with a default,
# as older configs lack the fields).
UNCOUNTED = {
    "moe_bias": False, "moe_swiglu_limit": None, "shared_expert_gate": False,
    "attention_sinks": False, "attention_gate": None, "pre_norm": True, "norm_qk_per_head": True,
}  # fmt: skip


def covers(config: Config) -> bool:
    """Whether every layer of ``config`` is built from the stock components these
    formulas describe (not from a registered class of your own, nor an MoE variant in
    ``UNCOUNTED``)."""
    layers = [config.for_layer(i) for i in range(config.n_layer)]
    stock = all(getattr(c, name) in known for c in layers for name, known in STOCK.items())
    plain = all(
        getattr(c, name, value) == value for c in layers for name, value in UNCOUNTED.items()
    )
    return stock and plain


def layer_parameters(config: Config, block_idx: int) -> int:
    """Parameters of block ``block_idx``: the fused QKV ``C (nh + 2 ng) hs`` and output
    ``nh hs C`` projections, the MLP (``2 C H``, gated ``3 C H``, MoE ``E`` times a gated
    expert plus a ``C E`` router), norms and biases."""
    cfg = config.for_layer(block_idx)
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
        choice("finetune", self.method, FINETUNE)
        targets = [self.lora_targets] if isinstance(self.lora_targets, str) else self.lora_targets
        object.__setattr__(self, "lora_targets", tuple(sorted(set(targets))))
        if self.method == "lora" and (not self.lora_targets or set(targets) - set(lora.TARGETS)):
            raise ValueError(
                f"lora_targets={tuple(targets)!r} is not supported: choose a non-empty subset "
                f"of lab.lora.TARGETS {lora.TARGETS} (the fused QKV is 'query', 'key', "
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

    def check(self, config: Config) -> None:
        """``ValueError`` if the method cannot be applied to ``GPT(config)``."""
        adapter = self.method in ("adapter", "adapter_v2")
        if adapter and not 0 <= self.adapter_start_layer < config.n_layer:
            raise ValueError(
                f"adapter_start_layer ({self.adapter_start_layer}) must be a layer index, "
                f"0..{config.n_layer - 1}"
            )
        if self.method == "adapter_v2" or (self.method == "lora" and "mlp" in self.lora_targets):
            what = "finetune='adapter_v2'" if self.method == "adapter_v2" else "'mlp'"
            for i in range(config.n_layer):
                _dense_mlp_linears(config.for_layer(i), i, what)

    def counts(self, config: Config) -> tuple[int, int]:
        """(trainable parameters, parameters the method adds to the model)."""
        self.check(config)
        if self.method in ("full", "none"):
            return (parameter_count(config) if self.method == "full" else 0), 0
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
    bytes_ = _Bytes(*widths(precision))
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


def memory(
    config: Config,
    batch_size: int,
    seq_len: int,
    precision: str = "32-true",
    optimizer: str | None = "adamw",
    activation_checkpointing: bool = False,
    fused_attention: bool = True,
    method: FineTuning | None = None,
) -> dict[str, object]:
    """The parts of ``lab.memory.MemoryBreakdown`` (same names, as a dict) for one
    training step, or with ``method.method == "none"`` for inference with a KV cache of
    ``seq_len`` positions (see ``lab.memory.estimate_memory`` for the options).

    Logits: the ``(B, T, V)`` logits in the compute dtype, and the log-softmax that
    cross-entropy saves (fp32 under autocast); the final norm and the head's input count
    as activations. With ``activation_checkpointing`` each block keeps only its input
    and recomputes one block at a time (Chen et al. 2016). Under autocast, AdapterV2's
    fp32 outputs and the weight copies of frozen layers are counted roughly.
    """
    method = method or FineTuning()
    param_bytes, compute_bytes = widths(precision)
    trainable, added = method.counts(config)
    N, V = batch_size * seq_len, config.padded_vocab_size
    mixed = DTYPES[precision][1] is not None
    result: dict[str, object] = dict(
        parameters=(parameter_count(config) + added) * param_bytes,
        weight_copies=_matmul_weights(config, method) * 2 if mixed else 0,
        trainable_parameters=trainable,
    )
    per_layer = [
        sum(layer_activations(config, i, batch_size, seq_len, precision, fused_attention, method).values())
        for i in range(config.n_layer)
    ]  # fmt: skip
    if method.method == "none":
        kv = sum(2 * batch_size * seq_len * config.for_layer(i).n_query_groups
                 * config.for_layer(i).head_size for i in range(config.n_layer))  # fmt: skip
        return dict(
            result, gradients=0, optimizer_state=0,
            activations=max(per_layer),  # one layer's working set, freed as it goes
            logits=N * V * compute_bytes, kv_cache=kv * param_bytes,
        )  # fmt: skip
    recompute = 0
    if activation_checkpointing:
        recompute = max(per_layer)
        per_layer = [N * config.n_embd * param_bytes if a else 0 for a in per_layer]
    C, r, trains = config.n_embd, method.lora_r, method.method in ("full", "adapter_v2")
    head = _norm_saved(config, N, C, param_bytes, method.input_grad(config.n_layer), trains)
    lora_head = method.method == "lora" and "head" in method.lora_targets
    head += N * C * compute_bytes if method.method == "full" or lora_head else 0  # its input
    head += N * r * compute_bytes if lora_head else 0  # x A^T
    head += N * V * param_bytes if method.method == "adapter_v2" else 0  # kept for its scale
    if config.final_logit_softcapping is not None:
        head += N * V * compute_bytes  # tanh keeps its output
    return dict(
        result,
        gradients=trainable * param_bytes,
        optimizer_state=optimizer_state(trainable, optimizer, param_bytes),
        activations=sum(per_layer) + recompute + head,
        activations_per_layer=tuple(per_layer),
        logits=N * V * (compute_bytes + (4 if mixed else compute_bytes)),
    )


# --- FLOPs ------------------------------------------------------------------------------------


def flops_per_token(config: Config, seq_len: int | None = None, training: bool = False) -> int:
    """Matmul FLOPs per token of a forward pass (``3x`` with ``training``: the backward
    pass computes two matmuls for each of the forward's).

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
