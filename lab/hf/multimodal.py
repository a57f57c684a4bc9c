"""The text model inside a Hugging Face multimodal checkpoint, as one more table.

Gemma 3 from 4B up is published as ``Gemma3ForConditionalGeneration``: ``config.json``
nests the language model under ``text_config`` next to a ``vision_config``, and the
weights hold the language model under a prefix next to a vision tower and a projector.
lab builds text models, so ``text_model`` turns such a checkpoint into the text-only one
it contains (a ``config.json`` and tensors of a family in ``FAMILIES``), before the
family machinery in ``lab.hf.configs`` and ``lab.hf.weights`` sees it. Supporting
another wrapper is one entry in ``MULTIMODAL``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lab.errors import CheckpointError
from lab.hf.families import FAMILIES


@dataclass(frozen=True)
class Multimodal:
    """One multimodal ``model_type`` whose language model lab loads.

    ``text_type`` is the family of its ``text_config``. Hugging Face writes that
    sub-config as a diff against the text config class's defaults (the hub's Gemma 3
    files omit vocab_size, the head counts, head_dim, the RoPE bases, ...), so
    ``text_defaults`` restores them: that class's defaults, copied from transformers.
    ``renames`` map the language model's tensor-name prefixes (one per transformers
    version) to the text family's; tensors under ``skip`` (vision tower, projector) are
    dropped. Anything else is passed on, so the family's check reports it.
    """

    text_type: str
    text_defaults: dict[str, Any]
    renames: dict[str, str]
    skip: tuple[str, ...]


# transformers' Gemma3TextConfig defaults, for the keys lab reads.
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "sliding_window_pattern": 6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "final_logit_softcapping": None, "attn_logit_softcapping": None,
    "use_bidirectional_attention": False,
}  # fmt: skip

MULTIMODAL: dict[str, Multimodal] = {
    "gemma3": Multimodal(
        "gemma3_text", GEMMA3_TEXT_DEFAULTS,
        renames={
            "language_model.model.": "model.",  # transformers 4.x (the hub's files)
            "language_model.lm_head.": "lm_head.",
            "model.language_model.": "model.",  # transformers >= 4.52 in memory
        },
        skip=("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
              "model.multi_modal_projector."),
    ),
}  # fmt: skip

# Keys that mark a config.json as multimodal (a nested text model or another modality).
_SUB_CONFIGS = ("text_config", "vision_config", "audio_config")


def text_model(
    config_json: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The text-only ``config.json`` and tensors inside a multimodal checkpoint (a
    text-only checkpoint is returned as it is); raises ``CheckpointError`` for a
    multimodal ``model_type`` lab has no entry for."""
    model_type = config_json.get("model_type")
    wrapper = MULTIMODAL.get(model_type)
    if wrapper is None:
        if model_type not in FAMILIES and any(k in config_json for k in _SUB_CONFIGS):
            raise CheckpointError(
                f"Hugging Face model_type {model_type!r} is a multimodal model, which lab "
                f"does not load: lab loads text models ({sorted(FAMILIES)}) and the language "
                f"model of {sorted(MULTIMODAL)}"
            )
        return config_json, tensors
    text = config_json.get("text_config") or {}
    path = config_json.get("_name_or_path")
    text = {**wrapper.text_defaults, **text, "model_type": wrapper.text_type, "_name_or_path": path}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.startswith(wrapper.skip):
            continue
        prefix = next((p for p in wrapper.renames if name.startswith(p)), None)
        out[wrapper.renames[prefix] + name[len(prefix) :] if prefix else name] = tensor
    return text, out
