"""One loaded model's profile: everything the engine and the prompts need to know that differs between models.

Read from the checkpoint wherever it says (its config for the shape and window, its generation config and
tokenizer for the end tokens, its vocabulary for the FIM tokens), and from the serving settings only where the
checkpoint is silent: StarCoder2 ends a file with ``<file_sep>`` but does not list it as an end token. (Whether
the tokenizer ships a chat template is the chat renderer's business, ``text/prompts.py``: base StarCoder ships
none, and the settings' template file is used.)
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from starcoder_serving.family.shape import ModelShape
from starcoder_serving.settings import ServingSettings
from starcoder_serving.text.prompts import FimTokens, RepoFormat

logger = logging.getLogger(__name__)

# The family's fill-in-the-middle tokens (StarCoder and StarCoder2 alike, prefix-suffix-middle order).
FIM_TOKEN_NAMES = FimTokens(prefix="<fim_prefix>", suffix="<fim_suffix>", middle="<fim_middle>")
# Repository metadata tokens (text/prompts.py, RepoFormat): StarCoder2's repository-level sequences, else
# StarCoder's per-file metadata, whichever pair the vocabulary has.
STARCODER2_REPO_TOKENS = ("<repo_name>", "<file_sep>")
STARCODER_REPO_TOKENS = ("<reponame>", "<filename>")


def repo_format(tokenizer: Any) -> RepoFormat | None:
    """The family's repository format, from which metadata tokens its vocabulary has."""
    if all(_vocabulary_id(tokenizer, t) is not None for t in STARCODER2_REPO_TOKENS):
        return RepoFormat(*STARCODER2_REPO_TOKENS)
    if all(_vocabulary_id(tokenizer, t) is not None for t in STARCODER_REPO_TOKENS) and tokenizer.eos_token:
        return RepoFormat(*STARCODER_REPO_TOKENS, end_of_file=str(tokenizer.eos_token))
    return None


def _vocabulary_id(tokenizer: Any, token: str) -> int | None:
    """The token's id when the vocabulary really has it (not the unknown-token fallback)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return token_id


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    shape: ModelShape
    # The checkpoint's window, or the smaller one the settings ask for.
    context_window: int
    end_token_ids: frozenset[int]
    # None: the vocabulary has no FIM tokens, and fill-in-the-middle requests are refused. Its ``repo``: how the
    # family writes repository context (None: no repository tokens, and such context is refused).
    fim: FimTokens | None
    # Bytes per element of the loaded weights and cache (bf16: 2): what a KV-cache token costs.
    dtype_bytes: int

    @classmethod
    def read(cls, model: Any, tokenizer: Any, settings: ServingSettings) -> ModelProfile:
        shape = ModelShape.from_config(model.config)
        window = shape.context_window
        if settings.context_window is not None:
            if settings.context_window > window:
                logger.warning(
                    "context_window %d is larger than the checkpoint's %d; using %d",
                    settings.context_window,
                    window,
                    window,
                )
            window = min(window, settings.context_window)
        eos = model.generation_config.eos_token_id
        end_ids = {eos} if isinstance(eos, int) else set(eos or [])
        end_ids.add(tokenizer.eos_token_id)
        for token in settings.end_tokens:
            if (token_id := _vocabulary_id(tokenizer, token)) is not None:
                end_ids.add(token_id)
        has_fim = all(
            _vocabulary_id(tokenizer, t) is not None
            for t in (FIM_TOKEN_NAMES.prefix, FIM_TOKEN_NAMES.suffix, FIM_TOKEN_NAMES.middle)
        )
        return cls(
            shape=shape,
            context_window=window,
            end_token_ids=frozenset(i for i in end_ids if i is not None),
            fim=dataclasses.replace(FIM_TOKEN_NAMES, repo=repo_format(tokenizer)) if has_fim else None,
            dtype_bytes=int(model.dtype.itemsize),
        )

    def describe(self, tokenizer: Any) -> str:
        """One log line: what this replica serves. The chat renderer uses the tokenizer's own template when it has
        one, else the settings' template file."""
        ends = ", ".join(sorted(tokenizer.convert_ids_to_tokens(sorted(self.end_token_ids))))
        chat_template = "the tokenizer" if getattr(tokenizer, "chat_template", None) else "the settings"
        return (
            f"{self.shape.model_type}: {self.context_window:,}-token window, {self.shape.kv_arithmetic(self.dtype_bytes)}; "
            f"ends at {ends}; fill-in-the-middle {'on' if self.fim else 'off (no FIM tokens)'}; "
            f"chat template from {chat_template}"
        )
