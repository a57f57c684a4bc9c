"""The exercise checkers are honest: each accepts lab's reference (a right solution) and
rejects typical wrong solutions with the message meant for that mistake. The student
version of every exercise notebook fails each check with a message, not a crash."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lab import GPT, Config
from lab.errors import LabError
from lab.exercises import (
    ExerciseFailed,
    check_adapter_gate,
    check_causal_attention,
    check_decode_step,
    check_grouped_query_attention,
    check_induction_scores,
    check_lora,
    check_memory_prediction,
    check_mqar,
    check_rms_norm,
    check_rope,
    check_router,
    check_swiglu,
    check_top_p,
    investigations,
)
from lab.exercises.attention import variant
from lab.exercises.rope import interleaved_rope
from lab.exercises.student import student_notebook, write_student_version

EXERCISES = Path(__file__).parent.parent / "notebooks" / "exercises"


def rejects(check, wrong, message: str) -> None:
    with pytest.raises(ExerciseFailed, match=message):
        check(wrong)


def accepts(check, right, capsys) -> None:
    check(right)
    assert capsys.readouterr().out.startswith("✔ ")


# --- attention ----------------------------------------------------------------------------


def attention(q, k, v):
    return variant(q, k, v)  # repeat_interleave sharing, causal, 1/sqrt(hs)


def test_causal_attention(capsys):
    accepts(check_causal_attention, attention, capsys)
    rejects(check_causal_attention, lambda q, k, v: variant(q, k, v, causal=False),
            "query 0 attends to key 1: your mask lets a token see the future")  # fmt: skip
    rejects(check_causal_attention, lambda q, k, v: variant(q, k, v, scale=1.0), "not scaled")
    rejects(check_causal_attention, lambda q, k, v: variant(q, k, v, softmax_dim=-2),
            "softmax runs over the queries")  # fmt: skip

    def strict_mask(q, k, v):  # hides the diagonal too
        T = q.size(1)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-2, -1) / math.sqrt(q.size(-1))
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(), float("-inf"))
        return (scores.softmax(-1).nan_to_num(0) @ v.transpose(1, 2)).transpose(1, 2)

    rejects(check_causal_attention, strict_mask, "query 0 never looks at key 0")
    rejects(
        check_causal_attention, lambda q, k, v: attention(q, k, v).float(), "keep the input's dtype"
    )


def test_grouped_query_attention(capsys):
    accepts(check_grouped_query_attention, attention, capsys)
    rejects(check_grouped_query_attention, lambda q, k, v: variant(q, k, v, tile_heads=True),
            "query head 1 uses key head 1")  # fmt: skip

    def first_key_head_only(q, k, v):
        return variant(q, k[:, :, :1].expand(*k.shape[:2], q.size(2), -1),
                       v[:, :, :1].expand(*v.shape[:2], q.size(2), -1))  # fmt: skip

    rejects(check_grouped_query_attention, first_key_head_only, "differs from lab's")

    def grouped_wrong(q, k, v):  # right for MHA; for GQA every query uses key head 0
        return attention(q, k, v) if k.size(2) == q.size(2) else first_key_head_only(q, k, v)

    rejects(check_grouped_query_attention, grouped_wrong,
            "right when n_query_groups == n_head, wrong for grouped queries")  # fmt: skip


def decode_step(q, k, v, cache_k, cache_v, pos, mode=""):
    cache_k[:, pos], cache_v[:, pos] = k[:, 0], v[:, 0]
    end = cache_k.size(1) if mode == "whole cache" else pos + 1
    return variant(q, cache_k[:, :end], cache_v[:, :end], causal=False)


def test_decode_step(capsys):
    accepts(check_decode_step, decode_step, capsys)
    rejects(check_decode_step, lambda *a: decode_step(*a, mode="whole cache"),
            "also attends to cache slots 1..8, which hold no token yet")  # fmt: skip

    def no_write(q, k, v, cache_k, cache_v, pos):
        keys, values = torch.cat([cache_k[:, :pos], k], 1), torch.cat([cache_v[:, :pos], v], 1)
        return variant(q, keys, values, causal=False)

    rejects(check_decode_step, no_write, "the cache does not hold the new key and value at index 0")

    def own_key_last(q, k, v, cache_k, cache_v, pos):
        out = variant(q, cache_k[:, : max(pos, 1)], cache_v[:, : max(pos, 1)], causal=False)
        cache_k[:, pos], cache_v[:, pos] = k[:, 0], v[:, 0]
        return out

    rejects(check_decode_step, own_key_last, "does not see its own key")


# --- RoPE, RMSNorm, SwiGLU ------------------------------------------------------------------


def rope(x, positions, base=10000.0, sign=1.0, exponent_scale=1.0):
    half = x.size(-1) // 2
    theta = base ** (-torch.arange(half).float() * 2 * exponent_scale / x.size(-1))
    angles = sign * positions.float()[:, None] * theta
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


def test_rope(capsys):
    accepts(check_rope, rope, capsys)
    rejects(check_rope, interleaved_rope, "rotate neighbouring dimensions")
    rejects(check_rope, lambda x, p, b: rope(x, torch.arange(x.size(1)), b),
            "right for positions 0..T-1, wrong when the positions start later")  # fmt: skip
    rejects(check_rope, lambda x, p, b: rope(x, p, b, sign=-1.0), "turns the wrong way")
    rejects(check_rope, lambda x, p, b: rope(x, p, b, exponent_scale=2.0),
            r"dimension pairs \[1, 2, 3\] are rotated by the wrong angle")  # fmt: skip
    rejects(check_rope, lambda x, p, b: rope(x, p), "you ignore the base argument")
    rejects(check_rope, lambda x, p, b: x * 1.5, "at position 0 the angle is 0")


def rms_norm(x, weight, eps, inside=True, use_weight=True):
    xf = x.float()
    ms = xf.square().mean(-1, keepdim=True)
    y = xf / torch.sqrt(ms + eps) if inside else xf / (torch.sqrt(ms) + eps)
    return (y * (weight if use_weight else 1)).to(x.dtype)


def test_rms_norm(capsys):
    accepts(check_rms_norm, rms_norm, capsys)
    layer_norm = lambda x, w, eps: F.layer_norm(x.float(), x.shape[-1:], w, None, eps).to(x.dtype)  # noqa: E731
    rejects(check_rms_norm, layer_norm, "you subtract the mean: that is LayerNorm")
    rejects(check_rms_norm, lambda x, w, e: rms_norm(x, w, e, inside=False),
            "eps belongs inside the square root")  # fmt: skip
    rejects(check_rms_norm, lambda x, w, e: rms_norm(x, w, e, use_weight=False),
            "not multiplied by weight")  # fmt: skip
    rejects(check_rms_norm, lambda x, w, e: rms_norm(x, w, e).float(), "keep the input's dtype")


def swiglu(x, fc_1, fc_2, act=F.silu, on_up=False, add=False):
    gate, up = fc_1(x).chunk(2, -1)
    if on_up:
        gate, up = up, gate
    return fc_2(act(gate) + up if add else act(gate) * up)


def test_swiglu(capsys):
    accepts(check_swiglu, swiglu, capsys)
    rejects(check_swiglu, lambda x, a, b: swiglu(x, a, b, on_up=True),
            "SiLU is applied to the second half")  # fmt: skip
    rejects(check_swiglu, lambda x, a, b: swiglu(x, a, b, act=F.gelu), "the activation is not SiLU")
    rejects(check_swiglu, lambda x, a, b: swiglu(x, a, b, add=True), "a gate multiplies")

    def interleaved(x, fc_1, fc_2):
        h = fc_1(x)
        return fc_2(F.silu(h[..., 0::2]) * h[..., 1::2])

    rejects(check_swiglu, interleaved, "split fc_1's output into two halves")


# --- sampling and routing -------------------------------------------------------------------


def top_p(probs, p, crossing=True, renormalise=True, by_rank=True):
    if by_rank:
        s, order = probs.sort(-1, descending=True)
    else:
        s, order = probs, torch.arange(probs.size(-1)).expand_as(probs)
    keep = (s.cumsum(-1) - s < p) if crossing else (s.cumsum(-1) <= p)
    keep[..., 0] = True
    out = torch.zeros_like(probs).scatter(-1, order, s * keep)
    return out / out.sum(-1, keepdim=True) if renormalise else out


def test_top_p(capsys):
    from lab.exercises.sampling import reference
    from lab.generate import sample

    accepts(check_top_p, top_p, capsys)
    rejects(check_top_p, lambda pr, p: top_p(pr, p, crossing=False),
            r"you keep ids \[0\], but the nucleus is \[0, 1\]")  # fmt: skip
    rejects(check_top_p, lambda pr, p: top_p(pr, p, renormalise=False), "sum to 0.70, not 1")
    rejects(check_top_p, lambda pr, p: top_p(pr, p, by_rank=False), "not by their position")
    # the checker's rule is lab.generate.sample's: it draws exactly the ids the filter keeps
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)) * 2
    kept = reference(logits.softmax(-1), 0.8) > 0
    draws = torch.stack(
        [sample(logits, top_p=0.8, generator=torch.Generator().manual_seed(s)) for s in range(300)]
    )
    drawn = torch.zeros_like(kept).scatter(1, draws.T, True)
    assert torch.equal(drawn, kept)


def route(logits, k, renormalise=False, per_choice=False, detach=False):
    N, E = logits.shape
    probs = (logits.detach() if detach else logits).softmax(-1)
    gates, indices = probs.topk(k, -1)
    fraction = torch.bincount(indices.flatten(), minlength=E).float() / (N * k if per_choice else N)
    gates = gates / gates.sum(-1, keepdim=True) if renormalise else gates
    return indices, gates, E * (fraction * probs.mean(0)).sum()


def test_router(capsys):
    accepts(check_router, route, capsys)
    rejects(check_router, lambda lg, k: route(lg, k, renormalise=True), "gates are renormalised")
    rejects(
        check_router, lambda lg, k: route(lg, k, per_choice=True), "your loss is 2 times too small"
    )
    rejects(check_router, lambda lg, k: route(lg, k, detach=True), "no gradient back to the logits")
    rejects(check_router, lambda lg, k: route(-lg, k), "other experts than the k most probable")


# --- fine-tuning ----------------------------------------------------------------------------


class LoRA(nn.Module):
    scale_by_r, count_twice, zero_A, random_B, train_base = True, False, False, False, False

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base = base
        base.requires_grad_(self.train_base)
        init = torch.zeros if self.zero_A else torch.randn
        self.lora_A = nn.Parameter(init(r, base.in_features) / 4)
        self.lora_B = nn.Parameter(
            torch.randn(base.out_features, r)
            if self.random_B
            else torch.zeros(base.out_features, r)
        )
        self.scaling, self.merged = (alpha / r if self.scale_by_r else alpha), False

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x):
        y = self.base(x)
        return (
            y
            if self.merged and not self.count_twice
            else y + x @ self.lora_A.T @ self.lora_B.T * self.scaling
        )

    def merge(self):
        with torch.no_grad():
            self.base.weight += self.lora_B @ self.lora_A * self.scaling
        self.merged = True


def lora_variant(**changes):
    return type("Wrong", (LoRA,), changes)


def test_lora(capsys):
    accepts(check_lora, LoRA, capsys)
    rejects(check_lora, lora_variant(scale_by_r=False), "your update is r=4 times too large")
    rejects(check_lora, lora_variant(count_twice=True), "the update is now counted twice")
    rejects(check_lora, lora_variant(zero_A=True), "lora_A is all zeros")
    rejects(check_lora, lora_variant(random_B=True), "at initialisation your layer already changes")
    rejects(check_lora, lora_variant(train_base=True), "still train: freeze the base layer")


def prefix_attention(q, pk, pv, gate, scale, share="interleave", squash=False):
    n = q.size(2) // pk.size(2)
    if share == "interleave":
        pk, pv = pk.repeat_interleave(n, 2), pv.repeat_interleave(n, 2)
    else:
        pk, pv = pk.repeat(1, 1, n, 1), pv.repeat(1, 1, n, 1)
    weights = (q.transpose(1, 2) @ pk.transpose(1, 2).transpose(-2, -1) * scale).softmax(-1)
    out = (weights @ pv.transpose(1, 2)).transpose(1, 2)
    return out * (gate.tanh() if squash else gate).view(-1, 1)


def test_adapter_gate(capsys):
    accepts(check_adapter_gate, prefix_attention, capsys)
    rejects(check_adapter_gate, lambda q, k, v, g, s: prefix_attention(q, k, v, g + 1, s),
            "with every gate at 0 your prefix term is not exactly zero")  # fmt: skip
    rejects(check_adapter_gate, lambda *a: prefix_attention(*a, squash=True), "you squash the gate")
    rejects(check_adapter_gate, lambda *a: prefix_attention(*a, share="tile"),
            "right when n_query_groups == n_head, wrong for grouped queries")  # fmt: skip
    rejects(check_adapter_gate, lambda q, k, v, g, s: prefix_attention(q, k, v, g, 1.0),
            "differs from lab's adapter")  # fmt: skip


# --- investigations -------------------------------------------------------------------------


class Oracle(nn.Module):
    """Answers every MQAR query right (or, with ``right=False``, with the first value)."""

    def __init__(self, right: bool = True) -> None:
        super().__init__()
        self.right = right

    def forward(self, x):
        P, V = investigations.RECALL.num_pairs, investigations.RECALL.vocab_size
        logits = torch.zeros(*x.shape, V)
        keys = x[:, : 2 * P : 2]
        for t in range(2 * P, x.size(1), 2):
            pair = (
                (keys == x[:, t : t + 1]).float().argmax(-1)
                if self.right
                else torch.zeros(len(x), dtype=torch.long)
            )
            logits[torch.arange(len(x)), t, x[torch.arange(len(x)), 2 * pair + 1]] = 1.0
        return logits


def test_mqar(monkeypatch, capsys):
    trained = []
    monkeypatch.setattr(investigations, "train_mqar", lambda **s: trained.append(s) or Oracle())
    accepts(check_mqar, lambda: dict(pytorch_init=True, lr=3e-3), capsys)
    assert trained == [dict(pytorch_init=True, lr=3e-3)]
    rejects(check_mqar, lambda: dict(learning_rate=1e-3), r"unknown settings \['learning_rate'\]")
    rejects(check_mqar, lambda: dict(steps=5000), "within 300 steps")
    monkeypatch.setattr(investigations, "train_mqar", lambda **s: Oracle(right=False))
    rejects(check_mqar, lambda: {}, "target 90%.*bind keys to values")


def mqar_model():
    torch.manual_seed(0)
    task = investigations.RECALL
    return GPT(Config(n_layer=2, n_embd=32, n_head=4, positional="learned",
                                     block_size=task.seq_len, vocab_size=task.vocab_size)).eval()  # fmt: skip


def induction_scores(model, x, P, offset=1, average=True):
    from lab import probe

    with torch.no_grad(), probe(model, "pattern") as cache:
        model(x)
    scores, count = torch.zeros(2, 4), 0
    for b in range(len(x)):
        keys = x[b, : 2 * P : 2].tolist()
        for t in range(2 * P, x.size(1), 2):
            for layer in range(2):
                scores[layer] += cache[f"blocks.{layer}.attn.pattern"][
                    b, :, t, 2 * keys.index(int(x[b, t])) + offset
                ]
            count += 1
    return scores / count if average else scores


def test_induction_scores(capsys):
    model = mqar_model()
    accepts(lambda fn: check_induction_scores(fn, model), induction_scores, capsys)
    check = lambda fn: check_induction_scores(fn, model)  # noqa: E731
    rejects(
        check,
        lambda m, x, P: induction_scores(m, x, P, offset=0),
        "the earlier copy of the key itself",
    )
    rejects(check, lambda m, x, P: induction_scores(m, x, P, average=False), r"outside \[0, 1\]")
    rejects(check, lambda m, x, P: induction_scores(m, x, P)[0], r"shape \(2, 4\)")


def predict_memory(config, B, T, param_bytes=4, states=2, logit_copies=2):
    with torch.device("meta"):
        n = sum(p.numel() for p in GPT(config).parameters())
    return dict(parameters=param_bytes * n, gradients=param_bytes * n,
                optimizer_state=states * param_bytes * n,
                logits=logit_copies * 4 * B * T * config.padded_vocab_size)  # fmt: skip


def test_memory_prediction(capsys):
    accepts(check_memory_prediction, predict_memory, capsys)
    rejects(
        check_memory_prediction, lambda *a: predict_memory(*a, param_bytes=1), "numbers, not bytes"
    )
    rejects(
        check_memory_prediction,
        lambda *a: predict_memory(*a, states=1),
        "two numbers per parameter",
    )
    rejects(check_memory_prediction, lambda *a: predict_memory(*a, logit_copies=1), "log-softmax")


# --- stubs and the student version -----------------------------------------------------------


def test_stub_and_crash_become_messages():
    def stub(*args):
        raise NotImplementedError()

    rejects(check_causal_attention, stub, r"stub\(\) is not written yet")
    rejects(check_rope, lambda x, p, b: x @ torch.ones(3), r"raised RuntimeError on B=2")


def source_cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_student_version_replaces_solutions_like_nbgrader(tmp_path):
    written = write_student_version(EXERCISES, tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in EXERCISES.glob("*.ipynb"))
    for path in written:
        for source, cell in zip(
            source_cells(EXERCISES / path.name), source_cells(path), strict=True
        ):
            text, original = "".join(cell["source"]), "".join(source["source"])
            assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None
                assert text.count("raise NotImplementedError()") == original.count(
                    "### BEGIN SOLUTION"
                )
            else:
                assert text.count("YOUR ANSWER HERE") == original.count("### BEGIN SOLUTION")
    cell = {"cell_type": "code", "source": "def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION\n",
            "outputs": [], "execution_count": 1, "metadata": {}}  # fmt: skip
    assert student_notebook({"cells": [cell]})["cells"][0]["source"] == [
        "def f():\n", "    # YOUR CODE HERE\n", "    raise NotImplementedError()"]  # fmt: skip
    with pytest.raises(LabError, match="never closed"):
        student_notebook({"cells": [{**cell, "source": "### BEGIN SOLUTION\nx = 1\n"}]}, "nb")
    with pytest.raises(LabError, match="holds the sources"):
        write_student_version(EXERCISES, EXERCISES)


def test_student_notebooks_fail_every_check_with_its_message(tmp_path):
    """Run each student notebook's cells in order (without the slow training setup,
    replaced by an untrained model): every check cell says "not written yet"; other
    cells either run or stop at a stub's NotImplementedError."""
    checks = 0
    for path in write_student_version(EXERCISES, tmp_path):
        namespace: dict = {"model": mqar_model()}
        for cell in source_cells(path):
            if cell["cell_type"] != "code" or "slow-setup" in cell["metadata"].get("tags", []):
                continue
            source = "".join(cell["source"])
            if cell["metadata"].get("nbgrader", {}).get("grade"):
                with pytest.raises(ExerciseFailed, match="is not written yet"):
                    exec(source, namespace)
                checks += 1
                continue
            with contextlib.suppress(NotImplementedError):
                exec(source, namespace)
    assert checks == 13


