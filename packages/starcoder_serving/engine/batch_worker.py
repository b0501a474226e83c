"""Continuous batching: the requests ``path_choice`` sends here decode in one shared batch over a paged KV cache.

That is every request but beam search, except with ``async_batching`` on, when the ones that need their latest
token on the host (n-gram and multi-token bans, logprobs) go to ``generate()`` too (see ``path_choice.py``).

Built on transformers' own ``ContinuousBatchingManager`` (``model.init_continuous_batching``): its
background thread schedules prefill and decode tokens of all active requests into one forward pass
per step, reading and writing K/V in fixed-size pages of a preallocated cache, so a finished or
cancelled request frees its pages for the next one immediately (no padding, no waiting for the
slowest sequence). Each request's sampling parameters are applied row by row by our ``BatchSampler``
(``batch_sampler.py``), installed as the manager's only logits processor; the manager itself runs
greedy (argmax), which the sampler turns into sampling where a row asks for it.

Per token, the worker does as little as the request needs: a quiet job (not streamed, no stop sequences) is not
streamed by the manager either, and hears once, at its end (unless it wants logprobs or has a ``max_time``);
a streamed job's tokens reach its event loop through ``PacedDelivery`` (``jobs.py``), at most one wake-up per
``stream_interval_ms`` besides first tokens and ends, since each wake-up costs the batch thread more than the
tokens it carries.

Sharing the model with ``GenerateWorker`` (see ``engine.py``):

* The manager is created with ``auto_switch_to_flash=False`` and the model's configured attention
  (``sdpa`` or a flash implementation). Those implementations dispatch per call on whether a
  ``PagedAttentionCache`` is passed, so plain ``generate()`` keeps working on the same modules. Only
  ``eager`` would be switched to ``paged|eager``, which cannot run ``generate()``; that is refused.
* ``generate()`` runs only inside ``exclusive()``, i.e. ``manager.pause()``: the batch loop parks at
  a step boundary (after synchronising its compute stream), so the two never run a forward at the
  same time; their caches are separate objects, the weights are only read. ``yield_to_batch()``
  lets the batch take a step between two ``generate()`` steps, and restores the RNG state around it
  so a seeded ``generate()`` samples exactly as it would alone.

On the GPU the batch runs bf16 with SDPA or flash attention. CUDA graphs (``use_cuda_graph``) and
``torch.compile`` (``default_compile_level``) remove per-step Python and kernel-launch overhead,
which matters most at small batch sizes; they are off by default (settings ``cuda_graphs`` and
``compile_level``) until a GPU run shows what they buy for StarCoder-15.5B, since both add warm-up
time to a replica's cold start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

from starcoder_serving.engine import transformers_compat as compat
from starcoder_serving.engine.batch_sampler import BatchSampler
from starcoder_serving.engine.drafting import Drafter
from starcoder_serving.engine.jobs import Job, PacedDelivery
from starcoder_serving.engine.speculation import SpeculationStats, Speculator, default_step_tokens
from starcoder_serving.engine.transformers_compat import GenerationOutput, OutputRouter
from starcoder_serving.errors import GenerationFailed, InvalidRequest, out_of_memory
from starcoder_serving.events import DoneEvent, Event, FinishReason, TokenEvent, TokenLogprob

logger = logging.getLogger(__name__)

# Attention implementations that serve both a paged cache (batch) and a regular one (generate()).
_SHARED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")

_CANCEL_POLL_SECONDS = 0.02


class _Active:
    __slots__ = ("deadline", "forwarded", "job", "logprobs", "quiet", "tokens", "wants_logprobs")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.quiet = job.quiet
        self.wants_logprobs = job.plan.top_logprobs is not None
        self.forwarded = 0  # tokens already sent to the job
        # A quiet job's tokens and logprob entries so far, sent when it ends (at its end token, its length, or
        # its max_time, which the watcher thread enforces).
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        max_time = job.plan.sampling.max_time
        self.deadline = None if max_time is None else time.monotonic() + max_time


class _JobRouter(OutputRouter):
    """Turns the manager's cumulative ``GenerationOutput``s into the job's ``TokenEvent``/``DoneEvent``.

    Replaces the manager's router before its thread starts: the stock one hands outputs to
    callbacks on *one* event loop per batch, while each ``Job`` carries its own loop.
    """

    def __init__(self, worker: BatchedWorker) -> None:
        super().__init__()
        self._worker = worker

    def deliver(self, output: GenerationOutput) -> None:
        self.deliver_batch([output])

    def deliver_batch(self, outputs: list[GenerationOutput]) -> None:
        worker = self._worker
        with worker._lock:  # once per step
            found = [(output, worker._active.get(output.request_id)) for output in outputs]
        logprobs = worker._step_logprobs(found)
        emissions: list[tuple[Job, Event]] = []
        urgent = False
        for output, active in found:
            if active is not None:  # else cancelled already, or a late output
                urgent |= worker._on_output(output, active, emissions, logprobs)
        if emissions:
            # At most one wake-up of the event loop per step, not one per request; fewer when steps are fast.
            worker._delivery.emit(emissions, urgent=urgent)


class BatchedWorker:
    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: set[int],
        # The model's output width (its output-embedding rows), which may exceed the tokenizer's vocabulary:
        # the sampler's per-token tables span every logit.
        logits_width: int,
        max_requests: int,
        max_batch_sequences: int,
        max_batch_tokens: int | None,
        kv_num_blocks: int | None,
        kv_page_size: int,
        kv_memory_fraction: float | None,
        prefix_sharing: bool,
        cuda_graphs: tuple[bool, bool] | None = (False, False),
        compile_level: int = 0,
        async_batching: bool = False,
        stream_interval_s: float = 0.0,
        speculative_tokens: int = 0,
        speculative_step_tokens: int | None = None,
        drafter: Drafter | None = None,
        adaptive_speculation: bool = True,
    ) -> None:
        # Requests end at any of these (StarCoder2's <file_sep> too), as on the generate() path.
        self._eos_token_ids = sorted(eos_token_ids)
        # Greedy (argmax) for the manager; BatchSampler turns sampled rows into samples (Gumbel-max).
        generation_config = GenerationConfig(do_sample=False, eos_token_id=self._eos_token_ids)
        cb_config = ContinuousBatchingConfig(
            page_size=kv_page_size,
            num_blocks=kv_num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_memory_percent=kv_memory_fraction,
            max_requests_per_batch=max_batch_sequences,
            allow_block_sharing=prefix_sharing,
            per_request_processors=False,
            drop_unsupported_processors=False,
            # Off by default: the host then prepares a step before the previous one's tokens are back, so
            # path_choice sends the requests that need them on the host to generate() when it is on.
            use_async_batching=async_batching,
            auto_switch_to_flash=False,
            # (varlen, decode) or None: transformers decides.
            use_cuda_graph=cuda_graphs,
            default_compile_level=compile_level,
        )
        # A step that may be captured or compiled is fixed: every row operation must then run every step.
        static_step = cuda_graphs is None or any(cuda_graphs) or compile_level > 0
        self._manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        attention = compat.attention_implementation(model)
        if attention not in _SHARED_ATTENTION:
            if self._manager.is_running():
                self._manager.stop(block=True)
            if (original := compat.original_attention_implementation(self._manager)) is not None:
                model.set_attn_implementation(original)
            raise ValueError(
                f"Continuous batching shares the model with generate() and needs attention that serves both "
                f"(one of {_SHARED_ATTENTION}); the model uses {attention!r}. Set attn_implementation to 'sdpa'."
            )
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._delivery = PacedDelivery(stream_interval_s)
        self.sampler = BatchSampler(
            logits_width=logits_width,
            max_requests=max_requests,
            eos_token_ids=self._eos_token_ids,
            device=model.device,
            static_graph=static_step,
        )
        compat.install_logits_processor(self._manager, self.sampler)
        compat.install_output_router(self._manager, _JobRouter(self))
        # Speculation needs each step's tokens on the host before the next is prepared, and steps of any shape.
        self.speculator: Speculator | None = None
        if speculative_tokens > 0 and not static_step and not async_batching:
            sliding_window = getattr(model.config, "sliding_window", None)
            self.speculator = Speculator(
                max_tokens=speculative_tokens,
                step_token_limit=speculative_step_tokens or default_step_tokens(model.device),
                sliding_window=sliding_window if isinstance(sliding_window, int) and sliding_window > 0 else None,
                drafter=drafter,
                adaptive=adaptive_speculation,
            )
            self.speculator.attach(self.sampler.draft_rows, self.sampler.verify)
            speculator = self.speculator
            self.sampler.step_drafts = lambda: speculator.step_drafts
            compat.install_step_hooks(self._manager, self.speculator)
        if static_step:
            # Capture (or compile) the step at its largest shapes now, not in the first requests' time; the
            # warm-up's dummy rows read the sampler's spare slot. A no-op where no graph backend exists (CPU).
            started = time.perf_counter()
            self._manager.warmup()
            # transformers may have decided against graphs (no graph backend on a CPU; "auto" with an attention
            # that needs a mask): the sampler then goes back to skipping what no row of a step needs.
            self.sampler.static_graph = compat.captures_steps(self._manager)
            logger.info(
                "continuous batching warmed up (graphs %s, compile level %d: steps %s) in %.1f s",
                cuda_graphs,
                compile_level,
                "captured" if self.sampler.static_graph else "not captured on this device",
                time.perf_counter() - started,
            )
        self._manager.start()
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap_cancelled, name="batch-cancel-watch", daemon=True)
        self._reaper.start()

    # ---- requests ----

    def submit(self, job: Job) -> None:
        self._restart_if_crashed()
        request_id = f"job-{job.id}"
        active = _Active(job)
        with self._lock:
            self._active[request_id] = active
        streaming = not active.quiet or active.wants_logprobs or active.deadline is not None
        added = self._manager.add_request(
            input_ids=job.plan.prompt_ids,
            request_id=request_id,
            max_new_tokens=job.plan.max_new_tokens,
            # A quiet job that needs nothing per step (logprobs are read each step; a max_time cut keeps the
            # tokens so far) hears from the manager once, at its end: no output built and routed per step.
            streaming=streaming,
            # A job the manager does not stream is timed by the manager (one perf_counter per token, read once at its
            # end): its time to first token.
            record_timestamps=not streaming,
            eos_token_id=self._eos_token_ids,
            plan=job.plan,  # BatchSampler reads the request's parameters from here
        )
        if added is None:
            self._finish(request_id, DoneEvent(error=GenerationFailed("The batch generator is not running. Retry.")))

    def _restart_if_crashed(self) -> None:
        """A fault in a batch step (e.g. CUDA OOM) fails that batch's requests and stops the manager's
        thread; the next request starts it again (same cache and scheduler, reset)."""
        failure = compat.loop_failure(self._manager)
        if self._stopping.is_set() or failure is None:
            return
        thread = compat.generation_thread(self._manager)
        if thread is not None:
            thread.join(timeout=60)  # it is failing its requests and exiting
        logger.warning("restarting the continuous-batching loop after: %s", failure)
        self.sampler.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._manager.start()

    def health(self) -> str | None:
        """None when the batch loop can serve; else why not. A crashed loop is restarted here first, so a
        health check revives it rather than reporting a fault the next request would have repaired."""
        if self._stopping.is_set():
            return "the continuous-batching loop is shutting down"
        try:
            self._restart_if_crashed()
        except Exception as error:  # noqa: BLE001 - reported, not raised: this is a health check
            return f"the continuous-batching loop could not be restarted ({type(error).__name__}: {error})"
        if not self._manager.is_running():
            return "the continuous-batching loop is not running"
        return None

    @property
    def speculation(self) -> SpeculationStats:
        """Draft tokens fed and kept since start (zeros when speculation is off)."""
        return SpeculationStats() if self.speculator is None else self.speculator.snapshot()

    @property
    def kv_cache_tokens(self) -> int | None:
        """The paged cache's capacity in tokens (None until the loop has built it, at its first request)."""
        return compat.kv_cache_tokens(self._manager)

    @property
    def batch_requests(self) -> int:
        """Requests in the batch now (read by the metrics when scraped)."""
        return compat.batch_requests(self._manager)

    @property
    def last_step_rows(self) -> int:
        return compat.last_step_rows(self._manager)

    @property
    def kv_cache_usage(self) -> float:
        return compat.kv_cache_usage(self._manager)

    @property
    def active_requests(self) -> int:
        with self._lock:
            return len(self._active)

    def _finish(self, request_id: str, event: DoneEvent, emissions: list[tuple[Job, Event]] | None = None) -> None:
        with self._lock:
            active = self._active.pop(request_id, None)
        if active is None:
            return
        self.sampler.release(request_id)
        events: list[Event] = [event]
        if active.quiet and event.error is None and event.reason is not FinishReason.CANCELLED and active.tokens:
            # Everything a quiet job produced, in one event before its end.
            events.insert(0, TokenEvent(tuple(active.tokens), tuple(active.logprobs)))
        if emissions is None:
            self._delivery.emit([(active.job, e) for e in events], urgent=True)
        else:
            emissions.extend((active.job, e) for e in events)

    def _step_logprobs(self, found: list[tuple[GenerationOutput, _Active | None]]) -> dict[str, list[TokenLogprob]]:
        """This step's logprob entries of the requests that asked for them, by request id: one per token the
        request produced in the step (several when it kept drafts), read in one host copy."""
        wanted: dict[str, list[int]] = {}
        for output, active in found:
            if active is not None and active.wants_logprobs:
                rows = self.sampler.rows_of(output.request_id)
                if rows:
                    wanted[output.request_id] = rows
        if not wanted:
            return {}
        by_row = self.sampler.read_logprobs([row for rows in wanted.values() for row in rows])
        return {request_id: [by_row[row] for row in rows] for request_id, rows in wanted.items()}

    def _on_output(
        self,
        output: GenerationOutput,
        active: _Active,
        emissions: list[tuple[Job, Event]],
        logprobs: dict[str, list[TokenLogprob]],
    ) -> bool:
        """On the manager's thread, for each new token of a streaming request and at its end: queue its events.
        True when they should reach the client without waiting: the request's first token, or its end."""
        job = active.job
        if output.error is not None:
            logger.error("job %d: batched generation failed: %s", job.id, output.error)
            if "out of memory" in output.error.lower():
                error: Exception = out_of_memory()
            else:
                error = GenerationFailed("Generation failed. Retry the request.")
            self._finish(output.request_id, DoneEvent(error=error), emissions)
            return True
        if job.cancelled.is_set():
            self._cancel(output.request_id)
            return False
        if self.sampler.rejected:
            rejected = self.sampler.rejected.pop(output.request_id, None)
            if rejected is not None:
                self._manager.cancel_request(output.request_id)
                self._finish(output.request_id, DoneEvent(error=rejected), emissions)
                return True
        tokens = output.generated_tokens
        new = tokens[active.forwarded :]
        first = active.forwarded == 0
        if new:
            if first:
                timestamps = output.timestamps  # a job the manager did not stream: when its first token came
                job.first_token_at = timestamps[0] if timestamps else time.perf_counter()
            active.forwarded = len(tokens)
            # A step gives one token, or several when the request kept drafts, each with its logprob entry. Should
            # the entries be fewer than the tokens, the earlier tokens go without, so that an event's entries always
            # match its tokens one for one.
            entries = logprobs.get(output.request_id, [])[-len(new) :]
            with_entries = new[len(new) - len(entries) :] if entries else []
            entries = [dataclasses.replace(entry, token_id=int(token)) for entry, token in zip(entries, with_entries)]
            if active.quiet:
                active.tokens = tokens
                active.logprobs.extend(entries)
            elif not entries:
                emissions.append((job, TokenEvent(tuple(new))))
            else:
                if len(new) > len(entries):
                    emissions.append((job, TokenEvent(tuple(new[: len(new) - len(entries)]))))
                emissions.append((job, TokenEvent(tuple(with_entries), tuple(entries))))
        if output.is_finished():
            ended = bool(tokens) and tokens[-1] in self._eos_token_ids
            slot = self.sampler.slot_of(output.request_id)
            if ended and slot is not None and self.sampler.faulted(slot):
                # The sampler ended this row because its parameters left no token to choose.
                event = DoneEvent(error=_no_token_left())
            else:
                event = DoneEvent(FinishReason.EOS if ended else FinishReason.LENGTH)
            self._finish(output.request_id, event, emissions)
            return True
        return first and bool(new) and not active.quiet  # a quiet job's first token goes nowhere yet

    def _cancel(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> None:
        self._manager.cancel_request(request_id)  # frees its pages at the next step
        self._finish(request_id, DoneEvent(reason))

    def _reap_cancelled(self) -> None:
        """Cancels requests whose client left (including ones still waiting for a batch slot), ends those past
        their ``max_time`` (finish reason "length", as generate()'s MaxTimeCriteria), and fails those the
        sampler rejected."""
        while not self._stopping.wait(_CANCEL_POLL_SECONDS):
            self._delivery.flush_due()  # tokens held back while no step came to deliver them
            now = time.monotonic()
            with self._lock:
                cancelled = [rid for rid, active in self._active.items() if active.job.cancelled.is_set()]
                expired = [
                    rid for rid, active in self._active.items() if active.deadline is not None and now > active.deadline
                ]
            for request_id in cancelled:
                self._cancel(request_id)
            for request_id in expired:
                self._cancel(request_id, FinishReason.LENGTH)
            # Requests the sampler could not take (a non-streaming one hears from the manager only at its end).
            for request_id in list(self.sampler.rejected):
                if (error := self.sampler.rejected.pop(request_id, None)) is not None:
                    self._manager.cancel_request(request_id)
                    self._finish(request_id, DoneEvent(error=error))

    # ---- sharing the model with generate() ----

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model alone: the batch loop is parked between two of its steps."""
        if not self._manager.is_running():
            yield
            return
        with self._manager.pause():
            yield

    def yield_to_batch(self, seconds: float = 0.0) -> None:
        """From inside ``exclusive()``: let the batch run (at least) one step, and more for about ``seconds`` while
        it has requests (a prompt scoring gives it as long as its chunk took), then take the model back."""
        if not self._manager.is_running() or not compat.holds_pause(self._manager) or not self.active_requests:
            return
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        deadline = time.monotonic() + seconds
        try:
            compat.hand_one_step_to_batch(self._manager)
            while time.monotonic() < deadline and self.active_requests and self._manager.is_running():
                compat.hand_one_step_to_batch(self._manager)
        finally:
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)

    def shutdown(self) -> None:
        self._stopping.set()
        if self._manager.is_running():
            self._manager.stop(block=True, timeout=30, hard_stop=True)
        with self._lock:
            leftovers = list(self._active)
        for request_id in leftovers:
            self._finish(request_id, DoneEvent(error=GenerationFailed("The server is shutting down.")))


def _no_token_left() -> InvalidRequest:
    return InvalidRequest(
        "The request's parameters excluded every token at some step (suppress_tokens, bad_words_ids, "
        "no_repeat_ngram_size, min_new_tokens and logit_bias together); relax them and retry."
    )
