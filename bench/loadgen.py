"""Closed-loop HTTP load against the predict route: N clients, each sending its requests back to back.

Every request generates exactly L new tokens, so an early end-of-text never makes one server look
faster than another. By default the prompt is chosen so that its greedy completion runs the full L
tokens (a warm-up tries a few P-token prompts until one does); ``--pin-length`` instead sends
``min_new_tokens = L`` (served in the batch, as the seed Truss's users send it).
Timings come from the streamed body: time to first chunk (TTFT), gaps between chunks, and the
whole request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import httpx
import pydantic


class LoadSpec(pydantic.BaseModel):
    """What every request of a run looks like, and where it goes."""

    model_config = pydantic.ConfigDict(frozen=True)

    predict_url: str
    prompt: str
    max_new_tokens: int = pydantic.Field(ge=1)
    requests_per_client: int = pydantic.Field(ge=1)
    timeout_s: float = 300.0
    # min_new_tokens = L pins the length. Off by default: requests are greedy, hence every request
    # repeats the warm-up's completion and its token count (the mixed profile pins lengths instead).
    pin_length: bool = False
    # Never serialized into results: it is a credential.
    headers: dict[str, str] = pydantic.Field(default_factory=dict, exclude=True, repr=False)

    def body(self, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": self.prompt, "max_new_tokens": self.max_new_tokens, "stream": stream}
        if self.pin_length:
            body["min_new_tokens"] = self.max_new_tokens
        return body


class RequestSample(pydantic.BaseModel):
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    chunk_gaps_s: list[float] = pydantic.Field(default_factory=list)
    chunks: int = 0
    text: str = ""
    # The server's own count (OpenAI's usage) where the route reports one; None: count by the text.
    completion_tokens: int | None = None
    error: str | None = None


class Percentiles(pydantic.BaseModel):
    p50: float | None
    p95: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        return cls(p50=percentile(values, 50), p95=percentile(values, 95))


class LevelResult(pydantic.BaseModel):
    """One concurrency level against one server."""

    concurrency: int
    requests: int
    failures: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    latency_s: Percentiles
    ttft_s: Percentiles
    # Gaps between streamed chunks, pooled over all requests. A chunk is usually one token, but the
    # detokenizer holds back partial UTF-8 characters and TCP may merge chunks, so it is not exact.
    inter_chunk_s: Percentiles
    # Per request: (latency - TTFT) / (L - 1), the mean time per output token after the first.
    time_per_output_token_s: Percentiles
    errors: list[str] = pydantic.Field(default_factory=list)


class WarmupCheck(pydantic.BaseModel):
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    latency_s: float
    completion: str


class BenchError(RuntimeError):
    pass


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def warmup(client: httpx.AsyncClient, spec: LoadSpec) -> WarmupCheck:
    """One non-streamed request: proves the route works and that it really generates L tokens."""
    started = time.perf_counter()
    response = await client.post(spec.predict_url, json=spec.body(stream=False), headers=spec.headers)
    latency = time.perf_counter() - started
    if response.status_code != 200:
        raise BenchError(f"warm-up got HTTP {response.status_code}: {response.text[:500]}")
    payload = response.json()
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict) or payload.get("status") != "success":
        raise BenchError(f"warm-up got an unexpected body: {str(payload)[:500]}")
    check = WarmupCheck(
        prompt_tokens=int(data["prompt_tokens"]),
        completion_tokens=int(data["completion_tokens"]),
        finish_reason=str(data["finish_reason"]),
        latency_s=latency,
        completion=str(data["completion"]),
    )
    if spec.pin_length and check.completion_tokens != spec.max_new_tokens:
        # Counting L tokens per request would then be a lie; refuse rather than report it.
        raise BenchError(
            f"the server generated {check.completion_tokens} tokens, not the {spec.max_new_tokens} asked for "
            f"(finish_reason={check.finish_reason}); does it honour min_new_tokens?"
        )
    return check


class StreamClock:
    """One request's timings: sent, the first chunk (TTFT), the gaps between chunks, done."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first: float | None = None
        self.last = self.started
        self.gaps: list[float] = []
        self.chunks = 0

    def tick(self) -> None:
        """A chunk has arrived."""
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.chunks += 1

    def failed(self, error: str) -> RequestSample:
        return RequestSample(ok=False, latency_s=time.perf_counter() - self.started, error=error)

    def done(self, **fields: Any) -> RequestSample:
        return RequestSample(
            ok=True,
            latency_s=time.perf_counter() - self.started,
            ttft_s=None if self.first is None else self.first - self.started,
            chunk_gaps_s=self.gaps,
            chunks=self.chunks,
            **fields,
        )


async def one_request(client: httpx.AsyncClient, spec: LoadSpec) -> RequestSample:
    clock = StreamClock()
    parts: list[bytes] = []
    try:
        async with client.stream("POST", spec.predict_url, json=spec.body(stream=True), headers=spec.headers) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                return clock.failed(f"HTTP {r.status_code}: {body[:200]}")
            async for chunk in r.aiter_raw():
                if chunk:
                    clock.tick()
                    parts.append(chunk)
    except httpx.HTTPError as exc:
        return clock.failed(f"{type(exc).__name__}: {exc}")
    if clock.first is None:
        return clock.failed("empty stream")
    return clock.done(text=b"".join(parts).decode("utf-8", errors="replace"))