def test_student_version_command(tmp_path, capsys):
    from lab.__main__ import main

    assert main(["student-version", str(EXERCISES / "01_attention.ipynb"), str(tmp_path)]) == 0
    assert (tmp_path / "01_attention.ipynb").exists()
    assert "wrote" in capsys.readouterr().out
    assert main(["student-version", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "not a notebook" in capsys.readouterr().err


def test_every_exercise_has_its_parts():
    """A heading with difficulty, minutes and what it teaches; the code cell; its check
    right after; then a folded hint."""
    exercises = 0
    for path in sorted(EXERCISES.glob("*.ipynb")):
        cells = source_cells(path)
        text = ["".join(c["source"]) for c in cells]
        for i, cell in enumerate(cells):
            meta = cell["metadata"].get("nbgrader", {})
            if cell["cell_type"] != "code" or not meta.get("solution"):
                continue
            exercises += 1
            heading = next(t for t in reversed(text[:i]) if t.startswith("## Exercise"))
            assert all(part in heading for part in ("**Difficulty**", "minutes**", "**Teaches:**"))
            assert cells[i + 1]["metadata"]["nbgrader"]["grade"] and "check_" in text[i + 1]
            assert text[i + 2].startswith("<details><summary>Hint")
    assert exercises == 13


def test_train_mqar_reuses_a_run_with_the_same_settings(monkeypatch):
    runs = []

    def fake_fit(model, *args, **kwargs):
        runs.append(kwargs["lr"])
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)  # what "training" changed

    monkeypatch.setattr(investigations, "fit", fake_fit)
    monkeypatch.setattr(investigations, "_trained", {})
    first = investigations.train_mqar(lr=0.123, n_embd=16)
    second = investigations.train_mqar(lr=0.123, n_embd=16)
    investigations.train_mqar(lr=0.456, n_embd=16)
    assert runs == [0.123, 0.456]
    assert second is not first and torch.equal(second.lm_head.weight, first.lm_head.weight)
