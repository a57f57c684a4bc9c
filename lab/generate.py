"""Text generation: sampling, KV-cache decoding, stop conditions and streaming.

    prompt ids --model--> logits of the last position --sample--> next id --> append, repeat

Two ways to get the next logits, chosen by ``supports_kv_cache(model)``:

- **KV cache** (``GPT`` and models built from its unmodified attention): the prompt
  is run once ("prefill"), then each step feeds only the newest token at
  ``input_pos`` and reads the past keys and values from the cache;
- **full recomputation** (any module mapping ids (B, T) to logits (B, T, V), such as
  the guide's ``CustomGPT``, whose attention ignores the cache): the whole sequence
  again at every step. Slower, the same tokens (the tests check both ways agree).

Batched prompts of different lengths are padded on the left, so every row's newest
token is in the last column, and an attention mask hides the padding::

    row 0:  pad pad  a   b   c  | new new ...
    row 1:   d   e   f   g   h  | new new ...

Padding shifts a row's absolute positions. RoPE, ALiBi and NoPE only see
*relative* positions, so a padded row gets the tokens it would get alone (greedy:
exactly, up to float rounding); a model with learned or sinusoidal positions, or one
that takes no ``mask``, is instead run once per group of equal-length prompts.

Sampling draws from a ``torch.Generator`` (``seed`` makes one), never the global RNG,
so a seed gives the same text whatever else the program draws.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lab.model import GPT, Block, CausalSelfAttention
from lab.moe import moe_layers
from lab.params import model_device, weights_version
from lab.tokenizer import IncrementalDecoder, Tokenizer

FINISHED = -1  # the id ``decode_steps`` reports for a row that has stopped


# --- sampling --------------------------------------------------------------------------


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next ids (B,) from logits (B, V).

    ``temperature == 0`` is greedy (argmax). Otherwise the distribution is
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely ids, then
    to the smallest set of most likely ids whose probability reaches ``top_p``
    (nucleus sampling, Holtzman et al., 2020), renormalised.

    Draws use the exponential race: ``argmax_i p_i / E_i`` with ``E_i ~ Exp(1)`` picks
    ``i`` with probability ``p_i``. It takes the same number of random draws whatever
    the logits are, so one seed gives one sequence of draws.
    """
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the first id keeps 0
        drop = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)
        probs = probs.masked_fill(drop, 0.0)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float) -> None:
    """Raise a ValueError naming the sampling argument that is out of range."""
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature}; use 0 for greedy or a positive number")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}; use a positive integer, or None for no limit")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}; use a probability mass in (0, 1] (1 keeps every id)")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (a fresh random seed if None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# --- what the model can do --------------------------------------------------------------


def supports_kv_cache(model: nn.Module) -> bool:
    """Whether incremental decoding with ``model.set_kv_cache`` gives the right logits.

    Having ``set_kv_cache`` is not enough: the guide's ``CustomGPT`` inherits it from
    ``GPT`` while its own ``forward`` and attention never read the cache. So the
    answer is yes only if the model runs ``GPT.forward`` and every block and its
    attention run the stock ``forward`` (an override may only change helpers such as
    ``qkv`` or ``scaled_dot_product_attention``). A class that handles ``input_pos``
    and ``mask`` as the stock ones do says so with ``supports_kv_cache = True``.
    """
    declared = getattr(type(model), "supports_kv_cache", None)
    if declared is not None:
        return bool(declared)
    if not isinstance(model, GPT) or type(model).forward is not GPT.forward:
        return False
    return all(
        _runs_stock(block, Block) and _runs_stock(block.attn, CausalSelfAttention)
        for block in model.transformer.h
    )


def _runs_stock(module: nn.Module, base: type) -> bool:
    own = type(module)
    return own.forward is base.forward or bool(getattr(own, "supports_kv_cache", False))


def supports_padding(model: nn.Module) -> bool:
    """Whether left-padded rows decode as they would alone: the model takes a
    ``mask`` that reaches every attention (``supports_kv_cache``) and sees only
    relative positions (not learned or sinusoidal embeddings)."""
    config = getattr(model, "config", None)
    absolute = config is not None and config.positional_class.level == "embedding"
    return supports_kv_cache(model) and not absolute and _takes_mask(model)


def _takes_mask(model: nn.Module) -> bool:
    return "mask" in inspect.signature(model.forward).parameters


