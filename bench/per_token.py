"""Per-token cost of the engine, in process (no HTTP): ours against plain ``generate()`` and the bare manager.

    python -m bench.per_token                      # tiny model on this CPU, 1 client, 32-token answers
    python -m bench.per_token --clients 16 --long  # also 16 clients, and a cold 6,000-token prompt

Four ways to produce the same greedy tokens, each timed as the median of ``--repeats`` requests:

* ``generate()``: the seed's call, one request at a time (the floor a lone user must get);
* ``bare manager``: transformers' ``ContinuousBatchingManager`` with its own defaults, no logits processor,
  results collected with ``get_result`` (what ``transformers serve`` runs, minus its HTTP server);
* ``ours, not streamed`` / ``ours, streamed``: ``Engine.complete`` / ``Engine.stream`` as the routes call them.

Then one client's batch steps are broken down by wrapping the batch loop's functions with timers
(microseconds per step, summed over the step's calls; the wrappers add ~1 µs per call). Run it on a quiet
machine: two cores shared with anything else move these figures by tens of percent.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30, help="requests per measurement (median)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1], help="concurrent requests (ours only)")
    parser.add_argument("--long", action="store_true", help="also a cold 6,000-token prompt (prefix sharing off)")
    parser.add_argument("--max-batch-tokens", type=int, default=1024, help="prefill chunk (the local server's)")
    return parser.parse_args(argv)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


def timed_async(fn: Callable[[], Any], repeats: int) -> float:
    """``timed`` for a coroutine function, every call on one event loop (as in the server)."""

    async def run() -> float:
        await fn()
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            await fn()
            samples.append(time.perf_counter() - started)
        return median_ms(samples)

    return asyncio.run(run())


class StepTimers:
    """Wall time spent in chosen functions of the batch loop, per call site, while installed."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()

    @contextmanager
    def installed(self, targets: list[tuple[Any, str]]) -> Iterator[None]:
        originals = [(owner, name, getattr(owner, name)) for owner, name in targets]
        for owner, name, original in originals:
            setattr(owner, name, self._wrap(f"{owner.__name__}.{name}", original))
        try:
            yield
        finally:
            for owner, name, original in originals:
                setattr(owner, name, original)

    def _wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.calls[label] += 1

        return wrapper


def full_length_prompt(model: Any, tokens: int, new_tokens: int, eos: set[int]) -> list[int]:
    """The first of a few token-id prompts whose greedy answer does not end before ``new_tokens``."""
    import torch

    for offset in range(64):
        prompt = [5 + (i * 7919 + offset * 131) % 680 for i in range(tokens)]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
        answer = out[0, tokens:].tolist()
        if len(answer) == new_tokens and not eos & set(answer):
            return prompt
    raise SystemExit(f"no prompt of {tokens} tokens runs {new_tokens} greedy tokens on this model")


