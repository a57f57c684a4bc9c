"""fit(): optimisation against a hand-written loop, schedules, exact resume, faults."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lab.api import LLM
from lab.checkpoint import load_pretrained
from lab.config import Config
from lab.data import MQAR, TokenDataset
from lab.errors import CheckpointError
from lab.model import GPT
from lab.train import (
    NonFiniteLossError,
    adamw,
    fit,
    latest_checkpoint,
    learning_rate,
    load_weights,
    optimizer_groups,
)

TASK = MQAR(num_pairs=4, num_keys=16, num_values=16)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    kwargs = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=TASK.vocab_size, block_size=32)
    return GPT(Config(**(kwargs | overrides)))


def quiet_fit(model: nn.Module, data=TASK, **kwargs):
    kwargs = {"steps": 6, "batch_size": 8, "lr": 3e-3, "progress": False} | kwargs
    return fit(model, data, **kwargs)


def params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# --- schedule and optimiser groups ------------------------------------------------------


def test_cosine_matches_torch_scheduler_after_warmup():
    lr, min_lr, warmup, steps = 1e-3, 1e-4, 5, 25
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=min_lr)
    expected = []
    for _ in range(steps - warmup):
        opt.step()
        ref.step()
        expected.append(opt.param_groups[0]["lr"])
    ours = [
        learning_rate(s, lr=lr, steps=steps, warmup_steps=warmup, min_lr=min_lr)
        for s in range(warmup + 1, steps + 1)
    ]
    assert ours == pytest.approx(expected, rel=1e-9)
    warm = [learning_rate(s, lr=lr, steps=steps, warmup_steps=warmup) for s in range(1, 6)]
    assert warm == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])


def test_linear_and_constant_schedules():
    kw = dict(lr=1.0, steps=10, warmup_steps=0, min_lr=0.0)
    assert learning_rate(5, schedule="linear", **kw) == pytest.approx(0.5)
    assert learning_rate(10, schedule="linear", **kw) == pytest.approx(0.0)
    assert learning_rate(7, schedule="constant", **kw) == 1.0


def test_weight_decay_only_on_trainable_matrices():
    model = tiny_gpt(tie_embeddings=True)
    model.transformer.h[0].attn.attn.weight.requires_grad_(False)
    decay, no_decay = optimizer_groups(model, 0.1)
    named = {id(p): n for n, p in model.named_parameters()}
    decayed = {named[id(p)] for p in decay["params"]}
    assert "lm_head.weight" in decayed  # tied with the embedding: listed once
    assert sum(p is model.transformer.wte.weight for p in decay["params"]) == 1
    assert "transformer.h.0.attn.attn.weight" not in decayed  # frozen
    assert "transformer.h.1.attn.attn.weight" in decayed
    assert all(named[id(p)].endswith(("norm_1.weight", "norm_2.weight", "ln_f.weight", "bias"))
               for p in no_decay["params"])  # fmt: skip
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable


def test_fused_adamw_agrees_with_the_default():
    model, reference = tiny_gpt(), tiny_gpt()
    fused = adamw(model, lr=1e-2, weight_decay=0.1, fused=True)
    default = torch.optim.AdamW(optimizer_groups(reference, 0.1), lr=1e-2, betas=(0.9, 0.95))
    assert fused.defaults["fused"] and not default.defaults["fused"]
    x = torch.randint(0, TASK.vocab_size, (2, 8))
    for m, opt in ((model, fused), (reference, default)):
        for _ in range(3):
            m(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(params(model), params(reference), rtol=1e-5, atol=1e-6)


# --- the loop against an independent reference --------------------------------------------


def reference_losses(model: nn.Module, steps: int, batch_size: int, lr: float) -> list[float]:
    """A bare nanoGPT-style loop: AdamW, constant lr, no clipping, mean CE."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x, y = TASK.sample(batch_size, generator)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("grad_accum_steps", [1, 4])
