"""Checker for top-p (nucleus) filtering, by the rule ``lab.generate.sample`` uses:
keep the smallest set of most likely ids whose probability reaches ``p`` (the most
likely id is always kept), zero the rest, renormalise."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lab.exercises.core import call, close, fail, passed, randn, tensor_result


def reference(probs: torch.Tensor, p: float) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop = (mass_before >= p).scatter(-1, order, mass_before >= p)
    kept = probs.masked_fill(drop, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def _ids(row: torch.Tensor) -> list[int]:
    return row.nonzero().flatten().tolist()


def check_top_p(fn: Callable) -> None:
    """``fn(probs, p) -> filtered``: probs (B, V) rows summing to 1; returns (B, V)."""
    cases = [
        ("probs [0.4, 0.3, 0.2, 0.1], p=0.5", torch.tensor([[0.4, 0.3, 0.2, 0.1]]), 0.5),
        ("probs [0.1, 0.2, 0.3, 0.4] (not sorted), p=0.6", torch.tensor([[0.1, 0.2, 0.3, 0.4]]), 0.6),
        ("p=1.0 (keep everything)", torch.tensor([[0.5, 0.25, 0.25]]), 1.0),
        ("one id above p", torch.tensor([[0.05, 0.9, 0.05]]), 0.8),
        ("a batch of 3 rows over 50 ids, p=0.9", randn(3, 50, seed=0).mul(2).softmax(-1), 0.9),
        ("float64", randn(2, 20, seed=1, dtype=torch.float64).softmax(-1), 0.7),
    ]  # fmt: skip
    for case, probs, p in cases:
        given = probs.clone()
        expected = reference(probs, p)
        y = tensor_result(call(fn, probs, p, case=case), expected, "top_p_filter", case)
        if not torch.equal(probs, given):
            fail("top_p_filter changed the probs it was given: work on a copy")
        if close(y, expected):
            continue
        sums = y.sum(-1)
        if not close(sums, torch.ones_like(sums)) and close(y / sums[:, None], expected):
            fail(f"on {case} your kept probabilities sum to {sums[0]:.2f}, not 1: renormalise "
                 "what you keep")  # fmt: skip
        mine, right = _ids(y[0]), _ids(expected[0])
        if set(mine) < set(right):
            fail(f"on {case} you keep ids {mine}, but the nucleus is {right}: it is the smallest "
                 "set of most likely ids whose probability *reaches* p, so the id that crosses "
                 "p belongs to it")  # fmt: skip
        if set(mine) > set(right):
            fail(f"on {case} you keep ids {mine}, but the nucleus is {right}: stop as soon as the "
                 "kept mass reaches p")  # fmt: skip
        if set(mine) != set(right):
            fail(f"on {case} you keep ids {mine}, but the nucleus is {right}: choose ids by "
                 "probability, most likely first, not by their position")  # fmt: skip
        fail(f"on {case} you keep the right ids, but with the wrong probabilities: each kept "
             "probability is divided by the kept total")  # fmt: skip
    passed("top-p filtering", "the id that crosses p, unsorted rows, p=1, batches and float64")
