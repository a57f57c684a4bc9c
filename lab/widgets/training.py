"""TrainingView: live curves of a ``lab.train.fit`` run, and a button that stops it.

    view = TrainingView()
    view                                            # shows the panel
    history = fit(model, data, steps=500, eval_every=50, callbacks=[view])

``fit`` calls the view's ``on_step`` after every step and ``on_eval`` after every
evaluation. The view keeps one figure (``lab.plots.training_curves``: train and
validation loss, validation accuracy, learning rate, tokens/s) and one ``Image``
widget; a redraw replaces the lines' data and the image's PNG, and re-creates nothing,
so the panel does not flicker. Drawing costs tens of milliseconds, more than a step of
a small model, so steps redraw at most once every ``interval`` seconds; an evaluation,
the last step and a stop always redraw, so the final picture is complete.

"stop" makes ``fit`` end cleanly after the current step (``TrainState.should_stop``:
the step's evaluation and final checkpoint still happen, and the returned History says
``stopped == "stopped"``). A click reaches Python only when the kernel handles the
widget's message, and a kernel busy running the ``fit`` cell handles it after the cell
(checked in JupyterLab 4.6 with ipykernel 7.4, in the browser test): the button stops a
run that a callback or another thread drives, and ``view.stop()`` works from code. To
stop a ``fit`` running in the current cell, interrupt the kernel (the stop square in
the toolbar): ``fit`` handles KeyboardInterrupt cleanly and returns its history.
"""

from __future__ import annotations

import math
import time

import ipywidgets as widgets

from lab import plots
from lab.train import History, TrainState
from lab.widgets.common import View, png


class TrainingView(View):
    """Live training curves and a stop button; pass it to ``fit(callbacks=[view])``."""

    def __init__(self, interval: float = 1.0, title: str | None = None) -> None:
        if not interval >= 0:
            raise ValueError(f"interval={interval}; use seconds between redraws, >= 0")
        self.interval, self.title = interval, title
        self.history: History | None = None  # of the run being shown
        self.state: TrainState | None = None  # the latest state fit passed
        self.figure = plots.training_curves(History(), title=title)
        self.image = widgets.Image(format="png", value=png(self.figure))
        self.status = widgets.HTML("no run yet")
        self.stop_button = widgets.Button(
            description="stop", icon="stop", button_style="warning",
            tooltip="end training cleanly after the current step",
        )  # fmt: skip
        self.stop_button.on_click(lambda _: self.stop())
        self.widget = widgets.VBox([widgets.HBox([self.stop_button, self.status]), self.image])
        self._stop_requested = False
        self._drawn_at = -math.inf

    # --- what the user does ------------------------------------------------------------
    def stop(self) -> None:
        """Ask the running ``fit`` to stop after its current step (the button's action)."""
        self._stop_requested = True
        self.stop_button.disabled = True
        self.stop_button.description = "stopping"

    # --- what fit calls ------------------------------------------------------------------
    def on_step(self, state: TrainState) -> None:
        if state.history is not self.history:  # a new run (or a resumed one)
            self._start(state.history)
        self.state = state
        if self._stop_requested:
            state.should_stop = True
            self._stop_requested = False
        final = state.should_stop or state.step >= state.steps
        if final:  # fit ends after this step
            self.stop_button.disabled = True
            self.stop_button.description = "stopped" if state.should_stop else "finished"
        if final or time.monotonic() - self._drawn_at >= self.interval:
            self.draw()

    def on_eval(self, state: TrainState) -> None:
        self.state = state
        self.draw()

    def _start(self, history: History) -> None:
        self.history, self._stop_requested = history, False
        self.stop_button.disabled, self.stop_button.description = False, "stop"

    # --- drawing ------------------------------------------------------------------------
    def draw(self) -> None:
        """Show the current history: new line data in the same figure, a new PNG."""
        if self.history is None:
            return
        plots.training_curves(self.history, figure=self.figure)
        self.image.value = png(self.figure)
        self.status.value = self._status()
        self._drawn_at = time.monotonic()

    def _status(self) -> str:
        state, history = self.state, self.history
        parts = [f"step {state.step}/{state.steps}", f"loss {state.loss:.4f}"]
        if history.evals:
            last = history.evals[-1]
            parts += [
                f"val loss {last['val_loss']:.4f}",
                f"val accuracy {last['val_accuracy']:.1%}",
            ]
        parts += [f"lr {state.lr:.2e}", f"{state.tokens_per_s:,.0f} tokens/s"]
        if state.should_stop:
            parts.append("<b>stopping</b>")
        return " &middot; ".join(parts)

    def __repr__(self) -> str:
        if self.state is None:
            return "TrainingView(no run yet)"
        return (
            f"TrainingView(step {self.state.step}/{self.state.steps}, loss {self.state.loss:.3f})"
        )
