"""Run the real Truss server on this machine, without Docker, exactly as truss lays it out in the image.

    python -m devtools.truss_local            # the tiny code model (devtools/code_model) on CPU, 127.0.0.1:$PORT
    STARCODER_TINY=starcoder python -m devtools.truss_local   # the random-weight tiny StarCoder (or starcoder2)
    STARCODER_CHECKPOINT=/path/or/hub-id python -m devtools.truss_local

truss builds the image's build context from this package (what ``truss push`` uploads), then its
Docker build emulator copies the files to where the Dockerfile puts them (``/app``); we run the
server's own ``main.py`` from there with the environment variables the image would set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TINY_MODEL_DIR = REPO_ROOT / ".cache" / "tiny-starcoder"
# The tiny model trained on the standard library's code (devtools/code_model.py), committed: `make serve`'s default.
CODE_MODEL_DIR = REPO_ROOT / "devtools" / "code_model"
TINY_STARCODER2_DIR = REPO_ROOT / ".cache" / "tiny-starcoder2"
DEFAULT_LAYOUT_DIR = REPO_ROOT / ".cache" / "truss-server"


def local_truss_copy(target: Path, config_path: Path = REPO_ROOT / "config.yaml") -> Path:
    """This truss as ``truss push [--config config_path]`` would upload it (the chosen file becomes the
    archive's config.yaml), minus the build-time weight cache.

    Resolving ``model_cache`` asks the Hugging Face hub for the file list, which a machine without
    internet cannot do, and locally the weights come from STARCODER_CHECKPOINT anyway.
    """
    import yaml
    from truss.util.path import copy_tree_path, load_trussignore_patterns_from_truss_dir

    copy_tree_path(REPO_ROOT, target, ignore_patterns=load_trussignore_patterns_from_truss_dir(REPO_ROOT))
    config = yaml.safe_load(config_path.read_text())
    config.pop("model_cache", None)
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def lay_out_server(layout_dir: Path = DEFAULT_LAYOUT_DIR) -> Path:
    """Return the directory holding the server's ``main.py`` (the image's ``/app``)."""
    from truss.contexts.image_builder.serving_image_builder import ServingImageBuilderContext
    from truss.contexts.local_loader.docker_build_emulator import DockerBuildEmulator

    shutil.rmtree(layout_dir, ignore_errors=True)
    build_dir, fs_dir = layout_dir / "build", layout_dir / "fs"
    build_dir.mkdir(parents=True)
    fs_dir.mkdir(parents=True)
    truss_dir = local_truss_copy(layout_dir / "truss")
    ServingImageBuilderContext.run(truss_dir).prepare_image_build_dir(build_dir)
    DockerBuildEmulator(build_dir / "Dockerfile", build_dir).run(fs_dir)
    app_dir = fs_dir / "app"
    if not (app_dir / "main.py").is_file():
        raise RuntimeError(f"truss did not lay out a server in {app_dir}")
    return app_dir


def server_environment(
    port: int, extra: dict[str, str] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The image's environment, pointed at a tiny model unless STARCODER_CHECKPOINT says otherwise: STARCODER_TINY
    picks it, ``code`` (the default: the committed checkpoint trained on the standard library's code), ``starcoder``
    or ``starcoder2`` (random weights, built in seconds). ``environ``: the environment to start from (default: this
    process's now)."""
    env = dict(os.environ if environ is None else environ)
    if not env.get("STARCODER_CHECKPOINT"):
        from devtools.tiny_model import build_tiny_model, build_tiny_starcoder2

        tiny = env.get("STARCODER_TINY") or "code"
        if tiny == "code":
            env["STARCODER_CHECKPOINT"] = str(CODE_MODEL_DIR)
        elif tiny == "starcoder":
            env["STARCODER_CHECKPOINT"] = str(build_tiny_model(DEFAULT_TINY_MODEL_DIR))
        elif tiny == "starcoder2":
            env["STARCODER_CHECKPOINT"] = str(build_tiny_starcoder2(TINY_STARCODER2_DIR))
        else:
            raise ValueError(f"STARCODER_TINY={tiny!r}: choose code (the default), starcoder or starcoder2")
        env.setdefault("STARCODER_DTYPE", "float32")
        env.setdefault("STARCODER_DEVICE", "cpu")
        # Prefill chunks of 1024 tokens, not config.yaml's 2048 (sized for a GPU's paged flash attention): on a CPU
        # the batch's SDPA attends through a materialised mask. A cold 6,000-token prompt, 16 new tokens:
        # 235 ms in 2048-token chunks, 193 ms in 1024, 206 ms in 512 (`python -m bench.per_token --long
        # --max-batch-tokens N`; docs/benchmarks.md, "Per-token costs").
        env.setdefault("STARCODER_MAX_BATCH_TOKENS", "1024")
    env.update(
        {
            "INFERENCE_SERVER_PORT": str(port),
            "INFERENCE_SERVER_HOST": "127.0.0.1",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "TRANSFORMERS_OFFLINE": env.get("TRANSFORMERS_OFFLINE", "1"),
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.update(extra or {})
    return env


def start_server(
    port: int,
    layout_dir: Path = DEFAULT_LAYOUT_DIR,
    extra_env: dict[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    **popen_kwargs: object,
) -> subprocess.Popen[bytes]:
    app_dir = lay_out_server(layout_dir)
    env = server_environment(port, extra_env, environ)
    # The image copies packages/ to /packages and the server appends that to sys.path; here they sit
    # beside app/.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(app_dir.parent / "packages"), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("loopback_main.py"))], cwd=app_dir, env=env, **popen_kwargs
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerFailed(RuntimeError):
    pass


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
def running_server(
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    ready_timeout_s: float = 180,
    port: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[RunningServer]:
    """Start the server on ``port`` (default: a free one; log in ``workdir/server.log``), wait until it is
    ready, stop it after. ``environ``: as ``server_environment``'s."""
    port = port or free_port()
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process = start_server(
            port,
            layout_dir=workdir / "layout",
            extra_env=extra_env,
            environ=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = RunningServer(f"http://127.0.0.1:{port}", log_path, process)
    with serving(process, f"{server.base_url}/v1/models/model", log_path, "the Truss server", ready_timeout_s):
        yield server


@contextlib.contextmanager
def serving(
    process: subprocess.Popen[bytes], ready_url: str, log_path: Path, name: str, ready_timeout_s: float
) -> Iterator[None]:
    """Wait until ``ready_url`` answers 200 (ServerFailed, with the log's tail, if the process exits first
    or the time runs out); on exit stop the process: SIGTERM, then SIGKILL after 20 s."""
    import httpx

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-4000:]

    deadline = time.monotonic() + ready_timeout_s
    try:
        while True:
            if process.poll() is not None:
                raise ServerFailed(f"{name} exited with {process.returncode}:\n{log_tail()}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"{name} was not ready in {ready_timeout_s:.0f} s:\n{log_tail()}")
            time.sleep(0.1)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this process when its parent exits (make killed, or this
    launcher killed with -9 for the server it starts), so no server is ever left behind."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@contextlib.contextmanager
def own_terminal() -> Iterator[None]:
    """Take the terminal's foreground from make, as a shell does for a job, and give it back on exit.

    Ctrl-C sends SIGINT to the terminal's foreground process group. In make's group, make gets it too, and
    GNU make, whatever its recipe does, then kills itself with SIGINT (status 130) after printing the recipe's
    status. In a group of their own, Ctrl-C reaches only this launcher and the server: the server stops, this
    launcher exits 0, and so does make. Ctrl-Z is ignored (make, out of the foreground, could not be resumed).
    Without a terminal (CI, tests, `make serve &`) nothing changes."""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        yield
        return
    try:
        if os.tcgetpgrp(fd) != os.getpgrp():
            yield  # not the foreground job
            return
        make_group = os.getpgrp()
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may then set the foreground
        signal.signal(signal.SIGTSTP, signal.SIG_IGN)
        os.setpgid(0, 0)
        os.tcsetpgrp(fd, os.getpgrp())
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.tcsetpgrp(fd, make_group)
    finally:
        os.close(fd)


def _server_preexec() -> None:
    die_with_parent()
    signal.signal(signal.SIGTSTP, signal.SIG_IGN)  # Ctrl-Z must not stop the server in the launcher's group


def main() -> None:
    """`make serve`: start the server and pass every stop signal on to it; never leave it running. Stopped by a
    signal (Ctrl-C, SIGTERM, SIGHUP), it exits 0."""
    die_with_parent()
    with own_terminal():
        returncode = _serve()
    sys.exit(returncode)


def _serve() -> int:
    port = int(os.environ.get("PORT", "8080"))
    # A layout per port: two `make serve` on two ports do not build into (and delete) each other's files.
    layout_dir = DEFAULT_LAYOUT_DIR if port == 8080 else DEFAULT_LAYOUT_DIR.with_name(f"truss-server-{port}")
    try:
        process = start_server(port, layout_dir=layout_dir, preexec_fn=_server_preexec)
    except KeyboardInterrupt:  # Ctrl-C while the server was being laid out: nothing runs yet
        return 0

    stopped_by: list[int] = []

    def stop(signum: int, frame: object) -> None:
        # Only signal here: the main thread's wait() below returns once the server has shut down
        # (waiting in the handler would contend with that wait for the child's exit status).
        stopped_by.append(signum)
        process.terminate()
        killer = threading.Timer(20, process.kill)  # a server that ignores SIGTERM
        killer.daemon = True
        killer.start()

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop)
    print(f"Truss server starting on http://127.0.0.1:{port} (Ctrl-C stops it)", flush=True)
    returncode = process.wait()
    # Asked to stop (Ctrl-C, SIGTERM, SIGHUP), the server ends by that signal or the one we passed on: that is
    # a clean stop, exit 0, so make prints no "Error" line. Anything else is the server's own failure.
    if stopped_by and returncode in (0, *(-sig for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP))):
        returncode = 0
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    main()
