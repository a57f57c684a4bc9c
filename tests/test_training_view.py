"""TrainingView driven as a user would: live curves during fit(), and its stop button."""

import matplotlib

matplotlib.use("Agg")

import math
import time

import pytest
import torch

from lab import plots
from lab.config import Config
from lab.data import MQAR
from lab.model import GPT
from lab.train import History, fit, latest_checkpoint
from lab.widgets import TrainingView

TASK = MQAR(num_pairs=4, num_keys=16, num_values=16)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(Config(n_layer=1, n_embd=32, n_head=2, vocab_size=TASK.vocab_size, block_size=32))


def run(view_or_callbacks, **kwargs) -> History:
    callbacks = view_or_callbacks if isinstance(view_or_callbacks, list) else [view_or_callbacks]
    kwargs = dict(steps=6, batch_size=8, lr=3e-3, warmup_steps=2, eval_every=2, eval_steps=1,
                  progress=False, callbacks=callbacks) | kwargs  # fmt: skip
    return fit(tiny_gpt(), TASK, **kwargs)


def curves(figure) -> dict[str, tuple[list[float], list[float]]]:
    """Label -> (x, y) of every line in the figure, as plain lists."""
    return {
        line.get_label(): (list(map(float, line.get_xdata())), list(map(float, line.get_ydata())))
        for ax in figure.axes
        for line in ax.lines
    }


def expected(history: History) -> dict[str, tuple[list[float], list[float]]]:
    """The curves read straight from the history's fields (not through plots)."""
    steps, val_steps = history.step, [e["step"] for e in history.evals]
    return {
        "train loss": (steps, history.loss),
        "validation loss": (val_steps, [e["val_loss"] for e in history.evals]),
        "validation accuracy": (val_steps, [e["val_accuracy"] for e in history.evals]),
        "learning rate": (steps, history.lr),
        "tokens/s": (steps, history.tokens_per_s),
    }


def test_the_curves_follow_fit_and_equal_its_history():
    view = TrainingView(interval=0)
    figure, lines, image = view.figure, curves(view.figure), view.image
    assert repr(view) == "TrainingView(no run yet)" and all(x == [] for x, _ in lines.values())
    seen = []  # what the user sees after each step: the curves and the status line
    history = run([view, lambda state: seen.append((curves(view.figure), view.status.value))])
    assert curves(view.figure) == expected(history)
    assert [len(c["train loss"][0]) for c, _ in seen] == [1, 2, 3, 4, 5, 6]  # live, every step
    assert seen[2][0]["validation loss"][0] == [2.0]  # the evaluation at step 2, by step 3
    # No flicker: the same figure, lines and image widget, only their data replaced.
    assert view.figure is figure and view.image is image and view.widget.children[1] is image
    assert [id(line) for ax in figure.axes for line in ax.lines] == [
        id(line) for ax in view.figure.axes for line in ax.lines
    ]
    assert history.lr[:2] == pytest.approx([1.5e-3, 3e-3])  # warmup, drawn as is
    assert view.status.value.startswith(f"step 6/6 &middot; loss {history.loss[-1]:.4f}")
    assert f"val accuracy {history.evals[-1]['val_accuracy']:.1%}" in view.status.value
    assert repr(view) == f"TrainingView(step 6/6, loss {history.loss[-1]:.3f})"
    assert view.stop_button.disabled and view.stop_button.description == "finished"


def test_redraws_are_throttled_but_evaluations_and_the_end_always_draw():
    view = TrainingView(interval=3600)
    shown = []  # (step, PNG bytes) after each step's callbacks and evaluation
    empty = view.image.value
    run([view, lambda s: shown.append((s.step, view.image.value))])
    pngs = dict(shown)
    assert pngs[1] != empty  # the first step draws
    assert pngs[2] == pngs[1] and pngs[4] == pngs[3]  # steps wait...
    assert pngs[3] != pngs[2] and pngs[5] != pngs[4]  # ...evaluations (at 2 and 4) draw
    assert pngs[6] != pngs[5]  # and so does the last step
    assert curves(view.figure)["train loss"][0] == [1, 2, 3, 4, 5, 6]  # the end drew


def test_stop_button_ends_training_cleanly(tmp_path):
    view = TrainingView(interval=3600)

    def click_at_step_3(state):
        if state.step == 3:
            view.stop_button.click()

    history = run([click_at_step_3, view], steps=50, checkpoint_dir=tmp_path)
    assert history.stopped == "stopped" and history.step == [1, 2, 3]
    assert all(math.isfinite(v) for v in history.loss)
    assert latest_checkpoint(tmp_path).name == "step-00000003"  # the final checkpoint was written
    assert curves(view.figure) == expected(history)
    assert view.status.value.endswith("<b>stopping</b>")
    assert view.stop_button.disabled and view.stop_button.description == "stopped"

    # The same view shows a new run from scratch; a stop asked between runs is forgotten.
    view.stop()
    again = run(view, steps=4)
    assert again.stopped == "finished" and curves(view.figure) == expected(again)


