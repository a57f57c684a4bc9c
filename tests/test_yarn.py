"""YaRN frequencies and attention factor as transformers computes them for GPT-OSS
(an untruncated ramp) and DeepSeek-V3 (mscale / mscale_all_dim)."""

import pytest
import torch

from lab.positional import rope_frequencies

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

GPT_OSS_YARN = dict(factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False)
DEEPSEEK_YARN = dict(factor=40.0, beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=0.5)


@pytest.mark.parametrize("truncate", [False, True])
def test_gpt_oss_yarn_matches_transformers(truncate):
    rope = dict(GPT_OSS_YARN, truncate=truncate, rope_type="yarn", rope_theta=150000.0)
    rope["original_max_position_embeddings"] = 4096
    hf_config = transformers.GptOssConfig(head_dim=64, rope_parameters=rope)
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    scaling = dict(GPT_OSS_YARN, truncate=truncate, type="yarn", original_max_seq_len=4096)
    inv_freq, attention_factor = rope_frequencies(64, 150000.0, scaling)
    torch.testing.assert_close(inv_freq.float(), expected, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(expected_factor)


def test_untruncated_ramp_differs_from_the_truncated_one():
    base = dict(GPT_OSS_YARN, type="yarn", original_max_seq_len=4096)
    loose, _ = rope_frequencies(64, 150000.0, base)
    tight, _ = rope_frequencies(64, 150000.0, dict(base, truncate=True))
    assert not torch.allclose(loose, tight)


def test_deepseek_mscale_attention_factor_matches_transformers():
    rope = dict(DEEPSEEK_YARN, rope_type="yarn", rope_theta=10000.0)
    rope["original_max_position_embeddings"] = 4096
    hf_config = transformers.DeepseekV3Config(qk_rope_head_dim=64, rope_parameters=rope)
    hf_config.head_dim = 64  # the rotary part is what YaRN scales
    expected, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    scaling = dict(DEEPSEEK_YARN, type="yarn", original_max_seq_len=4096)
    inv_freq, attention_factor = rope_frequencies(64, 10000.0, scaling)
    torch.testing.assert_close(inv_freq.float(), expected, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(expected_factor)
    assert attention_factor != pytest.approx(1.0)  # mscale != mscale_all_dim here
