"""Mixture of experts: a feed-forward layer where each token uses only a few experts.

``mlp_class_name="MoE"`` puts it in every block; ``layer_overrides`` mixes it with
dense layers (``{0: {"mlp_class_name": "GatedMLP"}}`` keeps the first layer dense,
as DeepSeek-V3 does)::

    x (N, C) --router--> logits (N, E) --routing--> (expert, token, gate) assignments
      --sort by expert--> x[tokens] grouped: [ e0 e0 e0 | e1 | e2 e2 | ... ]
      --expert e on its contiguous slice--> y * gate --index_add by token--> out (N, C)
      (+ shared experts on every token)

Routers (``config.router``):

* ``"topk_softmax"`` (Mixtral): the k largest logits, softmax over those k. Equal to
  Hugging Face Mixtral's softmax over all experts, top-k, renormalised.
* ``"softmax_topk"`` (Switch, Qwen2-MoE with ``norm_topk_prob=False``, DeepSeek-V2):
  softmax over all experts, then the k largest probabilities as gates, *not*
  renormalised (so the gates of a token sum to less than 1).
* ``"sigmoid_bias"`` (DeepSeek-V3, auxiliary-loss-free balancing, Wang et al. 2024):
  scores ``s = sigmoid(logits)``; experts are *selected* by ``s + expert_bias`` but
  gated by ``s`` alone, renormalised over the k chosen. ``expert_bias`` is a buffer,
  not trained by gradients: after every forward pass in training mode it moves by
  ``bias_update_rate`` towards balance, ``b_i += rate * sign(mean_load - load_i)``.
  With ``moe_n_group > 1`` the choice is group-limited as in DeepSeek-V3: experts form
  ``moe_n_group`` groups, each scored by the sum of its two best biased scores, and a
  token picks its k experts within its ``moe_topk_group`` best groups.
* ``"expert_choice"`` (Zhou et al. 2022): each expert picks its
  ``ceil(capacity_factor * N * k / E)`` highest-scoring tokens (softmax over experts)
  out of all N tokens in the batch. **Not causal**: whether a token is chosen depends
  on the other tokens of the batch, later positions included, so a model trained this
  way sees the future through routing and decodes differently from a full forward.

Qwen3-MoE's renormalised top-k (softmax over all experts, top k, divided by their
sum) equals ``"topk_softmax"``. ``moe_routed_scaling`` multiplies every routed gate
(DeepSeek-V3's ``routed_scaling_factor``).

Capacity (``moe_capacity_factor``, None = dropless): token-choice routers let each
expert take at most ``ceil(factor * N * k / E)`` assignments; first choices of all
tokens come before any second choice, earlier tokens first (GShard's priority). A
dropped assignment contributes zero; the token still passes through the residual
connection (and the shared experts).

Losses (computed in training mode; ``auxiliary_loss(model)`` sums them for the
training loop, which adds the sum to the language-model loss):

* load balancing (Fedus et al. 2021, Switch eq. 4-6, as Hugging Face computes it):
  ``E * sum_i f_i * P_i``, ``f_i`` the fraction of tokens that selected expert i
  (summing to k over experts, counted before capacity dropping) and ``P_i`` the mean
  router probability of expert i (softmax, or sigmoid scores normalised per token).
  Its minimum, at uniform routing, is k. Weighted by ``moe_aux_loss_coef``.
* router z-loss (Zoph et al. 2022, ST-MoE eq. 5): ``mean_tokens(logsumexp(logits)^2)``,
  keeping logits small. Weighted by ``moe_z_loss_coef``.

Weights: ``router`` is ``Linear(n_embd, n_expert, bias=False)``; experts are stacked,
``experts.fc_1`` (E, 2 * I, C) = ``[gate | up]`` per expert (like ``GatedMLP.fc_1``)
and ``experts.fc_2`` (E, C, I), I = ``moe_intermediate_size``; shared experts are one
``GatedMLP`` of width ``n_shared_expert * I`` (equal to that many separate experts
summed, as in DeepSeekMoE); ``shared_expert_gate=True`` scales their output by
``sigmoid(shared_gate(x))`` per token (Qwen2-MoE, Qwen3-Next). Experts have no biases,
except with ``moe_bias=True`` (GPT-OSS): the router and both expert projections get
biases (``experts.fc_1_bias`` (E, 2I), ``experts.fc_2_bias`` (E, C)).
``moe_swiglu_limit`` selects GPT-OSS's clamped SwiGLU for the experts:
``(clamp(up, -l, l) + 1) * g * sigmoid(1.702 g)`` with ``g = clamp(gate, max=l)``.

Hugging Face Mixtral mapping (layer ``l``; ``lab`` names relative to
``transformer.h.{l}.mlp``):

==========================================  =============================  =============
transformers >= 5 in memory                 hub checkpoint (safetensors)   lab
==========================================  =============================  =============
``model.layers.l.mlp.gate.weight`` (E, C)   ``...block_sparse_moe.gate``   ``router.weight``
``...mlp.experts.gate_up_proj`` (E, 2I, C)  ``experts.e.w1`` / ``w3``      ``experts.fc_1``
``...mlp.experts.down_proj`` (E, C, I)      ``experts.e.w2``               ``experts.fc_2``
==========================================  =============================  =============

transformers 5 tensors copy unchanged; ``lab.hf.weights`` stacks hub per-expert tensors.

Fused experts: ``fuse_experts(model)`` switches every layer's experts to a path with
one compiled kernel per expert and direction for the GLU, the gate and their
gradients (same results; faster training, see ``benchmarks/README.md``); it is off by
default, and an outer ``torch.compile`` runs it without recompiling.

Routing records: set ``layer.record_routing = True`` (or use ``routing_records(model)``)
and each forward pass keeps a ``RoutingRecord`` of the last batch in ``layer.routing``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lab import registry
from lab.config import Config
from lab.model import GatedMLP
from lab.params import model_device


@dataclass
class RoutingRecord:
    """What one MoE layer did with the last batch (tensors detached; B, T, E, k).

    ``expert_indices`` and ``gate_weights`` are None for expert-choice routing, where
    a token may be taken by any number of experts; the dense tensors cover every router.
    """

    expert_indices: torch.Tensor | None  # (B, T, k) experts each token selected
    gate_weights: torch.Tensor | None  # (B, T, k) their gates, before dropping
    combine_weights: torch.Tensor  # (B, T, E) weight of each expert's output actually used
    router_probs: torch.Tensor  # (B, T, E) softmax, or sigmoid scores normalised per token
    load: torch.Tensor  # (E,) tokens each expert processed
    dropped: torch.Tensor  # (B, T, E) selected by the router but over capacity
    aux_losses: dict[str, torch.Tensor]  # "load_balancing", "z": unweighted

    @property
    def dropped_tokens(self) -> torch.Tensor:
        """(B, T) bool: tokens no routed expert processed (only the residual and the
        shared experts carry them)."""
        return ~(self.combine_weights > 0).any(dim=-1)


@dataclass
class Dispatch:
    """Kept (token, expert, gate) assignments, sorted by expert: ``counts[e]``
    consecutive entries belong to expert ``e``."""

    tokens: torch.Tensor  # (M,) token index of each assignment
    experts: torch.Tensor  # (M,) ascending
    gates: torch.Tensor  # (M,)
    counts: torch.Tensor  # (E,) assignments per expert


def expert_capacity(n_tokens: int, n_expert: int, k: int, factor: float) -> int:
    """Most assignments one expert takes: ``ceil(factor * N * k / E)``, at most N."""
    return min(n_tokens, math.ceil(factor * n_tokens * k / n_expert))


def sort_by_expert(
    indices: torch.Tensor, gates: torch.Tensor, n_expert: int, capacity: int | None = None
) -> tuple[Dispatch, torch.Tensor]:
    """Token-choice assignments ``indices``, ``gates`` (N, k) grouped by expert.

    The (N, k) choices are read choice-major (every token's first choice, then every
    second choice) and sorted stably, so within an expert first choices come first,
    earlier tokens first; with a ``capacity`` each expert keeps that many. Returns the
    dispatch and the (N, k) bool mask of kept assignments.
    """
    N, k = indices.shape
    flat_expert = indices.t().reshape(-1)  # position i holds choice i // N of token i % N
    order = flat_expert.argsort(stable=True)
    counts = torch.bincount(flat_expert, minlength=n_expert)
    experts = flat_expert[order]
    kept = torch.ones(N * k, dtype=torch.bool, device=indices.device)
    if capacity is not None:
        starts = counts.cumsum(0) - counts
        in_capacity = torch.arange(N * k, device=indices.device) - starts[experts] < capacity
        kept[order[~in_capacity]] = False
        order, experts = order[in_capacity], experts[in_capacity]
        counts = counts.clamp(max=capacity)
    dispatch = Dispatch(order % N, experts, gates.t().reshape(-1)[order], counts)
    return dispatch, kept.view(k, N).t()


SWIGLU_ALPHA = 1.702  # GPT-OSS's clamped SwiGLU: gate * sigmoid(1.702 * gate)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """GPT-OSS's expert nonlinearity: both halves clamped to ``limit`` (the gate from
    above only), a sigmoid-approximated GELU on the gate, and ``up + 1``."""
    gate = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)


def glu(gate: torch.Tensor, up: torch.Tensor, act: nn.Module, swiglu_limit: float | None):
    """The experts' gated nonlinearity: ``act(gate) * up``, or GPT-OSS's clamped
    SwiGLU when ``swiglu_limit`` is set."""
    if swiglu_limit is not None:
        return clamped_swiglu(gate, up, swiglu_limit)
    return act(gate) * up


class Experts(nn.Module):
    """``n_expert`` gated MLPs with stacked weights, run on tokens sorted by expert.

    ``fc_1[e]`` (2I, C) is ``[gate | up]``, ``fc_2[e]`` (C, I) the down projection:
    expert e computes ``fc_2[e] @ (act(gate) * up)`` (or GPT-OSS's clamped SwiGLU when
    ``swiglu_limit`` is set; ``bias=True`` adds per-expert biases to both). Each expert runs on its
    contiguous slice; with ``use_grouped_mm`` all slices go through one
    ``torch._grouped_mm`` call (auto: on CUDA in bf16 with compute capability >= 9 and
    widths in multiples of 16 bytes, where it is a real grouped kernel; on CPU in torch
    2.13 it works in fp32 but is slower than the loop, so the loop is used).
    ``fused = True`` (``fuse_experts``) makes ``combine`` take the fused path: gather,
    experts and scatter in one autograd function with compiled GLU kernels.
    """

    use_grouped_mm: bool | None = None  # None: auto
    fused: bool = False  # combine() through the fused path (``fuse_experts``)

    def __init__(
        self,
        n_expert: int,
        n_embd: int,
        intermediate_size: int,
        activation: str,
        bias: bool = False,
        swiglu_limit: float | None = None,
    ):
        super().__init__()
        self.fc_1 = nn.Parameter(torch.empty(n_expert, 2 * intermediate_size, n_embd))
        self.fc_2 = nn.Parameter(torch.empty(n_expert, n_embd, intermediate_size))
        self.fc_1_bias = (
            nn.Parameter(torch.empty(n_expert, 2 * intermediate_size)) if bias else None
        )
        self.fc_2_bias = nn.Parameter(torch.empty(n_expert, n_embd)) if bias else None
        self.activation = activation
        self.act = registry.activation.get(activation)()
        self.swiglu_limit = swiglu_limit

    def combine(self, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
        """``x`` (N, C) -> (N, C): every kept assignment's gated expert output, summed
        per token (the fused path when ``fused`` is set, else gather, experts, scatter)."""
        if self.fused:
            return fused_experts(self, x, dispatch)
        y = self(x[dispatch.tokens], dispatch.counts)  # (M, C), grouped by expert
        y = y * dispatch.gates.to(y.dtype)[:, None]
        return torch.zeros_like(x).index_add_(0, dispatch.tokens, y)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x`` (M, C) sorted by expert, ``counts`` (E,) rows per expert -> (M, C)."""
        if self._grouped(x):
            offsets = counts.cumsum(0).to(torch.int32)
            hidden = self._add_bias(_grouped_mm(x, self.fc_1, offsets), self.fc_1_bias, counts)
            hidden = self._glu(*hidden.chunk(2, dim=-1))
            return self._add_bias(_grouped_mm(hidden, self.fc_2, offsets), self.fc_2_bias, counts)
        # unbind, not fc_1[e]: each indexing's backward would write a full-size gradient
        fc_1_bias, fc_2_bias = (
            [None] * len(counts) if b is None else b.unbind(0)
            for b in (self.fc_1_bias, self.fc_2_bias)
        )
        weights = zip(
            x.split(counts.tolist()),
            self.fc_1.unbind(0),
            fc_1_bias,
            self.fc_2.unbind(0),
            fc_2_bias,
            strict=True,
        )
        outputs = []
        for x_e, fc_1, b_1, fc_2, b_2 in weights:
            if len(x_e):
                hidden = self._glu(*F.linear(x_e, fc_1, b_1).chunk(2, dim=-1))
                outputs.append(F.linear(hidden, fc_2, b_2))
        return torch.cat(outputs)

    def _glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return glu(gate, up, self.act, self.swiglu_limit)

    @staticmethod
    def _add_bias(y: torch.Tensor, bias: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
        """Each row of ``y`` plus its expert's bias (rows grouped by ``counts``)."""
        if bias is None:
            return y
        return y + bias.repeat_interleave(counts, dim=0, output_size=y.size(0))

    def _grouped(self, x: torch.Tensor) -> bool:
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        aligned = all(size * x.element_size() % 16 == 0 for size in self.fc_2.shape[1:])
        return (
            x.is_cuda
            and x.dtype == torch.bfloat16
            and aligned
            and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
        )

    def extra_repr(self) -> str:
        E, C, hidden = self.fc_2.shape
        return f"n_expert={E}, n_embd={C}, intermediate_size={hidden}"


def _grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` of ``x`` times ``weight[e].T``, in one call."""
    y = torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    if y.requires_grad:  # its backward rejects broadcast (stride-0) gradients
        y.register_hook(lambda grad: grad.contiguous())
    return y


# --- the fused expert path ---------------------------------------------------------------
#
# Eager autograd makes every elementwise step of the experts a pass over memory: SwiGLU's
# activation and product and their backward, the backward of ``chunk`` (a cat), the
# gate product and its backward. The fused path keeps the per-expert matmuls (which
# already run at the machine's peak) and gives each expert one compiled kernel per
# direction for the rest: ``hg = glu(a) * g`` (the gate folded in, since
# ``(h @ fc_2.T) * g == (h * g) @ fc_2.T``), and its gradient, which writes the
# ``[gate | up]`` gradient in place of the cat and the gates' gradient in the same pass.
# Buffers stay per expert, as in the default path: one large buffer for all experts'
# rows would be fresh memory from the OS (page faults) on every step. The kernels are
# compiled once, dynamic in the number of rows, so new routings do not recompile; an
# outer ``torch.compile`` (``fit(compile=True)``) breaks its graph at the experts
# (``torch.compiler.disable``) and runs this path as it is, with its own kernels.


def fuse_experts(model: nn.Module, fused: bool = True) -> nn.Module:
    """Switch every MoE layer of ``model`` (or the layer itself) to the fused expert
    path, or back with ``fused=False``; returns ``model``."""
    for module in model.modules():
        if isinstance(module, Experts):
            module.fused = fused
    return model


class GLUKernels:
    """The experts' nonlinearity with the gate folded in, ``hg = glu(a) * g`` over
    (rows, 2I) ``a`` = ``[gate | up]``, and its gradient, compiled on first use.

    Where compiling fails (no C++ compiler, say) it warns once and runs the same
    functions eagerly: same results, less speed.
    """

    def __init__(self, activation: str, swiglu_limit: float | None) -> None:
        act = registry.activation.get(activation)()

        def forward(a: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
            gated = glu(*a.chunk(2, dim=-1), act, swiglu_limit)
            return gated * gates.to(a.dtype)[:, None]

        def backward(
            a: torch.Tensor, gates: torch.Tensor, grad: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return torch.func.vjp(forward, a, gates)[1](grad)

        self.eager = {"forward": forward, "backward": backward}
        self.compiled = {name: torch.compile(fn, dynamic=False) for name, fn in self.eager.items()}

    def __call__(self, name: str, *tensors: torch.Tensor):
        # one kernel for every row count >= 2, so no recompiles (torch would specialise
        # a kernel to 1 row; unbacked sizes avoid that but give an 8x slower gradient)
        if self.compiled is not None and len(tensors[0]) > 1:
            for t in tensors:
                torch._dynamo.maybe_mark_dynamic(t, 0)
            try:
                return self.compiled[name](*tensors)
            except Exception as error:  # any compiler failure; a real fault re-raises eagerly
                warnings.warn(
                    f"lab.moe: fused experts run uncompiled, torch.compile failed ({error!r:.200})",
                    stacklevel=2,
                )
                self.compiled = None
        return self.eager[name](*tensors)


@functools.cache
def glu_kernels(activation: str, swiglu_limit: float | None) -> GLUKernels:
    """The kernels of one nonlinearity, shared by every layer that uses it."""
    return GLUKernels(activation, swiglu_limit)


@torch.compiler.disable
def fused_experts(experts: Experts, x: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    """``Experts.combine`` through the fused path (same result, fewer passes)."""
    return FusedExperts.apply(
        x, dispatch.tokens, dispatch.gates, dispatch.counts, experts.fc_1, experts.fc_2,
        experts.fc_1_bias, experts.fc_2_bias, glu_kernels(experts.activation, experts.swiglu_limit),
    )  # fmt: skip


class FusedExperts(torch.autograd.Function):
    """Gather, experts and scatter with a hand-written backward (see the section
    comment above), expert by expert; biases may be None."""

    @staticmethod
    def forward(ctx, x, tokens, gates, counts, fc_1, fc_2, fc_1_bias, fc_2_bias, kernels):
        sizes = counts.tolist()
        out = torch.zeros_like(x)
        saved = []  # per expert: its rows of x, a = [gate | up], hg = the gated GLU
        pieces = zip(tokens.split(sizes), gates.split(sizes), strict=True)
        for e, (tokens_e, g_e) in enumerate(pieces):
            if not len(tokens_e):
                saved.append(None)
                continue
            x_e = x.index_select(0, tokens_e)
            a = F.linear(x_e, fc_1[e], None if fc_1_bias is None else fc_1_bias[e])
            hg = kernels("forward", a, g_e)
            y = hg @ fc_2[e].t()
            if fc_2_bias is not None:  # the bias is gated too: (h @ fc_2.T + b) * g
                y.addcmul_(g_e.to(y.dtype)[:, None], fc_2_bias[e])
            out.index_add_(0, tokens_e, y)
            saved.append((x_e, a, hg))
        ctx.save_for_backward(tokens, gates, fc_1, fc_2, fc_2_bias)
        ctx.sizes, ctx.saved, ctx.kernels = sizes, saved, kernels
        ctx.biased = fc_1_bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        tokens, gates, fc_1, fc_2, fc_2_bias = ctx.saved_tensors
        grad_x, grad_gates = torch.zeros_like(grad), torch.empty_like(gates)
        grad_fc_1, grad_fc_2 = torch.empty_like(fc_1), torch.empty_like(fc_2)
        grad_b1, grad_b2 = (
            (fc_1.new_zeros(fc_1.shape[:2]), fc_2.new_zeros(fc_2.shape[:2]))
            if ctx.biased
            else (None, None)
        )
        pieces = zip(
            ctx.saved,
            tokens.split(ctx.sizes),
            gates.split(ctx.sizes),
            grad_gates.split(ctx.sizes),
            strict=True,
        )
        for e, (saved, tokens_e, g_e, grad_g_e) in enumerate(pieces):
            if saved is None:  # no tokens: no gradient
                grad_fc_1[e], grad_fc_2[e] = 0, 0
                continue
            x_e, a, hg = saved
            dy = grad.index_select(0, tokens_e)  # y was gated through hg: no gate here
            torch.mm(dy.t(), hg, out=grad_fc_2[e])
            grad_a, grad_g = ctx.kernels("backward", a, g_e, dy @ fc_2[e])
            torch.mm(grad_a.t(), x_e, out=grad_fc_1[e])
            grad_x.index_add_(0, tokens_e, grad_a @ fc_1[e])
            if ctx.biased:
                grad_b1[e] = grad_a.sum(0)
                grad_b2[e] = g_e.to(dy.dtype) @ dy
                grad_g = grad_g + dy @ fc_2_bias[e]
            grad_g_e.copy_(grad_g)
        ctx.saved = None
        return grad_x, None, grad_gates, None, grad_fc_1, grad_fc_2, grad_b1, grad_b2, None


@registry.mlp.register("MoE")
class MoE(nn.Module):
    """A routed mixture of gated-MLP experts plus optional shared experts (see the
    module docstring for routers, capacity, losses and weight layout)."""

    bias_update_rate: float = 1e-3  # sigmoid_bias router: step of the balancing bias

    def __init__(self, config: Config, block_idx: int = 0) -> None:
        super().__init__()
        config = config.for_layer(block_idx)  # Config has checked it (bias=False, k <= E)
        self.config, self.block_idx = config, block_idx
        self.n_expert, self.k = config.n_expert, config.n_expert_per_token
        self.router_type = config.router
        self.capacity_factor = config.moe_capacity_factor
        hidden = config.moe_intermediate_size or config.intermediate_size
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=config.moe_bias)
        self.experts = Experts(
            config.n_expert,
            config.n_embd,
            hidden,
            config.activation,
            bias=config.moe_bias,
            swiglu_limit=config.moe_swiglu_limit,
        )
        self.shared_experts = (
            GatedMLP(config, intermediate_size=config.n_shared_expert * hidden)
            if config.n_shared_expert
            else None
        )
        self.shared_gate = (
            nn.Linear(config.n_embd, 1, bias=False) if config.shared_expert_gate else None
        )
        if self.router_type == "sigmoid_bias":
            self.register_buffer("expert_bias", torch.zeros(config.n_expert))
        self.aux_loss: torch.Tensor | None = None  # weighted, set by each training forward
        self.record_routing = False
        self.routing: RoutingRecord | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02), down projections N(0, 0.02 / sqrt(2 n_layer)) as in
        ``GPT.reset_parameters`` (whose name match does not reach stacked experts)."""
        std, down_std = 0.02, 0.02 / math.sqrt(2 * self.config.n_layer)
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.experts.fc_1, std=std)
        nn.init.normal_(self.experts.fc_2, std=down_std)
        for bias in (self.router.bias, self.experts.fc_1_bias, self.experts.fc_2_bias):
            if bias is not None:
                nn.init.zeros_(bias)
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=std)
        if self.shared_experts is not None:
            nn.init.normal_(self.shared_experts.fc_1.weight, std=std)
            nn.init.normal_(self.shared_experts.fc_2.weight, std=down_std)
        if self.router_type == "sigmoid_bias":
            nn.init.zeros_(self.expert_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)
        logits = self.router(x).float()  # (N, E); routing math in fp32
        if self.router_type == "expert_choice":
            probs, dispatch = self.choose_tokens(logits)
            indices = gates = kept = None
            selected_counts = dispatch.counts
        else:
            probs, indices, gates = self.choose_experts(logits)
            capacity = None
            if self.capacity_factor is not None:
                capacity = expert_capacity(B * T, self.n_expert, self.k, self.capacity_factor)
            dispatch, kept = sort_by_expert(indices, gates, self.n_expert, capacity)
            selected_counts = torch.bincount(indices.reshape(-1), minlength=self.n_expert)
        out = self.experts.combine(x, dispatch)
        if self.shared_experts is not None:
            shared = self.shared_experts(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        losses = self._losses(logits, probs, selected_counts)
        if self.training and self.router_type == "sigmoid_bias":
            self._update_bias(selected_counts)
        if self.record_routing:
            self.routing = self._record(B, T, probs, dispatch, indices, gates, kept, losses)
        return out.view(B, T, C)

    def choose_experts(
        self, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token choice: router probabilities (N, E), expert indices and gates (N, k)."""
        probs, indices, gates = self._token_choice(logits)
        return probs, indices, gates * self.config.moe_routed_scaling

    def _token_choice(
        self, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.router_type == "topk_softmax":
            top_logits, indices = logits.topk(self.k, dim=-1)
            return logits.softmax(dim=-1), indices, top_logits.softmax(dim=-1)
        if self.router_type == "softmax_topk":
            probs = logits.softmax(dim=-1)
            gates, indices = probs.topk(self.k, dim=-1)
            return probs, indices, gates
        scores = logits.sigmoid()  # sigmoid_bias: the bias picks experts, never gates them
        indices = self._limit_to_groups(scores + self.expert_bias).topk(self.k, dim=-1).indices
        gates = scores.gather(-1, indices)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        return probs, indices, gates / gates.sum(dim=-1, keepdim=True)

    def _limit_to_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's group-limited routing: ``choice`` (N, E) with every expert outside
        the token's ``moe_topk_group`` best groups set to -inf (a group scores the sum of
        its two best experts)."""
        n_group = self.config.moe_n_group
        if n_group == 1:
            return choice
        grouped = choice.view(-1, n_group, self.n_expert // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, n_group)
        best = group_scores.topk(self.config.moe_topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)

    def choose_tokens(self, logits: torch.Tensor) -> tuple[torch.Tensor, Dispatch]:
        """Expert choice: each expert takes its top-capacity tokens by softmax score."""
        N = logits.size(0)
        capacity = expert_capacity(N, self.n_expert, self.k, self.capacity_factor or 1.0)
        probs = logits.softmax(dim=-1)
        gates, tokens = probs.t().topk(capacity, dim=-1)  # (E, capacity)
        experts = torch.arange(self.n_expert, device=logits.device).repeat_interleave(capacity)
        counts = torch.full((self.n_expert,), capacity, device=logits.device)
        return probs, Dispatch(tokens.reshape(-1), experts, gates.reshape(-1), counts)

    def _losses(
        self, logits: torch.Tensor, probs: torch.Tensor, selected_counts: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Unweighted losses that are needed; sets ``self.aux_loss`` (weighted)."""
        cfg = self.config
        want_balance = self.record_routing or (self.training and cfg.moe_aux_loss_coef > 0)
        want_z = self.record_routing or (self.training and cfg.moe_z_loss_coef > 0)
        losses = {}
        if want_balance:
            fraction = selected_counts.float() / logits.size(0)  # f_i, sums to k
            losses["load_balancing"] = self.n_expert * (fraction * probs.mean(dim=0)).sum()
        if want_z:
            losses["z"] = torch.logsumexp(logits, dim=-1).square().mean()
        self.aux_loss = None
        if self.training:
            self.aux_loss = logits.new_zeros(())
            if cfg.moe_aux_loss_coef > 0:
                self.aux_loss = self.aux_loss + cfg.moe_aux_loss_coef * losses["load_balancing"]
            if cfg.moe_z_loss_coef > 0:
                self.aux_loss = self.aux_loss + cfg.moe_z_loss_coef * losses["z"]
        return losses

    @torch.no_grad()
    def _update_bias(self, load: torch.Tensor) -> None:
        """DeepSeek-V3's balancing step: raise the bias of underloaded experts, lower
        that of overloaded ones, by a fixed ``bias_update_rate``."""
        load = load.float()
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def _record(
        self,
        B: int,
        T: int,
        probs: torch.Tensor,
        dispatch: Dispatch,
        indices: torch.Tensor | None,
        gates: torch.Tensor | None,
        kept: torch.Tensor | None,
        losses: dict[str, torch.Tensor],
    ) -> RoutingRecord:
        E = self.n_expert
        combine = probs.new_zeros(B * T, E)
        combine[dispatch.tokens, dispatch.experts] = dispatch.gates.detach()
        dropped = torch.zeros(B * T, E, dtype=torch.bool, device=probs.device)
        if indices is not None:
            rows = torch.arange(B * T, device=probs.device)[:, None].expand_as(indices)
            dropped[rows[~kept], indices[~kept]] = True
        return RoutingRecord(
            expert_indices=None if indices is None else indices.view(B, T, -1),
            gate_weights=None if gates is None else gates.detach().view(B, T, -1),
            combine_weights=combine.view(B, T, E),
            router_probs=probs.detach().view(B, T, E),
            load=dispatch.counts.clone(),
            dropped=dropped.view(B, T, E),
            aux_losses={name: loss.detach() for name, loss in losses.items()},
        )

    def extra_repr(self) -> str:
        return (
            f"router={self.router_type!r}, n_expert={self.n_expert}, k={self.k}, "
            f"capacity_factor={self.capacity_factor}"
        )


# --- model-level helpers -----------------------------------------------------------------


def moe_layers(model: nn.Module) -> Iterator[tuple[str, MoE]]:
    """(module path, layer) for every MoE layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            yield name, module


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the weighted auxiliary losses that the last training-mode forward left in
    every MoE layer (0 when there are none): add it to the language-model loss."""
    losses = [layer.aux_loss for _, layer in moe_layers(model) if layer.aux_loss is not None]
    if losses:
        return torch.stack(losses).sum()
    return torch.zeros((), device=model_device(model))


@contextmanager
def routing_records(model: nn.Module) -> Iterator[dict[str, RoutingRecord]]:
    """``with routing_records(model) as records: model(idx)``; after the block,
    ``records["transformer.h.1.mlp"]`` is that layer's ``RoutingRecord`` of the last
    forward pass. Layers stop recording (and drop their record) on exit."""
    layers = dict(moe_layers(model))
    before = {name: layer.record_routing for name, layer in layers.items()}
    records: dict[str, RoutingRecord] = {}
    for layer in layers.values():
        layer.record_routing = True
    try:
        yield records
    finally:
        for name, layer in layers.items():
            if layer.routing is not None:
                records[name] = layer.routing
            layer.record_routing, layer.routing = before[name], None
