"""lab.generate: sampling rules, KV cache against recomputation, padding, seeds."""

import math

import pytest
import torch

from lab import GPT, CausalSelfAttention, Config
from lab.generate import _attention_mask, generate, sample, supports_kv_cache, supports_padding

VOCAB = 96


def tiny_gpt(**overrides) -> GPT:
    """A small random GPT whose logits are spread wide (a scaled-up head), so greedy
    choices are far from ties and float rounding cannot flip them."""
    torch.manual_seed(0)
    config = dict(n_layer=2, n_embd=32, n_head=4, n_query_groups=2, vocab_size=VOCAB)
    model = GPT(Config(block_size=64, **{**config, **overrides}))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def prompts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(VOCAB, (n,), generator=g) for n in (5, 9, 1, 9)]


# --- sampling ----------------------------------------------------------------------------


def frequencies(logits: list[float], n: int = 40_000, **kwargs) -> torch.Tensor:
    rows = torch.tensor([logits]).expand(n, -1)
    ids = sample(rows, generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.bincount(ids, minlength=len(logits)) / n


def softmax_reference(logits: list[float], temperature: float = 1.0) -> list[float]:
    weights = [math.exp(x / temperature) for x in logits]
    return [w / sum(weights) for w in weights]


def test_greedy_is_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_follows_softmax_with_temperature(temperature):
    logits = [0.0, 1.0, 2.0, -1.0]
    expected = torch.tensor(softmax_reference(logits, temperature))
    assert torch.allclose(frequencies(logits, temperature=temperature), expected, atol=0.01)


def test_top_k_keeps_the_k_most_likely_renormalised():
    logits = [0.0, 3.0, 1.0, 2.0, -1.0]
    freq = frequencies(logits, top_k=2)
    expected = softmax_reference([3.0, 2.0])
    assert freq[[0, 2, 4]].sum() == 0
    assert torch.allclose(freq[[1, 3]], torch.tensor(expected), atol=0.01)


@pytest.mark.parametrize(("top_p", "kept"), [(0.45, [0]), (0.79, [0, 1]), (0.81, [0, 1, 2])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = [0.5, 0.3, 0.15, 0.05]  # cumulative 0.5, 0.8, 0.95, 1.0
    freq = frequencies([math.log(p) for p in probs], top_p=top_p)
    assert freq.nonzero().flatten().tolist() == kept
    expected = torch.tensor([probs[i] for i in kept]) / sum(probs[i] for i in kept)
    assert torch.allclose(freq[kept], expected, atol=0.01)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0}, "top_p"),
     ({"top_p": 1.5}, "top_p")],
)  # fmt: skip
def test_bad_sampling_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample(torch.zeros(1, 4), **kwargs)


# --- seeds and the KV cache -------------------------------------------------------------------


def test_a_seed_repeats_and_leaves_the_global_rng_alone():
    model, prompt = tiny_gpt(), prompts()[0]
    state = torch.random.get_rng_state()
    first = generate(model, prompt, 16, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(generate(model, prompt, 16, seed=7), first)
    assert not torch.equal(generate(model, prompt, 16, seed=8), first)


def test_gpt_uses_the_cache_and_custom_attention_does_not():
    class OwnForward(CausalSelfAttention):
        def forward(self, x, input_pos=None, mask=None):
            return super().forward(x, None, mask)  # ignores the cache

    class Declared(OwnForward):
        supports_kv_cache = True

    class OwnHelper(CausalSelfAttention):  # changes how, not where: cache still fine
        def scaled_dot_product_attention(self, q, k, v, mask=None):
            return super().scaled_dot_product_attention(q, k, v, mask)

    model = tiny_gpt()
    assert supports_kv_cache(model) and supports_padding(model)
    for cls, expected in ((OwnForward, False), (Declared, True), (OwnHelper, True)):
        model.transformer.h[1].attn = cls(model.config, 1)
        assert supports_kv_cache(model) is expected
    assert not supports_padding(tiny_gpt(positional="learned"))


CONFIGS = {
    "rope-gqa": {},
    "alibi": {"positional": "alibi"},
    "learned": {"positional": "learned"},
    "sliding-window": {"sliding_window_size": 4},
    "softcap": {"attention_logit_softcapping": 20.0},  # the unfused softmax path
}


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"seed": 3, "top_k": 20, "top_p": 0.9}])
def test_kv_cache_gives_the_tokens_of_full_recomputation(overrides, sampling):
    model, batch = tiny_gpt(**overrides), prompts()
    cached = generate(model, batch, 12, kv_cache=True, **sampling)
    recomputed = generate(model, batch, 12, kv_cache=False, **sampling)
    assert all(torch.equal(a, b) for a, b in zip(cached, recomputed, strict=True))
    assert all(len(a) == 12 for a in cached)


