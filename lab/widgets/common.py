"""What every view shares: a short stable repr, figures as PNG, tokens for a text."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

import ipywidgets as widgets
import torch
from matplotlib.figure import Figure


class View:
    """A thin wrapper around one ipywidgets container (``self.widget``).

    It displays as that widget in a notebook, while its ``text/plain`` repr stays a
    short, stable line (notebooks under nbval compare it). Beside the live widget the
    display carries a PNG of the view as it was drawn (``picture``): a front end that
    cannot show the widget (a notebook opened from disk, untrusted, or without its
    kernel; GitHub; nbviewer) shows that picture instead of the bare repr.
    """

    widget: widgets.Widget

    def picture(self) -> bytes | None:
        """PNG bytes of what the view shows now, or None (then only text)."""
        return None

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = repr(self)
        picture = self.picture()
        if picture:
            bundle["image/png"] = base64.b64encode(picture).decode("ascii")
        return bundle


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes, for an ``ipywidgets.Image`` (replacing its value
    redraws in place, without the flicker of clearing an output area)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def error_html(message: str) -> str:
    return f'<pre class="lab-error" style="color:#b00020;white-space:pre-wrap">{html.escape(message)}</pre>'


def tokenize(tokenizer: Any, text: str, limit: int) -> tuple[torch.Tensor, list[str]]:
    """Token ids (1, T) and one label per token, at most ``limit`` tokens.

    ``tokenizer`` is a ``lab.tokenizer.Tokenizer`` (or anything with ``encode`` and
    ``tokens``/``decode``); None means bytes: ids are UTF-8 byte values (vocab >= 256).
    """
    if tokenizer is None:
        ids = list(text.encode("utf-8"))[:limit]
        labels = [bytes([b]).decode("utf-8", errors="replace") for b in ids]
        return torch.tensor([ids]), labels
    ids = torch.as_tensor(tokenizer.encode(text)).flatten()[:limit]
    if hasattr(tokenizer, "tokens"):
        labels = list(tokenizer.tokens(ids.tolist()))
    else:
        labels = [tokenizer.decode([i]) for i in ids.tolist()]
    return ids[None], labels
