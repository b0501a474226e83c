"""TGI's protocol on ``predict`` (see ``tgi_schema``): its answers, its Server-Sent Events, its errors.

* Not streamed: ``[{"generated_text": ..., "details": {...}}]`` (``details`` when asked: finish reason,
  generated tokens, seed, every token with its logprob, and the prompt's tokens with
  ``decoder_input_details``): TGI's ``/`` route. With ``answer_object`` the object alone, as TGI's ``/generate``
  answers (for llm-ls, see ``routes``).
* Streamed: one ``data: {"index", "token": {...}, "generated_text": null, "details": null}`` event per
  token; the last one carries ``generated_text`` and ``details``.
* Errors: ``{"error": "...", "error_type": "validation" | "overloaded" | "generation"}`` with the status
  code predict would give, which huggingface_hub turns into its own exception types.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import pydantic
from starlette.responses import JSONResponse, Response

from starcoder_serving.api.field_errors import describe_validation_error
from starcoder_serving.api.lifecycle import ChoiceDelta, ChoiceEvent, Outcome, RouteProtocol
from starcoder_serving.api.sse import SSE_HEADERS, sse
from starcoder_serving.api.tgi_schema import TgiRequest
from starcoder_serving.engine.engine import Engine
from starcoder_serving.engine.validation import ValidRequest
from starcoder_serving.errors import InvalidRequest, Overloaded, ServingError
from starcoder_serving.events import FinishReason, TokenLogprob
from starcoder_serving.text.assembler import Completion
from starcoder_serving.text.token_texts import TokenPieces, TokenTexts

logger = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishReason.EOS: "eos_token",
    FinishReason.STOP: "stop_sequence",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "length",
}


def error_payload(error: ServingError) -> dict[str, str]:
    if isinstance(error, Overloaded):
        kind = "overloaded"
    elif isinstance(error, InvalidRequest):
        kind = "validation"
    else:
        kind = "generation"
    return {"error": error.message, "error_type": kind}


class TgiProtocol(RouteProtocol[TgiRequest]):
    route: ClassVar[str] = "tgi"
    example: ClassVar[str] = '{"inputs": "def compute_fib(n):", "parameters": {"max_new_tokens": 64}}'
    stream_headers: ClassVar[Mapping[str, str]] = SSE_HEADERS

    def __init__(self, engine: Engine, *, answer_object: bool = False) -> None:
        self.answer_object = answer_object
        self.texts = TokenTexts(engine.tokenizer)
        self._special = set(engine.tokenizer.all_special_ids) | set(engine.eos_token_ids)

    def parse(self, body: dict[str, Any]) -> TgiRequest:
        try:
            parsed = TgiRequest.model_validate(body)
        except pydantic.ValidationError as exc:
            raise describe_validation_error(exc) from None
        parsed.check_supported()
        return parsed

    def error(self, error: ServingError) -> Response:
        return JSONResponse(status_code=error.status_code, content=error_payload(error))

    def answer(self, parsed: TgiRequest, valid: ValidRequest, outcome: Outcome) -> Response:
        completion = outcome.completions[0]
        answer: dict[str, Any] = {"generated_text": self._full_text(parsed, completion.text)}
        if parsed.wants_details:
            prefill = self._prefill(valid, outcome.prompt_scores.get(0))
            answer["details"] = self._details(valid, completion, list(completion.token_logprobs), prefill)
        return JSONResponse(answer if self.answer_object else [answer])

    def _prefill(self, valid: ValidRequest, scores: list[TokenLogprob] | None) -> list[dict[str, Any]]:
        """The prompt's tokens with their logprobs (``decoder_input_details``); the first has none."""
        if scores is None:
            return []
        first = valid.prompts[0].prompt_ids[0]
        return [{"id": first, "text": self.texts.text_of(first), "logprob": None}] + [
            {"id": s.token_id, "text": self.texts.text_of(s.token_id), "logprob": s.logprob} for s in scores
        ]

    @staticmethod
    def _full_text(parsed: TgiRequest, text: str) -> str:
        return parsed.inputs + text if parsed.parameters.return_full_text else text

    def _token(self, entry: TokenLogprob, text: str) -> dict[str, Any]:
        """A generated token; its text is what it adds to generated_text (``TokenPieces``): the tokens' texts
        concatenate to it, streamed or not."""
        return {
            "id": entry.token_id,
            "text": text,
            "logprob": entry.logprob,
            "special": entry.token_id in self._special,
        }

    def _token_texts(self, entries: list[TokenLogprob], completion: Completion) -> list[str]:
        pieces, rest = TokenPieces(self.texts).split([entry.token_id for entry in entries], completion.text)
        if rest and pieces:  # no token adds text, yet there is some: the first token's
            pieces[0] = rest
        return pieces

    def _details(
        self,
        valid: ValidRequest,
        completion: Completion,
        entries: list[TokenLogprob],
        prefill: list[dict[str, Any]],
    ) -> dict[str, Any]:
        plan = valid.plans[0]
        details: dict[str, Any] = {
            "finish_reason": FINISH_REASONS[completion.finish_reason],
            "generated_tokens": completion.completion_tokens,
            "seed": plan.sampling.seed if not plan.sampling.greedy else None,
            "prefill": prefill,
            "tokens": [
                self._token(entry, text) for entry, text in zip(entries, self._token_texts(entries, completion))
            ],
        }
        if plan.sampling.logprobs:
            details["top_tokens"] = [
                [
                    {"id": t, "text": self.texts.text_of(t), "logprob": lp, "special": t in self._special}
                    for t, lp in e.top
                ]
                for e in entries
            ]
        return details

    async def stream(
        self, parsed: TgiRequest, valid: ValidRequest, events: AsyncIterator[ChoiceEvent]
    ) -> AsyncIterator[bytes]:
        """One event per token; the last token's event also carries the text and the details."""
        entries: list[TokenLogprob] = []
        pending: dict[str, Any] | None = None
        pieces = TokenPieces(self.texts)
        async for event in events:
            if isinstance(event, ChoiceDelta):
                delta = event.delta
                # Each token's text is its piece of the delta's text: concatenated, tokens give generated_text.
                texts, rest = pieces.split([entry.token_id for entry in delta.token_logprobs], delta.text)
                if rest and pending is not None:  # text no token here adds (the end of a character cut short)
                    pending["token"]["text"] += rest
                elif rest and texts:
                    texts[0] = rest
                for entry, text in zip(delta.token_logprobs, texts):
                    if pending is not None:
                        yield sse(pending)
                    entries.append(entry)
                    token = self._token(entry, text)
                    pending = {"index": len(entries), "token": token, "generated_text": None, "details": None}
            elif event.error is not None:
                logger.warning("TGI stream ended by error: %s", event.error.message)
                if pending is not None:
                    yield sse(pending)
                yield sse(error_payload(event.error))
            elif event.completion is not None and pending is not None:  # else: the client left, or nothing came
                pending["generated_text"] = self._full_text(parsed, event.completion.text)
                if parsed.wants_details:
                    details = self._details(valid, event.completion, entries, [])
                    pending["details"] = {k: details[k] for k in ("finish_reason", "generated_tokens", "seed")}
                yield sse(pending)
