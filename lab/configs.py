"""Named architectures as data: the published hyperparameters of real models.

``configs`` maps a name to a dict of ``Config`` field values; ``Config.from_name``
builds one (``Config.from_name("Llama-3.2-1B", n_layer=2)``).  Each entry may carry
two metadata keys that are not ``Config`` fields:

* ``hf_config``: ``dict(org=..., name=...)``, the Hugging Face repository whose
  ``config.json`` the values come from;
* ``published_params``: the published total parameter count (tied weights counted
  once), which ``tests/test_configs.py`` checks against ``GPT(config)``.

Conventions: ``block_size`` is the model's maximum context (``max_position_embeddings``
or ``n_positions`` in ``config.json``); ``padded_vocab_size`` is the number of
embedding rows in the checkpoint, ``vocab_size`` the tokenizer's vocabulary where it
is smaller; ``norm_eps`` is copied exactly.  Names follow LitGPT's where LitGPT has
the model, so checkpoints and habits carry over.

Add your own with ``register_config`` (the guide's "Step 4")::

    register_config(
        name="my-model-7b",
        hf_config=dict(org="myorg", name="my-model-7b"),
        block_size=4096, vocab_size=32000, n_layer=32, n_head=32, n_embd=4096,
        custom_param=0.1,  # a field of your Config subclass
    )
    MyModelConfig.from_name("my-model-7b")
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from lab.errors import ConfigError
from lab.hf.families import (
    FAMILIES,
    alternating,
    every_nth_global,
    mla_attention_scale,
    set_per_layer,
    sliding_window_fields,
)
from lab.registry import known_config, named_configs

# Keys of an entry that describe the model but are not Config fields.


def _family(org: str, base: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    """An entry maker for one family: ``make(name, published_params, **fields)``.

    ``base`` holds what the family shares; ``fields`` override it.  ``hf_name`` sets
    the Hugging Face repository name when it differs from ``name``.
    """

    def make(
        name: str, published_params: int, hf_name: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        return {
            "name": name,
            "hf_config": dict(org=org, name=hf_name or name),
            "published_params": published_params,
            **base,
            **fields,
        }

    return make


# --- shared layouts: each family's typical values (lab.hf.families) + what models share ---
# LLaMA: pre-norm RMSNorm, gated SiLU MLP, full RoPE, no biases, untied head.
LLAMA = dict(FAMILIES["llama"].base, norm_eps=1e-5)
LLAMA_3 = dict(LLAMA, vocab_size=128000, padded_vocab_size=128256, rope_base=500000.0)


def _llama3_scaling(factor: float) -> dict[str, Any]:
    """Llama 3.1's RoPE frequency scaling (``rope_scaling`` in ``config.json``)."""
    return {
        "type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_seq_len": 8192,
    }


# Gemma: RMSNorm scaling by (1 + weight), GeGLU (gelu_pytorch_tanh), scaled embeddings.
GEMMA = dict(FAMILIES["gemma"].base, block_size=8192, vocab_size=256000)


def _gemma2(n_layer: int, query_pre_attn_scalar: int) -> dict[str, Any]:
    """Gemma 2: sandwich norms, soft-capping, and local (sliding, 4096) attention on
    even layers alternating with global attention on odd ones (HF: layer 0 slides)."""
    return dict(
        FAMILIES["gemma2"].fields,
        n_layer=n_layer,
        attention_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        attention_scale=query_pre_attn_scalar**-0.5,
        **sliding_window_fields(4096, alternating(n_layer)),
    )


QWEN2 = dict(FAMILIES["qwen2"].base, vocab_size=151643, rope_base=1000000.0)
# GPT-2: learned positions, LayerNorm, GELU (tanh) MLP, biases everywhere, tied head.
GPT2 = dict(FAMILIES["gpt2"].base, block_size=1024, vocab_size=50257, norm_eps=1e-5)
# GPT-NeoX (Pythia): parallel attention and MLP, a quarter of each head rotated.
NEOX = dict(
    FAMILIES["gpt_neox"].base, block_size=2048, vocab_size=50254, rope_base=10000.0, norm_eps=1e-5
)
# Phi-1.5 and Phi-2: parallel branches sharing one LayerNorm, a biased lm_head.
PHI = dict(
    FAMILIES["phi"].base, block_size=2048, vocab_size=50257, padded_vocab_size=51200,
    rope_base=10000.0, norm_eps=1e-5,
)  # fmt: skip

