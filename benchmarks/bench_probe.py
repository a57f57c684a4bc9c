"""What the probe hook point costs when no probe is active (target: within 2%).

Races, in one process and interleaved round by round, the forward pass of
``lab.GPT`` as it is (``scaled_dot_product_attention`` checks ``attention_hook``)
against a copy of the model whose attention calls the fused kernel with no check at all
(the anchor: the code as it was before the hook point). Also prints, for scale, what
recording every attention pattern costs. Both hold the same weights.

    python -m benchmarks.bench_probe            # the real measurement (repo root)
    python -m benchmarks.bench_probe --quick    # a few seconds: does it run?
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import types

import torch
import torch.nn.functional as F

import lab
from lab.model import CausalSelfAttention


def fused_only(self: CausalSelfAttention, q, k, v, mask=None) -> torch.Tensor:
    """The anchor: ``scaled_dot_product_attention`` without the probe check."""
    T, S = q.size(1), k.size(1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bias = self.attention_bias(T, S, q.device, q.dtype, mask)
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, is_causal=bias is None and T > 1,
        scale=self.scale, enable_gqa=self.n_query_groups != self.n_head,
    )  # fmt: skip
    return y.transpose(1, 2)


def seconds(fn, repeats: int, sync) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()  # CUDA runs asynchronously: wait for the work before stopping the clock
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_layer, n_embd, T, batch, rounds, repeats = (
        (2, 64, 64, 2, 3, 2) if args.quick else (6, 384, 256, 4, args.rounds, 5)
    )
    config = lab.Config(
        n_layer=n_layer, n_embd=n_embd, n_head=6 if n_embd % 6 == 0 else 4, n_query_groups=2,
        vocab_size=4096, block_size=T,
    )  # fmt: skip
    torch.manual_seed(0)
    model = lab.GPT(config).to(device).eval()
    idx = torch.randint(0, config.vocab_size, (batch, T), device=device)
    anchor = copy.deepcopy(model)  # same weights; attention without the probe check
    for block in anchor.transformer.h:
        block.attn.scaled_dot_product_attention = types.MethodType(fused_only, block.attn)

    def run_lab() -> None:
        with torch.no_grad():
            model(idx)

    def run_anchor() -> None:
        with torch.no_grad():
            anchor(idx)

    def run_probed() -> None:
        with torch.no_grad(), lab.probe(model, "pattern"):
            model(idx)

    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    for fn in (run_lab, run_anchor, run_probed):  # warm up
        fn()
    off, probed = [], []
    for _ in range(rounds):
        anchor_s = seconds(run_anchor, repeats, sync)
        off.append(seconds(run_lab, repeats, sync) / anchor_s)
        probed.append(seconds(run_probed, repeats, sync) / anchor_s)
    print(
        f"device={device} threads={torch.get_num_threads()} layers={n_layer} n_embd={n_embd} "
        f"batch={batch} T={T} rounds={rounds}"
    )
    for label, ratios in (("probe off / anchor", off), ("probe on (patterns) / anchor", probed)):
        print(
            f"{label:30s} median {statistics.median(ratios):.3f} "
            f"(range {min(ratios):.3f}-{max(ratios):.3f})"
        )


if __name__ == "__main__":
    main()
