"""Data for small experiments: a real-text corpus, token streams and synthetic tasks.

Text without downloads: ``default_corpus()`` is Python-like source generated here
from a hand-written grammar and a fixed seed, the same bytes on every machine and
Python release; ``text_files`` reads your own files.  ``TokenDataset`` turns
text into a 1-D token array (in memory, or a ``.bin`` memmap for large inputs) and
samples ``(x, y)`` next-token batches from it, nanoGPT style.

Synthetic tasks probe one mechanism each and generate fresh samples on every call,
deterministically given a ``torch.Generator``.  Each returns ``(x, y)`` LongTensors of
shape ``(batch, seq_len)`` where ``y`` is the next-token target at labelled positions
and ``IGNORE_INDEX`` (-100) elsewhere, ready for ``F.cross_entropy(..., ignore_index)``;
``accuracy(logits, y)`` scores the labelled positions only.
"""

from __future__ import annotations

import os
import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from lab.tokenizer import Tokenizer

IGNORE_INDEX = -100
DEFAULT_CORPUS_BYTES = 2_000_000  # byte-level BPE with vocab 4096 trains on it in ~5 s

# ---------------------------------------------------------------------------
# Text files


def text_files(
    paths: Iterable[str | os.PathLike[str]], max_bytes: int | None = None
) -> Iterator[str]:
    """Yield the text of each file in order, stopping after ``max_bytes`` of UTF-8.

    Undecodable bytes become ``�`` so one odd file does not stop a run.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes}; use a positive number or None for all")
    remaining = max_bytes
    for path in map(Path, paths):
        if not path.is_file():
            raise ValueError(
                f"{path} is not a file; pass files, e.g. sorted(Path(d).rglob('*.txt'))"
            )
        data = path.read_bytes()
        if remaining is not None:
            data = data[:remaining]
            remaining -= len(data)
        yield data.decode("utf-8", errors="replace")
        if remaining == 0:
            return


# ---------------------------------------------------------------------------
# Real-looking text: a generated corpus of Python-like source
#
# Vocabulary and grammar are written here; the only randomness is
# ``random.Random(seed).random()``, whose sequence Python keeps the same across
# releases and machines (``choice``, ``randint`` and ``shuffle`` have changed), so
# ``default_corpus`` is the same bytes everywhere (tests/test_data.py pins its hash).

NOUNS = (
    "item", "record", "buffer", "node", "path", "config", "value", "count", "name",
    "key", "index", "size", "data", "result", "total", "line", "token", "message",
    "event", "queue", "cache", "score", "table", "row", "column", "request", "response",
    "session", "order", "price", "window", "layer", "user", "group", "field", "offset",
    "limit", "state", "entry", "target", "source", "block", "label", "weight", "batch",
)  # fmt: skip
VERBS = (
    "get", "set", "load", "save", "parse", "build", "update", "read", "write", "compute",
    "find", "check", "make", "add", "remove", "process", "send", "handle", "render",
    "merge", "split", "format", "validate", "reset", "close", "open", "collect", "apply",
)  # fmt: skip
ADJECTIVES = ("new", "old", "last", "first", "next", "max", "min", "raw", "full", "local")
MODULES = (
    "os", "sys", "math", "json", "re", "time", "random", "itertools", "functools",
    "logging", "string", "textwrap", "heapq", "bisect", "statistics", "datetime",
)  # fmt: skip
FROM_IMPORTS = (
    ("collections", ("defaultdict", "deque", "Counter", "OrderedDict")),
    ("pathlib", ("Path",)),
    ("typing", ("Any", "Iterator", "Optional", "Sequence")),
    ("dataclasses", ("dataclass", "field")),
)
WORDS = (
    "the", "a", "of", "to", "and", "is", "in", "for", "each", "this", "that", "it",
    "returns", "when", "if", "not", "with", "from", "every", "one", "given", "new",
    "list", "value", "string", "number", "file", "object", "none", "empty", "first",
)  # fmt: skip
EXCEPTIONS = ("ValueError", "KeyError", "TypeError", "OSError", "IndexError", "RuntimeError")
OPERATORS = (" + ", " - ", " * ", " // ", " % ")
COMPARISONS = (" < ", " > ", " == ", " != ", " <= ", " >= ")


class _PythonWriter:
    """Writes plausible Python modules, one statement at a time."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed).random
        self.constant = "LIMIT"  # the current module's constant

    def pick(self, options: Sequence[Any]) -> Any:
        return options[int(self.random() * len(options))]

    def chance(self, p: float) -> bool:
        return self.random() < p

    def count(self, low: int, high: int) -> int:
        return low + int(self.random() * (high - low + 1))

    def name(self) -> str:
        if self.chance(0.3):
            return f"{self.pick(ADJECTIVES)}_{self.pick(NOUNS)}"
        return self.pick(NOUNS)

    def sentence(self) -> str:
        words = [self.pick(WORDS) for _ in range(self.count(4, 11))]
        words[self.count(0, len(words) - 1)] = self.pick(NOUNS)
        return " ".join(words).capitalize() + "."

    def expression(self, names: list[str], depth: int = 0) -> str:
        roll = self.random()
        if roll < 0.25 or depth > 1:
            return self.pick([n for n in names if n != "self"] or names)
        if roll < 0.4:
            return str(self.count(0, 100))
        if roll < 0.5:
            return f'"{self.pick(NOUNS)}"'
        if roll < 0.7:
            left, right = self.expression(names, depth + 1), self.expression(names, depth + 1)
            return left + self.pick(OPERATORS) + right
        if roll < 0.8 and "self" in names:
            return f"self.{self.pick(NOUNS)}"
        if roll < 0.9:
            return f"len({self.pick(names)})"
        args = ", ".join(self.pick(names) for _ in range(self.count(0, 2)))
        return f"{self.pick(VERBS)}_{self.pick(NOUNS)}({args})"

    def condition(self, names: list[str]) -> str:
        if self.chance(0.3):
            return f"{self.pick(names)} is None"
        if self.chance(0.2):
            return f"{self.pick(names)} in {self.pick(names)}"
        return self.expression(names, 1) + self.pick(COMPARISONS) + self.expression(names, 1)

    def body(self, names: list[str], indent: str, depth: int) -> list[str]:
        lines = []
        for _ in range(self.count(1, 4 if depth else 6)):
            roll = self.random()
            if roll < 0.4:
                if roll < 0.1:
                    lines.append(f"{indent}# {self.sentence()}")
                target = self.name()
                lines.append(f"{indent}{target} = {self.expression(names)}")
                names = [*names, target]
            elif roll < 0.55 and depth < 2:
                lines.append(f"{indent}if {self.condition(names)}:")
                lines += self.body(names, indent + "    ", depth + 1)
                if self.chance(0.4):
                    lines.append(f"{indent}else:")
                    lines += self.body(names, indent + "    ", depth + 1)
            elif roll < 0.7 and depth < 2:
                item = self.pick(NOUNS)
                lines.append(f"{indent}for {item} in {self.pick(names)}:")
                lines += self.body([*names, item], indent + "    ", depth + 1)
            elif roll < 0.77 and depth < 2:
                lines.append(f"{indent}try:")
                lines += self.body(names, indent + "    ", depth + 1)
                lines.append(f"{indent}except {self.pick(EXCEPTIONS)}:")
                lines.append(f"{indent}    {self.pick(('pass', 'continue', 'raise'))}")
            elif roll < 0.85:
                item, source = self.pick(NOUNS), self.pick(names)
                lines.append(f"{indent}{self.name()} = [{item} for {item} in {source} if {item}]")
            elif roll < 0.92:
                lines.append(f'{indent}print(f"{self.pick(WORDS)} {{{self.pick(names)}}}")')
            elif "self" in names:
                lines.append(f"{indent}self.{self.pick(NOUNS)} = {self.expression(names)}")
            else:
                lines.append(f"{indent}{self.pick(VERBS)}_{self.pick(NOUNS)}({self.pick(names)})")
        if depth == 0 or self.chance(0.3):
            lines.append(f"{indent}return {self.expression(names)}")
        return lines

    def function(self, indent: str, method: bool) -> list[str]:
        params = list(dict.fromkeys(self.pick(NOUNS) for _ in range(self.count(0, 3))))
        signature = ", ".join(["self", *params] if method else params)
        lines = [f"{indent}def {self.pick(VERBS)}_{self.name()}({signature}):"]
        if self.chance(0.6):
            lines.append(f'{indent}    """{self.sentence()}"""')
        names = [*params, "self"] if method else params or [self.constant]
        lines += self.body(names, indent + "    ", 0)
        return lines

    def klass(self) -> list[str]:
        name = "".join(self.pick(NOUNS).capitalize() for _ in range(self.count(1, 2)))
        lines = [f"class {name}:", f'    """{self.sentence()}"""', ""]
        attrs = list(dict.fromkeys(self.pick(NOUNS) for _ in range(self.count(1, 3))))
        lines.append(f"    def __init__(self, {', '.join(attrs)}):")
        lines += [f"        self.{a} = {a}" for a in attrs]
        for _ in range(self.count(1, 4)):
            lines += ["", *self.function("    ", method=True)]
        return lines

    def module(self) -> str:
        lines = [f'"""{self.sentence()}', "", self.sentence(), '"""', ""]
        for _ in range(self.count(1, 4)):
            lines.append(f"import {self.pick(MODULES)}")
        if self.chance(0.7):
            package, names = self.pick(FROM_IMPORTS)
            lines.append(f"from {package} import {self.pick(names)}")
        self.constant = f"{self.pick(ADJECTIVES).upper()}_{self.pick(NOUNS).upper()}"
        lines += ["", f"{self.constant} = {self.count(1, 512)}"]
        for _ in range(self.count(2, 5)):
            lines += ["", "", *(self.klass() if self.chance(0.4) else self.function("", False))]
        if self.chance(0.3):
            lines += [
                "",
                "",
                'if __name__ == "__main__":',
                f"    {self.pick(VERBS)}_{self.pick(NOUNS)}()",
            ]
        return "\n".join(lines) + "\n\n"


