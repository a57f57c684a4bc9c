"""Multi-head latent attention: a naive reference, the latent cache, gradients and
parity with transformers' DeepseekV3Attention."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from decoding import assert_cache_equals_recomputation

from lab import GPT, Config, ConfigError
from lab.cache_size import CacheSize, kv_cache_size
from lab.generate import generate, supports_kv_cache, supports_padding
from lab.mla import LatentCache, MultiHeadLatentAttention

MLA = dict(
    n_layer=2, n_embd=32, n_head=4, vocab_size=61, block_size=24, attention_class_name="MLA",
    q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
)  # fmt: skip


def mla_config(**overrides) -> Config:
    return Config(**{**MLA, **overrides})


def naive_mla(attn: MultiHeadLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2's equations written out: full per-head keys and values from the
    latent, RoPE (rotate-half layout) on the decoupled part, causal softmax."""
    B, T, _ = x.shape
    nh, nope, rope, dv = attn.n_head, attn.qk_nope_head_dim, attn.qk_rope_head_dim, attn.v_head_dim

    def rms(t, weight, eps):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * weight

    if attn.q_lora_rank is None:
        q = x @ attn.q_proj.weight.T
    else:
        c_q = rms(x @ attn.q_a_proj.weight.T, attn.q_a_norm.weight, attn.q_a_norm.eps)
        q = c_q @ attn.q_b_proj.weight.T
    q = q.view(B, T, nh, nope + rope)
    kv_a = x @ attn.kv_a_proj.weight.T
    c_kv = rms(kv_a[..., : attn.kv_lora_rank], attn.kv_a_norm.weight, attn.kv_a_norm.eps)
    k_rope = kv_a[..., attn.kv_lora_rank :]  # (B, T, rope): one head for all
    kv = (c_kv @ attn.kv_b_proj.weight.T).view(B, T, nh, nope + dv)
    k_nope, v = kv[..., :nope], kv[..., nope:]

    # Angles in fp32, as lab computes them (its RoPE table is fp32 whatever the model's dtype)
    inv_freq = attn.config.rope_base ** -(torch.arange(0, rope, 2) / rope)
    angles = torch.cat([torch.arange(T).float()[:, None] * inv_freq] * 2, dim=-1)  # (T, rope)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    def rotate(t):  # (..., T, rope) with T third from the end for q, second for k
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-t2, t1), dim=-1) * sin

    q_rope = rotate(q[..., nope:].transpose(1, 2))  # (B, nh, T, rope)
    k_rope = rotate(k_rope)  # (B, T, rope)
    out = torch.zeros(B, T, nh, dv, dtype=x.dtype)
    for h in range(nh):
        scores = q[:, :, h, :nope] @ k_nope[:, :, h].transpose(1, 2)
        scores = scores + q_rope[:, h] @ k_rope.transpose(1, 2)
        scores = scores / math.sqrt(nope + rope)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, :, h]
    return out.reshape(B, T, nh * dv) @ attn.proj.weight.T


@pytest.mark.parametrize("q_lora_rank", [12, None])
def test_mla_equals_the_naive_reference(q_lora_rank):
    torch.manual_seed(0)
    config = mla_config(q_lora_rank=q_lora_rank)
    model = GPT(config).double()
    attn = model.transformer.h[0].attn
    assert isinstance(attn, MultiHeadLatentAttention)
    assert attn.scale == pytest.approx(1 / math.sqrt(6 + 4))
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), naive_mla(attn, x), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("sinks", [False, True])
def test_absorbed_latent_attention_equals_expanded_keys_and_values(sinks):
    """Decoding attends in the latent space (kv_b_proj absorbed into the query and the
    output); it must equal expanding every cached latent to keys and values."""
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(mla_config(attention_sinks=sinks)).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.5)
    B, T, S = 2, 3, 9
    q = torch.randn(B, T, 4, 10, dtype=torch.float64)
    latent = torch.randn(B, S, 10, dtype=torch.float64)
    k_rope = torch.randn(B, S, 4, dtype=torch.float64)
    mask = torch.rand(B, 1, T, S) < 0.7
    mask[..., -1] = True  # every query sees at least one key
    expanded = attn.scaled_dot_product_attention(q, *attn.expand(latent, k_rope), mask=mask)
    absorbed = attn.latent_attention(q, latent, k_rope, mask=mask)
    torch.testing.assert_close(absorbed, expanded, atol=1e-12, rtol=1e-10)


