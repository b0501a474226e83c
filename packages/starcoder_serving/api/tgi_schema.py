"""Text Generation Inference's request shape, served on ``predict`` for IDE plugins and huggingface_hub.

llm-vscode, llm.nvim, Continue's TGI provider and ``huggingface_hub.InferenceClient.text_generation``
send ``{"inputs": "...", "parameters": {...}, "stream": bool}``. A predict body with ``inputs`` is read
as this shape; any other body is the seed contract (``prompt``, ``prefix``, ``messages``, ...), which
never has an ``inputs`` field (predict refuses it). huggingface_hub sends every parameter, null when
unset: null means "not set". What cannot be honoured is refused by name.
"""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from pydantic import Field, StrictBool, StrictInt, StrictStr

from starcoder_serving.api.common_fields import stop_sequences
from starcoder_serving.engine.request import FieldNames, GenerationRequest, OutputOptions, TextPrompt
from starcoder_serving.engine.sampling_params import (
    MAX_TOP_LOGPROBS,
    AdditivePenalty,
    Probability,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    Temperature,
)
from starcoder_serving.errors import InvalidRequest

# Non-null values refused, with the reason.
UNSUPPORTED: dict[str, str] = {
    "watermark": "watermarking is not available on this server",
    "grammar": "grammar-constrained generation is not available on this server",
    "adapter_id": "adapters (LoRA) are not available on this server",
}


class LlmLsNestedParameters(pydantic.BaseModel):
    """llm-ls 0.5.3 (crates/llm-ls/src/backend.rs, ``build_body``) sends ``"parameters": {"parameters":
    {"return_full_text": false}}`` when the user's llm.requestBody has no ``parameters`` object: read as
    ``parameters.return_full_text``."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    return_full_text: StrictBool | None = None


class TgiParameters(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    max_new_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    do_sample: StrictBool | None = None
    temperature: Temperature | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    top_p: Probability | None = None
    typical_p: Probability | None = None
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: AdditivePenalty | None = None
    seed: Seed | None = None
    # Any number here: validation refuses more than max_stop_sequences with a message giving the limit.
    stop: list[StrictStr] | None = None
    return_full_text: StrictBool | None = None
    details: StrictBool | None = None
    decoder_input_details: StrictBool | None = None
    top_n_tokens: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    truncate: Annotated[StrictInt, Field(ge=1)] | None = None
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    watermark: StrictBool | None = None
    grammar: Any = None
    adapter_id: Any = None
    parameters: LlmLsNestedParameters | None = None

    @pydantic.model_validator(mode="after")
    def _llm_ls_nested(self) -> TgiParameters:
        if self.parameters is not None and self.return_full_text is None:
            self.return_full_text = self.parameters.return_full_text
        return self


class TgiRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    inputs: Annotated[StrictStr, Field(min_length=1)]
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: StrictBool = False

    def check_supported(self) -> None:
        p = self.parameters
        for name, reason in UNSUPPORTED.items():
            if getattr(p, name) not in (None, False):
                raise InvalidRequest(f"`parameters.{name}` is not supported: {reason}.", param=f"parameters.{name}")
        if p.best_of not in (None, 1):
            raise InvalidRequest(
                "`parameters.best_of` > 1 is not supported: this server does not rank candidates.",
                param="parameters.best_of",
            )

    @property
    def wants_details(self) -> bool:
        return bool(self.parameters.details)

    def to_request(self) -> GenerationRequest:
        p = self.parameters
        return GenerationRequest(
            prompts=(TextPrompt(self.inputs, field="inputs"),),
            sampling=self._sampling_params(),
            # The prompt's own tokens are scored for `prefill`, which only a whole answer's details carry.
            output=OutputOptions(
                stream=self.stream, score_prompt=bool(p.details and p.decoder_input_details and not self.stream)
            ),
            names=TGI_NAMES,
            truncate_prompt=p.truncate,
        )

    def _sampling_params(self) -> SamplingParams:
        """TGI's meaning: sampling is on when do_sample is, or when any sampling warper is set."""
        p = self.parameters
        values: dict[str, Any] = {"logprobs": p.top_n_tokens or 0}  # every token's logprob (details, streams)
        for name in ("max_new_tokens", "repetition_penalty", "frequency_penalty", "seed"):
            if getattr(p, name) is not None:
                values[name] = getattr(p, name)
        if p.stop:
            values["stop"] = stop_sequences(p.stop)
        warpers = {
            "temperature": p.temperature if p.temperature not in (None, 1.0) else None,
            "top_k": p.top_k if p.top_k else None,
            "top_p": p.top_p if p.top_p not in (None, 1.0) else None,
            "typical_p": p.typical_p if p.typical_p not in (None, 1.0) else None,
        }
        if p.do_sample or any(value is not None for value in warpers.values()):
            values["do_sample"] = True
            values["top_k"] = 0  # TGI applies no top-k unless asked (transformers' default is 50)
            values.update({name: value for name, value in warpers.items() if value is not None})
        return SamplingParams.model_validate(values)


# Every parameter is a field of `parameters`.
TGI_NAMES = FieldNames(
    {**{name: f"parameters.{name}" for name in TgiParameters.model_fields}, "logprobs": "parameters.top_n_tokens"}
)
