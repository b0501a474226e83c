"""The OpenAI-compatible protocols: ``/v1/completions`` and ``/v1/chat/completions``.

How a request is validated and run is ``lifecycle.py``'s, as for predict; this module parses OpenAI's bodies and
renders its answers. Everything that can be refused is refused before a stream starts (400 with OpenAI's error
object); an error after that (e.g. the GPU ran out of memory) ends the stream with an ``error`` event, which
OpenAI's clients raise as ``APIError``.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, ClassVar

from starlette.responses import JSONResponse, Response, StreamingResponse

from starcoder_serving.api.lifecycle import (
    ANSWER_ON_LOOP_TOKENS,
    ChoiceDelta,
    ChoiceEvent,
    Outcome,
    RouteProtocol,
    answer_tokens,
)
from starcoder_serving.api.openai_schema import (
    FINISH_REASONS,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingRequest,
    error_body,
    parse_chat_request,
    parse_completion_request,
)
from starcoder_serving.api.sse import SSE_DONE, SSE_HEADERS, sse
from starcoder_serving.engine.engine import Engine
from starcoder_serving.engine.validation import Choice, ValidRequest
from starcoder_serving.errors import ServingError
from starcoder_serving.events import TokenLogprob
from starcoder_serving.text.assembler import Completion
from starcoder_serving.text.token_texts import TextPositions, TokenTexts

# JSON has no -inf; OpenAI-compatible servers clamp to this (a token the model itself gives no probability).
MIN_LOGPROB = -9999.0


def _clamp(logprob: float) -> float:
    return max(MIN_LOGPROB, logprob)


class LegacyLogprobs:
    """One choice's ``/v1/completions`` logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    ``text_offset`` indexes the choice's text: a token's offset is where its text starts there (``TextPositions``).
    The echoed prompt comes first, with its special tokens as the client wrote them; a generated special token adds
    nothing, as the completion leaves it out; a token past a stop sequence's cut sits at the text's end. Streamed, an
    entry waits for the chunk whose text reaches its offset (a possible stop sequence holds text back); the choice's
    last chunk gives the rest.
    """

    def __init__(self, texts: TokenTexts, echo: str) -> None:
        self._texts = texts
        self._echo = echo
        self._positions = TextPositions(texts.shown_bytes_of, len(echo))
        self._shown = len(echo)  # the choice's text so far
        self._held: list[tuple[TokenLogprob, int]] = []  # entries whose offset is past it, with their offset

    def render_prompt(self, first_token: int, scores: list[TokenLogprob]) -> dict[str, list[Any]]:
        """The prompt's tokens: the first has nothing before it to be scored against (null)."""
        positions = TextPositions(self._texts.bytes_of)  # the echo shows the prompt's special tokens
        out = self._fields()
        self._append(out, first_token, None, min(positions.advance(first_token), len(self._echo)))
        for entry in scores:
            self._append(out, entry.token_id, entry, min(positions.advance(entry.token_id), len(self._echo)))
        return out

    def render(self, logprobs: tuple[TokenLogprob, ...], text: str, *, last: bool) -> dict[str, list[Any]]:
        """The entries of generated tokens that came with ``text``, and those held back until now; ``last``: the
        choice's text is complete, every entry goes."""
        self._shown += len(text)
        self._held += [(entry, self._positions.advance(entry.token_id)) for entry in logprobs]
        ready = len(self._held) if last else sum(1 for _, offset in self._held if offset <= self._shown)
        out = self._fields()
        for entry, offset in self._held[:ready]:
            self._append(out, entry.token_id, entry, min(offset, self._shown))
        del self._held[:ready]
        return out

    @staticmethod
    def _fields() -> dict[str, list[Any]]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _append(self, out: dict[str, list[Any]], token_id: int, entry: TokenLogprob | None, offset: int) -> None:
        out["tokens"].append(self._texts.text_of(token_id))
        out["text_offset"].append(offset)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            return
        out["token_logprobs"].append(_clamp(entry.logprob))
        # As OpenAI: the top k, plus the chosen token (so up to k + 1 entries).
        top = {self._texts.text_of(t): _clamp(lp) for t, lp in entry.top}
        top.setdefault(self._texts.text_of(token_id), _clamp(entry.logprob))
        out["top_logprobs"].append(top)


