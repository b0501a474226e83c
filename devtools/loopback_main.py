"""Start truss's ``main.py`` bound to 127.0.0.1 instead of its hard-coded 0.0.0.0.

The image listens on every interface because Baseten's proxy sits in front of it; a laptop or CI
runner has no such proxy, so the local server must not be reachable from the network.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys

import uvicorn

_original_init = uvicorn.Config.__init__


@functools.wraps(_original_init)
def _loopback_init(self: uvicorn.Config, *args: object, **kwargs: object) -> None:
    kwargs["host"] = os.environ.get("INFERENCE_SERVER_HOST", "127.0.0.1")
    _original_init(self, *args, **kwargs)


uvicorn.Config.__init__ = _loopback_init  # type: ignore[method-assign]
sys.argv = ["main.py"]
sys.path.insert(0, os.getcwd())  # as `python main.py` would: the server imports its siblings
runpy.run_path("main.py", run_name="__main__")
