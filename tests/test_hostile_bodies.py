"""Bodies a hostile client sends get a clear 4xx on every route, and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import RunningServer

ROUTES = ("predict", "/v1/completions", "/v1/chat/completions")
VALID = {
    "predict": {"prompt": "def f():", "max_new_tokens": 2},
    "/v1/completions": {"prompt": "def f():", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
}


def url(server: RunningServer, route: str) -> str:
    return server.predict_url if route == "predict" else server.base_url + route


def post_raw(server: RunningServer, route: str, content: bytes | Iterator[bytes], **headers: str) -> httpx.Response:
    return httpx.post(url(server, route), content=content, headers=headers, timeout=60)


def message_of(response: httpx.Response) -> str:
    body = response.json()
    return body["message"] if "message" in body else body["error"]["message"]


def assert_still_serving(server: RunningServer, route: str) -> None:
    response = httpx.post(url(server, route), json=VALID[route], timeout=60)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route", ROUTES)
def test_absurd_json_is_a_400(server: RunningServer, route: str) -> None:
    for content in (
        b"[" * 100_000 + b"]" * 100_000,
        b'{"prompt": ' + b"1" * 5000 + b"}",
        b'{"a":' * 40 + b"1" + b"}" * 40,
    ):
        response = post_raw(server, route, content, **{"content-type": "application/json"})
        assert response.status_code == 400, (content[:20], response.status_code, response.text[:200])
        assert "JSON" in message_of(response) or "nests deeper" in message_of(response)
    assert_still_serving(server, route)


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("predict", {"prompt": "a\ud800b"}, "prompt"),
        ("predict", {"prefix": "\udfff", "suffix": "x"}, "prefix"),
        ("predict", {"prefix": "x", "suffix": "\ud800"}, "suffix"),
        ("predict", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        ("predict", {"instruction": "\ud800"}, "instruction"),
        ("predict", {"instruction": "x", "input": "\ud800"}, "input"),
        ("predict", {"prompt": "x", "stop": ["\ud800"]}, "stop.0"),
        ("predict", {"prompt": "x", "\ud800": 1}, "\\ud800"),
        ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
        ("/v1/completions", {"prompt": ["ok", "\ud800"]}, "prompt.1"),
        ("/v1/completions", {"prompt": "x", "suffix": "\ud800"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "user": "\ud800"}, "user"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
            "messages.0.content.0.text",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "model": "\ud800"}, "model"),
    ],
)
def test_a_lone_surrogate_in_any_string_is_a_400_naming_it(
    server: RunningServer, route: str, body: dict[str, object], field: str
) -> None:
    # json.dumps writes the surrogate as the escape \ud800: exactly what a hostile client sends.
    response = post_raw(server, route, json.dumps(body).encode(), **{"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert f"`{field}`" in message_of(response) and "surrogate" in message_of(response)


@pytest.mark.parametrize("route", ROUTES)
def test_an_oversized_body_is_refused_before_it_is_read(server: RunningServer, route: str) -> None:
    # Declared too large: refused from the header.
    big = b'{"prompt": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    response = post_raw(server, route, big, **{"content-type": "application/json"})
    assert response.status_code == 413 and "limit" in message_of(response)

    # Chunked (no Content-Length): reading stops at the limit.
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(64):  # 64 MiB offered, far past the 1 MiB limit
            sent.append(1)
            yield b"x" * (1024 * 1024)
        yield b'"}'

    try:
        response = post_raw(server, route, chunks(), **{"content-type": "application/json"})
    except httpx.TransportError:
        pass  # the server may hang up on the rest of the upload after answering
    else:
        assert response.status_code == 413, response.text[:200]
    assert_still_serving(server, route)


def test_messages_name_what_the_client_sent(server: RunningServer) -> None:
    too_long = httpx.post(server.predict_url, json={"prompt": "x", "max_length": 100000}, timeout=60)
    assert too_long.status_code == 400
    assert "`max_length`" in message_of(too_long) and "max_new_tokens" not in message_of(too_long)
    stops = httpx.post(
        server.base_url + "/v1/completions", json={"prompt": "x", "stop": [str(i) for i in range(70)]}, timeout=60
    )
    assert stops.status_code == 400 and "`stop` has 70 sequences; send at most 32" in message_of(stops)


def test_exponential_decay_length_penalty_is_accepted_as_a_json_pair(server: RunningServer) -> None:
    body = {"prompt": "def f():", "max_new_tokens": 8, "exponential_decay_length_penalty": [2, 1.5]}
    response = httpx.post(server.predict_url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    refused = httpx.post(server.predict_url, json={**body, "exponential_decay_length_penalty": [2, "x"]}, timeout=60)
    assert refused.status_code == 400 and "exponential_decay_length_penalty" in message_of(refused)


@pytest.mark.parametrize("route", ROUTES)
def test_nan_and_infinity_are_not_json_numbers(server: RunningServer, route: str) -> None:
    """Python's json module reads NaN and Infinity; a server that let them through reached transformers with them."""
    for constant in ("NaN", "Infinity", "-Infinity"):
        body = json.dumps(VALID[route])[:-1] + f', "seed": {constant}}}'
        response = post_raw(server, route, body.encode(), **{"content-type": "application/json"})
        assert response.status_code == 400 and f"holds {constant}" in message_of(response)
    assert_still_serving(server, route)


