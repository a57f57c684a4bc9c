"""The language-model loss, with the head applied a chunk of tokens at a time.

Cross-entropy over a large vocabulary is the biggest tensor of a training step: for
Gemma's 262,144 tokens, a batch of 8 x 2048 holds 17 GB of fp32 logits, and as much
again for their log-softmax and its gradient. ``chunked_cross_entropy`` never holds
them at once: it runs the head and the loss on ``chunk_size`` tokens, keeps only the
chunk's summed loss, and recomputes the chunk's logits in the backward pass
(activation checkpointing), so the peak is one chunk's logits. The price is one more
head matmul per chunk in the backward pass (2 of a step's ~6 N T flops become 3 for
the head alone).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lab.data import IGNORE_INDEX


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the labelled positions (targets != ``IGNORE_INDEX``),
    computed in fp32 whatever the logits' dtype."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``cross_entropy_sum(head(hidden), targets)`` without the full logits: ``hidden``
    (..., C) and ``targets`` (...) are split into chunks of ``chunk_size`` tokens, each
    chunk's logits made, reduced to a summed loss, and recomputed in the backward pass.
    Equal to the unchunked loss and gradients up to float summation order."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size ({chunk_size}) must be >= 1")
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for h, t in zip(hidden.split(chunk_size), targets.split(chunk_size), strict=True):
        if torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    return total


def _chunk_loss(
    head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    return cross_entropy_sum(head(h), t)
