"""lab.GPT against litgpt.model.GPT: training step, forward, and KV-cache decoding.

Both models are built from the same hyperparameters (a Pythia-like and a LLaMA-like
GQA model, 4 layers, n_embd 256, block 256, vocab 4096, fp32) with identical weights
(copied, and checked by comparing logits), then raced in one process, interleaved
round by round so that a neighbour's load slows both alike. Prints tokens/s of each,
the median ratio lab/LitGPT with its range over rounds, and model FLOP utilisation
against this machine's measured fp32 matmul peak.

    python -m benchmarks.bench_model             # 1 thread, the steadiest
    python -m benchmarks.bench_model --threads 2 --rounds 7
    python -m benchmarks.bench_model --quick     # a smoke run
    python -m benchmarks.bench_model --compile --train-only   # compiled training steps too

Needs the bench extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from litgpt.config import Config as LitConfig
from litgpt.model import GPT as LitGPT

from benchmarks.common import litgpt_state, race, speedup
from lab import GPT, Config
from lab.flops import flops_per_token, measure_cpu_peak_flops
from lab.train import adamw
from lab.train.compiled import MicroSteps

SHARED = dict(n_layer=4, n_embd=256, n_head=4, block_size=256, vocab_size=4096)
ARCHITECTURES = {
    "pythia-like": (
        dict(parallel_residual=True, rotary_percentage=0.25, bias=True, intermediate_size=1024,
             norm_class_name="LayerNorm", mlp_class_name="MLP", activation="gelu"),
        dict(parallel_residual=True, rotary_percentage=0.25, bias=True, intermediate_size=1024,
             norm_class_name="LayerNorm", mlp_class_name="GptNeoxMLP", padded_vocab_size=4096),
    ),
    "llama-like-gqa": (
        dict(n_query_groups=2, intermediate_size=688, norm_eps=1e-5),
        dict(n_query_groups=2, intermediate_size=688, rotary_percentage=1.0,
             parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=1e-5,
             mlp_class_name="LLaMAMLP", padded_vocab_size=4096),
    ),
}  # fmt: skip


def train_step_fn(
    model, batch: tuple[torch.Tensor, torch.Tensor], compiled: str = ""
) -> Callable[[], None]:
    """Forward, mean cross-entropy, backward, AdamW. ``compiled="lab"``: forward, loss
    and backward as ``fit(..., compile=True)`` runs them (``lab.train.compiled``);
    ``"torch"``: the same function through a plain ``torch.compile`` (LitGPT's recipe).
    Each library's own AdamW: lab's as ``fit`` builds it (``lab.train.adamw``: fused in
    the compiled step, torch's default eagerly on a CPU), LitGPT's as its pretraining
    script does (fused only on CUDA)."""
    if isinstance(model, GPT):
        optimizer = adamw(  # torch's default hyperparameters, as LitGPT's below
            model, lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), fused=compiled == "lab" or None
        )
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch

    micro = MicroSteps(model, x.device, None, compile=True) if compiled == "lab" else None

    def loss_fn(model, x, y) -> torch.Tensor:
        if micro is not None:  # summed over tokens, as fit computes it
            return micro.loss(model, x, y) / y.numel()
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    if compiled == "torch":
        loss_fn = torch.compile(loss_fn)

    def step() -> None:
        loss_fn(model, x, y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def first_call(fn: Callable[[], None]) -> float:
    """Seconds of ``fn``'s first call (for a compiled step: mostly compilation)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forward_fn(model, x: torch.Tensor) -> Callable[[], None]:
    def forward() -> None:
        with torch.no_grad():
            model(x)

    return forward


def decode_fn(model, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """Prefill ``prompt`` then decode ``new_tokens`` greedily, one at a time."""
    B, T = prompt.shape

    def decode() -> None:
        with torch.no_grad():
            model.set_kv_cache(batch_size=B, max_seq_length=T + new_tokens)
            logits = model(prompt, input_pos=torch.arange(T))
            token = logits[:, -1:].argmax(-1)
            for pos in range(T, T + new_tokens):
                logits = model(token, input_pos=torch.tensor([pos]))
                token = logits[:, -1:].argmax(-1)

    return decode


def report(task: str, tokens: int, times: dict[str, list[float]], flops: float, peak: float):
    lab_t, lit_t = times["lab"], times["litgpt"]
    lab_tps, lit_tps = tokens / statistics.median(lab_t), tokens / statistics.median(lit_t)
    mfu = lab_tps * flops / peak if flops else float("nan")
    print(
        f"  {task:<9} lab {lab_tps:>10,.0f} tok/s   litgpt {lit_tps:>10,.0f} tok/s   "
        f"lab/litgpt {speedup(times)}" + (f"   lab MFU {mfu:.0%}" if flops else "")
    )
    if "lab compiled" in times:
        lab_c, lit_c = (
            tokens / statistics.median(times[k]) for k in ("lab compiled", "litgpt compiled")
        )
        print(
            f"  {'compiled':<9} lab {lab_c:>10,.0f} tok/s   litgpt {lit_c:>10,.0f} tok/s   "
            f"lab compiled/litgpt eager {speedup(times, 'lab compiled')}   "
            f"lab compiled/litgpt compiled {speedup(times, 'lab compiled', 'litgpt compiled')}"
            f"   lab MFU {lab_c * flops / peak:.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument(
        "--compile", action="store_true", help="also race compiled training steps of both"
    )
    parser.add_argument("--train-only", action="store_true", help="only the training step")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.batch, args.seq = 2, 2, 64
    torch.set_num_threads(args.threads)
    peak = measure_cpu_peak_flops(repeats=20)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, "
        f"batch {args.batch} x {args.seq}; measured matmul peak {peak / 1e9:.1f} GFLOP/s; "
        f"{args.rounds} interleaved rounds, median ratio [min-max]"
    )
    for arch, (lab_extra, lit_extra) in ARCHITECTURES.items():
        torch.manual_seed(0)
        config = Config(**SHARED, **lab_extra)
        lab_model = GPT(config)
        lit_model = LitGPT(LitConfig(**SHARED, **lit_extra))
        lit_model.load_state_dict(litgpt_state(lab_model))
        x = torch.randint(0, config.vocab_size, (args.batch, args.seq))
        y = torch.randint(0, config.vocab_size, (args.batch, args.seq))
        with torch.no_grad():
            torch.testing.assert_close(lab_model(x[:1]), lit_model(x[:1]), atol=1e-4, rtol=1e-4)
        print(
            f"{arch} ({sum(p.numel() for p in lab_model.parameters()):,} parameters; same logits)"
        )
        tokens = args.batch * args.seq
        models = {"lab": lab_model, "litgpt": lit_model}
        steps = {k: train_step_fn(m, (x, y)) for k, m in models.items()}
        if args.compile:  # copies of the models, so every contestant starts from the same weights
            for name, compiled in (("lab", "lab"), ("litgpt", "torch")):
                steps[f"{name} compiled"] = train_step_fn(
                    copy.deepcopy(models[name]), (x, y), compiled
                )
            seconds = {k: first_call(steps[k]) for k in ("lab compiled", "litgpt compiled")}
            print(
                "  first step, compiling: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
            )
        train = race(steps, args.rounds, 2)
        report("train", tokens, train, flops_per_token(config, args.seq, True), peak)
        if args.train_only:
            continue
        forward = race({k: forward_fn(m, x) for k, m in models.items()}, args.rounds, 3)
        report("forward", tokens, forward, flops_per_token(config, args.seq, False), peak)
        new = 16 if args.quick else 64
        prompt = x[:1, :16]
        decode = race({k: decode_fn(m, prompt, new) for k, m in models.items()}, args.rounds)
        report("decode b1", new, decode, 0.0, peak)


if __name__ == "__main__":
    main()
