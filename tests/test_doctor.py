"""``python -m lab doctor``: each check passes here, and fails with its fix when its
condition breaks."""

from __future__ import annotations

from importlib import metadata

import torch

from lab import doctor as doc
from lab.__main__ import main


def test_every_check_passes_in_this_environment():
    for check in (doc.check_python, doc.check_torch, doc.check_widgets, doc.check_threads):
        finding = check()
        assert finding.ok, finding
        assert str(finding).startswith("✔ ")


def test_training_step_passes_and_reports_its_time():
    finding = doc.check_training_step()
    assert finding.ok, finding
    assert "trained a step in" in finding.detail


def test_old_torch_fails_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.4.1+cpu")
    finding = doc.check_torch()
    assert not finding.ok
    assert "fix: pip install 'torch>=2.5,<2.15'" in str(finding)


def test_missing_or_mismatched_widgets_fail_with_the_fix(monkeypatch):
    versions = {"ipywidgets": "8.1.5", "jupyterlab_widgets": None}

    def version(name):
        if versions.get(name) is None:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(doc.metadata, "version", version)
    finding = doc.check_widgets()
    assert not finding.ok and "jupyterlab_widgets not installed" in finding.detail
    assert "pip install" in finding.fix
    versions["jupyterlab_widgets"] = "1.1.0"  # the ipywidgets 7 front end
    finding = doc.check_widgets()
    assert not finding.ok and "do not match" in finding.detail


def test_too_many_threads_fail_with_the_fix(monkeypatch):
    monkeypatch.setattr(doc.os, "cpu_count", lambda: 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    finding = doc.check_threads()
    assert not finding.ok and finding.fix == "export OMP_NUM_THREADS=1 before starting Jupyter"


def test_slow_or_broken_training_step_fails(monkeypatch):
    monkeypatch.setattr(doc, "STEP_SECONDS", 0.0)
    finding = doc.check_training_step()
    assert not finding.ok and finding.detail.endswith("slow") and "threads" in finding.fix

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(torch.optim, "AdamW", broken)
    finding = doc.check_training_step()
    assert not finding.ok and "RuntimeError: no kernel" in finding.detail


def test_command_prints_the_report_and_exit_status(monkeypatch, capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.count("✔") == 5 and out.rstrip().endswith("All set.")
    monkeypatch.setattr(
        doc, "check_python", lambda: doc.Finding("Python", False, "3.8", "install 3.11")
    )
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "✘ Python: 3.8\n    fix: install 3.11" in out and "Fix the lines marked ✘" in out
