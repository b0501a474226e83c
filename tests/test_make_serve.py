"""`make serve` as a user runs it: killing make (or the launcher) never leaves a server holding the port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from devtools.truss_local import REPO_ROOT, free_port


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_ready(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models/model", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"make serve was not ready in 240 s:\n{log.read_text()[-3000:]}")


def launcher_pids(port: int) -> list[int]:
    """Processes of this checkout's server started for ``port`` (their environment names it)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"PORT={port}".encode() in environ and (b"truss_local" in cmdline or b"loopback_main" in cmdline):
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("victim", ["make", "launcher -9"])
def test_killing_make_serve_stops_the_server(victim: str, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PORT": str(port)}
    with log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "serve"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # like a terminal's job: only the signal we send reaches it
        )  # fmt: skip
    try:
        wait_ready(port, make, log)
        assert launcher_pids(port)
        if victim == "make":
            make.send_signal(signal.SIGTERM)
        else:
            os.kill(min(launcher_pids(port)), signal.SIGKILL)  # the launcher, not the server
        deadline = time.monotonic() + 40
        while (launcher_pids(port) or not port_is_free(port)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not launcher_pids(port), f"left behind: {launcher_pids(port)}\n{log.read_text()[-2000:]}"
        assert port_is_free(port)
    finally:
        for pid in launcher_pids(port):
            os.kill(pid, signal.SIGKILL)
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
        make.wait(timeout=30)
