"""Client-disconnect handling: whoever notices first, the work behind a request is cancelled."""

from __future__ import annotations

import asyncio
import contextlib

from starcoder_serving.api.http_body import unless_disconnected


class Client:
    """A request whose client hangs up when told to."""

    def __init__(self) -> None:
        self.gone = False

    async def is_disconnected(self) -> bool:
        return self.gone


async def an_hour(cancelled: list[bool]) -> int:
    try:
        await asyncio.sleep(3600)  # a generation that would go on for an hour
    except asyncio.CancelledError:
        cancelled.append(True)
        raise
    return 1


def test_a_disconnect_cancels_the_work() -> None:
    async def scenario() -> tuple[int | None, list[bool]]:
        client, cancelled = Client(), []
        asyncio.get_running_loop().call_later(0.1, setattr, client, "gone", True)
        return await unless_disconnected(client, an_hour(cancelled)), cancelled

    assert asyncio.run(scenario()) == (None, [True])


def test_work_that_ends_first_gives_its_result() -> None:
    async def quick() -> int:
        return 7

    assert asyncio.run(unless_disconnected(Client(), quick())) == 7


def test_cancelling_the_waiter_also_cancels_the_work() -> None:
    """Starlette cancels the response task when it sees the disconnect before our watcher does."""

    async def scenario() -> list[bool]:
        cancelled: list[bool] = []
        task = asyncio.create_task(unless_disconnected(Client(), an_hour(cancelled)))
        await asyncio.sleep(0.2)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return cancelled

    assert asyncio.run(scenario()) == [True]
