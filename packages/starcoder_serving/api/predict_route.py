"""The ``predict`` route: the seed contract plus streaming, FIM, chat, instructions, stop and seed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import pydantic
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from starcoder_serving.api import envelope
from starcoder_serving.api.field_errors import STOP_SHAPE, describe_validation_error
from starcoder_serving.api.generation_params import PYTHON_ONLY_PARAMETERS
from starcoder_serving.api.http_body import plan_request, read_json_object, unless_disconnected
from starcoder_serving.api.predict_schema import PredictRequest
from starcoder_serving.api.tgi_route import TgiService
from starcoder_serving.engine.engine import Completion, Engine
from starcoder_serving.engine.jobs import GenerationPlan
from starcoder_serving.errors import InvalidRequest, ServingError
from starcoder_serving.text.prompts import RenderedPrompt

logger = logging.getLogger(__name__)

EXAMPLE_BODY = '{"prompt": "def compute_fib(n):"}'
PREDICT_FIELDS = frozenset(PredictRequest.model_fields)


class StreamAborted(Exception):
    """Raised inside a streamed predict body: the server drops the connection without the final chunk."""


class PredictService:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.tgi = TgiService(engine)

    async def handle(self, request: Request) -> dict[str, Any] | Response:
        try:
            body = await read_json_object(request, EXAMPLE_BODY)
            if "inputs" in body:  # TGI's request shape (IDE plugins, huggingface_hub): see tgi_schema.py
                return await self.tgi.handle(request, body)
            parsed = self.parse(body)
            rendered = self.render(parsed)
            # Tokenizing a long prompt takes a while: it is planned off the event loop (http_body.plan_request).
            plans = await plan_request(request, self.plans, parsed, rendered)
            if parsed.stream:
                return await self._start_stream(request, plans[0])
            completions = await unless_disconnected(request, self.engine.complete_all(plans))
        except ServingError as error:
            return envelope.failure(error)
        if completions is None:  # the client hung up; nobody reads this
            return envelope.failure(InvalidRequest("Client disconnected."))
        return envelope.success(self._data(parsed, rendered, completions))

    @staticmethod
    def parse(body: dict[str, Any]) -> PredictRequest:
        try:
            return PredictRequest.model_validate(body)
        except pydantic.ValidationError as exc:
            raise describe_validation_error(
                exc, known_fields=PREDICT_FIELDS, not_accepted=PYTHON_ONLY_PARAMETERS, shapes={"stop": STOP_SHAPE}
            ) from None

    def render(self, parsed: PredictRequest) -> RenderedPrompt:
        if parsed.prompt is not None:
            return RenderedPrompt(parsed.prompt)
        if parsed.prefix is not None:
            return self.engine.render_fim(parsed.prefix, parsed.suffix or "", param="prefix")
        if parsed.messages is not None:
            return self.engine.chat.render([m.model_dump() for m in parsed.messages])
        assert parsed.instruction is not None
        return self.engine.instructions.render(parsed.instruction, parsed.input)

    def plans(self, parsed: PredictRequest, rendered: RenderedPrompt) -> list[GenerationPlan]:
        sampling = parsed.sampling_params(rendered.implied_stop)
        if sampling.n > 1 and parsed.stream:
            raise InvalidRequest(
                '`num_return_sequences` > 1 cannot be streamed; send "stream": false.', param="num_return_sequences"
            )
        if sampling.n > 1 and (not sampling.do_sample or sampling.beam_search):
            raise InvalidRequest(
                '`num_return_sequences` > 1 needs sampling: send "do_sample": true (and no num_beams), '
                "otherwise every sequence would be the same.",
                param="num_return_sequences",
            )
        # n independent sequences (each with its own seed: seed, seed+1, ...), decoded together in the batch.
        return self.engine.plan(self.engine.tokenize(rendered.text), sampling)

    async def _start_stream(self, request: Request, plan: GenerationPlan) -> StreamingResponse:
        """Wait for the first text before answering, so that a full queue or a failed prefill still gets
        a proper status code; after that, errors can only end the stream early."""
        deltas = self.engine.stream(plan, client_gone=request.is_disconnected)
        try:
            first = await anext(deltas)
        except StopAsyncIteration:  # nothing generated (immediate end of text) or the client left
            first = None

        async def text_chunks() -> AsyncIterator[bytes]:
            try:
                if first is not None and first.text:
                    yield first.text.encode("utf-8")
                async for delta in deltas:
                    if delta.text:
                        yield delta.text.encode("utf-8")
            except ServingError as error:
                # Plain text has no way to say "this ended badly" after a 200: abort the response instead
                # of ending it cleanly, so HTTP clients see a truncated body (an incomplete chunked read).
                logger.warning("predict stream aborted (truncated) by error: %s", error.message)
                raise StreamAborted(error.message) from None
            finally:
                await deltas.aclose()

        # Our own StreamingResponse, not a bare generator: truss would relay each chunk through a queue
        # and a timer task, Python work per token that competes with the batch loop for the GIL.
        return StreamingResponse(text_chunks(), media_type="text/plain; charset=utf-8")

    @staticmethod
    def _data(parsed: PredictRequest, rendered: RenderedPrompt, completions: list[Completion]) -> dict[str, Any]:
        first = completions[0]
        data: dict[str, Any] = {
            "completion": first.text,
            "prompt": rendered.text,
            **parsed.echo(),
            "finish_reason": first.finish_reason.value,
            "prompt_tokens": first.prompt_tokens,
            "completion_tokens": first.completion_tokens,
        }
        if len(completions) > 1:
            data["completions"] = [
                {"completion": c.text, "finish_reason": c.finish_reason.value, "completion_tokens": c.completion_tokens}
                for c in completions
            ]
        return data
