"""Token ids to text, incrementally, without ever emitting half of a multi-byte UTF-8 character.

Byte-level BPE tokens can end in the middle of a character (an emoji is often 2-4 tokens); decoding
them alone yields U+FFFD. Like TGI and vLLM we decode a short window of recent tokens and emit only
text that is complete, so streamed chunks concatenate to exactly the non-streamed text. Cost per
token: one decode of a window of a few tokens, not of the whole completion.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Protocol

REPLACEMENT_CHARACTER = "\ufffd"


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


def plain_decoder(tokenizer: Decoder) -> Callable[[list[int]], str]:
    """``tokenizer.decode(ids, skip_special_tokens=True)``, as directly as the tokenizer allows.

    A fast tokenizer's decode is its Rust backend's plus an optional clean-up of spaces, which transformers
    skips for BPE vocabularies (StarCoder's: the clean-up corrupts code). Where no clean-up applies, the
    backend is called directly: the same text (tests/test_text_assembly.py holds them equal) without the
    wrapper's argument conversion, which costs more than the decode itself on every streamed token.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    cleans_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", True))
    if cleans_up and backend is not None and type(backend.model).__name__ == "BPE":
        forced = getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", True)
        cleans_up = bool(forced)
    if backend is None or cleans_up:
        return functools.partial(tokenizer.decode, skip_special_tokens=True)
    return functools.partial(backend.decode, skip_special_tokens=True)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder) -> None:
        self._decode = plain_decoder(tokenizer)
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window decoded for each new token
        self._read_offset = 0  # tokens before this are already emitted as text

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        return self.push_many((token_id,))

    def push_many(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the newly completed text (possibly empty). Two decodes however many tokens came."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHARACTER):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes as U+FFFD, as in a plain decode)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        rest = self._decode(self._ids[self._prefix_offset :])[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self._ids)
        return rest
