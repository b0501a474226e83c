"""Prometheus metrics and the per-request log line, through the real server: a known set of requests, then truss's
``/metrics/`` read with prometheus_client's own parser. Other tests share the server: counts are compared before
and after."""

from __future__ import annotations

import re
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer

Snapshot = dict[tuple[str, frozenset[tuple[str, str]]], float]
SECRET_PROMPT = "def metrics_secret_prompt_4711():"


def scrape(server: RunningServer) -> Snapshot:
    response = httpx.get(f"{server.base_url}/metrics/", timeout=30)
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        if family.name.startswith("starcoder_")
        for sample in family.samples
    }


def delta(before: Snapshot, after: Snapshot, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def big_declared_body(server: RunningServer) -> int:
    """A body over the 1 MiB limit, declared in its Content-Length: refused from the header."""
    big = b'{"prompt": "' + b"x" * (1024 * 1024) + b'"}'
    return httpx.post(
        server.predict_url, content=big, headers={"content-type": "application/json"}, timeout=30
    ).status_code


def test_requests_are_counted_and_timed(server: RunningServer) -> None:
    base = server.base_url
    before = scrape(server)
    small = {"max_new_tokens": 4, "ignore_eos": True}
    done = httpx.post(server.predict_url, json={"prompt": SECRET_PROMPT, **small}, timeout=60)
    assert done.status_code == 200
    with httpx.stream("POST", server.predict_url, json={"prompt": "def", "stream": True, **small}, timeout=60) as r:
        assert r.status_code == 200 and r.read()
    tgi = httpx.post(server.predict_url, json={"inputs": "def", "parameters": {"max_new_tokens": 4}}, timeout=60)
    assert tgi.status_code == 200
    openai_small = {"model": "m", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    completions = httpx.post(f"{base}/v1/completions", json={"prompt": "def", **openai_small}, timeout=60)
    assert completions.status_code == 200
    chat = httpx.post(
        f"{base}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], **openai_small},
        timeout=60,
    )
    assert chat.status_code == 200
    assert httpx.post(server.predict_url, json={"prompt": ""}, timeout=60).status_code == 400
    assert big_declared_body(server) == 413
    # A stream its client abandons after the first chunk: 499.
    endless = {"prompt": "import os\n", "max_new_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.predict_url, json=endless, timeout=60) as r:
        next(r.iter_bytes())
    deadline = time.monotonic() + 10
    while True:
        after = scrape(server)
        if delta(before, after, "starcoder_requests_total", route="predict", code="499") or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def requests(route: str, code: str) -> float:
        return delta(before, after, "starcoder_requests_total", route=route, code=code)

    assert [requests("predict", code) for code in ("200", "400", "413", "499", "503", "500")] == [2, 1, 1, 1, 0, 0]
    assert [requests(route, "200") for route in ("tgi", "completions", "chat")] == [1, 1, 1]
    for route, sent, generated in (("predict", 5, 3), ("tgi", 1, 1), ("completions", 1, 1), ("chat", 1, 1)):
        assert delta(before, after, "starcoder_request_duration_seconds_count", route=route) == sent, route
        # Every request that generated had a first token; the 400 and the 413 had none.
        assert delta(before, after, "starcoder_time_to_first_token_seconds_count", route=route) == generated, route
        assert delta(before, after, "starcoder_request_generation_tokens_count", route=route) == generated, route
    # Tokens: what the answers said.
    predict_data = done.json()["data"]
    usage = completions.json()["usage"]
    assert delta(before, after, "starcoder_generation_tokens_total", route="completions") == usage["completion_tokens"]
    assert delta(before, after, "starcoder_prompt_tokens_total", route="completions") == usage["prompt_tokens"]
    assert delta(before, after, "starcoder_request_prompt_tokens_sum", route="predict") >= predict_data["prompt_tokens"]
    # Time per output token: the requests with more than one token (4 each, and the abandoned one's few).
    assert delta(before, after, "starcoder_time_per_output_token_seconds_count", route="completions") == 1
    assert delta(before, after, "starcoder_requests_by_path_total", path="batched") == 6
    # The TTFT buckets span code completion's range (5 ms to 30 s).
    buckets = {dict(labels)["le"] for name, labels in after if name == "starcoder_time_to_first_token_seconds_bucket"}
    assert {"0.005", "30.0", "+Inf"} <= buckets
    # Gauges: present and sane.
    for gauge in ("starcoder_requests_running", "starcoder_requests_waiting", "starcoder_batch_size"):
        assert after[(gauge, frozenset())] >= 0, gauge
    assert 0.0 <= after[("starcoder_kv_cache_usage_ratio", frozenset())] <= 1.0
    assert ("starcoder_prefix_cache_hit_tokens_total", frozenset()) in after
    # Labels carry no ids or text.
    assert all(set(dict(labels)) <= {"route", "code", "path", "le"} for _, labels in after)

    # One structured line per request, never its text.
    log = server.log()
    assert SECRET_PROMPT not in log
    lines = re.findall(
        r"request id=\d+ route=(\w+) path=(\S+) status=(\d+) prompt_tokens=(\d+) completion_tokens=(\d+) "
        r"ttft=(\S+) duration=(\S+) finish_reason=([\w,-]+)",
        log,
    )
    assert ("tgi", "batched", "200") in {line[:3] for line in lines}
    assert ("predict", "-", "413") in {line[:3] for line in lines}
    assert any(line[0] == "predict" and line[2] == "499" and line[7] == "cancelled" for line in lines)
