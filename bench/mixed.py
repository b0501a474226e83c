"""The mixed-traffic profile: what real clients send, all classes side by side on one server.

Five classes, one per request, assigned round-robin over clients and requests (request k of client c
is of class (c + k) mod 5), so every level carries all of them at once:

* ``fim``        predict, fill-in-the-middle as IDE plugins send it: prefix/suffix, do_sample,
                 temperature 0.2, top_p 0.95, stop ["\\n\\n"], streamed (plain text chunks);
* ``nvidia``     /v1/completions shaped like NVIDIA's StarCoder2 endpoint: seed, temperature 0.1,
                 top_p 1, presence/frequency penalties 0, streamed (Server-Sent Events);
* ``chat``       /v1/chat/completions with presence_penalty 0.5, streamed (SSE);
* ``logprobs``   /v1/completions with logprobs 2 (the server's default temperature), streamed (SSE);
* ``min_tokens`` predict in the seed Truss's style: min_new_tokens = max_new_tokens = L, streamed.

Equal work: every request also asks for at least L tokens (``min_new_tokens`` on predict, vLLM's
``min_tokens`` on the OpenAI routes), so an early end-of-text never makes one server look faster.
Only stop sequences can still end a request early: fim's ["\\n\\n"] and chat's implied "\\nHuman:".

Token counts: the OpenAI routes report the server's own count (``stream_options.include_usage``);
without a ``usage`` chunk the token events are counted instead. Predict streams carry no count, so a
predict request is counted at its pinned length L; that is exact for ``min_tokens`` (no stop) and an
upper bound for ``fim`` when ["\\n\\n"] fires (never on the tiny random model; the warm-up probes it).
Both servers get the same requests, so the batched / one-at-a-time ratio is fair either way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pydantic

from bench.loadgen import BenchError, Percentiles, percentile

CLASSES = ("fim", "nvidia", "chat", "logprobs", "min_tokens")
# Where each class's token count comes from (recorded per class in the results).
COUNTED_BY_USAGE, COUNTED_BY_EVENTS, COUNTED_BY_PINNED = "usage", "events", "pinned"


class MixedSpec(pydantic.BaseModel):
    """Where the mixed requests go and the shared prompt / length."""

    model_config = pydantic.ConfigDict(frozen=True)

    base_url: str
    predict_path: str
    # "/v1" on the local server; Baseten serves the OpenAI routes under "/sync/v1".
    openai_path: str = "/v1"
    prompt: str
    new_tokens: int = pydantic.Field(ge=1)
    requests_per_client: int = pydantic.Field(ge=1)
    timeout_s: float = 600.0
    # The deployment serves one model and accepts any name; OpenAI clients always send one.
    model: str = "starcoder"
    # Never serialized into results: it is a credential.
    headers: dict[str, str] = pydantic.Field(default_factory=dict, exclude=True, repr=False)


@dataclasses.dataclass(frozen=True)
class MixedRequest:
    request_class: str
    url: str
    body: dict[str, Any]
    sse: bool  # OpenAI Server-Sent Events; otherwise predict's plain text chunks


class MixedSample(pydantic.BaseModel):
    request_class: str
    ok: bool
    status: int | None = None  # HTTP status; None when no response came back
    latency_s: float
    ttft_s: float | None = None
    completion_tokens: int = 0
    counted_by: str = ""
    error: str | None = None


class ClassResult(pydantic.BaseModel):
    request_class: str
    requests: int
    failures: int
    output_tokens: int
    latency_s: Percentiles
    # Request sent -> first chunk that carries generated text (chat's opening role-only chunk does not).
    ttft_s: Percentiles
    # p95 latency over the greedy profile's p95 on the same server at the same concurrency (target <= 1.5).
    # Results written before the five-class mix held an in-mix "greedy" class and used it as reference.
    p95_vs_greedy: float | None = None
    # The class's share of the level's throughput: its output tokens / the level's wall time. Round-robin
    # gives every class the same number of requests, so this differs between classes only by their tokens.
    output_tokens_per_s: float | None = None
    # What one client of the class sees: median over its requests of tokens / latency.
    request_tokens_per_s_p50: float | None = None
    # HTTP status -> requests ("none": no response, e.g. a connection error).
    http_statuses: dict[str, int] = pydantic.Field(default_factory=dict)
    # Successful requests that generated fewer than L tokens (a stop sequence ended them).
    short_requests: int = 0
    tokens_counted_by: list[str] = pydantic.Field(default_factory=list)


class MixedLevel(pydantic.BaseModel):
    concurrency: int
    requests: int
    failures: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    classes: list[ClassResult]
    errors: list[str] = pydantic.Field(default_factory=list)
    # The greedy profile's p95 latency (same server, same concurrency) that p95_vs_greedy divides by.
    greedy_p95_s: float | None = None

    def slowest_class(self) -> ClassResult | None:
        """The class with the highest p95 / greedy p95 (None without a greedy reference)."""
        rated = [c for c in self.classes if c.p95_vs_greedy is not None]
        return max(rated, key=lambda c: c.p95_vs_greedy or 0.0) if rated else None


# --- request bodies ------------------------------------------------------------------------------


def _fim(spec: MixedSpec, index: int) -> tuple[str, dict[str, Any], bool]:
    half = len(spec.prompt) // 2  # the cursor mid-file: code before and after it
    body = {
        "prefix": spec.prompt[:half],
        "suffix": spec.prompt[half:],
        "do_sample": True,
        "temperature": 0.2,
        "top_p": 0.95,
        "stop": ["\n\n"],
        "max_new_tokens": spec.new_tokens,
        "min_new_tokens": spec.new_tokens,  # added for equal work; the stop can still end it
        "stream": True,
    }
    return spec.predict_path, body, False


def _min_tokens(spec: MixedSpec, index: int) -> tuple[str, dict[str, Any], bool]:
    body = {"prompt": spec.prompt, "min_new_tokens": spec.new_tokens, "max_new_tokens": spec.new_tokens, "stream": True}
    return spec.predict_path, body, False


def _openai_common(spec: MixedSpec) -> dict[str, Any]:
    return {
        "model": spec.model,
        "max_tokens": spec.new_tokens,
        "min_tokens": spec.new_tokens,  # added for equal work (vLLM's extra; the server honours it)
        "stream": True,
        "stream_options": {"include_usage": True},  # the server's own token count, in a last chunk
    }


def _nvidia(spec: MixedSpec, index: int) -> tuple[str, dict[str, Any], bool]:
    # NVIDIA's example request (seed 003): temperature 0.1, top_p 1, penalties 0, a seed. The seed
    # is the request's index, so both servers get the very same requests and generate the same text.
    body = {
        "prompt": spec.prompt,
        "temperature": 0.1,
        "top_p": 1,
        "frequency_penalty": 0,
        "presence_penalty": 0,
        "seed": index,
        **_openai_common(spec),
    }
    return spec.openai_path + "/completions", body, True


def _chat(spec: MixedSpec, index: int) -> tuple[str, dict[str, Any], bool]:
    body = {"messages": [{"role": "user", "content": spec.prompt}], "presence_penalty": 0.5, **_openai_common(spec)}
    return spec.openai_path + "/chat/completions", body, True


def _logprobs(spec: MixedSpec, index: int) -> tuple[str, dict[str, Any], bool]:
    return spec.openai_path + "/completions", {"prompt": spec.prompt, "logprobs": 2, **_openai_common(spec)}, True


_BUILDERS: dict[str, Callable[[MixedSpec, int], tuple[str, dict[str, Any], bool]]] = {
    "fim": _fim,
    "nvidia": _nvidia,
    "chat": _chat,
    "logprobs": _logprobs,
    "min_tokens": _min_tokens,
}
assert tuple(_BUILDERS) == CLASSES


def request_for(spec: MixedSpec, request_class: str, index: int) -> MixedRequest:
    """One request of the class; ``index`` (unique per request in a level) seeds the ``nvidia`` class."""
    if request_class not in _BUILDERS:
        raise ValueError(f"unknown request class {request_class!r}; known: {', '.join(CLASSES)}")
    path, body, sse = _BUILDERS[request_class](spec, index)
    return MixedRequest(request_class, spec.base_url + path, body, sse)


def class_of(client_index: int, request_index: int) -> str:
    """Round-robin with a per-client offset: at any moment the clients are spread over all classes."""
    return CLASSES[(client_index + request_index) % len(CLASSES)]


# --- reading the streams -------------------------------------------------------------------------


@dataclasses.dataclass
class _StreamRead:
    first_token_at: float | None = None
    token_events: int = 0
    usage_tokens: int | None = None
    done: bool = False  # SSE: "data: [DONE]" arrived
    error: str | None = None


async def _read_plain(response: httpx.Response) -> _StreamRead:
    """Predict's stream: UTF-8 text chunks, nothing else (an error aborts the connection)."""
    read = _StreamRead()
    async for chunk in response.aiter_raw():
        if chunk:
            read.first_token_at = read.first_token_at or time.perf_counter()
            read.token_events += 1
    read.done = read.token_events > 0
    return read


