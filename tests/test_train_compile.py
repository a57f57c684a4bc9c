"""fit(..., compile=True) and fit(..., loss_chunk_size=...): the same training as eager.

Compiling is slow, so one test compiles with inductor (the real backend: losses equal
over 50 steps, no recompile for evaluation or a short last batch); the others compile
with ``aot_eager`` (dynamo and AOTAutograd, no code generation), which checks what fit
controls (guards, recompiles, fallbacks, MoE, adapters, callbacks) in seconds.
"""

import functools
import warnings

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

import lab.train.compiled
import lab.train.loop
from lab import GPT, Config, registry
from lab.finetune.adapter import apply_adapter
from lab.finetune.lora import apply_lora
from lab.moe import Experts
from lab.train import adamw, fit
from lab.train.batches import summed_loss
from lab.widgets import TrainingView

VOCAB, T = 64, 16


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = dict(n_layer=1, n_embd=32, n_head=4, n_query_groups=2, block_size=T,
                  vocab_size=VOCAB, intermediate_size=64) | overrides  # fmt: skip
    return GPT(Config(**config))


def data(short_at: int | None = None):
    """Random token batches; call number ``short_at`` returns 2 rows fewer."""
    calls = []

    def sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(n)
        ids = torch.randint(VOCAB, (n, T + 1), generator=generator)
        if len(calls) == short_at:
            ids = ids[:-2]
        return ids[:, :-1], ids[:, 1:]

    return sample


def graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def run(model: nn.Module, **kwargs):
    kwargs = dict(steps=4, batch_size=4, lr=1e-2, progress=False, device="cpu") | kwargs
    return fit(model, kwargs.pop("data", data()), **kwargs)


@pytest.fixture
def aot_eager(monkeypatch):
    """fit compiles with dynamo + AOTAutograd but generates no code (fast)."""
    monkeypatch.setattr(
        lab.train.compiled.torch, "compile", functools.partial(torch.compile, backend="aot_eager")
    )


def test_compiled_fit_equals_eager_without_recompiling():
    # 50 steps with evaluations on the way and a last batch 2 rows short (call 50 is
    # the last training step's batch: evaluations draw from their own callable).
    kwargs = dict(steps=50, eval_every=20, eval_steps=2, batch_size=4)
    eager = run(tiny(), data=data(short_at=50), **kwargs)
    before = graphs()
    with warnings.catch_warnings(record=True) as caught:
        compiled = run(tiny(), data=data(short_at=50), compile=True, **kwargs)
    assert not [w for w in caught if "fit(compile=True)" in str(w.message)]  # no fallback
    assert graphs() - before == 2  # training and evaluation, each compiled once
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(compiled.grad_norm, eager.grad_norm, rtol=1e-3, atol=1e-5)
    for c, e in zip(compiled.evals, eager.evals, strict=True):
        assert c["val_accuracy"] == e["val_accuracy"]
        assert c["val_loss"] == pytest.approx(e["val_loss"], rel=1e-4)


def test_falls_back_to_eager_without_a_cpp_compiler():
    eager = run(tiny())
    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("no-such-compiler++",)})
    with no_compiler, pytest.warns(UserWarning, match=r"no C\+\+ compiler was found") as caught:
        compiled = run(tiny(), compile=True, eval_every=2, eval_steps=1)
    assert len(caught) == 1 and compiled.loss == eager.loss


