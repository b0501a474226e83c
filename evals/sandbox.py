"""Run one untrusted Python program (a model's completion plus HumanEval's tests) and say whether it passed.

Each program runs in a fresh ``python -I`` subprocess, in its own temporary directory (deleted after), with:

* a wall-clock timeout; the whole process group is killed when it expires;
* resource limits: address space, CPU seconds, file size, no core dumps;
* an environment scrubbed to a minimal ``PATH``: no API key or Hugging Face token of the caller is visible;
* no network: where unprivileged user namespaces work (probed once), under ``unshare -rn``, an empty
  network namespace with no interface but a down loopback;
* an audit hook, installed before the program's first line, that refuses sockets, subprocesses, exec,
  fork, ``os.system`` and ctypes.

The namespace and the resource limits are the walls. Audit hooks are not a security boundary (CPython's
documentation says so: native code can bypass them); here they turn the common accidents and the easy
attacks into a clean failure. The program can still read files the user can read: run evaluations of
models you do not trust inside a container, as the BigCode harness advises.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Literal

import pydantic

Outcome = Literal["passed", "failed", "timed out"]

MEMORY_LIMIT_BYTES = 1 << 30
FILE_SIZE_LIMIT_BYTES = 16 << 20
OUTPUT_LIMIT_CHARS = 2000

# Runs first, in the child: the limits are set here rather than in a preexec_fn, which is unsafe in a
# threaded parent (programs run from a thread pool); the hook cannot be removed once added. Then the program runs from its file, so
# tracebacks name the program's own line numbers.
_LAUNCHER = """\
import resource, sys
_memory, _cpu, _fsize = (int(v) for v in sys.argv[2:5])
resource.setrlimit(resource.RLIMIT_AS, (_memory, _memory))
resource.setrlimit(resource.RLIMIT_CPU, (_cpu, _cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (_fsize, _fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
_REFUSED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "os.forkpty", "os.kill", "os.killpg", "ctypes.", "pty.")
def _guard(event, args):
    if event.startswith(_REFUSED) or (event == "import" and args[0] in ("ctypes", "_ctypes")):
        raise PermissionError(f"sandbox: {event} is not allowed")
sys.addaudithook(_guard)
del _guard
_path = sys.argv[1]
with open(_path, encoding="utf-8") as _file:
    _code = compile(_file.read(), _path, "exec")
exec(_code, {"__name__": "__main__"})
"""


class Execution(pydantic.BaseModel):
    outcome: Outcome
    # The exception line of a failure ("AssertionError", "NameError: name 'x' is not defined").
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"

    def describe(self) -> str:
        return f"{self.outcome}: {self.detail}" if self.detail else self.outcome


@functools.cache
def network_namespace_available() -> bool:
    """True when ``unshare -rn`` can give the child an empty network namespace (user namespaces enabled)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], check=False, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _last_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1][:OUTPUT_LIMIT_CHARS] if lines else ""


def run_program(source: str, timeout_s: float = 3.0) -> Execution:
    """Execute ``source``; it passes when it exits 0 within the timeout."""
    workdir = Path(tempfile.mkdtemp(prefix="humaneval-"))
    try:
        program = workdir / "program.py"
        program.write_text(source, encoding="utf-8")
        limits = (MEMORY_LIMIT_BYTES, int(timeout_s) + 1, FILE_SIZE_LIMIT_BYTES)
        command = [sys.executable, "-I", "-c", _LAUNCHER, str(program), *map(str, limits)]
        if network_namespace_available():
            command = ["unshare", "-rn", *command]
        child = subprocess.Popen(
            command,
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed as a whole
        )
        try:
            _, stderr = child.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.communicate()
            return Execution(outcome="timed out")
        if child.returncode == 0:
            return Execution(outcome="passed")
        if child.returncode == -signal.SIGXCPU:
            return Execution(outcome="timed out")
        detail = _last_error_line(stderr.decode("utf-8", errors="replace")) or f"exit status {child.returncode}"
        return Execution(outcome="failed", detail=detail)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
