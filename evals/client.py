"""Ask an endpoint for one HumanEval completion, through predict or OpenAI's `/v1/completions`."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import httpx
import pydantic

from evals.scoring import STOP_SEQUENCES

Route = Literal["predict", "completions"]

# (local server, Baseten deployment) paths of each route.
PATHS: dict[Route, tuple[str, str]] = {
    "predict": ("/v1/models/model:predict", "/predict"),
    "completions": ("/v1/completions", "/sync/v1/completions"),
}
RETRIES = 4


class Endpoint(pydantic.BaseModel):
    base_url: str
    # True for a Baseten deployment URL (…/environments/production): its paths differ from a local server's.
    remote: bool
    route: Route
    # Never written to results or printed.
    api_key: str | None = pydantic.Field(None, exclude=True, repr=False)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + PATHS[self.route][1 if self.remote else 0]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Api-Key {self.api_key}"} if self.api_key else {}


class NoServer(RuntimeError):
    """Nothing usable answers at the endpoint: raised before any problem is sent."""


def check_ready(endpoint: Endpoint, timeout_s: float = 5.0) -> None:
    """Fail fast, before a run: a local server must answer its readiness route (``GET /v1/models/model`` = 200);
    a deployment must answer at all (any HTTP status: its routes and keys are checked by the requests)."""
    url = endpoint.base_url.rstrip("/") + ("" if endpoint.remote else "/v1/models/model")
    try:
        response = httpx.get(url, headers=endpoint.headers, timeout=timeout_s)
    except httpx.TransportError as exc:
        hint = "check the URL and your network" if endpoint.remote else "start it with `make serve` in another shell"
        raise NoServer(f"no server answers at {url} ({type(exc).__name__}: {exc or 'no answer'}); {hint}") from exc
    if not endpoint.remote and response.status_code != 200:
        raise NoServer(
            f"the server at {url} is not ready (HTTP {response.status_code}): wait until `make serve` says it is "
            "ready (GET /v1/models/model answers 200), or start it with `make serve`"
        )


class SamplingSpec(pydantic.BaseModel):
    temperature: float = pydantic.Field(0.2, ge=0.0)  # 0: greedy
    top_p: float = pydantic.Field(0.95, gt=0.0, le=1.0)
    max_new_tokens: int = pydantic.Field(512, ge=1)


class Answer(pydantic.BaseModel):
    completion: str = ""
    finish_reason: str | None = None
    model: str | None = None  # the served checkpoint, when the route names it
    error: str | None = None


def request_body(route: Route, prompt: str, sampling: SamplingSpec, seed: int) -> dict[str, Any]:
    greedy = sampling.temperature == 0
    if route == "predict":
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_new_tokens": sampling.max_new_tokens,
            "stop": list(STOP_SEQUENCES),
        }
        if not greedy:
            body |= {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": seed}
        return body
    # OpenAI allows at most 4 stop sequences: the fifth is applied by the client-side truncation.
    body = {
        "model": "starcoder",
        "prompt": prompt,
        "max_tokens": sampling.max_new_tokens,
        "stop": list(STOP_SEQUENCES[:4]),
    }
    body |= (
        {"temperature": 0} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": seed}
    )
    return body


def parse_answer(route: Route, payload: Any) -> Answer:
    if route == "predict":
        data = payload.get("data") or {}
        return Answer(completion=data.get("completion", ""), finish_reason=data.get("finish_reason"))
    choice = payload["choices"][0]
    return Answer(completion=choice["text"], finish_reason=choice.get("finish_reason"), model=payload.get("model"))


async def complete(
    client: httpx.AsyncClient, endpoint: Endpoint, prompt: str, sampling: SamplingSpec, seed: int
) -> Answer:
    """One completion; 503s (capacity) and dropped connections are retried with backoff, other errors not."""
    body = request_body(endpoint.route, prompt, sampling, seed)
    error = "no attempt"
    for attempt in range(RETRIES):
        try:
            response = await client.post(endpoint.url, json=body, headers=endpoint.headers)
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            if response.status_code == 200:
                return parse_answer(endpoint.route, response.json())
            error = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code != 503:
                break
        await asyncio.sleep(2**attempt)
    return Answer(error=error)
