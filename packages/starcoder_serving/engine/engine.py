"""The engine: load the model, turn a request into a token-space plan, and run it.

Async API over a model-owning worker thread. Text assembly (incremental detokenization, stop
sequences, finish reason, token counts) happens here on the event loop, identically for streamed
and non-streamed requests, so the two can never disagree.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starcoder_serving.text.detokenizer import IncrementalDetokenizer
from starcoder_serving.errors import InvalidRequest, Overloaded
from starcoder_serving.engine.generate_worker import GenerateWorker
from starcoder_serving.api.generation_params import check_with_transformers, token_ids_in
from starcoder_serving.engine.jobs import DoneEvent, FinishReason, GenerationPlan, Job, TokenEvent, TokenLogprob
from starcoder_serving.text.prompts import ChatRenderer, InstructionTemplate
from starcoder_serving.engine.path_choice import Path as GenerationPath
from starcoder_serving.engine.path_choice import Route, batched_sampling_kwargs, choose_path, effective_parameters
from starcoder_serving.settings import ServingSettings
from starcoder_serving.text.stop_sequences import StopSequenceMatcher

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TextDelta:
    text: str
    token_logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    token_logprobs: tuple[TokenLogprob, ...] = ()


# Called with the final Completion once a stream ends (usage accounting, finish_reason).
CompletionCallback = Callable[[Completion], None]


class _TextAssembler:
    """Token events to completion text: incremental detokenization, stop sequences, finish reason."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._matcher = StopSequenceMatcher(stop)
        self._parts: list[str] = []
        self._pending_logprobs: list[TokenLogprob] = []
        self._all_logprobs: list[TokenLogprob] = []
        self.completion_tokens = 0
        self.reason: FinishReason | None = None

    def feed(self, event: TokenEvent | DoneEvent) -> str:
        """The text this event completes; sets ``reason`` when the completion is over."""
        if isinstance(event, DoneEvent):
            if event.error is not None:
                raise event.error
            tail = self._matcher.feed(self._detokenizer.flush())
            text = tail.emit if tail.stopped else tail.emit + self._matcher.flush()
            self.reason = FinishReason.STOP if tail.stopped else event.reason
        else:
            self.completion_tokens += 1
            if event.logprob is not None:
                self._pending_logprobs.append(event.logprob)
                self._all_logprobs.append(event.logprob)
            scan = self._matcher.feed(self._detokenizer.push(event.token_id))
            text = scan.emit
            if scan.stopped:
                self.reason = FinishReason.STOP
        self._parts.append(text)
        return text

    def take_pending_logprobs(self) -> tuple[TokenLogprob, ...]:
        pending, self._pending_logprobs = tuple(self._pending_logprobs), []
        return pending

    def completion(self, prompt_tokens: int) -> Completion:
        assert self.reason is not None
        return Completion(
            "".join(self._parts), self.reason, prompt_tokens, self.completion_tokens, tuple(self._all_logprobs)
        )


