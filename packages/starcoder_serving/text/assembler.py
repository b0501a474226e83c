"""Token events to completion text: incremental detokenization, stop sequences, finish reason.

Runs on the event loop, identically for streamed and non-streamed requests and for both generation
paths, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from starcoder_serving.engine.jobs import DoneEvent, FinishReason, TokenEvent, TokenLogprob
from starcoder_serving.text.detokenizer import IncrementalDetokenizer
from starcoder_serving.text.stop_sequences import StopSequenceMatcher


@dataclasses.dataclass(frozen=True)
class TextDelta:
    text: str
    token_logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: tuple[TokenLogprob, ...] = ()


# Called with the final Completion once a stream ends (usage accounting, finish_reason).
CompletionCallback = Callable[[Completion], None]


class TextAssembler:
    """Token events to completion text: incremental detokenization, stop sequences, finish reason."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._matcher = StopSequenceMatcher(stop)
        self._parts: list[str] = []
        self._pending_logprobs: list[TokenLogprob] = []
        self._all_logprobs: list[TokenLogprob] = []
        self.completion_tokens = 0
        self.reason: FinishReason | None = None

    def feed(self, event: TokenEvent | DoneEvent) -> str:
        """The text this event completes; sets ``reason`` when the completion is over. A failed generation's
        DoneEvent is not text: the engine raises its error to the client instead of feeding it here."""
        if isinstance(event, DoneEvent):
            assert event.error is None, "a failed generation's event reached the text assembler"
            tail = self._matcher.feed(self._detokenizer.flush())
            text = tail.emit if tail.stopped else tail.emit + self._matcher.flush()
            self.reason = FinishReason.STOP if tail.stopped else event.reason
        else:
            self.completion_tokens += 1
            if event.logprob is not None:
                self._pending_logprobs.append(event.logprob)
                self._all_logprobs.append(event.logprob)
            scan = self._matcher.feed(self._detokenizer.push(event.token_id))
            text = scan.emit
            if scan.stopped:
                self.reason = FinishReason.STOP
        self._parts.append(text)
        return text

    def take_pending_logprobs(self) -> tuple[TokenLogprob, ...]:
        pending, self._pending_logprobs = tuple(self._pending_logprobs), []
        return pending

    def completion(self, prompt_tokens: int) -> Completion:
        assert self.reason is not None
        return Completion(
            "".join(self._parts), self.reason, prompt_tokens, self.completion_tokens, tuple(self._all_logprobs)
        )
