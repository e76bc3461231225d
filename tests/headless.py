"""Headless Chromium for the tests that check what a user sees: pages load with the network cut (only loopback)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# No request leaves the machine: every name resolves to nothing but loopback, and any proxied request goes to a
# closed port. file:// pages and a server on 127.0.0.1 still load.
OFFLINE = (
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def chromium() -> str:
    """The Chromium binary, or skip with the reason."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (apt-get install chromium)")


def _command(url: str, *, budget_ms: int, size: tuple[int, int]) -> list[str]:
    return [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        *OFFLINE, f"--virtual-time-budget={budget_ms}", f"--window-size={size[0]},{size[1]}", url,
    ]


def dump_dom(url: str, *, budget_ms: int = 15000, size: tuple[int, int] = (1400, 900)) -> str:
    """The page's DOM after its scripts ran for ``budget_ms`` of virtual time."""
    cmd = _command(url, budget_ms=budget_ms, size=size)
    out = subprocess.run([*cmd[:-1], "--dump-dom", cmd[-1]], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def screenshot(url: str, path: Path, *, budget_ms: int = 15000, size: tuple[int, int] = (1400, 900)) -> Path:
    """A PNG of the page at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = _command(url, budget_ms=budget_ms, size=size)
    out = subprocess.run([*cmd[:-1], f"--screenshot={path}", cmd[-1]], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and path.is_file(), out.stderr[-2000:]
    return path


def shots_dir(default: Path) -> Path:
    """Where screenshots go: ``$PACSAI_SCREENSHOTS`` (kept for people to look at) or ``default``."""
    return Path(os.environ.get("PACSAI_SCREENSHOTS") or default)
