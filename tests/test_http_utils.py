"""Client-disconnect handling: whoever notices first, the generation behind a stream is closed."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starcoder_serving.api.http_body import until_disconnected


class Client:
    """A request whose client hangs up when told to."""

    def __init__(self) -> None:
        self.gone = False

    async def is_disconnected(self) -> bool:
        return self.gone


async def endless(closed: list[bool]) -> AsyncIterator[int]:
    try:
        yield 1
        await asyncio.sleep(3600)  # a generation that would go on for an hour
        yield 2
    finally:
        closed.append(True)


def test_a_disconnect_closes_the_source() -> None:
    async def scenario() -> tuple[list[int], list[bool]]:
        client, closed, seen = Client(), [], []
        async for item in until_disconnected(client, endless(closed)):
            seen.append(item)
            client.gone = True
        return seen, closed

    assert asyncio.run(scenario()) == ([1], [True])


def test_cancelling_the_consumer_also_closes_the_source() -> None:
    """Starlette cancels the response task when it sees the disconnect before our watcher does."""

    async def scenario() -> list[bool]:
        closed: list[bool] = []

        async def consume() -> None:
            async for _ in until_disconnected(Client(), endless(closed)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return closed

    assert asyncio.run(scenario()) == [True]
