"""Headless Chromium for the report render tests: open a page, run a probe, return its DOM."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# records each image's decoded size (0x0 if it did not decode) on <body data-imgs="...">
IMAGE_PROBE = (
    "document.body.setAttribute('data-imgs',[...document.images].map(i=>i.complete?"
    "i.naturalWidth+'x'+i.naturalHeight:'0x0').join(','));"
)


def render(html: str, tmp: Path, probe: str = IMAGE_PROBE) -> str:
    """The DOM of ``html`` after load, with ``probe`` (JavaScript) run on load."""
    page = tmp / "probe.html"
    script = f"<script>window.addEventListener('load',()=>{{{probe}}});</script>"
    page.write_text(html.replace("</body>", script + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                "--dump-dom", page.as_uri(),
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def image_sizes(dom: str) -> list[tuple[int, int]]:
    m = re.search(r'data-imgs="([^"]*)"', dom)
    assert m, "probe script did not run"
    return [tuple(map(int, s.split("x"))) for s in m.group(1).split(",") if s]
