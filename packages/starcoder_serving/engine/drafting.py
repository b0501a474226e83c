"""Draft tokens for speculative decoding, from the request's own text (prompt lookup / n-gram drafting).

Code repeats itself: an edit rewrites the function in the prompt, a completion reuses the names and lines above
it. The drafter matches the last ``n`` tokens of a request's sequence (prompt and output) against an earlier
place in the same sequence and proposes the tokens that followed there; the model then checks them all in one
forward pass (``speculation.py``). Nothing is learnt and no second model runs: a draft costs a few
microseconds of numpy on the batch thread.

The most recent earlier occurrence wins (the nearest context is the likeliest to be repeated, and when the
model loops, the loop itself), and longer matches are tried before shorter ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy

# Longest and shortest suffix matched. A single token matches almost anywhere in code (indentation, brackets)
# and would mostly draft noise; two tokens already pin a place down.
MAX_NGRAM = 4
MIN_NGRAM = 2


class Drafter(Protocol):
    """Proposes up to ``k`` tokens to follow ``tokens`` (a request's prompt and output so far)."""

    def propose(self, request_id: str, tokens: TokenHistory, k: int) -> list[int]: ...

    def forget(self, request_id: str) -> None: ...


class TokenHistory:
    """A request's tokens (prompt, then output) in a growing numpy array: appended to, never copied whole per step."""

    __slots__ = ("_array", "length")

    def __init__(self, prompt: Sequence[int], capacity: int) -> None:
        self._array = numpy.empty(max(capacity, len(prompt) + 1), dtype=numpy.int64)
        self._array[: len(prompt)] = prompt
        self.length = len(prompt)

    def extend(self, tokens: Sequence[int]) -> None:
        end = self.length + len(tokens)
        if end > len(self._array):
            grown = numpy.empty(max(end, 2 * len(self._array)), dtype=numpy.int64)
            grown[: self.length] = self._array[: self.length]
            self._array = grown
        self._array[self.length : end] = tokens
        self.length = end

    @property
    def tokens(self) -> numpy.ndarray:
        return self._array[: self.length]


def lookup(tokens: numpy.ndarray, k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the sequence's last n tokens (the longest n
    from ``max_ngram`` down to ``min_ngram`` that occurs earlier), or [] when none does."""
    length = len(tokens)
    if k <= 0 or length < min_ngram + 1:
        return []
    last = tokens[-1]
    # Candidate ends: earlier places holding the last token (never the sequence's own end).
    ends = numpy.flatnonzero(tokens[: length - 1] == last)
    if ends.size == 0:
        return []
    matched = numpy.ones(ends.size, dtype=bool)
    best: numpy.ndarray | None = None
    for n in range(2, max_ngram + 1):
        back = ends - (n - 1)
        ok = back >= 0
        matched &= ok
        matched[ok] &= tokens[back[ok]] == tokens[length - n]
        if not matched.any():
            break
        if n >= min_ngram:
            best = ends[matched]
    if best is None:
        return []
    start = int(best[-1]) + 1  # the most recent match
    return tokens[start : min(start + k, length)].tolist()


class NgramDrafter:
    """Prompt-lookup drafting over each request's own sequence."""

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, request_id: str, tokens: TokenHistory, k: int) -> list[int]:
        return lookup(tokens.tokens, k, self.max_ngram, self.min_ngram)

    def forget(self, request_id: str) -> None:
        pass


class OracleDrafter:
    """For measurement and tests: drafts from known continuations (``references``: each a request's prompt followed
    by its output without speculation), the first ``round(k * acceptance)`` of them right and the rest wrong, so
    a benchmark can set the acceptance rate (0: every draft wrong, the cost of checking; 1: every draft right)."""

    def __init__(self, references: Sequence[Sequence[int]], acceptance: float, vocab_size: int) -> None:
        self._references = [numpy.asarray(reference, dtype=numpy.int64) for reference in references]
        self.acceptance = acceptance
        self._vocab_size = vocab_size

    def propose(self, request_id: str, tokens: TokenHistory, k: int) -> list[int]:
        seen = tokens.tokens
        for reference in self._references:
            if len(reference) > len(seen) and numpy.array_equal(reference[: len(seen)], seen):
                following = reference[len(seen) : len(seen) + k].tolist()
                right = round(len(following) * self.acceptance)
                return following[:right] + [(token + 1) % self._vocab_size for token in following[right:]]
        return []

    def forget(self, request_id: str) -> None:
        pass
