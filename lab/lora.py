"""``lab.lora`` is ``lab.finetune.lora`` under its LitGPT-style name (``litgpt.lora``), which
the user's guide and older notebooks import: one module object under two names."""

import sys

from lab.finetune import lora

sys.modules[__name__] = lora
