"""The engine: load the model, turn a request into token-space plans, and run them.

Async API over the two model-owning workers (the continuous batch and solo ``generate()``; see
``path_choice.py``). Text assembly (``text/assembler.py``) happens on the event loop, identically for
streamed and non-streamed requests and for both paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from starcoder_serving.engine import cpu_threads, transformers_compat
from starcoder_serving.engine.generate_worker import SCORING_CHUNK_TOKENS, GenerateWorker, PromptScores
from starcoder_serving.engine.jobs import GenerationPlan, Job
from starcoder_serving.engine.path_choice import GenerationPath, Route, choose_path
from starcoder_serving.engine.request import GenerationRequest
from starcoder_serving.engine.sampling_params import SamplingParams
from starcoder_serving.engine.speculation import SpeculationStats
from starcoder_serving.engine.validation import RequestValidator, ValidRequest
from starcoder_serving.errors import InvalidRequest, Overloaded
from starcoder_serving.events import DoneEvent, FinishReason
from starcoder_serving.family.profile import ModelProfile
from starcoder_serving.settings import ServingSettings
from starcoder_serving.text.assembler import Completion, CompletionCallback, TextAssembler, TextDelta
from starcoder_serving.text.prompts import ChatRenderer, InstructionTemplate

__all__ = ["ClientGone", "Completion", "CompletionCallback", "Engine", "TextDelta", "wait_until_gone"]

logger = logging.getLogger(__name__)

# Whether the client of a stream has gone away (starlette's ``Request.is_disconnected``).
ClientGone = Callable[[], Awaitable[bool]]
# How often a stream asks: a client that hangs up stops using the model within this (plus one step).
CLIENT_POLL_SECONDS = 0.05
# Prompt tokens scored at once (in progress or waiting for the worker), in context windows: past it, 503.
SCORING_BUDGET_WINDOWS = 16


# ---- the engine's metrics (truss serves prometheus_client's default registry at /metrics/) ----
# Gauges are read when scraped, from the engine that serves (the latest loaded); counters move once per request.
_serving: list[weakref.ReferenceType[Engine]] = []


def _read(measure: Callable[[Engine], float]) -> Callable[[], float]:
    def value() -> float:
        engine = _serving[0]() if _serving else None
        return 0.0 if engine is None else float(measure(engine))

    return value


REQUESTS_RUNNING = Gauge("starcoder_requests_running", "Requests in the continuous batch (prefilling or decoding).")
REQUESTS_RUNNING.set_function(_read(lambda engine: engine.requests_running))
REQUESTS_WAITING = Gauge(
    "starcoder_requests_waiting", "Requests admitted and waiting for the batch (or for generate(), or being scored)."
)
REQUESTS_WAITING.set_function(_read(lambda engine: engine.requests_waiting))
BATCH_SIZE = Gauge("starcoder_batch_size", "Rows (requests) in the continuous batch's last step.")
BATCH_SIZE.set_function(_read(lambda engine: engine.batch_size))
KV_CACHE_USAGE = Gauge("starcoder_kv_cache_usage_ratio", "Used / total KV-cache pages of the continuous batch.")
KV_CACHE_USAGE.set_function(_read(lambda engine: engine.kv_cache_usage))
# Monotonic since load, read from the engine at scrape time (prometheus_client's counters cannot be read from a source).
SPECULATIVE_DRAFTED = Gauge(
    "starcoder_speculative_draft_tokens", "Draft tokens fed to the model by speculative decoding since load."
)
SPECULATIVE_DRAFTED.set_function(_read(lambda engine: engine.speculation.drafted))
SPECULATIVE_ACCEPTED = Gauge(
    "starcoder_speculative_accepted_tokens", "Draft tokens the model kept (speculative decoding) since load."
)
SPECULATIVE_ACCEPTED.set_function(_read(lambda engine: engine.speculation.accepted))
PREFIX_CACHE_HITS = Counter(
    "starcoder_prefix_cache_hit_tokens", "Prompt tokens served from shared KV-cache pages (prefix sharing)."
)
REQUESTS_BY_PATH = Counter(
    "starcoder_requests_by_path", "Generations by path: the continuous batch or lone generate().", ["path"]
)
_BY_PATH = {path: REQUESTS_BY_PATH.labels(path=path.value) for path in GenerationPath}
transformers_compat.count_prefix_hits(PREFIX_CACHE_HITS.inc)


async def wait_until_gone(client_gone: ClientGone) -> None:
    """Return once ``client_gone`` says so, asking every ``CLIENT_POLL_SECONDS``. The first look comes after one
    interval: the HTTP layer (truss) has just looked, and a look is not free (starlette's costs a cancel scope)."""
    await asyncio.sleep(CLIENT_POLL_SECONDS)
    while not await client_gone():
        await asyncio.sleep(CLIENT_POLL_SECONDS)


class StreamTrace:
    """What a request's generations did, for its metrics and its log line (``api/metrics.py``): filled by
    ``Engine.stream`` once per generation, at its end; nothing per token."""

    __slots__ = ("completion_tokens", "finish_reasons", "first_token_at", "job_ids", "paths")

    def __init__(self) -> None:
        self.first_token_at: float | None = None  # the earliest first token of its generations (perf_counter)
        self.completion_tokens = 0
        self.job_ids: list[int] = []
        self.paths: list[str] = []
        self.finish_reasons: list[str] = []

    def record(self, job: Job, reason: FinishReason, completion_tokens: int) -> None:
        self.job_ids.append(job.id)
        if job.path not in self.paths:
            self.paths.append(job.path)
        if reason.value not in self.finish_reasons:
            self.finish_reasons.append(reason.value)
        self.completion_tokens += completion_tokens
        if job.first_token_at is not None and (self.first_token_at is None or job.first_token_at < self.first_token_at):
            self.first_token_at = job.first_token_at


async def _abandon_when_gone(client_gone: ClientGone, job: Job) -> None:
    await wait_until_gone(client_gone)
    job.abandon()


class Engine:
    def __init__(self, model: Any, tokenizer: Any, settings: ServingSettings, data_dir: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        # What responses call the model: a hub id as is, a local checkpoint by its folder name (not its path).
        self.model_name = Path(settings.checkpoint).name if Path(settings.checkpoint).is_dir() else settings.checkpoint
        self.vocab_size = len(tokenizer)
        # What differs between the models of the family, read from the checkpoint (family/profile.py).
        self.profile = ModelProfile.read(model, tokenizer, settings)
        self.context_window = self.profile.context_window
        self.eos_token_ids = self.profile.end_token_ids
        logger.info("serving %s", self.profile.describe(tokenizer))
        self.chat = ChatRenderer(
            tokenizer, (data_dir / settings.chat_template_file).read_text(encoding="utf-8"), settings.chat_stop
        )
        self.instructions = InstructionTemplate.load(data_dir / settings.instruction_template_file)
        self._logits_size = int(model.get_output_embeddings().weight.shape[0])
        # transformers' asynchronous batching needs CUDA (or XPU) streams; elsewhere the setting is ignored.
        self.async_batching = settings.async_batching and model.device.type in ("cuda", "xpu")
        if settings.async_batching and not self.async_batching:
            logger.warning("async_batching ignored: it needs a CUDA device, and the model is on %s", model.device)
        self._batched = self._start_batched_worker(model, settings) if settings.continuous_batching else None
        self._worker = GenerateWorker(
            model, set(self.eos_token_ids), pad_token_id=tokenizer.eos_token_id, model_access=self._batched
        )
        # Generation defaults as generate() resolves them (transformers' globals < the checkpoint's own):
        # a request inherits what it does not set, e.g. the top_k=50 that do_sample=True implies.
        defaults = transformers_compat.default_generation_params(model.generation_config)
        defaults.update({k: v for k, v in model.generation_config.to_dict().items() if v is not None})
        self.validator = RequestValidator(
            settings=settings,
            model_name=self.model_name,
            context_window=self.context_window,
            vocab_size=self.vocab_size,
            logits_width=self._logits_size,
            end_token_ids=self.profile.end_token_ids,
            tokenize=self.tokenize,
            decode=lambda ids: str(tokenizer.decode(ids)),
            fim=self.profile.fim,
            chat=self.chat,
            instructions=self.instructions,
            generation_defaults=SamplingParams.inheritable(defaults),
        )
        self._admitted = 0
        # Prompt tokens being scored (or waiting to be), at most scoring_token_budget: a few full windows.
        self._scoring_tokens = 0
        self.scoring_token_budget = SCORING_BUDGET_WINDOWS * self.context_window
        self._thread_tokenizers = threading.local()
        self.routed: dict[GenerationPath, int] = {GenerationPath.BATCHED: 0, GenerationPath.GENERATE: 0}
        self._warming_up = False
        _serving[:] = [weakref.ref(self)]  # the metrics' gauges read the engine loaded last

    def _start_batched_worker(self, model: Any, settings: ServingSettings) -> Any:
        """Two paths share one model; see batch_worker.py for why that is safe:

        * every request but beam search joins the continuous batch; with async_batching on, so do all but those
          that need their last token on the host (path_choice.py has the table);
        * the others run through GenerateWorker's generate(), which parks the batch loop (manager.pause) for each
          of its steps and lets the batch take one step in between.
        """
        from starcoder_serving.engine.batch_worker import BatchedWorker

        num_blocks, max_batch_tokens = settings.kv_num_blocks, settings.max_batch_tokens
        if model.device.type == "cpu":
            # transformers sizes an unset cache from free *host* memory on CPU (gigabytes); a CPU
            # replica (tests, laptops) gets a fixed 256 pages x kv_page_size tokens instead.
            num_blocks = num_blocks or 256
            max_batch_tokens = max_batch_tokens or 512
        return BatchedWorker(
            model,
            eos_token_ids=set(self.eos_token_ids),
            logits_width=self._logits_size,
            max_requests=settings.max_queued_requests,
            max_batch_sequences=settings.max_batch_sequences,
            max_batch_tokens=max_batch_tokens,
            kv_num_blocks=num_blocks,
            kv_page_size=settings.kv_page_size,
            kv_memory_fraction=settings.kv_memory_fraction,
            prefix_sharing=settings.prefix_sharing,
            cuda_graphs=settings.graph_paths,
            compile_level=settings.compile_level,
            async_batching=self.async_batching,
            stream_interval_s=settings.stream_interval_ms / 1000,
            speculative_tokens=settings.speculative_tokens,
            speculative_step_tokens=settings.speculative_step_tokens,
        )

    @classmethod
    def load(cls, settings: ServingSettings, data_dir: Path, hf_token: str | None = None) -> Engine:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        checkpoint = settings.resolved_checkpoint()
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, token=hf_token)
        # Unset device and dtype follow the machine: CUDA in bfloat16 with a GPU, else the CPU in float32.
        device, dtype_name = settings.resolved_placement(torch.cuda.is_available())
        logger.info(
            "loading on %s in %s (%s)",
            device,
            dtype_name,
            "as set"
            if settings.device not in (None, "auto") and settings.dtype is not None
            else f"unset values follow the machine: {'a CUDA GPU' if torch.cuda.is_available() else 'no CUDA GPU'}",
        )
        dtype = dtype_name if dtype_name == "auto" else getattr(torch, dtype_name)
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint,
            token=hf_token,
            dtype=dtype,
            attn_implementation=settings.attn_implementation,
            device_map=device,
        ).eval()
        if model.device.type == "cpu":
            cpu_threads.install(model, settings.cpu_threads)
        logger.info(
            "loaded %s (%s, %s, %s attention%s) in %.1f s",
            checkpoint,
            model.dtype,
            model.device,
            settings.attn_implementation,
            f", {torch.get_num_threads()} threads for small steps, {cpu_threads.available_cores()} for large"
            if model.device.type == "cpu"
            else "",
            time.perf_counter() - started,
        )
        return cls(model, tokenizer, settings, data_dir)

    # ---- planning: everything that can be refused is refused here, before any token is generated ----

    def tokenize(self, text: str) -> list[int]:
        # Requests are planned on the event loop (small ones) and in worker threads (long prompts). A Rust
        # tokenizer may be borrowed mutably by one encode at a time, and a lock would make the event loop wait
        # for a thread's long prompt: each thread encodes with its own copy instead.
        tokenizer = getattr(self._thread_tokenizers, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._thread_tokenizers.tokenizer = copy.deepcopy(self.tokenizer)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def validate(self, request: GenerationRequest) -> ValidRequest:
        """The one validation stage (validation.py): every limit and rule checked, every prompt planned."""
        return self.validator.validate(request)

    def plan(self, prompt_ids: list[int], sampling: SamplingParams) -> list[GenerationPlan]:
        """Plans for a prompt already in tokens, checked by the same rules (transformers' names in errors)."""
        return self.validator.plan(prompt_ids, sampling)

    # ---- running ----

    def check_capacity(self, requests: int = 1) -> None:
        """Raise ``Overloaded`` (503) unless ``requests`` more can be admitted now."""
        if self._admitted + requests > self.settings.max_queued_requests:
            raise Overloaded(f"The server is at capacity ({self._admitted} requests in progress); retry in a moment.")

    def _admit(self, plan: GenerationPlan, quiet: bool) -> Job:
        self.check_capacity()
        route = self.route(plan)
        self._admitted += 1
        if not self._warming_up:  # warm-up requests are not counted anywhere
            self.routed[route.path] += 1
            _BY_PATH[route.path].inc()
        # A stop sequence (or an editor-style ending) is found in the text as it comes: such a job is never quiet.
        job = Job(
            plan,
            asyncio.get_running_loop(),
            path=route.path.value,
            quiet=quiet and not plan.stop and plan.sampling.stop_at is None,
        )
        if route.path is GenerationPath.BATCHED:
            self._batched.submit(job)
        else:
            self._worker.submit(job)
        return job

    def route(self, plan: GenerationPlan) -> Route:
        """Which path (continuous batch or lone generate()) serves this plan, and why."""
        return choose_path(
            plan.sampling, continuous_batching=self._batched is not None, async_batching=self.async_batching
        )

    @property
    def kv_cache_tokens(self) -> int | None:
        """Tokens the continuous batch's KV cache holds; None without the batch or before its first request."""
        return None if self._batched is None else self._batched.kv_cache_tokens

    @property
    def requests_in_progress(self) -> int:
        return self._admitted

    @property
    def requests_running(self) -> int:
        """Requests in the continuous batch now (metrics)."""
        return 0 if self._batched is None else self._batched.batch_requests

    @property
    def requests_waiting(self) -> int:
        """Requests admitted and not (yet) in the batch (metrics)."""
        return max(0, self._admitted - self.requests_running)

    @property
    def batch_size(self) -> int:
        return 0 if self._batched is None else self._batched.last_step_rows

    @property
    def kv_cache_usage(self) -> float:
        return 0.0 if self._batched is None else self._batched.kv_cache_usage

    @property
    def speculation(self) -> SpeculationStats:
        """Speculative decoding's counts since load: draft tokens fed to the model, and of those, kept."""
        return SpeculationStats() if self._batched is None else self._batched.speculation

    async def stream(
        self,
        plan: GenerationPlan,
        on_complete: CompletionCallback | None = None,
        *,
        quiet: bool = False,
        client_gone: ClientGone | None = None,
        trace: StreamTrace | None = None,
    ) -> AsyncIterator[TextDelta]:
        """Yield text as it is produced. Closing the iterator cancels the generation.

        Tokens that arrived while the consumer was busy are yielded as one delta: under load this
        cuts the per-chunk cost (HTTP writes, SSE events) without delaying anything when idle.
        ``quiet``: the caller only wants the end (``complete``); the text may then come in one delta.
        ``client_gone``: polled every ``CLIENT_POLL_SECONDS``; once it says so, the generation is cancelled
        and the stream ends without a completion (``on_complete`` is not called), even while it waits for a
        token. One watcher per stream, instead of a race set up for every delta.
        ``trace``: told, at the end, the generation's path, first-token time, tokens and finish reason.
        """
        job = self._admit(plan, quiet)
        text = TextAssembler(self.tokenizer, plan.stop, plan.sampling.stop_at)
        started = time.perf_counter()
        watcher = None if client_gone is None else asyncio.create_task(_abandon_when_gone(client_gone, job))
        try:
            while text.reason is None:
                parts: list[str] = []
                failure: Exception | None = None
                for event in await job.next_events():
                    if text.reason is not None:
                        break
                    if isinstance(event, DoneEvent) and event.error is not None:
                        failure = event.error
                        break
                    if isinstance(event, DoneEvent) and event.reason is FinishReason.CANCELLED:
                        return  # the client left (or closed the stream): nobody reads a completion
                    parts.append(text.feed(event))
                piece = "".join(parts)
                if text.reason is FinishReason.STOP:
                    job.cancel()
                # Text that arrived with an error is still delivered first: a stream then shows how far
                # it got before it was cut, however the events were batched. Logprob entries wait for the
                # text they belong to (a token may be part of a character), and are never dropped.
                if piece or text.reason is not None or failure is not None:
                    logprobs = text.take_pending_logprobs()
                    if piece or logprobs:
                        yield TextDelta(piece, logprobs)
                if failure is not None:
                    raise failure
            if on_complete is not None:
                on_complete(text.completion(plan.prompt_tokens))
        finally:
            if watcher is not None:
                watcher.cancel()
            job.cancel()  # no-op when finished; stops the worker when the client left early
            self._admitted -= 1
            if trace is not None:
                trace.record(job, text.reason or FinishReason.CANCELLED, text.completion_tokens)
            # The request's own line is the HTTP layer's (api/metrics.py); this one, per generation, is for debugging.
            logger.debug(
                "request %d done: path=%s finish_reason=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f",
                job.id,
                job.path,
                (text.reason or FinishReason.CANCELLED).value,
                plan.prompt_tokens,
                text.completion_tokens,
                time.perf_counter() - started,
            )

    async def complete(self, plan: GenerationPlan, trace: StreamTrace | None = None) -> Completion:
        result: list[Completion] = []
        async for _ in self.stream(plan, on_complete=result.append, quiet=True, trace=trace):
            pass
        return result[0]

    async def complete_all(self, plans: list[GenerationPlan], trace: StreamTrace | None = None) -> list[Completion]:
        """Run plans together (they share the batch); if one fails or we are cancelled, stop the rest."""
        tasks = [asyncio.ensure_future(self.complete(plan, trace)) for plan in plans]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @contextlib.contextmanager
    def scoring_admitted(self, prompts: Sequence[Sequence[int]], generating: int = 0) -> Iterator[None]:
        """Hold capacity for scoring ``prompts`` (each once), or refuse at once: ``Overloaded`` (503) while the
        server is full, ``InvalidRequest`` (400) when they could never fit. A prompt being scored counts as a
        request in progress, and its tokens count against ``scoring_token_budget``, the most the server scores at
        once. ``generating``: the request's generations to come after it, which must fit now too."""
        tokens = sum(len(prompt) for prompt in prompts)
        if tokens > self.scoring_token_budget:
            raise InvalidRequest(
                f"The prompts to score have {tokens} tokens in all; the server scores at most "
                f"{self.scoring_token_budget} at once. Send them in several requests.",
                param="prompt",
            )
        self.check_capacity(len(prompts) + generating)
        if self._scoring_tokens + tokens > self.scoring_token_budget:
            raise Overloaded(
                f"The server is at capacity ({self._scoring_tokens} prompt tokens being scored); retry in a moment."
            )
        self._admitted += len(prompts)
        self._scoring_tokens += tokens
        try:
            yield
        finally:
            self._admitted -= len(prompts)
            self._scoring_tokens -= tokens

    async def score_prompt(
        self, prompt_ids: list[int], top: int = 0, *, chunk_tokens: int = SCORING_CHUNK_TOKENS
    ) -> PromptScores:
        """Each prompt token's logprob given the tokens before it (the first has none, so n - 1 entries), with the
        ``top`` most likely alternatives. Scored ``chunk_tokens`` positions at a time on the generate() worker,
        taking turns with the batch and with a generate() in progress (``GenerateWorker.score``); cancelling the
        caller stops it before its next chunk. Admission is the caller's (``scoring_admitted``)."""
        if len(prompt_ids) > self.context_window:  # validation refuses such a prompt; this guards the forward pass
            raise InvalidRequest(
                f"The prompt has {len(prompt_ids)} tokens; at most {self.context_window} can be scored.",
                param="prompt",
            )
        # Cancelling this await cancels the wrapped future, which the worker sees before the next chunk.
        return await asyncio.wrap_future(self._worker.score(prompt_ids, top, chunk_tokens))

    def warm_up(self) -> None:
        """Serve one short request down each path before the replica reports ready.

        The first user request then pays none of the one-off costs: the batch's KV cache and loop
        thread, CUDA kernels and library handles. A model that cannot generate fails the deploy at load
        instead of failing its first requests. Warm-up requests are not counted in ``routed`` or the metrics.
        """
        started = time.perf_counter()
        prompt_ids = self.tokenize("def")
        tokens = min(2, self.settings.max_new_tokens_cap)
        greedy = SamplingParams(max_new_tokens=tokens)
        # Beam search takes the generate() path whatever the settings (where they allow beams at all).
        beams = SamplingParams(max_new_tokens=tokens, num_beams=min(2, self.settings.max_num_beams))

        async def both_paths() -> None:
            for sampling in (greedy, beams):
                await self.complete(self.plan(prompt_ids, sampling)[0])

        self._warming_up = True
        try:
            asyncio.run(both_paths())
        finally:
            self._warming_up = False
        logger.info("warmed up both generation paths in %.2f s", time.perf_counter() - started)

    def health(self) -> str | None:
        """None when the engine can serve requests; else the reason it cannot (a replica to restart)."""
        if not self._worker.alive:
            return "the generate() worker thread is gone"
        if self._batched is not None and (problem := self._batched.health()) is not None:
            return problem
        try:
            # A device fault (e.g. an illegal memory access) poisons a CUDA context for good: any use
            # of the device raises from then on. One tiny read of the weights finds out.
            float(self.model.get_output_embeddings().weight[0, 0].detach().float().cpu())
        except Exception as error:  # noqa: BLE001 - reported, not raised: this is a health check
            return f"the model's device is unusable ({type(error).__name__}: {str(error)[:200]})"
        return None

    def shutdown(self) -> None:
        self._worker.shutdown()
        if self._batched is not None:
            self._batched.shutdown()