def test_a_click_during_a_step_stops_after_that_step():
    view = TrainingView(interval=3600)
    clicks = []

    def click_later(state):  # after the view's hook: applies at the next step
        if state.step == 2:
            view.stop()
            clicks.append(view.stop_button.description)

    history = run([view, click_later], steps=50)
    assert clicks == ["stopping"] and history.step == [1, 2, 3] and history.stopped == "stopped"


def wait_for_step(view: TrainingView, step: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while view.state is None or view.state.step < step:
        assert view.running and time.monotonic() < deadline, "the background run made no steps"
        time.sleep(0.005)


def test_a_background_run_keeps_the_caller_free_and_the_button_stops_it():
    view = TrainingView(interval=3600)
    steps = []
    view.fit(tiny_gpt(), TASK, steps=100_000, batch_size=8, lr=3e-3, eval_every=1000,
             eval_steps=1, progress=False, callbacks=[lambda s: steps.append(s.step)])  # fmt: skip
    wait_for_step(view, 3)  # fit() returned while training goes on in its thread
    assert view.running and view.result is None
    with pytest.raises(RuntimeError, match="already training"):
        view.fit(tiny_gpt(), TASK, steps=5)
    with pytest.raises(TimeoutError, match="still training"):
        view.wait(timeout=0)
    view.stop_button.click()  # what a click in the browser calls, from another thread
    history = view.wait(timeout=60)
    n = len(history.step)
    assert not view.running and view.result is history and view.history is history
    assert history.stopped == "stopped" and 3 <= n < 100_000 and history.step == steps
    assert all(math.isfinite(v) for v in history.loss)
    assert curves(view.figure) == expected(history)  # the end drew
    assert view.status.value.endswith(f"<b>stopped at step {n}</b>")
    assert view.stop_button.disabled and view.stop_button.description == "stopped"

    # the view runs again; a stop clicked before the first step ends the run after it
    view.fit(tiny_gpt(), TASK, steps=100_000, batch_size=8, progress=False)
    view.stop()
    again = view.wait(timeout=60)
    assert again is not history and again.stopped == "stopped" and again.step == [1]
    # and runs to the end when nobody stops it, like fit itself
    view.fit(tiny_gpt(), TASK, steps=4, batch_size=8, progress=False, seed=1)
    finished = view.wait(timeout=60)  # (fit seeds torch's global RNG: one run at a time)
    assert (
        finished.loss == fit(tiny_gpt(), TASK, steps=4, batch_size=8, progress=False, seed=1).loss
    )
    assert view.status.value.endswith("<b>finished at step 4</b>")


def test_a_background_run_error_is_shown_and_raised_by_wait():
    view = TrainingView()
    with pytest.raises(RuntimeError, match="no background run"):
        view.wait()
    view.fit(tiny_gpt(), TASK, steps=5, precision="fp8")
    with pytest.raises(ValueError, match="precision='fp8'"):
        view.wait(timeout=60)
    assert "training failed: ValueError" in view.status.value and view.result is None
    assert view.stop_button.disabled and view.stop_button.description == "failed"


def test_training_curves_redraws_a_given_figure_in_place():
    history = History(step=[1, 2], loss=[2.0, 1.5], lr=[1e-3, 1e-3], tokens_per_s=[10.0, 12.0],
                      evals=[{"step": 2, "val_loss": 1.7, "val_accuracy": 0.25}])  # fmt: skip
    figure = plots.training_curves(history, title="run")
    assert curves(figure) == expected(history)
    ax = figure.axes[0]
    target = ax.axhline(1.0, label="target")
    history.step.append(3), history.loss.append(0.5), history.lr.append(5e-4)
    history.tokens_per_s.append(11.0)
    assert plots.training_curves(history, figure=figure) is figure
    assert curves(figure)["train loss"] == ([1, 2, 3], [2.0, 1.5, 0.5])
    assert list(target.get_ydata()) == [1.0, 1.0]  # a line of the user's is left alone
    assert ax.get_ylim()[0] <= 0.5  # rescaled to the new data


def test_interval_must_be_non_negative():
    with pytest.raises(ValueError, match="interval=-1"):
        TrainingView(interval=-1)
