"""The OpenAI-compatible routes over HTTP, driven by the official ``openai`` client against the real Truss server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.conftest import RunningServer

PROMPT = "def compute_fib(n):"
MESSAGES: list[Any] = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sum a list."}]


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        yield client


def greedy_text(client: OpenAI, max_tokens: int = 16, **kwargs: Any) -> Any:
    return client.completions.create(model="starcoder", prompt=PROMPT, max_tokens=max_tokens, temperature=0, **kwargs)


def test_completion_shape_usage_and_streaming_agree(client: OpenAI) -> None:
    done = greedy_text(client)
    assert done.object == "text_completion" and done.id.startswith("cmpl-")
    assert done.model == "tiny-starcoder"  # the served checkpoint, by name: no server filesystem path
    [choice] = done.choices
    assert choice.index == 0 and choice.text and choice.logprobs is None
    assert choice.finish_reason in {"stop", "length"}
    usage = done.usage
    assert usage is not None and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 16

    chunks = list(
        client.completions.create(
            model="starcoder",
            prompt=PROMPT,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason
    ]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == usage.model_dump()

    echoed = greedy_text(client, echo=True)
    assert echoed.choices[0].text == PROMPT + choice.text


def test_completion_logprobs(client: OpenAI) -> None:
    done = greedy_text(client, max_tokens=8, logprobs=3)
    choice = done.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and done.usage is not None
    count = done.usage.completion_tokens
    assert len(logprobs.tokens or []) == len(logprobs.token_logprobs or []) == count
    assert len(logprobs.top_logprobs or []) == len(logprobs.text_offset or []) == count
    for token, logprob, top in zip(logprobs.tokens or [], logprobs.token_logprobs or [], logprobs.top_logprobs or []):
        assert logprob <= 0
        assert 3 <= len(top) <= 4 and token in top  # the top 3, plus the chosen token when it is not among them
        assert all(value <= 0 for value in top.values())
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely token
    assert logprobs.text_offset == sorted(logprobs.text_offset or [])
    assert choice.text == greedy_text(client, max_tokens=8).choices[0].text  # logprobs do not change the text

    streamed = list(
        client.completions.create(
            model="starcoder", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3, stream=True
        )
    )
    tokens = [t for c in streamed for t in (c.choices[0].logprobs.tokens or [] if c.choices[0].logprobs else [])]
    assert tokens == logprobs.tokens


def test_fill_in_the_middle_suffix(client: OpenAI) -> None:
    plain = greedy_text(client, max_tokens=12).choices[0].text
    fim = greedy_text(client, max_tokens=12, suffix="\n    return result\n")
    assert fim.choices[0].text != plain  # the suffix reached the model
    assert fim.usage is not None and fim.usage.prompt_tokens > greedy_text(client, max_tokens=1).usage.prompt_tokens  # type: ignore[union-attr]


def test_stop_sequence_cuts_the_greedy_text(client: OpenAI) -> None:
    full = greedy_text(client, max_tokens=24).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip() or len(full) > 4
    cut = greedy_text(client, max_tokens=24, stop=[stop])
    choice = cut.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert full.startswith(choice.text)
    assert choice.text == full[: full.index(stop)]


def test_n_choices_and_seeds(client: OpenAI) -> None:
    def sample(seed: int, n: int = 1) -> list[str]:
        done = client.completions.create(
            model="starcoder", prompt=PROMPT, max_tokens=12, temperature=0.9, seed=seed, n=n
        )
        assert [c.index for c in done.choices] == list(range(n))
        return [c.text for c in done.choices]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    many = sample(7, n=3)
    assert many[0] == sample(7)[0] and many[1] == sample(8)[0]  # choice i is seeded with seed + i
    assert len(set(many)) > 1

    batch = client.completions.create(
        model="starcoder", prompt=[PROMPT, "import os\n"], max_tokens=6, temperature=0, n=2
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == batch.choices[1].text != batch.choices[2].text


def test_chat_completion_streamed_and_not(client: OpenAI) -> None:
    done = client.chat.completions.create(model="starcoder", messages=MESSAGES, max_tokens=16, temperature=0)
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    [choice] = done.choices
    assert choice.message.role == "assistant" and choice.message.content is not None
    assert "\nHuman:" not in choice.message.content  # the template's implied stop
    assert done.usage is not None and done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model="starcoder",
            messages=MESSAGES,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    scored = client.chat.completions.create(
        model="starcoder", messages=MESSAGES, max_completion_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    content = scored.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and scored.usage is not None and len(content) == scored.usage.completion_tokens
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in content)


BAD_REQUESTS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown parameter", {"extra_body": {"temprature": 0.5}}, "Unknown parameter `temprature`"),
    ("over the cap", {"max_tokens": 100000}, "cap of 2048"),
    ("presence penalty out of range", {"presence_penalty": 2.5}, "`presence_penalty`"),
    ("best_of", {"best_of": 3}, "`best_of`"),
    ("logit bias", {"logit_bias": {"five": 10}}, "`logit_bias`"),
    ("max_tokens 0 without echo", {"max_tokens": 0}, "only scores the prompt"),
    ("wrong type", {"extra_body": {"temperature": "hot"}}, "`temperature`"),
]


@pytest.mark.parametrize(("case", "kwargs", "expected"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_completion_requests_raise_bad_request(
    client: OpenAI, case: str, kwargs: dict[str, Any], expected: str
) -> None:
    for stream in (False, True):  # refused before any stream starts
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model="starcoder", prompt=PROMPT, stream=stream, **kwargs)
        assert caught.value.status_code == 400
        assert expected in caught.value.message
        assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "invalid_request_error"


def test_bad_chat_requests_raise_bad_request(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="tool"):
        client.chat.completions.create(
            model="starcoder",
            messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        )
    with pytest.raises(openai.BadRequestError, match="must end with a user"):
        client.chat.completions.create(model="starcoder", messages=[*MESSAGES, {"role": "assistant", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        client.chat.completions.create(model="starcoder", messages=MESSAGES, frequency_penalty=-3.0, stream=True)


def test_client_disconnect_cancels_generation(client: OpenAI, server: RunningServer) -> None:
    cancelled_before = server.log().count("finish_reason=cancelled")
    stream = client.completions.create(
        model="starcoder", prompt=PROMPT, max_tokens=2048, extra_body={"min_tokens": 2048}, temperature=0, stream=True
    )
    next(iter(stream))
    stream.close()  # hang up after the first chunk
    deadline = time.monotonic() + 120
    while server.log().count("finish_reason=cancelled") == cancelled_before and time.monotonic() < deadline:
        time.sleep(0.2)
    job_lines = [line for line in server.log().splitlines() if "finish_reason=cancelled" in line]
    assert len(job_lines) > cancelled_before, server.log()[-3000:]
    assert "completion_tokens=2048" not in job_lines[-1]


def test_streamed_choices_interleave_and_match_the_non_streamed_ones(client: OpenAI) -> None:
    """n choices for each of several prompts are generated together; chunks carry their index."""
    request = {"model": "starcoder", "prompt": [PROMPT, "import os\n"], "max_tokens": 10, "temperature": 0, "n": 2}
    whole = client.completions.create(**request)
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for chunk in client.completions.create(**request, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert sorted(texts) == [0, 1, 2, 3]


def test_presence_and_frequency_penalties_discourage_repeats(client: OpenAI) -> None:
    def repeats(**penalties: float) -> tuple[str, int]:
        done = client.completions.create(
            model="starcoder", prompt="x = 1", max_tokens=40, temperature=0, logprobs=0, **penalties
        )
        tokens = done.choices[0].logprobs.tokens  # type: ignore[union-attr]
        return done.choices[0].text, len(tokens) - len(set(tokens))

    plain_text, plain_repeats = repeats()
    assert plain_repeats > 0  # the tiny model repeats itself: something to discourage
    for penalties in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        text, penalized_repeats = repeats(**penalties)
        assert text != plain_text and penalized_repeats < plain_repeats
        assert repeats(**penalties) == (text, penalized_repeats)  # still deterministic


LOGPROB_PROMPTS = ["def f():", "import os\n", "class A:", "x = 1", "for i in", "print(", "return a", "while True:"]


@pytest.mark.parametrize("prompt", LOGPROB_PROMPTS)
def test_streamed_logprobs_keep_every_token_and_equal_the_non_streamed_ones(client: OpenAI, prompt: str) -> None:
    """A token that is only part of a UTF-8 character has no text of its own yet; its entry must still arrive."""
    request: dict[str, Any] = {
        "model": "starcoder",
        "prompt": prompt,
        "max_tokens": 16,
        "temperature": 0,
        "logprobs": 2,
    }
    whole = client.completions.create(**request)
    assert whole.choices[0].logprobs is not None and whole.usage is not None
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    for chunk in client.completions.create(**request, stream=True):
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None:
                for field in streamed:
                    streamed[field] += getattr(choice.logprobs, field)
    expected = whole.choices[0].logprobs
    assert len(streamed["tokens"]) == whole.usage.completion_tokens
    assert streamed["tokens"] == expected.tokens and streamed["text_offset"] == expected.text_offset
    assert streamed["token_logprobs"] == pytest.approx(expected.token_logprobs)
    assert text == whole.choices[0].text


def test_streamed_chat_logprobs_keep_every_token(client: OpenAI) -> None:
    request: dict[str, Any] = {
        "model": "starcoder", "messages": MESSAGES, "max_tokens": 16, "temperature": 0, "logprobs": True,
        "top_logprobs": 1,
    }  # fmt: skip
    whole = client.chat.completions.create(**request)
    assert whole.choices[0].logprobs is not None and whole.choices[0].logprobs.content is not None
    entries = [
        entry.token
        for chunk in client.chat.completions.create(**request, stream=True)
        for choice in chunk.choices
        if choice.logprobs is not None and choice.logprobs.content
        for entry in choice.logprobs.content
    ]
    assert entries == [entry.token for entry in whole.choices[0].logprobs.content]


def test_the_sdks_own_assistant_message_round_trips(client: OpenAI) -> None:
    """Real client code appends ``response.choices[0].message.model_dump()``: its null fields must be accepted."""
    messages: list[Any] = [{"role": "user", "content": "Sum a list.", "name": "ada"}]
    first = client.chat.completions.create(model="starcoder", messages=messages, max_tokens=6, temperature=0)
    dumped = first.choices[0].message.model_dump()
    assert {"refusal", "tool_calls", "function_call"} <= set(dumped)  # what the SDK emits, as null
    messages += [dumped, {"role": "user", "content": "Now in one line."}]
    second = client.chat.completions.create(model="starcoder", messages=messages, max_tokens=6, temperature=0)
    assert second.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError, match="tool_calls` must be null"):
        client.chat.completions.create(
            model="starcoder",
            messages=[*messages[:1], {**dumped, "tool_calls": [{"id": "1", "type": "function"}]}, messages[-1]],
            max_tokens=2,
        )


def test_ignore_eos_generates_to_the_token_limit(client: OpenAI) -> None:
    """vLLM's ignore_eos, as benchmark clients send it (the SDK's extra_body): exactly max_tokens tokens."""
    prompt = "def compute_fib(n):"  # the tiny model's greedy text ends well before 200 tokens
    ended = client.completions.create(model="starcoder", prompt=prompt, max_tokens=200, temperature=0)
    assert ended.choices[0].finish_reason == "stop" and ended.usage is not None
    assert ended.usage.completion_tokens < 200
    full = client.completions.create(
        model="starcoder", prompt=prompt, max_tokens=200, temperature=0, extra_body={"ignore_eos": True}
    )
    assert full.choices[0].finish_reason == "length" and full.usage is not None
    assert full.usage.completion_tokens == 200
    assert full.choices[0].text.startswith(ended.choices[0].text)
    chat = client.chat.completions.create(
        model="starcoder",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert chat.usage is not None and chat.usage.completion_tokens == 12
