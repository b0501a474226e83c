"""Turn each input form (raw prompt, fill-in-the-middle, chat messages, instruction) into model text.

Every form ends as one string the tokenizer encodes, plus the stop sequences that end that form's
answer (a chat turn ends where the next "Human:" turn would begin).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Protocol

import jinja2

from starcoder_serving.errors import InvalidRequest


class ChatTokenizer(Protocol):
    chat_template: str | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class ContextReport:
    """What of a request's repository context went into the prompt (``text/repo_context.py`` fits it)."""

    files_used: tuple[str, ...]  # paths, in prompt order
    files_dropped: tuple[str, ...]  # paths, in the order the client sent them
    context_tokens: int  # what the repository name and the other files take
    prefix_tokens_dropped: int = 0  # from the prefix's start
    suffix_tokens_dropped: int = 0  # from the suffix's end

    def as_dict(self, prompt_tokens: int) -> dict[str, Any]:
        return {
            "files_used": list(self.files_used),
            "files_dropped": list(self.files_dropped),
            "context_tokens": self.context_tokens,
            "prefix_tokens_dropped": self.prefix_tokens_dropped,
            "suffix_tokens_dropped": self.suffix_tokens_dropped,
            "prompt_tokens": prompt_tokens,
        }


@dataclasses.dataclass(frozen=True)
class RenderedPrompt:
    text: str
    # Stop sequences implied by the input form, added to the client's own.
    implied_stop: tuple[str, ...] = ()
    # Repository context: what was used and dropped to fit the window.
    context: ContextReport | None = None


@dataclasses.dataclass(frozen=True)
class InstructionTemplate:
    with_input: str
    without_input: str
    stop: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> InstructionTemplate:
        raw = json.loads(path.read_text(encoding="utf-8"))
        template = cls(raw["with_input"], raw["without_input"], tuple(raw.get("stop", ())))
        for text in (template.with_input, template.without_input):
            text.format(instruction="", input="")  # fail at load time, not on the first request
        return template

    def render(self, instruction: str, input_text: str | None) -> RenderedPrompt:
        # str.format only parses the template; braces inside the user's text are left alone.
        if input_text:
            text = self.with_input.format(instruction=instruction, input=input_text)
        else:
            text = self.without_input.format(instruction=instruction)
        return RenderedPrompt(text, self.stop)


@dataclasses.dataclass(frozen=True)
class FimTokens:
    """A model's fill-in-the-middle tokens (family/profile.py finds them in the vocabulary)."""

    prefix: str
    suffix: str
    middle: str
    # How the family writes a repository around the file (None: its vocabulary has no repository tokens).
    repo: RepoFormat | None = None

    def render(self, prefix: str, suffix: str) -> RenderedPrompt:
        """The prefix-suffix-middle order StarCoder and StarCoder2 were trained on: the model writes the middle."""
        return RenderedPrompt(f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}")


@dataclasses.dataclass(frozen=True)
class RepoFormat:
    """How a family writes a repository around the file being completed, from the special tokens its vocabulary has
    (family/profile.py finds them).

    StarCoder2 (``<repo_name>``, ``<file_sep>``) was trained on whole repositories, FIM inside one of their files
    (StarCoder2 paper, arXiv:2402.19173, section 5):
    ``<repo_name>{repo}<file_sep>{path}\n{content}...<file_sep><fim_prefix>{path}\n{prefix}<fim_suffix>{suffix}<fim_middle>``.
    StarCoder (``<reponame>``, ``<filename>``) saw one file per document, its metadata first,
    ``<reponame>{repo}<filename>{path}\n{code}<|endoftext|>`` (bigcode's starcoder-playground, formats.md): each other
    file is such a document, and the current one carries its metadata inside the FIM prefix,
    ``<fim_prefix><reponame>{repo}<filename>{path}\n{prefix}<fim_suffix>{suffix}<fim_middle>``."""

    repo_name: str  # "<repo_name>" | "<reponame>"
    file_sep: str  # "<file_sep>" | "<filename>"
    # StarCoder's end of a document ("<|endoftext|>"); empty for StarCoder2, whose files are separated by file_sep.
    end_of_file: str = ""

    @property
    def per_file_metadata(self) -> bool:
        """StarCoder: every file (document) carries the repository name; StarCoder2 names it once."""
        return bool(self.end_of_file)

    def head(self, repo_name: str | None) -> str:
        """What comes before every file."""
        return "" if self.per_file_metadata or repo_name is None else f"{self.repo_name}{repo_name}"

    def _metadata(self, repo_name: str | None, path: str | None) -> str:
        repo = f"{self.repo_name}{repo_name}" if repo_name is not None else ""
        return repo + (f"{self.file_sep}{path}\n" if path is not None else "")

    def file(self, repo_name: str | None, path: str, content: str) -> str:
        """One other file of the repository."""
        if self.per_file_metadata:
            return f"{self._metadata(repo_name, path)}{content}{self.end_of_file}"
        return f"{self.file_sep}{path}\n{content}"

    def current(self, fim: FimTokens, repo_name: str | None, path: str | None, prefix: str, suffix: str) -> str:
        """The file being completed, fill-in-the-middle."""
        if self.per_file_metadata:
            return fim.render(self._metadata(repo_name, path) + prefix, suffix).text
        header = f"{path}\n" if path is not None else ""
        return self.file_sep + fim.render(header + prefix, suffix).text


class ChatRenderer:
    """Uses the tokenizer's own chat template when it ships one, else the settings' template file (base
    StarCoder's Tech Assistant dialogue, or the Alpaca turns of an instruction-tuned variant), whose answers
    end at ``default_stop``: where the model would start the next human turn."""

    def __init__(self, tokenizer: ChatTokenizer, default_template: str, default_stop: tuple[str, ...]) -> None:
        self._tokenizer = tokenizer
        self._uses_default = not getattr(tokenizer, "chat_template", None)
        self._template = default_template if self._uses_default else None
        self._default_stop = default_stop

    def render(self, messages: list[dict[str, str]]) -> RenderedPrompt:
        try:
            text = self._tokenizer.apply_chat_template(
                messages, chat_template=self._template, add_generation_prompt=True, tokenize=False
            )
        except jinja2.TemplateError as error:
            # A model's own template may refuse a conversation (e.g. "roles must alternate"): the client's fix.
            raise InvalidRequest(
                f"`messages` rejected by the model's chat template: {error}", param="messages"
            ) from None
        return RenderedPrompt(str(text), self._default_stop if self._uses_default else ())
