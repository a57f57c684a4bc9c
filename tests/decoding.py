"""The check every mixer's cache must pass: decoding in pieces equals one full pass."""

import itertools

import torch


def assert_cache_equals_recomputation(
    model: torch.nn.Module, idx: torch.Tensor, prompt: int = 5, chunk: int = 3
) -> None:
    """Logits of ``idx`` decoded with the KV cache (a prompt of ``prompt`` tokens in one
    go, then ``chunk`` tokens at once, then one at a time) equal those of one full pass."""
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=idx.size(0))
        cuts = [0, prompt, prompt + chunk, *range(prompt + chunk + 1, idx.size(1) + 1)]
        pieces = [
            model(idx[:, start:end], input_pos=torch.arange(start, end))
            for start, end in itertools.pairwise(cuts)
        ]
        model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
