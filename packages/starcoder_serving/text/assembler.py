"""Token events to completion text: incremental detokenization, stop sequences, editor-style endings
(``stop_at``, ``completion_endings.py``), finish reason.

Runs on the event loop, identically for streamed and non-streamed requests and for both generation
paths, so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from starcoder_serving.events import DoneEvent, FinishReason, TokenEvent, TokenLogprob
from starcoder_serving.text.completion_endings import CompletionEnding, CompletionEndingMatcher
from starcoder_serving.text.detokenizer import IncrementalDetokenizer
from starcoder_serving.text.stop_sequences import StopScan, StopSequenceMatcher


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

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], ending: CompletionEnding | None = None) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._matcher = StopSequenceMatcher(stop)
        self._ending = None if ending is None else CompletionEndingMatcher(ending)
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
            tail = self._scan(self._detokenizer.flush())
            if not tail.stopped:
                rest = self._finish()
                tail = StopScan(tail.emit + rest.emit, rest.stopped)
            text = tail.emit
            self.reason = FinishReason.STOP if tail.stopped else event.reason
        elif not self._matcher.active and self._ending is None:
            # No stop sequence to find: every token belongs to the completion, decoded together.
            self._take(event.token_ids, event.logprobs)
            text = self._detokenizer.push_many(event.token_ids)
        else:
            # Token by token: the completion (its tokens and logprobs too) ends at the token that completes a stop.
            pieces = []
            for i, token_id in enumerate(event.token_ids):
                self._take(event.token_ids[i : i + 1], event.logprobs[i : i + 1])
                scan = self._scan(self._detokenizer.push(token_id))
                pieces.append(scan.emit)
                if scan.stopped:
                    self.reason = FinishReason.STOP
                    break
            text = "".join(pieces)
        self._parts.append(text)
        return text

    def _scan(self, text: str) -> StopScan:
        """Stop sequences first, then the editor-style ending over what they let through: the first end wins."""
        scan = self._matcher.feed(text)
        if self._ending is None:
            return scan
        ended = self._ending.feed(scan.emit)
        if scan.stopped and not ended.stopped:  # ended by a stop sequence: what the ending held is text before it
            return StopScan(ended.emit + self._ending.flush(), True)
        return StopScan(ended.emit, scan.stopped or ended.stopped)

    def _finish(self) -> StopScan:
        """The generation ended on its own: the text the matchers held back."""
        held = self._matcher.flush()
        if self._ending is None:
            return StopScan(held, False)
        scan = self._ending.feed(held)
        return scan if scan.stopped else StopScan(scan.emit + self._ending.flush(), False)

    def _take(self, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprob, ...]) -> None:
        self.completion_tokens += len(token_ids)
        self._pending_logprobs.extend(logprobs)
        self._all_logprobs.extend(logprobs)

    def take_pending_logprobs(self) -> tuple[TokenLogprob, ...]:
        pending, self._pending_logprobs = tuple(self._pending_logprobs), []
        return pending

    def completion(self, prompt_tokens: int) -> Completion:
        assert self.reason is not None
        return Completion(
            "".join(self._parts), self.reason, prompt_tokens, self.completion_tokens, tuple(self._all_logprobs)
        )
