"""Notebook 04's threshold explorer in a real browser: JupyterLab + headless Chromium driven by
Playwright.

Needs Debian's ``chromium`` (/usr/bin/chromium) and the Playwright Python client (never its own
browser download): ``bash tests/browser_setup.sh`` installs both. Run with ``pytest -m browser
tests/test_browser.py``. Missing prerequisites skip the test, unless
``NTHR_BOOK_BROWSER_REQUIRED=1`` (CI) makes them a failure.
Screenshots: ``build/browser/threshold_explorer.png`` (after β = -∞) and
``threshold_explorer_beta1.png`` (the first view, β = 1); ``threshold_explorer_failure.png`` when
the test fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nthr_book import config

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = "04_threshold_explorer.ipynb"
NOTEBOOK_DIR = config.PROJECT_ROOT / "notebooks"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SERVER_START_S = 90  # JupyterLab up and answering
RUN_ALL_S = float(
    os.environ.get("NTHR_BOOK_BROWSER_TIMEOUT", 900)
)  # notebook executed up to the explorer
CHANGE_S = 60  # a control move reaches the page
# JupyterLab user settings for the test: never autosave (the committed notebook must keep no
# outputs), no news.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
    # every cell in the DOM (no virtual scrolling), so the explorer's spans can be counted wherever
    # it is
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def _prerequisites():
    """The Playwright sync API, or a skip/fail naming what is missing and how to install it."""
    os.environ["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"] = "1"
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright Python package")
    if missing:
        message = f"browser test needs {' and '.join(missing)}: run `bash tests/browser_setup.sh`"
        if os.environ.get("NTHR_BOOK_BROWSER_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_lab(tmp: Path, port: int, token: str) -> subprocess.Popen:
    """JupyterLab on 127.0.0.1:port serving notebooks/, with its config, data and settings under
    ``tmp``."""
    for name, content in LAB_SETTINGS.items():
        path = tmp / "lab-settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # the kernel draws inline figures as in a normal session
    env.setdefault(config.SIZE_ENV, "ci")
    env.update(
        JUPYTER_CONFIG_DIR=str(tmp / "config"),
        JUPYTER_DATA_DIR=str(tmp / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
        PYTHONUNBUFFERED="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={NOTEBOOK_DIR}",
        "--LabApp.news_url=",
        "--ServerApp.open_browser=False",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    log = open(tmp / "jupyterlab.log", "wb")  # noqa: SIM115 - closed with the process in _stop
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=NOTEBOOK_DIR, start_new_session=True
    )
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + SERVER_START_S
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"JupyterLab exited with {proc.returncode}: {_tail(tmp / 'jupyterlab.log')}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(
        f"JupyterLab did not answer within {SERVER_START_S} s: {_tail(tmp / 'jupyterlab.log')}"
    )


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server we started and its kernels (its own process group): SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # kernels left in the group
    except ProcessLookupError:
        pass
    proc.log.close()  # type: ignore[attr-defined]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


def _kernel_state(port: int, token: str) -> str | None:
    """execution_state of the server's only kernel once a client is connected to it, else None."""
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/api/kernels?token={token}", timeout=5
        ) as resp:
            kernels = json.loads(resp.read())
    except OSError:
        return None
    if len(kernels) != 1 or kernels[0].get("connections", 0) < 1:
        return None
    return kernels[0].get("execution_state")


def _started(page, port: int, token: str) -> bool:
    """True once the notebook runs: the kernel is busy or some cell has an execution count."""
    prompts = page.locator(".jp-InputArea-prompt").all_inner_texts()
    return _kernel_state(port, token) == "busy" or any(
        re.search(r"\[(\*|\d+)\]", p) for p in prompts
    )


def _finished(page, port: int, token: str) -> bool:
    """True when the kernel is idle and every code cell shows an execution count."""
    prompts = [
        p.strip() for p in page.locator(".jp-CodeCell .jp-InputArea-prompt").all_inner_texts()
    ]
    return (
        _kernel_state(port, token) == "idle"
        and bool(prompts)
        and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts)
    )


def _cell_errors(page) -> list[str]:
    """Texts of error outputs shown in the notebook (a failed cell)."""
    return page.locator(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
        ' pre, .jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]'
    ).all_inner_texts()