def test_fit_matches_a_bare_training_loop(grad_accum_steps):
    model, ref = tiny_gpt(), tiny_gpt()
    expected = reference_losses(ref, steps=6, batch_size=8, lr=3e-3)
    history = quiet_fit(
        model, schedule="constant", grad_clip=None, grad_accum_steps=grad_accum_steps
    )
    assert history.step == [1, 2, 3, 4, 5, 6]
    assert history.loss == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(params(model), params(ref), rtol=1e-4, atol=1e-6)
    assert history.lr == [3e-3] * 6 and all(t > 0 for t in history.tokens_per_s)


def first_moment_norm(checkpoint) -> float:
    """Global norm of AdamW's exp_avg, which after one step is (1 - beta1) * gradient."""
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return torch.cat([s["exp_avg"].flatten() for s in state.values()]).norm().item()


@pytest.mark.parametrize("grad_clip", [None, 1e-3])
def test_gradient_clipping_bounds_the_step_and_records_the_raw_norm(tmp_path, grad_clip):
    history = quiet_fit(tiny_gpt(), steps=1, grad_clip=grad_clip, checkpoint_dir=tmp_path)
    raw = history.grad_norm[0]
    assert raw > 1e-2  # recorded before clipping
    applied = raw if grad_clip is None else grad_clip
    assert first_moment_norm(tmp_path / "step-00000001") == pytest.approx(0.1 * applied, rel=1e-4)


def test_token_streams_callables_and_bf16():
    tokens = np.arange(5000, dtype=np.uint16) % TASK.vocab_size
    data = TokenDataset.from_tokens(tokens)
    history = quiet_fit(tiny_gpt(), data, steps=3, eval_every=3, eval_steps=1, block_size=16)
    assert len(history.loss) == 3 and history.evals[0]["step"] == 3

    def sample(batch_size, generator):
        return TASK.sample(batch_size, generator)

    bf16 = quiet_fit(tiny_gpt(), sample, steps=3, precision="bf16-mixed")
    fp32 = quiet_fit(tiny_gpt(), sample, steps=3)
    assert bf16.loss == pytest.approx(fp32.loss, rel=2e-2) and bf16.loss != fp32.loss
    with pytest.raises(TypeError, match="sample"):
        quiet_fit(tiny_gpt(), [1, 2, 3])


class _GradientSpike(torch.autograd.Function):
    """Identity forward; multiplies the gradient by 1e6 on the way back."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1e6


class SpikeOnce(nn.Module):
    """A model whose first backward pass overflows fp16 (the loss stays finite)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.spike = model, True

    def forward(self, idx):
        logits = self.model(idx)
        if self.spike:
            self.spike = False
            logits = _GradientSpike.apply(logits)
        return logits


def test_fp16_scaler_skips_an_overflowing_step_and_trains_on():
    model = SpikeOnce(tiny_gpt())
    start, after_step = params(model), []
    history = quiet_fit(
        model, echo, steps=30, precision="16-mixed",
        callbacks=[lambda state: after_step.append(params(state.model))],
    )  # fmt: skip
    assert not math.isfinite(history.grad_norm[0])  # overflowed: the scaler skipped it
    assert torch.equal(after_step[0], start)  # weights untouched by the skipped step
    assert all(math.isfinite(x) for x in history.loss + history.grad_norm[1:])
    fp32 = quiet_fit(tiny_gpt(), echo, steps=30)  # fp16 then follows the fp32 run closely
    assert history.loss[-1] == pytest.approx(fp32.loss[-1], rel=0.05)
    assert history.loss[-1] < 0.7 * history.loss[0]


def test_fp16_checkpoints_keep_the_loss_scale(tmp_path):
    quiet_fit(SpikeOnce(tiny_gpt()), echo, steps=4, precision="16-mixed", checkpoint_dir=tmp_path)
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert state["scaler"]["scale"] == 2.0**15  # 2**16 at first, halved by the overflow
    model = SpikeOnce(tiny_gpt())
    model.spike = False
    resumed = quiet_fit(model, echo, steps=6, precision="16-mixed", checkpoint_dir=tmp_path)
    assert resumed.step == list(range(1, 7))
    state = json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())
    assert state["scaler"]["scale"] == 2.0**15  # restored, not back to 2**16


