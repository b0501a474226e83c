"""A checkpoint's shape, read from its own ``config.json``: context window, attention layout, KV bytes per token.

StarCoder (``gpt_bigcode``) and StarCoder2 (``starcoder2``) name the same facts differently:

| fact | gpt_bigcode | starcoder2 (and other llama-style configs) |
| --- | --- | --- |
| context window | ``n_positions`` | ``max_position_embeddings`` |
| layers | ``n_layer`` | ``num_hidden_layers`` |
| query heads, width | ``n_head``, ``n_embd`` | ``num_attention_heads``, ``hidden_size`` |
| key/value heads | 1 if ``multi_query`` else ``n_head`` | ``num_key_value_heads`` |
| sliding window | none | ``sliding_window`` |

The KV cache stores, per token and per layer, one key and one value vector per key/value head. That is what
sizes the cache (and so how many requests a GPU holds); a sliding window caps the tokens kept per sequence.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import pydantic

AttentionKind = Literal["multi-query", "grouped-query", "multi-head"]


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    return dict(config.to_dict())


def _first(values: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        if values.get(name) is not None:
            return values[name]
    raise ValueError(f"the checkpoint's config has none of {names}; cannot read its shape")


class ModelShape(pydantic.BaseModel):
    """The facts of one checkpoint's architecture that serving depends on."""

    model_config = pydantic.ConfigDict(frozen=True)

    model_type: str
    context_window: int = pydantic.Field(ge=1)
    num_layers: int = pydantic.Field(ge=1)
    num_query_heads: int = pydantic.Field(ge=1)
    num_kv_heads: int = pydantic.Field(ge=1)
    head_dim: int = pydantic.Field(ge=1)
    vocab_size: int = pydantic.Field(ge=1)
    # Tokens each layer attends to; None: the whole context.
    sliding_window: int | None = pydantic.Field(None, ge=1)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config object or its ``config.json`` as a dict."""
        values = _config_dict(config)
        query_heads = int(_first(values, "num_attention_heads", "n_head"))
        hidden = int(_first(values, "hidden_size", "n_embd"))
        if values.get("num_key_value_heads") is not None:
            kv_heads = int(values["num_key_value_heads"])
        elif "multi_query" in values:  # gpt_bigcode
            kv_heads = 1 if values["multi_query"] else query_heads
        else:
            kv_heads = query_heads
        sliding = values.get("sliding_window")
        return cls(
            model_type=str(values.get("model_type", "unknown")),
            context_window=int(_first(values, "max_position_embeddings", "n_positions")),
            num_layers=int(_first(values, "num_hidden_layers", "n_layer")),
            num_query_heads=query_heads,
            num_kv_heads=kv_heads,
            head_dim=int(values.get("head_dim") or hidden // query_heads),
            vocab_size=int(values["vocab_size"]),
            sliding_window=int(sliding) if sliding else None,
        )

    @property
    def attention(self) -> AttentionKind:
        if self.num_kv_heads == 1:
            return "multi-query"
        return "multi-head" if self.num_kv_heads == self.num_query_heads else "grouped-query"

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """Key + value, every layer, every key/value head (bf16: 2 bytes an element)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def cached_tokens(self, sequence_tokens: int) -> int:
        """Tokens the cache keeps for one sequence of this length: a sliding window keeps its last ones only."""
        return min(sequence_tokens, self.sliding_window) if self.sliding_window else sequence_tokens

    def kv_arithmetic(self, dtype_bytes: int = 2) -> str:
        """The KV-per-token product spelled out, for logs and config comments."""
        per_token = self.kv_bytes_per_token(dtype_bytes)
        window = f", sliding window {self.sliding_window:,}" if self.sliding_window else ""
        return (
            f"{self.attention} attention ({self.num_query_heads} query / {self.num_kv_heads} key-value heads{window}): "
            f"2 (K,V) x {self.num_layers} layers x {self.num_kv_heads} x {self.head_dim} x {dtype_bytes} bytes "
            f"= {per_token / 1024:g} KiB per token"
        )