def _wait_for(page, what: str, predicate, timeout_s: float, *, check_errors: bool = False):
    """Poll ``predicate()`` until it returns a truthy value; fail naming ``what`` (and cell
    errors)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if check_errors:
            errors = [e for e in _cell_errors(page) if "Traceback" in e or "Error" in e]
            if errors:
                pytest.fail(
                    f"a notebook cell failed while waiting for {what}:\n{errors[0][-3000:]}"
                )
        page.wait_for_timeout(500)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_threshold_explorer_in_jupyterlab(tmp_path):
    sync_playwright = _prerequisites()
    nb_path = NOTEBOOK_DIR / NOTEBOOK
    original = nb_path.read_bytes()
    had_checkpoints = (NOTEBOOK_DIR / ".ipynb_checkpoints").exists()
    shot = config.build_dir() / "browser" / "threshold_explorer.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    shot.with_name("threshold_explorer_failure.png").unlink(missing_ok=True)
    port, token = _free_port(), secrets.token_hex(16)
    t_start = time.monotonic()
    proc = _start_lab(tmp_path, port, token)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1500, "height": 1100})
                page.set_default_timeout(60_000)
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}")
                page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=120_000)
                # cells sent before the page's kernel connection is up are dropped: wait for it,
                # then Run > Run All Cells, and again if the kernel has not started executing
                _wait_for(
                    page,
                    "a connected idle kernel",
                    lambda: _kernel_state(port, token) == "idle",
                    SERVER_START_S,
                )
                page.wait_for_timeout(2000)
                t_run = time.monotonic()
                for _attempt in range(3):
                    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
                    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline and not _started(page, port, token):
                        page.wait_for_timeout(500)
                    if _started(page, port, token):
                        break
                else:
                    pytest.fail("Run All Cells did not start the kernel three times")

                live = page.locator(".nthr-explorer-live")
                selected = page.locator(".nthr-explorer-live .nthr-selected")
                _wait_for(
                    page,
                    "the explorer to render",
                    lambda: (
                        live.count() > 0
                        and page.locator(".nthr-explorer-live .nthr-token").count() > 0
                    ),
                    RUN_ALL_S,
                    check_errors=True,
                )
                t_explorer = time.monotonic()
                # widget messages reach the kernel only between cells: wait for the whole notebook
                # to finish
                _wait_for(
                    page,
                    "the notebook to finish",
                    lambda: _finished(page, port, token),
                    RUN_ALL_S,
                    check_errors=True,
                )
                t_done = time.monotonic()
                explorer = page.locator(".nthr-threshold-explorer").first
                explorer.scroll_into_view_if_needed()
                before = selected.count()
                attr_before = int(live.first.get_attribute("data-n-selected"))
                tau_before = live.first.get_attribute("data-tau")
                assert before == attr_before, (before, attr_before)
                explorer.screenshot(path=str(shot.with_name("threshold_explorer_beta1.png")))

                # β = -∞: every token of the shown incorrect response becomes selected
                toggle = explorer.locator("button", has_text="β = -∞")
                toggle.click()
                after = _wait_for(
                    page,
                    "the β = -∞ selection",
                    lambda: selected.count() != before and selected.count(),
                    CHANGE_S,
                )
                n_tokens = (
                    page.locator(".nthr-explorer-live .nthr-view")
                    .first.locator(".nthr-token")
                    .count()
                )
                assert after == n_tokens, f"β = -∞ should select all {n_tokens} tokens, got {after}"
                assert live.first.get_attribute("data-tau") == "-inf"
                explorer.screenshot(path=str(shot))

                # back to the slider, then move it with the keyboard to its maximum β
                toggle.click()
                _wait_for(
                    page, "β back to the slider", lambda: selected.count() == before, CHANGE_S
                )
                handle = explorer.locator(".widget-slider .noUi-handle").first
                handle.focus()
                page.keyboard.press("End")
                _wait_for(
                    page,
                    "the slider's β = 3",
                    lambda: live.first.get_attribute("data-tau") not in (tau_before, "-inf", None),
                    CHANGE_S,
                )
                assert explorer.locator(".widget-readout").first.inner_text().strip() == "3.00"
                assert float(live.first.get_attribute("data-tau")) == pytest.approx(
                    3 * float(tau_before)
                )
                at_max = selected.count()
                assert at_max == int(live.first.get_attribute("data-n-selected"))
                # τ = β · min s̄+: a larger β raises τ when τ > 0 (fewer tokens reach it) and
                # lowers it when τ < 0 (more do)
                if float(tau_before) >= 0:
                    assert at_max <= before, f"τ > 0, β = 3: {at_max} > {before}"
                else:
                    assert at_max >= before, f"τ < 0, β = 3: {at_max} < {before}"
                assert not _cell_errors(page), _cell_errors(page)[0][-2000:]
                print(
                    f"\nbrowser test: run-all to explorer {t_explorer - t_run:.0f} s, to the end "
                    f"{t_done - t_run:.0f} s (total {time.monotonic() - t_start:.0f} s); selected "
                    f"β=1: {before}, -∞: {after}, "
                    f"β=3: {at_max}; screenshot {shot}"
                )
            except BaseException:
                try:
                    page.screenshot(
                        path=str(shot.with_name("threshold_explorer_failure.png")), full_page=False
                    )
                except Exception:  # noqa: BLE001 - the original error matters more
                    pass
                raise
            finally:
                browser.close()
    finally:
        _stop(proc)
        if nb_path.read_bytes() != original:  # never leave outputs in the committed notebook
            nb_path.write_bytes(original)
            pytest.fail(f"{nb_path} was modified during the browser test (restored)")
        if not had_checkpoints:  # a checkpoint folder this test made (gitignored anyway)
            shutil.rmtree(NOTEBOOK_DIR / ".ipynb_checkpoints", ignore_errors=True)
