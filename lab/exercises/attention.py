"""Checkers for attention written from scratch: causal, grouped-query, one KV-cache step.

Layout, as in ``lab.model``: q (B, T, nh, hs); k, v (B, S, ng, hs); output (B, T, nh, hs).
The reference is ``CausalSelfAttention.scaled_dot_product_attention``; the wrong
variants below are what a learner's output is compared with to say what went wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lab.config import Config
from lab.exercises.core import call, close, fail, passed, randn, tensor_result
from lab.model import CausalSelfAttention


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """lab's attention for these shapes (the T queries are the last T of S positions)."""
    nh, hs, ng = q.size(2), q.size(3), k.size(2)
    config = Config(n_layer=1, n_embd=nh * hs, n_head=nh, n_query_groups=ng, vocab_size=8,
                    block_size=max(k.size(1), 1))  # fmt: skip
    attention = CausalSelfAttention(config)
    with torch.no_grad():
        return attention.scaled_dot_product_attention(q, k, v)


def variant(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    causal: bool = True,
    softmax_dim: int = -1,
    tile_heads: bool = False,
) -> torch.Tensor:
    """Attention with one thing changed: the mistakes a checker recognises by name."""
    T, S, nh, hs = q.size(1), k.size(1), q.size(2), q.size(3)
    repeat = nh // k.size(2)
    share = (lambda x: x.repeat(1, 1, repeat, 1)) if tile_heads else (
        lambda x: x.repeat_interleave(repeat, dim=2))  # fmt: skip
    q, k, v = q.transpose(1, 2), share(k).transpose(1, 2), share(v).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(hs) if scale is None else scale)
    if causal:
        allowed = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = scores.softmax(dim=softmax_dim).nan_to_num(0.0)
    return (weights @ v).transpose(1, 2)


def _inputs(B: int, T: int, nh: int, ng: int, hs: int, seed: int, dtype=torch.float32):
    return (randn(B, T, nh, hs, seed=seed, dtype=dtype),
            randn(B, T, ng, hs, seed=seed + 1, dtype=dtype),
            randn(B, T, ng, hs, seed=seed + 2, dtype=dtype))  # fmt: skip


def _leak(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, case: str) -> None:
    """Say which query sees a key it must not (or misses one it must see)."""
    base = call(fn, q, k, v, case=case)
    T = q.size(1)
    for j in range(T):
        k2, v2 = k.clone(), v.clone()
        k2[:, j] += 1.0
        v2[:, j] += 1.0
        changed = (call(fn, q, k2, v2, case=case) - base).abs().amax(dim=(0, 2, 3)) > 1e-6
        for i in range(T):
            if i < j and changed[i]:
                fail(f"query {i} attends to key {j}: your mask lets a token see the future")
            if i >= j and not changed[i]:
                fail(f"query {i} never looks at key {j}, but it may: a token sees itself and "
                     "every token before it")  # fmt: skip


def _diagnose(fn: Callable, q, k, v, y: torch.Tensor, expected: torch.Tensor, case: str) -> None:
    """``y`` is wrong: name the mistake if it is a known one, else where it differs."""
    _leak(fn, q, k, v, case)
    hs = q.size(-1)
    if close(y, variant(q, k, v, scale=1.0)):
        fail(
            "your scores are not scaled: divide them by sqrt(head_size) before the softmax, "
            "or it saturates as heads get wider"
        )
    if close(y, variant(q, k, v, scale=1.0 / hs)):
        fail("your scores are divided by head_size; the scale is 1 / sqrt(head_size)")
    if close(y, variant(q, k, v, softmax_dim=-2)):
        fail(
            "your softmax runs over the queries: each query's weights over the keys should sum to 1"
        )
    if k.size(2) != q.size(2) and close(y, variant(q, k, v, tile_heads=True)):
        fail(
            "query head 1 uses key head 1, but query heads 0 and 1 should share key head 0: "
            "neighbouring query heads share one key head (look at how you repeat the keys)"
        )
    bad = [int(i) for i in torch.unravel_index((y - expected).abs().argmax(), y.shape)]
    fail(
        f"on {case} your output differs from lab's at batch {bad[0]}, query {bad[1]}, head "
        f"{bad[2]}: the mask looks right, so check the scores, the softmax and the sum over values"
    )


def _compare(fn: Callable, q, k, v, case: str, gqa_message: str | None = None) -> None:
    expected = reference(q, k, v)
    y = tensor_result(call(fn, q, k, v, case=case), expected, "your attention", case)
    if not close(y, expected):
        if gqa_message is not None and not (
            k.size(2) != q.size(2) and close(y, variant(q, k, v, tile_heads=True))
        ):
            fail(gqa_message)
        _diagnose(fn, q, k, v, y, expected, case)


