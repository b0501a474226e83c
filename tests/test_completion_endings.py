"""Editor-style completion endings (``stop_at``): the rule on synthetic token texts, split every way, through the
text assembler as both paths and streaming use it; then one predict call to the real server."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starcoder_serving.engine.engine import Engine
from starcoder_serving.events import DoneEvent, FinishReason, TokenEvent
from starcoder_serving.text.assembler import TextAssembler
from starcoder_serving.text.completion_endings import CompletionEnding, CompletionEndingMatcher

from tests.conftest import RunningServer


def ended(mode: str, cursor_line: str, pieces: list[str]) -> tuple[str, bool]:
    """What the matcher lets out of ``pieces`` (fed one at a time), and whether it ended the completion."""
    matcher = CompletionEndingMatcher(CompletionEnding(mode, cursor_line))  # type: ignore[arg-type]
    out = []
    for piece in pieces:
        scan = matcher.feed(piece)
        out.append(scan.emit)
        if scan.stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


CASES = [
    # (mode, cursor's line, generated text, kept text, ended)
    ("line", "    x = ", "compute(1)\n    y = 2\n", "compute(1)", True),
    ("line", "x = ", "\nfoo", "", True),  # the cursor's line ends at once
    ("line", "x = ", "42", "42", False),  # the generation ended first: nothing cut
    # A header line ("def f(x):"): its body is what is indented deeper; back at its level, the block is over.
    (
        "block",
        "def f(x):",
        "\n    y = x + 1\n\n    return y\n\ndef g():\n    pass\n",
        "\n    y = x + 1\n\n    return y",
        True,
    ),
    # A blank line at the body's indentation: siblings at that level belong to the block, a dedent ends it.
    ("block", "    ", "y = x + 1\n    return y\nprint(f(2))\n", "y = x + 1\n    return y", True),
    # The cursor on an empty line: the completion's own indentation sets the level.
    ("block", "", "    return 1\n    # done\nx = 2\n", "    return 1\n    # done", True),
    # Braces: the closing brace back at the header's level is kept, and the block ends after it.
    ("block", "function f() {", "\n  return 1;\n}\nfunction g() {}\n", "\n  return 1;\n}", True),
    # Brackets opened on an earlier line of the completion and balanced: the block ends at that line's end.
    ("block", "    ", "call(\n        a,\n        b)\n    other()\n", "call(\n        a,\n        b)", True),
    # Brackets opened and closed on one line do not end it.
    ("block", "    ", "x = f(1)\n    y = [2]\n", "x = f(1)\n    y = [2]\n", False),
    # A bracket the completion did not open, closed: the cursor's own expression is done at the end of the line.
    ("block", "    total = sum(", "a, b) + 1\n    more\n", "a, b) + 1", True),
    # Trailing blank lines are returned when the generation ends on its own.
    ("block", "def f():", "\n    pass\n\n", "\n    pass\n\n", False),
]


@pytest.mark.parametrize(("mode", "cursor", "text", "kept", "stopped"), CASES)
def test_the_ending_is_the_same_however_the_text_is_split(
    mode: str, cursor: str, text: str, kept: str, stopped: bool
) -> None:
    whole = ended(mode, cursor, [text])
    assert whole == (kept, stopped)
    assert ended(mode, cursor, list(text)) == whole  # one character at a time
    for cut in range(1, len(text)):
        assert ended(mode, cursor, [text[:cut], text[cut:]]) == whole


class PieceTokenizer:
    """Decodes each id to a fixed text piece: synthetic "tokens" for the assembler."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(self.pieces[i] for i in ids)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.pieces[i] for i in ids]


def assemble(pieces: list[str], ending: CompletionEnding | None, stop: tuple[str, ...] = ()) -> tuple[str, Any, int]:
    assembler = TextAssembler(PieceTokenizer(pieces), stop, ending)
    text = []
    for token_id in range(len(pieces)):
        text.append(assembler.feed(TokenEvent((token_id,))))
        if assembler.reason is not None:
            break
    else:
        text.append(assembler.feed(DoneEvent(FinishReason.LENGTH)))
    return "".join(text), assembler.reason, assembler.completion_tokens


def test_the_assembler_ends_a_line_completion_with_reason_stop() -> None:
    pieces = ["foo", "(1", ")\n", "    bar", "()"]
    assert assemble(pieces, CompletionEnding("line", "x = ")) == ("foo(1)", FinishReason.STOP, 3)
    # Without the option nothing is cut.
    assert assemble(pieces, None) == ("foo(1)\n    bar()", FinishReason.LENGTH, 5)


def test_the_assembler_holds_blank_lines_until_the_block_shows_they_end_it() -> None:
    pieces = ["\n", "    return", " y", "\n", "\n", "def", " g"]
    assert assemble(pieces, CompletionEnding("block", "def f(y):")) == ("\n    return y", FinishReason.STOP, 6)


def test_a_stop_sequence_and_the_ending_the_first_to_end_wins() -> None:
    pieces = ["a = 1", "  # END", "\n", "b"]
    assert assemble(pieces, CompletionEnding("line", ""), stop=("# END",))[:2] == ("a = 1  ", FinishReason.STOP)
    assert assemble(pieces, CompletionEnding("line", ""), stop=("b",))[:2] == ("a = 1  # END", FinishReason.STOP)


def test_stop_at_is_refused_where_there_is_no_cursor(engine: Engine) -> None:
    from starcoder_serving.api.predict_route import PredictProtocol
    from starcoder_serving.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="stop_at"):
        engine.validate(
            PredictProtocol().parse({"messages": [{"role": "user", "content": "hi"}], "stop_at": "line"}).to_request()
        )
    with pytest.raises(InvalidRequest, match="stop_at"):
        PredictProtocol().parse({"prefix": "x", "stop_at": "paragraph"})


def test_predict_line_completion_has_no_newline(server: RunningServer) -> None:
    """The tiny model writes gibberish with newlines in it; with "stop_at": "line" none comes back."""
    body = {"prefix": "x = 1\n", "suffix": "\n", "max_new_tokens": 48, "stop_at": "line"}
    plain = httpx.post(server.predict_url, json={**body, "stop_at": None}, timeout=60).json()["data"]
    data = httpx.post(server.predict_url, json=body, timeout=60).json()["data"]
    assert "\n" in plain["completion"], "pick a prompt whose plain completion has a newline"
    assert "\n" not in data["completion"]
    assert plain["completion"].startswith(data["completion"])
    assert data["finish_reason"] == "stop"
    streamed = httpx.post(server.predict_url, json={**body, "stream": True}, timeout=60).text
    assert streamed == data["completion"]
    # The same extension on /v1/completions.
    openai_body = {"prompt": body["prefix"], "suffix": "\n", "max_tokens": 48, "temperature": 0, "stop_at": "line"}
    (choice,) = httpx.post(f"{server.base_url}/v1/completions", json=openai_body, timeout=60).json()["choices"]
    assert "\n" not in choice["text"] and choice["finish_reason"] in ("stop", "length")
