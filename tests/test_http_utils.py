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


def test_large_bodies_are_planned_one_at_a_time_and_small_ones_inline() -> None:
    """A few clients looping on 1 MiB bodies must not keep every core busy ahead of a short request (issue 22)."""
    import threading
    import time

    from starcoder_serving.api.http_body import INLINE_PLANNING_BYTES, LARGE_BODY_BYTES, off_the_loop

    running, most, lock = [0], [0], threading.Lock()

    def work() -> str:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        return threading.current_thread().name

    async def scenario() -> tuple[list[str], str, str]:
        large = await asyncio.gather(*(off_the_loop(LARGE_BODY_BYTES + 1, work) for _ in range(4)))
        return large, await off_the_loop(INLINE_PLANNING_BYTES, work), await off_the_loop(LARGE_BODY_BYTES, work)

    large, small, medium = asyncio.run(scenario())
    assert most[0] == 1 and all(name != "MainThread" for name in large)
    assert small == "MainThread" and medium != "MainThread"
