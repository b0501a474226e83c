"""One request's life, the same for every protocol: body, parse, validate, capacity, stream or complete,
disconnect, render.

A protocol (predict, TGI, OpenAI completions and chat) only parses its body into its schema and renders what comes
back (``RouteProtocol``); everything between is here, once:

* **Validate** off the event loop when the body is large (``http_body.plan_request``): the engine's one
  validation stage (``engine/validation.py``) refuses whatever can be refused, with the protocol's field names.
* **Refuse before a stream starts**: a stream's response begins only once all its sequences are admitted and the
  first event of generation is back (a token, the end, or an error). A full queue or a failed prefill is then a
  status code, not a stream that ends at once; after that, an error can only end the stream, as its protocol says.
* **Disconnect**: a client that hangs up cancels its generation within one poll interval, streamed or not, and its
  prompt scoring before the scoring's next chunk.
* **Score** each distinct prompt once (``echo`` with ``logprobs``, TGI's ``decoder_input_details``), admitted by its
  tokens like any request (``Engine.scoring_admitted``).
* **Render** a large answer (``ANSWER_ON_LOOP_TOKENS``) in a thread, not on the event loop.
* **Record** each request once, at its end (last byte sent, or the client gone: 499), as metrics and one log line
  (``metrics.RequestRecord``).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from starcoder_serving.api.http_body import plan_request, read_json_object, unless_disconnected
from starcoder_serving.api.metrics import RequestRecord
from starcoder_serving.engine.engine import ClientGone, Engine, StreamTrace
from starcoder_serving.engine.request import GenerationRequest
from starcoder_serving.engine.validation import Choice, ValidRequest
from starcoder_serving.errors import InvalidRequest, ServingError
from starcoder_serving.events import FinishReason, TokenLogprob
from starcoder_serving.text.assembler import Completion, TextDelta


class Parsed(Protocol):
    """A route's schema, parsed: it describes itself in the engine's terms."""

    def to_request(self) -> GenerationRequest: ...


ParsedT = TypeVar("ParsedT", bound=Parsed)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A finished request: one completion per choice (empty for a prompt only scored) and, when asked, each
    prompt's own tokens scored (by prompt index; entries for tokens 1..n-1)."""

    completions: list[Completion]
    prompt_scores: dict[int, Sequence[TokenLogprob]]


@dataclasses.dataclass(frozen=True)
class ChoiceDelta:
    choice: Choice
    delta: TextDelta


@dataclasses.dataclass(frozen=True)
class ChoiceEnd:
    """A streamed choice is over: completed, failed, or (neither) cut off by the client leaving."""

    choice: Choice
    completion: Completion | None = None
    error: ServingError | None = None


ChoiceEvent = ChoiceDelta | ChoiceEnd


class RouteProtocol(abc.ABC, Generic[ParsedT]):
    """How one protocol reads a body and writes its answers."""

    # A body shown to a client whose body is not JSON.
    example: ClassVar[str]
    # The route's name in metrics and logs: predict, tgi, completions, chat.
    route: ClassVar[str]
    stream_media_type: ClassVar[str] = "text/event-stream"
    stream_headers: ClassVar[Mapping[str, str]] = {}

    @abc.abstractmethod
    def parse(self, body: dict[str, Any]) -> ParsedT:
        """The body in this protocol's schema; an ``InvalidRequest`` naming the field otherwise."""

    @abc.abstractmethod
    def error(self, error: ServingError) -> Response:
        """An error before any answer was sent, in this protocol's shape and with its status code."""

    @abc.abstractmethod
    def answer(self, parsed: ParsedT, valid: ValidRequest, outcome: Outcome) -> Any:
        """The whole answer of a request that was not streamed."""

    @abc.abstractmethod
    def stream(self, parsed: ParsedT, valid: ValidRequest, events: AsyncIterator[ChoiceEvent]) -> AsyncIterator[bytes]:
        """The body of a streamed answer. ``events`` ends after a ``ChoiceEnd`` with an error (to be said in the
        protocol's way) or without a completion (the client left: nobody reads on)."""


async def serve(
    protocol: RouteProtocol[Any],
    engine: Engine,
    request: Request,
    pick: Callable[[dict[str, Any]], RouteProtocol[Any]] | None = None,
) -> Any:
    """One request, start to end, recorded once (metrics and a log line) when its answer has been sent. ``pick``:
    the protocol, chosen by the body (predict speaks two); ``protocol`` answers a body that cannot be read."""
    record = RequestRecord(protocol.route)
    try:
        response = await _serve(protocol, engine, request, pick, record)
    except asyncio.CancelledError:  # the server gave up on a client that left
        record.client_left = True
        record.finish(499)
        raise
    except BaseException:
        record.finish(500)  # truss answers 500
        raise
    return record.respond(response)


async def _serve(
    protocol: RouteProtocol[Any],
    engine: Engine,
    request: Request,
    pick: Callable[[dict[str, Any]], RouteProtocol[Any]] | None,
    record: RequestRecord,
) -> Any:
    try:
        body = await read_json_object(request, protocol.example)
        if pick is not None:
            protocol = pick(body)
            record.route = protocol.route
        parsed, valid = await plan_request(request, _plan, protocol, engine, body)
        record.prompt_tokens = valid.prompt_tokens
        if engine.settings.log_request_text:
            record.text = {"prompt": [prompt.rendered.text for prompt in valid.prompts]}
        if valid.request.output.stream:
            return await _start_stream(protocol, engine, request, parsed, valid, record)
        outcome = await unless_disconnected(request, _complete(engine, valid, record.trace))
    except ServingError as error:
        return protocol.error(error)
    if outcome is None:  # the client hung up; nobody reads this
        record.client_left = True
        return protocol.error(InvalidRequest("Client disconnected."))
    if record.text is not None:
        record.text["completion"] = [completion.text for completion in outcome.completions]
    if answer_tokens(valid, outcome) > ANSWER_ON_LOOP_TOKENS:
        # A large answer (a long prompt scored, many choices) is built in a thread: the event loop keeps serving.
        return await asyncio.to_thread(protocol.answer, parsed, valid, outcome)
    return protocol.answer(parsed, valid, outcome)


