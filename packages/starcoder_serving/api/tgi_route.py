"""TGI's protocol on ``predict`` (see ``tgi_schema``): its answers, its Server-Sent Events, its errors.

* Not streamed: ``[{"generated_text": ..., "details": {...}}]`` (``details`` when asked: finish reason,
  generated tokens, seed, every token with its logprob, and the prompt's tokens with
  ``decoder_input_details``).
* Streamed: one ``data: {"index", "token": {...}, "generated_text": null, "details": null}`` event per
  token; the last one carries ``generated_text`` and ``details``.
* Errors: ``{"error": "...", "error_type": "validation" | "overloaded" | "generation"}`` with the status
  code predict would give, which huggingface_hub turns into its own exception types.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pydantic
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from starcoder_serving.api.field_errors import describe_validation_error
from starcoder_serving.api.http_body import plan_request, unless_disconnected
from starcoder_serving.api.openai_route import TokenTexts
from starcoder_serving.api.tgi_schema import TgiRequest
from starcoder_serving.engine.engine import Completion, Engine
from starcoder_serving.engine.jobs import FinishReason, GenerationPlan, TokenLogprob
from starcoder_serving.errors import InvalidRequest, Overloaded, ServingError

logger = logging.getLogger(__name__)

FINISH_REASONS = {
    FinishReason.EOS: "eos_token",
    FinishReason.STOP: "stop_sequence",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "length",
}


def error_response(error: ServingError) -> JSONResponse:
    return JSONResponse(status_code=error.status_code, content=error_payload(error))


def error_payload(error: ServingError) -> dict[str, str]:
    if isinstance(error, Overloaded):
        kind = "overloaded"
    elif isinstance(error, InvalidRequest):
        kind = "validation"
    else:
        kind = "generation"
    return {"error": error.message, "error_type": kind}


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


class TgiService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.texts = TokenTexts(engine.tokenizer)
        self._special = set(engine.tokenizer.all_special_ids) | set(engine.eos_token_ids)

    async def handle(self, request: Request, body: dict[str, Any]) -> Response:
        try:
            parsed = self.parse(body)
            plan = await plan_request(request, self.plan, parsed)
            prefill = await self._prefill(parsed, plan)
            if parsed.stream:
                self.engine.check_capacity()
                return StreamingResponse(
                    self._events(request, parsed, plan, prefill),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            completion = await unless_disconnected(request, self.engine.complete(plan))
        except ServingError as error:
            return error_response(error)
        if completion is None:  # the client hung up; nobody reads this
            return error_response(InvalidRequest("Client disconnected."))
        answer: dict[str, Any] = {"generated_text": self._full_text(parsed, completion.text)}
        if parsed.wants_details:
            answer["details"] = self._details(plan, completion, list(completion.token_logprobs), prefill)
        return JSONResponse([answer])

    @staticmethod
    def parse(body: dict[str, Any]) -> TgiRequest:
        try:
            parsed = TgiRequest.model_validate(body)
        except pydantic.ValidationError as exc:
            raise describe_validation_error(exc) from None
        parsed.check_supported()
        return parsed

    def plan(self, parsed: TgiRequest) -> GenerationPlan:
        prompt_ids = self.engine.tokenize(parsed.inputs)
        if parsed.parameters.truncate is not None:  # TGI keeps the last `truncate` tokens of the input
            prompt_ids = prompt_ids[-parsed.parameters.truncate :]
        return self.engine.plan(prompt_ids, parsed.sampling_params())[0]

    async def _prefill(self, parsed: TgiRequest, plan: GenerationPlan) -> list[dict[str, Any]]:
        if not (parsed.wants_details and parsed.parameters.decoder_input_details):
            return []
        scores = await self.engine.score_prompt(plan.prompt_ids)
        first = plan.prompt_ids[0]
        return [{"id": first, "text": self.texts.text_of(first), "logprob": None}] + [
            {"id": s.token_id, "text": self.texts.text_of(s.token_id), "logprob": s.logprob} for s in scores
        ]

    @staticmethod
    def _full_text(parsed: TgiRequest, text: str) -> str:
        return parsed.inputs + text if parsed.parameters.return_full_text else text

    def _token(self, entry: TokenLogprob) -> dict[str, Any]:
        return {
            "id": entry.token_id,
            "text": self.texts.text_of(entry.token_id),
            "logprob": entry.logprob,
            "special": entry.token_id in self._special,
        }

    def _details(
        self,
        plan: GenerationPlan,
        completion: Completion,
        entries: list[TokenLogprob],
        prefill: list[dict[str, Any]],
    ) -> dict[str, Any]:
        details: dict[str, Any] = {
            "finish_reason": FINISH_REASONS[completion.finish_reason],
            "generated_tokens": completion.completion_tokens,
            "seed": plan.sampling.seed if not plan.sampling.greedy else None,
            "prefill": prefill,
            "tokens": [self._token(entry) for entry in entries],
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

    async def _events(
        self, request: Request, parsed: TgiRequest, plan: GenerationPlan, prefill: list[dict[str, Any]]
    ) -> AsyncIterator[bytes]:
        """One event per token; the last token's event also carries the text and the details."""
        finished: list[Completion] = []
        entries: list[TokenLogprob] = []
        pending: dict[str, Any] | None = None
        try:
            async for delta in self.engine.stream(
                plan, on_complete=finished.append, client_gone=request.is_disconnected
            ):
                last = len(delta.token_logprobs) - 1
                for i, entry in enumerate(delta.token_logprobs):
                    if pending is not None:
                        yield _sse(pending)
                    entries.append(entry)
                    # The delta's text goes with its last token (the others are parts of a character, or
                    # held back by a possible stop sequence): concatenated, tokens give generated_text.
                    token = {**self._token(entry), "text": delta.text if i == last else ""}
                    pending = {"index": len(entries), "token": token, "generated_text": None, "details": None}
            if not finished:  # the client left
                return
            completion = finished[0]
            if pending is None:  # nothing generated (immediate end of text)
                return
            pending["generated_text"] = self._full_text(parsed, completion.text)
            if parsed.wants_details:
                details = self._details(plan, completion, entries, prefill)
                pending["details"] = {k: details[k] for k in ("finish_reason", "generated_tokens", "seed")}
            yield _sse(pending)
        except ServingError as error:
            logger.warning("TGI stream ended by error: %s", error.message)
            if pending is not None:
                yield _sse(pending)
            yield _sse(error_payload(error))
