"""A full server answers 503 with a clear message at once, instead of stalling, and recovers."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import STARCODER2_SERVER_CAPACITY, RunningServer


def test_requests_past_capacity_get_503_and_the_server_recovers(starcoder2_server: RunningServer) -> None:
    # The session's StarCoder2 server admits 2 requests; which model serves them does not matter here.
    server = starcoder2_server
    assert STARCODER2_SERVER_CAPACITY == 2
    # Long generations (min_new_tokens keeps them going) that hold both places.
    long = {"prompt": "import os\n", "max_new_tokens": 2000, "min_new_tokens": 2000}
    short = {"prompt": "x", "max_new_tokens": 2}

    async def hold_both_places(client: httpx.AsyncClient) -> list[asyncio.Task[httpx.Response]]:
        """Two long requests, admitted: sure once a short request is refused, as only they and the short
        requests (one at a time, each served and gone before the next) ask. A short request admitted while the
        holders arrive can crowd one of them out (it is answered 503): then start again, giving them longer."""
        for attempt in range(10):
            holders = [asyncio.create_task(client.post(server.predict_url, json=long)) for _ in range(2)]
            await asyncio.sleep(0.05 * 2**attempt)  # only a head start: the refused request below is the proof
            while not any(task.done() for task in holders):
                if (await client.post(server.predict_url, json=short)).status_code == 503:
                    return holders
            for task in holders:
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
        raise AssertionError("two long requests never held both places")

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            holders = await hold_both_places(client)
            extra = await asyncio.gather(
                *(client.post(server.predict_url, json=short) for _ in range(2)),
                client.post(server.predict_url, json={**short, "stream": True}),
                client.post(
                    f"{server.base_url}/v1/completions",
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
        response = httpx.post(server.predict_url, json={"prompt": "hello", "max_new_tokens": 3}, timeout=60)
        if response.status_code == 200:
            break
        time.sleep(0.2)
    assert response.status_code == 200 and response.json()["data"]["completion_tokens"] == 3
    # Freed by cancelling, not by finishing: the running one stopped early, the queued one never ran.
    assert "finish_reason=cancelled" in server.log() and "completion_tokens=2000" not in server.log()
