"""What each request did, as Prometheus metrics and one log line: recorded once per request by the lifecycle
(``lifecycle.serve``), whatever its protocol, at its end (the last byte sent, or the client gone).

truss serves ``prometheus_client``'s default registry at ``/metrics/``; the engine's own gauges (running, waiting,
batch size, KV-cache usage) and counters (prefix-cache hits, path) are in ``engine/engine.py``. Labels are the
route and the status code only: never an id or any text, so the number of series stays bounded.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.responses import Response, StreamingResponse

from starcoder_serving.engine.engine import StreamTrace

logger = logging.getLogger("starcoder_serving.requests")

# Code completion: an editor's keystroke answers in tens of milliseconds; a long prompt on a busy replica, seconds.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536)

REQUESTS = Counter(
    "starcoder_requests", "Requests by route and HTTP status as sent (499: the client went away).", ["route", "code"]
)
TTFT = Histogram(
    "starcoder_time_to_first_token_seconds",
    "From a request's arrival to its first generated token.",
    ["route"],
    buckets=TTFT_BUCKETS,
)
TPOT = Histogram(
    "starcoder_time_per_output_token_seconds",
    "(duration - time to first token) / (tokens - 1).",
    ["route"],
    buckets=TPOT_BUCKETS,
)
DURATION = Histogram(
    "starcoder_request_duration_seconds",
    "From a request's arrival to its last byte sent.",
    ["route"],
    buckets=DURATION_BUCKETS,
)
PROMPT_TOKENS = Counter("starcoder_prompt_tokens", "Prompt tokens of generated or scored requests.", ["route"])
GENERATION_TOKENS = Counter("starcoder_generation_tokens", "Tokens generated.", ["route"])
REQUEST_PROMPT_TOKENS = Histogram(
    "starcoder_request_prompt_tokens", "Prompt tokens per request.", ["route"], buckets=TOKEN_BUCKETS
)
REQUEST_GENERATION_TOKENS = Histogram(
    "starcoder_request_generation_tokens", "Tokens generated per request.", ["route"], buckets=TOKEN_BUCKETS
)

_ids = itertools.count(1)


class RequestRecord:
    """One request, from its arrival to its end: what the lifecycle learns on the way, recorded once by ``finish``."""

    __slots__ = ("arrival", "client_left", "failed", "finished", "id", "prompt_tokens", "route", "text", "trace")

    def __init__(self, route: str) -> None:
        self.arrival = time.perf_counter()
        self.id = next(_ids)
        self.route = route
        self.trace = StreamTrace()
        self.prompt_tokens = 0
        self.client_left = False
        self.failed: int | None = None  # the status of an error that ended a stream already started
        self.finished = False
        self.text: dict[str, Any] | None = None  # prompt and completion, only with log_request_text

    def respond(self, response: Any) -> Any:
        """Record the request's end when ``response`` has been sent: a streamed body when its generator finishes
        (wrapped here), anything else now. A dict is answered 200 by truss."""
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._watched(response.body_iterator, response.status_code)
        elif isinstance(response, Response):
            self.finish(response.status_code)
        else:
            self.finish(200)
        return response

    async def _watched(self, body: AsyncIterator[Any], status: int) -> AsyncIterator[Any]:
        code = 499  # cancelled, or closed before its end: the client went away
        try:
            async for chunk in body:
                yield chunk
            code = status
        except Exception:
            code = 500  # the stream was aborted after it started (its protocol's way of saying it failed)
            raise
        finally:
            self.finish(code)

    def finish(self, status: int) -> None:
        if self.finished:
            return
        self.finished = True
        now = time.perf_counter()
        if self.client_left:
            status = 499
        elif self.failed is not None and status < 400:
            status = self.failed
        duration = now - self.arrival
        route, trace = self.route, self.trace
        REQUESTS.labels(route, str(status)).inc()
        DURATION.labels(route).observe(duration)
        ttft = None if trace.first_token_at is None else max(0.0, trace.first_token_at - self.arrival)
        generated = trace.completion_tokens
        if self.prompt_tokens:
            PROMPT_TOKENS.labels(route).inc(self.prompt_tokens)
            REQUEST_PROMPT_TOKENS.labels(route).observe(self.prompt_tokens)
        if trace.job_ids:
            GENERATION_TOKENS.labels(route).inc(generated)
            REQUEST_GENERATION_TOKENS.labels(route).observe(generated)
        if ttft is not None:
            TTFT.labels(route).observe(ttft)
            if generated > 1:
                TPOT.labels(route).observe(max(0.0, duration - ttft) / (generated - 1))
        fields: dict[str, Any] = {
            "id": self.id,
            "route": route,
            "path": ",".join(trace.paths) or "-",
            "status": status,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": generated,
            "ttft": "-" if ttft is None else f"{ttft:.4f}",
            "duration": f"{duration:.4f}",
            "finish_reason": ",".join(trace.finish_reasons) or "-",
        }
        line = " ".join(f"{key}={value}" for key, value in fields.items())
        if self.text is not None:
            line += " " + " ".join(f"{key}={json.dumps(value)}" for key, value in self.text.items())
        logger.info("request %s", line)