def python_like_modules(seed: int = 0) -> Iterator[str]:
    """An endless, deterministic stream of generated Python-like modules."""
    writer = _PythonWriter(seed)
    while True:
        yield writer.module()


def default_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """The first ``max_bytes`` of generated Python-like source (ASCII, one string).

    The same bytes on every machine and Python release: classes, functions, ``self``,
    ``return``, imports and comments, enough structure for BPE to learn and a small
    model to imitate, without reading or downloading anything.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes}; use a positive number")
    parts, size = [], 0
    for module in python_like_modules():
        parts.append(module[: max_bytes - size])
        size += len(parts[-1])
        if size == max_bytes:
            return "".join(parts)


# ---------------------------------------------------------------------------
# Token streams


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The smallest unsigned dtype that holds every id: uint16 up to 65,536 ids."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def encode_texts(texts: Iterable[str] | str, tokenizer: Tokenizer, eos: bool = True) -> np.ndarray:
    """Concatenate the texts' token ids into one 1-D array, eos after each text."""
    chunks = list(_encoded(texts, tokenizer, eos))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)
    return tokens.astype(token_dtype(tokenizer.vocab_size))


def write_tokens(
    texts: Iterable[str] | str,
    tokenizer: Tokenizer,
    path: str | os.PathLike[str],
    eos: bool = True,
) -> np.memmap:
    """Stream the texts' token ids to a raw ``.bin`` file; return it as a memmap.

    One text is held in memory at a time, so corpora larger than RAM work.  Read it
    back later with ``read_tokens(path, tokenizer.vocab_size)``.
    """
    dtype = token_dtype(tokenizer.vocab_size)
    with open(path, "wb") as f:
        for ids in _encoded(texts, tokenizer, eos):
            f.write(ids.astype(dtype).tobytes())
    return read_tokens(path, tokenizer.vocab_size)


