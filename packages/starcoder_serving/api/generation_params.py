"""The transformers ``GenerationConfig`` parameters a request may set, with their types and ranges.

An explicit allow-list (as TGI and vLLM keep one) rather than "whatever GenerationConfig accepts":
some of its attributes take Python objects, switch on debug outputs that change the return type,
or make transformers download custom decoding code from the hub. Anything not listed here is
refused with a message that names it. Cross-field rules (for example ``num_return_sequences``
greater than ``num_beams`` without sampling) are left to ``GenerationConfig.validate`` itself.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, StrictBool, StrictInt

from starcoder_serving.engine.sampling_params import (
    Cutoff,
    MinP,
    Probability,
    RepetitionPenalty,
    Temperature,
    TokenId,
)

# Parameters that only make sense as Python objects in-process; each gets its own explanation.
PYTHON_ONLY_PARAMETERS: dict[str, str] = {
    "streamer": 'it is a Python object; send "stream": true to receive the completion as it is generated',
    "logits_processor": "it is a list of Python objects; use the sampling parameters (temperature, top_k, "
    "top_p, repetition_penalty, suppress_tokens, bad_words_ids, ...) instead",
    "stopping_criteria": 'it is a list of Python objects; send "stop": ["..."] or max_new_tokens instead',
    "prefix_allowed_tokens_fn": "it is a Python function and cannot be sent over HTTP",
    "assistant_model": "assisted decoding with a second model is not available on this server",
    "assistant_tokenizer": "assisted decoding with a second model is not available on this server",
    "generation_config": "send the individual parameters at the top level of the request instead",
    "logits_processor_list": "it is a list of Python objects and cannot be sent over HTTP",
    "synced_gpus": "it is a server-side setting",
    "negative_prompt_ids": "classifier-free guidance is not available on this server",
    "negative_prompt_attention_mask": "classifier-free guidance is not available on this server",
    "custom_generate": "loading decoding code from the hub is disabled on this server",
    "trust_remote_code": "loading code from the hub is disabled on this server",
    "tokenizer": "the server uses the model's own tokenizer",
    "input_ids": 'send the text as "prompt" instead',
    "attention_mask": "the server builds the attention mask itself",
    "stop_strings": 'this server takes stop sequences as "stop": ["..."]',
    "output_scores": "per-token log-probabilities are served by /v1/completions (logprobs)",
    "output_logits": "per-token log-probabilities are served by /v1/completions (logprobs)",
    "return_dict_in_generate": "the response shape is fixed by this API",
    "output_attentions": "the response shape is fixed by this API",
    "output_hidden_states": "the response shape is fixed by this API",
}


class GenerationParameters(pydantic.BaseModel):
    """Decoding parameters, named and ranged as in transformers' ``GenerationConfig``."""

    # strict: "0.5" is not a float and 1 is not a bool; an int is still accepted for a float.
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    # Length. `max_length` / `min_length` count the prompt, as in transformers.
    max_new_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_length: Annotated[StrictInt, Field(ge=1)] | None = None
    min_new_tokens: Annotated[StrictInt, Field(ge=0)] | None = None
    min_length: Annotated[StrictInt, Field(ge=0)] | None = None
    max_time: Annotated[float, Field(gt=0.0, le=600.0)] | None = None
    # Decoding strategy.
    do_sample: StrictBool | None = None
    num_beams: Annotated[StrictInt, Field(ge=1)] | None = None
    num_return_sequences: Annotated[StrictInt, Field(ge=1)] | None = None
    early_stopping: StrictBool | Literal["never"] | None = None
    length_penalty: float | None = None
    # Sampling.
    temperature: Temperature | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    top_p: Probability | None = None
    min_p: MinP | None = None
    typical_p: Probability | None = None
    epsilon_cutoff: Cutoff | None = None
    eta_cutoff: Cutoff | None = None
    # Penalties and token control.
    repetition_penalty: RepetitionPenalty | None = None
    no_repeat_ngram_size: Annotated[StrictInt, Field(ge=0)] | None = None
    bad_words_ids: Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(max_length=1024)] | None = None
    suppress_tokens: Annotated[list[TokenId], Field(max_length=4096)] | None = None
    begin_suppress_tokens: Annotated[list[TokenId], Field(max_length=4096)] | None = None
    # JSON has no tuples: the pair is sent as [start, factor] (lax here; its items stay strict).
    exponential_decay_length_penalty: (
        Annotated[tuple[Annotated[StrictInt, Field(ge=0)], Annotated[float, Field(gt=0.0)]], Field(strict=False)] | None
    ) = None
    renormalize_logits: StrictBool | None = None
    remove_invalid_values: StrictBool | None = None

    def set_parameters(self) -> dict[str, Any]:
        """Only what the client sent, so the model's own generation defaults still apply."""
        return self.model_dump(include=set(GenerationParameters.model_fields) & self.model_fields_set)