def test_the_largest_seed_with_n_sequences_is_served_streamed_or_not(server: RunningServer) -> None:
    """seed + i past 2**63 - 1 wraps to 0 instead of overflowing the batch's int64 seeds (a 500, or an error
    event after a 200 when streamed)."""
    seed = 2**63 - 1
    predict = {"prompt": "def f():", "do_sample": True, "num_return_sequences": 3, "seed": seed, "max_new_tokens": 3}
    response = httpx.post(server.predict_url, json=predict, timeout=60)
    assert response.status_code == 200 and len(response.json()["data"]["completions"]) == 3
    chat = {"messages": [{"role": "user", "content": "hi"}], "n": 3, "seed": seed, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", url(server, "/v1/chat/completions"), json=chat, timeout=60) as streamed:
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert streamed.status_code == 200 and events[-1] == "data: [DONE]"
    assert not any('"error"' in event for event in events)


def test_an_exponential_decay_past_float_range_is_served_on_both_paths(server: RunningServer) -> None:
    """factor ** (tokens past the start) overflows a float within a few tokens: transformers' own processor raised
    OverflowError under beam search (a 500), while the batch computed +inf (an end token wins). Both now do the
    latter; min_new_tokens still holds the end tokens back."""
    for extra in ({"num_beams": 2}, {}):
        body = {"prompt": "def f(", "exponential_decay_length_penalty": [0, 1e100], "max_new_tokens": 8, **extra}
        response = httpx.post(server.predict_url, json=body, timeout=60)
        assert response.status_code == 200, response.text
        held = {**body, "min_new_tokens": 8, "exponential_decay_length_penalty": [0, 1e300]}
        response = httpx.post(server.predict_url, json=held, timeout=60)
        assert response.status_code == 200 and response.json()["data"]["completion_tokens"] == 8, response.text


BEAM_PATH_REFUSALS = [
    ({"length_penalty": 1e308, "max_new_tokens": 8}, "overflows"),
    ({"suppress_tokens": list(range(694)), "max_new_tokens": 8}, "leave no token"),
]


@pytest.mark.parametrize(("parameters", "expected"), BEAM_PATH_REFUSALS)
def test_what_beam_search_cannot_compute_is_a_400_on_both_paths(
    server: RunningServer, parameters: dict[str, object], expected: str
) -> None:
    """transformers' beam search raised OverflowError (a 500), or answered an empty text where the batch failed
    the request: both are refused before any work, whichever path would serve the request."""
    beams = httpx.post(server.predict_url, json={"prompt": "x", **parameters, "num_beams": 2}, timeout=60)
    assert beams.status_code == 400 and expected in message_of(beams), beams.text
    # The batch's answer is a 400 as well (length_penalty alone: transformers' "only used with beams").
    batch = httpx.post(server.predict_url, json={"prompt": "x", **parameters}, timeout=60)
    assert batch.status_code == 400, batch.text
    assert_still_serving(server, "predict")


def test_a_prompt_far_past_the_window_is_refused_having_tokenized_about_a_window(server: RunningServer) -> None:
    """Tokenizing 1 MiB takes ~0.75 s of a core: such a prompt is refused once a window's worth is counted."""
    huge = "def f(x):\n    return x  # a line of code\n" * 20_000  # 0.8 MiB, ~240K tokens
    response = httpx.post(server.predict_url, json={"prompt": huge}, timeout=60)
    assert response.status_code == 400 and "over 8192 tokens" in message_of(response)
    assert_still_serving(server, "predict")
