"""Each token's bytes and text as the APIs show them in logprobs and TGI's token details."""

from __future__ import annotations

import functools
from typing import Any


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
