"""Every use of transformers internals (private attributes, unexported classes), in one place.

The continuous batch is built on transformers' ``ContinuousBatchingManager``. Where its public API
is enough (``init_continuous_batching``, ``add_request``, ``cancel_request``, ``pause``, ``start``,
``stop``) we use it directly; what it does not expose is reached only through the functions below,
each checked by a contract test (``tests/test_transformers_compat.py``) that names the pinned version,
so an upgrade that moves one of them fails loudly in CI instead of misbehaving in production.
"""

from __future__ import annotations

import threading
from typing import Any, NamedTuple, Protocol

import torch
import transformers
from transformers.generation.continuous_batching.cb_logits_processors import (
    ContinuousBatchingLogitsProcessor,
    ContinuousBatchingLogitsProcessorList,
)
from transformers.generation.continuous_batching.continuous_api import OutputRouter
from transformers.generation.continuous_batching.requests import FutureRequestState, GenerationOutput, RequestStatus
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
    "install_step_hooks",
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


# ---- speculative decoding: several tokens of one request in a step (engine/speculation.py) ----


class DecodingRow(NamedTuple):
    """A decoding request as the drafter sees it before a step is scheduled (built per request and step: a tuple)."""

    request_id: str
    prompt: list[int]  # the prompt (plus tokens generated before an offload, which transformers folds into it)
    generated: list[int]  # its output so far; the last one is the token this step feeds in
    position: int  # tokens in its KV cache
    tokens_left: int  # new tokens it may still produce


class StepHooks(Protocol):
    """What ``install_step_hooks`` asks, on the batch thread, around each step."""

    def propose(self, rows: list[DecodingRow], token_room: int) -> dict[str, list[int]]:
        """Draft tokens per request id (at most ``token_room`` in all), fed in after the request's last token."""
        ...

    def scheduled(self, drafts: dict[str, list[int]]) -> None:
        """The drafts of the requests the step holds (read by the sampler when it lays out the step's rows)."""
        ...

    def extra_rows(self) -> list[tuple[str, int]]:
        """(request id, drafts) in the order of the logits rows the sampler added after the step's usual rows."""
        ...

    def verified(self, picks: list[int]) -> dict[str, int]:
        """After the step, from every logits row's pick (the manager's argmax): how many of each request's drafts
        are kept."""
        ...


def install_step_hooks(manager: Any, hooks: StepHooks) -> None:
    """Let a step feed a decoding request its last token *and* draft tokens, check them all in one forward pass,
    and keep the accepted ones (before ``start()``; synchronous batching only).

    transformers schedules a decoding request one token a step and samples one token per request at its last
    query position. Four places of one step are wrapped, on the batch processor the manager creates:

    * ``scheduler.schedule_batch``: drafts are appended to ``tokens_to_process`` of decoding requests (a request
      fed several tokens is scheduled like a prefill chunk: cache pages are allocated for all of them);
    * ``inputs_and_outputs.prepare_batch_tensors``: logits are also taken at each draft's position, as rows after
      the step's usual one-per-request rows;
    * ``inputs_and_outputs.get_model_kwargs``: those rows reach the forward and the logits processor, and the
      manager's argmax picks a token for each;
    * ``inputs_and_outputs.prepare_batch_update`` (the start of ``update_batch``): the hooks say from the picks how
      many drafts each request keeps; those are added to its output, its token for the manager to add is the pick
      after them, and its length is rolled back past the rejected ones, whose cache entries the next step
      overwrites (its pages stay with it, reused at its next step, freed at its end).
    """
    create = manager._create_batch_processor

    def create_hooked() -> Any:
        processor = create()
        if not getattr(processor, "_starcoder_step_hooks", False):
            _hook_processor(processor, hooks)
            processor._starcoder_step_hooks = True
        return processor

    manager._create_batch_processor = create_hooked


