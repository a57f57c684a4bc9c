"""AttentionView: a text box, layer and head selectors, a heatmap and arcs.

    view = AttentionView(model, tokenizer, "The cat sat on the mat.")
    view                                           # in a notebook
    fit(model, data, steps=200, callbacks=[view.callback(every=20)])  # live

Each refresh runs one forward pass inside ``lab.probe`` asking for the selected
layer's pattern only; changing the head only redraws. Figures are PNG bytes swapped
into ``ipywidgets.Image``s, so a refresh during training does not flicker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import torch
from torch import nn

from lab import plots
from lab.params import model_device
from lab.probe import hook_points, probe
from lab.widgets.common import View, error_html, png, tokenize

ALL = "all"


class AttentionView(View):
    """Attention patterns of ``model`` on a text, one layer at a time."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        text: str = "The cat sat on the mat. The cat sat on the hat.",
        *,
        layer: int = 0,
        head: int | str = 0,
        threshold: float = 0.1,
        title: str | None = None,
    ) -> None:
        self.model, self.tokenizer, self.threshold = model, tokenizer, threshold
        self.title = title  # which model this is, at the head of every figure
        self.paths = [
            n.removesuffix(".pattern") for n in hook_points(model) if n.endswith(".pattern")
        ]
        if not self.paths:
            raise ValueError(
                f"{type(model).__name__} has no attention a probe can see; its attention "
                "must subclass lab.CausalSelfAttention"
            )
        self.text = widgets.Text(value=text, description="text", layout={"width": "95%"})
        self.layer = widgets.Dropdown(
            options=[(path.removesuffix(".attn"), i) for i, path in enumerate(self.paths)],
            value=layer,
            description="layer",
        )
        self.head = widgets.Dropdown(description="head")
        self.refresh_button = widgets.Button(description="refresh", icon="refresh")
        half = {"width": "50%", "height": "auto"}  # the two figures side by side, scaled
        self.heatmap = widgets.Image(format="png", layout=half)
        self.arcs = widgets.Image(format="png", layout=half)
        self.error = widgets.HTML()
        self.widget = widgets.VBox(
            [self.text, widgets.HBox([self.layer, self.head, self.refresh_button]),
             self.error, widgets.HBox([self.heatmap, self.arcs])]
        )  # fmt: skip
        self.pattern: torch.Tensor | None = None  # (n_head, T, S) of the shown layer
        self.tokens: list[str] = []
        self.figures: dict[str, Any] = {}
        self._head_request = head
        self.text.observe(lambda _: self.refresh(), names="value")
        self.layer.observe(lambda _: self.refresh(), names="value")
        self._drawing = True
        self.head.observe(lambda _: self._drawing and self.draw(), names="value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.refresh()

    def refresh(self) -> None:
        """Run the model on the text and redraw (what a training callback calls)."""
        name = f"{self.paths[self.layer.value]}.pattern"
        limit = getattr(getattr(self.model, "config", None), "block_size", 512)
        ids, self.tokens = tokenize(self.tokenizer, self.text.value, limit)
        if ids.numel() == 0:
            self.error.value = error_html("type some text to see its attention")
            return
        was_training = self.model.training
        self.model.eval()  # no training-time side effects (MoE balancing) from a look
        try:
            with torch.no_grad(), probe(self.model, name) as cache:
                self.model(ids.to(model_device(self.model)))
        finally:
            self.model.train(was_training)
        self.pattern = cache[name][0].float().cpu()
        self.error.value = ""
        heads = [ALL, *range(self.pattern.size(0))]
        if list(self.head.options) != heads:
            wanted = self._head_request if self.head.value is None else self.head.value
            self._drawing = False  # one draw below, not one per trait change
            self.head.options = heads
            self.head.value = wanted if wanted in heads else 0
            self._drawing = True
        self.draw()

    def draw(self) -> None:
        """Redraw the figures from the recorded pattern (no forward pass)."""
        if self.pattern is None or self.head.value is None:
            return
        label = self.layer.label if self.title is None else f"{self.title}: {self.layer.label}"
        if self.head.value == ALL:
            heatmap = plots.attention_grid(self.pattern, self.tokens, title=label)
            pattern, title = self.pattern.mean(0), f"{label}, mean of heads"
        else:
            pattern, title = self.pattern[self.head.value], f"{label} head {self.head.value}"
            heatmap = plots.attention_heatmap(pattern, self.tokens, title=title)
        arcs = plots.attention_arcs(pattern, self.tokens, threshold=self.threshold, title=title)
        self.figures = {"heatmap": heatmap, "arcs": arcs}
        self.heatmap.value, self.arcs.value = png(heatmap), png(arcs)

    def picture(self) -> bytes | None:
        return self.heatmap.value or None

    def callback(self, every: int = 10) -> Callable[[Any], None]:
        """A ``lab.train.fit`` callback that refreshes the view every ``every`` steps."""

        def on_step(state: Any) -> None:
            if state.step % every == 0:
                self.refresh()

        return on_step

    def __repr__(self) -> str:
        title = "" if self.title is None else f"{self.title!r}, "
        return f"AttentionView({title}{self.layer.label}, head={self.head.value!r}, tokens={len(self.tokens)})"
