"""Text <-> token ids, on the Hugging Face ``tokenizers`` library.

One class, ``Tokenizer``, covers the three ways a lab gets a tokenizer:

* train one in seconds: ``Tokenizer.train(texts, vocab_size=4096)`` (byte-level BPE,
  so any text encodes and nothing is ever unknown);
* load one: ``Tokenizer(path)`` reads a ``tokenizer.json`` written by the
  ``tokenizers`` library or shipped in a Hugging Face model directory, taking the
  bos/eos/pad names from ``tokenizer_config.json`` when present;
* need none: ``ByteTokenizer()`` maps each UTF-8 byte to its own id (259 ids in all).

Ids come back as ``torch.LongTensor`` (as in LitGPT) so they feed a model directly.
Special tokens are never added implicitly: ``encode(text, bos=True)`` says so, which
keeps Llama-style tokenizers (whose post-processor adds ``<s>``) and ours alike.

    >>> tok = ByteTokenizer()
    >>> tok.encode("hé").tolist()
    [104, 195, 169]
    >>> tok.tokens("hé")
    ['h', '�', '�']
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

DEFAULT_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")

# Names that tokenizer families use for their special tokens, tried in order when
# a tokenizer.json comes without a tokenizer_config.json saying which is which.
_CONVENTIONAL_NAMES = {
    "bos": ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"),
    "eos": ("<|eos|>", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]"),
}

Ids = Sequence[int] | torch.Tensor | np.ndarray


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus the names of its bos, eos and pad tokens.

    ``source`` is a directory holding ``tokenizer.json``, the path of such a file,
    or a ``tokenizers.Tokenizer`` object.  ``bos_token``/``eos_token``/``pad_token``
    override the names found in ``tokenizer_config.json`` (or guessed from
    conventional names such as ``<s>`` and ``<|endoftext|>`` when it is absent).
    """

    def __init__(
        self,
        source: str | os.PathLike[str] | tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
    ) -> None:
        if isinstance(source, tokenizers.Tokenizer):
            self.backend, names = source, {}
        else:
            self.backend, names = _load(Path(source))
        explicit = {"bos": bos_token, "eos": eos_token, "pad": pad_token}
        self.special_tokens: dict[str, str | None] = {}
        for role in ("bos", "eos", "pad"):
            name = explicit[role] or names.get(role) or self._conventional(role)
            if name is not None and self.backend.token_to_id(name) is None:
                raise ValueError(
                    f"{role}_token {name!r} is not in the vocabulary; "
                    f"pass {role}_token= naming one of its special tokens"
                )
            self.special_tokens[role] = name

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        min_frequency: int = 2,
    ) -> Tokenizer:
        """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

        The first three ``special_tokens`` become bos, eos and pad, in that order
        (pass fewer to go without); they get the ids after the 256 byte tokens.
        A few MB train in seconds: see ``lab.data.default_corpus``.
        """
        if isinstance(texts, str):
            texts = [texts]
        minimum = 256 + len(special_tokens)
        if vocab_size < minimum:
            raise ValueError(
                f"vocab_size={vocab_size} cannot hold the 256 byte tokens and "
                f"{len(special_tokens)} special tokens; use vocab_size >= {minimum}"
            )
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        roles = dict(zip(("bos_token", "eos_token", "pad_token"), special_tokens, strict=False))
        return Tokenizer(backend, **roles)

    def _conventional(self, role: str) -> str | None:
        added = {t.content for t in self.backend.get_added_tokens_decoder().values()}
        return next((n for n in _CONVENTIONAL_NAMES[role] if n in added), None)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``.

        The pair loads with ``Tokenizer(directory)`` and with ``transformers``'
        ``PreTrainedTokenizerFast.from_pretrained(directory)``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config |= {f"{role}_token": name for role, name in self.special_tokens.items()}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the model's embedding rows."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._special_id("bos")

    @property
    def eos_id(self) -> int | None:
        return self._special_id("eos")

    @property
    def pad_id(self) -> int | None:
        return self._special_id("pad")

    def _special_id(self, role: str) -> int | None:
        name = self.special_tokens[role]
        return None if name is None else self.backend.token_to_id(name)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry, as stored (byte-level BPE shows a space as ``Ġ``)."""
        return self.backend.id_to_token(token_id)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> torch.Tensor:
        """Token ids of ``text`` as a 1-D ``LongTensor``, with bos/eos only if asked."""
        return torch.tensor(self._with_specials(self._ids(text), bos, eos), dtype=torch.long)

    def encode_batch(
        self,
        texts: Sequence[str],
        bos: bool = False,
        eos: bool = False,
        padding_side: Literal["left", "right"] = "right",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad to the longest text: ``(ids (B, T), attention_mask (B, T) bool)``.

        Pad with ``padding_side="left"`` for generation, so every row's last token is
        real and new tokens append in step.  Padding uses the pad token, else eos.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; use 'left' or 'right'")
        if isinstance(texts, str):
            raise ValueError("encode_batch takes a list of texts; use encode() for one text")
        pad = self.pad_id if self.pad_id is not None else self.eos_id
        if pad is None:
            raise ValueError("this tokenizer has no pad or eos token; pass pad_token= when loading")
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        rows = [self._with_specials(e.ids, bos, eos) for e in encodings]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(len(row))
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = True
        return ids, mask

    def decode(self, ids: Ids, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D sequence of ids (list, tensor or array)."""
        return self.backend.decode(_as_list(ids), skip_special_tokens=skip_special_tokens)

    def tokens(self, text_or_ids: str | Ids) -> list[str]:
        """How a text splits: each token's own text (``�`` for part of a character)."""
        ids = self._ids(text_or_ids) if isinstance(text_or_ids, str) else _as_list(text_or_ids)
        return [self.backend.decode([i], skip_special_tokens=False) for i in ids]

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
        """Yield text as ids arrive, holding back partial characters (for generation)."""
        decoder = IncrementalDecoder(self, skip_special_tokens)
        for token_id in ids:
            if piece := decoder.step(token_id):
                yield piece
        if rest := decoder.flush():
            yield rest

    def _ids(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _with_specials(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        for role, wanted in (("bos", bos), ("eos", eos)):
            if wanted and self._special_id(role) is None:
                raise ValueError(
                    f"{role}=True but this tokenizer has no {role} token; "
                    f"pass {role}_token= when loading it, or {role}=False"
                )
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def __repr__(self) -> str:
        names = ", ".join(f"{role}={name!r}" for role, name in self.special_tokens.items())
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, {names})"


class ByteTokenizer(Tokenizer):
    """Each UTF-8 byte is its own id (0-255); bos, eos and pad are 256, 257 and 258.

    For when no trained tokenizer is at hand: nothing to train or download, and
    every text round-trips.  It saves and loads like any ``Tokenizer``.
    """

    def __init__(self) -> None:
        byte_chars = _bytes_to_unicode()
        vocab = {byte_chars[b]: b for b in range(256)}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens(list(DEFAULT_SPECIAL_TOKENS))
        bos, eos, pad = DEFAULT_SPECIAL_TOKENS
        super().__init__(backend, bos_token=bos, eos_token=eos, pad_token=pad)


class IncrementalDecoder:
    """Turn ids, fed one at a time, into text that only ever grows by whole characters.

    Byte-level BPE can split one character (an emoji, an accented letter) across
    tokens, and decoding each token alone prints ``�``.  This decodes a short window
    of recent ids and emits only new text that does not end in a partial character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # ids before this have been emitted as text

    def step(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" while a character is partial)."""
        self.ids.append(int(token_id))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """Text still held back at the end of generation, with ``�`` for cut characters."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Tokenizer:
    """``Tokenizer(path)``, or a ``ByteTokenizer`` when ``path`` is None."""
    return ByteTokenizer() if path is None else Tokenizer(path)


def _load(path: Path) -> tuple[tokenizers.Tokenizer, dict[str, str]]:
    """Read a tokenizer.json and the special-token names stored beside it."""
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        hint = ""
        if (file.parent / "tokenizer.model").is_file():
            hint = (
                "; it has a SentencePiece tokenizer.model: convert it once with "
                "transformers.AutoTokenizer.from_pretrained(d).save_pretrained(d)"
            )
        raise FileNotFoundError(f"no tokenizer.json at {file}{hint}")
    names: dict[str, str] = {}
    for config_name in ("special_tokens_map.json", "tokenizer_config.json"):  # later wins
        config_file = file.parent / config_name
        if config_file.is_file():
            config: dict[str, Any] = json.loads(config_file.read_text())
            for role in ("bos", "eos", "pad"):
                token = config.get(f"{role}_token")
                if isinstance(token, dict):  # AddedToken serialised: {"content": "<s>", ...}
                    token = token.get("content")
                if token:
                    names[role] = token
    return tokenizers.Tokenizer.from_file(str(file)), names


def _as_list(ids: Ids) -> list[int]:
    if isinstance(ids, torch.Tensor | np.ndarray) and ids.ndim != 1:
        raise ValueError(
            f"ids has shape {tuple(ids.shape)}; decode takes one sequence, "
            "so decode each row: [tok.decode(row) for row in ids]"
        )
    return [int(i) for i in ids]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    unprintable = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table |= {b: chr(256 + i) for i, b in enumerate(unprintable)}
    return table
