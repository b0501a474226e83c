"""Request shapes of the ``predict`` route, validated by pydantic.

Exactly one input form per request: ``prompt`` | ``prefix`` (+ ``suffix``) | ``messages`` |
``instruction`` (+ ``input``). Everything else is a decoding control or a ``GenerationConfig``
parameter (see ``generation_params``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, StrictBool, StrictStr

from starcoder_serving.api.generation_params import GenerationParameters
from starcoder_serving.engine.sampling_params import SamplingParams, Seed

NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]

INPUT_FORMS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "fill-in-the-middle": ("prefix", "suffix"),
    "chat": ("messages",),
    "instruction": ("instruction", "input"),
}


class ChatMessage(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class PredictRequest(GenerationParameters):
    """The body of ``POST /v1/models/model:predict``."""

    prompt: NonEmptyStr | None = None
    prefix: StrictStr | None = None
    suffix: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    instruction: NonEmptyStr | None = None
    input: StrictStr | None = None

    stream: StrictBool = False
    stop: StrictStr | list[StrictStr] | None = None
    seed: Seed | None = None

    @pydantic.model_validator(mode="after")
    def _exactly_one_input_form(self) -> PredictRequest:
        sent = [form for form, fields in INPUT_FORMS.items() if any(getattr(self, f) is not None for f in fields)]
        if len(sent) != 1:
            choices = '"prompt", "prefix"/"suffix", "messages" or "instruction"/"input"'
            detail = f"got {', '.join(sent)}" if sent else "got none"
            raise ValueError(f"send exactly one input form: {choices} ({detail})")
        if self.suffix is not None and self.prefix is None:
            raise ValueError('"suffix" needs "prefix" (fill-in-the-middle); send "prefix": "" for an empty one')
        if self.input is not None and self.instruction is None:
            raise ValueError('"input" needs "instruction"')
        if self.messages is not None and self.messages[-1].role == "assistant":
            raise ValueError('"messages" must end with a user (or system) message: the model answers as the assistant')
        return self

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def sampling_params(self, implied_stop: tuple[str, ...] = ()) -> SamplingParams:
        """The request's decoding, in the engine's terms (only what the client sent, so the model's own
        generation defaults still apply to the rest)."""
        values = self.set_parameters()
        if "num_return_sequences" in values:
            values["n"] = values.pop("num_return_sequences")
        if self.seed is not None:
            values["seed"] = self.seed
        stop = (*self.stop_sequences, *implied_stop)
        if stop:
            values["stop"] = stop
        return SamplingParams.model_validate(values)

    def echo(self) -> dict[str, Any]:
        """The input fields as the client sent them, for the response's ``data``."""
        fields = next(f for f in INPUT_FORMS.values() if any(getattr(self, name) is not None for name in f))
        return self.model_dump(include={name for name in fields if getattr(self, name) is not None})
