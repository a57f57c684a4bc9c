"""``lab.adapter_v2`` is ``lab.finetune.adapter_v2`` under its LitGPT-style name (``litgpt.adapter_v2``), which
the user's guide and older notebooks import: one module object under two names."""

import sys

from lab.finetune import adapter_v2

sys.modules[__name__] = adapter_v2