def test_parameter_shapes_follow_the_low_rank_layout():
    attn = GPT(mla_config()).transformer.h[0].attn
    shapes = {name: tuple(p.shape) for name, p in attn.named_parameters()}
    assert shapes == {
        "q_a_proj.weight": (12, 32),
        "q_a_norm.weight": (12,),
        "q_b_proj.weight": (4 * 10, 12),  # heads x (nope + rope)
        "kv_a_proj.weight": (10 + 4, 32),  # latent + one shared rotary key head
        "kv_a_norm.weight": (10,),
        "kv_b_proj.weight": (4 * (6 + 5), 10),  # heads x (k_nope + v)
        "proj.weight": (32, 4 * 5),  # heads x v_head_dim
    }


VARIANTS = {
    "low-rank-q": {},
    "plain-q": dict(q_lora_rank=None),
    "derived-sizes": dict(
        q_lora_rank=None, kv_lora_rank=None, qk_nope_head_dim=None, qk_rope_head_dim=None,
        v_head_dim=None,
    ),
    "nope": dict(positional="none"),
    "sliding-window": dict(sliding_window_size=4),
    "sinks-and-gate": dict(attention_sinks=True, attention_gate="elementwise"),
    "hybrid": dict(layer_overrides={1: {"attention_class_name": "CausalSelfAttention"}}),
}  # fmt: skip


@pytest.mark.parametrize("name", VARIANTS)
def test_latent_cache_decoding_equals_full_recomputation(name):
    torch.manual_seed(0)
    model = GPT(mla_config(**VARIANTS[name])).eval()
    assert_cache_equals_recomputation(model, torch.randint(0, 61, (2, 14)))


def test_the_cache_holds_the_latent_and_the_rotary_key_only():
    model = GPT(mla_config())
    model.set_kv_cache(batch_size=3, max_seq_length=20)
    cache = model.transformer.h[0].attn.kv_cache
    assert isinstance(cache, LatentCache)
    buffers = {name: tuple(b.shape) for name, b in cache.named_buffers()}
    assert buffers == {"k": (3, 1, 20, 10), "v": (3, 1, 20, 4)}  # kv_lora_rank, qk_rope_head_dim


def test_static_cache_with_a_mask_equals_the_growing_cache():
    torch.manual_seed(0)
    model = GPT(mla_config()).eval()
    idx = torch.randint(0, 61, (1, 8))
    with torch.no_grad():
        full = model(idx)
        model.set_kv_cache(batch_size=1, max_seq_length=16, static=True)
        steps = []
        for t in range(8):
            mask = torch.arange(16)[None, :] <= t  # hide the positions not written yet
            steps.append(model(idx[:, t : t + 1], input_pos=torch.tensor([t]), mask=mask))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_gradcheck_on_a_tiny_double_layer():
    torch.manual_seed(0)
    config = mla_config(n_embd=8, n_head=2, q_lora_rank=4, kv_lora_rank=4, qk_nope_head_dim=2,
                        qk_rope_head_dim=2, v_head_dim=3)  # fmt: skip
    attn = MultiHeadLatentAttention(config).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    weights = tuple(attn.parameters())

    def run(x, *params):
        values = dict(zip([n for n, _ in attn.named_parameters()], params, strict=True))
        return torch.func.functional_call(attn, values, (x,))

    assert torch.autograd.gradcheck(run, (x, *weights), fast_mode=True)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = GPT(mla_config(attention_sinks=True, attention_gate="headwise"))
    idx = torch.randint(0, 61, (2, 12))
    F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_generation_with_the_latent_cache_equals_recomputation():
    torch.manual_seed(0)
    model = GPT(mla_config(block_size=40))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # far from ties
    assert supports_kv_cache(model) and supports_padding(model)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(61, (n,), generator=g) for n in (5, 9, 1)]
    cached = generate(model, prompts, 8, temperature=0)
    recomputed = generate(model, prompts, 8, temperature=0, kv_cache=False)
    alone = [generate(model, p, 8, temperature=0) for p in prompts]
    for a, b, c in zip(cached, recomputed, alone, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_bad_mla_settings_are_config_errors():
    with pytest.raises(ConfigError, match="positional"):
        mla_config(positional="alibi")
    with pytest.raises(ConfigError, match="qk_rope_head_dim"):
        mla_config(qk_rope_head_dim=3)
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        mla_config(kv_lora_rank=0)
    with pytest.raises(ConfigError, match="norm_qk"):
        mla_config(norm_qk=True)


def deinterleave_rope_rows(weight: torch.Tensor, groups: int, rope: int) -> torch.Tensor:
    """Rows (groups * (d + rope), in) whose last ``rope`` rows per group are rotated in
    pairs (x0 x1)(x2 x3)... -> the same rotation in halves (x0 x2 ... | x1 x3 ...)."""
    rows = weight.view(groups, -1, weight.size(-1))
    d = rows.size(1) - rope
    order = torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2))) + d
    return torch.cat((rows[:, :d], rows[:, order]), dim=1).reshape_as(weight)


