"""Isolation through the real server: hostile requests in the same batch never change, fail or stall others.

Twelve innocent greedy requests (predict, /v1/completions and /v1/chat/completions, streamed and not) are
first answered one at a time. Then they are sent again all at once, together with hostile ones: extreme but
valid sampling values on every route, streamed and not. Every innocent answer must be byte for byte its solo
answer; no hostile request may get a 5xx, and only the one that suppresses the whole vocabulary may be
refused (4xx) or cut short. The whole mix runs twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from tests.conftest import RunningServer

MAX_NEW_TOKENS = 16
PROMPTS = ("def compute_fib(n):", "import os\n", "class Stack:\n", "for i in range(10):")
ROUTES = ("predict", "/v1/completions", "/v1/chat/completions")
# The exception: every token suppressed leaves nothing to generate (a 4xx, or a stream that ends cut short).
SUPPRESS_EVERYTHING = "suppress_everything"
# Hostile predict values that leave a single candidate token at every step: greedy decoding in disguise.
GREEDY_IN_DISGUISE = ("temperature_1e-46", "top_p_1e-9", "top_k_1", "min_p_1", "epsilon_cutoff_0.999")


@dataclasses.dataclass(frozen=True)
class Request:
    name: str
    route: str
    body: dict[str, Any]
    stream: bool

    @property
    def label(self) -> str:
        return f"{self.name} on {self.route}{' (streamed)' if self.stream else ''}"


@dataclasses.dataclass(frozen=True)
class Outcome:
    status: int
    answer: bytes  # what the client received that must not change: the text, finish reason and token counts
    clean: bool  # the response ended as its protocol ends (a complete body; [DONE]; a stream not cut off)
    detail: str  # for failure messages

    def describe(self) -> str:
        return f"HTTP {self.status}, {'clean' if self.clean else 'NOT clean'}: {self.detail[:300]}"


def body_for(route: str, prompt: str, parameters: dict[str, Any], stream: bool) -> dict[str, Any]:
    if route == "predict":
        return {"prompt": prompt, "max_new_tokens": MAX_NEW_TOKENS, "stream": stream, **parameters}
    body: dict[str, Any] = {"max_tokens": MAX_NEW_TOKENS, "stream": stream, **parameters}
    if route == "/v1/completions":
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}]
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def innocent_requests() -> list[Request]:
    """Twelve greedy requests: each route, two prompts each, streamed and not."""
    requests = []
    for r, route in enumerate(ROUTES):
        greedy = {} if route == "predict" else {"temperature": 0}
        for prompt in (PROMPTS[r], PROMPTS[r + 1]):
            for stream in (False, True):
                name = f"innocent-{len(requests)}"
                requests.append(Request(name, route, body_for(route, prompt, greedy, stream), stream))
    return requests


def hostile_requests(vocab_size: int) -> list[Request]:
    sampled = {"do_sample": True}
    predict: dict[str, dict[str, Any]] = {
        "temperature_1e-46": {**sampled, "temperature": 1e-46},
        "repetition_penalty_1e-30": {**sampled, "repetition_penalty": 1e-30},
        "repetition_penalty_1e30": {**sampled, "repetition_penalty": 1e30},
        "top_p_1e-9": {**sampled, "top_p": 1e-9},
        "top_k_1": {**sampled, "top_k": 1},
        "min_p_1": {**sampled, "min_p": 1.0},
        "typical_p_1e-9": {**sampled, "typical_p": 1e-9},
        "epsilon_cutoff_0.999": {**sampled, "epsilon_cutoff": 0.999},
        "eta_cutoff_0.999": {**sampled, "eta_cutoff": 0.999},
        "temperature_2": {**sampled, "temperature": 2.0},
        "temperature_100": {**sampled, "temperature": 100.0},
        "exponential_decay_1e300": {"exponential_decay_length_penalty": [0, 1e300]},
        SUPPRESS_EVERYTHING: {"suppress_tokens": list(range(vocab_size))},
    }
    openai: dict[str, dict[str, Any]] = {
        "presence_penalty_-2": {"presence_penalty": -2.0},
        "presence_penalty_2": {"presence_penalty": 2.0},
        "frequency_penalty_-2": {"frequency_penalty": -2.0},
        "frequency_penalty_2": {"frequency_penalty": 2.0},
        "logit_bias_+-100": {"logit_bias": {"5": 100, "6": -100, "0": -100}},
        "greedy_with_everything_at_its_bound": {
            "temperature": 0,
            "presence_penalty": 2.0,
            "frequency_penalty": -2.0,
            "logit_bias": {"7": -100, "8": 100},
        },
        "temperature_2": {"temperature": 2.0},
        "top_p_1e-9": {"temperature": 1.0, "top_p": 1e-9},
        "top_k_1": {"temperature": 1.5, "top_k": 1},
        "repetition_penalty_1e-30": {"temperature": 0.5, "repetition_penalty": 1e-30},
        "repetition_penalty_10": {"repetition_penalty": 10.0},
    }
    requests = []
    for stream in (False, True):
        for name, parameters in predict.items():
            requests.append(Request(name, "predict", body_for("predict", "def f():", parameters, stream), stream))
        for route in ROUTES[1:]:
            for name, parameters in openai.items():
                requests.append(Request(name, route, body_for(route, "def f():", parameters, stream), stream))
    return requests


def url(server: RunningServer, route: str) -> str:
    return server.predict_url if route == "predict" else server.base_url + route


def answer_of(request: Request, body: Any) -> bytes:
    """The parts of a non-streamed response that must not change (not ids or timestamps)."""
    if request.route == "predict":
        data = body["data"]
        kept = {k: data[k] for k in ("completion", "finish_reason", "prompt_tokens", "completion_tokens")}
    else:
        kept = {"choices": body["choices"], "usage": body["usage"]}
    return json.dumps(kept, sort_keys=True, ensure_ascii=False).encode()


def parse_sse(request: Request, raw: bytes) -> tuple[bytes, bool, str]:
    """(answer, ended with [DONE] and no error event, detail) of an OpenAI event stream."""
    text: list[str] = []
    finish: list[Any] = []
    usage: Any = None
    done = False
    errors: list[Any] = []
    for line in raw.decode("utf-8").splitlines():
        if not line.startswith("data: "):
            continue
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            done = True
            continue
        event = json.loads(payload)
        if "error" in event:
            errors.append(event["error"])
            continue
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            piece = (
                choice.get("text") if request.route == "/v1/completions" else (choice.get("delta") or {}).get("content")
            )
            text.append(piece or "")
            if choice.get("finish_reason"):
                finish.append(choice["finish_reason"])
    answer = json.dumps({"text": "".join(text), "finish": finish, "usage": usage}, sort_keys=True, ensure_ascii=False)
    return answer.encode(), done and not errors, f"{answer[:200]} errors={errors}"


async def send(client: httpx.AsyncClient, server: RunningServer, request: Request) -> Outcome:
    target = url(server, request.route)
    if not request.stream:
        response = await client.post(target, json=request.body)
        if response.status_code != 200:
            return Outcome(response.status_code, b"", True, response.text)
        return Outcome(200, answer_of(request, response.json()), True, response.text)
    async with client.stream("POST", target, json=request.body) as response:
        if response.status_code != 200:
            return Outcome(response.status_code, b"", True, (await response.aread()).decode(errors="replace"))
        chunks: list[bytes] = []
        try:
            async for chunk in response.aiter_bytes():
                chunks.append(chunk)
        except httpx.TransportError as error:  # the server cut the stream off
            return Outcome(200, b"".join(chunks), False, f"stream cut off: {error!r} after {b''.join(chunks)[:200]!r}")
    raw = b"".join(chunks)
    if request.route == "predict":
        return Outcome(200, raw, True, raw.decode(errors="replace"))
    answer, clean, detail = parse_sse(request, raw)
    return Outcome(200, answer, clean, detail)


async def send_all(server: RunningServer, requests: list[Request]) -> list[Outcome]:
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        return list(await asyncio.gather(*(send(client, server, request) for request in requests)))


@pytest.fixture(scope="module")
def vocab_size(tiny_model_dir: Path) -> int:
    return len(AutoTokenizer.from_pretrained(tiny_model_dir))


@pytest.fixture(scope="module")
def solo_answers(server: RunningServer) -> dict[str, Outcome]:
    """Each innocent request alone, one at a time."""
    answers: dict[str, Outcome] = {}
    for request in innocent_requests():
        [outcome] = asyncio.run(send_all(server, [request]))
        assert outcome.status == 200 and outcome.clean, f"{request.label} alone: {outcome.describe()}"
        answers[request.name] = outcome
    return answers


def text_of(request: Request, outcome: Outcome) -> str:
    if request.route == "predict":
        return outcome.answer.decode() if request.stream else json.loads(outcome.answer)["completion"]
    answer = json.loads(outcome.answer)
    if request.stream:
        return str(answer["text"])
    choice = answer["choices"][0]
    return str(choice["text"] if request.route == "/v1/completions" else choice["message"]["content"])


def test_solo_answers_are_real_and_streaming_agrees(solo_answers: dict[str, Outcome]) -> None:
    """Guards the comparison below: the solo answers are real texts, and each streamed one is its
    non-streamed twin's text (so what is compared is the completion itself)."""
    requests = innocent_requests()
    texts = {request.name: text_of(request, solo_answers[request.name]) for request in requests}
    assert all(len(text) >= 4 for text in texts.values()), texts
    assert len(set(texts.values())) >= 4, texts
    for plain, streamed in zip(requests[::2], requests[1::2]):
        assert (plain.route, plain.stream, streamed.stream) == (streamed.route, False, True)
        assert texts[plain.name] == texts[streamed.name], (plain.label, texts[plain.name], texts[streamed.name])


