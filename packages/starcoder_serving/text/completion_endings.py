"""Editor-style completion endings (opt-in, ``stop_at``): end a completion at the end of the cursor's line, or at
the end of the cursor's block, as editor completion servers do.

A text-level stopping rule like the stop sequences (``stop_sequences.py``), fed the same pieces of text in the
assembler, so both generation paths and streaming agree; text after the end is never returned, and the completion
finishes with reason "stop".

- ``line``: the completion ends before its first newline (the rest of the cursor's line).
- ``block``: the cursor's indentation level is the leading whitespace of the line the cursor is on (when that line
  is blank, plus the whitespace the completion starts with). The completion's first line continues the cursor's
  line and is never cut; a later line ends the block, cut before the newline that precedes it, when its
  indentation is below that level, or equal to it when the cursor's line had text of its own (``def f(x):|``: its
  body is what is indented deeper). A line that starts with a closing bracket at such a point is kept to its end
  (``}`` of a brace block). Brackets end it too: when a bracket opened on an earlier line of the completion is
  balanced, or the completion closes a bracket it did not open, the completion ends at the end of that line.
  Blank lines are held until the next line with text shows whether they belong to the block.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from starcoder_serving.text.stop_sequences import StopScan

EndingMode = Literal["line", "block"]

_OPENERS = "([{"
_CLOSERS = ")]}"
_TAB_WIDTH = 4


@dataclasses.dataclass(frozen=True)
class CompletionEnding:
    """What a request asked for (``mode``) and the line the cursor is on (the prompt's text after its last newline),
    which validation fills in per prompt."""

    mode: EndingMode
    cursor_line: str = ""


def _width(whitespace: str) -> int:
    return len(whitespace.expandtabs(_TAB_WIDTH))


class CompletionEndingMatcher:
    """Feed it the completion's text in pieces: each ``feed`` answers what may be sent now and whether the
    completion has ended; ``flush`` gives back what was held when the generation ends on its own."""

    def __init__(self, ending: CompletionEnding) -> None:
        self._mode = ending.mode
        cursor = ending.cursor_line
        stripped = cursor.lstrip(" \t")
        self._level = _width(cursor[: len(cursor) - len(stripped)])
        # The cursor's line has text of its own (a block header such as "def f(x):" or "if (x) {").
        self._header = bool(stripped.strip())
        # A blank cursor line: the completion's own leading whitespace still counts towards the level.
        self._leading = not self._header
        self._line = 0  # the completion's line being read (0: the rest of the cursor's line)
        self._held = ""  # a newline and the whitespace after it, until the next line's first character decides
        self._at_line_start = False
        self._depth = 0
        self._opened_on = 0
        self._end_at_newline = False

    def feed(self, text: str) -> StopScan:
        out: list[str] = []
        for char in text:
            if self._at_line_start:
                if char in " \t\r\n":
                    self._held += char
                    continue
                line_whitespace = self._held.rsplit("\n", 1)[-1].rstrip("\r")
                indent = _width(line_whitespace)
                dedented = indent < self._level or (self._header and indent == self._level)
                if dedented and char not in _CLOSERS:
                    self._held = ""
                    return StopScan("".join(out), True)
                out.append(self._held)
                self._held, self._at_line_start = "", False
                if dedented:  # a closing bracket back at the cursor's level: its line ends the block
                    self._end_at_newline = True
            if char == "\n":
                if self._mode == "line" or self._end_at_newline:
                    return StopScan("".join(out), True)
                self._line += 1
                self._leading = False
                self._held, self._at_line_start = "\n", True
                continue
            if self._leading:
                if char in " \t":
                    self._level += _width(char)
                else:
                    self._leading = False
            self._track_brackets(char)
            out.append(char)
        return StopScan("".join(out), False)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _track_brackets(self, char: str) -> None:
        if self._mode != "block":
            return
        if char in _OPENERS:
            if self._depth == 0:
                self._opened_on = self._line
            self._depth += 1
        elif char in _CLOSERS:
            self._depth -= 1
            if self._depth < 0 or (self._depth == 0 and self._line > self._opened_on):
                self._end_at_newline = True
