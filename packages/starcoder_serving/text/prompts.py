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
class RenderedPrompt:
    text: str
    # Stop sequences implied by the input form, added to the client's own.
    implied_stop: tuple[str, ...] = ()


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

    def render(self, prefix: str, suffix: str) -> RenderedPrompt:
        """The prefix-suffix-middle order StarCoder and StarCoder2 were trained on: the model writes the middle."""
        return RenderedPrompt(f"{self.prefix}{prefix}{self.suffix}{suffix}{self.middle}")


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