def _generated_in(choice: dict[str, Any]) -> int:
    """Tokens an SSE choice carries: its logprobs entries, else 1 if it has text, else 0."""
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict) and isinstance(logprobs.get("tokens"), list):
        return len(logprobs["tokens"])
    delta = choice.get("delta")
    text = choice.get("text") if delta is None else (delta or {}).get("content")
    return 1 if text else 0


async def _read_sse(response: httpx.Response) -> _StreamRead:
    """OpenAI's stream: ``data: {json}`` lines, ``data: [DONE]`` last; errors arrive as an event."""
    read = _StreamRead()
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            read.done = True
            break
        event = json.loads(data)
        if event.get("error"):
            read.error = str(event["error"])[:200]
            break
        generated = sum(_generated_in(choice) for choice in event.get("choices") or [])
        if generated:
            read.first_token_at = read.first_token_at or time.perf_counter()
            read.token_events += generated
        if event.get("usage"):
            read.usage_tokens = int(event["usage"]["completion_tokens"])
    return read


def _tokens(request: MixedRequest, read: _StreamRead, new_tokens: int) -> tuple[int, str]:
    if read.usage_tokens is not None:
        return read.usage_tokens, COUNTED_BY_USAGE
    if request.sse:
        return read.token_events, COUNTED_BY_EVENTS
    # Predict streams carry no count; the body pins the length (min = max = L).
    return new_tokens, COUNTED_BY_PINNED


