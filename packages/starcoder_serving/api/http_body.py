"""Small HTTP helpers shared by every route: body parsing and client-disconnect handling."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol, TypeVar

from starcoder_serving.errors import InvalidRequest, PayloadTooLarge

T = TypeVar("T")

# 8192 tokens of code are ~30-60 KB of text; 1 MiB leaves room for odd text and long message lists while
# bounding the work (tokenizing 1 MiB takes ~0.7 s of CPU) anyone can ask of the server with one request.
MAX_BODY_BYTES = 1024 * 1024
DISCONNECT_POLL_SECONDS = 0.05


class DisconnectAware(Protocol):
    async def is_disconnected(self) -> bool: ...


class HasBody(Protocol):
    async def body(self) -> bytes: ...


async def read_json_object(request: HasBody, example: str) -> dict[str, Any]:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}.")
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON ({exc}). Send a JSON object like {example}."
        ) from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object like {example}; got a JSON {type(parsed).__name__}."
        )
    return parsed


async def unless_disconnected(request: DisconnectAware, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (with ``work`` cancelled) if the client disconnects first."""

    async def one() -> AsyncIterator[T]:
        yield await work

    async for result in until_disconnected(request, one()):
        return result
    return None


async def until_disconnected(request: DisconnectAware, items: AsyncIterator[T]) -> AsyncIterator[T]:
    """Yield from ``items`` until it ends or the client disconnects; then close ``items``.

    Closing the engine's stream cancels its generation, so a client that hangs up stops using the GPU
    within one poll interval (plus one token).
    """

    async def wait_for_disconnect() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)

    watcher = asyncio.create_task(wait_for_disconnect())
    next_item: asyncio.Future[T] | None = None
    try:
        while True:
            next_item = asyncio.ensure_future(anext(items))
            await asyncio.wait({next_item, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not next_item.done():  # the client went away first
                return
            try:
                item = next_item.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        # Also reached when the server cancels us (e.g. starlette noticed the disconnect first): the
        # pending `anext` must be cancelled before `items` can be closed, or the generation runs on.
        watcher.cancel()
        if next_item is not None and not next_item.done():
            next_item.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await next_item
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            await aclose()
