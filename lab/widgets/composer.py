"""Composer: design an architecture with controls, see its size live, build it.

    composer = Composer()            # or Composer(Config.from_name("pythia-70m"))
    composer                         # in a notebook: edit, then click "build"
    composer.model, composer.config  # what the last click built

Every change makes a new ``Config`` (``config.replace``, so derived sizes follow);
an invalid combination shows the ``ConfigError`` message inline and keeps the last
valid config. Sizes come from a meta-device model (no memory allocated, so a 70B
config is fine); FLOPs and training memory from ``lab.flops`` and ``lab.memory``, which
run a step of that model on fake tensors, so your registered components count exactly as
they compute. Dropdowns list what the registries hold
when the Composer is created, user-registered components included.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ipywidgets as widgets
import torch
import torchinfo
from torch import nn

from lab import flops, registry
from lab.config import ROUTERS, Config, ConfigError
from lab.memory import estimate_memory, format_bytes
from lab.model import GPT
from lab.widgets.common import View, error_html

SCRATCH = "scratch"
DEFAULT = "(model default)"
# Config field -> (label, widget kind): the controls, in display order.
INT_FIELDS = {
    "n_layer": "depth", "n_embd": "width", "n_head": "heads", "n_query_groups": "query groups",
    "intermediate_size": "MLP width", "block_size": "block size", "vocab_size": "vocab size",
    "sliding_window_size": "window (0=off)", "n_expert": "experts",
    "n_expert_per_token": "experts/token",
}  # fmt: skip
CHOICE_FIELDS = {
    "attention_class_name": ("attention", registry.attention),
    "mlp_class_name": ("MLP", registry.mlp),
    "norm_class_name": ("norm", registry.norm),
    "positional": ("positions", registry.positional),
    "activation": ("activation", registry.activation),
}
PER_LAYER = ("attention_class_name", "mlp_class_name")  # what the layer editor changes


def scratch_config() -> Config:
    """A small LLaMA-style model that trains on a laptop CPU in minutes."""
    return Config(name=SCRATCH, block_size=256, vocab_size=256, n_layer=4, n_embd=128, n_head=4)


class Composer(View):
    """Controls for a ``Config`` with live size, FLOPs and memory; builds the model."""

    def __init__(
        self,
        config: Config | None = None,
        *,
        model_class: Callable[[Config], nn.Module] = GPT,
        device: str | torch.device = "cpu",
        max_build_params: int = 500_000_000,
        seq_len: int = 1024,
    ) -> None:
        self.model_class, self.device = model_class, device
        self.max_build_params, self.seq_len = max_build_params, seq_len
        self.model: nn.Module | None = None
        self.builds = 0  # clicks that built a model
        self.on_build: list[Callable[[nn.Module, Config], None]] = []
        self._base = config or scratch_config()
        self.config: Config | None = self._base
        self._overrides = {i: dict(o) for i, o in self._base.layer_overrides.items()}
        self._quiet = False  # True while the code, not the user, sets widget values
        style = {"description_width": "110px"}
        self.start = widgets.Dropdown(
            options=[SCRATCH, *Config.available()],
            value=self._base.name if self._base.name in Config.available() else SCRATCH,
            description="start from", style=style,
        )  # fmt: skip
        self.fields: dict[str, widgets.ValueWidget] = {
            name: widgets.IntText(description=label, style=style, layout={"width": "220px"})
            for name, label in INT_FIELDS.items()
        }
        for name, (label, reg) in CHOICE_FIELDS.items():
            self.fields[name] = widgets.Dropdown(
                options=reg.names(), description=label, style=style
            )
        self.fields["router"] = widgets.Dropdown(options=ROUTERS, description="router", style=style)
        self.layer = widgets.Dropdown(description="layer", style=style)
        self.layer_fields = {
            name: widgets.Dropdown(
                options=[DEFAULT, *CHOICE_FIELDS[name][1].names()],
                description=f"layer {CHOICE_FIELDS[name][0]}", style=style,
            )
            for name in PER_LAYER
        }  # fmt: skip
        self.error = widgets.HTML()
        self.stats = widgets.HTML()
        self.summary = widgets.HTML()
        self.build_button = widgets.Button(description="build", button_style="primary")
        self.status = widgets.HTML()
        self.widget = self._layout()
        self.start.observe(self._on_start, names="value")
        for control in self.fields.values():
            control.observe(self._on_change, names="value")
        self.layer.observe(self._on_layer, names="value")
        for control in self.layer_fields.values():
            control.observe(self._on_layer_change, names="value")
        self.build_button.on_click(lambda _: self.build())
        self._show(self._base)
        self._update()

    def _layout(self) -> widgets.Widget:
        f = self.fields
        column = widgets.VBox
        sizes = column([f[n] for n in ("n_layer", "n_embd", "n_head", "n_query_groups",
                                       "intermediate_size", "block_size", "vocab_size")])  # fmt: skip
        parts = column([f[n] for n in (*CHOICE_FIELDS, "sliding_window_size")])
        moe = column([widgets.HTML("<b>mixture of experts</b>"), f["n_expert"],
                      f["n_expert_per_token"], f["router"], widgets.HTML("<b>per layer</b>"),
                      self.layer, *self.layer_fields.values()])  # fmt: skip
        return widgets.VBox(
            [
                self.start,
                widgets.HBox([sizes, parts, moe]),
                self.error,
                self.stats,
                widgets.HBox([self.build_button, self.status]),
                widgets.Accordion([self.summary], titles=("torchinfo summary",)),
            ],
            layout={"border": "1px solid #ddd", "padding": "6px"},
        )

    # --- from widgets to config -------------------------------------------------------------
    def values(self) -> dict[str, Any]:
        """The controls' values as config fields (a window of 0 means none)."""
        values = {name: control.value for name, control in self.fields.items()}
        values["sliding_window_size"] = values["sliding_window_size"] or None
        return values

    def _candidate(self) -> Config:
        """The base config with the fields the user changed; the others (derived
        ones included) follow the base, so changing the width updates the MLP width."""
        base = self._base.to_dict()
        changes = {k: v for k, v in self.values().items() if base.get(k) != v}
        n_layer = changes.get("n_layer", self._base.n_layer)
        overrides = {i: o for i, o in self._overrides.items() if i < n_layer and o}
        return self._base.replace(**changes, layer_overrides=overrides)

    def _update(self) -> None:
        try:
            config = self._candidate()
        except ConfigError as error:
            self.config = None
            self.error.value = error_html(f"ConfigError: {error}")
            self.build_button.disabled = True
            return
        self.config, self.error.value, self.build_button.disabled = config, "", False
        self._show(config)
        self._report(config)

    def _report(self, config: Config) -> None:
        with torch.device("meta"):
            meta = self.model_class(config)
        n_params = sum(p.numel() for p in meta.parameters())
        seq_len = min(self.seq_len, config.block_size)
        rows = [
            ("parameters", f"{n_params:,}"),
            (f"forward FLOPs/token (T={seq_len})", _maybe(flops.flops_per_token, config, seq_len)),
            ("parameter memory (fp32)", format_bytes(4 * n_params)),
            (
                f"training memory (batch 1, T={seq_len}, AdamW, fp32)",
                _maybe(lambda: format_bytes(estimate_memory(config, 1, seq_len).total)),
            ),
        ]  # fmt: skip
        self.n_params = n_params
        self.stats.value = "<table>" + "".join(
            f"<tr><td>{k}</td><td style='text-align:right'><b>{v}</b></td></tr>" for k, v in rows
        ) + "</table>"  # fmt: skip
        summary = torchinfo.summary(meta, depth=3, verbose=0)
        self.summary.value = f"<pre style='font-size:11px'>{summary}</pre>"

    # --- from config to widgets -------------------------------------------------------------
    def _show(self, config: Config) -> None:
        self._quiet = True
        try:
            for name, control in self.fields.items():
                value = getattr(config, name)
                control.value = 0 if value is None and name == "sliding_window_size" else value
            layer = self.layer.value if self.layer.value in range(config.n_layer) else 0
            self.layer.options = list(range(config.n_layer))
            self.layer.value = layer
            self._show_layer()
        finally:
            self._quiet = False

    def _show_layer(self) -> None:
        overrides = self._overrides.get(self.layer.value, {})
        for name, control in self.layer_fields.items():
            control.value = overrides.get(name, DEFAULT)

    # --- events -------------------------------------------------------------------------------
    def _on_start(self, change: dict) -> None:
        name = change["new"]
        base = scratch_config() if name == SCRATCH else type(self._base).from_name(name)
        self._base, self.config = base, base
        self._overrides = {i: dict(o) for i, o in base.layer_overrides.items()}
        self._show(base)
        self._update()

    def _on_change(self, change: dict) -> None:
        if not self._quiet:
            self._update()

    def _on_layer(self, change: dict) -> None:
        if not self._quiet:
            self._quiet = True
            try:
                self._show_layer()
            finally:
                self._quiet = False

    def _on_layer_change(self, change: dict) -> None:
        if self._quiet or self.layer.value is None:
            return
        overrides = self._overrides.setdefault(self.layer.value, {})
        for name, control in self.layer_fields.items():
            if control.value == DEFAULT:
                overrides.pop(name, None)
            else:
                overrides[name] = control.value
        self._update()

    def build(self) -> nn.Module | None:
        """Build the current config (what the button does); None if it cannot."""
        if self.config is None:
            return None
        if self.n_params > self.max_build_params:
            self.status.value = error_html(
                f"{self.n_params:,} parameters would need "
                f"{format_bytes(4 * self.n_params)} in fp32; shrink the model or "
                f"pass Composer(max_build_params=...) to build it anyway"
            )
            return None
        self.model = self.model_class(self.config).to(self.device)
        self.builds += 1
        self.status.value = (
            f"build {self.builds}: <b>{type(self.model).__name__}</b> on {self.device}"
        )
        for callback in self.on_build:
            callback(self.model, self.config)
        return self.model

    def __repr__(self) -> str:
        config = self.config
        name = "invalid" if config is None else repr(config.name or SCRATCH)
        return f"Composer(config={name}, built={self.model is not None})"


def _maybe(fn: Callable, *args: Any) -> str:
    """A figure from ``lab.flops`` or ``lab.memory``, or why it is unavailable (a model
    whose MoE routing needs data beside a registered component: see ``estimate_memory``)."""
    try:
        value = fn(*args)
    except ValueError as error:
        return f"n/a ({type(error).__name__})"
    return f"{value:,}" if isinstance(value, int) else str(value)
