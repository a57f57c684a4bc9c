"""lab: design, train and look inside GPT-style transformers, in a notebook."""

from lab import (
    configs,  # noqa: F401  (fills the catalogue of named architectures)
    deltanet,  # noqa: F401  (registers attention_class_name="GatedDeltaNet")
    mla,  # noqa: F401  (registers attention_class_name="MLA")
    moe,  # noqa: F401  (registers mlp_class_name="MoE")
    positional,  # noqa: F401  (registers the positional schemes)
)
from lab.api import LLM
from lab.config import Config
from lab.errors import ConfigError, LabError
from lab.model import GPT, MLP, Block, CausalSelfAttention, GatedMLP, LayerNorm, RMSNorm
from lab.probe import probe
from lab.registry import register

__all__ = [
    "GPT",
    "LLM",
    "MLP",
    "Block",
    "CausalSelfAttention",
    "Config",
    "ConfigError",
    "GatedMLP",
    "LabError",
    "LayerNorm",
    "RMSNorm",
    "probe",
    "register",
]
