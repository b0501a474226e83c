"""One typed object for how a sequence is decoded: built by every route, read by path choice and both workers.

Like vLLM's ``SamplingParams``: the HTTP layer maps its own field names onto these (predict speaks
transformers' ``GenerationConfig`` names, the OpenAI routes speak OpenAI's), and nothing below the
routes sees a request dict. The value types declared here (ranges included) are the ones the predict
schema reuses, so a range is written once.

Adding a sampling parameter: a field here, the request field that sets it (``api/``), and its row
operation in ``batch_sampler.py`` (plus ``generate_kwargs`` if ``generate()`` must see it).
"""

from __future__ import annotations

import functools
import random
import warnings
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, StrictInt

from starcoder_serving.text.completion_endings import CompletionEnding

# Below this a temperature is greedy decoding (vLLM's epsilon): dividing logits by 1e-46 gives infinities.
GREEDY_TEMPERATURE = 1e-5

TokenId = Annotated[StrictInt, Field(ge=0)]
Temperature = Annotated[float, Field(gt=0.0, le=100.0)]
Probability = Annotated[float, Field(gt=0.0, le=1.0)]
Cutoff = Annotated[float, Field(ge=0.0, lt=1.0)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
# Any positive value, as in transformers: the samplers keep the infinities an extreme one makes in its own row.
RepetitionPenalty = Annotated[float, Field(gt=0.0)]
AdditivePenalty = Annotated[float, Field(ge=-2.0, le=2.0)]  # OpenAI's presence/frequency range
LogitBias = Annotated[float, Field(ge=-100.0, le=100.0)]  # OpenAI's range
# Seeds are 0 .. 2**63 - 1: what torch.manual_seed and the batch's int64 tensors hold.
SEEDS = 2**63
Seed = Annotated[StrictInt, Field(ge=0, le=SEEDS - 1)]
MAX_TOP_LOGPROBS = 20


class SamplingParams(pydantic.BaseModel):
    """How to decode one request (``n`` sequences). Defaults are transformers' greedy decoding."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    # Length. max_length / min_length count the prompt (transformers' meaning); planning resolves them.
    max_new_tokens: Annotated[int, Field(ge=1)] | None = None
    max_length: Annotated[int, Field(ge=1)] | None = None
    min_new_tokens: Annotated[int, Field(ge=0)] = 0
    # vLLM's ignore_eos (benchmark clients): generate exactly max_new_tokens, the end tokens banned until then.
    ignore_eos: bool = False
    min_length: Annotated[int, Field(ge=0)] | None = None
    max_time: Annotated[float, Field(gt=0.0, le=600.0)] | None = None
    # Strategy.
    do_sample: bool = False
    n: Annotated[int, Field(ge=1)] = 1
    seed: Seed | None = None
    num_beams: Annotated[int, Field(ge=1)] = 1
    early_stopping: bool | Literal["never"] | None = None
    length_penalty: float | None = None
    # Sampling warpers (sampled rows only).
    temperature: Temperature = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0  # 0: off
    top_p: Probability = 1.0
    min_p: MinP = 0.0
    typical_p: Probability = 1.0
    epsilon_cutoff: Cutoff = 0.0
    eta_cutoff: Cutoff = 0.0
    # Penalties and token control.
    repetition_penalty: RepetitionPenalty = 1.0
    presence_penalty: AdditivePenalty = 0.0
    frequency_penalty: AdditivePenalty = 0.0
    logit_bias: dict[int, LogitBias] = Field(default_factory=dict)
    no_repeat_ngram_size: Annotated[int, Field(ge=0)] = 0
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    suppress_tokens: tuple[int, ...] = ()
    begin_suppress_tokens: tuple[int, ...] = ()
    exponential_decay_length_penalty: tuple[Annotated[int, Field(ge=0)], Annotated[float, Field(gt=0.0)]] | None = None
    renormalize_logits: bool = False
    remove_invalid_values: bool = False
    # Output.
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # None: none; k: chosen + top k
    stop: tuple[str, ...] = ()
    # Editor-style ending (text/completion_endings.py): the request's mode, with the cursor's line filled in per
    # prompt by validation.
    stop_at: CompletionEnding | None = None

    @property
    def greedy(self) -> bool:
        """Greedy decoding: no sampling, or a temperature too small to divide by."""
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE

    @property
    def has_dynamic_bans(self) -> bool:
        """Bans that depend on the tokens so far: n-gram repeats and multi-token bad words (computed on the host
        from the request's sequence each step)."""
        return bool(self.no_repeat_ngram_size) or any(len(word) > 1 for word in self.bad_words_ids)

    @property
    def needs_host_history(self) -> bool:
        """Whether each step needs the request's latest token on the host: for its dynamic bans, and to read
        its logprobs back after the step."""
        return self.has_dynamic_bans or self.logprobs is not None

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1

    @staticmethod
    def inheritable(defaults: Mapping[str, Any]) -> dict[str, Any]:
        """The checkpoint's generation defaults that are valid sampling parameters (the rest are ignored)."""
        found: dict[str, Any] = {}
        for name, value in defaults.items():
            if name in _INHERITED and value is not None:
                try:
                    SamplingParams.model_validate({name: value})
                except pydantic.ValidationError:
                    continue
                found[name] = value
        return found

    def with_model_defaults(self, inheritable: Mapping[str, Any]) -> SamplingParams:
        """Fields the request did not set take the checkpoint's generation defaults (as ``generate()`` does)."""
        inherited = {name: value for name, value in inheritable.items() if name not in self.model_fields_set}
        if not inherited:
            return self
        return SamplingParams.model_validate({**inherited, **self.model_dump(include=self.model_fields_set)})

    def with_lengths(self, max_new_tokens: int, min_new_tokens: int) -> SamplingParams:
        """The lengths validation resolved for one prompt, as new-token counts (``max_length`` and ``min_length``,
        which count the prompt, are gone)."""
        update = {
            "max_new_tokens": max_new_tokens,
            "max_length": None,
            "min_new_tokens": max_new_tokens if self.ignore_eos else min_new_tokens,
            "min_length": None,
        }
        return self.model_copy(update=update)

    def check_with_transformers(self) -> None:
        """Let ``GenerationConfig.validate`` judge the combination the client sent (for example a
        temperature without sampling); raises ``ValueError`` with transformers' own explanation."""
        # n is not passed: the engine decodes n independent sequences itself.
        sent = tuple(sorted(self.model_dump(include=self.model_fields_set & _GENERATION_CONFIG_NAMES).items()))
        try:
            hash(sent)
        except TypeError:  # no field holds a list or dict today; should one, it is judged afresh each time
            _validate_generation_config.__wrapped__(sent)
            return
        _validate_generation_config(sent)

    def for_sequence(self, index: int) -> SamplingParams:
        """The parameters of the index-th of ``n`` sequences: its own seed (seed + index, wrapping past the largest
        seed to 0), so they differ.

        Unseeded sampling gets a random seed here, so every sampled sequence has one (and can report it).
        """
        seed = (self.seed + index) % SEEDS if self.seed is not None else None
        if seed is None and not self.greedy:
            seed = random.SystemRandom().getrandbits(63)
        return self.model_copy(update={"n": 1, "seed": seed})

    def generate_kwargs(self) -> dict[str, Any]:
        """transformers ``GenerationConfig`` keyword arguments for ``generate()`` and its validation.

        Only what differs from transformers' defaults (and from "off"), so ``GenerationConfig.validate``
        judges what the client asked for; presence/frequency penalties and logit_bias are our own
        processors, and stop/seed/logprobs/n are handled around ``generate()``.
        """
        out: dict[str, Any] = {}
        if self.max_new_tokens is not None:
            out["max_new_tokens"] = self.max_new_tokens
        if self.min_new_tokens:
            out["min_new_tokens"] = self.min_new_tokens
        if self.max_time is not None:
            out["max_time"] = self.max_time
        if self.num_beams > 1:
            out["num_beams"] = self.num_beams
        for name in ("early_stopping", "length_penalty"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if not self.greedy:
            out["do_sample"] = True
            out["temperature"] = self.temperature
            out["top_k"] = self.top_k  # 0: off, stated so transformers' default of 50 does not apply
            for name, off in (("top_p", 1.0), ("typical_p", 1.0), ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0)):
                if getattr(self, name) != off:
                    out[name] = getattr(self, name)
            if self.min_p:
                out["min_p"] = self.min_p
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            out["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.bad_words_ids:
            out["bad_words_ids"] = [list(word) for word in self.bad_words_ids]
        if self.suppress_tokens:
            out["suppress_tokens"] = list(self.suppress_tokens)
        if self.begin_suppress_tokens:
            out["begin_suppress_tokens"] = list(self.begin_suppress_tokens)
        if self.exponential_decay_length_penalty is not None:
            out["exponential_decay_length_penalty"] = tuple(self.exponential_decay_length_penalty)
        if self.renormalize_logits:
            out["renormalize_logits"] = True
        if self.remove_invalid_values:
            out["remove_invalid_values"] = True
        return out

    def token_ids(self) -> dict[str, list[int]]:
        """Every token id the parameters name, by field, to check against the vocabulary."""
        found = {
            "suppress_tokens": list(self.suppress_tokens),
            "begin_suppress_tokens": list(self.begin_suppress_tokens),
            "bad_words_ids": [token for word in self.bad_words_ids for token in word],
            "logit_bias": list(self.logit_bias),
        }
        return {name: ids for name, ids in found.items() if ids}


@functools.lru_cache(maxsize=4096)
def _validate_generation_config(sent: tuple[tuple[str, Any], ...]) -> None:
    """``GenerationConfig.validate`` of these parameters (hashable: the frozen model's values are tuples and
    scalars). Building and validating a GenerationConfig costs about a third of a millisecond; clients repeat
    the same few combinations, and a valid one is remembered (an invalid one raises, and is not)."""
    from transformers import GenerationConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        GenerationConfig(**dict(sent)).validate(strict=True)


# Fields that are transformers GenerationConfig parameters of the same name and meaning.
_GENERATION_CONFIG_NAMES = frozenset(SamplingParams.model_fields) - {
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "stop",
    "stop_at",
    "ignore_eos",
}
# What a checkpoint's generation_config.json may set for every request (not lengths: planning owns them).
_INHERITED = _GENERATION_CONFIG_NAMES - {"max_new_tokens", "max_length", "min_new_tokens", "min_length", "max_time"}
