"""Checker for a Switch-style top-k router and its load-balancing loss.

The reference is ``lab.moe.MoE`` with ``router="softmax_topk"`` (Switch): softmax over
all experts, the k largest probabilities as gates (not renormalised), and the loss
``E * sum_i f_i * P_i`` (``f_i`` the fraction of tokens choosing expert i, summing to
k; ``P_i`` the mean router probability of expert i).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lab.config import Config
from lab.exercises.core import call, close, fail, passed, randn
from lab.moe import MoE


def reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices, gates, loss) from lab's MoE layer, fed ``logits`` through an identity router."""
    N, E = logits.shape
    config = Config(n_layer=1, n_embd=E, n_head=1, vocab_size=8, mlp_class_name="MoE",
                    n_expert=E, n_expert_per_token=k, router="softmax_topk",
                    moe_intermediate_size=4)  # fmt: skip
    layer = MoE(config)
    layer.record_routing = True
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E))
        layer(logits.float().view(1, N, E))
    record = layer.routing
    return record.expert_indices[0], record.gate_weights[0], record.aux_losses["load_balancing"]


def check_router(fn: Callable) -> None:
    """``fn(logits, k) -> (indices, gates, loss)``: logits (N, E); indices and gates
    (N, k); loss a scalar tensor with a gradient back to the logits."""
    cases = [("8 tokens, 4 experts, k=2", 8, 4, 2, 0), ("16 tokens, 8 experts, k=1", 16, 8, 1, 1),
             ("one token, 4 experts, k=2", 1, 4, 2, 2), ("32 tokens, 6 experts, k=3", 32, 6, 3, 3)]  # fmt: skip
    for case, N, E, k, seed in cases:
        logits = randn(N, E, seed=seed).requires_grad_()
        ref_indices, ref_gates, ref_loss = reference(logits.detach(), k)
        out = call(fn, logits, k, case=case)
        if not (isinstance(out, tuple) and len(out) == 3):
            fail("route should return three things: (indices, gates, loss)")
        indices, gates, loss = out
        if tuple(indices.shape) != (N, k) or tuple(gates.shape) != (N, k):
            fail(f"on {case} indices and gates should be ({N}, {k}): one row per token, one "
                 f"column per chosen expert; got {tuple(indices.shape)} and {tuple(gates.shape)}")  # fmt: skip
        if not torch.equal(indices.sort(-1).values, ref_indices.sort(-1).values):
            fail(f"on {case} some tokens choose other experts than the k most probable ones")
        order = indices.argsort(-1)
        mine = gates.detach().float().gather(-1, order)
        right = ref_gates.gather(-1, ref_indices.argsort(-1))
        if not close(mine, right):
            if k > 1 and close(mine, right / right.sum(-1, keepdim=True)):
                fail("your gates are renormalised over the k chosen experts: Switch (softmax_topk) "
                     "keeps the softmax probabilities as they are")  # fmt: skip
            fail(f"on {case} the gates are not the router probabilities of the chosen experts "
                 "(softmax over all experts)")  # fmt: skip
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            fail("the loss should be a scalar tensor")
        if not loss.requires_grad:
            fail("your loss has no gradient back to the logits, so it cannot balance anything: "
                 "P_i must come from the softmax, f_i alone is a count")  # fmt: skip
        loss = loss.detach().float().reshape(())
        if close(loss, ref_loss):
            continue
        if k > 1 and close(loss * k, ref_loss):
            fail(f"your loss is {k} times too small: f_i, the fraction of tokens that chose "
                 "expert i, sums to k over the experts, because each token chooses k")  # fmt: skip
        if close(loss * E, ref_loss):
            fail(f"your loss is {E} (the number of experts) times too small: scale it so that "
                 "perfectly uniform routing gives k")  # fmt: skip
        fail(f"on {case} your load-balancing loss differs from lab's: f_i counts tokens per expert "
             "(before any capacity limit), P_i averages every token's probability for expert i")  # fmt: skip
    passed("top-k router and Switch loss", "k=1..3, one token, gates and the loss's gradient")