# --- the families of 2025 ------------------------------------------------------------------
# Qwen3: per-head QK-norm, no biases; Qwen3-MoE adds 128 experts, 8 per token, renormalised.
QWEN3_SIZES = dict(block_size=40960, vocab_size=151643, padded_vocab_size=151936, head_size=128)
QWEN3 = dict(FAMILIES["qwen3"].base, rope_base=1000000.0, **QWEN3_SIZES)
QWEN3_MOE = dict(FAMILIES["qwen3_moe"].base, **QWEN3_SIZES)
# OLMo 2: norms after each branch only, QK-norm over whole projections, 100k vocabulary.
OLMO2 = dict(
    FAMILIES["olmo2"].base, block_size=4096, vocab_size=100278, padded_vocab_size=100352,
    rope_base=500000.0, norm_eps=1e-6,
)  # fmt: skip
# GPT-OSS: 64 query heads of 64 with sinks, sliding (128) and full layers alternating,
# YaRN (x32, untruncated ramp), biased router and experts with the clamped SwiGLU.
GPT_OSS = dict(
    FAMILIES["gpt_oss"].base, block_size=131072, vocab_size=201088, n_embd=2880, n_head=64,
    n_query_groups=8, head_size=64, intermediate_size=2880, n_expert_per_token=4,
    rope_scaling={
        "type": "yarn", "factor": 32.0, "original_max_seq_len": 4096, "beta_fast": 32.0,
        "beta_slow": 1.0, "attention_factor": None, "truncate": False,
    },
)  # fmt: skip
# DeepSeek-V3: YaRN x40 whose mscale sharpens the softmax (``mla_attention_scale``).
DEEPSEEK_V3_YARN = {
    "type": "yarn", "factor": 40.0, "original_max_seq_len": 4096, "beta_fast": 32.0,
    "beta_slow": 1.0, "attention_factor": None, "mscale": 1.0, "mscale_all_dim": 1.0,
}  # fmt: skip
# SmolLM3: a Llama with GQA whose every 4th layer has no positions (NoPE).
SMOLLM3 = dict(FAMILIES["smollm3"].base, vocab_size=128256, norm_eps=1e-6)


def _gemma3(
    n_layer: int, window: int, query_pre_attn_scalar: int, scaling: float | None = None
) -> dict[str, Any]:
    """Gemma 3: five local layers (sliding window, RoPE base 10k) to one global layer
    (RoPE base 1M, linearly scaled by ``scaling`` for the 128k-token models); sandwich
    norms, per-head QK-norm, and ``query_pre_attn_scalar`` for the softmax scale."""
    sliding = every_nth_global(n_layer, 6)
    values = dict(
        FAMILIES["gemma3_text"].base, n_layer=n_layer, attention_scale=query_pre_attn_scalar**-0.5
    )
    rope = {"type": "linear", "factor": scaling} if scaling else None
    set_per_layer(values, "sliding_window_size", [window if s else None for s in sliding])
    set_per_layer(values, "rope_base", [10000.0 if s else 1000000.0 for s in sliding])
    set_per_layer(values, "rope_scaling", [None if s else rope for s in sliding])
    return values


_gpt2 = _family("openai-community", GPT2)
_pythia = _family("EleutherAI", NEOX)
_llama2 = _family("meta-llama", dict(LLAMA, block_size=4096, vocab_size=32000))
_llama3 = _family("meta-llama", LLAMA_3)
_mistral = _family("mistralai", dict(LLAMA, vocab_size=32000, block_size=32768))
_phi = _family("microsoft", PHI)
_gemma = _family("google", GEMMA)
_qwen = _family("Qwen", QWEN2)
_smollm2 = _family(
    "HuggingFaceTB", dict(LLAMA, block_size=8192, vocab_size=49152, tie_embeddings=True)
)

