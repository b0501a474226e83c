"""A full server answers 503 with a clear message at once, instead of stalling, and recovers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import RunningServer, launch_server

CAPACITY = 2


@pytest.fixture(scope="module")
def small_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("small-server")
    with launch_server(tiny_model_dir, workdir, {"STARCODER_MAX_QUEUED_REQUESTS": str(CAPACITY)}) as running:
        yield running


def test_requests_past_capacity_get_503_and_the_server_recovers(small_server: RunningServer) -> None:
    # Long generations (min_new_tokens keeps them going) that hold both places.
    long = {"prompt": "import os\n", "max_new_tokens": 2000, "min_new_tokens": 2000}

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            holders = [asyncio.create_task(client.post(small_server.predict_url, json=long)) for _ in range(CAPACITY)]
            await asyncio.sleep(1.0)  # both admitted and generating
            extra = await asyncio.gather(
                *(client.post(small_server.predict_url, json={"prompt": "x", "max_new_tokens": 2}) for _ in range(2)),
                client.post(small_server.predict_url, json={"prompt": "x", "max_new_tokens": 2, "stream": True}),
                client.post(
                    f"{small_server.base_url}/v1/completions",
                    json={"model": "m", "prompt": "x", "max_tokens": 2, "stream": True},
                ),
            )
            for task in holders:  # hang up: their generations are cancelled, freeing the places
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return list(extra)

    refused = asyncio.run(scenario())
    # Streams too are refused with a status code, not with a 200 and an empty stream.
    assert [r.status_code for r in refused] == [503] * 4
    for response in refused[:3]:
        body = response.json()
        assert body["status"] == "failed" and "at capacity (2 requests in progress)" in body["message"]
    assert "at capacity" in refused[3].json()["error"]["message"]  # OpenAI's error object
    # Both places are freed once the cancelled generations stop; then requests are served again.
    for _ in range(100):
        response = httpx.post(small_server.predict_url, json={"prompt": "hello", "max_new_tokens": 3}, timeout=60)
        if response.status_code == 200:
            break
        time.sleep(0.2)
    assert response.status_code == 200 and response.json()["data"]["completion_tokens"] == 3
    # Freed by cancelling, not by finishing: the running one stopped early, the queued one never ran.
    assert "finish_reason=cancelled" in small_server.log() and "completion_tokens=2000" not in small_server.log()
