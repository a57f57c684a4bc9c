"""MemoryView: will this model train (or run) on that device, and where does the memory go?

    view = MemoryView()                          # pick a named model
    view = MemoryView(config=composer.config)    # or the one you designed
    composer.on_build.append(lambda model, config: view.set_config(config))

Every change re-estimates with ``lab.memory.estimate_memory`` (a training step of the
model itself on fake tensors: nothing allocated, so a 70B model is fine, and registered
components count as they compute), draws the stacked breakdown with
``lab.plots.memory_breakdown`` against the chosen device's memory and says whether it
fits. "measure" (on a GPU, or on the ``measure_device`` you pass) builds the model
with as many of its layers as fit ``measure_budget``, runs one training step through
``lab.memory.measure_memory`` and draws the measured bars beside the estimate of
that same smaller model, so the estimate is checked on the real device.
"""

from __future__ import annotations

import contextlib
import os

import ipywidgets as widgets
import torch

from lab import plots
from lab.cache_size import per_token_beside_standard
from lab.config import Config, ConfigError
from lab.formulas import DTYPES
from lab.memory import MemoryBreakdown, estimate_memory, format_bytes, measure_memory
from lab.model import GPT
from lab.widgets.common import View, error_html, png

GIVEN = "(given config)"
CUSTOM = "custom size"
MiB = 2**20
# Total memory as nvidia-smi reports it (a few hundred MiB go to the CUDA context).
GPU_MEMORY = {
    "T4 16 GB": 15360 * MiB,
    "L4 24 GB": 23034 * MiB,
    "RTX 4090 24 GB": 24564 * MiB,
    "A100 40 GB": 40960 * MiB,
    "A100 80 GB": 81920 * MiB,
    "H100 80 GB": 81559 * MiB,
    "H200 141 GB": 143771 * MiB,
}
FINETUNE_LABELS = {"full": "full", "LoRA": "lora", "adapter": "adapter", "inference": "none"}
OPTIMIZER_LABELS = {"AdamW": "adamw", "SGD (momentum)": "sgd", "AdamW 8-bit": "adamw8bit"}
TIGHT = 0.9  # above this share of the device, temporaries and fragmentation may not fit


