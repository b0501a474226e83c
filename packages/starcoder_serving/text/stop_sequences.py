"""Cut generated text at the first completed stop sequence, holding back text that might start one.

While streaming, text that could be the beginning of a stop sequence is not sent until the next
tokens show whether it is; so a stop sequence never appears in the output, streamed or not.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class StopScan:
    emit: str  # text safe to send now
    stopped: bool  # a stop sequence was found; nothing after `emit` belongs to the completion


class StopSequenceMatcher:
    def __init__(self, stop_sequences: tuple[str, ...] | list[str]) -> None:
        self._stops = tuple(s for s in stop_sequences if s)
        self._held = ""

    @property
    def active(self) -> bool:
        """Whether there is any stop sequence to look for."""
        return bool(self._stops)

    def feed(self, text: str) -> StopScan:
        if not self._stops:
            return StopScan(text, False)
        buffer = self._held + text
        # The stop sequence that is *completed* first wins (ties: the longer one), as when generating
        # token by token; this makes the result the same however the text is split into pieces.
        found = [(i + len(s), i) for s in self._stops if (i := buffer.find(s)) >= 0]
        if found:
            self._held = ""
            _, cut = min(found)
            return StopScan(buffer[:cut], True)
        keep = self._longest_partial_match(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return StopScan(buffer[: len(buffer) - keep], False)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _longest_partial_match(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best
