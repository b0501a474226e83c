"""Shared fixtures: the tiny StarCoder-shaped model, an in-process engine, and the real Truss server."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from starcoder_serving.engine.engine import Engine
from starcoder_serving.settings import ServingSettings

from devtools.tiny_model import build_tiny_model, build_tiny_starcoder2
from devtools.truss_local import (
    DEFAULT_TINY_MODEL_DIR,
    REPO_ROOT,
    TINY_STARCODER2_DIR,
    RunningServer,
    ServerFailed,
    running_server,
)

DATA_DIR = REPO_ROOT / "data"
# Planted as the hf_access_key secret of the test server: it must never come back out.
SECRET_SENTINEL = "hf_SENTINEL_do_not_leak_6f1c2a"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return build_tiny_model(DEFAULT_TINY_MODEL_DIR)


@pytest.fixture(scope="session")
def tiny_starcoder2_dir() -> Path:
    """StarCoder2's architecture: grouped-query attention, RoPE, 16,384 positions, a 512-token sliding window."""
    return build_tiny_starcoder2(TINY_STARCODER2_DIR)


def tiny_settings(tiny_model_dir: Path, **overrides: object) -> ServingSettings:
    return ServingSettings.model_validate(
        {"checkpoint": str(tiny_model_dir), "dtype": "float32", "device": "cpu", **overrides}
    )


@pytest.fixture(scope="session")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    engine = Engine.load(tiny_settings(tiny_model_dir), DATA_DIR)
    yield engine
    engine.shutdown()


@contextlib.contextmanager
def launch_server(
    tiny_model_dir: Path, workdir: Path, extra_env: dict[str, str] | None = None
) -> Iterator[RunningServer]:
    """The real Truss server, laid out by truss from this package, serving the tiny model."""
    env = {
        "STARCODER_CHECKPOINT": str(tiny_model_dir),
        "STARCODER_DTYPE": "float32",
        "STARCODER_DEVICE": "cpu",
        "TRUSS_SECRET_hf_access_key": SECRET_SENTINEL,
        **(extra_env or {}),
    }
    try:
        with running_server(workdir, env) as running:
            yield running
    except ServerFailed as failure:
        pytest.fail(str(failure))


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with launch_server(tiny_model_dir, tmp_path_factory.mktemp("truss-server")) as running:
        yield running
