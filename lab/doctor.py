"""A setup check for a workshop room: ``python -m lab doctor``, or ``lab.doctor.doctor()``
as the first cell of a notebook.

Each check says pass or fail, and for a failure the fix. What a terminal cannot see (whether
the browser renders widgets) is said, and checked for real when run inside a notebook.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from importlib import metadata

import torch
import torch.nn.functional as F

PYTHON = ((3, 10), (3, 13))  # the versions lab is tested on
TORCH = ((2, 5), (2, 15))  # pyproject: torch>=2.5,<2.15
STEP_SECONDS = 1.0  # a laptop trains this tiny model a step in well under a second


@dataclass
class Finding:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def __str__(self) -> str:
        line = f"{'✔' if self.ok else '✘'} {self.name}: {self.detail}"
        return line if self.ok else f"{line}\n    fix: {self.fix}"


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_python() -> Finding:
    version = platform.python_version()
    ok = PYTHON[0] <= sys.version_info[:2] <= PYTHON[1]
    return Finding(
        "Python", ok, version, "install Python 3.10 to 3.13 and recreate the environment"
    )


def check_torch() -> Finding:
    version = torch.__version__
    ok = TORCH[0] <= _version(version)[:2] < TORCH[1]
    return Finding("torch", ok, version, "pip install 'torch>=2.5,<2.15' (the CPU wheel is enough)")


def installed(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def check_widgets() -> Finding:
    """ipywidgets (the kernel side) and jupyterlab_widgets (the browser side) must be
    installed and of matching majors: ipywidgets 8 with jupyterlab_widgets 3."""
    kernel, front = installed("ipywidgets"), installed("jupyterlab_widgets")
    fix = (
        "pip install 'ipywidgets>=8.1' 'jupyterlab_widgets>=3' in the environment that runs Jupyter"
    )
    if kernel is None or front is None:
        missing = [
            n for n, v in (("ipywidgets", kernel), ("jupyterlab_widgets", front)) if v is None
        ]
        return Finding("widgets", False, f"{' and '.join(missing)} not installed", fix)
    if _version(kernel)[0] != 8 or _version(front)[0] != 3:
        return Finding("widgets", False,
                       f"ipywidgets {kernel} with jupyterlab_widgets {front} do not match", fix)  # fmt: skip
    note = ("installed and matching; a terminal cannot see the browser, so run lab.doctor.doctor() "
            "in a notebook: it shows a slider if widgets render")  # fmt: skip
    return Finding("widgets", True, f"ipywidgets {kernel}, jupyterlab_widgets {front}: {note}")


def check_threads() -> Finding:
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    detail = f"torch uses {threads} thread(s) on {cores} CPU(s)"
    if threads > cores:
        return Finding("threads", False, f"{detail}: more threads than CPUs slows every step",
                       f"export OMP_NUM_THREADS={cores} before starting Jupyter")  # fmt: skip
    return Finding("threads", True, f"{detail} (the exercises set 1: tiny models run fastest so)")


def check_training_step() -> Finding:
    """Build a 2-layer model and take two AdamW steps: the whole stack works, and fast.
    The first step is timed apart: it pays one-off costs (torch loading kernels)."""
    from lab import GPT, Config

    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = GPT(Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, block_size=64))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(256, (4, 64))
        seconds = []
        for _ in range(2):
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
    except Exception as error:  # report any failure of the stack as the finding
        return Finding("model and training step", False, f"{type(error).__name__}: {error}",
                       "reinstall lab and torch in a fresh environment (pip install -e .)")  # fmt: skip
    if not torch.isfinite(loss):
        return Finding("model and training step", False, "the loss is not finite",
                       "reinstall torch; if it persists, report your CPU and torch version")  # fmt: skip
    detail = (f"built a 2-layer GPT and trained a step in {seconds[1]:.2f} s "
              f"(the first step, with one-off set-up, took {seconds[0]:.1f} s)")  # fmt: skip
    if seconds[1] > STEP_SECONDS:
        return Finding("model and training step", False, f"{detail}: slow",
                       "close other programs, plug the laptop in, and check the threads line")  # fmt: skip
    return Finding("model and training step", True, detail)


def in_notebook() -> bool:
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


def doctor() -> bool:
    """Print every check with its fix; True if all pass. In a notebook, also shows a
    slider: if you see the words ``IntSlider(...)`` instead, widgets do not render."""
    findings = [check_python(), check_torch(), check_widgets(), check_threads(),
                check_training_step()]  # fmt: skip
    for finding in findings:
        print(finding)
    ok = all(f.ok for f in findings)
    print("All set." if ok else "Fix the lines marked ✘, then run this again.")
    if in_notebook():
        import ipywidgets
        from IPython.display import display

        print("You should see a slider below. If you see the text IntSlider(...) instead, the "
              "browser side of the widgets is missing: pip install 'jupyterlab_widgets>=3' where "
              "Jupyter runs, restart Jupyter and reload the page.")  # fmt: skip
        display(ipywidgets.IntSlider(value=3, max=10, description="widgets"))
    return ok
