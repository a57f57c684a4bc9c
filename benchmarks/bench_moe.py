"""lab.moe.MoE against litgpt.model.LLaMAMoE, and a Mixtral-like training step.

Layer races (n_embd 256, 4096 tokens, fp32, Mixtral routing "topk_softmax", dropless):

* 8 experts, top-2, expert width 512 (Mixtral shape);
* 32 experts, top-4, expert width 256 (fine-grained: same active FLOPs).

Model race: a 4-layer Mixtral-like GPT (GQA, 8 experts top-2), forward + backward +
AdamW step on 8 x 256 tokens. lab runs twice: the default experts, and the fused
expert path (``lab.moe.fuse_experts``; its first call compiles two small kernels,
timed apart). All get identical weights (copied, and checked by comparing outputs),
then are timed in one process, interleaved round by round (alternating who goes
first) so that a neighbour's load slows all alike. Prints the median time of each
and the median LitGPT/lab speed ratio with its range over rounds.

    python -m benchmarks.bench_moe               # 1 thread, the steadiest
    python -m benchmarks.bench_moe --threads 2 --rounds 15
    python -m benchmarks.bench_moe --quick       # a smoke run
    python -m benchmarks.bench_moe --profile     # top operators of each layer, no race

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
from litgpt.model import LLaMAMoE

from benchmarks.common import race, speedup
from lab import GPT, Config
from lab.moe import MoE, fuse_experts

LAYERS = {"8 experts top-2": (8, 2, 512), "32 experts top-4": (32, 4, 256)}
MODEL = dict(
    n_layer=4, n_embd=256, n_head=8, n_query_groups=2, block_size=256, vocab_size=4096,
    intermediate_size=1024, n_expert=8, n_expert_per_token=2, moe_intermediate_size=512,
)  # fmt: skip


def configs(**sizes) -> tuple[Config, LitConfig]:
    lab = Config(mlp_class_name="MoE", router="topk_softmax", **sizes)
    lit = LitConfig(
        mlp_class_name="LLaMAMoE", padded_vocab_size=lab.padded_vocab_size,
        rotary_percentage=1.0, parallel_residual=False, bias=False,
        norm_class_name="RMSNorm", norm_eps=lab.norm_eps, **sizes,
    )  # fmt: skip
    return lab, lit


def lit_state(lab_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lab's names and stacked experts -> LitGPT's (gate, experts.e.fc_1/fc_2/proj)."""
    state = {}
    for name, tensor in lab_state.items():
        if name.endswith("router.weight"):
            state[name.replace("router.weight", "gate.weight")] = tensor
        elif name.endswith("experts.fc_1"):
            for e, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                state[name.replace("fc_1", f"{e}.fc_1.weight")] = gate
                state[name.replace("fc_1", f"{e}.fc_2.weight")] = up
        elif name.endswith("experts.fc_2"):
            for e, down in enumerate(tensor):
                state[name.replace("fc_2", f"{e}.proj.weight")] = down
        else:
            state[name.replace("attn.attn.", "attn.qkv.")] = tensor
    return state


def report(name: str, fns: dict[str, Callable[[], None]], rounds: int) -> None:
    """Race the functions (one call per round); print the median times and each lab
    contestant's speed-up over LitGPT, by wall clock and by the process's CPU time
    (which on a shared machine leaves out the time other tenants hold the core)."""
    cpu: dict[str, list[float]] = {n: [] for n in fns}

    def cpu_timed(name: str) -> Callable[[], None]:
        def run() -> None:
            start = time.process_time()
            fns[name]()
            cpu[name].append(time.process_time() - start)

        return run

    wall = race({n: cpu_timed(n) for n in fns}, rounds)
    cpu = {n: t[1:] for n, t in cpu.items()}  # the first call was race's warm-up
    print(name)
    for clock, times in (("wall", wall), ("cpu", cpu)):
        medians = "   ".join(f"{n} {statistics.median(t) * 1e3:.1f} ms" for n, t in times.items())
        print(f"    {clock:<4} {medians}")
        for n in fns:
            if n != "litgpt":
                print(f"    {clock:<4} {n} speed-up over litgpt {speedup(times, lab=n)}")


