"""The HTML report opened in headless Chromium (Debian's `chromium`): non-blank, and the table is there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeq.report import write_report

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TH_BACKGROUND = (0xEE, 0xF2, 0xF7)  # table header colour in render._CSS

pytestmark = pytest.mark.browser


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing and we are root, else the test skips."""
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip(f"{CHROMIUM} is missing and we are not root with apt-get: cannot install chromium")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        proc = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True, env=env,
                              timeout=900)
        if proc.returncode != 0 or not os.path.exists(CHROMIUM):
            pytest.skip(f"apt-get install chromium failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}")
    return CHROMIUM


def _run(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    return subprocess.run([chromium, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          timeout=120)


def test_html_report_renders_in_chromium(chromium, profiled_db, tmp_path):
    import numpy as np
    from PIL import Image

    page = write_report(profiled_db, tmp_path / "report.html")
    png = tmp_path / "shot.png"
    shot = _run(chromium, tmp_path, f"--screenshot={png}", "--window-size=1280,2000", page.resolve().as_uri())
    assert png.is_file(), shot.stderr.decode(errors="replace")[-2000:]
    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (2000, 1280)
    assert img.std() > 20, "the screenshot is blank"
    header = np.all(np.abs(img - np.array(TH_BACKGROUND)) <= 2, axis=-1)
    assert header.sum() > 2000, "no table header cells are visible in the screenshot"

    dom = _run(chromium, tmp_path, "--dump-dom", page.resolve().as_uri())
    html = dom.stdout.decode(errors="replace")
    assert '<table data-table="main">' in html and '<table data-table="summary">' in html
    assert "<td>toy-matmul</td>" in html and "<td>INT8</td>" in html and "<td>INT4</td>" in html
    assert html.count("<svg") >= 1 and "not measured [" in html
