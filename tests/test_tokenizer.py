"""Tokenizer: training, round trips, special tokens, padding, save/load, interop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers, trainers

from lab.data import default_corpus
from lab.tokenizer import ByteTokenizer, IncrementalDecoder, Tokenizer, load_tokenizer

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld — naïve café 😀🎉", "日本語のテキスト"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([default_corpus(200_000)], vocab_size=512)


def test_train_vocab_and_specials(tok: Tokenizer) -> None:
    assert tok.vocab_size == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.id_to_token(tok.eos_id) == "<|eos|>"
    assert tok.token_to_id("<|pad|>") == 2
    assert tok.token_to_id("not-a-token-at-all") is None
    assert len(tok.encode("return self")) < len("return self")  # merges were learned


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.ndim == 1
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_tokens_show_the_split(tok: Tokenizer) -> None:
    pieces = tok.tokens("def return")
    assert "".join(pieces) == "def return"
    assert pieces == tok.tokens(tok.encode("def return"))


def test_bos_eos(tok: Tokenizer) -> None:
    ids = tok.encode("hi", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "<|bos|>hi<|eos|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_missing_special_token_is_a_clear_error() -> None:
    tok = Tokenizer.train(["some text " * 50], vocab_size=300, special_tokens=())
    assert tok.bos_id is None and tok.pad_id is None
    with pytest.raises(ValueError, match="bos_token="):
        tok.encode("x", bos=True)
    with pytest.raises(ValueError, match="pad_token="):
        tok.encode_batch(["x"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_encode_batch_padding(tok: Tokenizer, side: str) -> None:
    texts = ["a", "a much longer line of text", ""]
    ids, mask = tok.encode_batch(texts, bos=True, padding_side=side)
    assert ids.shape == mask.shape and ids.shape[0] == 3 and mask.dtype == torch.bool
    for row, m, text in zip(ids, mask, texts, strict=True):
        assert torch.equal(row[m], tok.encode(text, bos=True))
        assert (row[~m] == tok.pad_id).all()
        real = m.nonzero().flatten()
        edge = real[-1] == len(m) - 1 if side == "left" else real[0] == 0
        assert edge and (real.diff() == 1).all()  # one contiguous run at that side
    with pytest.raises(ValueError, match="padding_side"):
        tok.encode_batch(texts, padding_side="middle")


def test_bad_inputs(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["x"], vocab_size=100)
    with pytest.raises(ValueError, match="decode each row"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="list of texts"):
        tok.encode_batch("one text")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer("/nonexistent/dir")


def test_save_load(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tok")
    for source in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json", str(tmp_path / "tok")):
        loaded = Tokenizer(source)
        assert loaded.special_tokens == tok.special_tokens
        for text in TEXTS:
            assert torch.equal(loaded.encode(text, bos=True), tok.encode(text, bos=True))


def test_transformers_gives_the_same_ids(tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    by_file = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    by_dir = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert by_dir.bos_token == "<|bos|>" and by_dir.pad_token_id == tok.pad_id
    for text in TEXTS:
        ours = tok.encode(text).tolist()
        assert by_file.encode(text, add_special_tokens=False) == ours
        assert by_dir.encode(text, add_special_tokens=False) == ours
        assert by_dir.decode(ours) == tok.decode(ours)


def _raw_tokenizer(special_tokens: list[str]) -> tokenizers.Tokenizer:
    raw = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=special_tokens)
    raw.train_from_iterator(["hello world, hello there"] * 20, trainer=trainer)
    return raw


def test_load_plain_tokenizers_file(tmp_path: Path) -> None:
    """A tokenizer.json from the library alone: specials found by conventional names."""
    _raw_tokenizer(["<unk>", "<|endoftext|>"]).save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer(tmp_path / "tokenizer.json")
    assert tok.bos_id is None and tok.pad_id is None
    assert tok.eos_id == tok.token_to_id("<|endoftext|>")
    assert tok.tokens("hello world") == ["hello", "world"]


def test_load_hf_model_directory(tmp_path: Path) -> None:
    """tokenizer_config.json names the specials, as a string or an AddedToken dict."""
    _raw_tokenizer(["<unk>", "<s>", "</s>", "<custom_pad>"]).save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<s>", "lstrip": False, "special": True},
        "eos_token": "</s>",
        "pad_token": None,
        "tokenizer_class": "LlamaTokenizerFast",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<custom_pad>"}))
    tok = Tokenizer(tmp_path)
    assert tok.bos_id == tok.token_to_id("<s>") and tok.eos_id == tok.token_to_id("</s>")
    assert tok.pad_id == tok.token_to_id("<custom_pad>")
    assert Tokenizer(tmp_path, pad_token="<unk>").pad_id == tok.token_to_id("<unk>")
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer(tmp_path, eos_token="<missing>")


def test_byte_tokenizer_round_trip(tmp_path: Path) -> None:
    tok = load_tokenizer(None)
    assert isinstance(tok, ByteTokenizer)
    assert tok.vocab_size == 259 and (tok.bos_id, tok.eos_id, tok.pad_id) == (256, 257, 258)
    text = "naïve café 😀 日本"
    assert tok.encode(text).tolist() == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text, bos=True, eos=True), skip_special_tokens=True) == text
    assert tok.decode([0xC3]) == "\ufffd"  # half a character decodes with errors="replace"
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode(text).tolist() == tok.encode(text).tolist()


@pytest.mark.parametrize("make", [ByteTokenizer, lambda: Tokenizer.train(TEXTS * 20, 300)])
def test_incremental_decoder(make) -> None:
    tok = make()
    text = "Café 😀 naïve — 日本語 🎉!"
    ids = tok.encode(text).tolist()
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.step(i) for i in ids]
    assert "".join(pieces) + decoder.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert list(tok.decode_stream(ids)) == [p for p in pieces if p]


def test_incremental_decoder_holds_back_partial_characters() -> None:
    tok = ByteTokenizer()
    decoder = IncrementalDecoder(tok)
    assert [decoder.step(b) for b in "é😀".encode()] == ["", "é", "", "", "", "😀"]
    decoder.step("😀".encode()[0])
    assert decoder.flush() == "\ufffd"  # generation stopped mid-character
