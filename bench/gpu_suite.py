"""Every GPU measurement of issue 12 in one process, budgeted to fit one call of the device machine.

    bash bench/gpu_device.sh                                   # on the GPU machine (see docs/benchmarks.md)
    python -m bench.gpu_suite --shape tiny --device cpu --budget-s 90 --out-dir /tmp/suite   # check it on a CPU

One StarCoder-15.5B-shaped model with random bf16 weights (bench/gpu.py) serves every phase; each phase
builds its own ``Engine`` on it, as the server would, and closes it. The baseline engine takes
``config.yaml``'s ``model_metadata`` (what a deployment runs); the variants change one setting each.
After every phase the whole report is written again, so a run stopped at its time limit keeps what it
measured; a phase that does not fit the time left is skipped and says so, and a phase that fails records
its error and the run goes on.

Phases, in order (the cheap and essential first, torch.compile last):

1. ``bandwidth``: device-to-device copy bandwidth; the single-stream roofline = bandwidth / weight bytes.
2. ``decode_generate``: plain ``model.generate()``, one stream, decode tokens/s against the roofline.
3. ``reference``: greedy completions of a few prompts, one at a time through ``generate()`` (the engine with
   continuous batching off): what every batched configuration must reproduce.
4. ``baseline``: config.yaml's engine. Greedy equality with the reference (the prompts all at once),
   throughput and latency at each concurrency level against the batched roofline
   (batch x bandwidth / (weight bytes + the KV bytes the batch reads per step)), TTFT of a 1,500-token
   FIM prompt cold and with its prefix cached, and a profile of one-client decoding: GPU kernel time
   against wall time (torch.profiler; the rest is launch gaps and host work) and each thread's sampled
   Python stacks (bench/stack_sampler.py: where the batch loop's host time goes).
5. ``seed``: the one-at-a-time approach (every request through ``generate()``) at a few levels.
5b. ``speculation``: the cost of checking drafts at this shape: tokens/s of the batch at 1, 8 and 64 clients
   with oracle drafts of 8 tokens (``drafting.OracleDrafter``) that are all wrong, half right and all right,
   with a fixed ``k`` (the raw curve: random weights give no real acceptance rate) and with the policy at 0%
   (what a deployment pays when drafts miss), against speculation off.
6. ``variant:*``: one setting changed each: CUDA graphs per path, asynchronous batching, KV page
   sizes, flash attention when installed. Each: warm-up time, greedy equality, throughput.
7. ``memory_80gb``: a ballast leaves the card with an 80 GB card's memory; config.yaml's engine then
   serves 64 clients with 8k-token prompts. Peak memory and failures say whether its
   ``kv_memory_fraction`` arithmetic holds on an A100/H100 80 GB.
8. ``variant:compile-1``: ``torch.compile`` (compile level 1), last because its warm-up is the longest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from bench import gpu
from bench.loadgen import Percentiles, build_prompt
from bench.stack_sampler import StackSampler, ThreadProfile

# The shortest stretch of decoding the profile samples (seconds).
PROFILE_MIN_S = 0.5

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_PATH = REPO_ROOT / "config.yaml"
# The A100 / H100 80 GB cards' memory, which config.yaml's sizing assumes (81,920 MiB).
CARD_80GB_BYTES = 81920 * 2**20

# One setting changed each, on top of config.yaml's model_metadata.
VARIANTS: dict[str, dict[str, Any]] = {
    "graphs-varlen": {"cuda_graphs": "varlen"},
    "graphs-decode": {"cuda_graphs": "decode"},
    "graphs-both": {"cuda_graphs": "both"},
    "graphs-auto": {"cuda_graphs": "auto"},
    "async": {"async_batching": True},
    "graphs-both-async": {"cuda_graphs": "both", "async_batching": True},
    "page-64": {"kv_page_size": 64},
    "page-128": {"kv_page_size": 128},
    "page-512": {"kv_page_size": 512},
    "flash-attention-2": {"attn_implementation": "flash_attention_2"},
}
LAST_VARIANTS: dict[str, dict[str, Any]] = {"compile-1": {"compile_level": 1}}


class PhaseOutcome(pydantic.BaseModel):
    name: str
    status: Literal["done", "skipped", "failed"]
    seconds: float
    why: str | None = None


class Equality(pydantic.BaseModel):
    """Greedy completions against the one-at-a-time reference, all prompts sent at once."""

    prompts: int
    identical: int
    # Per differing prompt: the character where the texts first differ (bf16 kernels of other batch
    # shapes can flip a near-tie; a difference at character 0 would be a bug, late ones are numerics).
    first_difference_at: list[int]
    failures: int


class Level(gpu.EngineLevel):
    # Decode tokens/s of one stream: (L - 1) / (latency - TTFT), medians (batched runs).
    per_stream_tokens_per_s: float | None = None
    batched_roofline_tokens_per_s: float
    fraction_of_batched_roofline: float


class Ttft(pydantic.BaseModel):
    prompt_tokens: int
    cold_s: Percentiles
    cached_prefix_s: Percentiles
    trials: int


class ProfileSummary(pydantic.BaseModel):
    tokens: int
    wall_s: float
    gpu_kernel_s: float
    gpu_busy_fraction: float  # kernel time / wall time; the rest: launch gaps, host-side scheduling, syncs
    top_kernels: list[tuple[str, float]]  # name, seconds
    # Each busy thread's Python stacks, sampled: the batch loop's split between the forward, transformers'
    # batch preparation and our sampler; the event loop's share of streaming.
    threads: list[ThreadProfile]


class EngineRun(pydantic.BaseModel):
    name: str
    settings: dict[str, Any]
    startup_s: float  # Engine() to ready, warm-up (graph capture, compile) included
    # Device memory the engine took (KV cache, graph pools, sampler state), and the cache's capacity.
    engine_bytes: int | None = None
    kv_cache_tokens: int | None = None
    equality: Equality | None = None
    levels: list[Level] = []
    ttft: Ttft | None = None
    profile: ProfileSummary | None = None
    routed: dict[str, int] = {}


class MemoryCheck(pydantic.BaseModel):
    card_bytes: int
    ballast_bytes: int
    free_after_weights_bytes: int
    engine_bytes: int
    kv_cache_tokens: int | None
    clients: int
    prompt_tokens: int
    failures: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    fits: bool


class SuiteReport(pydantic.BaseModel):
    label: str
    created_at: str
    command: str
    device: str
    torch: str
    transformers: str
    flash_attn: str | None
    shape: str
    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int
    copy_bandwidth_gb_s: float | None = None
    roofline_tokens_per_s: float | None = None
    prompt_tokens: int
    new_tokens: int
    phases: list[PhaseOutcome] = []
    decode_generate: gpu.DecodeResult | None = None
    reference_prompts: int = 0
    # Phase "speculation": tokens/s by drafts ("off", "fixed-k8 100%", ..., "policy 0%") and clients.
    speculation: dict[str, dict[str, float]] = {}
    runs: list[EngineRun] = []
    seed: EngineRun | None = None
    memory_80gb: MemoryCheck | None = None
    # Batched over one-at-a-time throughput, per level measured on both.
    speedup: dict[int, float] = {}
    # The largest level whose p95 latency stays within 1.25x of one client's: the autoscaling target.
    concurrency_target: int | None = None

    def run_named(self, name: str) -> EngineRun | None:
        return next((run for run in self.runs if run.name == name), None)


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


class Suite:
    def __init__(self, args: argparse.Namespace, report: SuiteReport, model: Any, tokenizer: Any) -> None:
        self.args = args
        self.report = report
        self.model = model
        self.tokenizer = tokenizer
        self.budget = Budget(args.budget_s)
        self.path = args.out_dir / f"results-{args.label}.json"
        self.cuda = args.device.startswith("cuda")
        self.prompts = [
            self.encode(build_prompt(tokenizer, args.prompt_tokens, variant=i)) for i in range(args.check_prompts)
        ]
        self.reference: list[str] = []

    # ---- bookkeeping ----

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def save(self) -> None:
        self.args.out_dir.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.report.model_dump_json(indent=2) + "\n")

    def phase(self, name: str, estimate_s: float, body: Callable[[], None]) -> None:
        started = time.perf_counter()
        if self.budget.left() < estimate_s:
            outcome = PhaseOutcome(
                name=name,
                status="skipped",
                seconds=0.0,
                why=f"needs ~{estimate_s:.0f} s, {self.budget.left():.0f} s left",
            )
        else:
            print(f"== {name} ({self.budget.left():.0f} s left)", flush=True)
            try:
                body()
                outcome = PhaseOutcome(name=name, status="done", seconds=time.perf_counter() - started)
            except Exception as error:  # noqa: BLE001 - recorded; the other phases still run
                outcome = PhaseOutcome(
                    name=name,
                    status="failed",
                    seconds=time.perf_counter() - started,
                    why=f"{type(error).__name__}: {error}",
                )
                print(f"!! {name} failed: {outcome.why}", flush=True)
            finally:
                free_device_memory()
        self.report.phases.append(outcome)
        self.save()

    def base_settings(self) -> dict[str, Any]:
        """config.yaml's model_metadata as a deployment reads it, on this device, with nothing fetched."""
        metadata = dict(yaml.safe_load(CONFIG_PATH.read_text())["model_metadata"])
        metadata.pop("local_weights_dir", None)
        metadata.pop("example_model_input", None)
        metadata.update(
            checkpoint="random-weights-starcoder-15.5b",
            device=self.args.device,
            dtype=self.args.dtype,
            max_new_tokens_cap=max(2048, self.args.new_tokens),
        )
        return metadata

    @contextlib.contextmanager
    def engine(self, overrides: dict[str, Any]) -> Iterator[tuple[Any, float, int]]:
        from starcoder_serving.engine.engine import Engine
        from starcoder_serving.settings import ServingSettings

        settings = ServingSettings.model_validate({**self.base_settings(), **overrides})
        before = device_allocated(self.cuda)
        started = time.perf_counter()
        engine = Engine(self.model, self.tokenizer, settings, gpu.DATA_DIR)
        try:
            # The first request creates the batch's cache (transformers builds it on the loop's thread).
            self.run(gpu.engine_level(engine, self.prompts[:1], 2, 1, 1))
            startup = time.perf_counter() - started
            yield engine, startup, device_allocated(self.cuda) - before
        finally:
            engine.shutdown()
            del engine
            free_device_memory()

    @staticmethod
    def run(awaitable: Any) -> Any:
        return asyncio.run(awaitable)

    # ---- measurements ----

    def complete_all(
        self, engine: Any, prompts: Sequence[list[int]], new_tokens: int, at_once: bool
    ) -> list[str | None]:
        from starcoder_serving.engine.sampling_params import SamplingParams

        async def one(prompt_ids: list[int]) -> str | None:
            plan = engine.plan(prompt_ids, SamplingParams(max_new_tokens=new_tokens))[0]
            try:
                return str((await engine.complete(plan)).text)
            except Exception as error:  # noqa: BLE001 - a failure is one of the things measured
                print(f"request failed: {type(error).__name__}: {error}", flush=True)
                return None

        async def all_of() -> list[str | None]:
            if at_once:
                return list(await asyncio.gather(*(one(p) for p in prompts)))
            return [await one(p) for p in prompts]

        return self.run(all_of())

    def equality(self, engine: Any) -> Equality:
        texts = self.complete_all(engine, self.prompts, self.args.check_tokens, at_once=True)
        differences = [
            first_difference(text, reference)
            for text, reference in zip(texts, self.reference)
            if text is not None and text != reference
        ]
        return Equality(
            prompts=len(texts),
            identical=sum(text == reference for text, reference in zip(texts, self.reference)),
            first_difference_at=differences,
            failures=sum(text is None for text in texts),
        )

    def levels(self, engine: Any, concurrencies: Sequence[int], batched: bool) -> list[Level]:
        results: list[Level] = []
        new_tokens, context = self.args.new_tokens, self.args.prompt_tokens + self.args.new_tokens / 2
        for concurrency in concurrencies:
            level = self.run(gpu.engine_level(engine, self.prompts, new_tokens, concurrency, max(1, 4 // concurrency)))
            roofline = self.batched_roofline(concurrency, context)
            per_stream = None
            if batched and level.latency_s.p50 is not None and level.ttft_s.p50 is not None:
                per_stream = (new_tokens - 1) / max(level.latency_s.p50 - level.ttft_s.p50, 1e-9)
            results.append(
                Level(
                    **level.model_dump(),
                    per_stream_tokens_per_s=per_stream,
                    batched_roofline_tokens_per_s=roofline,
                    fraction_of_batched_roofline=level.output_tokens_per_s / roofline if roofline else 0.0,
                )
            )
            print(
                f"   c={concurrency:>3}: {level.output_tokens_per_s:9.1f} tok/s ({results[-1].fraction_of_batched_roofline:.0%}"
                f" of roofline)  p95 latency {level.latency_s.p95 or 0:.2f} s  failures {level.failures}",
                flush=True,
            )
        return results

    def batched_roofline(self, batch: int, context_tokens: float) -> float:
        bandwidth = (self.report.copy_bandwidth_gb_s or 0.0) * 1e9
        kv_read = batch * context_tokens * self.report.kv_bytes_per_token
        return batch * bandwidth / (self.report.weight_bytes + kv_read)

    def ttft(self, engine: Any) -> Ttft:
        """A 1,500-token FIM prompt: each cold trial has a prefix no earlier request had; each cached trial
        repeats the prompt just served (its full KV pages are shared)."""
        from starcoder_serving.engine.sampling_params import SamplingParams

        fim_tokens = self.args.fim_tokens
        fim = engine.profile.fim
        assert fim is not None, "the StarCoder family's vocabularies have FIM tokens"

        def fim_prompt(variant: int) -> list[int]:
            prefix = build_prompt(self.tokenizer, fim_tokens * 7 // 8, variant=variant)
            suffix = build_prompt(self.tokenizer, fim_tokens // 8, variant=variant + 1)
            return self.encode(fim.render(prefix, suffix).text)

        async def first_token(prompt_ids: list[int]) -> float:
            plan = engine.plan(prompt_ids, SamplingParams(max_new_tokens=2))[0]
            started = time.perf_counter()
            first: float | None = None
            async for _delta in engine.stream(plan):
                first = first if first is not None else time.perf_counter()
            return (first or time.perf_counter()) - started

        cold: list[float] = []
        cached: list[float] = []
        for trial in range(self.args.ttft_trials):
            prompt_ids = fim_prompt(100 + trial)
            cold.append(self.run(first_token(prompt_ids)))
            cached.append(self.run(first_token(prompt_ids)))
        return Ttft(
            prompt_tokens=len(fim_prompt(100)),
            cold_s=Percentiles.of(cold),
            cached_prefix_s=Percentiles.of(cached),
            trials=len(cold),
        )

    def profile(self, engine: Any) -> ProfileSummary:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        per_request = min(64, self.args.new_tokens)
        tokens = 0
        with profile(activities=activities) as prof, StackSampler() as stacks:
            started = time.perf_counter()
            # At least PROFILE_MIN_S of decoding, however fast one request is: a request of a few tokens on a small
            # stand-in lasts a few sampling intervals, and a thread seen too few times is left out of the profile.
            while tokens == 0 or time.perf_counter() - started < PROFILE_MIN_S:
                self.run(gpu.engine_level(engine, self.prompts[:1], per_request, 1, 1))
                tokens += per_request
            gpu.synchronize(self.args.device)
            wall = time.perf_counter() - started
        events = prof.key_averages()
        kernels = sorted(
            ((e.key, e.self_device_time_total / 1e6) for e in events if e.self_device_time_total > 0),
            key=lambda item: -item[1],
        )
        kernel_s = sum(seconds for _name, seconds in kernels)
        (self.args.out_dir / f"profile-{self.args.label}.txt").write_text(
            events.table(sort_by="self_device_time_total" if self.cuda else "self_cpu_time_total", row_limit=40)
        )
        return ProfileSummary(
            tokens=tokens,
            wall_s=wall,
            gpu_kernel_s=kernel_s,
            gpu_busy_fraction=kernel_s / wall if wall else 0.0,
            top_kernels=[(name[:120], seconds) for name, seconds in kernels[:10]],
            threads=stacks.profiles(),
        )

    # ---- phases ----

    def bandwidth(self) -> None:
        bandwidth = gpu.copy_bandwidth(self.args.device, int(self.args.copy_gib * 2**30))
        self.report.copy_bandwidth_gb_s = bandwidth / 1e9
        self.report.roofline_tokens_per_s = bandwidth / self.report.weight_bytes
        print(f"   copy {bandwidth / 1e9:.0f} GB/s: roofline {self.report.roofline_tokens_per_s:.1f} tok/s", flush=True)

    def decode_generate(self) -> None:
        decode = gpu.measure_decode(
            self.model,
            self.prompts[0],
            self.args.new_tokens,
            self.args.device,
            self.args.repeats,
            self.report.roofline_tokens_per_s or 0.0,
        )
        self.report.decode_generate = decode
        print(f"   {decode.decode_tokens_per_s:.1f} tok/s = {decode.fraction_of_roofline:.0%} of roofline", flush=True)

    def reference_phase(self) -> None:
        with self.engine({"continuous_batching": False}) as (engine, _startup, _cache):
            texts = self.complete_all(engine, self.prompts, self.args.check_tokens, at_once=False)
        if any(text is None for text in texts):
            raise RuntimeError("a reference completion failed")
        self.reference = [str(text) for text in texts]
        self.report.reference_prompts = len(self.reference)

    def baseline(self) -> None:
        with self.engine({}) as (engine, startup, cache):
            run = EngineRun(
                name="baseline",
                settings=self.base_settings(),
                startup_s=startup,
                engine_bytes=cache,
                kv_cache_tokens=engine.kv_cache_tokens,
            )
            self.report.runs.append(run)
            run.equality = self.equality(engine) if self.reference else None
            self.save()
            run.levels = self.levels(engine, self.args.levels, batched=True)
            self.save()
            run.ttft = self.ttft(engine)
            print(
                f"   TTFT {run.ttft.prompt_tokens}-token FIM: cold {fmt(run.ttft.cold_s)}, cached {fmt(run.ttft.cached_prefix_s)}"
            )
            self.save()
            run.profile = self.profile(engine)
            run.routed = {path.value: count for path, count in engine.routed.items()}
        self.report.concurrency_target = concurrency_target(run.levels)

    def speculation(self) -> None:
        """Oracle drafts against speculation off (bench/speculation.py's in-process driver on this model)."""
        from starcoder_serving.engine.drafting import OracleDrafter

        from bench.speculation import generate_all, worker

        settings = self.base_settings()
        sizing = {
            "max_requests": max(self.args.speculation_levels),
            "max_batch_sequences": settings.get("max_batch_sequences", 64),
            "max_batch_tokens": settings.get("max_batch_tokens") or 2048,
            "kv_num_blocks": None if self.cuda else 256,
            "kv_page_size": settings.get("kv_page_size", 256),
            "kv_memory_fraction": settings.get("kv_memory_fraction") if self.cuda else None,
        }
        eos = int(self.tokenizer.eos_token_id)
        prompts = self.prompts[: self.args.speculation_prompts]
        tokens = self.args.check_tokens
        results = self.report.speculation

        def measure(name: str, batch: Any) -> None:
            try:
                for clients in self.args.speculation_levels:
                    rate = generate_all(batch, prompts, tokens, clients)[1]
                    results.setdefault(name, {})[str(clients)] = rate
                    print(f"   speculation {name} @{clients}: {rate:,.0f} tok/s", flush=True)
                    self.save()
            finally:
                batch.shutdown()
                free_device_memory()

        off = worker(self.model, 0, None, eos, **sizing)
        references = generate_all(off, prompts, tokens, 1)[0]
        measure("off", off)
        sequences = [[*prompt, *output] for prompt, output in zip(prompts, references)]
        for acceptance, adaptive in ((1.0, False), (0.0, False), (0.5, False), (0.0, True)):
            drafter = OracleDrafter(sequences, acceptance, self.model.config.vocab_size)
            name = f"{'policy' if adaptive else 'fixed-k8'} {acceptance:.0%}"
            measure(name, worker(self.model, 8, drafter, eos, adaptive=adaptive, **sizing))

    def seed(self) -> None:
        with self.engine({"continuous_batching": False}) as (engine, startup, _cache):
            run = EngineRun(name="seed", settings={"continuous_batching": False}, startup_s=startup)
            run.levels = self.levels(engine, self.args.seed_levels, batched=False)
            run.routed = {path.value: count for path, count in engine.routed.items()}
        self.report.seed = run
        baseline = self.report.run_named("baseline")
        if baseline is not None:
            seed_by_level = {level.concurrency: level.output_tokens_per_s for level in run.levels}
            for level in baseline.levels:
                if seed_by_level.get(level.concurrency):
                    self.report.speedup[level.concurrency] = (
                        level.output_tokens_per_s / seed_by_level[level.concurrency]
                    )

    def variant(self, name: str, overrides: dict[str, Any]) -> None:
        attention = overrides.get("attn_implementation")
        if attention == "flash_attention_2" and self.report.flash_attn is None:
            raise RuntimeError("flash_attn is not installed on this machine")
        # The setting is applied when a checkpoint is loaded (Engine.load); this model is built once, so the
        # variant switches its attention itself, and back afterwards.
        from starcoder_serving.engine.transformers_compat import attention_implementation

        original = attention_implementation(self.model)
        if attention is not None:
            self.model.set_attn_implementation(attention)
        try:
            self._variant(name, overrides)
        finally:
            if attention is not None:
                self.model.set_attn_implementation(original)

    def _variant(self, name: str, overrides: dict[str, Any]) -> None:
        with self.engine(overrides) as (engine, startup, cache):
            run = EngineRun(
                name=name,
                settings=overrides,
                startup_s=startup,
                engine_bytes=cache,
                kv_cache_tokens=engine.kv_cache_tokens,
            )
            self.report.runs.append(run)
            print(f"   ready in {startup:.1f} s", flush=True)
            run.equality = self.equality(engine) if self.reference else None
            run.levels = self.levels(engine, self.args.variant_levels, batched=True)
            run.routed = {path.value: count for path, count in engine.routed.items()}

    def memory_80gb(self) -> None:
        import torch

        if not self.cuda:
            raise RuntimeError("needs a CUDA card")
        total = torch.cuda.mem_get_info()[1]
        ballast_bytes = max(0, total - CARD_80GB_BYTES)
        ballast = torch.empty(ballast_bytes, dtype=torch.uint8, device=self.args.device)
        try:
            torch.cuda.reset_peak_memory_stats()
            free_after_weights = torch.cuda.mem_get_info()[0]
            prompt_tokens = self.args.long_prompt_tokens
            long_prompts = [self.encode(build_prompt(self.tokenizer, prompt_tokens, variant=i)) for i in range(8)]
            with self.engine({}) as (engine, _startup, cache):
                level = self.run(
                    gpu.engine_level(engine, long_prompts, self.args.check_tokens, self.args.memory_clients, 1)
                )
                kv_tokens = engine.kv_cache_tokens
            peak_reserved = torch.cuda.max_memory_reserved() - ballast_bytes
            self.report.memory_80gb = MemoryCheck(
                card_bytes=CARD_80GB_BYTES,
                ballast_bytes=ballast_bytes,
                free_after_weights_bytes=free_after_weights,
                engine_bytes=cache,
                kv_cache_tokens=kv_tokens,
                clients=self.args.memory_clients,
                prompt_tokens=prompt_tokens,
                failures=level.failures,
                peak_allocated_bytes=torch.cuda.max_memory_allocated() - ballast_bytes,
                peak_reserved_bytes=peak_reserved,
                fits=level.failures == 0 and peak_reserved <= CARD_80GB_BYTES,
            )
        finally:
            del ballast


def device_allocated(cuda: bool) -> int:
    if not cuda:
        return 0
    import torch

    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated())


def free_device_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def concurrency_target(levels: Sequence[Level], tolerance: float = 1.25) -> int | None:
    """The largest level before p95 latency climbs past ``tolerance`` x one client's: beyond it, each added
    request slows everyone's, so an autoscaler should add a replica there."""
    ordered = sorted((level for level in levels if level.latency_s.p95 is not None), key=lambda l: l.concurrency)
    if not ordered:
        return None
    floor = ordered[0].latency_s.p95 or 0.0
    target = ordered[0].concurrency
    for level in ordered:
        if (level.latency_s.p95 or 0.0) > tolerance * floor or level.failures:
            break
        target = level.concurrency
    return target


def fmt(p: Percentiles) -> str:
    return f"p50 {1000 * (p.p50 or 0):.0f} ms / p95 {1000 * (p.p95 or 0):.0f} ms"


def summary(report: SuiteReport) -> str:
    """The short table printed last (the device tool returns the end of the output)."""
    lines = [
        f"{report.device}, {report.shape}, {report.weight_bytes / 1e9:.1f} GB, copy {report.copy_bandwidth_gb_s or 0:.0f} GB/s"
    ]
    if report.decode_generate:
        d = report.decode_generate
        lines.append(
            f"generate() 1 stream: {d.decode_tokens_per_s:.1f} tok/s = {d.fraction_of_roofline:.0%} of roofline"
        )
    for run in report.runs:
        eq = run.equality
        same = f"greedy {eq.identical}/{eq.prompts}" if eq else "greedy -"
        levels = " ".join(
            f"c{l.concurrency}={l.output_tokens_per_s:.0f}({l.fraction_of_batched_roofline:.0%})" for l in run.levels
        )
        stream = next((l.per_stream_tokens_per_s for l in run.levels if l.concurrency == 1), None)
        one = f" 1-stream {stream:.1f} tok/s" if stream else ""
        lines.append(f"{run.name:>18}: start {run.startup_s:5.1f} s, {same},{one} {levels}")
        if run.ttft:
            lines.append(
                f"{'':>18}  TTFT FIM {run.ttft.prompt_tokens} tok: cold {fmt(run.ttft.cold_s)}; cached {fmt(run.ttft.cached_prefix_s)}"
            )
        if run.profile:
            p = run.profile
            lines.append(
                f"{'':>18}  profile: GPU busy {p.gpu_busy_fraction:.0%} of {p.wall_s:.2f} s for {p.tokens} tokens"
            )
            for thread in p.threads[:3]:
                busy = ", ".join(
                    f"{name.rsplit('.', 2)[-2]}.{name.rsplit('.', 1)[-1]} {share:.0%}"
                    for name, share in thread.inclusive[:6]
                )
                lines.append(f"{'':>20}{thread.thread} (busy {thread.busy:.0%}): {busy}")
    if report.seed:
        lines.append(
            "              seed: "
            + " ".join(f"c{l.concurrency}={l.output_tokens_per_s:.0f}" for l in report.seed.levels)
        )
    if report.speedup:
        lines.append("batched / seed: " + " ".join(f"c{c}={r:.1f}x" for c, r in report.speedup.items()))
    if report.memory_80gb:
        m = report.memory_80gb
        lines.append(
            f"80 GB card: {m.clients} x {m.prompt_tokens}-token prompts, failures {m.failures}, peak "
            f"{m.peak_reserved_bytes / 1e9:.1f} GB reserved, engine {m.engine_bytes / 1e9:.1f} GB, KV {m.kv_cache_tokens} tokens"
        )
    lines.append(f"autoscaling concurrency target (p95 within 1.25x of one client): {report.concurrency_target}")
    lines += [f"phase {p.name}: {p.status} {p.seconds:.0f} s {p.why or ''}" for p in report.phases]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("starcoder", "tiny"), default="starcoder")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop starting phases past this many seconds")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--seed-levels", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--variant-levels", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--variants", nargs="*", default=None, help="names from VARIANTS (default: all)")
    parser.add_argument("--check-prompts", type=int, default=8)
    parser.add_argument("--speculation-levels", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--speculation-prompts", type=int, default=4)
    parser.add_argument("--check-tokens", type=int, default=64)
    parser.add_argument("--fim-tokens", type=int, default=1500)
    parser.add_argument("--ttft-trials", type=int, default=5)
    parser.add_argument("--long-prompt-tokens", type=int, default=8192 - 128)
    parser.add_argument("--memory-clients", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copy-gib", type=float, default=2.0)
    parser.add_argument("--label", default="gpu-suite")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs" / "bench")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    import transformers
    from starcoder_serving.family.shape import ModelShape
    from transformers import AutoTokenizer

    from devtools.tiny_model import build_tiny_model
    from devtools.truss_local import DEFAULT_TINY_MODEL_DIR

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("the suite needs a CUDA GPU (or --shape tiny --device cpu to check it)", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(DEFAULT_TINY_MODEL_DIR))
    started = time.perf_counter()
    model = gpu.build_model(args.shape, args.device, args.dtype, printable_ids=len(tokenizer))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dtype_bytes = next(model.parameters()).element_size()
    print(f"built {args.shape}: {weight_bytes / 1e9:.1f} GB in {time.perf_counter() - started:.0f} s", flush=True)
    try:
        import flash_attn  # type: ignore[import-not-found]

        flash: str | None = str(flash_attn.__version__)
    except ImportError:
        flash = None
    report = SuiteReport(
        label=args.label,
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command="python -m bench.gpu_suite " + " ".join(sys.argv[1:] if argv is None else argv),
        device=torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        flash_attn=flash,
        shape=args.shape,
        parameters=sum(p.numel() for p in model.parameters()),
        weight_bytes=weight_bytes,
        kv_bytes_per_token=ModelShape.from_config(model.config).kv_bytes_per_token(dtype_bytes),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
    )
    suite = Suite(args, report, model, tokenizer)
    chosen = VARIANTS if args.variants is None else {name: VARIANTS[name] for name in args.variants if name in VARIANTS}
    last = (
        LAST_VARIANTS if args.variants is None else {n: LAST_VARIANTS[n] for n in args.variants if n in LAST_VARIANTS}
    )
    suite.phase("bandwidth", 5, suite.bandwidth)
    suite.phase("decode_generate", 20, suite.decode_generate)
    suite.phase("reference", 15, suite.reference_phase)
    suite.phase("baseline", 60, suite.baseline)
    suite.phase("seed", 30, suite.seed)
    suite.phase("speculation", 90, suite.speculation)
    for name, overrides in chosen.items():
        suite.phase(f"variant:{name}", 30, lambda name=name, overrides=overrides: suite.variant(name, overrides))
    suite.phase("memory_80gb", 90, suite.memory_80gb)
    for name, overrides in last.items():
        suite.phase(f"variant:{name}", 150, lambda name=name, overrides=overrides: suite.variant(name, overrides))
    print(summary(report), flush=True)
    print(f"wrote {suite.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
