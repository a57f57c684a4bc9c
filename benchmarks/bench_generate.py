"""Decode speed: lab's KV-cache generation against LitGPT's and transformers'.

The same tiny Llama-like weights (random, fp32) run in all three: lab's ``GPT`` is
copied into LitGPT's ``GPT`` by hand (its names differ: ``attn.qkv``; the gated MLP
split into ``fc_1`` gate, ``fc_2`` up, ``proj`` down) and into ``transformers``'
``LlamaForCausalLM`` through ``lab.checkpoint`` (``save_pretrained(format="hf")``).
lab runs twice: eager, and with ``compile=True`` (its first call, which compiles, is
timed apart). Each times greedy generation of ``--new-tokens`` tokens after a 16-token prompt,
KV cache on, at batch 1 and 8, in one process, round by round in turn, after a
warm-up; each round gives a ratio of throughputs (lab / other), and the median and
range over rounds are printed, with the thread count. Greedy tokens are compared
too, to show all three computed the same thing.

    python -m benchmarks.bench_generate --quick      # check it runs (seconds)
    python -m benchmarks.bench_generate              # the measurement (about a minute)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial

import litgpt
import torch
import transformers
from litgpt.generate.base import batched_generate_fn
from litgpt.generate.base import generate as litgpt_generate

from benchmarks.common import litgpt_state
from lab import GPT, Config
from lab.checkpoint import save_pretrained
from lab.generate import generate

PROMPT_LENGTH = 16


def lab_config() -> Config:
    return Config(
        name="tiny-llama", block_size=512, vocab_size=8192, n_layer=4, n_embd=256, n_head=8,
        n_query_groups=2, intermediate_size=704, norm_eps=1e-5, rope_base=10000.0,
    )  # fmt: skip


def to_litgpt(model: GPT) -> litgpt.GPT:
    """The same weights in LitGPT 0.5's layout (fused Q|K|V is laid out alike)."""
    c = model.config
    config = litgpt.Config(
        name=c.name, block_size=c.block_size, vocab_size=c.vocab_size,
        padded_vocab_size=c.padded_vocab_size, n_layer=c.n_layer, n_embd=c.n_embd,
        n_head=c.n_head, n_query_groups=c.n_query_groups, head_size=c.head_size,
        intermediate_size=c.intermediate_size, rotary_percentage=1.0, rope_base=int(c.rope_base),
        parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=c.norm_eps,
        mlp_class_name="LLaMAMLP",
    )  # fmt: skip
    other = litgpt.GPT(config)
    other.load_state_dict(litgpt_state(model))
    return other.eval()


def to_transformers(model: GPT) -> transformers.PreTrainedModel:
    with tempfile.TemporaryDirectory() as directory:
        save_pretrained(model, directory, format="hf")
        other = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    other.generation_config.eos_token_id = None  # never stop early
    other.generation_config.pad_token_id = 0
    return other.eval()


def runners(model: GPT, new_tokens: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """name -> function from prompts (B, L) to the new ids (B, new_tokens)."""
    lit, hf = to_litgpt(model), to_transformers(model)
    total = PROMPT_LENGTH + new_tokens

    def run_lab(prompts: torch.Tensor, compile: bool = False) -> torch.Tensor:
        return torch.stack(
            generate(model, list(prompts), new_tokens, temperature=0, compile=compile)
        )

    def run_litgpt(prompts: torch.Tensor) -> torch.Tensor:
        lit.max_seq_length = total
        lit.set_kv_cache(batch_size=prompts.size(0))
        if prompts.size(0) == 1:
            out = litgpt_generate(lit, prompts[0], total, temperature=0.0, include_prompt=False)
            return out[None]
        steps = batched_generate_fn(
            lit, prompts, total, sample_args={"temperature": 0.0},
            include_prompt=False, include_eos=False,
        )  # fmt: skip
        return torch.stack([torch.cat(step) for step in steps], dim=1)

    def run_transformers(prompts: torch.Tensor) -> torch.Tensor:
        out = hf.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, use_cache=True,
        )  # fmt: skip
        return out[:, prompts.size(1) :]

    return {
        "lab": run_lab,
        "lab compiled": partial(run_lab, compile=True),
        "litgpt": run_litgpt,
        "transformers": run_transformers,
    }


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 16 tokens: a smoke test")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    rounds, new_tokens = (2, 16) if args.quick else (args.rounds, args.new_tokens)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(lab_config()).eval()
    run = runners(model, new_tokens)
    print(
        f"torch {torch.__version__}, litgpt {importlib.metadata.version('litgpt')}, transformers "
        f"{transformers.__version__}; {torch.get_num_threads()} thread(s); {rounds} rounds; "
        f"greedy, {new_tokens} new tokens after {PROMPT_LENGTH}; fp32 CPU"
    )
    for batch_size in args.batch_sizes:
        prompts = torch.randint(model.config.vocab_size, (batch_size, PROMPT_LENGTH))
        outputs, warm_up = {}, {}
        for name, fn in run.items():  # warm-up (and compilation) and the tokens to compare
            start = time.perf_counter()
            outputs[name] = fn(prompts)
            warm_up[name] = time.perf_counter() - start
        same = {name: torch.equal(out, outputs["lab"]) for name, out in outputs.items()}
        seconds: dict[str, list[float]] = {name: [] for name in run}
        for _ in range(rounds):
            for name, fn in run.items():
                start = time.perf_counter()
                fn(prompts)
                seconds[name].append(time.perf_counter() - start)
        tokens = batch_size * new_tokens
        print(
            f"\nbatch {batch_size}:  (first call of lab compiled: {warm_up['lab compiled']:.1f} s)"
        )
        for name in run:
            rate = tokens / statistics.median(seconds[name])
            print(f"  {name:<13} {rate:>8,.0f} tokens/s   same greedy tokens as lab: {same[name]}")
        for mine in ("lab", "lab compiled"):
            for other in ("litgpt", "transformers"):
                ratios = [o / s for o, s in zip(seconds[other], seconds[mine], strict=True)]
                print(
                    f"  {mine:<13} vs {other:<13} {statistics.median(ratios):.2f}x "
                    f"(range {min(ratios):.2f}-{max(ratios):.2f})"
                )


if __name__ == "__main__":
    main()
