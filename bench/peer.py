"""The servers of the peer comparison (bench/compare.py): where they listen, and the peer itself.

The peer is transformers' own OpenAI-compatible server, ``transformers serve --continuous-batching``, at
the torch and transformers pins of requirements-dev.txt. It runs from a virtual environment of its own
(``.cache/bench/peer-venv``): its ``[serving]`` extra brings FastAPI, uvicorn and openai versions that
need not agree with truss's, so it is never installed into the project's venv. The benchmark creates
that environment on first use (about a minute: ``pip`` resolves torch the way it does for ``make venv``)
and reuses it while the pins are unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from bench.loadgen import BenchError

REPO_ROOT = Path(__file__).resolve().parent.parent
# Servers the benchmark starts listen here only (other work on a shared machine uses 8080-9999).
BENCH_PORTS = range(18080, 18100)
# The peer's packages pinned as in requirements-dev.txt; transformers with its serving extra.
PEER_PINNED = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub", "accelerate")
PEER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # `transformers serve` asks PyPI for a newer transformers at start-up unless told not to.
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def claim_port(taken: set[int]) -> int:
    """A port of BENCH_PORTS that nothing listens on and that is not in ``taken`` (added to it)."""
    for port in BENCH_PORTS:
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise BenchError(f"no free port in {BENCH_PORTS.start}-{BENCH_PORTS.stop - 1}")


def truss_server_on(
    running: contextlib.ExitStack, port: int, workdir: Path, env: dict[str, str], ready_timeout_s: float = 300
):  # -> devtools.truss_local.RunningServer
    """devtools' ``running_server`` on ``port``, stopped when ``running`` closes; its failure as a BenchError."""
    from devtools.truss_local import ServerFailed, running_server

    try:
        return running.enter_context(running_server(workdir, env, ready_timeout_s=ready_timeout_s, port=port))
    except ServerFailed as failure:
        raise BenchError(str(failure)) from None


def peer_requirements(requirements: Path = REPO_ROOT / "requirements-dev.txt") -> list[str]:
    """``PEER_PINNED`` as pinned in ``requirements``, transformers with ``[serving]``."""
    pins: dict[str, str] = {}
    for line in requirements.read_text().splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s#;]+).*", line)
        if match:
            pins[match.group(1).lower().replace("-", "_")] = match.group(2)
    missing = [name for name in PEER_PINNED if name not in pins]
    if missing:
        raise BenchError(f"{requirements} pins none of {missing}")
    return [f"{name}{'[serving]' if name == 'transformers' else ''}=={pins[name]}" for name in PEER_PINNED]


def ensure_peer_venv(venv: Path, log_path: Path) -> Path:
    """The peer's virtual environment, created and installed unless it already holds these pins; its bin/."""
    requirements = peer_requirements()
    marker = venv / ".installed"
    wanted = "\n".join(requirements) + "\n"
    binary = venv / "bin" / "transformers"
    if marker.is_file() and marker.read_text() == wanted and binary.is_file():
        return venv / "bin"
    print(f"[peer] installing {' '.join(requirements)} into {venv} (log {log_path}; once)", flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_path.open("w") as log:
        for command in (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *requirements],
        ):
            if subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode != 0:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise BenchError(f"installing the peer failed ({' '.join(command[:4])} ...):\n{tail}")
    marker.write_text(wanted)
    print(f"[peer] installed in {time.monotonic() - started:.0f} s", flush=True)
    return venv / "bin"


@dataclasses.dataclass
class RunningPeer:
    base_url: str
    command: list[str]
    log_path: Path


def peer_command(bin_dir: Path, model_dir: Path, port: int) -> list[str]:
    # The checkpoint is preloaded from its directory (requests name it in `model`); the device, dtype and
    # attention implementation are ours (STARCODER_DEVICE=cpu, STARCODER_DTYPE=float32, sdpa); the
    # paged cache's size and batch limits are the peer's own defaults.
    return [
        str(bin_dir / "transformers"),
        "serve",
        str(model_dir),
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--attn-implementation",
        "sdpa",
        "--log-level",
        "warning",
    ]


@contextlib.contextmanager
def running_peer(
    bin_dir: Path, model_dir: Path, port: int, log_path: Path, ready_timeout_s: float = 300
) -> Iterator[RunningPeer]:
    """``transformers serve`` on ``port``, ready (``/health``) on entry, stopped on exit."""
    from devtools.truss_local import ServerFailed, die_with_parent, serving

    command = peer_command(bin_dir, model_dir, port)
    # The project's PYTHONPATH (packages/) is not the peer's business.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | PEER_ENV
    with log_path.open("wb") as log:
        # die_with_parent (as `make serve` uses it): the kernel stops the peer if this process is killed
        # before it can. Started before any request, while the benchmark runs no threads of its own.
        process = subprocess.Popen(
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # noqa: PLW1509
        )
    peer = RunningPeer(f"http://127.0.0.1:{port}", command, log_path)
    try:
        with serving(process, f"{peer.base_url}/health", log_path, "transformers serve", ready_timeout_s):
            yield peer
    except ServerFailed as failure:
        raise BenchError(str(failure)) from None
