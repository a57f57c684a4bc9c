"""lab.train.fit against a bare training loop on the same model: what does fit cost?

Both train the same model (identical initial weights) on the same kind of batches
(random token ids drawn from a seeded generator, inside the timed region for both) with
the same work per step: forward, summed cross-entropy / labelled tokens, backward,
gradient clipping to norm 1, AdamW with decay on matrices only and a per-step learning
rate, and the loss read back as a number. The bare loop is nanoGPT's inner loop and
nothing else; fit adds its bookkeeping (micro-batch slicing, finite checks, history,
callbacks, the schedule, optimizer setup per call). Each round times a whole call of
``steps`` steps of each, interleaved round by round (alternating who goes first) in one
process so that a neighbour's load slows both alike. Prints tokens/s of each, the median
overhead of fit (time_fit / time_bare - 1) with its range over rounds, and model FLOP
utilisation (``lab.flops.flops_per_token(..., training=True)``) against this machine's
measured fp32 matmul peak. Target: overhead under 5%.

Because whole-run ratios swing by +-10% on a shared machine, it also measures fit's own
work per step directly: fit minus the bare loop on a model so small that the
bookkeeping dominates each step, and prints it as a share of a benchmark step.

    python -m benchmarks.bench_train             # 1 thread, the steadiest
    python -m benchmarks.bench_train --threads 2 --rounds 7 --progress
    python -m benchmarks.bench_train --quick     # a smoke run (numbers are noise)
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from benchmarks.common import race
from lab import GPT, Config
from lab.flops import flops_per_token, measure_cpu_peak_flops, mfu
from lab.train import adamw, fit, learning_rate

# The lab halves of benchmarks/bench_model.py's configs: 4 layers, n_embd 256, vocab 4096.
SHARED = dict(n_layer=4, n_embd=256, n_head=4, block_size=256, vocab_size=4096)
ARCHITECTURES = {
    "pythia-like": dict(
        parallel_residual=True, rotary_percentage=0.25, bias=True, intermediate_size=1024,
        norm_class_name="LayerNorm", mlp_class_name="MLP", activation="gelu",
    ),
    "llama-like-gqa": dict(n_query_groups=2, intermediate_size=688, norm_eps=1e-5),
}  # fmt: skip
LR, WEIGHT_DECAY, BETAS, GRAD_CLIP = 1e-4, 0.1, (0.9, 0.95), 1.0


def random_tokens(vocab_size: int, seq_len: int) -> Callable:
    """A data callable for fit: (batch_size, generator) -> (x, y) of random ids."""

    def sample(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(vocab_size, (batch_size, seq_len + 1), generator=generator)
        return ids[:, :-1], ids[:, 1:]

    return sample


def bare_loop(model: GPT, data: Callable, steps: int, batch_size: int) -> None:
    """The loop fit wraps, written out: the same optimisation, no bookkeeping."""
    optimizer = adamw(model, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, lr=LR, steps=steps)
        x, y = data(batch_size, generator)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()


def bookkeeping_per_step(rounds: int, steps: int = 200) -> float:
    """fit's own work per step, in seconds: fit's time minus the bare loop's on a model so
    small (1 layer, n_embd 16, batch 1 x 8) that the bookkeeping is most of a step, so the
    difference stands out of the noise; median over interleaved rounds."""
    config = Config(n_layer=1, n_embd=16, n_head=2, block_size=8, vocab_size=64)
    torch.manual_seed(0)
    fit_model, bare_model = GPT(config), GPT(config)
    data = random_tokens(config.vocab_size, 8)
    fns = {
        "fit": partial(
            fit, fit_model, data, steps=steps, batch_size=1, lr=LR, weight_decay=WEIGHT_DECAY,
            betas=BETAS, grad_clip=GRAD_CLIP, progress=False, device="cpu",
        ),
        "bare": partial(bare_loop, bare_model, data, steps, 1),
    }  # fmt: skip
    times = race(fns, rounds)
    return statistics.median(
        (f - b) / steps for f, b in zip(times["fit"], times["bare"], strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per timed call")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--progress", action="store_true", help="fit with its tqdm bar")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.batch, args.seq = 2, 3, 2, 64
    torch.set_num_threads(args.threads)
    peak = measure_cpu_peak_flops(repeats=20)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, "
        f"batch {args.batch} x {args.seq}, {args.steps} steps per call, progress bar "
        f"{'on' if args.progress else 'off'}; measured matmul peak {peak / 1e9:.1f} GFLOP/s; "
        f"{args.rounds} interleaved rounds, median [min-max]"
    )
    tokens = args.steps * args.batch * args.seq
    own = bookkeeping_per_step(args.rounds, steps=20 if args.quick else 200)
    print(f"  fit's own work per step (tiny model, fit minus bare): {own * 1e3:.2f} ms")
    for arch, extra in ARCHITECTURES.items():
        config = Config(**SHARED, **extra)
        torch.manual_seed(0)
        fit_model, bare_model = GPT(config), GPT(config)
        bare_model.load_state_dict(fit_model.state_dict())
        data = random_tokens(config.vocab_size, args.seq)
        fns = {
            "fit": partial(
                fit, fit_model, data, steps=args.steps, batch_size=args.batch, lr=LR,
                weight_decay=WEIGHT_DECAY, betas=BETAS, grad_clip=GRAD_CLIP,
                progress=args.progress, device="cpu",
            ),
            "bare": partial(bare_loop, bare_model, data, args.steps, args.batch),
        }  # fmt: skip
        times = race(fns, args.rounds)
        overheads = sorted(f / b - 1 for f, b in zip(times["fit"], times["bare"], strict=True))
        flops = flops_per_token(config, args.seq, training=True) * tokens
        line = [f"  {arch:<15}"]
        for name in fns:
            seconds = statistics.median(times[name])
            line.append(
                f"{name} {tokens / seconds:>9,.0f} tok/s (MFU {mfu(flops, seconds, peak):.0%})"
            )
        line.append(
            f"fit overhead {statistics.median(overheads):+.1%} "
            f"[{overheads[0]:+.1%} to {overheads[-1]:+.1%}]"
        )
        bare_step = statistics.median(times["bare"]) / args.steps
        line.append(f"own work {own / bare_step:.2%} of a step")
        print("   ".join(line))


if __name__ == "__main__":
    main()