def chat_logprobs(texts: TokenTexts, logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """Chat's logprobs. A token's ``bytes`` are what it adds to the message's content (as a completion's
    ``text_offset``): none for a special token, which the content leaves out, though ``token`` names it."""

    def item(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": texts.text_of(token_id),
            "logprob": _clamp(logprob),
            "bytes": list(texts.shown_bytes_of(token_id)),
        }

    return {
        "content": [
            {**item(entry.token_id, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}
            for entry in logprobs
        ],
        "refusal": None,
    }


# A streamed choice's logprobs: (a delta's entries, its text, whether the choice is over) to the chunk's logprobs.
StreamLogprobs = Callable[[tuple[TokenLogprob, ...], str, bool], dict[str, Any] | None]


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _json_pieces(head: dict[str, Any], choices: Iterator[dict[str, Any]], usage: dict[str, Any]) -> Iterator[bytes]:
    """``{**head, "choices": [...], "usage": usage}`` as JSON, one choice at a time."""
    yield _json(head)[:-1] + b',"choices":['
    for i, choice in enumerate(choices):
        if i:
            yield b","
        yield from _encoded(choice)
    yield b'],"usage":' + _json(usage) + b"}"


# Items of a list encoded by one json.dumps call. json.dumps holds the GIL for the whole call: a scored prompt's
# logprob lists (8,000 entries each) in one call stalled the event loop's health checks for ~170 ms.
_ITEMS_PER_PIECE = 256


def _encoded(value: Any) -> Iterator[bytes]:
    """``value`` as JSON, a long list a slice at a time."""
    if isinstance(value, dict):
        yield b"{"
        for i, (key, item) in enumerate(value.items()):
            yield (b"," if i else b"") + _json(key) + b":"
            yield from _encoded(item)
        yield b"}"
    elif isinstance(value, list) and len(value) > _ITEMS_PER_PIECE:
        yield b"["
        for start in range(0, len(value), _ITEMS_PER_PIECE):
            yield (b"," if start else b"") + _json(value[start : start + _ITEMS_PER_PIECE])[1:-1]
        yield b"]"
    else:
        yield _json(value)


@dataclasses.dataclass(frozen=True)
class _Answer:
    """What every chunk and answer of one request repeats."""

    object_prefix: str
    model: str
    include_usage: bool
    prompt_tokens: int
    # Repository context (an extension of usage): one report per prompt, when the request sent context.
    context: list[dict[str, Any]] | None = None
    id: str = ""
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", f"{self.object_prefix}-{uuid.uuid4().hex}")

    def usage(self, completion_tokens: int) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }
        if self.context is not None:
            usage["context"] = self.context
        return usage


class _OpenAIProtocol(RouteProtocol[SamplingRequest]):
    """What completions and chat share: errors, the response envelope, the stream's order of events."""

    stream_headers: ClassVar[Mapping[str, str]] = SSE_HEADERS
    object_prefix: ClassVar[str]
    answer_object: ClassVar[str]
    chunk_object: ClassVar[str]
    chunk_text_field: ClassVar[str]  # where a chunk's text goes: "text" (completions), "delta" (chat)

    def __init__(self, engine: Engine) -> None:
        self.model_name = engine.model_name
        self.texts = TokenTexts(engine.tokenizer)

    def error(self, error: ServingError) -> Response:
        return JSONResponse(
            status_code=error.status_code, content=error_body(error.message, error.error_type, error.param)
        )

    def _begin(self, parsed: SamplingRequest, valid: ValidRequest) -> _Answer:
        reports = [
            (prompt.rendered.context, len(prompt.prompt_ids))
            for prompt in valid.prompts
            if prompt.rendered.context is not None
        ]
        context = [report.as_dict(tokens) for report, tokens in reports] if reports else None
        return _Answer(self.object_prefix, self.model_name, parsed.include_usage, valid.prompt_tokens, context)

    def answer(self, parsed: SamplingRequest, valid: ValidRequest, outcome: Outcome) -> Response:
        answer = self._begin(parsed, valid)
        usage = answer.usage(sum(c.completion_tokens for c in outcome.completions))
        head = {"id": answer.id, "object": self.answer_object, "created": answer.created, "model": answer.model}
        choices = (
            {
                "index": choice.index,
                **self._choice_text(choice, completion),
                "logprobs": self._answer_logprobs(valid, choice, completion, outcome),
                "finish_reason": FINISH_REASONS[completion.finish_reason.value],
            }
            for choice, completion in zip(valid.choices, outcome.completions)
        )
        if answer_tokens(valid, outcome) <= ANSWER_ON_LOOP_TOKENS:
            return JSONResponse({**head, "choices": list(choices), "usage": usage})
        # A large answer (a long prompt scored: ~100 MB for 64 prompts of 8,000 tokens) is sent a choice at a time,
        # each rendered and encoded in starlette's thread pool: memory holds one choice, not the whole answer.
        return StreamingResponse(_json_pieces(head, choices, usage), media_type="application/json")

    async def stream(
        self, parsed: SamplingRequest, valid: ValidRequest, events: AsyncIterator[ChoiceEvent]
    ) -> AsyncIterator[bytes]:
        """Server-sent events: every choice's opening chunk, then the choices' chunks as they interleave (each
        carries its index), each choice's last chunk with its finish reason; then usage, then [DONE]."""
        answer = self._begin(parsed, valid)
        logprobs = {choice.index: self._stream_logprobs(choice) for choice in valid.choices}
        for choice in valid.choices:
            if (opening := self._opening(choice)) is not None:
                yield self._chunk(answer, choice.index, opening)
        completion_tokens = 0
        async for event in events:
            if isinstance(event, ChoiceDelta):
                render = logprobs[event.choice.index]
                rendered = render(event.delta.token_logprobs, event.delta.text, False) if render is not None else None
                yield self._chunk(answer, event.choice.index, self._delta(event.delta.text), logprobs=rendered)
            elif event.error is not None:
                # Headers are sent: say it as an error event, which OpenAI's clients raise as APIError.
                yield sse(error_body(event.error.message, event.error.error_type, event.error.param))
                return
            elif event.completion is None:  # the client went away: generation is cancelled, nobody reads on
                return
            else:
                completion_tokens += event.completion.completion_tokens
                reason = FINISH_REASONS[event.completion.finish_reason.value]
                render = logprobs[event.choice.index]
                rest = render((), "", True) if render is not None else None  # entries held back until the end
                yield self._chunk(answer, event.choice.index, self._delta(None), logprobs=rest, finish_reason=reason)
        if answer.include_usage:
            yield sse({**self._chunk_head(answer), "choices": [], "usage": answer.usage(completion_tokens)})
        yield SSE_DONE

    def _chunk_head(self, answer: _Answer) -> dict[str, Any]:
        return {"id": answer.id, "object": self.chunk_object, "created": answer.created, "model": answer.model}

    def _chunk(
        self,
        answer: _Answer,
        index: int,
        content: Any,
        *,
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> bytes:
        payload: dict[str, Any] = {
            **self._chunk_head(answer),
            "choices": [
                {"index": index, self.chunk_text_field: content, "logprobs": logprobs, "finish_reason": finish_reason}
            ],
        }
        if answer.include_usage:
            payload["usage"] = None
        return sse(payload)

    # Each protocol's own: a choice's text, its logprobs, and its stream's opening and deltas.

    @abc.abstractmethod
    def _choice_text(self, choice: Choice, completion: Completion) -> dict[str, Any]:
        """A whole answer's choice: its text field."""

    @abc.abstractmethod
    def _answer_logprobs(
        self, valid: ValidRequest, choice: Choice, completion: Completion, outcome: Outcome
    ) -> dict[str, Any] | None:
        """A whole answer's choice: its logprobs, or None when none were asked for."""

    @abc.abstractmethod
    def _stream_logprobs(self, choice: Choice) -> StreamLogprobs | None:
        """A streamed choice's logprobs renderer (a delta's entries and text to the chunk's logprobs; the last
        call, with none, gives what was held back, for the choice's last chunk), or None without logprobs."""

    @abc.abstractmethod
    def _opening(self, choice: Choice) -> Any:
        """The first chunk's content of a streamed choice, sent before generation; None: no such chunk."""

    @abc.abstractmethod
    def _delta(self, text: str | None) -> Any:
        """A chunk's content for this text; None: the choice's last chunk, which carries its finish reason."""


class CompletionsProtocol(_OpenAIProtocol):
    route: ClassVar[str] = "completions"
    example: ClassVar[str] = '{"model": "starcoder", "prompt": "def compute_fib(n):", "max_tokens": 64}'
    object_prefix: ClassVar[str] = "cmpl"
    answer_object: ClassVar[str] = "text_completion"
    chunk_object: ClassVar[str] = "text_completion"
    chunk_text_field: ClassVar[str] = "text"

    def parse(self, body: dict[str, Any]) -> CompletionRequest:
        return parse_completion_request(body)

    def _choice_text(self, choice: Choice, completion: Completion) -> dict[str, Any]:
        return {"text": choice.prompt.echo + completion.text}

    def _answer_logprobs(
        self, valid: ValidRequest, choice: Choice, completion: Completion, outcome: Outcome
    ) -> dict[str, Any] | None:
        if valid.request.output.score_prompt:
            # The prompt's tokens first (the first one has no logprob, as OpenAI and vLLM show it), then the
            # generated ones; text_offset indexes the whole text, prompt included.
            legacy = LegacyLogprobs(self.texts, choice.prompt.echo)
            logprobs = legacy.render_prompt(choice.prompt.prompt_ids[0], outcome.prompt_scores[choice.prompt.index])
            for field, values in legacy.render(completion.token_logprobs, completion.text, last=True).items():
                logprobs[field] += values
            return logprobs
        if valid.request.sampling.logprobs is None:
            return None
        return LegacyLogprobs(self.texts, choice.prompt.echo).render(
            completion.token_logprobs, completion.text, last=True
        )

    def _stream_logprobs(self, choice: Choice) -> StreamLogprobs | None:
        if choice.plan is None or choice.plan.top_logprobs is None:
            return None
        legacy = LegacyLogprobs(self.texts, choice.prompt.echo)

        def render(entries: tuple[TokenLogprob, ...], text: str, last: bool) -> dict[str, Any] | None:
            out = legacy.render(entries, text, last=last)
            return None if last and not out["tokens"] else out  # the last chunk: only entries held back

        return render

    def _opening(self, choice: Choice) -> Any:
        return choice.prompt.echo or None

    def _delta(self, text: str | None) -> Any:
        return text or ""


class ChatProtocol(_OpenAIProtocol):
    route: ClassVar[str] = "chat"
    example: ClassVar[str] = '{"model": "starcoder", "messages": [{"role": "user", "content": "Write a fib function"}]}'
    object_prefix: ClassVar[str] = "chatcmpl"
    answer_object: ClassVar[str] = "chat.completion"
    chunk_object: ClassVar[str] = "chat.completion.chunk"
    chunk_text_field: ClassVar[str] = "delta"

    def parse(self, body: dict[str, Any]) -> ChatCompletionRequest:
        return parse_chat_request(body)

    def _choice_text(self, choice: Choice, completion: Completion) -> dict[str, Any]:
        return {"message": {"role": "assistant", "content": completion.text}}

    def _answer_logprobs(
        self, valid: ValidRequest, choice: Choice, completion: Completion, outcome: Outcome
    ) -> dict[str, Any] | None:
        if valid.request.sampling.logprobs is None:
            return None
        return chat_logprobs(self.texts, completion.token_logprobs)

    def _stream_logprobs(self, choice: Choice) -> StreamLogprobs | None:
        if choice.plan is None or choice.plan.top_logprobs is None:
            return None
        return lambda entries, text, last: None if last else chat_logprobs(self.texts, entries)

    def _opening(self, choice: Choice) -> Any:
        return {"role": "assistant", "content": ""}

    def _delta(self, text: str | None) -> Any:
        return {} if text is None else {"content": text}