def layer_contestants(
    label: str, n_expert: int, k: int, width: int, tokens: int
) -> tuple[dict[str, torch.nn.Module], torch.Tensor]:
    """lab's layer, a fused copy and LitGPT's, same weights and outputs; and an input."""
    lab_config, lit_config = configs(
        n_layer=1, n_embd=256, n_head=4, n_expert=n_expert, n_expert_per_token=k,
        moe_intermediate_size=width,
    )  # fmt: skip
    torch.manual_seed(0)
    lab, lit = MoE(lab_config), LLaMAMoE(lit_config)
    lit.load_state_dict(lit_state(lab.state_dict()))
    fused = fuse_experts(copy.deepcopy(lab))
    x = torch.randn(1, tokens, 256)
    torch.testing.assert_close(lab(x), lit(x), atol=1e-5, rtol=1e-4)
    start = time.perf_counter()
    torch.testing.assert_close(fused(x), lit(x), atol=1e-5, rtol=1e-4)
    print(
        f"{label}: fused path's first call (compiles its kernels) {time.perf_counter() - start:.1f} s"
    )
    return {"lab": lab, "lab fused": fused, "litgpt": lit}, x


def forward_backward(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    x_grad, grad = x.clone().requires_grad_(), torch.randn_like(x)

    def run() -> None:
        layer(x_grad).backward(grad)

    return run


def layer_race(label: str, n_expert: int, k: int, width: int, tokens: int, rounds: int) -> None:
    layers, x = layer_contestants(label, n_expert, k, width, tokens)

    def forward(layer):
        def run() -> None:
            with torch.no_grad():
                layer(x)

        return run

    report(f"{label}, forward", {n: forward(m) for n, m in layers.items()}, rounds)
    report(
        f"{label}, forward+backward",
        {n: forward_backward(m, x) for n, m in layers.items()},
        rounds,
    )


def layer_profile(label: str, n_expert: int, k: int, width: int, tokens: int) -> None:
    """The top operators (self CPU time) of three forward+backward passes of each."""
    layers, x = layer_contestants(label, n_expert, k, width, tokens)
    for name, layer in layers.items():
        run = forward_backward(layer, x)
        run()
        with torch.profiler.profile() as prof:
            for _ in range(3):
                run()
        print(f"{label}, forward+backward x3, {name}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


def model_race(batch: int, seq_len: int, rounds: int) -> None:
    lab_config, lit_config = configs(**MODEL)
    torch.manual_seed(0)
    lab, lit = GPT(lab_config), LitGPT(lit_config)
    lit.load_state_dict(lit_state(lab.state_dict()))
    fused = fuse_experts(copy.deepcopy(lab))
    idx = torch.randint(0, lab_config.vocab_size, (batch, seq_len + 1))
    x, y = idx[:, :-1], idx[:, 1:]
    with torch.no_grad():
        torch.testing.assert_close(lab(x), lit(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fused(x), lit(x), atol=1e-4, rtol=1e-4)

    def train_step(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run() -> None:
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return run

    label = f"Mixtral-like model {batch}x{seq_len}, train step"
    models = {"lab": lab, "lab fused": fused, "litgpt": lit}
    report(label, {n: train_step(m) for n, m in models.items()}, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per race")
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds: a smoke run")
    parser.add_argument("--profile", action="store_true", help="profile the layers, no race")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens, batch, seq_len, rounds = (512, 2, 64, 2) if args.quick else (4096, 8, 256, args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {rounds} rounds")
    for label, (n_expert, k, width) in LAYERS.items():
        if args.profile:
            layer_profile(f"MoE layer {label}, {tokens} tokens", n_expert, k, width, tokens)
            continue
        layer_race(f"MoE layer {label}, {tokens} tokens", n_expert, k, width, tokens, rounds)
    if not args.profile:
        model_race(batch, seq_len, rounds)


if __name__ == "__main__":
    main()