def device_sizes() -> dict[str, int]:
    """Label -> bytes: the common GPUs, this machine's GPU and this machine's RAM."""
    sizes = dict(GPU_MEMORY)
    if torch.cuda.is_available():
        sizes[f"this GPU ({torch.cuda.get_device_name()})"] = torch.cuda.mem_get_info()[1]
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no sysconf on Windows
        sizes["this machine's RAM"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return sizes


class MemoryView(View):
    """Controls for ``estimate_memory`` with a stacked breakdown and a fit verdict."""

    def __init__(
        self,
        config: Config | str | None = None,
        *,
        batch_size: int = 1,
        seq_len: int | None = None,
        precision: str = "bf16-mixed",
        optimizer: str | None = "adamw",
        finetune: str = "full",
        activation_checkpointing: bool = False,
        device: str = "A100 80 GB",
        measure_device: str | torch.device | None = None,
        measure_budget: int = 2 * 2**30,
    ) -> None:
        self.sizes = device_sizes()
        if isinstance(config, Config):
            self.given: Config | None = config
            name = GIVEN
        else:
            self.given, name = None, config or "Llama-3.2-1B"
        if measure_device is None and torch.cuda.is_available():
            measure_device = "cuda"
        self.measure_device, self.measure_budget = measure_device, measure_budget
        style = {"description_width": "120px"}
        names = Config.available()
        self.model_name = widgets.Dropdown(
            options=[GIVEN, *names] if self.given else names, value=name,
            description="model", style=style,
        )  # fmt: skip
        start = self._base_config()
        self.batch_size = widgets.IntText(value=batch_size, description="batch size", style=style)
        self.seq_len = widgets.IntText(
            value=seq_len or min(start.block_size, 2048), description="sequence length", style=style
        )
        self.precision = widgets.Dropdown(
            options=list(DTYPES), value=precision, description="precision", style=style
        )
        self.optimizer = widgets.Dropdown(
            options=[*OPTIMIZER_LABELS.items(), ("none", None)], value=optimizer,
            description="optimizer", style=style,
        )  # fmt: skip
        self.finetune = widgets.Dropdown(
            options=list(FINETUNE_LABELS.items()), value=finetune,
            description="fine-tuning", style=style,
        )  # fmt: skip
        self.lora_r = widgets.IntText(value=8, description="LoRA rank", style=style)
        self.checkpointing = widgets.Checkbox(
            value=activation_checkpointing, description="activation checkpointing"
        )
        self.device = widgets.Dropdown(
            options=[*self.sizes, CUSTOM], value=device, description="device", style=style
        )
        self.custom_gib = widgets.FloatText(value=48.0, description="custom (GiB)", style=style)
        self.measure_button = widgets.Button(
            description="measure", icon="tachometer", disabled=measure_device is None,
            tooltip="run one step of the model on the device"
            if measure_device else "measuring needs a GPU (or MemoryView(measure_device=...))",
        )  # fmt: skip
        self.error = widgets.HTML()
        self.verdict = widgets.HTML()
        self.table = widgets.HTML()
        self.image = widgets.Image(format="png")
        self.estimate: MemoryBreakdown | None = None
        # bar label -> measured breakdown, and the choices it was measured for
        self.measured: dict[str, MemoryBreakdown] = {}
        self._measured_for: tuple | None = None
        self.figure = None
        controls = [self.model_name, self.batch_size, self.seq_len, self.precision,
                    self.optimizer, self.finetune, self.lora_r, self.checkpointing,
                    self.device, self.custom_gib]  # fmt: skip
        self.widget = widgets.VBox(
            [
                widgets.HBox([widgets.VBox(controls[:5]), widgets.VBox(controls[5:])]),
                self.error,
                self.verdict,
                widgets.HBox([self.image, widgets.VBox([self.table, self.measure_button])]),
            ],
            layout={"border": "1px solid #ddd", "padding": "6px"},
        )
        self.model_name.observe(self._on_model, names="value")
        for control in controls[1:]:
            control.observe(lambda _: self.update(), names="value")
        self.measure_button.on_click(lambda _: self.measure())
        self.update()

    # --- reading the controls ---------------------------------------------------------------
    def _base_config(self) -> Config:
        name = self.model_name.value
        return self.given if name == GIVEN else Config.from_name(name)

    def device_bytes(self) -> int:
        """Memory of the chosen device (the custom size in GiB when that is chosen)."""
        if self.device.value == CUSTOM:
            if self.custom_gib.value <= 0:
                raise ValueError(f"custom (GiB) ({self.custom_gib.value}) must be positive")
            return int(self.custom_gib.value * 2**30)
        return self.sizes[self.device.value]

    def options(self) -> dict:
        """The controls as ``estimate_memory`` keyword arguments."""
        finetune = self.finetune.value
        return dict(
            batch_size=self.batch_size.value,
            seq_len=self.seq_len.value,
            precision=self.precision.value,
            optimizer=None if finetune == "none" else self.optimizer.value,
            finetune=finetune,
            activation_checkpointing=self.checkpointing.value and finetune != "none",
            lora_r=self.lora_r.value,
        )

    def _estimate(self, config: Config) -> MemoryBreakdown:
        options = self.options()
        if options["seq_len"] > config.block_size:
            raise ValueError(
                f"sequence length ({options['seq_len']}) is longer than {config.name or 'the'} "
                f"model's block_size ({config.block_size}); shorten it"
            )
        if options["finetune"] == "lora" and options["lora_r"] < 1:
            raise ValueError(f"LoRA rank ({options['lora_r']}) must be a positive integer")
        return estimate_memory(config, **options)

    # --- events -------------------------------------------------------------------------------
    def set_config(self, config: Config) -> None:
        """Show ``config`` (e.g. each model the Composer builds) as the given config."""
        self.given = config
        if GIVEN not in self.model_name.options:
            self.model_name.options = [GIVEN, *Config.available()]
        if self.model_name.value == GIVEN:
            self._on_model()
        else:
            self.model_name.value = GIVEN  # triggers _on_model

    def _on_model(self, change: dict | None = None) -> None:
        self.measured, self._measured_for = {}, None
        block_size = self._base_config().block_size
        if self.seq_len.value > block_size:
            self.seq_len.value = block_size  # updates
        else:
            self.update()

    def _choices(self) -> tuple:
        return self.model_name.value, tuple(self.options().items())

    def update(self) -> None:
        """Re-estimate and redraw; an invalid choice shows its error and keeps the last
        figure."""
        self.finetune_controls()
        try:
            config = self._base_config()
            self.estimate = self._estimate(config)
            limit = self.device_bytes()
        except (ConfigError, ValueError, KeyError) as error:
            self.error.value = error_html(f"{type(error).__name__}: {error}")
            return
        self.error.value = ""
        self.verdict.value = self._verdict(self.estimate.total, limit)
        self._draw(limit)

    def finetune_controls(self) -> None:
        """Grey out what does not apply: optimizer and checkpointing for inference,
        the rank for everything but LoRA."""
        inference = self.finetune.value == "none"
        self.optimizer.disabled = self.checkpointing.disabled = inference
        self.lora_r.disabled = self.finetune.value != "lora"

    def _verdict(self, total: int, limit: int) -> str:
        share = total / limit
        size = f"{format_bytes(total)} of {format_bytes(limit)} ({share:.0%})"
        if share > 1:
            return f"<b style='color:#b00020'>does not fit</b> on {self.device.value}: {size}"
        note = (
            "; tight: the allocator's temporaries and the CUDA context are not counted"
            if share > TIGHT
            else ""
        )
        return f"<b style='color:#1b5e20'>fits</b> on {self.device.value}: {size}{note}"

    def _draw(self, limit: int) -> None:
        bars = {"estimate": self.estimate.as_dict()}
        if self._measured_for == self._choices():  # else the measurement is stale
            bars.update({label: b.as_dict() for label, b in self.measured.items()})
        config = self._base_config()
        self.figure = plots.memory_breakdown(
            bars, limit=limit, limit_label=self.device.value,
            title=f"{config.name or 'model'}: B={self.batch_size.value}, T={self.seq_len.value}",
        )  # fmt: skip
        self.image.value = png(self.figure)
        rows = "".join(
            f"<tr><td>{name.replace('_', ' ')}</td>"
            + "".join(f"<td style='text-align:right'>{format_bytes(b[name])}</td>" for b in bars.values())
            + "</tr>"
            for name in bars["estimate"]
        )  # fmt: skip
        head = "".join(f"<th>{label}</th>" for label in bars)
        params = f"trainable parameters: {self.estimate.trainable_parameters:,}"
        self.table.value = (
            f"<table><tr><th></th>{head}</tr>{rows}</table>{params}<br>{self._cache_line(config)}"
        )

    def _cache_line(self, config: Config) -> str:
        """KV cache per token of this model beside MHA and GQA (what MLA saves)."""
        params, autocast = DTYPES[self.precision.value]
        sizes = per_token_beside_standard(config, autocast or params)
        return "KV cache per token: " + ", ".join(
            f"{label} {format_bytes(size)}" for label, size in sizes.items()
        )

    # --- measuring ----------------------------------------------------------------------------
    def measurable(self) -> Config:
        """The chosen config cut to the most layers whose estimated step fits
        ``measure_budget`` (per-layer overrides kept for the layers that remain)."""
        if self.finetune.value != "full" or self.checkpointing.value:
            raise ValueError(
                "measuring runs a plain training step: choose full fine-tuning without "
                "activation checkpointing (the others are estimated only)"
            )
        config = self._base_config()
        for n_layer in range(config.n_layer, 0, -1):
            overrides = {i: o for i, o in config.layer_overrides.items() if i < n_layer}
            small = config.replace(n_layer=n_layer, layer_overrides=overrides)
            if self._estimate(small).total <= self.measure_budget:
                return small
        raise ValueError(
            f"even one layer needs more than the measuring budget "
            f"({format_bytes(self.measure_budget)}); lower the batch size or "
            f"sequence length, or pass MemoryView(measure_budget=...)"
        )

    def measure(self) -> MemoryBreakdown | None:
        """Build the measurable model on ``measure_device``, run one step, and draw the
        measured bars beside the estimate of the same model (what the button does)."""
        if self.measure_device is None:
            return None
        try:
            config = self.measurable()
            options = self.options()
            generator = torch.Generator().manual_seed(0)
            shape = (options["batch_size"], options["seq_len"])
            x, y = (torch.randint(0, config.vocab_size, shape, generator=generator) for _ in "xy")
            with torch.device(self.measure_device):
                model = GPT(config)
            if options["precision"] == "bf16-true":
                model = model.to(torch.bfloat16)
            device = self.measure_device
            measured = measure_memory(
                model, (x.to(device), y.to(device)), options["optimizer"], options["precision"]
            )
        except (ConfigError, ValueError, ImportError, RuntimeError) as error:
            self.error.value = error_html(f"{type(error).__name__}: {error}")
            return None
        n_layer = self._base_config().n_layer
        if config.n_layer == n_layer:
            self.measured = {"measured": measured}
        else:  # a smaller model: its own estimate beside its measurement
            label = f"{config.n_layer} of {n_layer} layers"
            self.measured = {
                f"estimate\n{label}": self._estimate(config),
                f"measured\n{label}": measured,
            }
        self._measured_for = self._choices()
        self.update()
        if measured.peak is not None:
            self.verdict.value += f"<br>measured allocator peak: {format_bytes(measured.peak)}"
        return measured

    def picture(self) -> bytes | None:
        return self.image.value or None

    def __repr__(self) -> str:
        config = self._base_config()
        if self.estimate is None or self.error.value:
            return f"MemoryView({config.name!r}, invalid choice)"
        fits = "fits" if self.estimate.total <= self.device_bytes() else "does not fit"
        o = self.options()
        return (
            f"MemoryView({config.name!r}, B={o['batch_size']}, T={o['seq_len']}, "
            f"{o['precision']}, {o['finetune']}: {format_bytes(self.estimate.total)}, "
            f"{fits} on {self.device.value})"
        )
