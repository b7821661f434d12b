"""`runway ui` as a subprocess, and Debian's chromium for Playwright: what the CLI and
browser tests share."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.conftest import project_env

CHROMIUM = "/usr/bin/chromium"  # Debian's package (scripts/install-chromium); never downloaded
# Quiet offline: no update checks, sync or first-run pages.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@contextlib.contextmanager
def chromium() -> Iterator:
    """Debian's chromium, launched headless by Playwright (a missing binary fails: make test
    installs it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class UiProcess:
    """`runway ui` started in ``cwd``, its output (stdout and stderr) read as it comes."""

    def __init__(self, cwd: Path):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["runway", "ui", "--port", str(self.port)],
            cwd=cwd,
            env=project_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, line: str, timeout: float = 180, part: bool = False) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [
                i for i, seen in enumerate(self.lines) if (line in seen if part else line == seen)
            ]
            if found:
                return found[0]
            assert self.proc.poll() is None, "\n".join(self.lines[-40:])
            time.sleep(0.2)
        raise AssertionError(f"no {line!r} in:\n" + "\n".join(self.lines[-40:]))

    def link(self, label: str, timeout: float = 180) -> str:
        """The URL on the printed line ``  <label> <url> ...`` (printed once the server
        answers)."""
        pattern = re.compile(rf"^  {re.escape(label)} +(http://\S+)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if found := pattern.match(line):
                    return found.group(1)
            assert self.proc.poll() is None, "\n".join(self.lines[-40:])
            time.sleep(0.2)
        raise AssertionError(f"no {label!r} link in:\n" + "\n".join(self.lines[-40:]))

    def kill(self) -> None:
        """Whatever is left of it, its server's process group included."""
        if self.proc.poll() is None:
            groups = {self.proc.pid}
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(ProcessLookupError):  # ended since it was listed
                    groups.add(os.getpgid(child.pid))
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        self.proc.wait(timeout=30)