async def run_level(
    client: httpx.AsyncClient,
    spec: LoadSpec,
    concurrency: int,
    check: WarmupCheck,
    on_done: Callable[[RequestSample], None] | None = None,
) -> LevelResult:
    """``concurrency`` clients, each sending ``requests_per_client`` requests one after another."""
    samples, wall = await closed_loop(lambda: one_request(client, spec), concurrency, spec.requests_per_client, on_done)
    return summarize(concurrency, samples, wall, check)


async def closed_loop(
    send: Callable[[], Awaitable[RequestSample]],
    concurrency: int,
    requests_per_client: int,
    on_done: Callable[[RequestSample], None] | None = None,
) -> tuple[list[RequestSample], float]:
    """``concurrency`` clients, each awaiting ``send()`` ``requests_per_client`` times; the samples and wall time."""
    samples: list[RequestSample] = []

    async def client_loop() -> None:
        for _ in range(requests_per_client):
            sample = await send()
            samples.append(sample)
            if on_done is not None:
                on_done(sample)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return samples, time.perf_counter() - started


def _verified(sample: RequestSample, check: WarmupCheck) -> RequestSample:
    """Greedy decoding: every request must produce the warm-up's completion, so it has the warm-up's token
    count. A request whose text (or, where the server counts them, whose token count) differs is counted
    as failed rather than guessed at."""
    if not sample.ok:
        return sample
    if sample.completion_tokens is not None:
        if sample.completion_tokens == check.completion_tokens:
            return sample
        error = f"{sample.completion_tokens} completion tokens, the warm-up had {check.completion_tokens}"
    elif sample.text == check.completion:
        return sample
    else:
        error = "streamed text differs from the warm-up completion"
    return sample.model_copy(update={"ok": False, "error": error})


def summarize(concurrency: int, samples: Sequence[RequestSample], wall_s: float, check: WarmupCheck) -> LevelResult:
    new_tokens = check.completion_tokens
    samples = [_verified(s, check) for s in samples]
    ok = [s for s in samples if s.ok]
    output_tokens = new_tokens * len(ok)
    tpot = [(s.latency_s - s.ttft_s) / (new_tokens - 1) for s in ok if s.ttft_s is not None and new_tokens > 1]
    return LevelResult(
        concurrency=concurrency,
        requests=len(samples),
        failures=len(samples) - len(ok),
        wall_s=wall_s,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        latency_s=Percentiles.of([s.latency_s for s in ok]),
        ttft_s=Percentiles.of([s.ttft_s for s in ok if s.ttft_s is not None]),
        inter_chunk_s=Percentiles.of([g for s in ok for g in s.chunk_gaps_s]),
        time_per_output_token_s=Percentiles.of(tpot),
        errors=sorted({s.error for s in samples if s.error})[:5],
    )


def make_client(spec: LoadSpec, max_connections: int) -> httpx.AsyncClient:
    # One connection per client, so the server really sees N requests at once (no HTTP queueing).
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    return httpx.AsyncClient(timeout=httpx.Timeout(spec.timeout_s, connect=30.0), limits=limits)


_PROMPT_SOURCE = (
    "def compute_fib(n):\n    if n < 2:\n        return n\n    return compute_fib(n - 1) + compute_fib(n - 2)\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\nfor i in range(10):\n    print(i * i)\n\n"
)


def build_prompt(tokenizer: Any, n_tokens: int, variant: int = 0) -> str:
    """Code-like text that the given tokenizer encodes to exactly ``n_tokens`` tokens.

    ``variant`` starts the text at another line, for a different prompt of the same length.
    Cutting a token list and decoding can re-encode to a different length (BPE merges across the
    cut), so we try a few cut points until the round trip is exact.
    """
    if n_tokens < 1:
        raise ValueError("the prompt needs at least one token")

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    lines = _PROMPT_SOURCE.splitlines(keepends=True)
    start = variant % len(lines)
    source = "".join(lines[start:] + lines[:start])
    while len(encode(source)) < n_tokens + 32:
        source += _PROMPT_SOURCE
    ids = encode(source)
    for cut in list(range(n_tokens, n_tokens + 16)) + list(range(n_tokens - 1, max(0, n_tokens - 16), -1)):
        text = tokenizer.decode(ids[:cut])
        if len(encode(text)) == n_tokens:
            return text
    raise BenchError(f"could not build a prompt of exactly {n_tokens} tokens")


async def full_length_prompt(
    client: httpx.AsyncClient, spec: LoadSpec, candidates: Sequence[str]
) -> tuple[LoadSpec, WarmupCheck]:
    """The first candidate prompt whose completion runs all L tokens, with its warm-up check."""
    check: WarmupCheck | None = None
    for prompt in candidates:
        spec = spec.model_copy(update={"prompt": prompt})
        check = await warmup(client, spec)
        if check.completion_tokens == spec.max_new_tokens:
            return spec, check
    assert check is not None, "no candidate prompts"
    raise BenchError(
        f"none of {len(candidates)} prompts ran to {spec.max_new_tokens} tokens (the last ended after "
        f"{check.completion_tokens}, finish_reason={check.finish_reason}); use --pin-length or fewer --new-tokens"
    )