def step_targets() -> list[tuple[Any, str]]:
    from starcoder_serving.engine import batch_sampler, batch_worker
    from transformers.generation.continuous_batching import continuous_api, input_outputs

    return [
        (continuous_api.ContinuousBatchProcessor, "_generation_step"),
        (continuous_api.ContinuousBatchProcessor, "prepare_next_batch"),
        (continuous_api.ContinuousBatchProcessor, "update_batch"),
        (input_outputs.ContinuousBatchingIOs, "prepare_batch_tensors"),
        (batch_sampler.BatchSampler, "prepare_tensor_args"),
        (batch_sampler.BatchSampler, "__call__"),
        (batch_worker._JobRouter, "deliver_batch"),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from starcoder_serving.engine.engine import Engine
    from starcoder_serving.engine.sampling_params import SamplingParams
    from starcoder_serving.settings import ServingSettings
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from devtools.tiny_model import build_tiny_model
    from devtools.truss_local import DEFAULT_TINY_MODEL_DIR

    checkpoint = build_tiny_model(DEFAULT_TINY_MODEL_DIR)

    def load(**overrides: Any) -> Engine:
        settings = ServingSettings.model_validate(
            {"checkpoint": str(checkpoint), "dtype": "float32", "device": "cpu"}
            | {"max_batch_tokens": args.max_batch_tokens}
            | overrides
        )
        return Engine.load(settings, REPO_ROOT / "data")

    engine = load()
    model, n = engine.model, args.new_tokens
    # Plain greedy (max_new_tokens only), on a prompt whose greedy answer runs all n tokens on every path.
    prompt = full_length_prompt(model, args.prompt_tokens, n, set(engine.eos_token_ids))
    sampling = SamplingParams(max_new_tokens=n)
    print(f"threads: {torch.get_num_threads()}  prompt: {len(prompt)} tokens  new: {n}", flush=True)

    ids = torch.tensor([prompt])
    with torch.no_grad():
        generate_ms = timed(lambda: model.generate(ids, max_new_tokens=n, do_sample=False), args.repeats)

    async def complete_one() -> int:
        return (await engine.complete(engine.plan(prompt, sampling)[0])).completion_tokens

    async def stream_one() -> int:
        async for _ in engine.stream(engine.plan(prompt, sampling)[0]):
            pass
        return n

    quiet_ms = timed_async(complete_one, args.repeats)
    streamed_ms = timed_async(stream_one, args.repeats)
    rows = [("generate()", generate_ms), ("ours, not streamed", quiet_ms), ("ours, streamed", streamed_ms)]

    for clients in args.clients:
        if clients == 1:
            continue

        async def many(c: int = clients) -> None:
            await asyncio.gather(*[complete_one() for _ in range(c)])

        rows.append((f"ours, {clients} requests at once (all of them)", timed_async(many, 5)))

    timers = StepTimers()
    with timers.installed(step_targets()):
        started = time.perf_counter()
        timed_async(stream_one, args.repeats)
        streamed_wall = time.perf_counter() - started
    steps = timers.calls["ContinuousBatchProcessor._generation_step"]

    long_rows: list[tuple[str, float]] = []
    if args.long:
        cold = [5 + (i * 7919) % 680 for i in range(6000)]
        cold_ids = torch.tensor([cold])
        with torch.no_grad():
            long_rows.append(
                (
                    "generate(), cold 6,000-token prompt",
                    timed(lambda: model.generate(cold_ids, max_new_tokens=16, do_sample=False), 5),
                )
            )
    engine.shutdown()
    if args.long:
        cold_engine = load(prefix_sharing=False)

        async def cold_one() -> None:
            await cold_engine.complete(cold_engine.plan(cold, SamplingParams(max_new_tokens=16))[0])

        long_rows.append(("ours, cold 6,000-token prompt", timed_async(cold_one, 5)))
        cold_engine.shutdown()

    model.destroy_cached_continuous_batching_manager()
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, max_new_tokens=n),
        continuous_batching_config=ContinuousBatchingConfig(
            num_blocks=256, page_size=256, max_batch_tokens=args.max_batch_tokens, auto_switch_to_flash=False
        ),
    )
    manager.start()

    def bare_one() -> None:
        request_id = manager.add_request(input_ids=prompt, max_new_tokens=n, streaming=False)
        manager.get_result(request_id=request_id, timeout=60)

    rows.insert(1, ("bare manager", timed(bare_one, args.repeats)))
    manager.stop(block=True)

    print(f"\n{'one request of ' + str(n) + ' tokens':<48} {'ms':>8} {'µs/token':>9}")
    for name, ms in rows + long_rows:
        print(f"{name:<48} {ms:8.2f} {ms * 1e3 / n:9.0f}")
    print(f"\none client, streamed: {streamed_wall / steps * 1e6:.0f} µs of wall time per step ({steps} steps)")
    for label, seconds in timers.seconds.most_common():
        print(f"  {label:<52} {seconds / steps * 1e6:8.1f} µs/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
