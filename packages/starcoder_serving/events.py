"""What a generation produces, token by token: the vocabulary shared by the engine (which writes it) and the text
layer (which reads it). It imports nothing of the package, so neither of them depends on the other through it."""

from __future__ import annotations

import dataclasses
import enum


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop sequence was generated
    LENGTH = "length"  # max_new_tokens (or max_time) reached
    EOS = "eos"  # the model ended the text (<|endoftext|> or another end token)
    CANCELLED = "cancelled"  # the client went away


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model's own distribution (README, "Logprobs"), and the ``top`` most
    likely tokens of that step as (token id, logprob) pairs."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEvent:
    """New tokens of one sequence, in order: those of one step while a job streams, every token at once at the
    end of a quiet job. ``logprobs`` has one entry per token when the plan asked for logprobs, else none."""

    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class DoneEvent:
    reason: FinishReason | None = None  # None when failed
    error: Exception | None = None


Event = TokenEvent | DoneEvent
