"""Continuous batching: every admitted request decodes in one shared batch over a paged KV cache.

Built on transformers' own ``ContinuousBatchingManager`` (``model.init_continuous_batching``): its
background thread schedules prefill and decode tokens of all active requests into one forward pass
per step, reading and writing K/V in fixed-size pages of a preallocated cache, so a finished or
cancelled request frees its pages for the next one immediately (no padding, no waiting for the
slowest sequence).

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
import logging
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.continuous_api import OutputRouter
from transformers.generation.continuous_batching.requests import GenerationOutput

from starcoder_serving.errors import GenerationFailed, Overloaded
from starcoder_serving.engine.jobs import DoneEvent, Event, FinishReason, Job, TokenEvent, emit_all

logger = logging.getLogger(__name__)

# Attention implementations that serve both a paged cache (batch) and a regular one (generate()).
_SHARED_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3", "kernels-community/flash-attn")

_CANCEL_POLL_SECONDS = 0.02


class _Active:
    __slots__ = ("forwarded", "job")

    def __init__(self, job: Job) -> None:
        self.job = job
        self.forwarded = 0


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
        emissions: list[tuple[Job, Event]] = []
        for output in outputs:
            self._worker._on_output(output, emissions)
        emit_all(emissions)  # one wake-up of the event loop per step, not one per request


class BatchedWorker:
    def __init__(
        self,
        model: Any,
        *,
        eos_token_ids: set[int],
        max_batch_sequences: int,
        max_batch_tokens: int | None,
        kv_num_blocks: int | None,
        kv_page_size: int,
        kv_memory_fraction: float | None,
        prefix_sharing: bool,
        cuda_graphs: bool = False,
        compile_level: int = 0,
    ) -> None:
        # Requests end at any of these (StarCoder2's <file_sep> too), as on the generate() path.
        self._eos_token_ids = sorted(eos_token_ids)
        # Placeholders (!= 1.0 / > 0) so the temperature, top-k and top-p warpers exist; every request
        # sends its own three values (routing.batched_sampling_kwargs), so these never apply.
        generation_config = GenerationConfig(
            do_sample=True, temperature=0.5, top_k=50, top_p=0.5, eos_token_id=self._eos_token_ids
        )
        cb_config = ContinuousBatchingConfig(
            page_size=kv_page_size,
            num_blocks=kv_num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_memory_percent=kv_memory_fraction,
            max_requests_per_batch=max_batch_sequences,
            allow_block_sharing=prefix_sharing,
            per_request_processors=True,
            drop_unsupported_processors=False,
            auto_switch_to_flash=False,
            use_cuda_graph=cuda_graphs,
            default_compile_level=compile_level,
        )
        self._manager = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb_config
        )
        attention = model.config._attn_implementation
        if attention not in _SHARED_ATTENTION:
            if self._manager.is_running():
                self._manager.stop(block=True)
            if self._manager._original_attn_impl is not None:
                model.set_attn_implementation(self._manager._original_attn_impl)
            raise ValueError(
                f"Continuous batching shares the model with generate() and needs attention that serves both "
                f"(one of {_SHARED_ATTENTION}); the model uses {attention!r}. Set attn_implementation to 'sdpa'."
            )
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._manager.output_router = _JobRouter(self)
        self._manager.start()
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap_cancelled, name="batch-cancel-watch", daemon=True)
        self._reaper.start()

    # ---- requests ----

    def submit(self, job: Job, sampling: dict[str, Any]) -> None:
        self._restart_if_crashed()
        request_id = f"job-{job.id}"
        with self._lock:
            self._active[request_id] = _Active(job)
        added = self._manager.add_request(
            input_ids=job.plan.prompt_ids,
            request_id=request_id,
            max_new_tokens=job.plan.max_new_tokens,
            streaming=True,
            eos_token_id=self._eos_token_ids,
            **sampling,
        )
        if added is None:
            self._finish(request_id, DoneEvent(error=GenerationFailed("The batch generator is not running. Retry.")))

    def _restart_if_crashed(self) -> None:
        """A fault in a batch step (e.g. CUDA OOM) fails that batch's requests and stops the manager's
        thread; the next request starts it again (same cache and scheduler, reset)."""
        status = self._manager.background_thread_status
        if self._stopping.is_set() or status.can_accept_new_requests() is None:
            return
        thread = self._manager._generation_thread
        if thread is not None:
            thread.join(timeout=60)  # it is failing its requests and exiting
        logger.warning("restarting the continuous-batching loop after: %r", status.fatal_error)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._manager.start()

    @property
    def active_requests(self) -> int:
        with self._lock:
            return len(self._active)

    def _finish(self, request_id: str, event: DoneEvent, emissions: list[tuple[Job, Event]] | None = None) -> None:
        with self._lock:
            active = self._active.pop(request_id, None)
        if active is None:
            return
        if emissions is None:
            active.job.emit(event)
        else:
            emissions.append((active.job, event))

    def _on_output(self, output: GenerationOutput, emissions: list[tuple[Job, Event]]) -> None:
        """On the manager's thread, for each new token of a streaming request and at its end: queue its events."""
        with self._lock:
            active = self._active.get(output.request_id)
        if active is None:  # cancelled already, or a late output
            return
        job = active.job
        if output.error is not None:
            logger.error("job %d: batched generation failed: %s", job.id, output.error)
            if "out of memory" in output.error.lower():
                error: Exception = Overloaded(
                    "The GPU ran out of memory for this request. Retry, or send a shorter prompt or fewer max_new_tokens."
                )
            else:
                error = GenerationFailed("Generation failed. Retry the request.")
            self._finish(output.request_id, DoneEvent(error=error), emissions)
            return
        if job.cancelled.is_set():
            self._cancel(output.request_id)
            return
        tokens = output.generated_tokens
        for token_id in tokens[active.forwarded :]:
            emissions.append((job, TokenEvent(int(token_id))))
        active.forwarded = max(active.forwarded, len(tokens))
        if output.is_finished():
            reason = FinishReason.EOS if tokens and tokens[-1] in self._eos_token_ids else FinishReason.LENGTH
            self._finish(output.request_id, DoneEvent(reason), emissions)

    def _cancel(self, request_id: str) -> None:
        self._manager.cancel_request(request_id)  # frees its pages at the next step
        self._finish(request_id, DoneEvent(FinishReason.CANCELLED))

    def _reap_cancelled(self) -> None:
        """Cancels requests whose client left, including ones still waiting for a batch slot."""
        while not self._stopping.wait(_CANCEL_POLL_SECONDS):
            with self._lock:
                cancelled = [rid for rid, active in self._active.items() if active.job.cancelled.is_set()]
            for request_id in cancelled:
                self._cancel(request_id)

    # ---- sharing the model with generate() ----

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the model alone: the batch loop is parked between two of its steps."""
        if not self._manager.is_running():
            yield
            return
        with self._manager.pause():
            yield

    def yield_to_batch(self) -> None:
        """From inside ``exclusive()``: let the batch run (at least) one step, then take the model back."""
        status = self._manager.background_thread_status
        if not self._manager.is_running() or not status.is_pause_requested(local=True) or not self.active_requests:
            return
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        status.release_pause()
        try:
            status.acquire_pause(self._manager._wake_up_loop)
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
