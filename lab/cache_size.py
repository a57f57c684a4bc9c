"""How many bytes a model's decoding cache takes, read from the caches themselves.

Each attention class builds its own cache in ``set_kv_cache``: keys and values for
``CausalSelfAttention`` (``2 * n_query_groups * head_size`` numbers per token and
layer: MHA, GQA, MQA), the latent and the rotary key for MLA (``kv_lora_rank +
qk_rope_head_dim``), a fixed-size state for Gated DeltaNet. Building the layers and
their caches on the meta device and counting buffer bytes gives the size for any
registered mixer, with no formula to keep in step with the code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lab import registry
from lab.config import Config


@dataclass(frozen=True)
class CacheSize:
    """A cache's bytes for the whole model and batch: ``fixed + per_token * length``."""

    per_token: int  # what each position adds (keys and values, latents)
    fixed: int  # what does not grow with the length (recurrent states)

    def at(self, length: int) -> int:
        """Bytes of a cache holding ``length`` positions."""
        return self.fixed + self.per_token * length


def kv_cache_size(
    config: Config, batch_size: int = 1, dtype: torch.dtype = torch.bfloat16
) -> CacheSize:
    """The decoding cache of a model built from ``config``, at ``dtype``: nothing is
    allocated (meta device), so it works for any named config.

    >>> kv_cache_size(Config.from_name("Llama-3.2-1B")).per_token  # doctest: +SKIP
    32768
    """
    layers: dict[int, tuple[torch.nn.Module, int]] = {}  # one per distinct layer config
    with torch.device("meta"):
        for i in range(config.n_layer):
            key = id(config.for_layer(i))  # the same object for layers without overrides
            if key not in layers:
                layer = registry.build(config.for_layer(i).attention_class, config, i)
                layers[key] = (layer, 0)
            layers[key] = (layers[key][0], layers[key][1] + 1)

    def total(length: int) -> int:
        size = 0
        for layer, count in layers.values():
            layer.set_kv_cache(batch_size, length, device=torch.device("meta"), dtype=dtype)
            size += count * sum(b.numel() * b.element_size() for b in layer.kv_cache.buffers())
        return size

    one, two = total(1), total(2)
    return CacheSize(per_token=two - one, fixed=2 * one - two)
