"""Fine-tuning methods as peers over one shared core.

    core.py        the registry of methods (``register_method``), what trains,
                   merging, adapter-only checkpoints with the base model's fingerprint
    adapter.py     LLaMA-Adapter: a gated prefix per attention layer
    adapter_v2.py  LLaMA-Adapter V2: the prefix, plus a scale and bias per linear output
    lora.py        LoRA: low-rank updates, per part of the fused QKV
    peft.py        LoRA adapters in peft's files (``adapter_config.json`` and
                   ``adapter_model.safetensors``) for the Hugging Face layouts lab converts

A fourth method is a function registered with ``core.register_method``; see core.py.
"""

from lab.finetune import adapter, adapter_v2, lora  # noqa: F401  (registers the methods)
