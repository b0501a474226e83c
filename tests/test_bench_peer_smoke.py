"""The peer comparison's own code (bench/compare.py, compare_report.py, peer.py), without the peer.

Nothing here installs or starts ``transformers serve``: the OpenAI client runs against canned responses,
and the report is built from made-up levels.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import httpx
from transformers import AutoTokenizer

from bench.compare import FIM, completions_body, keystroke_prompts, one_completion
from bench.compare_report import CompareReport, Measurement, Spread, markdown, summarise, write
from bench.loadgen import LevelResult, Percentiles, WarmupCheck
from bench.peer import BENCH_PORTS, claim_port, peer_command, peer_requirements


def _sse(*events: dict) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def _handler(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    if not body.get("stream"):
        payload = {"choices": [{"text": "abc", "finish_reason": "length", "index": 0}], "usage": usage}
        return httpx.Response(200, json=payload)
    # The peer's shape: a usage chunk last, whose choice has empty text (ours: empty choices).
    chunks = [{"choices": [{"text": t, "index": 0}]} for t in "abc"]
    chunks.append({"choices": [{"text": "", "index": 0, "finish_reason": "length"}], "usage": usage})
    return httpx.Response(200, content=_sse(*chunks), headers={"content-type": "text/event-stream"})


def test_one_completion_reads_text_tokens_and_ttft() -> None:
    async def both() -> tuple:
        async with httpx.AsyncClient(transport=httpx.MockTransport(_handler)) as client:
            url = "http://peer/v1/completions"
            plain = await one_completion(client, url, completions_body("/m", "p", 3, stream=False))
            streamed = await one_completion(client, url, completions_body("/m", "p", 3, stream=True))
            return plain, streamed

    plain, streamed = asyncio.run(both())
    assert plain.ok and plain.text == "abc" and plain.completion_tokens == 3 and plain.ttft_s is None
    assert streamed.ok and streamed.text == "abc" and streamed.completion_tokens == 3
    assert streamed.chunks == 3 and len(streamed.chunk_gaps_s) == 2
    assert streamed.ttft_s is not None and streamed.ttft_s <= streamed.latency_s
    body = completions_body("/m", "p", 3, stream=True)
    assert body["temperature"] == 0 and body["stream_options"] == {"include_usage": True}


def _level(tokens_per_s: float, ttft: float | None = None, failures: int = 0) -> LevelResult:
    none = Percentiles(p50=None, p95=None)
    return LevelResult(
        concurrency=1,
        requests=4,
        failures=failures,
        wall_s=1.0,
        output_tokens=int(tokens_per_s),
        output_tokens_per_s=tokens_per_s,
        requests_per_s=4.0,
        latency_s=Percentiles(p50=0.1, p95=0.2),
        ttft_s=Percentiles(p50=ttft, p95=ttft),
        inter_chunk_s=none,
        time_per_output_token_s=none,
        errors=["HTTP 500: boom"] if failures else [],
    )


def test_report_ratios_spread_and_tables(tmp_path: Path) -> None:
    measurements: list[Measurement] = []
    for round_, (ours, peer, seed) in enumerate([(200.0, 100.0, 400.0), (300.0, 100.0, 300.0), (100.0, 100.0, 100.0)]):
        for server, tps in (("ours", ours), ("peer", peer), ("seed", seed)):
            level = _level(tps, ttft=0.01 * (round_ + 1))
            measurements.append(
                Measurement(round=round_, test="openai", server=server, streamed=True, concurrency=1, level=level)
            )
        for server in ("ours", "seed"):
            level = _level(50.0, failures=1 if server == "seed" and round_ == 0 else 0)
            measurements.append(
                Measurement(round=round_, test="predict", server=server, streamed=True, concurrency=1, level=level)
            )
        for server, latency in (("ours", 0.1), ("ours-noshare", 0.3), ("peer", 0.1), ("seed", 0.2)):
            measurements.append(
                Measurement(
                    round=round_,
                    test="keystroke",
                    server=server,
                    streamed=False,
                    concurrency=1,
                    level=_level(10.0),
                    latencies_s=[latency, latency * 2],
                    ended_early=1,
                    token_counts=[16, 16, 9 if server == "peer" and round_ == 2 else 10],
                )
            )
    check = WarmupCheck(prompt_tokens=5, completion_tokens=3, finish_reason="length", latency_s=0.1, completion="abc")
    report = CompareReport(
        label="smoke",
        created_at="now",
        machine={},
        wall_s=1.0,
        settings={"rounds": 3, "keystroke_prompt_tokens": 100, "keystroke_new_tokens": 16},
        servers={"ours": "x"},
        warmups={"ours openai": check},
        measurements=measurements,
    )
    report = summarise(report, ttft_clients=1)
    by = {(r.test, r.baseline): r for r in report.ratios}
    assert set(by) == {("openai", "peer"), ("openai", "seed"), ("predict", "seed")}
    assert by["openai", "peer"].ratio.per_round == [2.0, 3.0, 1.0]
    assert (by["openai", "peer"].ratio.median, by["openai", "peer"].ratio.low, by["openai", "peer"].ratio.high) == (
        2.0,
        1.0,
        3.0,
    )
    assert by["openai", "seed"].ratio.median == 1.0 and by["predict", "seed"].ratio.median == 1.0
    assert [f.server for f in report.ttft] == ["ours", "peer", "seed"]
    assert report.ttft[0].p50_s.median == 0.02
    keystroke = {f.server: f for f in report.keystroke}
    assert list(keystroke) == ["ours", "ours-noshare", "peer", "seed"]
    assert keystroke["ours-noshare"].pooled.p50 is not None and keystroke["ours-noshare"].pooled.p50 > 0.3
    assert keystroke["peer"].ended_early == 3
    assert any(note.startswith("seed predict: 1 of 12 failed") for note in report.notes)
    assert [note[:62] for note in report.notes if "token counts differ" in note] == [
        "round 2: the servers' keystroke token counts differ: {'ours': "
    ]
    table = markdown(report)
    assert "| /v1/completions | 1 | yes | 200 | 100 | 300 | 2.00× (1.00–3.00) | 1.00× (0.50–1.00) |" in table
    assert "| predict | 1 | yes | 50 | – | 50 | – | 1.00× (1.00–1.00) |" in table
    json_path, md_path = write(report, tmp_path)
    assert CompareReport.model_validate_json(json_path.read_text()).ratios == report.ratios
    assert md_path.read_text().strip() == table
    assert Spread.of([None, None]).median is None


def test_keystroke_prompts_grow_by_three_characters(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = keystroke_prompts(tokenizer, 300, 4)
    assert len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"]) == 300
    for before, after in itertools.pairwise(prompts):
        assert len(after) == len(before) + 3
        head, suffix = after.split(FIM[1])
        assert head.startswith(before.split(FIM[1])[0]) and before.endswith(suffix)
    assert all(p.startswith(FIM[0]) and p.endswith(FIM[2]) for p in prompts)


def test_peer_pins_command_and_ports() -> None:
    pins = peer_requirements()
    assert any(p.startswith("transformers[serving]==") for p in pins) and any(p.startswith("torch==") for p in pins)
    command = peer_command(Path("/venv/bin"), Path("/model"), 18099)
    assert command[:4] == ["/venv/bin/transformers", "serve", "/model", "--continuous-batching"]
    taken: set[int] = set()
    first = claim_port(taken)
    assert first in BENCH_PORTS and claim_port(taken) not in (first,)
