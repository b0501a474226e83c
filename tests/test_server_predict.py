"""End to end over HTTP against the real Truss server: the seed contract, bad input, concurrency."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starcoder_serving.engine.engine import Engine
from starcoder_serving.engine.sampling_params import SamplingParams

from tests.conftest import SECRET_SENTINEL, RunningServer
from tests.strategies import json_values, predict_fields


def post(server: RunningServer, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else None
    return httpx.post(server.predict_url, json=None if content else body, content=content, timeout=120, **kwargs)


def expected_completion(engine: Engine, prompt: str, **parameters: Any) -> str:
    plan = engine.plan(engine.tokenize(prompt), SamplingParams.model_validate(parameters))[0]
    return asyncio.run(engine.complete(plan)).text


def test_seed_request_and_response(server: RunningServer, engine: Engine) -> None:
    response = post(server, {"prompt": "def compute_fib(n):"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"status", "data", "message"}
    assert body["status"] == "success" and body["message"] is None
    data = body["data"]
    assert data["prompt"] == "def compute_fib(n):"
    assert data["completion"] == expected_completion(engine, "def compute_fib(n):")
    assert not data["completion"].startswith("def compute_fib")  # only the generated text
    assert data["finish_reason"] in {"eos", "length"}
    assert data["prompt_tokens"] == len(engine.tokenize("def compute_fib(n):"))
    assert 0 < data["completion_tokens"] <= engine.settings.default_max_new_tokens


def test_generation_parameters_reach_the_model(server: RunningServer, engine: Engine) -> None:
    body = {"prompt": "import os\n", "max_new_tokens": 9, "min_new_tokens": 9, "num_beams": 2}
    data = post(server, body).json()["data"]
    assert data["completion_tokens"] == 9 and data["finish_reason"] == "length"
    assert data["completion"] == expected_completion(
        engine, "import os\n", **{k: v for k, v in body.items() if k != "prompt"}
    )


BAD_REQUESTS: list[tuple[str, Any, str]] = [
    ("invalid JSON", "{not json", "not valid JSON"),
    ("array body", "[1, 2]", "must be a JSON object"),
    ("string body", '"def f():"', "must be a JSON object"),
    ("missing prompt", {"max_new_tokens": 5}, "exactly one input form"),
    ("empty prompt", {"prompt": ""}, "`prompt`"),
    ("non-string prompt", {"prompt": 12}, "`prompt`: Input should be a valid string"),
    ("unknown parameter", {"prompt": "x", "temprature": 0.5}, "Unknown parameter `temprature`"),
    ("wrong type", {"prompt": "x", "max_new_tokens": "ten"}, "`max_new_tokens`: Input should be a valid integer"),
    ("out of range", {"prompt": "x", "top_p": 7}, "`top_p`"),
    ("python object", {"prompt": "x", "streamer": {}}, "`streamer` is not accepted"),
    ("python callable", {"prompt": "x", "stopping_criteria": []}, "`stopping_criteria` is not accepted"),
    ("logits processor", {"prompt": "x", "logits_processor": "import os"}, "`logits_processor` is not accepted"),
    ("over the cap", {"prompt": "x", "max_new_tokens": 100000}, "cap of 2048"),
    ("context window", {"prompt": "x = 1\n" * 3000}, "8192-token context window"),
    (
        "prompt plus tokens",
        {"prompt": "x = 1\n" * 1700, "max_new_tokens": 2048},
        "context window. Send max_new_tokens <=",
    ),
    ("invalid combination", {"prompt": "x", "temperature": 0.3}, "do_sample"),
    ("two input forms", {"prompt": "x", "messages": [{"role": "user", "content": "hi"}]}, "exactly one input form"),
    ("stream with bad param", {"prompt": "x", "stream": True, "max_new_tokens": -1}, "`max_new_tokens`"),
    ("too many stops", {"prompt": "x", "stop": [str(i) for i in range(40)]}, "at most 32"),
    ("n without sampling", {"prompt": "x", "num_return_sequences": 2}, "needs sampling"),
    ("body too large", {"prompt": "x" * (1024 * 1024 + 1)}, "the limit is 1048576"),
]


@pytest.mark.parametrize(("case", "body", "expected"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_a_4xx_envelope_naming_the_problem(
    server: RunningServer, case: str, body: Any, expected: str
) -> None:
    response = post(server, body)
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert payload["status"] == "failed" and payload["data"] is None
    assert expected in payload["message"], payload["message"]


def test_server_keeps_serving_after_bad_input(server: RunningServer) -> None:
    for _, body, _ in BAD_REQUESTS:
        post(server, body)
    response = post(server, {"prompt": "hello", "max_new_tokens": 3})
    assert response.status_code == 200 and response.json()["status"] == "success"


def test_concurrent_requests_each_get_their_own_answer(server: RunningServer) -> None:
    prompts = [f"def task_{i}(x):" for i in range(14)]
    alone = [post(server, {"prompt": p, "max_new_tokens": 16}).json()["data"] for p in prompts]

    async def all_at_once() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=120) as client:
            responses = await asyncio.gather(
                *(client.post(server.predict_url, json={"prompt": p, "max_new_tokens": 16}) for p in prompts)
            )
        return [r.json()["data"] for r in responses]

    together = asyncio.run(all_at_once())
    assert [d["prompt"] for d in together] == prompts
    assert together == alone
    assert len({d["completion"] for d in together}) > 1  # different prompts, different answers


def test_the_secret_never_leaks(server: RunningServer) -> None:
    responses = [post(server, body) for body in ({"prompt": "x", "max_new_tokens": 2}, {"prompt": 1}, "{")]
    assert all(SECRET_SENTINEL not in r.text for r in responses)
    assert SECRET_SENTINEL not in server.log()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# Lengths stay at 2 tokens (set below): the fuzzer probes validation, not the model's speed.
@given(body=st.dictionaries(predict_fields.filter(lambda name: name != "max_new_tokens"), json_values, max_size=4))
def test_fuzzed_requests_never_cause_a_server_error(server: RunningServer, body: dict[str, Any]) -> None:
    # Non-finite floats are not JSON; send them the way a sloppy client would (as Python's json does).
    response = post(server, json.dumps({"max_new_tokens": 2, **body}))
    assert response.status_code < 500, response.text
    if response.headers["content-type"].startswith("application/json"):
        assert response.json()["status"] in {"success", "failed"}
