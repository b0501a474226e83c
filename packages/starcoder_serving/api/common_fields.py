"""Request fields that predict and the OpenAI routes spell and mean alike, declared once.

A field here whose name is also a ``SamplingParams`` field is passed through as it is (``sampling_values``):
adding one such parameter to both protocols is a field here and a field there.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field, StrictBool, StrictStr

from starcoder_serving.engine.request import ContextFile, RepoContext
from starcoder_serving.engine.sampling_params import SamplingParams, Seed
from starcoder_serving.text.completion_endings import CompletionEnding

# What ``stop`` must be, in the one sentence a wrong one gets (field_errors.py).
STOP_SHAPE = "a string or a list of strings"

Stop = StrictStr | list[StrictStr]


def stop_sequences(stop: str | list[str] | None) -> tuple[str, ...]:
    """The one normal form of every protocol's stop field: a tuple of strings."""
    if stop is None:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class CommonFields(pydantic.BaseModel):
    # strict: "0.5" is not a float and 1 is not a bool; an int is still accepted for a float.
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    # Any number here: validation refuses more than max_stop_sequences with a message giving the limit.
    stop: Stop | None = None
    seed: Seed | None = None
    # vLLM's: keep generating past the end of text, to the token limit (benchmark clients send it).
    ignore_eos: StrictBool | None = None

    def sampling_values(self) -> dict[str, Any]:
        """The sent fields of this class that are ``SamplingParams`` fields too, in its terms."""
        names = set(CommonFields.model_fields) & self.model_fields_set & set(SamplingParams.model_fields)
        values = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if "stop" in values:
            values["stop"] = stop_sequences(values["stop"])
        return values


# The most other files one request's repository context may list.
MAX_CONTEXT_FILES = 256
# Repository context of a fill-in-the-middle prompt (the file's own path, its repository, other files).
REPO_FIELDS = ("repo_name", "path", "files")


class RepoFile(pydantic.BaseModel):
    """One other file of the repository, as editors send it."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    path: Annotated[StrictStr, Field(min_length=1)]
    content: StrictStr


class EditorFields(pydantic.BaseModel):
    """What an editor's completion sends besides the text around the cursor, on predict and ``/v1/completions``
    alike: the repository around the file (text/prompts.py writes it in the model family's own format), and an
    editor-style ending (text/completion_endings.py)."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    repo_name: StrictStr | None = None
    path: Annotated[StrictStr, Field(min_length=1)] | None = None
    files: Annotated[list[RepoFile], Field(max_length=MAX_CONTEXT_FILES)] | None = None
    # At the end of the cursor's line, or of its block.
    stop_at: Literal["line", "block"] | None = None

    def repo_context(self) -> RepoContext | None:
        """The request's repository context in the engine's terms; None when none was sent."""
        if self.repo_name is None and self.path is None and self.files is None:
            return None
        return RepoContext(self.repo_name, self.path, tuple(ContextFile(f.path, f.content) for f in self.files or ()))

    def completion_ending(self) -> CompletionEnding | None:
        return None if self.stop_at is None else CompletionEnding(self.stop_at)