class Engine:
    def __init__(self, model: Any, tokenizer: Any, settings: ServingSettings, data_dir: Path) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        # What responses call the model: a hub id as is, a local checkpoint by its folder name (not its path).
        self.model_name = Path(settings.checkpoint).name if Path(settings.checkpoint).is_dir() else settings.checkpoint
        self.vocab_size = len(tokenizer)
        self.context_window = min(
            settings.context_window, getattr(model.config, "n_positions", settings.context_window)
        )
        eos = model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        eos_ids.add(tokenizer.eos_token_id)
        # StarCoder2 ends files with <file_sep>: stop there as well when the vocabulary has it.
        file_sep = tokenizer.convert_tokens_to_ids("<file_sep>")
        if isinstance(file_sep, int) and file_sep != tokenizer.unk_token_id:
            eos_ids.add(file_sep)
        self.eos_token_ids = frozenset(i for i in eos_ids if i is not None)
        self.chat = ChatRenderer(tokenizer, (data_dir / settings.chat_template_file).read_text(encoding="utf-8"))
        self.instructions = InstructionTemplate.load(data_dir / settings.instruction_template_file)
        self._batched = self._start_batched_worker(model, settings) if settings.continuous_batching else None
        self._worker = GenerateWorker(
            model, set(self.eos_token_ids), pad_token_id=tokenizer.eos_token_id, model_access=self._batched
        )
        # Generation defaults as generate() resolves them (transformers' globals < the checkpoint's own),
        # so routing sees e.g. the top_k=50 that do_sample=True implies.
        defaults = dict(model.generation_config._get_default_generation_params())
        defaults.update({k: v for k, v in model.generation_config.to_dict().items() if v is not None})
        self._generation_defaults = defaults
        self._logits_size = int(model.get_output_embeddings().weight.shape[0])
        self._admitted = 0
        self._tokenize_lock = threading.Lock()
        self.routed: dict[GenerationPath, int] = {GenerationPath.BATCHED: 0, GenerationPath.GENERATE: 0}

    def _start_batched_worker(self, model: Any, settings: ServingSettings) -> Any:
        """Two paths share one model; see batch_worker.py for why that is safe:

        * requests the batch can honour exactly (path_choice.py) join the continuous batch;
        * the rest run through GenerateWorker's generate(), which parks the batch loop (manager.pause)
          for each of its steps and lets the batch take one step in between.
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
            max_batch_sequences=settings.max_batch_sequences,
            max_batch_tokens=max_batch_tokens,
            kv_num_blocks=num_blocks,
            kv_page_size=settings.kv_page_size,
            kv_memory_fraction=settings.kv_memory_fraction,
            prefix_sharing=settings.prefix_sharing,
            cuda_graphs=settings.cuda_graphs,
            compile_level=settings.compile_level,
        )

    @classmethod
    def load(cls, settings: ServingSettings, data_dir: Path, hf_token: str | None = None) -> Engine:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        checkpoint = settings.resolved_checkpoint()
        started = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(checkpoint, token=hf_token)
        dtype = settings.dtype if settings.dtype == "auto" else getattr(torch, settings.dtype)
        model = AutoModelForCausalLM.from_pretrained(
            checkpoint,
            token=hf_token,
            dtype=dtype,
            attn_implementation=settings.attn_implementation,
            device_map=settings.device,
        ).eval()
        logger.info(
            "loaded %s (%s, %s, %s attention) in %.1f s",
            checkpoint,
            model.dtype,
            model.device,
            settings.attn_implementation,
            time.perf_counter() - started,
        )
        return cls(model, tokenizer, settings, data_dir)

    # ---- planning: everything that can be refused is refused here, before any token is generated ----

    def tokenize(self, text: str) -> list[int]:
        # Requests are planned in worker threads (long prompts take a while); one encode at a time
        # keeps the Rust tokenizer's borrow rules happy.
        with self._tokenize_lock:
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def plan(
        self,
        prompt_ids: list[int],
        parameters: dict[str, Any],
        stop: list[str] | tuple[str, ...] = (),
        seed: int | None = None,
        top_logprobs: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> GenerationPlan:
        settings = self.settings
        kwargs = dict(parameters)
        prompt_tokens = len(prompt_ids)
        if prompt_tokens == 0:
            raise InvalidRequest("The prompt encodes to no tokens; send some text.", param="prompt")
        room = self.context_window - prompt_tokens
        if room <= 0:
            raise InvalidRequest(
                f"The prompt has {prompt_tokens} tokens, which fills the {self.context_window}-token context "
                "window; shorten it so there is room to generate.",
                param="prompt",
            )
        max_length = kwargs.pop("max_length", None)
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        if max_new_tokens is None and max_length is not None:  # as in transformers, max_new_tokens wins
            max_new_tokens = max_length - prompt_tokens
            if max_new_tokens <= 0:
                raise InvalidRequest(
                    f"`max_length` ({max_length}) counts the prompt, which already has {prompt_tokens} tokens; "
                    f"send a larger max_length or use max_new_tokens.",
                    param="max_length",
                )
        if max_new_tokens is None:
            max_new_tokens = min(settings.default_max_new_tokens, room)
        if max_new_tokens > settings.max_new_tokens_cap:
            raise InvalidRequest(
                f"`max_new_tokens` is {max_new_tokens}, above this server's cap of {settings.max_new_tokens_cap}; "
                f"send at most {settings.max_new_tokens_cap}.",
                param="max_new_tokens",
            )
        if prompt_tokens + max_new_tokens > self.context_window:
            raise InvalidRequest(
                f"The prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were requested: "
                f"{prompt_tokens + max_new_tokens} > the {self.context_window}-token context window. Send "
                f"max_new_tokens <= {room} or a shorter prompt.",
                param="max_new_tokens",
            )
        min_length = kwargs.pop("min_length", None)
        if min_length is not None and "min_new_tokens" not in kwargs:
            kwargs["min_new_tokens"] = max(0, min_length - prompt_tokens)
        if kwargs.get("min_new_tokens", 0) > max_new_tokens:
            raise InvalidRequest(
                f"`min_new_tokens` ({kwargs['min_new_tokens']}) exceeds max_new_tokens ({max_new_tokens}).",
                param="min_new_tokens",
            )
        if kwargs.get("num_beams", 1) > settings.max_num_beams:
            raise InvalidRequest(f"`num_beams` must be <= {settings.max_num_beams}.", param="num_beams")
        for name, ids in token_ids_in(kwargs).items():
            bad = [i for i in ids if i >= self.vocab_size]
            if bad:
                raise InvalidRequest(
                    f"`{name}` names token ids {bad[:5]} outside the vocabulary (0..{self.vocab_size - 1}).",
                    param=name,
                )
        try:
            check_with_transformers({**kwargs, "max_new_tokens": max_new_tokens})
        except ValueError as exc:
            message = str(exc).split("\nIf you're using a pretrained model")[0].strip()
            raise InvalidRequest(f"Invalid generation parameters: {message}") from None
        self._check_stop(stop)
        return GenerationPlan(
            prompt_ids=list(prompt_ids),
            max_new_tokens=max_new_tokens,
            generation_kwargs=kwargs,
            stop=tuple(stop),
            seed=seed,
            top_logprobs=top_logprobs,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
        )

    def _check_stop(self, stop: list[str] | tuple[str, ...]) -> None:
        settings = self.settings
        if len(stop) > settings.max_stop_sequences:
            raise InvalidRequest(
                f"`stop` has {len(stop)} sequences; send at most {settings.max_stop_sequences}.", param="stop"
            )
        for sequence in stop:
            if not sequence or len(sequence) > settings.max_stop_sequence_chars:
                raise InvalidRequest(
                    f"Each `stop` sequence must have 1 to {settings.max_stop_sequence_chars} characters.",
                    param="stop",
                )

    # ---- running ----

    def check_capacity(self, requests: int = 1) -> None:
        """Raise ``Overloaded`` (503) unless ``requests`` more can be admitted now."""
        if self._admitted + requests > self.settings.max_queued_requests:
            raise Overloaded(f"The server is at capacity ({self._admitted} requests in progress); retry in a moment.")

    def _admit(self, plan: GenerationPlan) -> Job:
        self.check_capacity()
        params = effective_parameters(self._generation_defaults, plan.generation_kwargs)
        route = self._route(plan, params)
        self._admitted += 1
        self.routed[route.path] += 1
        job = Job(plan, asyncio.get_running_loop(), path=route.path.value)
        if route.path is GenerationPath.BATCHED:
            self._batched.submit(job, batched_sampling_kwargs(params, self._logits_size))
        else:
            self._worker.submit(job)
        return job

    def route(self, plan: GenerationPlan) -> Route:
        """Which path (continuous batch or lone generate()) serves this plan, and why."""
        return self._route(plan, effective_parameters(self._generation_defaults, plan.generation_kwargs))

    def _route(self, plan: GenerationPlan, params: dict[str, Any]) -> Route:
        return choose_path(
            params,
            seed=plan.seed,
            top_logprobs=plan.top_logprobs,
            additive_penalties=bool(plan.presence_penalty or plan.frequency_penalty),
            continuous_batching=self._batched is not None,
            request_keys=set(plan.generation_kwargs),
        )

    @property
    def requests_in_progress(self) -> int:
        return self._admitted

    async def stream(
        self, plan: GenerationPlan, on_complete: CompletionCallback | None = None
    ) -> AsyncIterator[TextDelta]:
        """Yield text as it is produced. Closing the iterator cancels the generation.

        Tokens that arrived while the consumer was busy are yielded as one delta: under load this
        cuts the per-chunk cost (HTTP writes, SSE events) without delaying anything when idle.
        """
        job = self._admit(plan)
        text = _TextAssembler(self.tokenizer, plan.stop)
        started = time.perf_counter()
        try:
            while text.reason is None:
                piece = "".join(text.feed(event) for event in await job.next_events() if text.reason is None)
                if text.reason is FinishReason.STOP:
                    job.cancel()
                logprobs = text.take_pending_logprobs()
                if piece or (logprobs and text.reason is not None):
                    yield TextDelta(piece, logprobs)
            if on_complete is not None:
                on_complete(text.completion(plan.prompt_tokens))
        finally:
            job.cancel()  # no-op when finished; stops the worker when the client left early
            self._admitted -= 1
            # One line per request, the same for both paths; never the prompt or the completion.
            logger.info(
                "request %d done: path=%s finish_reason=%s prompt_tokens=%d completion_tokens=%d seconds=%.3f",
                job.id,
                job.path,
                (text.reason or FinishReason.CANCELLED).value,
                plan.prompt_tokens,
                text.completion_tokens,
                time.perf_counter() - started,
            )

    async def complete(self, plan: GenerationPlan) -> Completion:
        result: list[Completion] = []
        async for _ in self.stream(plan, on_complete=result.append):
            pass
        return result[0]

    async def complete_all(self, plans: list[GenerationPlan]) -> list[Completion]:
        """Run plans together (they share the batch); if one fails or we are cancelled, stop the rest."""
        tasks = [asyncio.ensure_future(self.complete(plan)) for plan in plans]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def shutdown(self) -> None:
        self._worker.shutdown()
        if self._batched is not None:
            self._batched.shutdown()
