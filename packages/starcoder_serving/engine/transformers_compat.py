"""Every use of transformers internals (private attributes, unexported classes), in one place.

The continuous batch is built on transformers' ``ContinuousBatchingManager``. Where its public API
is enough (``init_continuous_batching``, ``add_request``, ``cancel_request``, ``pause``, ``start``,
``stop``) we use it directly; what it does not expose is reached only through the functions below,
each checked by a contract test (``tests/test_transformers_compat.py``) that names the pinned version,
so an upgrade that moves one of them fails loudly in CI instead of misbehaving in production.
"""

from __future__ import annotations

import threading
from typing import Any

import transformers
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.continuous_batching.continuous_api import OutputRouter
from transformers.generation.continuous_batching.requests import FutureRequestState, GenerationOutput
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

PINNED_TRANSFORMERS = "5.23.0"

# The names other modules import from here rather than from transformers' private modules.
BatchRequest = FutureRequestState  # a request as one batch step sees it (``.state`` is its RequestState)
__all__ = [
    "PINNED_TRANSFORMERS",
    "BaseStreamer",
    "BatchRequest",
    "ContinuousBatchingLogitsProcessor",
    "GenerationOutput",
    "OutputRouter",
    "attention_implementation",
    "batch_requests",
    "captures_steps",
    "count_prefix_hits",
    "default_generation_params",
    "generation_thread",
    "hand_one_step_to_batch",
    "holds_pause",
    "install_logits_processor",
    "install_output_router",
    "kv_cache_tokens",
    "kv_cache_usage",
    "last_step_rows",
    "loop_failure",
    "original_attention_implementation",
    "wake_up_event",
]


def installed_version() -> str:
    return transformers.__version__


def install_logits_processor(manager: Any, processor: ContinuousBatchingLogitsProcessor) -> None:
    """Make ``processor`` the manager's only logits processor, with one per-request tensor argument.

    Must run before ``manager.start()``: the batch processor is built from ``manager.logit_processor``
    when the loop starts. ``tensors_required`` is normally counted while converting transformers' own
    warpers; ours is added directly, so it is set here.
    """
    processors = ContinuousBatchingLogitsProcessorList(
        LogitsProcessorList([processor]), per_request_processors=False, drop_unsupported_processors=False
    )
    processors.tensors_required = 1
    manager.logit_processor = processors


def install_output_router(manager: Any, router: OutputRouter) -> None:
    """Replace the manager's router (before ``start()``): the stock one delivers each step's outputs to
    callbacks on *one* event loop, and our jobs each carry their own."""
    manager.output_router = router


def generation_thread(manager: Any) -> threading.Thread | None:
    """The manager's background thread (to join it after a crash before restarting)."""
    return manager._generation_thread


def wake_up_event(manager: Any) -> threading.Event:
    """The event that wakes the batch loop; needed to hand the loop one step between generate() steps."""
    return manager._wake_up_loop


def original_attention_implementation(manager: Any) -> str | None:
    """The attention the model had before the manager switched it to a paged variant (None: not switched)."""
    return manager._original_attn_impl


def attention_implementation(model: Any) -> str:
    return str(model.config._attn_implementation)


def default_generation_params(generation_config: Any) -> dict[str, Any]:
    """transformers' global generation defaults (top_k=50, ...) that generate() applies when unset."""
    return dict(generation_config._get_default_generation_params())


def loop_failure(manager: Any) -> str | None:
    """Why the batch loop stopped accepting requests (None while it runs); a crashed loop records its error."""
    status = manager.background_thread_status
    denial = status.can_accept_new_requests()
    return None if denial is None else f"{denial} ({status.fatal_error!r})"


def holds_pause(manager: Any) -> bool:
    """Whether this thread holds ``manager.pause()`` (the batch loop is parked for it)."""
    return bool(manager.background_thread_status.is_pause_requested(local=True))


def hand_one_step_to_batch(manager: Any) -> None:
    """From inside ``manager.pause()``: release the pause, let the loop run a step, and take it back."""
    status = manager.background_thread_status
    status.release_pause()
    status.acquire_pause(wake_up_event(manager))


def kv_cache_tokens(manager: Any) -> int | None:
    """Tokens the paged KV cache holds (blocks x page size); None until the loop has built its cache."""
    processor = manager.batch_processor
    if processor is None:
        return None
    return int(processor.cache.num_blocks * manager.continuous_batching_config.page_size)


def captures_steps(manager: Any) -> bool:
    """After ``warmup()``: whether the batch's steps are padded to fixed shapes and replayed as CUDA graphs or
    compiled (transformers turns graphs off where no graph backend exists, and may decide for "auto")."""
    return bool(manager.batch_processor.model_runner.pad_inputs)


# ---- what the metrics read (api/metrics.py, engine.py): at scrape time, from another thread, nothing per step ----


def batch_requests(manager: Any) -> int:
    """Requests in the batch (prefilling or decoding, holding cache pages); 0 before the loop built its processor."""
    processor = manager.batch_processor
    return 0 if processor is None else len(processor.scheduler.active_requests)


def last_step_rows(manager: Any) -> int:
    """Rows (requests) in the batch's last step."""
    processor = manager.batch_processor
    if processor is None:
        return 0
    return int(getattr(processor.inputs_and_outputs, "num_request_in_batch", 0))


def kv_cache_usage(manager: Any) -> float:
    """Used / total KV-cache capacity (pages, and the sectors that hold them), 0 before the cache exists. Pages kept
    only for prefix sharing count as free: the scheduler takes them back as soon as it needs them."""
    processor = manager.batch_processor
    if processor is None:
        return 0.0
    return max(0.0, min(1.0, 1.0 - float(processor.cache.compute_free_capacity(relative=True))))


_prefix_hit_listeners: list[Any] = []


def count_prefix_hits(listener: Any) -> None:
    """Call ``listener(tokens)`` with each prompt's tokens served from shared cache pages (prefix sharing): a wrapper
    around ``PagedAttentionCache.search_prefix_match``, which the scheduler calls once per request it schedules."""
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    if not _prefix_hit_listeners:
        search = PagedAttentionCache.search_prefix_match

        def counted(self: Any, request_id: str, prompt_ids: list[int]) -> int:
            matched = search(self, request_id, prompt_ids)
            if matched:
                for call in _prefix_hit_listeners:
                    call(matched)
            return matched

        PagedAttentionCache.search_prefix_match = counted  # type: ignore[method-assign]
    _prefix_hit_listeners.append(listener)
