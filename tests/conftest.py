"""Shared fixtures: the tiny StarCoder-shaped model, an in-process engine, and the real Truss server."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.truss_local import DEFAULT_TINY_MODEL_DIR, REPO_ROOT, start_server
from starcoder_serving.engine import Engine
from starcoder_serving.settings import ServingSettings
from starcoder_serving.tiny_model import build_tiny_model

DATA_DIR = REPO_ROOT / "data"
# Planted as the hf_access_key secret of the test server: it must never come back out.
SECRET_SENTINEL = "hf_SENTINEL_do_not_leak_6f1c2a"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return build_tiny_model(DEFAULT_TINY_MODEL_DIR)


def tiny_settings(tiny_model_dir: Path, **overrides: object) -> ServingSettings:
    return ServingSettings.model_validate(
        {"checkpoint": str(tiny_model_dir), "dtype": "float32", "device": "cpu", **overrides}
    )


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(tiny_settings(tiny_model_dir), DATA_DIR)
    yield engine
    engine.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class RunningServer:
    base_url: str
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def predict_url(self) -> str:
        return f"{self.base_url}/v1/models/model:predict"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def launch_server(tiny_model_dir: Path, workdir: Path, extra_env: dict[str, str] | None = None) -> Iterator[RunningServer]:
    """The real Truss server, laid out by truss from this package, serving the tiny model."""
    port = _free_port()
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = start_server(
            port,
            layout_dir=workdir / "layout",
            extra_env={
                "STARCODER_CHECKPOINT": str(tiny_model_dir),
                "STARCODER_DTYPE": "float32",
                "STARCODER_DEVICE": "cpu",
                "TRUSS_SECRET_hf_access_key": SECRET_SENTINEL,
                **(extra_env or {}),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = RunningServer(f"http://127.0.0.1:{port}", log_path, process)
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the Truss server exited with {process.returncode}:\n{running.log()[-4000:]}")
            try:
                if httpx.get(f"{running.base_url}/v1/models/model", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Truss server did not become ready:\n{running.log()[-4000:]}")
            time.sleep(0.5)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with launch_server(tiny_model_dir, tmp_path_factory.mktemp("truss-server")) as running:
        yield running
