"""Notebook kernels share the CPU fairly when pytest-xdist runs several at once.

nbval starts one kernel per notebook, and ``-n auto`` (pyproject's addopts) runs one
notebook per core. A kernel left to torch's default takes every core, so two of them
oversubscribe the machine and run several times slower; each gets its share instead,
unless OMP_NUM_THREADS is set already (as ``.ci/run`` does on purpose).
"""

import os


def pytest_configure(config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