async def one_mixed_request(client: httpx.AsyncClient, spec: MixedSpec, request_class: str, index: int) -> MixedSample:
    request = request_for(spec, request_class, index)
    started = time.perf_counter()
    status: int | None = None

    def failed(error: str) -> MixedSample:
        latency = time.perf_counter() - started
        return MixedSample(request_class=request_class, ok=False, status=status, latency_s=latency, error=error)

    try:
        async with client.stream("POST", request.url, json=request.body, headers=spec.headers) as response:
            status = response.status_code
            if status != 200:
                return failed(f"HTTP {status}: {(await response.aread()).decode(errors='replace')[:200]}")
            read = await (_read_sse(response) if request.sse else _read_plain(response))
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return failed(f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if read.error or not read.done or read.first_token_at is None:
        return failed(f"{request_class}: " + (read.error or "the stream ended without a generated token or [DONE]"))
    tokens, counted_by = _tokens(request, read, spec.new_tokens)
    return MixedSample(
        request_class=request_class,
        ok=True,
        status=status,
        latency_s=end - started,
        ttft_s=read.first_token_at - started,
        completion_tokens=tokens,
        counted_by=counted_by,
    )


# --- warm-up and levels --------------------------------------------------------------------------


async def mixed_warmup(client: httpx.AsyncClient, spec: MixedSpec) -> list[str]:
    """One request of every class (unmeasured): fail fast, naming the class, if one is refused.

    Returns warnings: a non-streamed twin of each predict class shows whether the server really
    generates L tokens, since the streamed predict requests are counted at L.
    """
    samples = await asyncio.gather(*(one_mixed_request(client, spec, c, i) for i, c in enumerate(CLASSES)))
    failures = [f"{s.request_class}: {s.error}" for s in samples if not s.ok]
    if failures:
        raise BenchError("mixed warm-up failed: " + "; ".join(failures))
    return [w for c in ("fim", "min_tokens") if (w := await _pinned_length_warning(client, spec, c))]


async def _pinned_length_warning(client: httpx.AsyncClient, spec: MixedSpec, request_class: str) -> str | None:
    request = request_for(spec, request_class, 0)
    response = await client.post(request.url, json={**request.body, "stream": False}, headers=spec.headers)
    if response.status_code != 200:
        raise BenchError(f"mixed warm-up ({request_class}, not streamed): HTTP {response.status_code}")
    data = response.json()["data"]
    if int(data["completion_tokens"]) == spec.new_tokens:
        return None
    message = (
        f"{request_class}: the server generated {data['completion_tokens']} tokens, not {spec.new_tokens} "
        f"(finish_reason={data['finish_reason']}); its streamed requests are counted at {spec.new_tokens}"
    )
    if request_class == "min_tokens":  # nothing but the server can cut it short: counting L would be a lie
        raise BenchError(message + "; does the server honour min_new_tokens?")
    return message + " (an upper bound when the stop sequence fires)"


async def run_mixed_level(
    client: httpx.AsyncClient,
    spec: MixedSpec,
    concurrency: int,
    on_done: Callable[[MixedSample], None] | None = None,
) -> MixedLevel:
    """``concurrency`` clients, each sending ``requests_per_client`` requests back to back (closed loop)."""
    samples: list[MixedSample] = []

    async def client_loop(client_index: int) -> None:
        for k in range(spec.requests_per_client):
            index = client_index * spec.requests_per_client + k
            sample = await one_mixed_request(client, spec, class_of(client_index, k), index)
            samples.append(sample)
            if on_done is not None:
                on_done(sample)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
    return summarize_mixed(concurrency, samples, time.perf_counter() - started, spec.new_tokens)


# --- summaries -----------------------------------------------------------------------------------


def _class_result(request_class: str, mine: Sequence[MixedSample], wall_s: float, new_tokens: int) -> ClassResult:
    good = [s for s in mine if s.ok]
    statuses: dict[str, int] = {}
    for s in mine:
        key = "none" if s.status is None else str(s.status)
        statuses[key] = statuses.get(key, 0) + 1
    tokens = sum(s.completion_tokens for s in good)
    return ClassResult(
        request_class=request_class,
        requests=len(mine),
        failures=len(mine) - len(good),
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        request_tokens_per_s_p50=percentile([s.completion_tokens / s.latency_s for s in good if s.latency_s > 0], 50),
        latency_s=Percentiles.of([s.latency_s for s in good]),
        ttft_s=Percentiles.of([s.ttft_s for s in good if s.ttft_s is not None]),
        http_statuses=dict(sorted(statuses.items())),
        short_requests=sum(1 for s in good if s.completion_tokens < new_tokens),
        tokens_counted_by=sorted({s.counted_by for s in good}),
    )


def summarize_mixed(concurrency: int, samples: Sequence[MixedSample], wall_s: float, new_tokens: int) -> MixedLevel:
    classes = [_class_result(c, [s for s in samples if s.request_class == c], wall_s, new_tokens) for c in CLASSES]
    tokens = sum(c.output_tokens for c in classes)
    return MixedLevel(
        concurrency=concurrency,
        requests=len(samples),
        failures=sum(c.failures for c in classes),
        wall_s=wall_s,
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        classes=classes,
        errors=sorted({s.error for s in samples if s.error})[:5],
    )


def with_greedy_reference(level: MixedLevel, greedy_p95_s: float | None) -> MixedLevel:
    """The level with each class's p95 divided by the greedy profile's p95 (same server and concurrency)."""
    if not greedy_p95_s:
        return level
    classes = [
        c.model_copy(update={"p95_vs_greedy": None if c.latency_s.p95 is None else c.latency_s.p95 / greedy_p95_s})
        for c in level.classes
    ]
    return level.model_copy(update={"classes": classes, "greedy_p95_s": greedy_p95_s})