# Answers with more tokens than this (each rendered with its text, logprob and alternatives) are built off the loop.
ANSWER_ON_LOOP_TOKENS = 2048


def answer_tokens(valid: ValidRequest, outcome: Outcome) -> int:
    """How many token entries an answer renders (each with its text, logprob and alternatives)."""
    scored = sum(len(outcome.prompt_scores.get(choice.prompt.index, ())) for choice in valid.choices)
    return scored + sum(completion.completion_tokens for completion in outcome.completions)


def _plan(protocol: RouteProtocol[ParsedT], engine: Engine, body: dict[str, Any]) -> tuple[ParsedT, ValidRequest]:
    """Parse and validate: a long prompt takes a while to check and tokenize, so a large body's planning runs in a
    worker thread (http_body.plan_request)."""
    parsed = protocol.parse(body)
    return parsed, engine.validate(parsed.to_request())


async def _complete(engine: Engine, valid: ValidRequest, trace: StreamTrace | None = None) -> Outcome:
    scores: dict[int, Sequence[TokenLogprob]] = {}
    if valid.request.output.score_prompt:
        top = valid.request.sampling.logprobs or 0
        # Each distinct prompt is scored once, however many choices (n) or copies of it the request has.
        distinct: dict[tuple[int, ...], tuple[list[int], list[int]]] = {}
        for prompt in valid.prompts:
            distinct.setdefault(tuple(prompt.prompt_ids), (prompt.prompt_ids, []))[1].append(prompt.index)
        # Admitted all together or refused (503 when full) before any is scored; one after the other, so that
        # another request's scoring takes turns with this one's, not with all of them. A client that leaves cancels
        # this, which stops the scoring in progress before its next chunk.
        with engine.scoring_admitted([ids for ids, _ in distinct.values()], generating=len(valid.plans)):
            for prompt_ids, indices in distinct.values():
                scored = await engine.score_prompt(prompt_ids, top)
                for index in indices:
                    scores[index] = scored
    generated = iter(await engine.complete_all(valid.plans, trace))
    completions = [
        next(generated)
        if choice.plan is not None
        else Completion("", FinishReason.LENGTH, len(choice.prompt.prompt_ids), 0)
        for choice in valid.choices
    ]
    return Outcome(completions, scores)


async def _start_stream(
    protocol: RouteProtocol[ParsedT],
    engine: Engine,
    request: Request,
    parsed: ParsedT,
    valid: ValidRequest,
    record: RequestRecord,
) -> StreamingResponse:
    engine.check_capacity(len(valid.plans))  # all of the request's sequences, or none
    events = choice_events(engine, valid.choices, request.is_disconnected, record.trace)
    try:
        first = await anext(events)
    except StopAsyncIteration:  # the client left before anything came back
        first = None
    except BaseException:
        await events.aclose()
        raise
    if isinstance(first, ChoiceEnd) and first.error is not None:
        await events.aclose()
        raise first.error

    if first is None:
        record.client_left = True

    async def resumed() -> AsyncIterator[ChoiceEvent]:
        async with contextlib.aclosing(events):
            if first is not None:
                noted(first)
                yield first
            async for event in events:
                noted(event)
                yield event

    def noted(event: ChoiceEvent) -> None:
        """How a stream ended, for its record: an error said in the stream, or the client gone."""
        if isinstance(event, ChoiceEnd) and event.completion is None:
            if event.error is None:
                record.client_left = True
            else:
                record.failed = event.error.status_code

    return StreamingResponse(
        protocol.stream(parsed, valid, resumed()),
        media_type=protocol.stream_media_type,
        headers=dict(protocol.stream_headers),
    )


async def choice_events(
    engine: Engine, choices: tuple[Choice, ...], client_gone: ClientGone, trace: StreamTrace | None = None
) -> AsyncIterator[ChoiceEvent]:
    """Every choice's events. One choice (the usual request) is read directly; several generate at once, so they
    share the batch, as tasks whose events interleave as they are produced. Ends at a choice's error or a client
    that left (the other choices are cancelled)."""
    if len(choices) == 1:
        async with contextlib.aclosing(_one_choice(engine, choices[0], client_gone, trace)) as events:
            async for event in events:
                yield event
        return
    queue: asyncio.Queue[ChoiceEvent] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        async with contextlib.aclosing(_one_choice(engine, choice, client_gone, trace)) as events:
            async for event in events:
                queue.put_nowait(event)

    tasks = [asyncio.create_task(pump(choice)) for choice in choices]
    running = len(tasks)
    try:
        while running:
            event = await queue.get()
            yield event
            if isinstance(event, ChoiceEnd):
                if event.error is not None or event.completion is None:
                    return
                running -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _one_choice(
    engine: Engine, choice: Choice, client_gone: ClientGone, trace: StreamTrace | None = None
) -> AsyncIterator[ChoiceEvent]:
    assert choice.plan is not None, "validation refuses to stream a prompt that is only scored"
    finished: list[Completion] = []
    try:
        async for delta in engine.stream(
            choice.plan, on_complete=finished.append, client_gone=client_gone, trace=trace
        ):
            yield ChoiceDelta(choice, delta)
    except ServingError as error:
        yield ChoiceEnd(choice, error=error)
        return
    yield ChoiceEnd(choice, completion=finished[0] if finished else None)
