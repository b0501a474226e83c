"""Token texts index the text returned (issue 22, item 6), through the real server.

Greedy, the tiny model answers "import" with a special token third (``<reponame>``), which a completion leaves out,
and with tokens that are parts of UTF-8 characters. ``text_offset`` must index the choice's text all the same:
a generated special token adds nothing, a partial character counts at the token that completes it, the echoed
prompt comes first with its special tokens as written, and a token past a stop sequence's cut sits at the end.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import OpenAI

from devtools.tiny_model import STARCODER_SPECIAL_TOKENS
from tests.conftest import RunningServer

PROMPT = "import"  # greedy: ["J", "héllo", "<reponame>", "scr", "bytes:\\xd1", "ibes", ...]
# A special token the client wrote, which the echo shows; greedy: ["bytes:\\xa7", "<reponame>", "colle", ...].
ECHO_PROMPT = "J<reponame>"
GREEDY: dict[str, Any] = {"model": "starcoder", "temperature": 0, "max_tokens": 12, "logprobs": 0}


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        yield client


def token_bytes(token: str) -> bytes:
    """A logprobs token's bytes: "bytes:\\xe2" spells a partial character's."""
    if token.startswith("bytes:"):
        return bytes(int(byte, 16) for byte in token.removeprefix("bytes:").split("\\x")[1:])
    return token.encode()


def added_texts(tokens: list[str], prompt_tokens: int = 0) -> tuple[list[str], list[str]]:
    """What each token adds to the text: the prompt's (special tokens as written), then the generated ones (special
    tokens left out); a partial UTF-8 character counts at the token that completes it."""
    prompt = codecs.getincrementaldecoder("utf-8")(errors="replace")
    generated = codecs.getincrementaldecoder("utf-8")(errors="replace")
    added = [prompt.decode(token_bytes(token)) for token in tokens[:prompt_tokens]]
    rest = [
        "" if token in STARCODER_SPECIAL_TOKENS else generated.decode(token_bytes(token))
        for token in tokens[prompt_tokens:]
    ]
    return added, rest


def assert_offsets_index(text: str, logprobs: Any, prompt_tokens: int = 0, *, cut: bool = False) -> None:
    tokens, offsets = list(logprobs.tokens), list(logprobs.text_offset)
    assert len(offsets) == len(tokens)
    assert offsets == sorted(offsets) and all(0 <= offset <= len(text) for offset in offsets)
    prompt, generated = added_texts(tokens, prompt_tokens)
    added = prompt + generated
    whole = "".join(added)
    assert text[: len(whole)] == whole[: len(text)]  # the text is what the tokens add (up to a stop's cut)
    if not cut:
        assert len(text) >= len(whole)
    expected = [min(len("".join(added[:i])), len(text)) for i in range(len(tokens))]
    assert offsets == expected
    for i in range(len(tokens) - 1):
        assert text[offsets[i] : offsets[i + 1]] == added[i][: len(text) - offsets[i]], (i, tokens[i])
    assert text[offsets[-1] :].startswith(added[-1][: len(text) - offsets[-1]])


def streamed(client: OpenAI, **request: Any) -> tuple[str, dict[str, list[Any]]]:
    """A streamed choice's text, and its chunks' logprobs concatenated."""
    text, logprobs = "", {"tokens": [], "token_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**request, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                for field, values in logprobs.items():
                    values += getattr(choice.logprobs, field) or []
    return text, logprobs


def test_generated_special_tokens_add_nothing_streamed_or_not(client: OpenAI) -> None:
    done = client.completions.create(prompt=PROMPT, **GREEDY).choices[0]
    assert done.logprobs is not None and "<reponame>" in (done.logprobs.tokens or [])
    assert "<reponame>" not in done.text and any(t.startswith("bytes:") for t in done.logprobs.tokens or [])
    assert_offsets_index(done.text, done.logprobs)
    text, logprobs = streamed(client, prompt=PROMPT, **GREEDY)
    assert text == done.text
    assert logprobs["tokens"] == done.logprobs.tokens and logprobs["text_offset"] == done.logprobs.text_offset


def test_a_stop_sequence_cut_leaves_later_tokens_at_the_end(client: OpenAI) -> None:
    # Greedy: ... "bytes:\\xa7", '!("', " self": the stop starts in one token and ends in the next.
    request = {**GREEDY, "prompt": PROMPT, "stop": ['(" se']}
    done = client.completions.create(**request).choices[0]
    assert done.finish_reason == "stop" and done.logprobs is not None
    assert done.text.endswith("!") and (done.logprobs.text_offset or [])[-1] == len(done.text)
    assert_offsets_index(done.text, done.logprobs, cut=True)
    text, logprobs = streamed(client, **request)
    assert text == done.text
    assert logprobs["tokens"] == done.logprobs.tokens and logprobs["text_offset"] == done.logprobs.text_offset


@pytest.mark.parametrize("max_tokens", [0, 6])
def test_echoed_prompt_then_generated_tokens(client: OpenAI, max_tokens: int) -> None:
    done = client.completions.create(**{**GREEDY, "max_tokens": max_tokens}, prompt=ECHO_PROMPT, echo=True)
    choice, usage = done.choices[0], done.usage
    assert choice.logprobs is not None and usage is not None
    assert choice.text.startswith(ECHO_PROMPT) and len(choice.logprobs.tokens or []) == usage.total_tokens
    prompt, generated = (
        (choice.logprobs.tokens or [])[: usage.prompt_tokens],
        (choice.logprobs.tokens or [])[usage.prompt_tokens :],
    )
    assert "<reponame>" in prompt and ("<reponame>" in generated) == (max_tokens > 0)
    assert_offsets_index(choice.text, choice.logprobs, usage.prompt_tokens)


def test_chat_token_bytes_add_up_to_the_content(client: OpenAI) -> None:
    # Greedy, the tiny model's 20th token is <empty_output>: in logprobs by name, with no bytes.
    request: dict[str, Any] = {
        "model": "starcoder",
        "messages": [{"role": "user", "content": "import"}],
        "max_tokens": 20,
    }
    done = client.chat.completions.create(**request, temperature=0, logprobs=True).choices[0]
    assert done.logprobs is not None and done.logprobs.content is not None
    specials = [entry for entry in done.logprobs.content if entry.token in STARCODER_SPECIAL_TOKENS]
    assert specials and all(entry.bytes == [] for entry in specials)
    joined = b"".join(bytes(entry.bytes or []) for entry in done.logprobs.content)
    assert joined.decode(errors="replace") == done.message.content


def test_tgi_token_texts_add_up_to_the_generated_text(server: RunningServer) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": True}}
    [answer] = httpx.post(server.predict_url, json=body, timeout=60).json()
    tokens = answer["details"]["tokens"]
    assert "".join(token["text"] for token in tokens) == answer["generated_text"]
    assert [token["text"] for token in tokens if token["special"]] == [""]  # <reponame>
    with httpx.stream("POST", server.predict_url, json={**body, "stream": True}, timeout=60) as response:
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert "".join(event["token"]["text"] for event in events) == answer["generated_text"]
    assert events[-1]["generated_text"] == answer["generated_text"]
