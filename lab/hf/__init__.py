"""Hugging Face conversion as data: ``families`` (the table of supported
``model_type``s), ``configs`` (``config.json`` <-> ``Config``) and ``weights``
(tensor names and shapes); ``multimodal`` finds the text model inside a multimodal
checkpoint (Gemma 3's ``gemma3``) first. ``lab.checkpoint`` reads and writes the files."""

from lab.hf.configs import config_from_hf, config_to_hf, hf_model_type, model_type_of
from lab.hf.families import FAMILIES, Family, Layout
from lab.hf.multimodal import MULTIMODAL, Multimodal, text_model
from lab.hf.weights import weights_from_hf, weights_to_hf

__all__ = [
    "FAMILIES",
    "MULTIMODAL",
    "Family",
    "Layout",
    "Multimodal",
    "config_from_hf",
    "config_to_hf",
    "hf_model_type",
    "model_type_of",
    "text_model",
    "weights_from_hf",
    "weights_to_hf",
]
