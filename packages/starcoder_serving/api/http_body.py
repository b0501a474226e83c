"""Small HTTP helpers of the request lifecycle: body parsing, planning off the loop, and client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

from starcoder_serving.engine.engine import wait_until_gone
from starcoder_serving.errors import InvalidRequest, PayloadTooLarge

T = TypeVar("T")

# 8192 tokens of code are ~30-60 KB of text; 1 MiB leaves room for odd text and long message lists while
# bounding the work (tokenizing 1 MiB takes ~0.7 s of CPU) anyone can ask of the server with one request.
MAX_BODY_BYTES = 1024 * 1024


# A body up to this size is planned (parsed, tokenized, checked) on the event loop: a fraction of a millisecond,
# less than a hand-over to a thread costs the batch loop (a thread wake-up and GIL traffic). A larger one (a
# long prompt: tokenizing 1 MiB takes ~0.7 s) is planned in a thread, so that other streams keep flowing.
INLINE_PLANNING_BYTES = 2048


# A body over this size (a long prompt, or many) is parsed and planned one at a time: a few clients sending 1 MiB
# bodies in a loop would otherwise keep every core tokenizing, and a short request would wait behind all of them.
LARGE_BODY_BYTES = 64 * 1024
_large_bodies: asyncio.Semaphore | None = None


async def off_the_loop(size: int, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` for a body of ``size`` bytes: inline when small, else in a worker thread (large bodies one
    at a time)."""
    global _large_bodies
    if size <= INLINE_PLANNING_BYTES:
        return work(*args)
    if size <= LARGE_BODY_BYTES:
        return await asyncio.to_thread(work, *args)
    if _large_bodies is None:
        _large_bodies = asyncio.Semaphore(1)
    async with _large_bodies:
        return await asyncio.to_thread(work, *args)


async def plan_request(request: HasBody, planner: Callable[..., T], *args: Any) -> T:
    """``planner(*args)``, off the event loop by the body's size (its Content-Length; unknown: a worker thread)."""
    declared = request.headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else LARGE_BODY_BYTES
    return await off_the_loop(size, planner, *args)


class DisconnectAware(Protocol):
    async def is_disconnected(self) -> bool: ...


# Deeper than any request shape needs (messages -> content parts -> text is 4); bounds the parser's work.
MAX_JSON_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")
# How a lone surrogate reaches a body: JSON's escape of one (raw UTF-8 cannot encode it). Its absence rules one out.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class HasBody(Protocol):
    headers: Mapping[str, str]

    def stream(self) -> AsyncIterator[bytes]: ...


async def read_body(request: HasBody, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit``: at once from Content-Length,
    else while it arrives, so an oversized upload is never held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; the limit is {limit}.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The request body is over {limit} bytes (the limit); send a smaller one.")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json_object(request: HasBody, example: str) -> dict[str, Any]:
    """The body as a JSON object, checked; a large one is parsed in a worker thread, so that health checks and other
    streams keep their turns on the event loop (a 1 MiB body takes ~40 ms to parse and check)."""
    body = await read_body(request)
    return await off_the_loop(len(body), parse_json_object, body, example)


def parse_json_object(body: bytes, example: str) -> dict[str, Any]:
    try:
        parsed = json.loads(body, parse_constant=_not_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON ({exc}). Send a JSON object like {example}."
        ) from None
    except (RecursionError, ValueError) as exc:  # absurd nesting, or an integer of thousands of digits
        raise InvalidRequest(
            f"The request body is not valid JSON for this API ({str(exc).split(':')[0]}). "
            f"Send a JSON object like {example}."
        ) from None
    if not isinstance(parsed, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object like {example}; got a JSON {type(parsed).__name__}."
        )
    utf16_or_32 = b"\x00" in body[:4]  # json.loads reads those too; the escape search below reads only UTF-8
    if utf16_or_32 or _SURROGATE_ESCAPE.search(body) is not None or not _nests_within(parsed, MAX_JSON_DEPTH):
        _check_strings(parsed, "", 0)  # something to refuse: found again with its path, to name the field
    return parsed


def _nests_within(value: Any, limit: int) -> bool:
    """Whether no value of the body lies deeper than ``limit``, level by level over its containers only: a body of
    512K token ids is checked in ~15 ms, where a walk that names each item's path takes ~120 ms of the event loop."""
    level = [value]
    for _ in range(limit):
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, dict | list)
        ]
        if not level:
            return True
    return not any(level)


def _not_json(constant: str) -> Any:
    """Python's json reads NaN and Infinity, which JSON does not have: no parameter may be NaN or infinite."""
    raise InvalidRequest(f"The request body holds {constant}, which is not a JSON number; send finite numbers.")


def _check_strings(value: Any, path: str, depth: int) -> None:
    """Every string of the body (keys too) must be valid Unicode text: a lone UTF-16 surrogate
    (``"\\ud800"``) cannot be tokenized or encoded back into a JSON answer. Also bounds the nesting."""
    if depth > MAX_JSON_DEPTH:
        raise InvalidRequest(f"The request body nests deeper than {MAX_JSON_DEPTH} levels at `{path or 'body'}`.")
    if isinstance(value, str):
        if _SURROGATE.search(value):
            # The field's name may hold the surrogate itself: escaped, so the answer can be encoded.
            name = _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", path) or "body"
            raise InvalidRequest(
                f"`{name}` contains a lone UTF-16 surrogate (like \\ud800), which is not text; send valid Unicode.",
                param=name,
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            _check_strings(key, child, depth + 1)
            _check_strings(item, child, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_strings(item, f"{path}.{index}" if path else str(index), depth + 1)


async def unless_disconnected(request: DisconnectAware, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None if the client disconnects first. Either way nothing is left running: ``work`` is
    cancelled when the client leaves, or when the server cancels us (starlette noticed the disconnect first)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(wait_until_gone(request.is_disconnected))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() else None
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
