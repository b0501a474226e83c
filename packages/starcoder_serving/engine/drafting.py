"""Draft tokens for speculative decoding, from the request's own text (prompt lookup / n-gram drafting).

Code repeats itself: an edit rewrites the function in the prompt, a completion reuses the names and lines above
it. The drafter matches the last ``n`` tokens of a request's sequence (prompt and output) against an earlier
place in the same sequence and proposes the tokens that followed there; the model then checks them all in one
forward pass (``speculation.py``). Nothing is learnt and no second model runs: a draft costs a few
dictionary lookups on the batch thread.

The most recent earlier occurrence wins (the nearest context is the likeliest to be repeated, and when the
model loops, the loop itself), and longer matches are tried before shorter ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# Longest and shortest suffix matched. A single token matches almost anywhere in code (indentation, brackets)
# and would mostly draft noise; two tokens already pin a place down.
MAX_NGRAM = 4
MIN_NGRAM = 2


class Drafter(Protocol):
    """Proposes up to ``k`` tokens to follow ``tokens`` (a request's prompt and output so far)."""

    def propose(self, request_id: str, tokens: TokenHistory, k: int) -> list[int]: ...

    def forget(self, request_id: str) -> None: ...


class TokenHistory:
    """A request's tokens (prompt, then output) and where each of their n-grams last ended, for O(1) lookups.

    The index covers the n-grams ending before the last token: the n-gram ending *at* the last token is the one
    looked up. It is built once from the prompt (``dict(zip(...))``: about 1 ms per n-gram size for 8,000 tokens)
    and grows by a few dictionary entries per generated token, so a step's lookup costs microseconds whatever the
    prompt's length."""

    __slots__ = ("_indexed", "_last_end", "max_ngram", "min_ngram", "tokens")

    def __init__(self, prompt: Sequence[int], max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> None:
        self.tokens: list[int] = list(prompt)
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._last_end: dict[int, dict[tuple[int, ...], int]] = {}
        self._indexed = 0  # n-grams ending before this position are indexed

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)

    def _index(self) -> None:
        tokens, end = self.tokens, len(self.tokens) - 1
        if end <= self._indexed:
            return
        if not self._last_end:  # the prompt, in bulk: later occurrences overwrite earlier ones
            for n in range(self.min_ngram, self.max_ngram + 1):
                grams = zip(*(tokens[i : end + i + 1 - n] for i in range(n)))
                self._last_end[n] = dict(zip(grams, range(n - 1, end)))
        else:
            for position in range(self._indexed, end):
                for n, last_end in self._last_end.items():
                    if position + 1 >= n:
                        last_end[tuple(tokens[position + 1 - n : position + 1])] = position
        self._indexed = end

    def lookup(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of the sequence's last n tokens (the longest
        n from ``max_ngram`` down to ``min_ngram`` that occurs earlier), or [] when none does."""
        if k <= 0 or len(self.tokens) <= self.min_ngram:
            return []
        self._index()
        tokens = self.tokens
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            end = self._last_end[n].get(tuple(tokens[-n:]))
            if end is not None:
                return tokens[end + 1 : end + 1 + k]
        return []


class NgramDrafter:
    """Prompt-lookup drafting over each request's own sequence (``TokenHistory.lookup``)."""

    def propose(self, request_id: str, tokens: TokenHistory, k: int) -> list[int]:
        return tokens.lookup(k)

    def forget(self, request_id: str) -> None:
        pass


class OracleDrafter:
    """For measurement and tests: drafts from known continuations (``references``: each a request's prompt followed
    by its output without speculation), the first ``round(k * acceptance)`` of them right and the rest wrong, so
    a benchmark can set the acceptance rate (0: every draft wrong, the cost of checking; 1: every draft right)."""

    def __init__(self, references: Sequence[Sequence[int]], acceptance: float, vocab_size: int) -> None:
        self._references = [list(reference) for reference in references]
        self.acceptance = acceptance
        self._vocab_size = vocab_size
        self._found: dict[str, list[int]] = {}  # request id -> its reference, found at its first draft

    def propose(self, request_id: str, tokens: TokenHistory, k: int) -> list[int]:
        seen = tokens.tokens
        reference = self._found.get(request_id)
        if reference is None:
            reference = next((ref for ref in self._references if ref[: len(seen)] == seen), None)
            if reference is None:
                return []
            self._found[request_id] = reference
        following = reference[len(seen) : len(seen) + k]
        right = round(len(following) * self.acceptance)
        return following[:right] + [(token + 1) % self._vocab_size for token in following[right:]]

    def forget(self, request_id: str) -> None:
        self._found.pop(request_id, None)
