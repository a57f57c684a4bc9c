"""``lab.adapter`` is ``lab.finetune.adapter`` under its LitGPT-style name (``litgpt.adapter``), which
the user's guide and older notebooks import: one module object under two names."""

import sys

from lab.finetune import adapter

sys.modules[__name__] = adapter
