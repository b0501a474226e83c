"""Request shapes of the ``predict`` route, validated by pydantic.

Exactly one input form per request: ``prompt`` | ``prefix`` (+ ``suffix``) | ``messages`` |
``instruction`` (+ ``input``). Everything else is a decoding control or a ``GenerationConfig``
parameter (see ``generation_params``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, StrictBool, StrictStr

from starcoder_serving.api.common_fields import REPO_FIELDS, CommonFields, EditorFields
from starcoder_serving.api.generation_params import GenerationParameters
from starcoder_serving.engine.request import (
    ChatPrompt,
    FieldNames,
    FimPrompt,
    GenerationRequest,
    InstructionPrompt,
    OutputOptions,
    Prompt,
    TextPrompt,
)
from starcoder_serving.engine.sampling_params import SamplingParams

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


# transformers' names, but for the number of sequences.
PREDICT_NAMES = FieldNames({"n": "num_return_sequences"})


class PredictRequest(GenerationParameters, CommonFields, EditorFields):
    """The body of ``POST /v1/models/model:predict``."""

    prompt: NonEmptyStr | None = None
    prefix: StrictStr | None = None
    suffix: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    instruction: NonEmptyStr | None = None
    input: StrictStr | None = None

    stream: StrictBool = False

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
        if self.prefix is None and any(getattr(self, f) is not None for f in REPO_FIELDS):
            raise ValueError('"repo_name", "path" and "files" go with "prefix" (fill-in-the-middle)')
        return self

    def to_request(self) -> GenerationRequest:
        """The request in the engine's terms: only what the client sent, so the model's own generation defaults
        still apply to the rest. Plain text cannot interleave several sequences, and n > 1 must sample."""
        values = {**self.set_parameters(), **self.sampling_values()}
        if "num_return_sequences" in values:
            values["n"] = values.pop("num_return_sequences")
        if self.stop_at is not None:
            values["stop_at"] = self.completion_ending()
        return GenerationRequest(
            prompts=(self._prompt(),),
            sampling=SamplingParams.model_validate(values),
            output=OutputOptions(stream=self.stream, several_per_stream=False, distinct_sequences=True),
            names=PREDICT_NAMES,
        )

    def _prompt(self) -> Prompt:
        if self.prompt is not None:
            return TextPrompt(self.prompt)
        if self.prefix is not None:
            return FimPrompt(self.prefix, self.suffix or "", field="prefix", context=self.repo_context())
        if self.messages is not None:
            return ChatPrompt(tuple((m.role, m.content) for m in self.messages))
        assert self.instruction is not None
        return InstructionPrompt(self.instruction, self.input)

    def echo(self) -> dict[str, Any]:
        """The input fields as the client sent them, for the response's ``data``."""
        fields = next(f for f in INPUT_FORMS.values() if any(getattr(self, name) is not None for name in f))
        return self.model_dump(include={name for name in fields if getattr(self, name) is not None})
