"""``LLM``: a model and its tokenizer behind one call, text in and text out.

    llm = LLM(model=model, tokenizer_dir="path/to/tokenizer")
    llm.generate("Once upon a time", max_new_tokens=100)

Any module mapping token ids (B, T) to logits (B, T, V) works, the guide's
``CustomGPT`` included; see ``lab.generate`` for how tokens are chosen and when the
KV cache is used.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lab.checkpoint import atomic_directory, load_pretrained, save_pretrained
from lab.generate import generate_text, stream_text
from lab.model import GPT
from lab.tokenizer import ByteTokenizer, Tokenizer


class LLM:
    """A model with its tokenizer.

    ``tokenizer`` is a ``lab.tokenizer.Tokenizer``; ``tokenizer_dir`` a directory (or
    file) with a ``tokenizer.json``; with neither, a ``ByteTokenizer`` (259 ids), so
    an untrained model of ``vocab_size >= 259`` can talk at once.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer | None = None,
        tokenizer_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if tokenizer is not None and tokenizer_dir is not None:
            raise ValueError("pass tokenizer= or tokenizer_dir=, not both")
        if tokenizer is None:
            tokenizer = ByteTokenizer() if tokenizer_dir is None else Tokenizer(tokenizer_dir)
        rows = _embedding_rows(model)
        if rows is not None and tokenizer.vocab_size > rows:
            raise ValueError(
                f"the tokenizer has {tokenizer.vocab_size} ids but the model embeds only "
                f"{rows}; build the model with vocab_size >= {tokenizer.vocab_size} or "
                "pass a tokenizer with fewer ids"
            )
        self.model = model
        self.tokenizer = tokenizer

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 50,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_tokens: Sequence[int] | None = None,
        stream: bool = False,
        compile: bool = False,
    ) -> str | list[str] | Iterator[str]:
        """The continuation of ``prompt`` (a list of prompts gives a list, batched).

        ``temperature`` 0 is greedy; ``top_k`` and ``top_p`` restrict sampling to the
        most likely ids; the same ``seed`` gives the same text. Generation ends after
        ``max_new_tokens``, at one of ``stop_tokens`` (default: the tokenizer's eos)
        or before the first of the ``stop`` strings; neither appears in the text.
        ``stream=True`` returns a generator of text pieces instead (one prompt only).
        ``compile=True`` compiles the decoding step (``lab.generate.compiled_step``):
        worth its seconds of compilation for long or repeated generations.
        """
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if stop_tokens is None:
            eos = self.tokenizer.eos_id
            stop_tokens = () if eos is None else (eos,)
        kwargs = dict(
            temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
            stop=stops, stop_tokens=tuple(stop_tokens), compile=compile,
        )  # fmt: skip
        if stream:
            if not isinstance(prompt, str):
                raise ValueError("stream=True streams one prompt; pass a str, or stream=False")
            return stream_text(self.model, self.tokenizer, prompt, max_new_tokens, **kwargs)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        texts = generate_text(self.model, self.tokenizer, prompts, max_new_tokens, **kwargs)
        return texts[0] if isinstance(prompt, str) else texts

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model checkpoint (``lab.checkpoint``: safetensors + config.json)
        and the tokenizer into ``path``, all or nothing: a crash mid-save leaves any
        previous save in place. ``LLM.load(path)`` reads it back."""
        with atomic_directory(path) as tmp:
            save_pretrained(self.model, tmp)
            self.tokenizer.save(tmp)
        return Path(path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model_class: type[nn.Module] = GPT,
        **kwargs: Any,
    ) -> LLM:
        """The model saved in ``path`` and the tokenizer beside it. ``kwargs``
        (``device``, ``dtype``, ``config_class``) go to ``lab.checkpoint.load_pretrained``;
        ``model_class`` builds the model from its config (e.g. your ``CustomGPT``)."""
        model = load_pretrained(path, model_class=model_class, **kwargs)
        return cls(model, tokenizer_dir=path)

    def __repr__(self) -> str:
        return f"LLM(model={type(self.model).__name__}, tokenizer={self.tokenizer!r})"


def _embedding_rows(model: nn.Module) -> int | None:
    """How many token ids the model can embed, when it says so."""
    transformer = getattr(model, "transformer", None)
    wte = getattr(transformer, "wte", None) if transformer is not None else None
    if isinstance(wte, nn.Embedding):
        return wte.num_embeddings
    config = getattr(model, "config", None)
    return getattr(config, "padded_vocab_size", None) or getattr(config, "vocab_size", None)