def test_generation_clears_its_cache_and_restores_training_mode():
    model = tiny_gpt()
    model.train()
    generate(model, prompts()[0], 3)
    assert model.training
    assert all(block.attn.kv_cache is None for block in model.transformer.h)


# --- batches of different lengths ---------------------------------------------------------


def test_padding_mask_hides_pads_without_nans():
    model, (short, long) = tiny_gpt(), prompts()[:2]
    padded = torch.cat([torch.zeros(len(long) - len(short), dtype=torch.long), short])
    real = torch.arange(len(long)) >= len(long) - len(short)
    idx = torch.stack([padded, long])
    with torch.no_grad():
        rows = torch.stack([real, torch.ones_like(real)])
        mask = _attention_mask(rows, len(long), causal=False)
        batched = model(idx, mask=mask)
        alone = model(short[None])
    causal = torch.ones(len(long), len(long), dtype=torch.bool).tril()
    assert (mask & causal).any(dim=-1).all()  # every query sees a key, or softmax is 0/0
    assert torch.isfinite(batched).all()
    assert torch.allclose(batched[0, -len(short) :], alone[0], atol=1e-4)
    assert torch.allclose(batched[1], model(long[None])[0], atol=1e-4)


@pytest.mark.parametrize("overrides", CONFIGS.values(), ids=CONFIGS.keys())
def test_batched_greedy_equals_one_prompt_at_a_time(overrides):
    model, batch = tiny_gpt(**overrides), prompts()
    together = generate(model, batch, 10, temperature=0)
    alone = [generate(model, p, 10, temperature=0) for p in batch]
    assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))


# --- stopping and limits -------------------------------------------------------------------


def test_stop_token_ends_a_row_and_is_not_returned():
    model, batch = tiny_gpt(), prompts()
    full = generate(model, batch, 12, temperature=0)
    stop = int(full[0][4])
    stopped = generate(model, batch, 12, temperature=0, stop_tokens=[stop])
    for row, cut in zip(full, stopped, strict=True):
        hits = (row == stop).nonzero().flatten().tolist()
        assert torch.equal(cut, row[: hits[0]] if hits else row)


def test_vocab_size_keeps_padded_logits_out():
    model = tiny_gpt(vocab_size=90, padding_multiple=64)  # 128 rows, 90 real ids
    with torch.no_grad():
        model.lm_head.weight[90:] = 100.0  # padding rows would always win
    out = generate(model, prompts()[0], 20, seed=0, vocab_size=90)
    assert int(out.max()) < 90


def test_length_limits():
    model = tiny_gpt()
    assert len(generate(model, prompts()[0], 0)) == 0
    with pytest.raises(ValueError, match=r"max_new_tokens=61.*block_size"):
        generate(model, prompts()[0], 61)
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, [torch.zeros(0, dtype=torch.long)], 3)


# --- compiled decoding ---------------------------------------------------------------------


def compilations() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", ["rope-gqa", "alibi", "softcap"])
def test_compiled_decoding_gives_the_eager_tokens(name):
    model, batch = tiny_gpt(**CONFIGS[name]), prompts()  # padded: the static cache's mask
    for sampling in ({"temperature": 0}, {"seed": 3, "top_k": 20, "top_p": 0.9}):
        eager = generate(model, batch, 12, **sampling)
        compiled = generate(model, batch, 12, compile=True, **sampling)
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))
    before = compilations()
    generate(model, batch, 20, temperature=0, compile=True)  # the same batch and cache size
    assert compilations() == before
    assert all(block.attn.kv_cache is None for block in model.transformer.h)


def test_compiled_decoding_follows_changed_weights():
    """Freezing bakes weights into the compiled step: an update must recompile it."""
    model, prompt = tiny_gpt(), prompts()[1]
    first = generate(model, prompt, 8, temperature=0, compile=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight.roll(1, dims=0))
    eager = generate(model, prompt, 8, temperature=0)
    assert not torch.equal(first, eager)
    assert torch.equal(generate(model, prompt, 8, temperature=0, compile=True), eager)


def test_compiled_decoding_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="sliding-window"):
        generate(tiny_gpt(sliding_window_size=4), prompts()[0], 3, compile=True)
    moe = tiny_gpt(mlp_class_name="MoE", n_expert=4, n_expert_per_token=2)
    with pytest.raises(ValueError, match=r"mixture-of-experts layers \(transformer.h.0.mlp"):
        generate(moe, prompts()[0], 3, compile=True)
    with pytest.raises(ValueError, match="compile=True needs a lab GPT with a KV cache"):
        generate(tiny_gpt(), prompts()[0], 3, compile=True, kv_cache=False)
