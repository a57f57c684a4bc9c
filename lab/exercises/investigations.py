"""Investigations: make MQAR learn, find the heads that recall, predict a step's memory.

These check a learner's findings rather than a component: the MQAR hunt is graded by
the accuracy its settings reach; induction scores are compared with the scores lab
computes with ``lab.probe`` on the same model and batch; a memory prediction with
``estimate_memory`` (``lab.profile``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lab.config import Config
from lab.data import MQAR, accuracy
from lab.exercises.core import call, close, fail, generator, passed
from lab.model import GPT
from lab.probe import probe
from lab.profile import estimate_memory
from lab.train import fit

# A small recall task: 4 key-value pairs, then the 4 keys asked again (seq_len 15).
RECALL = MQAR(num_pairs=4, num_keys=16, num_values=16)
SETTINGS = ("pytorch_init", "lr", "weight_decay", "steps", "batch_size", "n_embd")
TARGET = 0.9  # graded validation accuracy; guessing an unanswered value scores ~0.52
MAX_STEPS = 300  # the hunt is for settings that learn fast, not for patience
_trained: dict[tuple, dict[str, torch.Tensor]] = {}  # settings -> weights, see train_mqar


def train_mqar(
    pytorch_init: bool = False,
    lr: float = 3e-4,
    weight_decay: float = 0.1,
    steps: int = 150,
    batch_size: int = 64,
    n_embd: int = 64,
    seed: int = 0,
) -> GPT:
    """A 2-layer GPT trained on ``RECALL``, stopping early at 97% validation accuracy.

    ``pytorch_init`` re-initialises every ``nn.Linear`` and ``nn.Embedding`` with
    PyTorch's defaults instead of GPT-2's N(0, 0.02) (see ``lab.data.MQAR``).

    Training is deterministic for a seed, so a second call with the same settings in
    the same session returns a fresh copy of the first run's weights instead of
    training again (a check and the next exercise often ask for the same model)."""
    torch.manual_seed(seed)
    config = Config(n_layer=2, n_embd=n_embd, n_head=4, intermediate_size=4 * n_embd,
                    positional="learned", block_size=RECALL.seq_len, vocab_size=RECALL.vocab_size)  # fmt: skip
    model = GPT(config)
    key = (pytorch_init, lr, weight_decay, steps, batch_size, n_embd, seed)
    if key in _trained:
        model.load_state_dict(_trained[key])
        return model.eval()
    if pytorch_init:
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.reset_parameters()
    fit(model, RECALL, steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        schedule="constant", eval_every=25, eval_steps=2, target={"val_accuracy": 0.97},
        progress=False, device="cpu", seed=seed)  # fmt: skip
    _trained[key] = {k: v.clone() for k, v in model.state_dict().items()}
    return model.eval()


def recall_accuracy(model: nn.Module, samples: int = 512) -> float:
    """Accuracy on fresh ``RECALL`` queries (a fixed generator: the same batch every time)."""
    x, y = RECALL.sample(samples, generator(1234))
    with torch.no_grad():
        return accuracy(model(x), y)


def check_mqar(hyperparameters: Callable[[], dict]) -> None:
    """Train with the settings ``hyperparameters()`` returns; pass at ``TARGET`` accuracy.
    Takes as long as the training it runs (seconds for settings that work)."""
    settings = call(hyperparameters)
    if not isinstance(settings, dict):
        fail("hyperparameters() should return a dict, e.g. dict(lr=1e-3, steps=200)")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        fail(f"unknown settings {unknown}: train_mqar takes {list(SETTINGS)}")
    if settings.get("steps", 150) > MAX_STEPS:
        fail(f"steps={settings['steps']}: find settings that learn within {MAX_STEPS} steps")
    model = train_mqar(**settings)
    score = recall_accuracy(model)
    if score < TARGET:
        plateau = sum(1 / i for i in range(1, RECALL.num_pairs + 1)) / RECALL.num_pairs
        fail(f"validation accuracy {score:.0%} (target {TARGET:.0%}). Guessing a value of the "
             f"context not yet answered scores about {plateau:.0%}: if you are near that, the "
             "model has not learnt to bind keys to values; look at the initialisation, then "
             "the learning rate and weight decay")  # fmt: skip
    passed("MQAR hunt", f"accuracy at least {TARGET:.0%} on 512 fresh queries")


def reference_induction_scores(model: nn.Module, x: torch.Tensor, num_pairs: int) -> torch.Tensor:
    """(n_layer, n_head): at each query key (positions 2P, 2P+2, ...) the attention paid
    to the value that followed the same key in the context: what a head that recalls
    (an induction head) looks at."""
    return _attention_after_key(model, x, num_pairs, offset=1)


def _attention_after_key(
    model: nn.Module, x: torch.Tensor, num_pairs: int, offset: int
) -> torch.Tensor:
    """Mean attention from each query key to ``offset`` positions after its first occurrence."""
    with torch.no_grad(), probe(model, "pattern") as cache:
        model(x)
    patterns = torch.stack(cache.layers("attn.pattern"))  # (L, B, nh, T, S)
    queries = torch.arange(2 * num_pairs, x.size(1), 2)
    keys = x[:, : 2 * num_pairs : 2]  # (B, P)
    pair = (x[:, queries, None] == keys[:, None, :]).float().argmax(-1)  # (B, Q)
    rows = patterns[:, :, :, queries, :]  # (L, B, nh, Q, S)
    index = (2 * pair + offset)[None, :, None, :, None].expand(*rows.shape[:-1], 1)
    return rows.gather(-1, index).squeeze(-1).mean(dim=(1, 3))


def check_induction_scores(fn: Callable, model: nn.Module) -> None:
    """``fn(model, x, num_pairs) -> (n_layer, n_head)`` scores on MQAR inputs ``x``."""
    n_layer, n_head = model.config.n_layer, model.config.n_head
    for case, samples, seed in (("32 MQAR sequences", 32, 0), ("batch 1", 1, 1)):
        x, _ = RECALL.sample(samples, generator(seed))
        expected = reference_induction_scores(model, x, RECALL.num_pairs)
        scores = call(fn, model, x, RECALL.num_pairs, case=case)
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (n_layer, n_head):
            fail(f"induction_scores should return a tensor of shape ({n_layer}, {n_head}): one "
                 "score per layer and head")  # fmt: skip
        scores = scores.detach().float()
        if close(scores, expected):
            continue
        if close(scores, _attention_after_key(model, x, RECALL.num_pairs, offset=0)):
            fail("you measure attention to the earlier copy of the key itself: a head that "
                 "recalls looks one token further, at the value that followed it")  # fmt: skip
        if (scores > 1).any() or (scores < 0).any():
            fail("some scores are outside [0, 1]: a score is an average of attention weights")
        fail(f"on {case} your scores differ from lab's: average, over the query keys of the "
             "second half (and the batch), the attention on the position just after the "
             "key's first occurrence")  # fmt: skip
    passed("induction scores", "every layer and head, on a batch of 32 and a batch of 1")


def check_memory_prediction(fn: Callable) -> None:
    """``fn(config, batch_size, seq_len) -> dict`` of bytes for ``parameters``,
    ``gradients``, ``optimizer_state`` and ``logits``: full training in float32 with
    AdamW, as ``estimate_memory(config, batch_size, seq_len)`` counts them."""
    configs = [
        ("a 2-layer model", Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, block_size=32), 4, 32),
        ("4 layers, grouped queries, batch 1", Config(n_layer=4, n_embd=128, n_head=8, n_query_groups=2,
                                                      vocab_size=1000, block_size=64), 1, 64),
    ]  # fmt: skip
    for case, config, B, T in configs:
        expected = estimate_memory(config, B, T)
        answer = call(fn, config, B, T, case=case)
        if not isinstance(answer, dict):
            fail("predict_memory should return a dict of bytes, e.g. {'parameters': ..., ...}")
        n = expected.parameters // 4
        for name in ("parameters", "gradients", "optimizer_state", "logits"):
            right, mine = getattr(expected, name), answer.get(name)
            if mine is None:
                fail(f"your dict has no {name!r}")
            if mine == right:
                continue
            if mine * 4 == right:
                fail(f"{name}: you counted numbers, not bytes: a float32 takes 4 bytes")
            if name == "optimizer_state" and mine * 2 == right:
                fail("optimizer_state is half of what AdamW keeps: two numbers per parameter "
                     "(running averages of the gradient and of its square)")  # fmt: skip
            if name == "logits" and mine * 2 == right:
                fail("logits is half of estimate_memory's: cross-entropy keeps its log-softmax "
                     "for the backward pass, a second (B, T, V) tensor")  # fmt: skip
            if name in ("parameters", "gradients"):
                fail(f"on {case} {name} is {mine:,} bytes; estimate_memory counts {right:,} "
                     f"({n:,} parameters): did you count the embedding, the head, the norms "
                     "and every layer?")  # fmt: skip
            fail(f"on {case} {name} is {mine:,} bytes; estimate_memory counts {right:,}")
    passed("memory prediction", "parameters, gradients, AdamW state and logits on two configs")
