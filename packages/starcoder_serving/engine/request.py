"""One request in the engine's terms, whichever protocol it came by: what every route's schema turns into.

Each route parses its own body into its own pydantic model (``api/*_schema.py``), which describes itself as a
``GenerationRequest``: the prompts in their input forms, one ``SamplingParams`` holding only what the client
set, the output options, and how that protocol spells each parameter (``FieldNames``). Nothing here is checked:
``validation.py`` owns every limit and every rule across fields, and words its errors with those names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from starcoder_serving.engine.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class FieldNames:
    """How one protocol spells the parameters: a ``SamplingParams`` field (transformers' names) or an output
    option, to the request field a client of that protocol wrote. A name not listed is spelled the same."""

    renamed: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __call__(self, name: str) -> str:
        return self.renamed.get(name, name)


# transformers' own names: the predict route, and callers inside the process.
TRANSFORMERS_NAMES = FieldNames()


@dataclasses.dataclass(frozen=True)
class TextPrompt:
    text: str
    field: str = "prompt"  # the request field it came from, named in its errors


@dataclasses.dataclass(frozen=True)
class TokenPrompt:
    """A prompt the client sent as token ids (OpenAI's completions, evaluation harnesses)."""

    ids: tuple[int, ...]
    field: str = "prompt"


@dataclasses.dataclass(frozen=True)
class ContextFile:
    path: str
    content: str


@dataclasses.dataclass(frozen=True)
class RepoContext:
    """The repository around a fill-in-the-middle file: its name, the file's own path, and other files, the nearest
    to the cursor last (trimmed from the front when they do not fit)."""

    repo_name: str | None = None
    path: str | None = None
    files: tuple[ContextFile, ...] = ()
    field: str = "files"  # named in its errors


@dataclasses.dataclass(frozen=True)
class FimPrompt:
    """Fill-in-the-middle: the model writes what goes between ``prefix`` and ``suffix``. A prefix given as token
    ids is refused (the FIM tokens are placed in text). ``context``: the repository it is part of, written in the
    model family's own format (``text/prompts.py``, ``RepoFormat``)."""

    prefix: str | tuple[int, ...]
    suffix: str
    field: str = "prefix"
    context: RepoContext | None = None


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[tuple[str, str], ...]  # (role, content), roles among system / user / assistant
    field: str = "messages"


@dataclasses.dataclass(frozen=True)
class InstructionPrompt:
    instruction: str
    input: str | None = None
    field: str = "instruction"


Prompt = TextPrompt | TokenPrompt | FimPrompt | ChatPrompt | InstructionPrompt


@dataclasses.dataclass(frozen=True)
class OutputOptions:
    """What the client wants back besides the completions' text."""

    stream: bool = False
    # The prompt's text before each choice's completion (OpenAI's echo).
    echo: bool = False
    # The prompt's own tokens with their logprobs (echo with logprobs: evaluation harnesses' loglikelihood), each
    # with ``sampling.logprobs`` alternatives.
    score_prompt: bool = False
    # False: nothing is generated, the prompt is only scored (OpenAI's max_tokens 0).
    generate: bool = True
    # Whether this protocol can tell several sequences apart in one stream (OpenAI's choice index; predict's plain
    # text cannot).
    several_per_stream: bool = True
    # n > 1 must sample: n greedy sequences would all be the same (predict refuses them; OpenAI serves them).
    distinct_sequences: bool = False


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    prompts: tuple[Prompt, ...]
    # Only what the client set (``model_fields_set``): the checkpoint's generation defaults fill the rest.
    sampling: SamplingParams
    output: OutputOptions = OutputOptions()
    names: FieldNames = TRANSFORMERS_NAMES
    # Keep only the prompt's last ``truncate_prompt`` tokens (TGI's ``truncate``).
    truncate_prompt: int | None = None
