"""The ``predict`` protocol: the seed contract (``{"status", "data", "message"}``) plus streaming as plain text.

How a request is validated and run is ``lifecycle.py``'s; this module parses predict's body and renders its answers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pydantic
from starlette.responses import Response

from starcoder_serving.api import envelope
from starcoder_serving.api.common_fields import STOP_SHAPE
from starcoder_serving.api.field_errors import describe_validation_error
from starcoder_serving.api.generation_params import PYTHON_ONLY_PARAMETERS
from starcoder_serving.api.lifecycle import ChoiceDelta, ChoiceEvent, Outcome, RouteProtocol
from starcoder_serving.api.predict_schema import PredictRequest
from starcoder_serving.engine.validation import ValidRequest
from starcoder_serving.errors import ServingError

logger = logging.getLogger(__name__)

PREDICT_FIELDS = frozenset(PredictRequest.model_fields)


class StreamAborted(Exception):
    """Raised inside a streamed predict body: the server drops the connection without the final chunk."""


class PredictProtocol(RouteProtocol[PredictRequest]):
    route: ClassVar[str] = "predict"
    example: ClassVar[str] = '{"prompt": "def compute_fib(n):"}'
    stream_media_type: ClassVar[str] = "text/plain; charset=utf-8"

    def parse(self, body: dict[str, Any]) -> PredictRequest:
        try:
            return PredictRequest.model_validate(body)
        except pydantic.ValidationError as exc:
            raise describe_validation_error(
                exc, known_fields=PREDICT_FIELDS, not_accepted=PYTHON_ONLY_PARAMETERS, shapes={"stop": STOP_SHAPE}
            ) from None

    def error(self, error: ServingError) -> Response:
        return envelope.failure(error)

    def answer(self, parsed: PredictRequest, valid: ValidRequest, outcome: Outcome) -> dict[str, Any]:
        completions = outcome.completions
        first = completions[0]
        data: dict[str, Any] = {
            "completion": first.text,
            "prompt": valid.prompts[0].rendered.text,
            **parsed.echo(),
            "finish_reason": first.finish_reason.value,
            "prompt_tokens": first.prompt_tokens,
            "completion_tokens": first.completion_tokens,
        }
        if (context := valid.prompts[0].rendered.context) is not None:
            # Repository context: which files made it into the window, and what was dropped to fit.
            data["context"] = context.as_dict(first.prompt_tokens)
        if len(completions) > 1:
            data["completions"] = [
                {"completion": c.text, "finish_reason": c.finish_reason.value, "completion_tokens": c.completion_tokens}
                for c in completions
            ]
        return envelope.success(data)

    async def stream(
        self, parsed: PredictRequest, valid: ValidRequest, events: AsyncIterator[ChoiceEvent]
    ) -> AsyncIterator[bytes]:
        async for event in events:
            if isinstance(event, ChoiceDelta):
                if event.delta.text:
                    yield event.delta.text.encode("utf-8")
            elif event.error is not None:
                # Plain text has no way to say "this ended badly" after a 200: abort the response instead
                # of ending it cleanly, so HTTP clients see a truncated body (an incomplete chunked read).
                logger.warning("predict stream aborted (truncated) by error: %s", event.error.message)
                raise StreamAborted(event.error.message)
