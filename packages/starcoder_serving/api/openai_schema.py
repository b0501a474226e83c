"""Request shapes of the OpenAI-compatible routes, and their mapping onto engine parameters.

``POST /v1/completions`` and ``POST /v1/chat/completions`` accept OpenAI's request bodies (plus
vLLM's ``top_k``, ``repetition_penalty`` and ``min_tokens``). Every field is either honoured or
refused with a 400 that says why: unknown fields, and known OpenAI fields this server cannot honour
(``tools``, ``best_of`` != n, ...), are never ignored.
The response bodies are built in ``openai_route``; their shapes follow OpenAI's API reference.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, StrictBool, StrictInt, StrictStr

from starcoder_serving.api.common_fields import REPO_FIELDS, STOP_SHAPE, CommonFields, EditorFields
from starcoder_serving.api.field_errors import describe_validation_error
from starcoder_serving.engine.request import (
    ChatPrompt,
    FieldNames,
    FimPrompt,
    GenerationRequest,
    OutputOptions,
    Prompt,
    TextPrompt,
    TokenPrompt,
)
from starcoder_serving.engine.sampling_params import AdditivePenalty, LogitBias, SamplingParams
from starcoder_serving.errors import InvalidRequest

PositiveInt = Annotated[StrictInt, Field(ge=1)]
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]

# OpenAI's defaults: sampling at temperature 1 with the whole distribution (no top-k, top_p 1).
DEFAULT_TEMPERATURE = 1.0
# The most prompts one /v1/completions request may batch.
MAX_PROMPTS = 64
# The most wrong logit_bias keys one message quotes (the rest are counted).
MAX_KEYS_NAMED = 10
# OpenAI's own limits on logprobs counts.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20

# Names people bring from the predict route or from transformers, with the OpenAI name to use.
FIELD_HINTS: dict[str, str] = {
    "max_new_tokens": "max_tokens",
    "max_length": "max_tokens",
    "min_new_tokens": "min_tokens",
    "do_sample": "temperature (0 is greedy, > 0 samples)",
    "num_return_sequences": "n",
    "stop_sequences": "stop",
    "prefix": "prompt (with suffix for fill-in-the-middle)",
}


class _Strict(pydantic.BaseModel):
    # strict: "0.5" is not a float and 1 is not a bool; an int is still accepted for a float.
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None


# The engine's names (transformers') as OpenAI spells them.
OPENAI_NAMES: dict[str, str] = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "do_sample": "temperature",
}


class SamplingRequest(CommonFields):
    """What both routes share. ``None`` (or an absent field) means OpenAI's default."""

    model: StrictStr | None = None
    max_tokens: PositiveInt | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: PositiveInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: AdditivePenalty | None = None
    frequency_penalty: AdditivePenalty | None = None
    # Token id (as a string, as JSON object keys are) -> bias added to its logit.
    logit_bias: Annotated[dict[StrictStr, LogitBias], Field(max_length=1024)] | None = None
    user: StrictStr | None = None
    # vLLM's extras.
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    min_tokens: Annotated[StrictInt, Field(ge=0)] | None = None

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def new_token_limit(self) -> int | None:
        return self.max_tokens

    def check_supported(self) -> None:
        """Refuse, by name, every sent parameter this server cannot honour."""
        bad = [key for key in self.logit_bias or {} if not (key.isascii() and key.isdigit() and len(key) <= 9)]
        if bad:
            shown = ", ".join(repr(key[:40]) for key in bad[:MAX_KEYS_NAMED])
            more = f" and {len(bad) - MAX_KEYS_NAMED} more" if len(bad) > MAX_KEYS_NAMED else ""
            raise InvalidRequest(
                f'`logit_bias` keys must be token ids written as decimal strings (like "50256"); got {shown}{more}.',
                param="logit_bias",
            )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest('`stream_options` is only allowed with "stream": true.', param="stream_options")

    def field_names(self) -> FieldNames:
        return FieldNames(OPENAI_NAMES)

    def sampling_params(self, logprobs: int | None) -> SamplingParams:
        """The request's decoding in the engine's terms (OpenAI's defaults: sampling at temperature 1)."""
        values: dict[str, Any] = {"n": self.choices_per_prompt, "logprobs": logprobs, **self.sampling_values()}
        limit = self.new_token_limit()
        if limit:  # 0: only the prompt is scored
            values["max_new_tokens"] = limit
        if self.min_tokens:
            values["min_new_tokens"] = self.min_tokens
        for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        if self.logit_bias:
            values["logit_bias"] = {int(token): bias for token, bias in self.logit_bias.items()}
        temperature = DEFAULT_TEMPERATURE if self.temperature is None else self.temperature
        if temperature == 0.0:
            # Greedy: top_p / top_k cannot change the argmax, so they are honoured by construction.
            values["do_sample"] = False
            return SamplingParams.model_validate(values)
        values["do_sample"] = True
        values["temperature"] = temperature
        # OpenAI samples from the whole distribution: switch off transformers' default top_k=50.
        values["top_k"] = self.top_k if self.top_k is not None and self.top_k > 0 else 0
        if self.top_p is not None:
            values["top_p"] = self.top_p
        return SamplingParams.model_validate(values)


