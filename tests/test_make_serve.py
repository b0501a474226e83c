"""`make serve` as a user runs it: it serves the tiny code model (devtools/code_model/) by default, killing make (or
the launcher) never leaves a server holding the port, and Ctrl-C in a terminal stops it with exit status 0."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pty
import shutil
import signal
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.truss_local import CODE_MODEL_DIR, DEFAULT_LAYOUT_DIR, REPO_ROOT, free_port
from tests.test_code_model import looks_like_python

VICTIMS = ("make", "launcher -9", "ctrl-c")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclasses.dataclass
class MakeServe:
    port: int
    make: subprocess.Popen[bytes]
    log: Path
    terminal: int | None = None  # the pseudo-terminal's master side, when make runs in one


def start_make_serve(log: Path, taken: set[int], terminal: bool = False) -> MakeServe:
    port = free_port()
    while port in taken:  # the kernel may hand the same free port out twice
        port = free_port()
    # make serve's defaults: no checkpoint or tiny model chosen in the environment the tests run in.
    env = {**os.environ, "PORT": str(port)}
    env.pop("STARCODER_CHECKPOINT", None)
    env.pop("STARCODER_TINY", None)
    if terminal:
        return start_in_a_terminal(log, port, env)
    with log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "--no-print-directory", "serve"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # like a terminal's job: only the signal we send reaches it
        )  # fmt: skip
    return MakeServe(port, make, log)


def start_in_a_terminal(log: Path, port: int, env: dict[str, str]) -> MakeServe:
    """make serve as typed in a shell: a session of its own whose controlling terminal is a pseudo-terminal, make
    in its foreground. Writing Ctrl-C (\x03) to the terminal is then exactly the user's keystroke."""
    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    make = subprocess.Popen(
        ["make", "--no-print-directory", "serve"], cwd=REPO_ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
        start_new_session=True, preexec_fn=controlling_terminal,  # noqa: PLW1509
    )  # fmt: skip
    os.close(slave)

    def copy_output() -> None:  # the terminal's output to the log, so the server never blocks writing
        with log.open("wb") as out:
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # every writer has gone
                    break
                if not chunk:
                    break
                out.write(chunk)
                out.flush()
        os.close(master)

    threading.Thread(target=copy_output, daemon=True).start()
    return MakeServe(port, make, log, terminal=master)


def wait_ready(serve: MakeServe) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert serve.make.poll() is None, serve.log.read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{serve.port}/v1/models/model", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"make serve was not ready in 240 s:\n{serve.log.read_text()[-3000:]}")


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


@pytest.fixture(scope="module")
def make_serves(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MakeServe]]:
    """One `make serve` per victim, on two ports, started together: starting is most of each test's time, and the
    two starts overlap while the first test runs."""
    logs = tmp_path_factory.mktemp("make-serve")
    serves: dict[str, MakeServe] = {}
    for i, victim in enumerate(VICTIMS):
        serves[victim] = start_make_serve(
            logs / f"serve-{i}.log", {serve.port for serve in serves.values()}, terminal=victim == "ctrl-c"
        )
    try:
        yield serves
    finally:
        for serve in serves.values():
            for pid in launcher_pids(serve.port):
                os.kill(pid, signal.SIGKILL)
            if serve.make.poll() is None:
                os.killpg(serve.make.pid, signal.SIGKILL)
            serve.make.wait(timeout=30)
            # The launcher lays the server out per port (.cache/truss-server-PORT).
            shutil.rmtree(DEFAULT_LAYOUT_DIR.with_name(f"truss-server-{serve.port}"), ignore_errors=True)


def test_make_serve_serves_the_code_model_by_default(make_serves: dict[str, MakeServe]) -> None:
    """No STARCODER_CHECKPOINT, no STARCODER_TINY: the committed model trained on the standard library's code, whose
    completions are Python (the random-weight tiny models' are gibberish)."""
    serve = make_serves["make"]
    wait_ready(serve)
    assert f"loaded {CODE_MODEL_DIR} " in serve.log.read_text(errors="replace")
    answer = httpx.post(
        f"http://127.0.0.1:{serve.port}/v1/models/model:predict",
        json={"prompt": "def compute_fib(n):", "max_new_tokens": 32},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert looks_like_python(answer.json()["data"]["completion"]), answer.text


@pytest.mark.parametrize("victim", VICTIMS)
def test_killing_make_serve_stops_the_server(victim: str, make_serves: dict[str, MakeServe]) -> None:
    serve = make_serves[victim]
    port = serve.port
    wait_ready(serve)
    assert launcher_pids(port)
    if victim == "make":
        serve.make.send_signal(signal.SIGTERM)
    elif victim == "ctrl-c":
        assert serve.terminal is not None
        os.write(serve.terminal, b"\x03")
        # The terminal sends SIGINT to its foreground job: the launcher and the server, which stop cleanly,
        # and make exits 0, printing no error ("make: *** [serve] Error ...").
        assert serve.make.wait(timeout=40) == 0, serve.log.read_text()[-2000:]
        assert "Error" not in serve.log.read_text()[-500:]
    else:
        os.kill(min(launcher_pids(port)), signal.SIGKILL)  # the launcher, not the server
    deadline = time.monotonic() + 40
    while (launcher_pids(port) or not port_is_free(port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not launcher_pids(port), f"left behind: {launcher_pids(port)}\n{serve.log.read_text()[-2000:]}"
    assert port_is_free(port)