@pytest.mark.parametrize("round_", [1, 2])
def test_hostile_requests_never_change_fail_or_stall_innocent_ones(
    server: RunningServer, solo_answers: dict[str, Outcome], vocab_size: int, round_: int
) -> None:
    innocent = innocent_requests()
    hostile = hostile_requests(vocab_size)
    # Interleaved, so innocent and hostile requests reach the batch at the same time.
    mix: list[Request] = []
    for i in range(max(len(innocent), len(hostile))):
        mix.extend(group[i] for group in (hostile, innocent) if i < len(group))
    outcomes = dict(zip((id(request) for request in mix), asyncio.run(send_all(server, mix))))

    problems = []
    for request in innocent:
        got, want = outcomes[id(request)], solo_answers[request.name]
        if got.status != 200 or not got.clean:
            problems.append(f"innocent {request.label}: {got.describe()}")
        elif got.answer != want.answer:
            problems.append(f"innocent {request.label} changed:\n  alone {want.answer!r}\n  mixed {got.answer!r}")
    for request in hostile:
        got = outcomes[id(request)]
        if got.status >= 500:
            problems.append(f"hostile {request.label}: a server error: {got.describe()}")
        elif request.name == SUPPRESS_EVERYTHING:
            if got.status == 200 and got.clean:
                problems.append(f"hostile {request.label}: a clean 200 with nothing left to generate: {got.describe()}")
        elif got.status != 200 or not got.clean:
            problems.append(f"hostile {request.label}: should be served: {got.describe()}")
    assert not problems, f"round {round_}:\n" + "\n".join(problems)

    # Values that leave one token per step are greedy decoding, however they get there.
    collapsed = {
        request.name: json.loads(outcomes[id(request)].answer)["completion"]
        for request in hostile
        if request.route == "predict" and not request.stream and request.name in GREEDY_IN_DISGUISE
    }
    assert len(collapsed) == len(GREEDY_IN_DISGUISE) and len(set(collapsed.values())) == 1, collapsed
    streamed = {
        request.name: outcomes[id(request)].answer.decode()
        for request in hostile
        if request.route == "predict" and request.stream and request.name in GREEDY_IN_DISGUISE
    }
    assert set(streamed.values()) == set(collapsed.values()), streamed
