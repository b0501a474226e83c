"""The body-size limit, enforced before truss reads a body: an oversized upload is answered 413 and its connection
closed, so the rest of it is never read.

truss's server reads each request's whole body (``Depends(parse_body)``) before it calls the model, so a limit
checked in the model's own code comes after the server has taken in, say, 300 MB. This ASGI middleware runs in
front of truss's application: a declared ``Content-Length`` over the limit is refused at once, and a body without
one is read only up to the limit. The answer says ``Connection: close``, and uvicorn then closes the connection
instead of reading on.

Installing it means wrapping the running uvicorn server's application, which truss builds and starts itself with
no hook for middleware: that use of uvicorn's internals is ``install`` below, with a contract test naming the
pinned version (tests/test_body_limit.py).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

from starcoder_serving.api import envelope
from starcoder_serving.api.metrics import RequestRecord
from starcoder_serving.api.openai_schema import error_body
from starcoder_serving.errors import PayloadTooLarge

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# uvicorn's version whose internals ``install`` relies on (``Server.config.loaded_app``, read by each new connection).
PINNED_UVICORN = "0.55.0"
_OPENAI_PATHS = ("/completions", "/chat/completions")


class BodyLimit:
    """ASGI middleware: requests whose body is over ``limit`` bytes get a 413 in their route's error shape."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                await self._refuse(
                    scope, send, f"The request body is {int(declared)} bytes; the limit is {self.limit}."
                )
                return
            await self.app(scope, receive, send)  # the server stops at the declared length itself
            return
        # No declared length (a chunked upload): read up to the limit before truss does, then hand the body on.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(scope, send, f"The request body is over {self.limit} bytes (the limit).")
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, reason: str) -> None:
        path = str(scope.get("path", ""))
        # Counted and logged like every request (predict's body, unread, cannot tell TGI's shape from the seed's).
        record = RequestRecord(_route_of(path))
        error = PayloadTooLarge(f"{reason} Send a smaller one.")
        # In the route's own error shape, as the route itself would answer it.
        if path.endswith(_OPENAI_PATHS):
            response = JSONResponse(error_body(error.message, error.error_type, error.param), error.status_code)
        else:
            response = envelope.failure(error)
        response.headers["connection"] = "close"  # the rest of the upload is not read: uvicorn closes the connection
        await response(scope, _nothing_to_read, send)
        record.finish(413)


async def _nothing_to_read() -> Message:
    return {"type": "http.disconnect"}


def _route_of(path: str) -> str:
    if path.endswith("/chat/completions"):
        return "chat"
    return "completions" if path.endswith("/completions") else "predict"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1").strip()
    return None


def install(limit: int) -> bool:
    """Put ``BodyLimit`` in front of the running uvicorn server's application (truss's); connections opened from now
    on go through it. False where no uvicorn server runs in this process (the engine used directly)."""
    try:
        import uvicorn
    except ImportError:
        return False
    servers = [item for item in gc.get_objects() if isinstance(item, uvicorn.Server)]
    installed = False
    for server in servers:
        app = getattr(server.config, "loaded_app", None)
        if app is not None and not isinstance(app, BodyLimit):
            server.config.loaded_app = BodyLimit(app, limit)
            installed = True
    if not installed:
        logger.warning("body limit not installed: no running uvicorn server found (uvicorn %s)", uvicorn.__version__)
    return installed