def read_tokens(path: str | os.PathLike[str], vocab_size: int) -> np.memmap:
    """Map a ``.bin`` file written by ``write_tokens`` without reading it into memory."""
    return np.memmap(path, dtype=token_dtype(vocab_size), mode="r")


def _encoded(texts: Iterable[str] | str, tokenizer: Tokenizer, eos: bool) -> Iterator[np.ndarray]:
    for text in [texts] if isinstance(texts, str) else texts:
        yield tokenizer.encode(text, eos=eos).numpy()


@dataclass
class TokenDataset:
    """Train and validation token arrays, and random ``(x, y)`` windows from them.

    >>> data = TokenDataset.from_texts([default_corpus(100_000)], ByteTokenizer())
    >>> x, y = data.get_batch("train", 8, 64, torch.Generator().manual_seed(0))
    """

    train: np.ndarray
    val: np.ndarray

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, val_fraction: float = 0.1) -> TokenDataset:
        """Split a 1-D token array: the last ``val_fraction`` becomes validation."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction}; use a number between 0 and 1")
        if np.ndim(tokens) != 1:
            raise ValueError(f"tokens has shape {np.shape(tokens)}; pass a 1-D array of ids")
        split = int(len(tokens) * (1 - val_fraction))
        return cls(train=tokens[:split], val=tokens[split:])

    @classmethod
    def from_texts(
        cls,
        texts: Iterable[str] | str,
        tokenizer: Tokenizer,
        val_fraction: float = 0.1,
        path: str | os.PathLike[str] | None = None,
    ) -> TokenDataset:
        """Tokenize ``texts`` (into memory, or into a memmapped ``.bin`` at ``path``)."""
        if path is None:
            tokens = encode_texts(texts, tokenizer)
        else:
            tokens = write_tokens(texts, tokenizer, path)
        return cls.from_tokens(tokens, val_fraction)

    def get_batch(
        self,
        split: Literal["train", "val"],
        batch_size: int,
        block_size: int,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows: ``x`` of ``block_size`` ids, ``y`` shifted by one."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; use 'train' or 'val'")
        data = self.train if split == "train" else self.val
        if len(data) <= block_size:
            raise ValueError(
                f"the {split} split has {len(data)} tokens, too few for "
                f"block_size={block_size}; use a smaller block_size or more text"
            )
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        windows = np.stack([data[s : s + block_size + 1] for s in starts.tolist()])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


# ---------------------------------------------------------------------------
# Instruction data


@dataclass
class InstructionDataset:
    """Instruction-following records, ``{"instruction", "input", "output"}`` (the
    format of the guide's training test, and of Alpaca-style data sets), as batches.

    Each record becomes ``prompt(record) + output + EOS``; the loss is on the output
    and the EOS only (prompt positions are ``IGNORE_INDEX``), so the model learns to
    answer, not to repeat the question. Rows are right-padded to the longest in the
    batch. Generate with the same ``prompt(record)`` to ask the trained model.
    """

    records: list[dict[str, str]]
    tokenizer: Tokenizer
    block_size: int | None = None  # truncate longer examples (the output's end is lost)

    def __post_init__(self) -> None:
        if not self.records:
            raise ValueError("records is empty; pass at least one {'instruction', 'output'}")
        for i, record in enumerate(self.records):
            missing = {"instruction", "output"} - set(record)
            if missing:
                raise ValueError(f"records[{i}] lacks {sorted(missing)}; every record needs both")
        if self.tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no EOS token, so answers could never end")

    @staticmethod
    def prompt(record: dict[str, str]) -> str:
        """The text the model sees before its answer."""
        context = record.get("input") or ""
        parts = [f"### Instruction:\n{record['instruction']}\n\n"]
        if context:
            parts.append(f"### Input:\n{context}\n\n")
        parts.append("### Response:\n")
        return "".join(parts)

    def example(self, record: dict[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of one record: y is x shifted by one, labelled on the answer."""
        prompt = self.tokenizer.encode(self.prompt(record))
        answer = self.tokenizer.encode(record["output"], eos=True)
        tokens = torch.cat((prompt, answer))
        labels = torch.cat((torch.full_like(prompt, IGNORE_INDEX), answer))
        if self.block_size is not None:
            tokens, labels = tokens[: self.block_size + 1], labels[: self.block_size + 1]
        return tokens[:-1], labels[1:]

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random records, right-padded: x (B, T), y (B, T)."""
        picks = torch.randint(len(self.records), (batch_size,), generator=generator).tolist()
        examples = [self.example(self.records[i]) for i in picks]
        T = max(len(x) for x, _ in examples)
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        x = torch.full((batch_size, T), pad, dtype=torch.long)
        y = torch.full((batch_size, T), IGNORE_INDEX, dtype=torch.long)
        for row, (tokens, labels) in enumerate(examples):
            x[row, : len(tokens)], y[row, : len(labels)] = tokens, labels
        return x, y


# ---------------------------------------------------------------------------
# Synthetic tasks


def accuracy(logits: torch.Tensor, y: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> float:
    """Fraction of labelled positions where the arg-max prediction is the target."""
    if logits.shape[:-1] != y.shape:
        raise ValueError(
            f"logits has shape {tuple(logits.shape)} and y {tuple(y.shape)}; "
            "logits must be y's shape plus a vocabulary dimension"
        )
    labelled = y != ignore_index
    if not labelled.any():
        raise ValueError("y has no labelled positions (all are ignore_index)")
    return (logits.argmax(-1)[labelled] == y[labelled]).float().mean().item()


class Task(ABC):
    """A synthetic task: ``sample(batch_size, generator) -> (x, y)``.

    Subclasses are dataclasses that set ``name`` and define ``vocab_size``,
    ``seq_len`` and ``_sequences``, which returns whole token sequences and the mask of
    positions whose token is a label; ``sample`` shifts them into inputs and targets.
    """

    name: ClassVar[str]

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the task uses: the model's embedding rows."""

    @property
    @abstractmethod
    def seq_len(self) -> int:
        """Length of ``x`` and ``y`` (one less than the generated sequence)."""

    @abstractmethod
    def _sequences(
        self, batch_size: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole sequences ``(B, seq_len + 1)`` and the mask of tokens that are labels."""

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh ``(x, y)`` of shape ``(batch_size, seq_len)``; ``y`` is -100 where unlabelled."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; use a positive number")
        seq, is_label = self._sequences(batch_size, generator)
        y = seq[:, 1:].masked_fill(~is_label[:, 1:], IGNORE_INDEX)
        return seq[:, :-1].clone(), y


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _random_subsets(
    batch_size: int, population: int, k: int, generator: torch.Generator | None
) -> torch.Tensor:
    """``k`` distinct values from ``range(population)`` per row, in random order."""
    return torch.rand(batch_size, population, generator=generator).argsort(-1)[:, :k]


@dataclass
class MQAR(Task):
    """Multi-query associative recall (Zoology): recall the value bound to a key.

    ``k1 v1 k2 v2 ... kn vn  q1 a1 q2 a2 ...``: distinct keys with random values,
    then keys queried in random order; the label at each query is its value.
    Keys are ids ``[0, num_keys)``, values ``[num_keys, num_keys + num_values)``.

    Recipe (measured on one CPU thread, seeds 0-2): with these defaults (8 pairs,
    32 keys, 32 values, seq_len 31), ``GPT(Config(n_layer=2, n_embd=64, n_head=4,
    intermediate_size=256, positional="learned", ...))`` re-initialised with
    PyTorch's defaults (``reset_parameters()`` of every ``nn.Linear`` and
    ``nn.Embedding``: embeddings N(0, 1), matrices U(+-1/sqrt(fan_in))) and trained by
    ``fit(..., batch_size=64, lr=3e-3, weight_decay=0.0, schedule="constant")``
    passes 99% validation accuracy after 250-350 steps, 15-20 s at ~50 ms a step.

    With GPT's own GPT-2 init (N(0, 0.02), meant for width 768) the same model stays
    on a plateau at ~36% for over 1,200 steps, whatever the positions (learned or
    RoPE), MLP (gated or ReLU), clipping, QK-norm, attention scale, lr or pair count:
    it learns to guess a value of the context not yet answered, which scores
    ``(1 + 1/2 + ... + 1/n) / n`` (34% for 8 pairs), but not to bind keys to values.
    PyTorch-scale embeddings with GPT-2-scale matrices, or the reverse, stay there
    too: both scales are needed.  Fewer pairs learn faster; more pairs or a wider
    key space need a wider model (Zoology's finding).
    """

    name: ClassVar[str] = "mqar"
    num_pairs: int = 8
    num_queries: int | None = None  # None: query every key once
    num_keys: int = 32
    num_values: int = 32

    def __post_init__(self) -> None:
        _require(self.num_pairs >= 1, f"num_pairs={self.num_pairs}; use at least 1")
        _require(
            self.num_keys >= self.num_pairs,
            f"num_keys={self.num_keys} < num_pairs={self.num_pairs}; keys must be distinct, "
            "so use num_keys >= num_pairs",
        )
        _require(self.num_values >= 1, f"num_values={self.num_values}; use at least 1")
        _require(
            1 <= self.queries <= self.num_pairs,
            f"num_queries={self.num_queries}; use 1..num_pairs ({self.num_pairs}) or None",
        )

    @property
    def queries(self) -> int:
        return self.num_pairs if self.num_queries is None else self.num_queries

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    @property
    def seq_len(self) -> int:
        return 2 * (self.num_pairs + self.queries) - 1

    def _sequences(
        self, batch_size: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys = _random_subsets(batch_size, self.num_keys, self.num_pairs, generator)
        values = self.num_keys + torch.randint(
            self.num_values, (batch_size, self.num_pairs), generator=generator
        )
        asked = _random_subsets(batch_size, self.num_pairs, self.queries, generator)
        context = torch.stack([keys, values], -1).flatten(1)
        queries = torch.stack([keys.gather(1, asked), values.gather(1, asked)], -1).flatten(1)
        is_label = torch.zeros_like(queries, dtype=torch.bool)
        is_label[:, 1::2] = True
        seq = torch.cat([context, queries], 1)
        return seq, torch.cat([torch.zeros_like(context, dtype=torch.bool), is_label], 1)


@dataclass
class InductionHeads(Task):
    """Copy a random sequence seen once: ``s SEP s``, labelled on the second copy.

    Predicting token ``i`` of the copy needs an induction head: find the previous
    occurrence of the current token and copy what followed it.  Content tokens are
    ``[0, num_tokens)``; the separator is ``num_tokens``.
    """

    name: ClassVar[str] = "induction"
    length: int = 16
    num_tokens: int = 32

    def __post_init__(self) -> None:
        _require(self.length >= 1, f"length={self.length}; use at least 1")
        _require(self.num_tokens >= 2, f"num_tokens={self.num_tokens}; use at least 2")

    @property
    def separator(self) -> int:
        return self.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.num_tokens + 1

    @property
    def seq_len(self) -> int:
        return 2 * self.length

    def _sequences(
        self, batch_size: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.randint(self.num_tokens, (batch_size, self.length), generator=generator)
        sep = torch.full((batch_size, 1), self.separator)
        seq = torch.cat([s, sep, s], 1)
        is_label = torch.zeros_like(seq, dtype=torch.bool)
        is_label[:, self.length + 1 :] = True
        return seq, is_label


@dataclass
class SelectiveCopy(Task):
    """Copy the content tokens scattered among blanks, in order, after a delimiter.

    ``_ a _ _ b _ c _ SEP a b c``: unlike plain copying the positions vary, so the
    model must select by content (the Mamba paper's selective copying).  Content
    tokens are ``[0, num_tokens)``, blank is ``num_tokens``, the delimiter
    ``num_tokens + 1``; labels are the copied tokens.
    """

    name: ClassVar[str] = "selective_copy"
    num_memorize: int = 4
    region_len: int = 16
    num_tokens: int = 8

    def __post_init__(self) -> None:
        _require(self.num_memorize >= 1, f"num_memorize={self.num_memorize}; use at least 1")
        _require(
            self.region_len >= self.num_memorize,
            f"region_len={self.region_len} < num_memorize={self.num_memorize}; "
            "use region_len >= num_memorize",
        )
        _require(self.num_tokens >= 1, f"num_tokens={self.num_tokens}; use at least 1")

    @property
    def blank(self) -> int:
        return self.num_tokens

    @property
    def delimiter(self) -> int:
        return self.num_tokens + 1

    @property
    def vocab_size(self) -> int:
        return self.num_tokens + 2

    @property
    def seq_len(self) -> int:
        return self.region_len + self.num_memorize

    def _sequences(
        self, batch_size: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        content = torch.randint(
            self.num_tokens, (batch_size, self.num_memorize), generator=generator
        )
        slots = _random_subsets(batch_size, self.region_len, self.num_memorize, generator)
        region = torch.full((batch_size, self.region_len), self.blank)
        region.scatter_(1, slots.sort(-1).values, content)
        delimiter = torch.full((batch_size, 1), self.delimiter)
        seq = torch.cat([region, delimiter, content], 1)
        is_label = torch.zeros_like(seq, dtype=torch.bool)
        is_label[:, self.region_len + 1 :] = True
        return seq, is_label


@dataclass
class ModularAddition(Task):
    """``a + b = c`` with ``c = (a + b) mod p``, labelled at ``c``.

    Numbers are ids ``[0, p)``, ``+`` is ``p`` and ``=`` is ``p + 1``.  Samples are
    drawn from all ``p * p`` pairs, so this measures learning, not grokking.
    """

    name: ClassVar[str] = "modular_add"
    p: int = 97

    def __post_init__(self) -> None:
        _require(self.p >= 2, f"p={self.p}; use a modulus of at least 2")

    @property
    def vocab_size(self) -> int:
        return self.p + 2

    @property
    def seq_len(self) -> int:
        return 4

    def _sequences(
        self, batch_size: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = torch.randint(self.p, (2, batch_size, 1), generator=generator)
        plus, equals = torch.full_like(a, self.p), torch.full_like(a, self.p + 1)
        seq = torch.cat([a, plus, b, equals, (a + b) % self.p], 1)
        is_label = torch.zeros_like(seq, dtype=torch.bool)
        is_label[:, -1] = True
        return seq, is_label


TASKS: dict[str, type[Task]] = {
    task.name: task for task in (MQAR, InductionHeads, SelectiveCopy, ModularAddition)
}


def make_task(name: str, **kwargs: int | None) -> Task:
    """Build a task by name, e.g. ``make_task("mqar", num_pairs=16)``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
