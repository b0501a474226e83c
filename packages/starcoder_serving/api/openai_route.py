"""The OpenAI-compatible routes: ``/v1/completions`` and ``/v1/chat/completions``.

Same engine, validation and prompt building as ``predict``; only the request and response shapes
differ. Everything that can be refused is refused before a stream starts (400 with OpenAI's error
object); an error after that (e.g. the GPU ran out of memory) ends the stream with an ``error``
event, which OpenAI's clients raise as ``APIError``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from starcoder_serving.api.http_body import plan_request, read_json_object, unless_disconnected
from starcoder_serving.api.openai_schema import (
    FINISH_REASONS,
    SamplingRequest,
    error_body,
    parse_chat_request,
    parse_completion_request,
)
from starcoder_serving.engine.engine import Completion, Engine
from starcoder_serving.engine.jobs import FinishReason, GenerationPlan, TokenLogprob
from starcoder_serving.errors import InvalidRequest, ServingError
from starcoder_serving.text.prompts import RenderedPrompt

logger = logging.getLogger(__name__)

COMPLETION_EXAMPLE = '{"model": "starcoder", "prompt": "def compute_fib(n):", "max_tokens": 64}'
CHAT_EXAMPLE = '{"model": "starcoder", "messages": [{"role": "user", "content": "Write a fib function"}]}'
# JSON has no -inf; OpenAI-compatible servers clamp to this (tokens cut off by top-k/top-p).
MIN_LOGPROB = -9999.0


def error_response(error: ServingError) -> JSONResponse:
    return JSONResponse(status_code=error.status_code, content=error_body(error.message, error.error_type, error.param))


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


# ---- token text, for logprobs ----


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE token characters back to bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


class TokenTexts:
    """Each token's bytes and its text as OpenAI shows it ("bytes:\\xe2" for a partial character)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special = set(tokenizer.all_special_ids)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per server
    def bytes_of(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_decoder()
        if piece is not None and token_id not in self._special and all(char in decoder for char in piece):
            return bytes(decoder[char] for char in piece)
        return str(self._tokenizer.decode([token_id])).encode("utf-8")

    def text_of(self, token_id: int) -> str:
        raw = self.bytes_of(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _clamp(logprob: float) -> float:
    return max(MIN_LOGPROB, logprob)


class LegacyLogprobs:
    """``/v1/completions`` logprobs: tokens, token_logprobs, top_logprobs, text_offset (into the choice's text)."""

    def __init__(self, texts: TokenTexts, start_offset: int) -> None:
        self._texts = texts
        self._offset = start_offset
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def render_prompt(self, first_token: int, scores: list[TokenLogprob]) -> dict[str, list[Any]]:
        """The prompt's tokens: the first has nothing before it to be scored against (null)."""
        out = {
            "tokens": [self._texts.text_of(first_token)],
            "token_logprobs": [None],
            "top_logprobs": [None],
            "text_offset": [self._offset],
        }
        self._offset += len(self._utf8.decode(self._texts.bytes_of(first_token)))
        for field, values in self.render(tuple(scores)).items():
            out[field] += values
        return out

    def render(self, logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in logprobs:
            out["tokens"].append(self._texts.text_of(entry.token_id))
            out["token_logprobs"].append(_clamp(entry.logprob))
            # As OpenAI: the top k, plus the chosen token (so up to k + 1 entries).
            top = {self._texts.text_of(token_id): _clamp(lp) for token_id, lp in entry.top}
            top.setdefault(self._texts.text_of(entry.token_id), _clamp(entry.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(self._offset)
            self._offset += len(self._utf8.decode(self._texts.bytes_of(entry.token_id)))
        return out


def chat_logprobs(texts: TokenTexts, logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": texts.text_of(token_id), "logprob": _clamp(logprob), "bytes": list(texts.bytes_of(token_id))}

    return {
        "content": [
            {**item(entry.token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}
            for entry in logprobs
        ],
        "refusal": None,
    }


# ---- one request, planned ----


@dataclasses.dataclass(frozen=True)
class ChoicePlan:
    index: int
    plan: GenerationPlan | None  # None: max_tokens 0, the prompt is only scored
    echo: str = ""  # text put before the completion (completions' echo)
    # Prompt scoring (echo with logprobs): the prompt's ids and how many alternatives each token lists.
    scored_prompt: tuple[int, ...] = ()
    top_logprobs: int | None = None


@dataclasses.dataclass
class PlannedRequest:
    """A validated OpenAI request: its choices as engine plans, and how to shape the answer."""

    chat: bool
    model: str
    choices: list[ChoicePlan]
    prompt_tokens: int  # each prompt counted once, however many choices it has
    stream: bool
    include_usage: bool
    # Filled before generation for choices that score their prompt: entries for tokens 1..n-1.
    prompt_scores: dict[int, list[TokenLogprob]] = dataclasses.field(default_factory=dict)
    id: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def envelope(self, streamed: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if streamed else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


@dataclasses.dataclass(frozen=True)
class _ChoiceEnd:
    """A streamed choice is over: completed, failed, or (neither) cut off by the client leaving."""

    completion: Completion | None = None
    error: ServingError | None = None


class OpenAIService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.texts = TokenTexts(engine.tokenizer)

    # ---- routes ----

    async def completions(self, request: Request) -> Response:
        return await self._handle(request, COMPLETION_EXAMPLE, self.plan_completion)

    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, CHAT_EXAMPLE, self.plan_chat)

    async def _handle(
        self, request: Request, example: str, planner: Callable[[dict[str, Any]], PlannedRequest]
    ) -> Response:
        try:
            body = await read_json_object(request, example)
            # Tokenizing a long prompt takes a while: it is planned off the event loop (http_body.plan_request).
            job = await plan_request(request, planner, body)
            if job.stream:
                # Refuse now, with a status code, what would otherwise only end the stream early.
                self.engine.check_capacity(len(job.choices))
                # Validation is over: from here on errors can only end the stream.
                return StreamingResponse(
                    self._events(request, job),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            for choice in job.choices:
                if choice.scored_prompt:  # one forward pass over the prompt, before generating
                    job.prompt_scores[choice.index] = await self.engine.score_prompt(
                        list(choice.scored_prompt), choice.top_logprobs or 0
                    )
            plans = [choice.plan for choice in job.choices if choice.plan is not None]
            generated = await unless_disconnected(request, self.engine.complete_all(plans))
            completions = None if generated is None else self._with_unscored(job, generated)
        except ServingError as error:
            return error_response(error)
        if completions is None:  # the client hung up; nobody reads this
            return error_response(InvalidRequest("Client disconnected."))
        return JSONResponse(self._response(job, completions))

    # ---- planning: everything refusable is refused here ----

    def plan_completion(self, body: dict[str, Any]) -> PlannedRequest:
        parsed = parse_completion_request(body)
        prompts = parsed.prompts()
        vocab = self.engine.vocab_size
        choices: list[ChoicePlan] = []
        prompt_tokens = 0
        for prompt_index, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                rendered = (
                    self.engine.render_fim(prompt, parsed.suffix, param="suffix")
                    if parsed.suffix is not None
                    else RenderedPrompt(prompt)
                )
                prompt_ids = self.engine.tokenize(rendered.text)
                echo = prompt if parsed.echo else ""
            else:
                bad = [i for i in prompt if i >= vocab]
                if bad:
                    raise InvalidRequest(
                        f"`prompt` names token ids {bad[:5]} outside the vocabulary (0..{vocab - 1}).", param="prompt"
                    )
                rendered, prompt_ids = RenderedPrompt(""), list(prompt)
                echo = str(self.engine.tokenizer.decode(prompt_ids)) if parsed.echo else ""
            n = parsed.choices_per_prompt
            plans: list[GenerationPlan | None] = (
                [None] * n
                if parsed.max_tokens == 0
                else list(self._plans(parsed, prompt_ids, rendered, parsed.top_logprobs))
            )
            scored = tuple(prompt_ids) if parsed.scores_prompt else ()
            base = prompt_index * len(plans)
            choices.extend(
                ChoicePlan(base + i, plan, echo, scored, parsed.top_logprobs) for i, plan in enumerate(plans)
            )
            prompt_tokens += len(prompt_ids)
        return self._job(parsed, chat=False, choices=choices, prompt_tokens=prompt_tokens)

    def plan_chat(self, body: dict[str, Any]) -> PlannedRequest:
        parsed = parse_chat_request(body)
        rendered = self.engine.chat.render(parsed.template_messages())
        prompt_ids = self.engine.tokenize(rendered.text)
        plans = self._plans(parsed, prompt_ids, rendered, parsed.chosen_logprobs)
        choices = [ChoicePlan(i, plan) for i, plan in enumerate(plans)]
        return self._job(parsed, chat=True, choices=choices, prompt_tokens=len(prompt_ids))

    def _plans(
        self, parsed: SamplingRequest, prompt_ids: list[int], rendered: RenderedPrompt, top_logprobs: int | None
    ) -> list[GenerationPlan]:
        sampling = parsed.sampling_params(top_logprobs, rendered.implied_stop)
        try:
            # n independent sequences (seed, seed+1, ... when seeded), decoded together in the batch.
            return self.engine.plan(prompt_ids, sampling)
        except InvalidRequest as error:
            raise _openai_names(error) from None

    def _job(
        self, parsed: SamplingRequest, *, chat: bool, choices: list[ChoicePlan], prompt_tokens: int
    ) -> PlannedRequest:
        return PlannedRequest(
            chat=chat,
            model=self.engine.model_name,
            choices=choices,
            prompt_tokens=prompt_tokens,
            stream=parsed.streaming,
            include_usage=parsed.include_usage,
        )

    # ---- running ----

    @staticmethod
    def _with_unscored(job: PlannedRequest, generated: list[Completion]) -> list[Completion]:
        """One completion per choice: a choice with nothing to generate (max_tokens 0) has an empty one."""
        remaining = iter(generated)
        return [
            next(remaining)
            if choice.plan is not None
            else Completion("", FinishReason.LENGTH, len(choice.scored_prompt), 0)
            for choice in job.choices
        ]

    def _response(self, job: PlannedRequest, completions: list[Completion]) -> dict[str, Any]:
        choices: list[dict[str, Any]] = []
        for choice, completion in zip(job.choices, completions):
            finish_reason = FINISH_REASONS[completion.finish_reason.value]
            logprobs: dict[str, Any] | None = None
            if choice.scored_prompt:
                # The prompt's tokens first (the first one has no logprob, as OpenAI and vLLM show it), then
                # the generated ones; text_offset indexes the whole text, prompt included.
                legacy = LegacyLogprobs(self.texts, 0)
                logprobs = legacy.render_prompt(choice.scored_prompt[0], job.prompt_scores[choice.index])
                for field, values in legacy.render(completion.token_logprobs).items():
                    logprobs[field] += values
            elif choice.plan is not None and choice.plan.top_logprobs is not None:
                logprobs = (
                    chat_logprobs(self.texts, completion.token_logprobs)
                    if job.chat
                    else LegacyLogprobs(self.texts, len(choice.echo)).render(completion.token_logprobs)
                )
            if job.chat:
                message = {"role": "assistant", "content": completion.text}
                choices.append(
                    {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
                )
            else:
                text = choice.echo + completion.text
                choices.append(
                    {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
                )
        usage = job.usage(sum(c.completion_tokens for c in completions))
        return {**job.envelope(streamed=False), "choices": choices, "usage": usage}

    async def _events(self, request: Request, job: PlannedRequest) -> AsyncIterator[bytes]:
        """Server-sent events: all choices generate at once (so they share the batch) and their chunks
        interleave, each carrying its choice's index; then usage, then [DONE]."""
        completion_tokens = 0
        try:
            async with contextlib.aclosing(self._all_choice_events(request, job)) as events:
                async for event in events:
                    if isinstance(event, bytes):
                        yield event
                        continue
                    if event.error is not None:
                        raise event.error
                    if event.completion is None:  # the client went away: generation is cancelled, nobody reads on
                        return
                    completion_tokens += event.completion.completion_tokens
            if job.include_usage:
                yield _sse({**job.envelope(streamed=True), "choices": [], "usage": job.usage(completion_tokens)})
            yield SSE_DONE
        except ServingError as error:
            # Headers are sent: say it as an error event, which OpenAI's clients raise as APIError.
            logger.warning("stream ended by error: %s", error.message)
            yield _sse(error_body(error.message, error.error_type, error.param))

    async def _all_choice_events(self, request: Request, job: PlannedRequest) -> AsyncIterator[bytes | _ChoiceEnd]:
        """Every choice's events. One choice (the usual request) is read directly; several run as tasks that
        share a queue, so their chunks interleave as they are produced. Stops at a choice's error or a
        client that left (the other choices are cancelled)."""
        if len(job.choices) == 1:
            async with contextlib.aclosing(self._choice_events(request, job, job.choices[0])) as events:
                async for event in events:
                    yield event
            return
        queue: asyncio.Queue[bytes | _ChoiceEnd] = asyncio.Queue()

        async def pump(choice: ChoicePlan) -> None:
            async with contextlib.aclosing(self._choice_events(request, job, choice)) as events:
                async for event in events:
                    queue.put_nowait(event)

        tasks = [asyncio.create_task(pump(choice)) for choice in job.choices]
        running = len(tasks)
        try:
            while running:
                event = await queue.get()
                yield event
                if isinstance(event, _ChoiceEnd):
                    if event.error is not None or event.completion is None:
                        return
                    running -= 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _choice_events(
        self, request: Request, job: PlannedRequest, choice: ChoicePlan
    ) -> AsyncIterator[bytes | _ChoiceEnd]:
        """One choice's chunks, ending with a ``_ChoiceEnd``."""
        finished: list[Completion] = []
        legacy = LegacyLogprobs(self.texts, len(choice.echo))
        assert choice.plan is not None, "prompt-only scoring is refused for streams"
        wants_logprobs = choice.plan.top_logprobs is not None
        try:
            if job.chat:
                yield self._chunk(job, choice.index, {"role": "assistant", "content": ""})
            elif choice.echo:
                yield self._chunk(job, choice.index, choice.echo)
            async for delta in self.engine.stream(
                choice.plan, on_complete=finished.append, client_gone=request.is_disconnected
            ):
                logprobs: dict[str, Any] | None = None
                if wants_logprobs:
                    logprobs = (
                        chat_logprobs(self.texts, delta.token_logprobs)
                        if job.chat
                        else legacy.render(delta.token_logprobs)
                    )
                content: Any = {"content": delta.text} if job.chat else delta.text
                yield self._chunk(job, choice.index, content, logprobs=logprobs)
        except ServingError as error:
            yield _ChoiceEnd(error=error)
            return
        if finished:
            reason = FINISH_REASONS[finished[0].finish_reason.value]
            yield self._chunk(job, choice.index, {} if job.chat else "", finish_reason=reason)
        yield _ChoiceEnd(completion=finished[0] if finished else None)

    @staticmethod
    def _chunk(
        job: PlannedRequest,
        index: int,
        content: Any,
        *,
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> bytes:
        field = "delta" if job.chat else "text"
        payload: dict[str, Any] = {
            **job.envelope(streamed=True),
            "choices": [{"index": index, field: content, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if job.include_usage:
            payload["usage"] = None
        return _sse(payload)


_ENGINE_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "num_return_sequences": "n"}


def _openai_names(error: InvalidRequest) -> InvalidRequest:
    """The engine speaks transformers' names; say the OpenAI ones the client actually sent."""
    message = error.message
    for engine_name, openai_name in _ENGINE_NAMES.items():
        message = message.replace(f"`{engine_name}`", f"`{openai_name}`").replace(engine_name, openai_name)
    renamed = type(error)(message, param=_ENGINE_NAMES.get(error.param or "", error.param))
    return renamed