def test_an_interrupted_compiled_run_resumes_exactly(tmp_path, aot_eager):
    # The checkpoints of a compiled run must hold the model's own names (no wrapper
    # prefix) and the whole training state, so that resuming, compiled again, replays
    # the uninterrupted run bit for bit.
    kwargs = dict(steps=6, checkpoint_every=2, compile=True)
    straight_model = tiny()
    straight = run(straight_model, checkpoint_dir=tmp_path / "a", **kwargs)

    def interrupt(state):
        if state.step == 3:
            raise KeyboardInterrupt

    first = run(tiny(), checkpoint_dir=tmp_path / "b", callbacks=[interrupt], **kwargs)
    assert first.stopped == "interrupted" and first.step[-1] == 3
    resumed_model = tiny(seed=1)  # other weights: everything comes from step 2's checkpoint
    resumed = run(resumed_model, checkpoint_dir=tmp_path / "b", **kwargs)
    assert resumed.step == list(range(1, 7)) and resumed.stopped == "finished"
    assert resumed.loss == straight.loss and resumed.grad_norm == straight.grad_norm
    for mine, theirs in zip(resumed_model.parameters(), straight_model.parameters(), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("compile", [False, True])
def test_adamw_is_fused_in_the_compiled_step_only(monkeypatch, aot_eager, compile):
    # eager CPU training keeps torch's default AdamW: its results stay bit for bit
    fused = []

    def recorded(model, **kwargs):
        fused.append(kwargs["fused"])
        return adamw(model, **kwargs)

    monkeypatch.setattr(lab.train.loop, "adamw", recorded)
    run(tiny(), steps=1, compile=compile)
    assert fused == [True if compile else None]


class Untraceable(nn.Module):
    """An MLP that reads a value back to Python: dynamo cannot trace it in one graph."""

    def __init__(self, config: Config, block_idx: int = 0) -> None:
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = sum(x.detach().abs().amax(dim=(0, 1)).clamp(max=1.0).tolist()) / x.size(-1)
        return self.fc(x) * scale


def test_falls_back_to_eager_once_for_a_component_that_does_not_trace(aot_eager):
    registry.mlp.register("untraceable-test-mlp", Untraceable)
    eager = run(tiny(mlp_class_name="untraceable-test-mlp"))
    with pytest.warns(UserWarning, match="torch.compile failed") as caught:
        compiled = run(
            tiny(mlp_class_name="untraceable-test-mlp"), compile=True, eval_every=2, eval_steps=1
        )
    ours = [str(w.message) for w in caught if "fit(compile=True)" in str(w.message)]
    assert len(ours) == 1 and "tolist" in ours[0], ours
    assert compiled.loss == eager.loss


def test_moe_compiles_around_the_dispatch_once(aot_eager):
    moe = dict(mlp_class_name="MoE", n_expert=4, n_expert_per_token=2, moe_intermediate_size=16)
    seen, fused = [], []
    eager = run(tiny(**moe), steps=6)
    model = tiny(**moe)
    experts = [m for m in model.modules() if isinstance(m, Experts)]

    def watch(state) -> None:
        seen.append(graphs())
        fused.append(all(e.fused for e in experts))

    before = graphs()
    with warnings.catch_warnings(record=True) as caught:
        compiled = run(model, steps=6, compile=True, eval_every=3, eval_steps=1, callbacks=[watch])
    assert not [w for w in caught if "fit(compile=True)" in str(w.message)]  # no fallback
    assert all(fused) and not any(e.fused for e in experts)  # fused experts for the run only
    assert seen[0] > before  # the dense parts compiled
    # Step 1 compiles the training graphs, the evaluation after step 3 its own; the
    # routing changes every step, and nothing recompiles for it.
    assert seen[1] == seen[2] and len(set(seen[3:])) == 1, seen
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss, rtol=1e-5, atol=1e-6)


def test_adapters_and_callbacks_run_compiled(aot_eager):
    def adapted() -> nn.Module:  # LoRA and LLaMA-Adapter at once: one compilation for both
        model = apply_lora(tiny(n_layer=2), r=2, targets=["query", "value"])
        return apply_adapter(model, prompt_length=2, start_layer=1)

    steps, view = [], TrainingView(interval=0)
    eager = run(adapted())
    before = graphs()
    compiled = run(
        adapted(), compile=True, callbacks=[view, lambda state: steps.append(state.step)]
    )
    assert graphs() > before and steps == [1, 2, 3, 4]  # compiled, and the callback every step
    assert repr(view) == f"TrainingView(step 4/4, loss {compiled.loss[-1]:.3f})"
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-6)


def test_chunked_loss_equals_the_plain_loss_and_its_gradients():
    model = tiny(vocab_size=50)  # padded to 64: chunks see the padded head, as the plain loss
    x, y = torch.randint(50, (3, T)), torch.randint(50, (3, T))
    y[0, :5] = -100  # unlabelled positions
    grads = []
    for chunk in (None, 7):
        model.zero_grad()
        loss = summed_loss(model, x, y, chunk)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        assert loss.item() == pytest.approx(summed_loss(model, x, y).item(), rel=1e-6)
    for plain, chunked in zip(*grads, strict=True):
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)


def test_fit_with_chunked_loss_trains_as_before_also_compiled(aot_eager):
    kwargs = dict(eval_every=2, eval_steps=1)
    plain = run(tiny(), **kwargs)
    for compile in (False, True):
        chunked = run(tiny(), loss_chunk_size=24, compile=compile, **kwargs)
        torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=1e-6)
        assert [e["val_accuracy"] for e in chunked.evals] == [
            e["val_accuracy"] for e in plain.evals
        ]


def test_chunked_loss_needs_hidden_states_and_head():
    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, VOCAB)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.embed(x)

    with pytest.raises(ValueError, match=r"loss_chunk_size=8 needs model\.hidden_states"):
        run(Logits(), loss_chunk_size=8)
    with pytest.raises(ValueError, match="loss_chunk_size=0"):
        run(tiny(), loss_chunk_size=0)


@pytest.mark.parametrize("option", [{"compile": True}, {"loss_chunk_size": 8}])
def test_multi_device_runs_refuse_what_they_do_not_support_yet(option):
    with pytest.raises(ValueError, match="run on one device for now"):
        fit(tiny(), data(), steps=1, batch_size=4, devices=2, **option)
