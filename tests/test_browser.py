"""The widgets in a real browser: JupyterLab on 127.0.0.1 (with a token) and headless
Chromium driven by Playwright run ``tests/browser_widgets.ipynb``, then check that the
Composer and AttentionView render and that clicking "build" reaches the kernel.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and ``pip install
playwright`` (never ``playwright install``: the system browser is used). Without them
the test skips, except under ``CI=true``, where it fails. A screenshot is written to
``artifacts/browser_widgets.png``.
"""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = Path(__file__).with_name("browser_widgets.ipynb")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
TIMEOUT_MS = 120_000


def require_browser():
    """Playwright's sync API, or a skip (a failure under CI) saying what to install."""
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("playwright (pip install playwright)")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path):
    """A JupyterLab server serving a copy of the notebook; yields (url, token)."""
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    port, token = free_port(), secrets.token_hex(16)
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    command = [
        sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={tmp_path}", "--LabApp.expose_app_in_browser=True",
        "--LabApp.extension_manager=readonly",
    ]  # fmt: skip
    if os.geteuid() == 0:  # containers often run as root
        command.append("--allow-root")
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        pytest.fail("JupyterLab did not start:\n" + log_path.read_text())
                    time.sleep(0.5)
            yield url, token
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


@pytest.fixture
def playwright_api():
    return require_browser()


def test_widgets_render_and_respond_in_chromium(playwright_api, jupyter_lab):
    sync_playwright = playwright_api
    url, token = jupyter_lab
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(f"{url}/lab/tree/{NOTEBOOK.name}?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell")
            page.wait_for_function(
                "window.jupyterapp && window.jupyterapp.shell.currentWidget"
                " && window.jupyterapp.shell.currentWidget.sessionContext"
                " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
                " === 'idle'"
            )
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            build = page.locator(".jupyter-widgets button", has_text="build")
            build.wait_for(state="visible")
            assert page.locator(".jupyter-widgets select").count() >= 5  # composer dropdowns
            page.wait_for_selector(
                ".jupyter-widgets img[src^='blob:'], .jupyter-widgets img[src^='data:']"
            )
            page.get_by_text("Total params").first.wait_for(state="attached")
            page.get_by_text("build 1: GPT").wait_for()  # the second cell built once
            build.click()  # the click must reach the kernel and come back
            page.get_by_text("build 2: GPT").wait_for()
            page.get_by_text("parameters", exact=True).first.wait_for()
        finally:
            page.screenshot(path=str(artifacts / "browser_widgets.png"), full_page=True)
            browser.close()
