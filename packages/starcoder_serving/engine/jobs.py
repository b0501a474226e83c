"""What passes between the async request handlers and the thread that runs the model."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import threading
import time
import weakref

from starcoder_serving.engine.sampling_params import SamplingParams
from starcoder_serving.events import DoneEvent, Event, FinishReason


@dataclasses.dataclass(frozen=True)
class GenerationPlan:
    """One sequence of a validated request, in token space, ready for either worker.

    ``sampling`` is resolved: one sequence (``n`` = 1, its own seed), ``max_new_tokens`` set, and
    ``max_length`` / ``min_length`` turned into new-token counts for this prompt.
    """

    prompt_ids: list[int]
    sampling: SamplingParams

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def max_new_tokens(self) -> int:
        assert self.sampling.max_new_tokens is not None
        return self.sampling.max_new_tokens

    @property
    def stop(self) -> tuple[str, ...]:
        return self.sampling.stop

    @property
    def top_logprobs(self) -> int | None:
        """None: no logprobs; 0: only the chosen token's; k: also the k most likely."""
        return self.sampling.logprobs


_job_ids = itertools.count(1)


class Job:
    """One generation: the worker thread writes events, the event loop reads them."""

    def __init__(
        self, plan: GenerationPlan, loop: asyncio.AbstractEventLoop, path: str = "generate", *, quiet: bool = False
    ) -> None:
        self.id = next(_job_ids)
        self.plan = plan
        self.path = path  # which worker serves it, for the logs
        # When its first token was produced (time.perf_counter), set once by the worker thread: time to first token.
        self.first_token_at: float | None = None
        # Nobody reads the text before the end (a non-streamed request without stop sequences): a worker may hold
        # the tokens back and send them in one event with the DoneEvent, sparing the event loop a wake-up, a
        # detokenizer step and a queue hop per token.
        self.quiet = quiet
        self.cancelled = threading.Event()
        self._loop = loop
        # Events not yet read, and the reader's future while it waits: lighter than an asyncio.Queue, which
        # matters once per streamed token.
        self._pending: list[Event] = []
        self._waiter: asyncio.Future[None] | None = None

    def emit(self, event: Event) -> None:
        """Thread-safe: called from the worker thread."""
        emit_all([(self, event)])

    async def next_events(self) -> list[Event]:
        """Wait for the next event, then take every other one already waiting."""
        while not self._pending:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        events, self._pending = self._pending, []
        return events

    def _put(self, event: Event) -> None:
        """On the event loop."""
        self._pending.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def cancel(self) -> None:
        self.cancelled.set()

    def abandon(self) -> None:
        """On the event loop: the consumer left. Cancel the generation and wake the reader at once, which ends
        its stream without a completion (a worker ends a cancelled job the same way, a step later)."""
        self.cancelled.set()
        self._put(DoneEvent(FinishReason.CANCELLED))


def _deliver(emissions: list[tuple[Job, Event]]) -> None:
    for job, event in emissions:
        job._put(event)


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


class PacedDelivery:
    """Thread-safe: hands a worker's events to their event loops, waking each loop at most once per ``interval_s``
    unless an event is ``urgent``.

    Waking an event loop from the batch thread costs far more than the events themselves: the woken thread and
    the batch loop hand the GIL back and forth, about 0.25 ms of the batch's time per wake-up on a 2-core
    machine (docs/benchmarks.md, "Per-token costs"), as much as a whole step of a small model. Streams whose
    steps come faster than ``interval_s`` therefore get their tokens a few steps at a time. A job's first token
    and its end are urgent (time to first token, and the end of a request, are never held), and so is
    anything that may no longer wait. Held events keep their order: a later urgent event flushes them first.
    When steps are slower than ``interval_s`` (a large model on a GPU) every step is delivered at once.
    """

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._held: dict[asyncio.AbstractEventLoop, list[tuple[Job, Event]]] = {}
        self._woken: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, float] = weakref.WeakKeyDictionary()

    def emit(self, emissions: list[tuple[Job, Event]], urgent: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            for emission in emissions:
                self._held.setdefault(emission[0]._loop, []).append(emission)
            due = [loop for loop in self._held if urgent or now - self._woken.get(loop, -math.inf) >= self._interval_s]
            for loop in due:
                self._woken[loop] = now
                # Under the lock: two threads' deliveries reach a loop in the order they were taken.
                emit_all(self._held.pop(loop))

    def flush_due(self) -> None:
        """Deliver what has waited ``interval_s`` (the worker's watcher calls this while no step emits)."""
        self.emit([])