class CompletionRequest(SamplingRequest, EditorFields):
    """The body of ``POST /v1/completions``."""

    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    suffix: StrictStr | None = None
    # 0 is allowed with echo + logprobs: score the prompt and generate nothing (lm-evaluation-harness).
    max_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    echo: StrictBool | None = None
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    best_of: PositiveInt | None = None

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            raise InvalidRequest(
                "`best_of` other than n is not supported: this server does not rank candidates. "
                "Leave it out (or send best_of equal to n).",
                param="best_of",
            )

    def to_request(self) -> GenerationRequest:
        sampling = self.sampling_params(self.logprobs)
        if self.stop_at is not None:
            sampling = sampling.model_copy(update={"stop_at": self.completion_ending()})
        return GenerationRequest(
            prompts=tuple(self._prompt(prompt) for prompt in self.prompts()),
            sampling=sampling,
            output=OutputOptions(
                stream=self.streaming,
                echo=bool(self.echo),
                # echo with logprobs: the prompt's own tokens get logprobs too (evaluation harnesses' loglikelihood).
                score_prompt=bool(self.echo) and self.logprobs is not None,
                generate=self.max_tokens != 0,
            ),
            names=self.field_names(),
        )

    def _prompt(self, prompt: str | list[int]) -> Prompt:
        context = self.repo_context()
        if self.suffix is not None or context is not None:
            # Repository context makes the prompt the prefix of a fill-in-the-middle (an empty suffix if none).
            return FimPrompt(
                prompt if isinstance(prompt, str) else tuple(prompt),
                self.suffix or "",
                field="suffix" if self.suffix is not None else REPO_FIELDS[2],
                context=context,
            )
        return TextPrompt(prompt) if isinstance(prompt, str) else TokenPrompt(tuple(prompt))


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


# What the official SDK writes into an assistant message it returns (``message.model_dump()``), null when
# unused: accepted as null (or empty), refused with the reason otherwise.
NULL_ONLY_MESSAGE_FIELDS: dict[str, str] = {
    "refusal": "refusals are not part of this model's conversations",
    "annotations": "message annotations are not supported",
    "audio": "audio is not supported",
    "function_call": "function calling is not supported by this model",
    "tool_calls": "tool calling is not supported by this model",
}


