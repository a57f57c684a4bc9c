"""TrainingView: live curves of a ``lab.train.fit`` run, and a button that stops it.

    view = TrainingView()
    view                                            # shows the panel
    view.fit(model, data, steps=500, eval_every=50) # trains in the background
    history = view.wait()                           # later: the History (or the error)

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
widget's message, and a kernel busy running a cell handles it after the cell (checked
in JupyterLab 4.6 with ipykernel 7.4, in the browser test). So ``view.fit`` runs
``lab.train.fit(model, data, callbacks=[view, ...])`` in a background thread: the cell
returns at once, the kernel stays free to handle the click, and the button works.

Caveats of the background thread: do not use or change the model (or its optimizer's
tensors, or ``torch.set_num_threads``) from other cells while it trains, and run no
other ``fit`` meanwhile (``fit`` seeds torch's global RNG); read
``view.history`` freely (it only grows). Interrupting the kernel does not reach the
thread: stop it with the button or ``view.stop()``. ``fit(..., callbacks=[view])`` in
the cell itself still works, with curves drawn live, but then the button acts only
after the cell; stop such a run by interrupting the kernel (``fit`` handles
KeyboardInterrupt cleanly and returns its history).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import ipywidgets as widgets

from lab import plots, train
from lab.train import History, TrainState
from lab.widgets.common import View, error_html, png


class TrainingView(View):
    """Live training curves and a stop button: ``view.fit(model, data, steps=...)``
    trains in the background; ``fit(..., callbacks=[view])`` works as a callback too."""

    def __init__(self, interval: float = 1.0, title: str | None = None) -> None:
        if not interval >= 0:
            raise ValueError(f"interval={interval}; use seconds between redraws, >= 0")
        self.interval, self.title = interval, title
        self.history: History | None = None  # of the run being shown
        self.state: TrainState | None = None  # the latest state fit passed
        self.result: History | None = None  # what the last background run returned
        self.error: BaseException | None = None  # or what it raised
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
        self._starting = False  # view.fit started a run that has not reached on_step yet
        self._thread: threading.Thread | None = None
        self._drawn_at = -math.inf

    # --- what the user does ------------------------------------------------------------
    def fit(self, model: Any, data: Any, *, callbacks: Any = (), **fit_kwargs: Any) -> None:
        """Start ``lab.train.fit(model, data, callbacks=[self, *callbacks], **fit_kwargs)``
        in a background thread and return at once; ``wait()`` gives its History.

        The thread keeps the kernel free, so the stop button's click is handled while the
        model trains. One run at a time per view.
        """
        if self.running:
            raise RuntimeError(
                "this view is already training; stop it (view.stop()) and view.wait() "
                "before starting another run, or use a second TrainingView"
            )
        self.result, self.error, self.state = None, None, None
        self._start(None)
        self._starting = True  # a stop clicked before the first step applies to this run
        self._thread = threading.Thread(
            target=self._run, args=(model, data, [self, *callbacks], fit_kwargs),
            name="TrainingView.fit", daemon=True,
        )  # fmt: skip
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether a run started by ``view.fit`` is still going."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> History:
        """Block until the background run ends and return its History; re-raise its error.

        ``timeout`` in seconds (None: no limit); a run still going after it raises
        TimeoutError and keeps training.
        """
        if self._thread is None:
            raise RuntimeError("no background run; start one with view.fit(model, data, steps=...)")
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"still training after timeout={timeout} s; view.stop() ends it")
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self) -> None:
        """Ask the running ``fit`` to stop after its current step (the button's action)."""
        self._stop_requested = True
        self.stop_button.disabled = True
        self.stop_button.description = "stopping"

    def _run(self, model: Any, data: Any, callbacks: list[Any], fit_kwargs: dict) -> None:
        """The background thread: train, keep the result or the error, show how it ended."""
        try:
            self.result = train.fit(model, data, callbacks=callbacks, **fit_kwargs)
        except BaseException as error:  # handed to wait(), shown inline
            self.error = error
            self.stop_button.disabled, self.stop_button.description = True, "failed"
            self.status.value = error_html(f"training failed: {type(error).__name__}: {error}")
            return
        self.draw()  # the status now says how the run ended

    # --- what fit calls ------------------------------------------------------------------
    def on_step(self, state: TrainState) -> None:
        if state.history is not self.history:  # a new run (or a resumed one)
            stop_requested = self._stop_requested and self._starting
            self._start(state.history)
            self._stop_requested = stop_requested
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

    def _start(self, history: History | None) -> None:
        self.history, self._stop_requested, self._starting = history, False, False
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
        if history.stopped:  # fit has returned (set at its end, after the last callback)
            parts.append(f"<b>{history.stopped} at step {state.step}</b>")
        elif state.should_stop:
            parts.append("<b>stopping</b>")
        return " &middot; ".join(parts)

    def picture(self) -> bytes | None:
        return self.image.value or None

    def __repr__(self) -> str:
        if self.state is None:
            return "TrainingView(no run yet)"
        return (
            f"TrainingView(step {self.state.step}/{self.state.steps}, loss {self.state.loss:.3f})"
        )
