"""Where a lab GPT keeps its layers, for the tools that walk them (probes, fine-tuning).

One helper, so every tool finds the blocks the same way and a model without them
gets the same clear error (a ``TypeError``: the wrong kind of object, not a bad value).
"""

from __future__ import annotations

from torch import nn


def blocks_of(model: nn.Module, needed_by: str) -> nn.ModuleList:
    """``model.transformer.h``, the blocks of a ``lab.GPT`` (or of a model laid out like
    one, such as the guide's ``CustomGPT``); ``needed_by`` names the tool in the error."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"{needed_by} needs model.transformer.h (a ModuleList of blocks) as in lab.GPT; "
            f"{type(model).__name__} has none"
        )
    return blocks
