"""How workers' events reach the event loop: ``PacedDelivery`` (engine/jobs.py) and the job's reader.

A wake-up of the event loop costs the batch thread more than the events it carries, so a stream's tokens are
handed over at most every ``interval_s``; a request's first token and its end never wait, and nothing is
lost or reordered."""

from __future__ import annotations

import asyncio
import threading

from starcoder_serving.engine.jobs import GenerationPlan, Job, PacedDelivery
from starcoder_serving.engine.sampling_params import SamplingParams
from starcoder_serving.events import DoneEvent, Event, FinishReason, TokenEvent

PLAN = GenerationPlan([1, 2, 3], SamplingParams(max_new_tokens=8))


async def read_until_done(job: Job) -> list[Event]:
    events: list[Event] = []
    while not any(isinstance(event, DoneEvent) for event in events):
        events += await job.next_events()
    return events


def test_held_tokens_arrive_in_order_before_the_urgent_end() -> None:
    async def scenario() -> tuple[list[Event], int]:
        job = Job(PLAN, asyncio.get_running_loop())
        delivery = PacedDelivery(interval_s=60.0)  # nothing is due by time alone in this test
        delivery.emit([(job, TokenEvent((5,)))], urgent=True)  # a first token: at once
        first = await job.next_events()
        for token in (6, 7, 8):  # from another thread, as the batch loop sends them
            thread = threading.Thread(target=delivery.emit, args=([(job, TokenEvent((token,)))],))
            thread.start()
            thread.join()
        await asyncio.sleep(0.05)
        held = len(job._pending)  # what reached the loop while tokens were held
        delivery.emit([(job, DoneEvent(FinishReason.LENGTH))], urgent=True)
        return first + await read_until_done(job), held

    events, held = asyncio.run(scenario())
    assert held == 0
    assert events == [
        TokenEvent((5,)),
        TokenEvent((6,)),
        TokenEvent((7,)),
        TokenEvent((8,)),
        DoneEvent(FinishReason.LENGTH),
    ]


def test_held_tokens_are_delivered_once_the_interval_has_passed() -> None:
    async def scenario() -> tuple[list[Event], list[Event]]:
        job = Job(PLAN, asyncio.get_running_loop())
        delivery = PacedDelivery(interval_s=0.02)
        delivery.emit([(job, TokenEvent((5,)))], urgent=True)
        delivery.emit([(job, TokenEvent((6,)))])  # within the interval: held
        await asyncio.sleep(0.03)
        held = list(job._pending)
        delivery.flush_due()  # what the worker's watcher does while no step emits
        return held, await asyncio.wait_for(job.next_events(), timeout=5)

    held, delivered = asyncio.run(scenario())
    assert held == [TokenEvent((5,))]
    assert delivered == [TokenEvent((5,)), TokenEvent((6,))]


def test_without_an_interval_every_emission_is_delivered_at_once() -> None:
    async def scenario() -> list[Event]:
        job = Job(PLAN, asyncio.get_running_loop())
        delivery = PacedDelivery(interval_s=0.0)
        delivery.emit([(job, TokenEvent((5,)))])
        return await asyncio.wait_for(job.next_events(), timeout=5)

    assert asyncio.run(scenario()) == [TokenEvent((5,))]


def test_abandoning_a_job_wakes_its_reader_and_cancels_it() -> None:
    async def scenario() -> tuple[list[Event], bool]:
        job = Job(PLAN, asyncio.get_running_loop())
        reader = asyncio.create_task(job.next_events())
        await asyncio.sleep(0.01)
        job.abandon()
        return await asyncio.wait_for(reader, timeout=5), job.cancelled.is_set()

    events, cancelled = asyncio.run(scenario())
    assert events == [DoneEvent(FinishReason.CANCELLED)] and cancelled