class ChatMessage(_Strict):
    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | Annotated[list[TextPart], Field(min_length=1)]
    # A participant's name: accepted (the prompt templates have no place for it).
    name: StrictStr | None = None
    refusal: Any = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None
    tool_calls: Any = None

    @pydantic.field_validator(*NULL_ONLY_MESSAGE_FIELDS)
    @classmethod
    def _only_null(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        if value not in (None, []):
            raise ValueError(f"must be null or left out: {NULL_ONLY_MESSAGE_FIELDS[str(info.field_name)]}")
        return value

    def as_template_message(self) -> tuple[str, str]:
        """(role, text) as the prompt templates take it."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return ("system" if self.role == "developer" else self.role, text)


# Known OpenAI chat fields this model cannot honour, with the reason given to the client.
UNSUPPORTED_CHAT_FIELDS: dict[str, str] = {
    "tools": "tool (function) calling is not supported by this model",
    "tool_choice": "tool (function) calling is not supported by this model",
    "parallel_tool_calls": "tool (function) calling is not supported by this model",
    "functions": "function calling is not supported by this model",
    "function_call": "function calling is not supported by this model",
    "response_format": 'structured output is not supported; only {"type": "text"} is accepted',
    "audio": "audio output is not supported",
    "modalities": 'only text output is supported; send ["text"] or leave it out',
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "this model does not reason",
    "store": "completions are not stored on this server; send false or leave it out",
    "metadata": "metadata is kept only with stored completions, and this server stores none",
    "service_tier": 'there is one service tier; send "auto" or "default", or leave it out',
}


class ChatCompletionRequest(SamplingRequest):
    """The body of ``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_CHAT_TOP_LOGPROBS)] | None = None
    # Accepted only in their harmless forms; see check_supported.
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None

    def new_token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_supported(self) -> None:
        super().check_supported()
        for name, reason in UNSUPPORTED_CHAT_FIELDS.items():
            value = getattr(self, name)
            harmless = (
                value is None
                or (name in ("tools", "functions") and value == [])
                or (name == "tool_choice" and value == "none")
                or (name == "response_format" and value == {"type": "text"})
                or (name == "modalities" and value == ["text"])
                or (name == "store" and value is False)
                or (name == "metadata" and value == {})
                or (name == "service_tier" and value in ("auto", "default"))
            )
            if not harmless:
                raise InvalidRequest(f"`{name}` is not supported: {reason}.", param=name)
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise InvalidRequest(
                "Send either `max_tokens` or `max_completion_tokens`, not two different values.",
                param="max_completion_tokens",
            )
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest('`top_logprobs` needs "logprobs": true.', param="top_logprobs")

    def field_names(self) -> FieldNames:
        limit = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return FieldNames({**OPENAI_NAMES, "max_new_tokens": limit, "logprobs": "top_logprobs"})

    def to_request(self) -> GenerationRequest:
        messages = tuple(message.as_template_message() for message in self.messages)
        return GenerationRequest(
            prompts=(ChatPrompt(messages),),
            sampling=self.sampling_params(self.chosen_logprobs),
            output=OutputOptions(stream=self.streaming),
            names=self.field_names(),
        )

    @property
    def chosen_logprobs(self) -> int | None:
        """The engine's top_logprobs: None for no logprobs, k for the chosen token plus the top k."""
        if not self.logprobs:
            return None
        return self.top_logprobs or 0


# Fields that take one of several shapes: one sentence for the field instead of one per shape.
UNION_FIELDS: dict[str, str] = {
    "prompt": f"a string, a list of strings, a list of token ids (ints >= 0) or a list of such lists (at most {MAX_PROMPTS})",
    "stop": STOP_SHAPE,
    "content": 'a string or a list of {"type": "text", "text": "..."} parts',
}


def _parse(model: type[pydantic.BaseModel], body: dict[str, Any], route: str) -> Any:
    known = frozenset(model.model_fields)
    unknown = sorted(set(body) - known)
    if unknown:
        names = ", ".join(
            f"`{name}`" + (f" (use {FIELD_HINTS[name]})" if name in FIELD_HINTS else "") for name in unknown
        )
        raise InvalidRequest(
            f"Unknown parameter{'s' if len(unknown) > 1 else ''} {names} for {route}. Remove "
            f"{'them' if len(unknown) > 1 else 'it'}; accepted parameters are: {', '.join(sorted(known))}.",
            param=unknown[0],
        )
    try:
        parsed = model.model_validate(body)
    except pydantic.ValidationError as exc:
        raise describe_validation_error(exc, shapes=UNION_FIELDS) from None
    parsed.check_supported()
    return parsed


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    return _parse(CompletionRequest, body, "/v1/completions")  # type: ignore[no-any-return]


def parse_chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body, "/v1/chat/completions")  # type: ignore[no-any-return]


def error_body(message: str, error_type: str, param: str | None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; its clients turn it (with the status code) into their usual exceptions."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


FINISH_REASONS: dict[str, str] = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop"}