# --- decoding ids ---------------------------------------------------------------------------


def decode_steps(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_tokens: Sequence[int] = (),
    vocab_size: int | None = None,
    kv_cache: bool | None = None,
    compile: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield each step's new ids (B,) for prompts (1-D id tensors), ``FINISHED`` (-1)
    for rows that have produced one of ``stop_tokens`` (which is not reported).

    Stops after ``max_new_tokens`` steps or once every row has finished. Logits beyond
    ``vocab_size`` (padded embedding rows a tokenizer never produces) are ignored.
    ``kv_cache`` None uses the cache when ``supports_kv_cache(model)``. Prompts of
    different lengths need ``supports_padding(model)`` (see ``generate``, which
    groups them otherwise). The model runs in eval mode and no_grad, and any KV cache
    made here is removed when the generator is closed or exhausted.

    ``compile=True`` runs each step after the prompt through ``torch.compile`` (see
    ``compiled_step``): the same tokens, several times faster on a CPU for small
    models, after a compilation of some seconds per model, batch size and length.
    """
    check_sampling(temperature, top_k, top_p)
    use_cache = supports_kv_cache(model) if kv_cache is None else kv_cache
    if use_cache and not supports_kv_cache(model):
        raise ValueError(
            f"kv_cache=True, but {type(model).__name__} does not use a KV cache "
            "(see lab.generate.supports_kv_cache); pass kv_cache=None or False"
        )
    if compile:
        _check_compilable(model, use_cache)
    ids, real = _left_pad(prompts, model_device(model))
    padded = not bool(real.all())
    if padded and not supports_padding(model):
        raise ValueError(
            f"prompts of different lengths need a model that masks padding and sees only "
            f"relative positions, which {type(model).__name__} does not; "
            "use lab.generate.generate, which groups prompts by length"
        )
    _check_length(model, ids.size(1), max_new_tokens)
    return _decode(
        model, ids, real if padded else None, max_new_tokens, use_cache, compile,
        dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator),
        torch.tensor(list(stop_tokens), dtype=torch.long, device=ids.device), vocab_size,
    )  # fmt: skip


def _decode(
    model: nn.Module,
    ids: torch.Tensor,
    real: torch.Tensor | None,
    max_new_tokens: int,
    use_cache: bool,
    compile: bool,
    sampling: dict,
    stop_tokens: torch.Tensor,
    vocab_size: int | None,
) -> Iterator[torch.Tensor]:
    """The loop behind ``decode_steps`` (a separate generator so that argument errors
    surface when ``decode_steps`` is called, not at the first ``next``)."""
    B, L = ids.shape
    was_training = model.training
    model.eval()
    # A compiled step sees the whole (static) cache, so its length is rounded up: one
    # compilation then serves every request that fits.
    needed = max(L + max_new_tokens - 1, 1)
    cache_length = (
        -(-needed // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE if compile else needed
    )
    if compile:
        _install_static_cache(model, B, cache_length)
    elif use_cache:
        model.set_kv_cache(B, cache_length)
    if real is not None:  # every generated token is real: extend the row mask once
        real = torch.cat([real, real.new_ones(B, cache_length + 1 - L)], dim=1)
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    compiled = compiled_step() if compile else None
    weights = _weights_key(model) if compile else 0
    try:
        with torch.inference_mode():
            x, input_pos = ids, torch.arange(L, device=ids.device)
            for step in range(max_new_tokens):
                if compile and step > 0:  # after the prompt, whose length varies
                    args = (model, x, input_pos, real, cache_length, weights)
                    logits = compiled(*args, may_compile=step == 1)  # shapes fixed from then on
                elif use_cache:  # a static cache (compile) is longer than the keys so far
                    keys = cache_length if compile else L + step
                    mask = _attention_mask(real, keys, causal=compile, query_pos=input_pos)
                    logits = model(x, input_pos=input_pos, **_mask_kwarg(mask))[:, -1]
                else:
                    mask = _attention_mask(real, L + step, causal=False)
                    logits = model(x, **_mask_kwarg(mask))[:, -1]
                token = sample(logits[:, :vocab_size], **sampling)
                if len(stop_tokens):  # (no per-step ops when nothing can stop)
                    stopped = torch.isin(token, stop_tokens)
                    yield token.masked_fill(finished | stopped, FINISHED)
                    finished |= stopped
                    if bool(finished.all()):
                        return
                else:
                    yield token
                if use_cache:
                    x, input_pos = token[:, None], input_pos[-1:] + 1
                else:
                    x = torch.cat([x, token[:, None]], dim=1)
    finally:
        if use_cache:
            model.clear_kv_cache()
        model.train(was_training)


# --- compiled decoding -------------------------------------------------------------------

STATIC_CACHE_MULTIPLE = 128  # compiled steps see caches of a multiple of this length


def _step(
    model: nn.Module,
    x: torch.Tensor,
    input_pos: torch.Tensor,
    real: torch.Tensor | None,
    cache_length: int,
    weights: int,
) -> torch.Tensor:
    """Logits (B, V) of one new token per row, ``x`` (B, 1) at ``input_pos`` (1,), with a
    static cache of ``cache_length`` positions (``real`` marks padding, as in ``_decode``).

    ``weights`` (``_weights_key``) is unused by the computation but read here, so a
    compiled step guards on it: inductor's freezing bakes the weights into the
    compiled code, which must not outlive them. Attention runs as plain matmul and
    softmax, which inductor fuses; a fused-attention kernel call costs more than its
    work for one query."""
    if weights < 0:
        raise ValueError(f"weights key {weights} must be non-negative")
    mask = _attention_mask(real, cache_length, causal=True, query_pos=input_pos)
    with sdpa_kernel(SDPBackend.MATH):
        return model(x, input_pos=input_pos, mask=mask)[:, -1]


@functools.cache
def compiled_step() -> Callable[..., torch.Tensor]:
    """``_step`` compiled by inductor with fixed shapes and frozen weights.

    Why it is faster: an eager decode step of a small model is mostly Python and
    dispatch overhead around a few hundred tiny ops. Compiled, the elementwise work
    (norms, RoPE, SwiGLU, the one-query attention) is fused into a few C++ (or Triton)
    kernels called from C++ (``cpp_wrapper``), and "freezing" turns the weights into
    constants that inductor pre-packs for the CPU's matmul library. It needs a C++
    compiler, as inductor does. Compiled once per model, batch size, cache length and
    weights version (dynamo's guards), up to ``torch._dynamo.config.cache_size_limit``
    variants, each holding a packed copy of the weights until ``torch.compiler.reset()``.
    """
    compiled = torch.compile(_step, dynamic=False)

    def step(*args, may_compile: bool) -> torch.Tensor:
        """``may_compile``: this call may (re)compile, so inductor's options must be set
        (read while compiling, and ``torch.compile(options=...)`` does not reach
        freezing); setting them costs ~30 us, a few % of a step, so only then.
        Otherwise the call repeats the previous one but for the token and position, so
        dynamo skips evaluating its guards (``skip_guard_eval_unsafe``: only those that
        tell its compiled variants apart), which were ~10 % of a batch-1 step."""
        if not may_compile:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return compiled(*args)
        with torch._inductor.config.patch(freezing=True, cpp_wrapper=True):
            return compiled(*args)

    return step


def _weights_key(model: nn.Module) -> int:
    """A number that changes when any weight may have (``weights_version``), and that
    differs between models (a model's first call gives it a serial number)."""
    serial = model.__dict__.setdefault("_lab_serial", next(_SERIALS))
    return hash((serial, weights_version(model))) & (2**62 - 1)


_SERIALS = itertools.count()


def _install_static_cache(model: nn.Module, batch_size: int, length: int) -> None:
    """Give ``model`` static KV caches for this batch size and length, the same ones
    as last time: a compiled step guards on the very buffers it was compiled with.
    They stay on the model (``release_static_caches`` frees them)."""
    weight = model.lm_head.weight
    key = (batch_size, length, weight.device, weight.dtype)
    caches = model.__dict__.setdefault("_lab_static_caches", {})
    if key not in caches:
        model.set_kv_cache(batch_size, length, static=True)
        caches[key] = [block.attn.kv_cache for block in model.transformer.h]
    for block, cache in zip(model.transformer.h, caches[key], strict=True):
        block.attn.kv_cache = cache


def release_static_caches(model: nn.Module) -> None:
    """Free the KV caches that ``compile=True`` decoding keeps on ``model`` between
    calls (the next such call allocates them again, and recompiles)."""
    model.__dict__.pop("_lab_static_caches", None)


def _check_compilable(model: nn.Module, use_cache: bool) -> None:
    """compile=True needs the KV cache (fixed shapes), the stock attention (other
    mixers, MLA and Gated DeltaNet, decode eagerly), no sliding window (the static
    cache's mask states causality only) and no MoE layers (their dispatch depends on
    the routing, so a compiled step would recompile for every new expert load)."""
    if not use_cache or not isinstance(model, GPT):
        raise ValueError(
            f"compile=True needs a lab GPT with a KV cache; {type(model).__name__} recomputes "
            "the whole sequence each step (see lab.generate.supports_kv_cache): use compile=False"
        )
    mixers = [
        f"{i} ({type(block.attn).__name__})"
        for i, block in enumerate(model.transformer.h)
        if type(block.attn).forward is not CausalSelfAttention.forward
    ]
    if mixers:
        raise ValueError(
            f"compile=True supports lab's CausalSelfAttention only, not layers "
            f"{', '.join(mixers)}; use compile=False"
        )
    windowed = [i for i, block in enumerate(model.transformer.h) if block.attn.sliding_window_size]
    if windowed:
        raise ValueError(
            f"compile=True does not support sliding-window attention (layers {windowed}); "
            "use compile=False"
        )
    routed = [name for name, _ in moe_layers(model)]
    if routed:
        raise ValueError(
            f"compile=True does not help mixture-of-experts layers ({', '.join(routed)}): "
            "their dispatch depends on the routing, so the step would recompile again and "
            "again; use compile=False"
        )


def _left_pad(
    prompts: Sequence[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D prompts right-aligned: ids (B, L) padded with 0, real (B, L) bool."""
    if isinstance(prompts, torch.Tensor) or not prompts:
        raise ValueError("prompts must be a non-empty list of 1-D id tensors")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} has no tokens; give every prompt some text")
    L = max(lengths)
    ids = torch.zeros(len(prompts), L, dtype=torch.long, device=device)
    real = torch.zeros(len(prompts), L, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        if prompt.ndim != 1:
            raise ValueError(f"prompt {row} has shape {tuple(prompt.shape)}; pass 1-D id tensors")
        ids[row, L - len(prompt) :] = prompt.to(device)
        real[row, L - len(prompt) :] = True
    return ids, real


def _mask_kwarg(mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``mask=`` only when there is one: models that never pad need not take it."""
    return {} if mask is None else {"mask": mask}


def _attention_mask(
    real: torch.Tensor | None,
    S: int,
    *,
    causal: bool,
    query_pos: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Which of S keys the queries at ``query_pos`` (T,; default all S positions) may
    see: bool (B, 1, T, S), or (T, S) when no row is padded; None when nothing is hidden.

    Real keys only, where ``real`` marks padding; a pad query also sees itself, as a
    row with every key hidden would make SDPA return NaN, which 0 * NaN would then
    spread into the real rows. ``causal`` adds ``key <= query`` (a static cache holds
    positions not written yet; otherwise the attention adds it)."""
    if real is None and not causal:
        return None  # the common case: no work on the decode loop's path
    device = (real if query_pos is None else query_pos).device
    key_pos = torch.arange(S, device=device)
    query_pos = key_pos if query_pos is None else query_pos
    allowed = key_pos <= query_pos[:, None] if causal else None
    if real is not None:
        padding = real[:, None, None, :S] | (key_pos == query_pos[:, None])
        allowed = padding if allowed is None else padding & allowed
    return allowed


def _check_length(model: nn.Module, prompt_length: int, max_new_tokens: int) -> None:
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}; use a non-negative integer")
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    needed = prompt_length + max_new_tokens - 1  # the last new token is never fed back
    if block_size is not None and needed > block_size:
        raise ValueError(
            f"a {prompt_length}-token prompt plus max_new_tokens={max_new_tokens} needs "
            f"{needed} positions, more than block_size ({block_size}); lower max_new_tokens "
            "or shorten the prompt"
        )


def _groups(model: nn.Module, prompts: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of prompts that can share a batch: all of them when padding is safe,
    else those of equal length."""
    if supports_padding(model):
        return [list(range(len(prompts)))]
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    return list(by_length.values())


def generate(
    model: nn.Module,
    prompt: torch.Tensor | Sequence[torch.Tensor],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_tokens: Sequence[int] = (),
    vocab_size: int | None = None,
    kv_cache: bool | None = None,
    compile: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """The new ids (without the prompt or the stop token) for one 1-D prompt, or a
    list of them for a list of prompts (batched; see ``decode_steps`` for the rest).

    >>> generate(model, tokenizer.encode("def "), 20, temperature=0)  # doctest: +SKIP
    """
    prompts = [prompt] if isinstance(prompt, torch.Tensor) else list(prompt)
    generator = make_generator(seed, model_device(model))
    new: list[list[int]] = [[] for _ in prompts]
    for group in _groups(model, prompts):
        steps = decode_steps(
            model, [prompts[i] for i in group], max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
            stop_tokens=stop_tokens, vocab_size=vocab_size, kv_cache=kv_cache, compile=compile,
        )  # fmt: skip
        for tokens in steps:  # a finished row reports FINISHED from then on
            for i, token in zip(group, tokens.tolist(), strict=True):
                if token != FINISHED:
                    new[i].append(token)
    out = [torch.tensor(row, dtype=torch.long) for row in new]
    return out[0] if isinstance(prompt, torch.Tensor) else out


# --- text -------------------------------------------------------------------------------------


class TextRow:
    """One row's text as ids arrive: whole characters only (``IncrementalDecoder``),
    cut at the first stop string, and holding back any tail that may begin one."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.pending = ""
        self.done = False

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now safe to show."""
        return self._release(self.decoder.step(token_id), final=False)

    def finish(self) -> str:
        """End of generation: return everything still held back."""
        text = self._release(self.decoder.flush(), final=True)
        self.done = True
        return text

    def _release(self, piece: str, final: bool) -> str:
        text = self.pending + piece
        hits = [i for s in self.stop if (i := text.find(s)) >= 0]
        if hits:
            self.pending, self.done = "", True
            return text[: min(hits)]
        keep = 0 if final else _stop_prefix_length(text, self.stop)
        self.pending = text[len(text) - keep :]
        return text[: len(text) - keep]


def _stop_prefix_length(text: str, stop: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the start of a stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def encode_prompts(tokenizer: Tokenizer, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Token ids of each prompt; an empty prompt is an error (there is nothing to
    continue from)."""
    encoded = [tokenizer.encode(p) for p in prompts]
    for prompt, ids in zip(prompts, encoded, strict=True):
        if len(ids) == 0:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens; give it some text")
    return encoded


def generate_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    seed: int | None = None,
    **decode_kwargs,
) -> list[str]:
    """The continuation of each prompt, cut before the first of ``stop`` (strings).
    ``decode_kwargs`` go to ``decode_steps`` (temperature, top_k, top_p, stop_tokens...)."""
    encoded = encode_prompts(tokenizer, prompts)
    rows = [TextRow(tokenizer, stop) for _ in prompts]
    generator = make_generator(seed, model_device(model))
    texts = [""] * len(prompts)
    for group in _groups(model, encoded):
        steps = decode_steps(
            model, [encoded[i] for i in group], max_new_tokens, generator=generator,
            vocab_size=tokenizer.vocab_size, **decode_kwargs,
        )  # fmt: skip
        with closing(steps):
            for tokens in steps:
                for i, token in zip(group, tokens.tolist(), strict=True):
                    if not rows[i].done:
                        texts[i] += rows[i].finish() if token == FINISHED else rows[i].push(token)
                if all(rows[i].done for i in group):
                    break
        for i in group:
            if not rows[i].done:
                texts[i] += rows[i].finish()
    return texts


def stream_text(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    seed: int | None = None,
    **decode_kwargs,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` piece by piece as it is generated; the
    pieces join to what ``generate_text`` returns. A character split across tokens
    arrives whole; text that may begin a stop string waits until it is known not to."""
    (ids,) = encode_prompts(tokenizer, [prompt])
    row = TextRow(tokenizer, stop)
    steps = decode_steps(
        model, [ids], max_new_tokens, generator=make_generator(seed, model_device(model)),
        vocab_size=tokenizer.vocab_size, **decode_kwargs,
    )  # fmt: skip
    with closing(steps):
        for tokens in steps:
            token = int(tokens[0])
            piece = row.finish() if token == FINISHED else row.push(token)
            if piece:
                yield piece
            if row.done:
                return
    if piece := row.finish():
        yield piece