def echo(batch_size, generator):
    """Predict the current token: learnable in tens of steps."""
    x = torch.randint(TASK.vocab_size, (batch_size, 8), generator=generator)
    return x, x.clone()


def test_learns_and_stops_at_the_target():
    seen = []

    class Recorder:
        def on_eval(self, state):
            seen.append(state.metrics["val_accuracy"])

    history = quiet_fit(
        tiny_gpt(), echo, steps=300, batch_size=16, lr=1e-3, eval_every=5, eval_steps=2,
        target={"val_accuracy": 0.95}, callbacks=[Recorder()],
    )  # fmt: skip
    assert history.stopped == "target" and history.step[-1] < 300
    assert seen[-1] >= 0.95 and len(seen) > 1 and max(seen[:-1]) < 0.95
    assert history.metric("val_accuracy")[1] == seen


def test_callback_stop_and_plain_callable():
    def stop_at_3(state):
        state.should_stop = state.step == 3

    history = quiet_fit(tiny_gpt(), callbacks=[stop_at_3])
    assert history.step == [1, 2, 3] and history.stopped == "stopped"


def test_the_guides_custom_gpt_trains():
    from test_guide import CustomGPT, MyModelConfig  # never calls GPT.__init__

    torch.manual_seed(0)
    config = MyModelConfig(
        n_layer=2, n_embd=32, n_head=2, intermediate_size=64, vocab_size=TASK.vocab_size,
        block_size=32,
    )  # fmt: skip
    history = quiet_fit(CustomGPT(config), steps=30, lr=1e-2, batch_size=16)
    assert np.mean(history.loss[-5:]) < np.mean(history.loss[:5]) - 0.1