def _hook_processor(processor: Any, hooks: StepHooks) -> None:
    scheduler, io, cache = processor.scheduler, processor.inputs_and_outputs, processor.cache
    schedule_batch, prepare_batch_tensors = scheduler.schedule_batch, io.prepare_batch_tensors
    get_model_kwargs, update_batch = io.get_model_kwargs, processor.update_batch
    prepare_batch_update = io.prepare_batch_update
    # The logits rows of one step: the usual ones (at most max_requests_per_batch) then the drafts' (at most the
    # step's tokens). ``io.logits_indices`` is the start of a row of the bulk input tensor, max_batch_tokens + 1 wide.
    bulk = io._bulk_input_tensor
    index_row = next(bulk[i] for i in range(bulk.size(0)) if bulk[i].data_ptr() == io.logits_indices.data_ptr())
    # This step: its logits rows (0: no drafts), the drafts it feeds by request id, where each request's draft rows
    # start, and whether update_batch is reading its outputs.
    step: dict[str, Any] = {"rows": 0, "drafts": {}, "starts": {}, "updating": False, "starved": set()}

    def schedule(token_budget: int, cache_budget: int) -> Any:
        rows, room = _decoding_rows(scheduler, token_budget, cache_budget, step["starved"])
        drafts = hooks.propose(rows, room) if rows and room > 0 else {}
        states = scheduler.active_requests
        for request_id, tokens in drafts.items():
            states[request_id].tokens_to_process = [*states[request_id].tokens_to_process, *tokens]
        result = schedule_batch(token_budget, cache_budget)
        held: dict[str, list[int]] = {}
        if drafts:
            for future in result[0] or ():
                state = future.state
                tokens = drafts.pop(state.request_id, None)
                if tokens is None:
                    continue
                if state.remaining_prefill_tokens:
                    # Split by the token budget (drafting leaves room for every draft, so only a scheduler that puts
                    # prefill first does this): the drafts that did not fit are dropped, not prefilled later.
                    state.remaining_prefill_tokens = []
                    future.has_new_token = True
                    tokens = tokens[: future.query_length - 1]
                if tokens:
                    held[state.request_id] = tokens
            for request_id, tokens in drafts.items():  # not scheduled this step: back to their last token alone
                state = states.get(request_id)
                if state is not None:
                    del state.tokens_to_process[len(state.tokens_to_process) - len(tokens) :]
        # A request the cache could not take with its drafts drafts nothing next step: alone, its token may fit.
        step["starved"] = {state.request_id for state, _ in scheduler.starved_requests} if drafts else set()
        step["drafts"] = held
        hooks.scheduled(held)
        return result

    def prepare(*args: Any, **kwargs: Any) -> None:
        prepare_batch_tensors(*args, **kwargs)
        extra = hooks.extra_rows()
        if not extra:
            step["rows"] = 0
            return
        positions = io.req_id_to_new_token_position
        indices = [positions[request_id] - k + j for request_id, k in extra for j in range(k)]
        # After the rows of the requests with a new token (those of requests mid-prefill, past them, are not read).
        usual = len(positions)
        starts, start = {}, usual
        for request_id, k in extra:
            starts[request_id] = start
            start += k
        step["starts"] = starts
        index_row[usual : usual + len(indices)] = torch.tensor(indices, dtype=index_row.dtype)
        step["rows"] = usual + len(indices)

    def model_kwargs(use_padding: bool = False) -> Any:
        kwargs = get_model_kwargs(use_padding=use_padding)
        if step["rows"]:
            kwargs["logits_indices"] = index_row[: step["rows"]]
            kwargs["logits_processor_args"] = bulk[io.static_inputs :, : step["rows"]]
        return kwargs

    def batch_update() -> Any:
        requests, new_tokens, logprobs = prepare_batch_update()
        rows, drafts = step["rows"], step["drafts"]
        if not rows or not step["updating"]:  # also read to fail a batch (handle_batch_error): nothing to keep
            return requests, new_tokens, logprobs
        picks = io.output_ids[0, :rows].tolist()
        kept_counts = hooks.verified(picks)
        usual_row = {}  # request id -> its row among the step's usual ones (requests with a new token)
        for future in requests:
            if future.has_new_token:
                usual_row[future.state.request_id] = len(usual_row)
        for future in requests:
            state = future.state
            tokens = drafts.get(state.request_id)
            if tokens is None:
                continue
            kept = kept_counts.get(state.request_id, 0)
            row = usual_row[state.request_id]
            new_tokens[row] = picks[row] if kept == len(tokens) else picks[step["starts"][state.request_id] + kept]
            if state.status != RequestStatus.DECODING:
                continue
            past = state.position_offset - future.query_length
            # Pages completed by the kept tokens only (prefix sharing hashes them from the output).
            state.position_offset = past
            future.complete_blocks = cache.count_new_complete_blocks(state, 1 + kept)
            state.position_offset = past + 1 + kept
            for token in tokens[:kept]:  # never an end token: a drafted end is kept as the model's own pick
                state.update_and_check_completion(token, None)
        return requests, new_tokens, logprobs

    def update() -> None:
        step["updating"] = True
        try:
            update_batch()
        finally:
            step["updating"] = False
            step["rows"], step["drafts"] = 0, {}

    scheduler.schedule_batch = schedule
    io.prepare_batch_tensors = prepare
    io.get_model_kwargs = model_kwargs
    io.prepare_batch_update = batch_update
    processor.update_batch = update


def _decoding_rows(
    scheduler: Any, token_budget: int, cache_budget: int, starved: set[str]
) -> tuple[list[DecodingRow], int]:
    """The decoding requests a step may draft for, and the tokens left for drafts once every decoding request's
    own token and every waiting prefill (new prompts come first: their time to first token) is counted."""
    rows: list[DecodingRow] = []
    prefill = 0
    kv_read = 0
    for state in scheduler.active_requests.values():
        if state.status == RequestStatus.DECODING:
            kv_read += state.position_offset
            if (
                not state.is_cpu_offloaded
                and len(state.tokens_to_process) == 1
                and state.generated_tokens
                and state.request_id not in starved
            ):
                left = state._new_tokens_limit - len(state.generated_tokens)
                rows.append(
                    DecodingRow(
                        state.request_id, state.initial_tokens, state.generated_tokens, state.position_offset, left
                    )
                )
        else:
            prefill += len(state.remaining_prefill_tokens)
    if not scheduler.block_new_requests:
        prefill += sum(len(state.remaining_prefill_tokens) for state in scheduler.waiting_requests.values())
    room = token_budget - len(rows) - prefill
    # A step that feeds several tokens to a request reads the cache through the varlen path's bounded index.
    if kv_read + len(rows) + max(room, 0) > cache_budget:
        room = min(room, cache_budget - kv_read - len(rows))
    return rows, room
