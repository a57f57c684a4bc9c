"""What every checker shares: run the learner's code safely, compare, and answer kindly.

A checker calls the learner's function on a few cases and stops at the first one that
is wrong with ``ExerciseFailed``: a ``LabError``, so a notebook shows its one-line
message, not a traceback. A checker whose cases all pass prints one success line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lab.errors import LabError


class ExerciseFailed(LabError, AssertionError):
    """The learner's code is not right yet; the message says what to look at, not
    the answer. An ``AssertionError`` too, so nbgrader and pytest count it as a
    failed test."""


def fail(message: str) -> None:
    raise ExerciseFailed(message)


def passed(name: str, cases: str) -> None:
    """Print the success line (the same on every machine: no numbers that float)."""
    print(f"✔ {name}: correct. Checked {cases}.")


def call(fn: Callable[..., Any], *args: Any, case: str = "", **kwargs: Any) -> Any:
    """Run the learner's ``fn``; turn its own errors into a message naming the case."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        fail(
            f"{_name(fn)} is not written yet: replace `raise NotImplementedError()` with your code"
        )
    except ExerciseFailed:
        raise
    except Exception as error:  # the learner's bug, reported as a message, not a crash
        where = f" on {case}" if case else ""
        fail(f"{_name(fn)} raised {type(error).__name__}{where}: {error}")


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__name__', type(fn).__name__)}()"


def tensor_result(value: Any, expected: torch.Tensor, what: str, case: str) -> torch.Tensor:
    """Check that ``value`` is a tensor of the expected shape and dtype."""
    if not isinstance(value, torch.Tensor):
        fail(f"{what} should return a tensor; on {case} it returned {type(value).__name__}")
    if value.shape != expected.shape:
        fail(
            f"{what} returned shape {tuple(value.shape)} on {case}; expected "
            f"{tuple(expected.shape)}"
        )
    if value.dtype != expected.dtype:
        fail(
            f"{what} returned {value.dtype} for {expected.dtype} inputs on {case}: keep "
            "the input's dtype (compute in float32 if you like, then convert back)"
        )
    if not torch.isfinite(value).all():
        fail(f"{what} returned NaN or inf on {case}")
    return value


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of the dtype (float32 unless the inputs are lower)."""
    tol = {torch.float64: 1e-5, torch.float32: 1e-4}.get(
        a.dtype, 2e-2
    )  # references use fp32 tables
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=tol, atol=tol)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64).to(dtype)