def test_moe_auxiliary_loss_is_added():
    from lab.moe import auxiliary_loss

    moe = dict(mlp_class_name="MoE", n_expert=4, n_expert_per_token=2, moe_aux_loss_coef=0.5)
    model, ref = tiny_gpt(**moe), tiny_gpt(**moe)
    history = quiet_fit(model, steps=1, schedule="constant", grad_clip=None)
    assert len(history.aux_loss) == 1 and history.aux_loss[0] > 0
    # reference: one AdamW step on CE + aux, by hand
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    rest = [p for p in ref.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=3e-3, betas=(0.9, 0.95),
    )  # fmt: skip
    x, y = TASK.sample(8, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ce = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
    aux = auxiliary_loss(ref)
    (ce + aux).backward()
    opt.step()
    assert history.loss[0] == pytest.approx(ce.item(), rel=1e-5)
    assert history.aux_loss[0] == pytest.approx(aux.item(), rel=1e-5)
    torch.testing.assert_close(params(model), params(ref), rtol=1e-4, atol=1e-6)


# --- checkpoints, resume, faults -----------------------------------------------------------


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    kwargs = dict(steps=10, checkpoint_every=4, eval_every=5, eval_steps=1, warmup_steps=3)
    straight_model = tiny_gpt()
    straight = quiet_fit(straight_model, checkpoint_dir=tmp_path / "a", **kwargs)

    def interrupt(state):
        if state.step == 6:
            raise KeyboardInterrupt

    first = quiet_fit(tiny_gpt(), checkpoint_dir=tmp_path / "b", callbacks=[interrupt], **kwargs)
    assert first.stopped == "interrupted" and first.step[-1] == 6
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004"  # the last good one

    resumed_model = tiny_gpt(seed=123)  # different init: everything comes from the checkpoint
    resumed = quiet_fit(resumed_model, checkpoint_dir=tmp_path / "b", **kwargs)
    assert resumed.step == list(range(1, 11)) and resumed.stopped == "finished"
    assert torch.equal(torch.tensor(resumed.loss), torch.tensor(straight.loss))
    assert resumed.grad_norm == straight.grad_norm and resumed.evals == straight.evals
    assert torch.equal(params(resumed_model), params(straight_model))


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    model = tiny_gpt()

    def poison(state):
        if state.step == 5:
            with torch.no_grad():
                model.lm_head.weight.fill_(math.nan)

    with pytest.raises(NonFiniteLossError, match="loss is nan at step 6") as caught:
        quiet_fit(model, steps=10, checkpoint_dir=tmp_path, checkpoint_every=4, callbacks=[poison])
    assert caught.value.step == 6 and caught.value.history.step[-1] == 5
    assert caught.value.checkpoint == tmp_path / "step-00000004"
    assert latest_checkpoint(tmp_path) == caught.value.checkpoint
    # the checkpoint is intact: resuming finishes the run with finite losses
    history = quiet_fit(tiny_gpt(), steps=10, checkpoint_dir=tmp_path, checkpoint_every=4)
    assert history.step == list(range(1, 11)) and all(map(math.isfinite, history.loss))


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    quiet_fit(tiny_gpt(), steps=2, checkpoint_dir=tmp_path)
    good = (tmp_path / "step-00000002" / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("torch.save", disk_full)
    with pytest.raises(OSError, match="No space"):
        quiet_fit(tiny_gpt(), steps=4, checkpoint_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]  # no temporary left
    assert (tmp_path / "step-00000002" / "model.safetensors").read_bytes() == good
    state = json.loads((tmp_path / "step-00000002" / "state.json").read_text())
    assert state["step"] == 2 and len(state["history"]["loss"]) == 2


def test_checkpoint_files_and_tied_weights(tmp_path):
    model = tiny_gpt(tie_embeddings=True)
    quiet_fit(model, steps=3, checkpoint_dir=tmp_path, checkpoint_every=1, keep_last=2)
    assert [p.name for p in sorted(tmp_path.glob("step-*"))] == ["step-00000002", "step-00000003"]
    step = tmp_path / "step-00000003"
    files = {p.name for p in step.iterdir()}
    assert files == {"config.json", "model.safetensors", "optimizer.pt", "rng-0.safetensors",
                     "state.json"}  # fmt: skip
    loaded = load_weights(tiny_gpt(seed=5, tie_embeddings=True), tmp_path)
    assert torch.equal(params(loaded), params(model))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    # a training checkpoint is a lab checkpoint: the model alone loads from it
    for rebuilt in (GPT.from_pretrained(step), load_pretrained(step, GPT)):
        assert rebuilt.config == model.config and torch.equal(params(rebuilt), params(model))
        assert rebuilt.lm_head.weight is rebuilt.transformer.wte.weight


def test_a_training_checkpoint_is_a_model_for_llm(tmp_path):
    model = tiny_gpt(vocab_size=300)  # room for LLM's default byte tokenizer

    def sample(batch_size, generator):
        x = torch.randint(300, (batch_size, 8), generator=generator)
        return x, x

    quiet_fit(model, sample, steps=2, checkpoint_dir=tmp_path)
    llm = LLM(GPT.from_pretrained(latest_checkpoint(tmp_path)))
    model.eval()
    assert llm.generate("ab", max_new_tokens=4, temperature=0) == LLM(model).generate(
        "ab", max_new_tokens=4, temperature=0
    )


def test_load_weights_reads_save_pretrained_with_tied_embeddings(tmp_path):
    saved = tiny_gpt(tie_embeddings=True)
    saved.save_pretrained(tmp_path / "model")
    loaded = load_weights(tiny_gpt(seed=3, tie_embeddings=True), tmp_path / "model")
    assert torch.equal(params(loaded), params(saved))


def test_models_without_a_lab_config_checkpoint_their_weights_alone(tmp_path):
    """A model whose config is not a lab Config gets no config.json: load_weights and
    resume still work; from_pretrained says what is missing."""
    model = SpikeOnce(tiny_gpt())
    model.spike = False
    quiet_fit(model, steps=2, checkpoint_dir=tmp_path)
    step = latest_checkpoint(tmp_path)
    assert not (step / "config.json").exists()
    assert torch.equal(params(load_weights(SpikeOnce(tiny_gpt(seed=4)), step)), params(model))
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        GPT.from_pretrained(step)
    assert quiet_fit(SpikeOnce(tiny_gpt()), steps=3, checkpoint_dir=tmp_path).step == [1, 2, 3]


def test_the_guides_custom_gpt_checkpoints_as_a_lab_checkpoint(tmp_path):
    from test_guide import CustomGPT, MyModelConfig

    config = MyModelConfig(
        n_layer=1, n_embd=32, n_head=2, intermediate_size=64, vocab_size=TASK.vocab_size,
        block_size=32,
    )  # fmt: skip
    model = CustomGPT(config)
    quiet_fit(model, steps=2, checkpoint_dir=tmp_path)
    rebuilt = CustomGPT.from_pretrained(latest_checkpoint(tmp_path))
    assert isinstance(rebuilt.config, MyModelConfig) and rebuilt.config == config
    assert torch.equal(params(rebuilt), params(model))


def test_a_checkpoint_without_training_state_is_named(tmp_path):
    quiet_fit(tiny_gpt(), steps=2, checkpoint_dir=tmp_path)
    (tmp_path / "step-00000002" / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"step-00000002 is not a training.*state\.json"):
        quiet_fit(tiny_gpt(), steps=4, checkpoint_dir=tmp_path)


def test_resume_false_refuses_an_old_run_and_wrong_models_are_named(tmp_path):
    quiet_fit(tiny_gpt(), steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(FileExistsError, match="resume=True"):
        quiet_fit(tiny_gpt(), steps=2, checkpoint_dir=tmp_path, resume=False)
    with pytest.raises(CheckpointError, match=r"cannot resume from .*step-00000002"):
        quiet_fit(tiny_gpt(n_embd=64), steps=4, checkpoint_dir=tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": 0}, "steps=0"),
        ({"batch_size": 6, "grad_accum_steps": 4}, "not divisible by grad_accum_steps"),
        ({"schedule": "step"}, "schedule='step'"),
        ({"precision": "fp8"}, "precision='fp8'"),
        ({"min_lr": 1.0}, "min_lr=1.0"),
        ({"checkpoint_every": 2}, "needs a checkpoint_dir"),
        ({"target": {"val_accuracy": 0.9}}, "eval_every"),
        ({"eval_every": 2, "target": {"acc": 0.9}}, "target="),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quiet_fit(tiny_gpt(), **kwargs)


def test_models_that_do_not_return_logits_are_refused():
    class Tuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = tiny_gpt()

        def forward(self, idx):
            return self.gpt(idx), None

    with pytest.raises(TypeError, match="fit needs logits"):
        quiet_fit(Tuple())


# --- structure -------------------------------------------------------------------------------


def test_both_engines_implement_the_engine_interface_and_modules_share_public_names():
    import ast
    from pathlib import Path

    from lab.train.engine import Engine, LocalEngine
    from lab.train.fabric import FabricEngine

    methods = [n for n, v in vars(Engine).items() if callable(v) and not n.startswith("_")]
    assert "setup" in methods and "broadcast" in methods
    for engine in (LocalEngine, FabricEngine):
        assert Engine in engine.__mro__  # declared, so a type checker holds it to the interface
        assert all(getattr(engine, m) is not getattr(Engine, m) for m in methods), engine
    package = Path(__file__).parents[1] / "lab" / "train"
    private = [
        (path.name, node.module, alias.name)
        for path in package.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lab")
        for alias in node.names
        if alias.name.startswith("_")
    ]
    assert private == []
