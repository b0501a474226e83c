"""What passes between the async request handlers and the thread that runs the model."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import threading
from typing import Any


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop sequence was generated
    LENGTH = "length"  # max_new_tokens (or max_time) reached
    EOS = "eos"  # the model ended the text (<|endoftext|> or another end token)
    CANCELLED = "cancelled"  # the client went away


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """A validated request, in token space, ready for the model."""

    prompt_ids: list[int]
    max_new_tokens: int
    # Remaining transformers GenerationConfig parameters (never max_length/min_length: resolved).
    generation_kwargs: dict[str, Any]
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = None  # None: no logprobs; 0: only the chosen token's
    # OpenAI's additive penalties on tokens already generated (not on the prompt); 0 = off.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: TokenLogprob | None = None


@dataclasses.dataclass(frozen=True)
class DoneEvent:
    reason: FinishReason | None = None  # None when failed
    error: Exception | None = None


Event = TokenEvent | DoneEvent

_job_ids = itertools.count(1)


class Job:
    """One generation: the worker thread writes events, the event loop reads them."""

    def __init__(self, plan: GenerationPlan, loop: asyncio.AbstractEventLoop, path: str = "generate") -> None:
        self.id = next(_job_ids)
        self.plan = plan
        self.path = path  # which worker serves it, for the logs
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        """Thread-safe: called from the worker thread."""
        emit_all([(self, event)])

    async def next_events(self) -> list[Event]:
        """Wait for the next event, then take every other one already waiting."""
        events = [await self._events.get()]
        while not self._events.empty():
            events.append(self._events.get_nowait())
        return events

    def cancel(self) -> None:
        self.cancelled.set()


def _deliver(emissions: list[tuple[Job, Event]]) -> None:
    for job, event in emissions:
        job._events.put_nowait(event)


def emit_all(emissions: list[tuple[Job, Event]]) -> None:
    """Thread-safe: hand many events to their jobs with one wake-up per event loop.

    Each wake-up (``call_soon_threadsafe``) writes to the loop's self-pipe; a batch step that
    produces a token for each of 64 requests should pay for that once, not 64 times.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
    for job, event in emissions:
        by_loop.setdefault(job._loop, []).append((job, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for job, _ in batch:
                job.cancelled.set()
