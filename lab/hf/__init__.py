"""Hugging Face conversion as data: ``families`` (the table of supported
``model_type``s), ``configs`` (``config.json`` <-> ``Config``) and ``weights``
(tensor names and shapes). ``lab.checkpoint`` reads and writes the files."""

from lab.hf.configs import config_from_hf, config_to_hf, hf_model_type, model_type_of
from lab.hf.families import FAMILIES, Family, Layout
from lab.hf.weights import weights_from_hf, weights_to_hf

__all__ = [
    "FAMILIES",
    "Family",
    "Layout",
    "config_from_hf",
    "config_to_hf",
    "hf_model_type",
    "model_type_of",
    "weights_from_hf",
    "weights_to_hf",
]
