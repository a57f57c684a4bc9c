"""Write the student version of an exercise notebook, as nbgrader would, without it.

In the source notebooks the solutions sit between nbgrader's markers. The student
version replaces each ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region of a code
cell with ``# YOUR CODE HERE`` / ``raise NotImplementedError()`` (indented like the
marker), of a Markdown cell with ``YOUR ANSWER HERE``; drops ``### BEGIN HIDDEN TESTS``
... ``### END HIDDEN TESTS`` regions; and clears every output.
"""

from __future__ import annotations

import json
from pathlib import Path

from lab.errors import LabError

BEGIN_SOLUTION, END_SOLUTION = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"


def _replace_regions(lines: list[str], begin: str, end: str, stub: list[str] | None,
                     where: str) -> list[str]:  # fmt: skip
    """Lines with each begin..end region replaced by ``stub`` (indented like ``begin``)."""
    out: list[str] = []
    inside: str | None = None
    for line in lines:
        marker = line.strip()
        if marker == begin:
            if inside is not None:
                raise LabError(f"{where}: {begin!r} inside another region; close it with {end!r}")
            inside = line[: len(line) - len(line.lstrip())]
            out.extend(inside + s + "\n" for s in stub or [])
        elif marker == end:
            if inside is None:
                raise LabError(f"{where}: {end!r} without a {begin!r} before it")
            inside = None
        elif inside is None:
            out.append(line)
    if inside is not None:
        raise LabError(f"{where}: {begin!r} is never closed; add {end!r}")
    return out


def student_cell(cell: dict, where: str) -> dict:
    """A copy of ``cell`` without solutions, hidden tests or outputs."""
    cell = json.loads(json.dumps(cell))
    source = cell["source"]
    lines = source if isinstance(source, list) else [source]
    lines = "".join(lines).splitlines(keepends=True)
    if cell["cell_type"] == "code":
        stub = ["# YOUR CODE HERE", "raise NotImplementedError()"]
        cell["outputs"], cell["execution_count"] = [], None
    else:
        stub = ["YOUR ANSWER HERE"]
    lines = _replace_regions(lines, BEGIN_SOLUTION, END_SOLUTION, stub, where)
    lines = _replace_regions(lines, BEGIN_HIDDEN, END_HIDDEN, None, where)
    if lines:
        lines[-1] = lines[-1].rstrip("\n")
    cell["source"] = lines
    return cell


def student_notebook(notebook: dict, name: str = "notebook") -> dict:
    notebook = dict(notebook)
    notebook["cells"] = [
        student_cell(c, f"{name}, cell {i}") for i, c in enumerate(notebook["cells"])
    ]
    return notebook


def write_student_version(source: str | Path, destination: str | Path) -> list[Path]:
    """Write the student version of ``source`` (a notebook, or a folder of them) to
    ``destination`` (a folder); return the files written."""
    source, destination = Path(source), Path(destination)
    files = sorted(source.glob("*.ipynb")) if source.is_dir() else [source]
    if not files or not all(f.suffix == ".ipynb" and f.is_file() for f in files):
        raise LabError(f"{source} is not a notebook or a folder of notebooks (*.ipynb)")
    if destination.resolve() == (source if source.is_dir() else source.parent).resolve():
        raise LabError(f"{destination} holds the sources: write the student version elsewhere")
    destination.mkdir(parents=True, exist_ok=True)
    written = []
    for file in files:
        notebook = student_notebook(json.loads(file.read_text(encoding="utf-8")), file.name)
        target = destination / file.name
        target.write_text(
            json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        written.append(target)
    return written
