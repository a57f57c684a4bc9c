"""RoutingView: which experts each token of a text goes to, and each expert's load.

    view = RoutingView(moe_model, tokenizer, "some text")
    fit(model, data, steps=200, callbacks=[view.callback(every=20)])  # live

Each refresh runs one forward pass inside ``lab.probe`` asking for the selected MoE
layer's routing record, draws the token x expert gates and the load, and appends
the load to the history drawn as load over time.
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


class RoutingView(View):
    """Routing of an MoE model on a text, one MoE layer at a time."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        text: str = "The cat sat on the mat. The cat sat on the hat.",
        title: str | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.title = title  # which model this is, at the head of every figure
        self.names = [n for n in hook_points(model) if n.endswith(".mlp.routing")]
        if not self.names:
            raise ValueError(
                f"{type(model).__name__} has no MoE layer; build one with "
                "mlp_class_name='MoE', n_expert and n_expert_per_token"
            )
        self.text = widgets.Text(value=text, description="text", layout={"width": "95%"})
        self.layer = widgets.Dropdown(
            options=[(n.removesuffix(".mlp.routing"), n) for n in self.names], description="layer"
        )
        self.refresh_button = widgets.Button(description="refresh", icon="refresh")
        self.routing_image = widgets.Image(format="png")
        self.load_image = widgets.Image(format="png")
        self.history_image = widgets.Image(format="png")
        self.error = widgets.HTML()
        self.widget = widgets.VBox(
            [self.text, widgets.HBox([self.layer, self.refresh_button]), self.error,
             widgets.HBox([self.routing_image, widgets.VBox([self.load_image, self.history_image])])]
        )  # fmt: skip
        self.record: Any = None  # the shown layer's lab.moe.RoutingRecord
        self.tokens: list[str] = []
        self.steps: list[int] = []
        self.loads: dict[str, list[torch.Tensor]] = {n: [] for n in self.names}
        self.figures: dict[str, Any] = {}
        self.text.observe(lambda _: self.refresh(), names="value")
        self.layer.observe(lambda _: self.draw(), names="value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.refresh()

    def refresh(self, step: int | None = None) -> None:
        """Route the text through the model, record every MoE layer's load (at training
        ``step``, default: the next index) and redraw."""
        limit = getattr(getattr(self.model, "config", None), "block_size", 512)
        ids, self.tokens = tokenize(self.tokenizer, self.text.value, limit)
        if ids.numel() == 0:
            self.error.value = error_html("type some text to see its routing")
            return
        was_training = self.model.training
        self.model.eval()  # a look must not move the sigmoid router's balancing bias
        try:
            with torch.no_grad(), probe(self.model, *self.names) as cache:
                self.model(ids.to(model_device(self.model)))
        finally:
            self.model.train(was_training)
        self.cache = cache
        self.steps.append(len(self.steps) if step is None else step)
        for name in self.names:
            self.loads[name].append(cache[name].load.float().cpu())
        self.error.value = ""
        self.draw()

    def draw(self) -> None:
        name = self.layer.value
        self.record = self.cache[name]
        label = self.layer.label if self.title is None else f"{self.title}: {self.layer.label}"
        weights = self.record.combine_weights[0].float().cpu()
        self.figures = {
            "routing": plots.routing_heatmap(weights, self.tokens, title=f"{label} routing"),
            "load": plots.expert_load(self.record.load.float().cpu(), title=f"{label} load"),
            "history": plots.expert_load_over_time(
                torch.stack(self.loads[name]), self.steps, title="load over time"
            ),
        }
        self.routing_image.value = png(self.figures["routing"])
        self.load_image.value = png(self.figures["load"])
        self.history_image.value = png(self.figures["history"])

    def picture(self) -> bytes | None:
        return self.routing_image.value or None

    def callback(self, every: int = 10) -> Callable[[Any], None]:
        """A ``lab.train.fit`` callback that refreshes the view every ``every`` steps."""

        def on_step(state: Any) -> None:
            if state.step % every == 0:
                self.refresh(step=state.step)

        return on_step

    def __repr__(self) -> str:
        return f"RoutingView({self.layer.label}, tokens={len(self.tokens)}, refreshes={len(self.steps)})"
