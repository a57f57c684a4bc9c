"""Fine-tuning methods side by side: full, LoRA, LLaMA-Adapter, AdapterV2, in lab and LitGPT.

For each method: trainable parameters, optimizer-state bytes (AdamW, after one
step) and the time of one training step (forward, backward, AdamW on the trainable
parameters), lab against LitGPT 0.5.13's own implementation of the same method.
Both start from the same base weights (a LLaMA-like GQA model, fp32) and are
checked to give the same logits at initialisation before they race, in one
process, interleaved round by round (alternating who goes first) so a neighbour's
load slows both alike. Prints the median ratio LitGPT time / lab time with its
range over rounds.

    python -m benchmarks.bench_finetune             # 1 thread, the steadiest
    python -m benchmarks.bench_finetune --threads 2 --rounds 7
    python -m benchmarks.bench_finetune --quick     # a smoke run (numbers are noise)

Settings: LoRA r=8, alpha=16 on query and value (Hu et al.; LitGPT's LoRA has the
same per-part layout on the fused QKV); adapters with a 10-vector prefix from
layer 1 on. Needs the bench extra: pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
import statistics

import litgpt.adapter
import litgpt.adapter_v2
import litgpt.lora
import torch
import torch.nn.functional as F
from litgpt.config import Config as LitConfig
from litgpt.model import GPT as LitGPT
from torch import nn

from benchmarks.common import litgpt_state, race, speedup
from lab import GPT, Config
from lab.finetune.adapter import apply_adapter, mark_only_adapter_as_trainable
from lab.finetune.adapter_v2 import apply_adapter_v2
from lab.finetune.lora import apply_lora, mark_only_lora_as_trainable

LORA = dict(r=8, lora_alpha=16)
ADAPTER = dict(prompt_length=10, start_layer=1)


def lab_variant(base: GPT, method: str) -> nn.Module:
    model = GPT(base.config)
    model.load_state_dict(base.state_dict())
    if method == "lora":
        apply_lora(model, **LORA, targets=("query", "value"))
        mark_only_lora_as_trainable(model)
    elif method in ("adapter", "adapter_v2"):
        (apply_adapter if method == "adapter" else apply_adapter_v2)(model, **ADAPTER)
        mark_only_adapter_as_trainable(model)
    return model


def lit_variant(lit_base: LitGPT, lit_config: dict, method: str) -> nn.Module:
    """A fresh LitGPT model for ``method``; its load hooks map the base names (``attn.qkv.weight``
    to ``attn.qkv.linear.weight`` ...), so the base state dict loads with strict=False."""
    if method == "full":  # a copy: the race trains it
        model = LitGPT(LitConfig(**lit_config))
        model.load_state_dict(lit_base.state_dict())
        return model
    if method == "lora":
        config = litgpt.lora.Config(
            **lit_config, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_query=True,
            lora_value=True,
        )  # fmt: skip
        model, mark = litgpt.lora.GPT(config), litgpt.lora.mark_only_lora_as_trainable
    else:
        module = litgpt.adapter if method == "adapter" else litgpt.adapter_v2
        config = module.Config(
            **lit_config, adapter_prompt_length=ADAPTER["prompt_length"],
            adapter_start_layer=ADAPTER["start_layer"],
        )  # fmt: skip
        model = module.GPT(config)
        mark = getattr(module, f"mark_only_{method}_as_trainable")
    model.load_state_dict(lit_base.state_dict(), strict=False)
    mark(model)
    return model


def train_step_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]):
    """A training step closure, and its optimizer (for the state's size)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = batch

    def step() -> None:
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    sizes = dict(n_layer=4, n_embd=256, n_head=4, n_query_groups=2, intermediate_size=688)
    if args.quick:
        args.rounds, args.repeats, args.batch, args.seq = 2, 1, 2, 32
        sizes = dict(n_layer=2, n_embd=64, n_head=4, n_query_groups=2, intermediate_size=172)
    torch.set_num_threads(args.threads)
    shared = dict(sizes, block_size=max(args.seq, 32), vocab_size=4096)
    lit_config = dict(
        shared, rotary_percentage=1.0, parallel_residual=False, bias=False,
        norm_class_name="RMSNorm", norm_eps=1e-5, mlp_class_name="LLaMAMLP",
        padded_vocab_size=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    base = GPT(Config(**shared, norm_eps=1e-5))
    lit_base = LitGPT(LitConfig(**lit_config))
    lit_base.load_state_dict(litgpt_state(base))
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 4096, (2, args.batch, args.seq), generator=generator)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32, "
        f"LLaMA-like GQA {sizes}, batch {args.batch} x {args.seq}; {args.rounds} interleaved "
        f"rounds of {args.repeats} steps; ratio = LitGPT time / lab time, median [min-max]"
    )
    print(
        f"{'method':<11}{'trainable':>12}{'(litgpt)':>12}{'AdamW state':>13}{'(litgpt)':>11}"
        f"{'lab step':>11}{'litgpt step':>13}  ratio"
    )
    for method in ("full", "lora", "adapter", "adapter_v2"):
        ours, theirs = lab_variant(base, method), lit_variant(lit_base, lit_config, method)
        with torch.no_grad():
            torch.testing.assert_close(ours(x[:1]), theirs(x[:1]), atol=1e-4, rtol=1e-4)
        (lab_step, lab_opt), (lit_step, lit_opt) = (
            train_step_fn(ours, (x, y)),
            train_step_fn(theirs, (x, y)),
        )
        lab_step(), lit_step()  # warm up, and fill the optimizer state
        times = race({"lab": lab_step, "litgpt": lit_step}, args.rounds, args.repeats)
        print(
            f"{method:<11}{trainable(ours):>12,}{trainable(theirs):>12,}"
            f"{state_bytes(lab_opt) / 2**20:>10.2f}MiB{state_bytes(lit_opt) / 2**20:>8.2f}MiB"
            f"{statistics.median(times['lab']) * 1e3:>9.1f}ms"
            f"{statistics.median(times['litgpt']) * 1e3:>11.1f}ms"
            f"  {speedup(times)}"
        )


if __name__ == "__main__":
    main()
