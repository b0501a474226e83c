"""Shared fixtures: the tiny StarCoder-shaped model, an in-process engine, and the real Truss server."""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Iterator, Mapping
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


def settle_the_heap() -> None:
    """Collect, then move every object still alive out of the garbage collector's sight (``gc.freeze``).

    transformers calls ``gc.collect()`` twice whenever a continuous-batching manager stops, and a collection
    walks every object the process holds: with torch, transformers, hypothesis, lm_eval... loaded (~600,000
    objects) each took ~0.3 s, 20 s of a 115 s run. Frozen objects are still freed when their reference counts
    drop to zero, but never by a collection: what is frozen here is what the session and its modules hold."""
    gc.collect()
    gc.freeze()


def pytest_collection_finish(session: pytest.Session) -> None:
    settle_the_heap()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Again at each test module's start (the last one's fixtures are torn down by then): what it imported
    (lm_eval, datasets, matplotlib...) would otherwise be walked by every collection after it."""
    module = getattr(item, "module", None)
    if module is not _last_module[0]:
        _last_module[0] = module
        settle_the_heap()


_last_module: list[object] = [None]


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
    tiny_model_dir: Path,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[RunningServer]:
    """The real Truss server, laid out by truss from this package, serving the tiny model. ``environ``: the
    environment to start from (default: the process's now)."""
    env = {
        "STARCODER_CHECKPOINT": str(tiny_model_dir),
        "STARCODER_DTYPE": "float32",
        "STARCODER_DEVICE": "cpu",
        "TRUSS_SECRET_hf_access_key": SECRET_SENTINEL,
        **(extra_env or {}),
    }
    try:
        with running_server(workdir, env, environ=environ) as running:
            yield running
    except ServerFailed as failure:
        pytest.fail(str(failure))


class ServerInBackground:
    """``launch_server`` on a thread of its own, so that a server's start (~5 s, mostly its process importing torch
    and transformers) goes on while the tests before the first one that needs it run. ``after``: start once that
    server is up (or has failed), not at the same time."""

    def __init__(
        self,
        name: str,
        model_dir: Path,
        workdir: Path,
        extra_env: dict[str, str] | None = None,
        after: ServerInBackground | None = None,
    ) -> None:
        self._ready = threading.Event()
        self._done = threading.Event()
        # The environment as the session began: the server starts while other tests run, and a test's monkeypatched
        # variables (STARCODER_CONTINUOUS_BATCHING=false, say) must not become the shared server's settings.
        self._environ = dict(os.environ)
        self._running: RunningServer | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._serve, args=(model_dir, workdir, extra_env, after), name=name, daemon=True
        )
        self._thread.start()

    def _serve(
        self, model_dir: Path, workdir: Path, extra_env: dict[str, str] | None, after: ServerInBackground | None
    ) -> None:
        try:
            if after is not None:
                after._ready.wait()
            with launch_server(model_dir, workdir, extra_env, self._environ) as running:
                self._running = running
                self._ready.set()
                self._done.wait()
        except BaseException as failure:  # noqa: BLE001 - pytest.fail's exception included: wait() reports it
            self._failure = failure
        finally:
            self._ready.set()

    def wait(self) -> RunningServer:
        """The server, once it answers; the test fails with the server's log if it cannot start."""
        self._ready.wait()
        if self._running is None:
            pytest.fail(f"{self._thread.name}: {self._failure}")
        return self._running

    def request_stop(self) -> None:
        self._done.set()

    def join(self) -> None:
        self._thread.join()


# The StarCoder2 server holds at most this many requests: test_starcoder2 sends one request at a time, and
# test_server_capacity fills it. One server start (~5 s) serves both.
STARCODER2_SERVER_CAPACITY = 2

# The session's servers: fixture name -> (the fixture naming the checkpoint, the extra environment).
SESSION_SERVERS: dict[str, tuple[str, dict[str, str]]] = {
    "server": ("tiny_model_dir", {}),
    "starcoder2_server": ("tiny_starcoder2_dir", {"STARCODER_MAX_QUEUED_REQUESTS": str(STARCODER2_SERVER_CAPACITY)}),
}


@pytest.fixture(scope="session", autouse=True)
def session_servers(request: pytest.FixtureRequest) -> Iterator[dict[str, ServerInBackground]]:
    """Starts, as the session begins, each of SESSION_SERVERS that a collected test needs (through any fixture),
    one after the other in the order the tests need them; all stop when the session ends."""
    started: dict[str, ServerInBackground] = {}
    first_use: dict[str, int] = {}
    for index, item in enumerate(request.session.items):
        for name in SESSION_SERVERS.keys() & set(getattr(item, "fixturenames", ())):
            first_use.setdefault(name, index)
    try:
        previous = None
        for name in sorted(first_use, key=first_use.__getitem__):
            previous = start_session_server(request, started, name, after=previous)
        yield started
    finally:
        for background in started.values():
            background.request_stop()
        for background in started.values():
            background.join()


def start_session_server(
    request: pytest.FixtureRequest,
    started: dict[str, ServerInBackground],
    name: str,
    after: ServerInBackground | None = None,
) -> ServerInBackground:
    model_dir_fixture, extra_env = SESSION_SERVERS[name]
    workdir = request.getfixturevalue("tmp_path_factory").mktemp(f"truss-{name}")
    started[name] = ServerInBackground(name, request.getfixturevalue(model_dir_fixture), workdir, extra_env, after)
    return started[name]


def session_server(request: pytest.FixtureRequest, name: str) -> RunningServer:
    started: dict[str, ServerInBackground] = request.getfixturevalue("session_servers")
    if name not in started:  # asked for at run time (getfixturevalue), not by a collected test's signature
        start_session_server(request, started, name)
    return started[name].wait()


@pytest.fixture(scope="session")
def server(request: pytest.FixtureRequest) -> RunningServer:
    """The real Truss server serving the tiny StarCoder model."""
    return session_server(request, "server")


@pytest.fixture(scope="session")
def starcoder2_server(request: pytest.FixtureRequest) -> RunningServer:
    """The real Truss server on the tiny StarCoder2 checkpoint, admitting STARCODER2_SERVER_CAPACITY requests."""
    return session_server(request, "starcoder2_server")
