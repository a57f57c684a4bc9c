"""lab's one error family: each error names the field or file at fault and the fix.

Every error lab raises on purpose derives from ``LabError``, so a notebook can catch
them all with one ``except``.  In IPython and Jupyter they render as their one-line
message instead of a long traceback (a student needs the message, not lab's call
stack); the full traceback is one ``%tb`` away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LabError(Exception):
    """Base of lab's errors; shown in IPython as ``Name: message`` alone."""

    def _render_traceback_(self) -> list[str]:
        """IPython's hook for custom tracebacks: the short message, and where the rest is."""
        return [
            f"\x1b[0;31m{type(self).__name__}\x1b[0m: {self}",
            "(the full traceback: run %tb in the next cell)",
        ]


class ConfigError(LabError, ValueError):
    """A config that cannot build a model; the message names the field and the fix.

    ``field`` holds the offending field's name, so a widget can point at it.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class CheckpointError(LabError, ValueError):
    """A checkpoint that cannot be saved or loaded as asked; names the file and the fix."""


class AdapterError(LabError, ValueError):
    """An adapter that cannot be applied, saved or loaded as asked; says why and the fix."""


class NonFiniteLossError(LabError, FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; the weights were not updated.

    ``step`` is the failing step, ``history`` what was recorded before it, and
    ``checkpoint`` the last good checkpoint (None without ``checkpoint_dir``).
    """

    def __init__(self, message: str, step: int, history: Any, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step, self.history, self.checkpoint = step, history, checkpoint

    def __reduce__(self) -> tuple:  # pickled from a notebook's worker process to the parent
        return type(self), (str(self), self.step, self.history, self.checkpoint)
