"""Each token's bytes and text as the APIs show them in logprobs and TGI's token details, and where each token's
text lies in the text returned (OpenAI's ``text_offset``, TGI's streamed token texts)."""

from __future__ import annotations

import codecs
import functools
from collections.abc import Callable, Sequence
from typing import Any

from starcoder_serving.text.detokenizer import plain_decoder


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE token characters back to bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


class TokenTexts:
    """Each token's bytes and its text as OpenAI shows it ("bytes:\\xe2" for a partial character)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special = set(tokenizer.all_special_ids)
        self._decode_shown = plain_decoder(tokenizer)  # as completions are decoded: without special tokens

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per server
    def bytes_of(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        decoder = _byte_decoder()
        if piece is not None and token_id not in self._special and all(char in decoder for char in piece):
            return bytes(decoder[char] for char in piece)
        return str(self._tokenizer.decode([token_id])).encode("utf-8")

    def text_of(self, token_id: int) -> str:
        raw = self.bytes_of(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one instance per server
    def shown_bytes_of(self, token_id: int) -> bytes:
        """What this token adds to a completion's text: its bytes, or none for a token the text leaves out (a
        special token: completions are decoded with skip_special_tokens, see ``IncrementalDetokenizer``)."""
        return self.bytes_of(token_id) if self._decode_shown([token_id]) else b""


class TextPositions:
    """Where each token's text starts in a text decoded from those tokens, one token after another.

    A token adds the characters it completes: a partial UTF-8 character counts at the token that completes it (an
    invalid byte, as U+FFFD, at the token that shows it invalid), as the incremental detokenizer emits them.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], start: int = 0) -> None:
        self._bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.end = start  # where the next token's text starts

    def advance(self, token_id: int) -> int:
        """This token's start; moves past its text."""
        start = self.end
        self.end += len(self._utf8.decode(self._bytes(token_id)))
        return start


class TokenPieces:
    """A completion's text, split into the pieces its tokens add (TGI's token texts): the pieces of each batch of
    tokens concatenate to exactly the text that came with them. A token the text leaves out (a special token) gets
    an empty piece; text held back (by a possible stop sequence) goes to the first token after it that adds text;
    text cut by a stop sequence goes to none."""

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts
        self._positions = TextPositions(texts.shown_bytes_of)
        self._shown = 0  # the length of the text split so far

    def split(self, token_ids: Sequence[int], text: str) -> tuple[list[str], str]:
        """Each token's piece of ``text`` (the text these tokens came with), and what none of them takes: all of
        it when none adds text (the end of a character cut short, after a special token or none)."""
        low = self._shown
        high = self._shown = low + len(text)
        starts = [min(max(self._positions.advance(token_id), low), high) for token_id in token_ids]
        owners = [i for i, token_id in enumerate(token_ids) if self._texts.shown_bytes_of(token_id)]
        pieces = [""] * len(token_ids)
        if not owners:
            return pieces, text
        bounds = [low] + [starts[i] for i in owners[1:]]
        for i, start, end in zip(owners, bounds, [*bounds[1:], high]):
            pieces[i] = text[start - low : end - low]
        return pieces, ""
