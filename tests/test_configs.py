"""Named configs: every one builds on the meta device with its published size, survives
a JSON round trip, and the lookup/registration API behaves as the guide's Step 4 uses it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import pytest
import torch

from lab import GPT, Config, ConfigError
from lab.configs import configs, hf_config_of, register_config
from lab.hf import FAMILIES, config_from_hf, config_to_hf, hf_model_type
from lab.registry import METADATA_KEYS, named_config

NAMES = sorted(configs)


@pytest.fixture
def restore_configs():
    """Undo any register_config a test makes, so tests stay independent."""
    saved = dict(configs)
    yield
    configs.clear()
    configs.update(saved)


def test_catalogue_is_large_and_well_formed():
    assert len(configs) >= 30
    assert len({entry["hf_config"]["org"] for entry in configs.values()}) >= 8
    for name, entry in configs.items():
        assert entry["name"] == name
        assert set(entry["hf_config"]) == {"org", "name"}
        assert isinstance(entry["published_params"], int) and entry["published_params"] > 0


@pytest.fixture(scope="module")
def warm_meta():
    """Build once first: the first meta build pays one-off costs (PyTorch imports and
    dispatch set-up) that would otherwise be charged to whichever config runs first."""
    with torch.device("meta"):
        GPT(Config(n_layer=1, n_embd=64, n_head=4, vocab_size=100))


@pytest.mark.parametrize("name", NAMES)
def test_builds_on_meta_with_published_size(name, warm_meta):
    config = Config.from_name(name)
    start = time.process_time()  # CPU time: a busy machine does not inflate it much
    with torch.device("meta"):
        model = GPT(config)
    elapsed = time.process_time() - start
    # Nothing may be allocated for real (a 70B model would not fit) ...
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    # ... and a meta build is cheap (typically 0.05-0.5 s); the bound is generous so
    # that a slow machine does not flake, but it catches real allocation or init.
    assert elapsed < 3.0, f"building {name} on the meta device took {elapsed:.2f}s of CPU"
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    published = configs[name]["published_params"]
    assert n_params == pytest.approx(published, rel=0.01), (
        f"{name}: GPT has {n_params:,} parameters, published {published:,} "
        f"({(n_params - published) / published:+.2%})"
    )


@pytest.mark.parametrize("name", NAMES)
def test_json_round_trip(name):
    config = Config.from_name(name)
    restored = Config.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.for_layer(config.n_layer - 1) == config.for_layer(config.n_layer - 1)


def test_named_config_is_a_copy_without_metadata():
    values = named_config("Gemma-2-2b")
    assert not set(METADATA_KEYS) & set(values)
    values["layer_overrides"][1]["sliding_window_size"] = 7
    values["n_layer"] = 1
    assert named_config("Gemma-2-2b")["layer_overrides"][1] == {"sliding_window_size": None}
    assert configs["Gemma-2-2b"]["n_layer"] == 26


def test_from_name_with_overrides_rederives():
    config = Config.from_name("pythia-70m", n_layer=2, n_embd=256)
    assert (config.name, config.n_layer, config.n_embd) == ("pythia-70m", 2, 256)
    assert config.head_size == 256 // 8 and config.intermediate_size == 4 * 256
    assert config.rotary_percentage == 0.25 and config.parallel_residual
    assert Config.from_name("pythia-70m").n_layer == 6  # the catalogue is unchanged


def test_from_name_carries_family_details():
    gemma2 = Config.from_name("Gemma-2-27b")
    assert gemma2.attention_scale == pytest.approx(144**-0.5)
    assert gemma2.for_layer(0).sliding_window_size == 4096  # HF Gemma 2: layer 0 slides
    assert gemma2.for_layer(1).sliding_window_size is None
    assert Config.from_name("Llama-3.1-8B").rope_scaling["type"] == "llama3"
    qwen = Config.from_name("Qwen2.5-0.5B")
    assert qwen.attn_bias and not qwen.bias and qwen.norm_eps == 1e-6


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError) as error:
        Config.from_name("llama-3.2-1b")
    assert "did you mean 'Llama-3.2-1B'" in str(error.value)
    assert error.value.field == "name"
    assert "Config.available()" in str(error.value)
    with pytest.raises(ConfigError, match="unknown model name 'zzz-nothing'"):
        named_config("zzz-nothing")


def test_register_config_step_4_with_subclass_field(restore_configs):
    @dataclass
    class MyModelConfig(Config):
        custom_param: float = 0.1

    register_config(
        dict(
            name="my-model-7b",
            hf_config=dict(org="myorg", name="my-model-7b"),
            block_size=4096,
            vocab_size=32000,
            n_layer=32,
            n_head=32,
            n_embd=4096,
            custom_param=0.1,
        )
    )
    config = MyModelConfig.from_name("my-model-7b", custom_param=0.5)
    assert isinstance(config, MyModelConfig)
    assert (config.custom_param, config.n_layer, config.head_size) == (0.5, 32, 128)
    assert MyModelConfig.from_name("my-model-7b").custom_param == 0.1
    assert "my-model-7b" in Config.available()
    assert hf_config_of("my-model-7b") == {"org": "myorg", "name": "my-model-7b"}
    # The base class has no such field and says so instead of dropping it.
    with pytest.raises(ConfigError, match="custom_param"):
        Config.from_name("my-model-7b")


def test_register_config_keywords_replace_and_require_a_name(restore_configs):
    register_config(name="tiny", n_layer=2, n_embd=64, n_head=4, vocab_size=100)
    register_config({"name": "tiny", "n_layer": 2}, n_layer=3, n_embd=64, n_head=4)
    assert Config.from_name("tiny").n_layer == 3
    with pytest.raises(ConfigError, match="name"):
        register_config(n_layer=2)


def test_hf_config_of():
    assert hf_config_of("Llama-3-8B") == {"org": "meta-llama", "name": "Meta-Llama-3-8B"}
    with pytest.raises(ConfigError, match="did you mean"):
        hf_config_of("Llama-3-8b")


@pytest.mark.parametrize("name", ["Gemma-2-2b", "Llama-3.2-1B", "pythia-70m", "phi-2", "gpt2"])
def test_named_configs_build_on_their_family_record(name):
    """A named architecture starts from its Hugging Face family's record, so the two
    cannot disagree: every value the family implies holds, and Gemma 2's alternating
    windows are the rule that reads a config.json without ``layer_types``."""
    config = Config.from_name(name)
    family = FAMILIES[hf_model_type(config)]
    assert {key: getattr(config, key) for key in family.fields} == family.fields
    config_json = config_to_hf(config)
    config_json.pop("layer_types", None)
    again = config_from_hf(config_json)
    windows = [config.for_layer(i).sliding_window_size for i in range(config.n_layer)]
    assert [again.for_layer(i).sliding_window_size for i in range(config.n_layer)] == windows


# The families of 2025: counted exactly, and against transformers' own model of the
# same config.json (built on the meta device), so the architecture cannot drift.
NAMES_2025 = [
    name
    for name in NAMES
    if name.startswith(("Qwen3", "Gemma-3", "OLMo-2", "SmolLM3", "gpt-oss", "DeepSeek-V3"))
]


@pytest.mark.parametrize("name", NAMES_2025)
def test_2025_sizes_equal_published_and_transformers(name, warm_meta):
    transformers = pytest.importorskip("transformers")
    config = Config.from_name(name)
    with torch.device("meta"):
        ours = sum(p.numel() for p in GPT(config).parameters())
        hf_config = transformers.AutoConfig.for_model(**config_to_hf(config))
        theirs = sum(
            p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf_config).parameters()
        )
    assert ours == theirs == configs[name]["published_params"]


def test_2025_layer_patterns():
    gemma = Config.from_name("Gemma-3-27b")
    local, world = gemma.for_layer(0), gemma.for_layer(5)  # five local layers, then a global
    assert (local.sliding_window_size, local.rope_base, local.rope_scaling) == (1024, 1e4, None)
    assert (world.sliding_window_size, world.rope_base) == (None, 1e6)
    assert world.rope_scaling == {"type": "linear", "factor": 8.0}
    assert gemma.attention_scale == pytest.approx(168**-0.5)
    smol = Config.from_name("SmolLM3-3B")
    nope = [i for i in range(smol.n_layer) if smol.for_layer(i).positional == "none"]
    assert nope == list(range(3, 36, 4))
    assert config_to_hf(smol)["no_rope_layers"] == [int((i + 1) % 4 != 0) for i in range(36)]
    qwen = Config.from_name("Qwen3-30B-A3B")
    assert (qwen.mlp_class_name, qwen.router, qwen.n_expert) == ("MoE", "topk_softmax", 128)
    assert hf_model_type(qwen) == "qwen3_moe" and config_to_hf(qwen)["norm_topk_prob"]
    olmo = Config.from_name("OLMo-2-32B")
    assert not olmo.pre_norm and olmo.norm_qk and not olmo.norm_qk_per_head