_entries: list[dict[str, Any]] = [
    # --- GPT-2 (Radford et al. 2019) --------------------------------------------------
    *(
        _gpt2(name, params, n_layer=n_layer, n_embd=n_embd, n_head=n_head)
        for name, params, n_layer, n_embd, n_head in [
            ("gpt2", 124_439_808, 12, 768, 12),
            ("gpt2-medium", 354_823_168, 24, 1024, 16),
            ("gpt2-large", 774_030_080, 36, 1280, 20),
            ("gpt2-xl", 1_557_611_200, 48, 1600, 25),
        ]
    ),
    # --- Pythia (Biderman et al. 2023); embedding rows padded per model -----------------
    *(
        _pythia(name, params, n_layer=n_layer, n_embd=n_embd, n_head=n_head, padded_vocab_size=rows)
        for name, params, n_layer, n_embd, n_head, rows in [
            ("pythia-70m", 70_426_624, 6, 512, 8, 50304),
            ("pythia-160m", 162_322_944, 12, 768, 12, 50304),
            ("pythia-410m", 405_334_016, 24, 1024, 16, 50304),
            ("pythia-1b", 1_011_781_632, 16, 2048, 8, 50304),
            ("pythia-1.4b", 1_414_647_808, 24, 2048, 16, 50304),
            ("pythia-2.8b", 2_775_208_960, 32, 2560, 32, 50304),
            ("pythia-6.9b", 6_857_302_016, 32, 4096, 32, 50432),
            ("pythia-12b", 11_846_072_320, 36, 5120, 40, 50688),
        ]
    ),
    # --- Llama 2 (Touvron et al. 2023) ----------------------------------------------------
    _llama2(
        "Llama-2-7b-hf", 6_738_415_616,
        n_layer=32, n_embd=4096, n_head=32, intermediate_size=11008,
    ),
    _llama2(
        "Llama-2-13b-hf", 13_015_864_320,
        n_layer=40, n_embd=5120, n_head=40, intermediate_size=13824,
    ),
    _llama2(
        "Llama-2-70b-hf", 68_976_648_192,
        n_layer=80, n_embd=8192, n_head=64, n_query_groups=8, intermediate_size=28672,
    ),
    # --- Llama 3, 3.1, 3.2 (Grattafiori et al. 2024) ---------------------------------------
    _llama3(
        "Llama-3-8B", 8_030_261_248, hf_name="Meta-Llama-3-8B", block_size=8192,
        n_layer=32, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336,
    ),
    _llama3(
        "Llama-3-70B", 70_553_706_496, hf_name="Meta-Llama-3-70B", block_size=8192,
        n_layer=80, n_embd=8192, n_head=64, n_query_groups=8, intermediate_size=28672,
    ),
    _llama3(
        "Llama-3.1-8B", 8_030_261_248, block_size=131072, rope_scaling=_llama3_scaling(8.0),
        n_layer=32, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336,
    ),
    _llama3(
        "Llama-3.1-70B", 70_553_706_496, block_size=131072, rope_scaling=_llama3_scaling(8.0),
        n_layer=80, n_embd=8192, n_head=64, n_query_groups=8, intermediate_size=28672,
    ),
    _llama3(
        "Llama-3.2-1B", 1_235_814_400, block_size=131072, rope_scaling=_llama3_scaling(32.0),
        n_layer=16, n_embd=2048, n_head=32, n_query_groups=8, intermediate_size=8192,
        tie_embeddings=True,
    ),
    _llama3(
        "Llama-3.2-3B", 3_212_749_824, block_size=131072, rope_scaling=_llama3_scaling(32.0),
        n_layer=28, n_embd=3072, n_head=24, n_query_groups=8, intermediate_size=8192,
        tie_embeddings=True,
    ),
    # --- Mistral and Mixtral (Jiang et al. 2023, 2024) ---------------------------------------
    _mistral(
        "Mistral-7B-v0.1", 7_241_732_096, sliding_window_size=4096,
        n_layer=32, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336,
    ),
    _mistral(
        "Mistral-7B-v0.3", 7_248_023_552, vocab_size=32768, rope_base=1000000.0,
        n_layer=32, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336,
    ),
    _mistral(
        "Mixtral-8x7B-v0.1", 46_702_792_704, rope_base=1000000.0,
        n_layer=32, n_embd=4096, n_head=32, n_query_groups=8, intermediate_size=14336,
        mlp_class_name="MoE", n_expert=8, n_expert_per_token=2, router="topk_softmax",
    ),
    # --- Phi (Li et al. 2023; Abdin et al. 2024) ------------------------------------------
    _phi("phi-1_5", 1_418_270_720, n_layer=24, n_embd=2048, n_head=32, rotary_percentage=0.5),
    _phi("phi-2", 2_779_683_840, n_layer=32, n_embd=2560, n_head=32, rotary_percentage=0.4),
    _family("microsoft", LLAMA)(
        "Phi-3-mini-4k-instruct", 3_821_079_552, block_size=4096,
        vocab_size=32000, padded_vocab_size=32064, sliding_window_size=2047,  # config.json
        n_layer=32, n_embd=3072, n_head=32, intermediate_size=8192,
    ),
    # --- Gemma and Gemma 2 (Gemma Team 2024) ------------------------------------------------
    _gemma(
        "Gemma-2b", 2_506_172_416, hf_name="gemma-2b",
        n_layer=18, n_embd=2048, n_head=8, n_query_groups=1, head_size=256, intermediate_size=16384,
    ),
    _gemma(
        "Gemma-7b", 8_537_680_896, hf_name="gemma-7b",
        n_layer=28, n_embd=3072, n_head=16, head_size=256, intermediate_size=24576,
    ),
    _gemma(
        "Gemma-2-2b", 2_614_341_888, hf_name="gemma-2-2b",
        **_gemma2(n_layer=26, query_pre_attn_scalar=256),
        n_embd=2304, n_head=8, n_query_groups=4, head_size=256, intermediate_size=9216,
    ),
    _gemma(
        "Gemma-2-9b", 9_241_705_984, hf_name="gemma-2-9b",
        **_gemma2(n_layer=42, query_pre_attn_scalar=256),
        n_embd=3584, n_head=16, n_query_groups=8, head_size=256, intermediate_size=14336,
    ),
    _gemma(
        "Gemma-2-27b", 27_227_128_320, hf_name="gemma-2-27b",
        **_gemma2(n_layer=46, query_pre_attn_scalar=144),
        n_embd=4608, n_head=32, n_query_groups=16, head_size=128, intermediate_size=36864,
    ),
    # --- Qwen2.5 (Qwen Team 2024): biased QKV only ------------------------------------------
    _qwen(
        "Qwen2.5-0.5B", 494_032_768, block_size=32768, padded_vocab_size=151936,
        n_layer=24, n_embd=896, n_head=14, n_query_groups=2, intermediate_size=4864,
        tie_embeddings=True,
    ),
    _qwen(
        "Qwen2.5-1.5B", 1_543_714_304, block_size=131072, padded_vocab_size=151936,
        n_layer=28, n_embd=1536, n_head=12, n_query_groups=2, intermediate_size=8960,
        tie_embeddings=True,
    ),
    _qwen(
        "Qwen2.5-3B", 3_085_938_688, block_size=32768, padded_vocab_size=151936,
        n_layer=36, n_embd=2048, n_head=16, n_query_groups=2, intermediate_size=11008,
        tie_embeddings=True,
    ),
    _qwen(
        "Qwen2.5-7B", 7_615_616_512, block_size=131072, padded_vocab_size=152064,
        n_layer=28, n_embd=3584, n_head=28, n_query_groups=4, intermediate_size=18944,
    ),
    # --- SmolLM2 (Allal et al. 2025) ---------------------------------------------------------
    _smollm2(
        "SmolLM2-135M", 134_515_008, rope_base=100000.0,
        n_layer=30, n_embd=576, n_head=9, n_query_groups=3, intermediate_size=1536,
    ),
    _smollm2(
        "SmolLM2-360M", 361_821_120, rope_base=100000.0,
        n_layer=32, n_embd=960, n_head=15, n_query_groups=5, intermediate_size=2560,
    ),
    _smollm2(
        "SmolLM2-1.7B", 1_711_376_384, rope_base=130000.0,
        n_layer=24, n_embd=2048, n_head=32, intermediate_size=8192,
    ),
    # --- Qwen3 (Qwen Team 2025): dense and mixture of experts ----------------------------------
    *(
        _family("Qwen", dict(QWEN3, tie_embeddings=tied))(
            name, params, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_query_groups=8,
            intermediate_size=inter,
        )
        for name, params, n_layer, n_embd, n_head, inter, tied in [
            ("Qwen3-0.6B", 596_049_920, 28, 1024, 16, 3072, True),
            ("Qwen3-1.7B", 1_720_574_976, 28, 2048, 16, 6144, True),
            ("Qwen3-4B", 4_022_468_096, 36, 2560, 32, 9728, True),
            ("Qwen3-8B", 8_190_735_360, 36, 4096, 32, 12288, False),
            ("Qwen3-14B", 14_768_307_200, 40, 5120, 40, 17408, False),
            ("Qwen3-32B", 32_762_123_264, 64, 5120, 64, 25600, False),
        ]
    ),
    _family("Qwen", QWEN3_MOE)(
        "Qwen3-30B-A3B", 30_532_122_624,
        n_layer=48, n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=6144,
        n_expert=128, n_expert_per_token=8, moe_intermediate_size=768,
    ),
    _family("Qwen", QWEN3_MOE)(
        "Qwen3-235B-A22B", 235_093_634_560,
        n_layer=94, n_embd=4096, n_head=64, n_query_groups=4, intermediate_size=12288,
        n_expert=128, n_expert_per_token=8, moe_intermediate_size=1536,
    ),
    # --- Gemma 3 (Gemma Team 2025): text decoders; 4B-27B are those of the multimodal models -
    _gemma(
        "Gemma-3-270m", 268_098_176, hf_name="gemma-3-270m", block_size=32768,
        vocab_size=262144, **_gemma3(n_layer=18, window=512, query_pre_attn_scalar=256),
        n_embd=640, n_head=4, n_query_groups=1, head_size=256, intermediate_size=2048,
    ),
    _gemma(
        "Gemma-3-1b", 999_885_952, hf_name="gemma-3-1b-pt", block_size=32768,
        vocab_size=262144, **_gemma3(n_layer=26, window=512, query_pre_attn_scalar=256),
        n_embd=1152, n_head=4, n_query_groups=1, head_size=256, intermediate_size=6912,
    ),
    *(
        _gemma(
            name, params, hf_name=hf_name, block_size=131072, vocab_size=262144,
            padded_vocab_size=262208,  # the multimodal models' rows (image tokens)
            **_gemma3(n_layer=n_layer, window=1024, query_pre_attn_scalar=scalar, scaling=8.0),
            n_embd=n_embd, n_head=n_head, n_query_groups=n_head // 2, head_size=head_size,
            intermediate_size=inter,
        )
        for name, hf_name, params, n_layer, n_embd, n_head, head_size, inter, scalar in [
            ("Gemma-3-4b", "gemma-3-4b-pt", 3_880_263_168, 34, 2560, 8, 256, 10240, 256),
            ("Gemma-3-12b", "gemma-3-12b-pt", 11_766_034_176, 48, 3840, 16, 256, 15360, 256),
            ("Gemma-3-27b", "gemma-3-27b-pt", 27_009_346_304, 62, 5376, 32, 128, 21504, 168),
        ]
    ),
    # --- OLMo 2 (Team OLMo 2025) ---------------------------------------------------------------
    *(
        _family("allenai", OLMO2)(
            name, params, hf_name=hf_name, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
            n_query_groups=groups, intermediate_size=inter, padded_vocab_size=rows,
        )
        for name, hf_name, params, n_layer, n_embd, n_head, groups, inter, rows in [
            ("OLMo-2-1B", "OLMo-2-0425-1B", 1_484_916_736, 16, 2048, 16, 16, 8192, 100352),
            ("OLMo-2-7B", "OLMo-2-1124-7B", 7_298_617_344, 32, 4096, 32, 32, 11008, 100352),
            ("OLMo-2-13B", "OLMo-2-1124-13B", 13_716_198_400, 40, 5120, 40, 40, 13824, 100352),
            # the 32B model's embedding is not padded (vocab_size 100278 in its config.json)
            ("OLMo-2-32B", "OLMo-2-0325-32B", 32_233_522_176, 64, 5120, 40, 8, 27648, 100278),
        ]
    ),
    _family("Qwen", dict(FAMILIES["qwen3_next"].base, **QWEN3_SIZES))(
        "Qwen3-Next-80B-A3B", 79_674_391_296, hf_name="Qwen3-Next-80B-A3B-Instruct",
        block_size=262144, norm_eps=1e-6, n_layer=48, n_embd=2048, n_head=16, n_query_groups=2,
        head_size=256, intermediate_size=5632, n_expert=512, n_expert_per_token=10,
        moe_intermediate_size=512, n_shared_expert=1, shared_expert_gate=True,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
        linear_value_head_dim=128,
        layer_overrides={i: {"attention_class_name": "CausalSelfAttention"} for i in range(3, 48, 4)},
    ),
    # --- gpt-oss (OpenAI 2025) -------------------------------------------------------------------
    *(
        _family("openai", GPT_OSS)(
            name, params, n_layer=n_layer, n_expert=n_expert,
            **sliding_window_fields(128, alternating(n_layer)),
        )
        for name, params, n_layer, n_expert in [
            ("gpt-oss-20b", 20_914_757_184, 24, 32),
            ("gpt-oss-120b", 116_829_156_672, 36, 128),
        ]
    ),
    # --- DeepSeek-V3 (DeepSeek-AI 2024): MLA, 256 routed experts in 8 groups, 3 dense layers ---
    _family("deepseek-ai", FAMILIES["deepseek_v3"].base)(
        "DeepSeek-V3", 671_026_404_352, block_size=163840, vocab_size=129280, norm_eps=1e-6,
        n_layer=61, n_embd=7168, n_head=128, intermediate_size=18432,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, n_expert=256, n_expert_per_token=8, moe_intermediate_size=2048,
        n_shared_expert=1, moe_n_group=8, moe_topk_group=4, moe_routed_scaling=2.5,
        rope_base=10000.0,
        rope_scaling=DEEPSEEK_V3_YARN, attention_scale=mla_attention_scale(192, DEEPSEEK_V3_YARN),
        layer_overrides={i: {"mlp_class_name": "GatedMLP"} for i in range(3)},
    ),
    # --- SmolLM3 (Hugging Face 2025): NoPE on every 4th layer ------------------------------------
    _family("HuggingFaceTB", SMOLLM3)(
        "SmolLM3-3B", 3_075_098_624, block_size=65536, rope_base=5000000.0,
        n_layer=36, n_embd=2048, n_head=16, n_query_groups=4, intermediate_size=11008,
        layer_overrides={i: {"positional": "none"} for i in range(3, 36, 4)},
    ),
    # --- TinyLlama (Zhang et al. 2024) -------------------------------------------------------
    _family("TinyLlama", LLAMA)(
        "tiny-llama-1.1b", 1_100_048_384, hf_name="TinyLlama-1.1B-intermediate-step-1431k-3T",
        block_size=2048, vocab_size=32000,
        n_layer=22, n_embd=2048, n_head=32, n_query_groups=4, intermediate_size=5632,
    ),
]  # fmt: skip

configs = named_configs  # the registry's catalogue, filled here
configs.update({entry["name"]: entry for entry in _entries})


# --- lookup and registration ---------------------------------------------------------------
def hf_config_of(name: str) -> dict[str, str] | None:
    """``dict(org=..., name=...)``: the Hugging Face repository of ``name``, if known."""
    hf = known_config(name).get("hf_config")
    return dict(hf) if hf else None


def register_config(values: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
    """Add (or replace) a named architecture: ``register_config(name="my-model", ...)``
    or ``register_config({"name": "my-model", ...})``.

    Values are stored as given, so fields of your own ``Config`` subclass (the
    guide's ``custom_param``) are kept for ``MyConfig.from_name``; metadata keys
    (``hf_config``, ``published_params``) are allowed.  Returns the stored entry.
    """
    entry = copy.deepcopy({**(values or {}), **fields})
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(
            "register_config needs a non-empty string 'name', e.g. "
            "register_config(name='my-model-7b', n_layer=32, ...)",
            field="name",
        )
    configs[name] = entry
    return entry