def check_causal_attention(fn: Callable) -> None:
    """``fn(q, k, v) -> y``, all (B, T, n_head, head_size): causal softmax attention."""
    cases = {
        "B=2, T=6, 2 heads of 8": _inputs(2, 6, 2, 2, 8, seed=0),
        "T=1 (one token)": _inputs(2, 1, 2, 2, 8, seed=3),
        "batch 1, T=9": _inputs(1, 9, 4, 4, 4, seed=6),
        "float64 inputs": _inputs(2, 5, 2, 2, 8, seed=9, dtype=torch.float64),
    }
    for case, (q, k, v) in cases.items():
        _compare(fn, q, k, v, case)
    passed("causal self-attention", "T=1, batch 1, float64 and the causal mask key by key")


def check_grouped_query_attention(fn: Callable) -> None:
    """``fn(q, k, v) -> y``: q (B, T, n_head, hs), k and v (B, T, n_query_groups, hs)."""
    _compare(fn, *_inputs(2, 5, 4, 4, 8, seed=0), case="n_query_groups == n_head (4)")
    grouped = ("right when n_query_groups == n_head, wrong for grouped queries: check how "
               "the key heads are shared")  # fmt: skip
    _compare(fn, *_inputs(2, 5, 4, 2, 8, seed=3), "4 query heads, 2 key heads", grouped)
    _compare(fn, *_inputs(1, 7, 6, 3, 4, seed=6), "6 query heads, 3 key heads, batch 1", grouped)
    _compare(fn, *_inputs(2, 4, 4, 1, 8, seed=9), "multi-query (1 key head)", grouped)
    _compare(fn, *_inputs(2, 1, 4, 2, 8, seed=12), "T=1", grouped)
    passed("grouped-query attention", "MHA, GQA (2 and 3 groups), MQA, batch 1 and T=1")


def check_decode_step(fn: Callable) -> None:
    """``fn(q, k, v, cache_k, cache_v, pos) -> y`` for one new token at position ``pos``:
    q (B, 1, nh, hs), k and v (B, 1, ng, hs); the caches (B, max_len, ng, hs) are written
    in place. Decoding token by token must equal attention over the whole sequence."""
    for B, T, nh, ng, hs, seed in ((2, 6, 2, 2, 8, 0), (1, 5, 4, 2, 4, 3)):
        case = f"B={B}, {nh} query heads, {ng} key heads, decoding {T} tokens"
        q, k, v = _inputs(B, T, nh, ng, hs, seed=seed)
        expected = reference(q, k, v)
        max_len = T + 3
        cache_k, cache_v = torch.zeros(B, max_len, ng, hs), torch.zeros(B, max_len, ng, hs)
        for pos in range(T):
            step = slice(pos, pos + 1)
            y = call(fn, q[:, step], k[:, step], v[:, step], cache_k, cache_v, pos, case=case)
            y = tensor_result(y, expected[:, step], "your decode step", case)
            if not (
                torch.equal(cache_k[:, pos], k[:, pos]) and torch.equal(cache_v[:, pos], v[:, pos])
            ):
                fail(f"after the step at position {pos} the cache does not hold the new key and "
                     f"value at index {pos}: write them into cache_k and cache_v (in place) "
                     "before attending")  # fmt: skip
            if close(y, expected[:, step]):
                continue
            seen = slice(0, pos + 1)
            everything = variant(q[:, step], cache_k, cache_v, causal=False)
            if close(y, everything):
                fail(f"the token at position {pos} also attends to cache slots {pos + 1}.."
                     f"{max_len - 1}, which hold no token yet (zeros): attend to positions "
                     f"0..{pos} only")  # fmt: skip
            stale = [torch.cat([t[:, :pos], torch.zeros_like(t[:, :1])], 1) for t in (k, v)]
            missed = pos > 0 and close(y, variant(q[:, step], k[:, :pos], v[:, :pos], causal=False))
            if missed or close(y, variant(q[:, step], *stale, causal=False)):
                fail(f"the token at position {pos} does not see its own key: write it into the "
                     "cache before attending, and include position pos")  # fmt: skip
            if ng != nh and close(y, variant(q[:, step], k[:, seen], v[:, seen], causal=False,
                                             tile_heads=True)):  # fmt: skip
                fail("right when n_query_groups == n_head, wrong for grouped queries: check how "
                     "the key heads are shared")  # fmt: skip
            fail(f"at position {pos} your output differs from full causal attention over the "
                 "same sequence: check which cache slots you read and the scale")  # fmt: skip
    passed("KV-cache decode step", "token by token against full attention, with MHA and GQA")
