"""fit(devices=2) from a Jupyter kernel: forked workers (two CPU processes on gloo).

The notebook is built here and run by nbclient in this environment's python3 kernel,
where Lightning sees an interactive session and fit forks its workers. Its cells assert:
DDP and FSDP leave the weights of a one-process fit on the same global batches in the
notebook's model; a callback and a TrainingView (in its background thread) get every
step in the notebook's process, and the view's stop button ends the run; a worker's
NonFiniteLossError surfaces here; Ctrl-C stops the workers cleanly.
"""

import multiprocessing
import sys
from pathlib import Path

import pytest
import torch

from lab.train import fit

sys.path.insert(0, str(Path(__file__).parent))
from distributed_setup import FIT_KWARGS, TASK, tiny_gpt

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

CELLS = [
    """
import multiprocessing, os, signal
import torch
from lightning_fabric.utilities.imports import _IS_INTERACTIVE
from distributed_setup import FIT_KWARGS, TASK, tiny_gpt
from lab.train import NonFiniteLossError, fit

assert _IS_INTERACTIVE  # the premise: in a kernel, fit must fork (there is no script)
DDP = dict(devices=2, strategy="ddp", accelerator="cpu")
# One process first, on this kernel's threads: the workers forked later must not hang
# in OpenMP after the parent used its thread pool.
reference = tiny_gpt()
expected = fit(reference, TASK, **FIT_KWARGS)

def assert_trained(model):
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
""",
    """
model, seen = tiny_gpt(), []
history = fit(model, TASK, callbacks=[lambda s: seen.append((s.step, s.loss, s.history))],
              **DDP, **FIT_KWARGS)
assert history.step == [1, 2, 3, 4, 5, 6] and history.stopped == "finished"
assert history.loss == expected.loss or max(
    abs(a - b) / abs(b) for a, b in zip(history.loss, expected.loss)) < 1e-5
assert [(s, l) for s, l, _ in seen] == list(zip(history.step, history.loss))
assert all(h is history for _, _, h in seen)  # the callbacks' history is the one returned
assert_trained(model)
assert os.getpid() == multiprocessing.current_process().pid
""",
    """
model = tiny_gpt()
history = fit(model, TASK, devices=2, strategy="fsdp", accelerator="cpu", **FIT_KWARGS)
assert history.step == [1, 2, 3, 4, 5, 6]
assert_trained(model)  # whole weights gathered from the shards
""",
    """
bad = tiny_gpt()
with torch.no_grad():
    for p in bad.parameters():
        p.fill_(float("nan"))
try:
    fit(bad, TASK, **DDP, **FIT_KWARGS)
    raise AssertionError("fit did not raise")
except NonFiniteLossError as error:
    assert "loss is nan at step 1" in str(error) and error.step == 1, error
    assert "worker process of rank" in error.__notes__[0], error.__notes__
assert not multiprocessing.active_children()
""",
    """
def interrupt(state):  # Ctrl-C at step 2, as Jupyter's interrupt sends it: to the group
    if state.step == 2:
        group = os.getpgid(0)
        os.killpg(group, signal.SIGINT) if group == os.getpid() else os.kill(os.getpid(), signal.SIGINT)

model = tiny_gpt()
history = fit(model, TASK, callbacks=[interrupt], **DDP, **FIT_KWARGS | {"steps": 1000})
assert history.stopped == "interrupted" and 2 <= len(history.step) < 1000, history
assert not torch.equal(model.lm_head.weight, tiny_gpt().lm_head.weight)
assert not multiprocessing.active_children()
""",
    """
from lab.widgets.training import TrainingView

view = TrainingView(interval=0)
view.fit(tiny_gpt(), TASK, **DDP, **FIT_KWARGS | {"steps": 1000})
view.stop()  # the button: applies at the first step the view sees
history = view.wait(timeout=120)
assert history is view.history and history.stopped == "stopped", history.stopped
assert view.state.step == history.step[-1] < 1000
""",
]


def test_fit_forks_workers_in_a_notebook():
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source.strip()) for source in CELLS]
    client = nbclient.NotebookClient(
        notebook,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(Path(__file__).parent)}},
    )
    client.execute()  # raises CellExecutionError with the failing cell's traceback


def test_a_platform_without_fork_is_told_to_use_a_script(monkeypatch):
    import lightning_fabric.utilities.imports

    monkeypatch.setattr(lightning_fabric.utilities.imports, "_IS_INTERACTIVE", True)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])
    with pytest.raises(RuntimeError, match="cannot fork; put the code in a script"):
        fit(tiny_gpt(), TASK, devices=2, accelerator="cpu", **FIT_KWARGS)