@pytest.mark.parametrize("interleave", [False, True])
def test_matches_transformers_deepseek_v3_attention(interleave):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    torch.manual_seed(0)
    hf_config = transformers.DeepseekV3Config(
        hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=12,
        kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
        rope_interleave=interleave, rms_norm_eps=1e-6, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    hf_config._attn_implementation = "eager"
    theirs = hf.DeepseekV3Attention(hf_config, layer_idx=0).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MultiHeadLatentAttention(mla_config(norm_eps=1e-6)).eval()
    names = {"q_a_layernorm": "q_a_norm", "kv_a_proj_with_mqa": "kv_a_proj",
             "kv_a_layernorm": "kv_a_norm", "o_proj": "proj"}  # fmt: skip
    state = {}
    for name, value in theirs.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        state[f"{names.get(module, module)}.{leaf}"] = value
    if interleave:  # DeepSeek's checkpoints rotate pairs; lab rotates halves
        state["q_b_proj.weight"] = deinterleave_rope_rows(state["q_b_proj.weight"], 4, 4)
        state["kv_a_proj.weight"] = deinterleave_rope_rows(state["kv_a_proj.weight"], 1, 4)
    ours.load_state_dict(state)

    x = torch.randn(2, 7, 32)
    position_ids = torch.arange(7)[None].expand(2, -1)
    cos_sin = hf.DeepseekV3RotaryEmbedding(hf_config)(x, position_ids)
    causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        expected, _ = theirs(x, position_embeddings=cos_sin, attention_mask=causal)
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)


# --- cache sizes ------------------------------------------------------------------------------


def test_cache_size_per_token_mha_gqa_mla_and_deltanet():
    """Bytes per token in bf16 at DeepSeek-V3's attention sizes (61 layers, 128 heads):
    MLA's 70 KB against 4 MB for multi-head attention; a DeltaNet state is fixed."""
    big = dict(n_layer=61, n_embd=7168, n_head=128, head_size=128, vocab_size=129280)
    mha = kv_cache_size(Config(**big))
    gqa = kv_cache_size(Config(**big, n_query_groups=8))
    mla = kv_cache_size(Config(**big, attention_class_name="MLA", q_lora_rank=1536,
                               kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                               v_head_dim=128))  # fmt: skip
    assert mha == CacheSize(per_token=61 * 2 * 128 * 128 * 2, fixed=0)
    assert gqa == CacheSize(per_token=61 * 2 * 8 * 128 * 2, fixed=0)
    assert mla == CacheSize(per_token=61 * (512 + 64) * 2, fixed=0)
    assert mla.at(1000) == 70_272_000

    delta = dict(
        attention_class_name="GatedDeltaNet",
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_key_head_dim=128,
        linear_value_head_dim=128,
    )
    hybrid = Config(**{**big, "n_layer": 4}, **delta, layer_overrides={3: {
        "attention_class_name": "CausalSelfAttention", "n_query_groups": 2}})  # fmt: skip
    conv = 3 * (2 * 16 * 128 + 32 * 128) * 2  # the last 3 inputs of the convolution, bf16
    state = 32 * 128 * 128 * 4  # fp32
    assert kv_cache_size(hybrid, batch_size=2) == CacheSize(
        per_token=2 * (2 * 2 * 128 * 2), fixed=2 * 3 * (conv + state)
    )


def test_cache_size_of_a_named_config():
    assert kv_cache_size(Config.from_name("Llama-3.2-1B")) == CacheSize(32768, 0)


def test_meta_device_build_then_reset_initialises_every_parameter():
    with torch.device("meta"):
        model = GPT(mla_config(attention_sinks=True, attention_gate="elementwise"))
    model.to_empty(device="cpu")
    model.reset_parameters()
    attn = model.transformer.h[0].attn
    assert torch.equal(attn.sinks, torch.zeros(4))
    assert torch.equal(attn.kv_a_norm.weight, torch.ones(10))
    assert torch.isfinite(model(torch.randint(0, 61, (1, 7)))).all()
