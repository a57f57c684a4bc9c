"""lab.LLM: text in, text out; stop strings, streaming, the guide's Step 5, save/load."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_guide import CustomGPT, MyModelConfig

from lab import GPT, LLM, Config
from lab.generate import supports_kv_cache
from lab.tokenizer import ByteTokenizer, Tokenizer


class Scripted(nn.Module):
    """Not a GPT: the next id is ``script[last id]``, so every continuation is known."""

    def __init__(self, script: dict[int, int], vocab_size: int = 259) -> None:
        super().__init__()
        table = torch.arange(1, vocab_size + 1) % vocab_size  # default: the next byte
        for current, following in script.items():
            table[current] = following
        self.register_buffer("table", table)
        self.vocab_size = vocab_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.table[idx], self.vocab_size).float() * 10


def test_text_in_text_out_and_batches():
    llm = LLM(Scripted({}))
    assert llm.generate("a", max_new_tokens=5, temperature=0) == "bcdef"
    assert llm.generate(["a", "xyz"], max_new_tokens=3, temperature=0) == ["bcd", "{|}"]


def test_stop_strings_cut_before_the_earliest_match():
    llm = LLM(Scripted({}))
    assert llm.generate("a", max_new_tokens=20, temperature=0, stop="de") == "bc"
    assert llm.generate("a", max_new_tokens=20, temperature=0, stop=["g", "ef"]) == "bcd"
    assert (
        llm.generate("a", max_new_tokens=20, temperature=0, stop=["zz"]) == "bcdefghijklmnopqrstu"
    )


def test_stop_tokens_default_to_eos():
    eos = ByteTokenizer().eos_id
    llm = LLM(Scripted({ord("d"): eos}))
    assert llm.generate("a", max_new_tokens=10, temperature=0) == "bcd"
    assert llm.generate("a", max_new_tokens=4, temperature=0, stop_tokens=()) == "bcd<|eos|>"


def test_stream_keeps_characters_whole_and_joins_to_the_same_text():
    # "é" is two bytes, 0xC3 0xA9: the scripted model emits them one token at a time.
    llm = LLM(Scripted({ord("b"): 0xC3, 0xC3: 0xA9, 0xA9: ord("c"), ord("e"): ord("x")}))
    kwargs = dict(max_new_tokens=8, temperature=0, stop="xy")
    pieces = list(llm.generate("a", stream=True, **kwargs))
    assert "é" in pieces and not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == llm.generate("a", **kwargs) == "béc" + "de"


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="not both"):
        LLM(Scripted({}), tokenizer=ByteTokenizer(), tokenizer_dir=".")
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        LLM(GPT(Config(n_layer=1, n_embd=16, n_head=2, vocab_size=200, block_size=8)))
    with pytest.raises(ValueError, match="stream=True"):
        LLM(Scripted({})).generate(["a", "b"], stream=True)
    with pytest.raises(ValueError, match="no tokens"):
        LLM(Scripted({})).generate("")


def test_seeded_text_repeats_with_a_trained_tokenizer():
    text = "the quick brown fox jumps over the lazy dog. " * 50
    tokenizer = Tokenizer.train([text], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(
        Config(n_layer=1, n_embd=32, n_head=2, vocab_size=tokenizer.vocab_size, block_size=64)
    )
    llm = LLM(model, tokenizer=tokenizer)
    first = llm.generate("the quick", max_new_tokens=20, seed=5, top_p=0.95)
    assert first == llm.generate("the quick", max_new_tokens=20, seed=5, top_p=0.95)
    assert first != llm.generate("the quick", max_new_tokens=20, seed=6, top_p=0.95)
    assert (
        "".join(llm.generate("the quick", max_new_tokens=20, seed=5, top_p=0.95, stream=True))
        == first
    )


# --- the guide's custom model, as tests/test_guide.py writes it -------------------------------

SMALL = dict(n_layer=2, n_head=4, n_query_groups=2, n_embd=64, intermediate_size=128,
             vocab_size=320, block_size=256)  # fmt: skip


def test_guide_step_5_runs_as_written(tmp_path, capsys):
    ByteTokenizer().save(tmp_path / "tokenizer")
    tokenizer_dir = str(tmp_path / "tokenizer")

    # Step 5, verbatim but for the path and a config that fits in memory:
    config = MyModelConfig(**SMALL)
    model = CustomGPT(config)
    llm = LLM(model=model, tokenizer_dir=tokenizer_dir)
    result = llm.generate("Once upon a time", max_new_tokens=100)
    print(result)

    assert isinstance(result, str) and capsys.readouterr().out == result + "\n"
    assert not supports_kv_cache(model)  # it inherits set_kv_cache but ignores the cache


def test_custom_model_greedy_matches_a_plain_recomputation_loop():
    torch.manual_seed(0)
    model = CustomGPT(MyModelConfig(**SMALL))
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # spread the logits: no near-ties
    llm = LLM(model)
    prompts = ["Once upon a time", "Hi", "The end."]
    ids = [llm.tokenizer.encode(p) for p in prompts]
    expected = []
    for seq in ids:
        seq = seq[None]
        with torch.no_grad():
            for _ in range(12):
                seq = torch.cat([seq, model(seq)[:, -1, :259].argmax(-1, keepdim=True)], dim=1)
        expected.append(llm.tokenizer.decode(seq[0, -12:]))
    got = llm.generate(prompts, max_new_tokens=12, temperature=0, stop_tokens=())
    assert got == expected


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT(Config(n_layer=1, n_embd=32, n_head=2, vocab_size=259, block_size=64))
    llm = LLM(model)
    text = llm.generate("hello", max_new_tokens=10, seed=1)
    llm.save(tmp_path / "llm")
    loaded = LLM.load(tmp_path / "llm")
    assert isinstance(loaded.tokenizer, Tokenizer) and loaded.tokenizer.vocab_size == 259
    assert loaded.generate("hello", max_new_tokens=10, seed=1) == text


def test_custom_model_saves_and_loads_with_its_classes(tmp_path):
    torch.manual_seed(0)
    llm = LLM(CustomGPT(MyModelConfig(**SMALL)))
    text = llm.generate("hello", max_new_tokens=10, seed=1)
    llm.save(tmp_path / "custom")
    llm.save(tmp_path / "custom")  # saving again replaces the directory cleanly
    loaded = LLM.load(tmp_path / "custom", model_class=CustomGPT, config_class=MyModelConfig)
    assert isinstance(loaded.model, CustomGPT) and loaded.model.config.custom_param == 0.1
    assert loaded.generate("hello", max_new_tokens=10, seed=1) == text
    assert sorted(f.name for f in tmp_path.iterdir()) == ["custom"]


def test_compiled_generation_gives_the_same_text():
    torch.manual_seed(0)
    model = GPT(Config(n_layer=1, n_embd=32, n_head=4, vocab_size=259, block_size=64))
    llm = LLM(model, tokenizer=ByteTokenizer())
    kwargs = dict(max_new_tokens=12, temperature=0.8, seed=1, stop_tokens=())
    eager = llm.generate("def f(", **kwargs)
    assert llm.generate("def f(", compile=True, **kwargs) == eager
    assert "".join(llm.generate("def f(", stream=True, compile=True, **kwargs)) == eager
