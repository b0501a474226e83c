"""Contract tests for ``engine/transformers_compat.py``: one per function, on a real manager.

Each function there reaches into transformers (a private attribute, an unexported class, a behaviour the
public API does not promise). Each test here checks that the thing it relies on still exists and still
behaves the way ``batch_worker.py`` / ``batch_sampler.py`` use it, on a real ``ContinuousBatchingManager``
built from the tiny model exactly as ``BatchedWorker`` builds it. A failure names the installed and the
pinned transformers version: an upgrade that moved something fails here, in CI, not in production.
"""

from __future__ import annotations

import inspect
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import transformers
from starcoder_serving.engine import transformers_compat as compat
from starcoder_serving.engine.jobs import GenerationPlan
from starcoder_serving.engine.sampling_params import SamplingParams
from starcoder_serving.engine.transformers_compat import PINNED_TRANSFORMERS
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching.requests import FutureRequestState

from tests.conftest import DATA_DIR

REPO_ROOT = DATA_DIR.parent
EOS = 0
CRASH = 13  # a prompt starting with this token makes the test processor raise inside the batch step


def broken(what: str) -> str:
    return (
        f"transformers {transformers.__version__} (pinned {PINNED_TRANSFORMERS}): {what}. "
        "Update engine/transformers_compat.py (and this test) for this version."
    )


def load_model(directory: Path, attention: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation=attention).eval()


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return load_model(tiny_model_dir, "sdpa")


def build_manager(model: Any) -> Any:
    """As BatchedWorker builds it (small cache: CPU)."""
    config = ContinuousBatchingConfig(
        page_size=16,
        num_blocks=32,
        max_batch_tokens=128,
        max_requests_per_batch=8,
        allow_block_sharing=False,
        per_request_processors=False,
        drop_unsupported_processors=False,
        use_async_batching=False,
        auto_switch_to_flash=False,
        use_cuda_graph=False,
    )
    return model.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, eos_token_id=[EOS]), continuous_batching_config=config
    )


@pytest.fixture
def manager(model: Any) -> Iterator[Any]:
    built = build_manager(model)
    yield built
    if built.is_running():
        built.stop(block=True, timeout=30)


def plan_for(prompt: list[int]) -> GenerationPlan:
    return GenerationPlan(prompt, SamplingParams(max_new_tokens=4))


class ForcingProcessor(compat.ContinuousBatchingLogitsProcessor):
    """Forces each request's next token to be its prompt's first token, through the per-row tensor argument
    (as BatchSampler passes slot numbers), and records what the manager hands it."""

    supported_kwargs: ClassVar[dict[str, type]] = {"plan": GenerationPlan}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.defaults_filled = 0
        self.prepared: list[tuple[str, list[int], list[int]]] = []  # request id, initial tokens, generated so far
        self.calls: list[tuple[tuple[int, ...], torch.dtype, torch.dtype, list[int]]] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        self.defaults_filled += 1
        int32_tensor.fill_(-1)

    def prepare_tensor_args(self, requests_with_new_token: list[compat.BatchRequest]) -> torch.Tensor:
        targets = []
        for request in requests_with_new_token:
            state = request.state
            self.prepared.append((state.request_id, list(state.initial_tokens), list(state.generated_tokens)))
            targets.append(state.logit_processor_kwargs["plan"].prompt_ids[0])
        return torch.tensor(targets, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        targets = tensor_arg[: scores.size(0)]
        self.calls.append((tuple(scores.shape), scores.dtype, tensor_arg.dtype, targets.tolist()))
        if (targets == CRASH).any():
            raise RuntimeError("boom from the logits processor")
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, targets.long().unsqueeze(-1), 0.0)


def result(manager: Any, request_id: str) -> Any:
    output = manager.get_result(request_id, timeout=60)
    assert output is not None, broken(f"request {request_id} never completed")
    return output


# ---- one test per function ----


def test_installed_version() -> None:
    assert compat.installed_version() == transformers.__version__
    assert compat.installed_version() == PINNED_TRANSFORMERS, broken("the installed version is not the pinned one")


def test_requirements_pin_the_compat_version() -> None:
    for name in ("requirements-dev.txt", "config.yaml"):
        text = (REPO_ROOT / name).read_text()
        pins = re.findall(r"^\s*(?:-\s*)?transformers==(\S+)\s*$", text, flags=re.MULTILINE)
        assert pins == [PINNED_TRANSFORMERS], (
            f"{name} pins transformers {pins}; transformers_compat pins {PINNED_TRANSFORMERS}"
        )


def test_install_logits_processor(manager: Any, model: Any) -> None:
    processor = ForcingProcessor()
    compat.install_logits_processor(manager, processor)
    processors = manager.logit_processor
    assert list(processors.logits_processor) == [processor], broken(
        "the manager's logit_processor list is not ours alone"
    )
    assert processors.tensors_required == 1 and processors.do_processing, broken(
        "ContinuousBatchingLogitsProcessorList.tensors_required / do_processing"
    )
    assert processors.supported_keys == {"plan": GenerationPlan}, broken("supported_kwargs are not collected")
    manager.start()
    # Two requests decoding together: row i of the scores and of the tensor argument is request i.
    prompts = {"a": [101, 5, 6, 7], "b": [202, 8, 9]}
    for request_id, prompt in prompts.items():
        manager.add_request(prompt, request_id=request_id, max_new_tokens=3, eos_token_id=[EOS], plan=plan_for(prompt))
    outputs = {request_id: result(manager, request_id) for request_id in prompts}
    for request_id, prompt in prompts.items():
        assert outputs[request_id].error is None, outputs[request_id].error
        assert outputs[request_id].generated_tokens == [prompt[0]] * 3, broken(
            "the manager no longer picks argmax of the scores our processor returns (greedy, do_sample=False)"
        )
    assert processor.defaults_filled >= 1, broken("fill_defaults is not called on the argument storage")
    assert processor.calls, broken("our processor was never called")
    for shape, scores_dtype, arg_dtype, targets in processor.calls:
        assert len(shape) == 2 and shape[1] == model.get_output_embeddings().weight.shape[0], broken("scores shape")
        assert scores_dtype == torch.float32 and arg_dtype == torch.int32, broken("scores / tensor_arg dtypes")
        assert set(targets) <= {101, 202}, broken("the tensor argument rows are not what prepare_tensor_args returned")
    # prepare_tensor_args sees each request's prompt and its tokens so far, step by step (the n-gram bans need them).
    seen_a = [generated for request_id, initial, generated in processor.prepared if request_id == "a"]
    assert all(initial == prompts[rid] for rid, initial, _ in processor.prepared), broken("state.initial_tokens")
    assert seen_a == [[], [101], [101, 101]], broken("state.generated_tokens before each step")
    # The manager type-checks the per-request keyword arguments against supported_kwargs.
    manager.add_request([5, 6], request_id="typed", max_new_tokens=2, plan="not a plan")
    failed = result(manager, "typed")
    assert failed.error is not None and "GenerationPlan" in failed.error, broken("supported_kwargs type check")


def test_install_output_router(manager: Any) -> None:
    delivered: list[compat.GenerationOutput] = []
    single: list[compat.GenerationOutput] = []
    finished = threading.Event()

    class Router(compat.OutputRouter):
        def deliver(self, output: compat.GenerationOutput) -> None:
            single.append(output)
            if output.is_finished():
                finished.set()

        def deliver_batch(self, outputs: list[compat.GenerationOutput]) -> None:
            delivered.extend(outputs)
            if any(output.is_finished() for output in outputs):
                finished.set()

    compat.install_output_router(manager, Router())
    compat.install_logits_processor(manager, ForcingProcessor())
    manager.start()
    manager.add_request(
        [42, 5], request_id="streamed", max_new_tokens=3, streaming=True, eos_token_id=[EOS], plan=plan_for([42, 5])
    )
    assert finished.wait(60), broken("the manager no longer delivers each step's outputs through manager.output_router")
    mine = [output for output in delivered if output.request_id == "streamed"]
    assert [output.generated_tokens for output in mine] == [[42], [42, 42], [42, 42, 42]], broken(
        "streamed outputs are no longer cumulative, one per step"
    )
    assert [output.is_finished() for output in mine] == [False, False, True], broken("GenerationOutput.is_finished")
    assert all(output.error is None for output in mine), broken("GenerationOutput.error on success")
    # A failed request reaches the router too (through deliver), with its error.
    finished.clear()
    manager.add_request([5], request_id="bad", max_new_tokens=2, streaming=True, plan=123)
    assert finished.wait(60), broken("a failed request is not delivered through the router")
    failures = [output for output in single + delivered if output.request_id == "bad"]
    assert failures and failures[-1].error and failures[-1].is_finished(), broken("failed output shape")


def test_generation_thread(manager: Any) -> None:
    assert compat.generation_thread(manager) is None, broken("manager._generation_thread before start()")
    manager.start()
    thread = compat.generation_thread(manager)
    assert isinstance(thread, threading.Thread) and thread.is_alive(), broken("manager._generation_thread")
    assert manager.is_running()
    manager.stop(block=True, timeout=30)
    thread.join(timeout=30)  # what BatchedWorker does to a crashed loop's thread before a restart
    assert not thread.is_alive(), broken("the loop's thread does not end on stop()")


def test_wake_up_event(manager: Any) -> None:
    event = compat.wake_up_event(manager)
    assert isinstance(event, threading.Event), broken("manager._wake_up_loop is gone or not an Event")
    assert compat.wake_up_event(manager) is event, broken("manager._wake_up_loop is replaced over time")
    compat.install_logits_processor(manager, ForcingProcessor())
    manager.start()
    # A parked-for-pause hand-off (hand_one_step_to_batch) passes this event to acquire_pause; adding a request sets it.
    event.clear()
    manager.add_request([7, 1], request_id="wake", max_new_tokens=1, eos_token_id=[EOS], plan=plan_for([7, 1]))
    assert result(manager, "wake").generated_tokens == [7]
    with manager.pause():  # acquire_pause(manager._wake_up_loop) under the hood: it must still be the same event
        assert compat.holds_pause(manager)


def test_original_attention_implementation(manager: Any, tiny_model_dir: Path) -> None:
    # sdpa serves both caches: the manager leaves it alone.
    assert compat.original_attention_implementation(manager) is None, broken("manager._original_attn_impl for sdpa")
    # eager is switched to paged|eager (which cannot run generate()); BatchedWorker refuses it and restores the model.
    eager = load_model(tiny_model_dir, "eager")
    switched = build_manager(eager)
    try:
        assert compat.original_attention_implementation(switched) == "eager", broken("manager._original_attn_impl")
        assert compat.attention_implementation(eager) == "paged|eager", broken(
            "eager is no longer switched to paged|eager"
        )
        eager.set_attn_implementation(compat.original_attention_implementation(switched))
        assert compat.attention_implementation(eager) == "eager"
    finally:
        if switched.is_running():
            switched.stop(block=True, timeout=30)


def test_attention_implementation(model: Any, tiny_model_dir: Path) -> None:
    assert compat.attention_implementation(model) == "sdpa", broken("model.config._attn_implementation")
    assert compat.attention_implementation(load_model(tiny_model_dir, "eager")) == "eager", broken(
        "model.config._attn_implementation"
    )


def test_default_generation_params(model: Any) -> None:
    defaults = compat.default_generation_params(model.generation_config)
    assert isinstance(defaults, dict)
    expected = {
        "top_k": 50,
        "top_p": 1.0,
        "temperature": 1.0,
        "repetition_penalty": 1.0,
        "num_beams": 1,
        "do_sample": False,
    }
    for name, value in expected.items():
        assert defaults.get(name) == value, broken(f"GenerationConfig._get_default_generation_params()[{name!r}]")
    # Why the function exists: a fresh GenerationConfig leaves these unset and generate() fills them in.
    assert GenerationConfig().top_k is None, broken("GenerationConfig() now sets top_k itself")
    defaults["top_k"] = 3
    assert compat.default_generation_params(model.generation_config)["top_k"] == 50, "a shared dict was returned"


def test_loop_failure(manager: Any) -> None:
    compat.install_logits_processor(manager, ForcingProcessor())
    manager.start()
    assert compat.loop_failure(manager) is None, broken("can_accept_new_requests() on a running loop")
    # A fault inside a batch step: the request fails, the loop stops and says why.
    manager.add_request([CRASH, 2], request_id="crash", max_new_tokens=2, eos_token_id=[EOS], plan=plan_for([CRASH, 2]))
    failed = result(manager, "crash")
    assert failed.error is not None and "boom" in failed.error, broken("a crashed step no longer fails its requests")
    thread = compat.generation_thread(manager)
    assert thread is not None
    thread.join(timeout=30)
    failure = compat.loop_failure(manager)
    assert failure is not None and "boom" in failure, broken("background_thread_status.fatal_error")
    # BatchedWorker restarts the same manager after a crash: start() clears the failure and it serves again.
    manager.start()
    assert compat.loop_failure(manager) is None, broken("start() no longer clears the fatal error")
    manager.add_request([9, 2], request_id="after", max_new_tokens=2, eos_token_id=[EOS], plan=plan_for([9, 2]))
    assert result(manager, "after").generated_tokens == [9, 9], broken("a restarted loop does not serve")
    # A loop stopped on purpose is also "not accepting" (BatchedWorker checks its own stopping flag first).
    manager.stop(block=True, timeout=30)
    assert compat.loop_failure(manager) is not None


def test_holds_pause(manager: Any) -> None:
    manager.start()
    assert not compat.holds_pause(manager)
    elsewhere: list[bool] = []
    with manager.pause():
        assert compat.holds_pause(manager), broken("background_thread_status.is_pause_requested(local=True)")
        # Local to the thread: another thread does not hold it (GenerateWorker asks from its own thread).
        other = threading.Thread(target=lambda: elsewhere.append(compat.holds_pause(manager)))
        other.start()
        other.join()
    assert elsewhere == [False], broken("is_pause_requested(local=True) is no longer per thread")
    assert not compat.holds_pause(manager), broken("the pause is still held after leaving manager.pause()")


def test_hand_one_step_to_batch(manager: Any) -> None:
    processor = ForcingProcessor()
    compat.install_logits_processor(manager, processor)
    manager.start()
    with manager.pause():
        manager.add_request([77, 3], request_id="stepped", max_new_tokens=4, eos_token_id=[EOS], plan=plan_for([77, 3]))
        time.sleep(0.3)
        assert not processor.calls, broken("the loop ran a step while this thread held the pause")
        hand_offs = 0
        while manager.output_router.output_queue.empty():
            compat.hand_one_step_to_batch(manager)
            hand_offs += 1
            assert compat.holds_pause(manager), broken("release_pause / acquire_pause left the pause released")
            assert hand_offs <= 100, broken("hand-offs no longer let the parked loop take steps")
        # Each hand-off is at least one step; 4 tokens need 4 steps (the first includes the prefill).
        assert len(processor.calls) >= 4
        steps_while_held = len(processor.calls)
        time.sleep(0.1)
        assert len(processor.calls) == steps_while_held, broken("the loop kept running after the hand-off")
    assert result(manager, "stepped").generated_tokens == [77] * 4


def test_kv_cache_tokens(manager: Any) -> None:
    assert compat.kv_cache_tokens(manager) is None, broken("a manager that has not started has a batch processor")
    manager.start()
    manager.add_request([5, 6, 7], request_id="sized", max_new_tokens=2, eos_token_id=[EOS])
    assert result(manager, "sized").error is None
    # build_manager: 32 blocks of 16 tokens.
    assert compat.kv_cache_tokens(manager) == 32 * 16, broken("batch_processor.cache.num_blocks x page_size")


def test_batch_requests(manager: Any) -> None:
    assert compat.batch_requests(manager) == 0, broken("batch_processor is None before the loop starts")
    manager.start()
    manager.add_request([5, 6, 7], request_id="counted", max_new_tokens=2, eos_token_id=[EOS])
    assert result(manager, "counted").error is None
    assert compat.batch_requests(manager) == 0, broken("batch_processor.scheduler.active_requests")


def test_last_step_rows(manager: Any) -> None:
    assert compat.last_step_rows(manager) == 0
    manager.start()
    manager.add_request([5, 6, 7], request_id="rows", max_new_tokens=2, eos_token_id=[EOS])
    assert result(manager, "rows").error is None
    assert compat.last_step_rows(manager) == 1, broken("batch_processor.inputs_and_outputs.num_request_in_batch")


def test_kv_cache_usage(manager: Any) -> None:
    assert compat.kv_cache_usage(manager) == 0.0
    manager.start()
    manager.add_request(list(range(5, 45)), request_id="used", max_new_tokens=2, eos_token_id=[EOS])
    assert result(manager, "used").error is None
    usage = compat.kv_cache_usage(manager)
    assert 0.0 <= usage <= 1.0, broken("cache.compute_free_capacity(relative=True)")


def test_count_prefix_hits(model: Any) -> None:
    """Prefix sharing on: the second request with a prompt of three full pages is served two of them."""
    hits: list[int] = []
    compat.count_prefix_hits(hits.append)
    config = ContinuousBatchingConfig(
        page_size=16, num_blocks=32, max_batch_tokens=128, allow_block_sharing=True, use_cuda_graph=False
    )
    built = model.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, eos_token_id=[EOS]), continuous_batching_config=config
    )
    built.start()
    try:
        prompt = list(range(5, 5 + 3 * 16 + 3))
        for name in ("first", "second"):
            built.add_request(prompt, request_id=name, max_new_tokens=2, eos_token_id=[EOS])
            assert result(built, name).error is None
    finally:
        built.stop(block=True, timeout=30)
    assert hits and hits[-1] >= 16, broken(f"PagedAttentionCache.search_prefix_match reported {hits}")


def test_captures_steps(model: Any) -> None:
    """Graphs asked for on a CPU: transformers' warm-up builds the batch processor and turns them off."""
    config = ContinuousBatchingConfig(page_size=16, num_blocks=8, max_batch_tokens=32, use_cuda_graph=True)
    built = model.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, eos_token_id=[EOS]), continuous_batching_config=config
    )
    built.warmup()
    assert compat.captures_steps(built) is False, broken("batch_processor.model_runner.pad_inputs")


class _DraftHooks:
    """Drafts the next tokens of a known greedy continuation (right, or each one off by one), and keeps all of
    them (right) or none (wrong), as the sampler would report."""

    def __init__(self, continuation: list[int], wrong: bool, vocab_size: int) -> None:
        self.continuation = continuation
        self.wrong = wrong
        self.vocab_size = vocab_size
        self.step: dict[str, list[int]] = {}
        self.proposed: list[tuple[int, int, int]] = []  # (generated so far, position in the cache, room)
        self.picks: list[list[int]] = []

    def propose(self, rows: list[compat.DecodingRow], token_room: int) -> dict[str, list[int]]:
        (row,) = rows
        self.proposed.append((len(row.generated), row.position, token_room))
        done = len(row.generated)
        drafts = self.continuation[done : done + min(3, row.tokens_left - 1)]
        if self.wrong:
            drafts = [(token + 1) % self.vocab_size for token in drafts]
        return {row.request_id: drafts} if drafts else {}

    def scheduled(self, drafts: dict[str, list[int]]) -> None:
        self.step = drafts

    def extra_rows(self) -> list[tuple[str, int]]:
        return [(request_id, len(tokens)) for request_id, tokens in self.step.items()]

    def verified(self, picks: list[int]) -> dict[str, int]:
        self.picks.append(picks)
        return {request_id: 0 if self.wrong else len(tokens) for request_id, tokens in self.step.items()}


class _RowsProcessor(compat.ContinuousBatchingLogitsProcessor):
    """Records the rows of each step, and leaves them as they are (the manager's argmax picks each row's token)."""

    supported_kwargs: ClassVar[dict[str, type]] = {"plan": GenerationPlan}
    ignored_kwargs: tuple[str, ...] = ()

    def __init__(self, hooks: _DraftHooks) -> None:
        self.hooks = hooks
        self.rows: list[torch.Tensor] = []

    def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
        int32_tensor.fill_(0)

    def prepare_tensor_args(self, requests_with_new_token: list[compat.BatchRequest]) -> torch.Tensor:
        extra = sum(k for _, k in self.hooks.extra_rows())
        return torch.arange(len(requests_with_new_token) + extra, dtype=torch.int32)

    def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
        self.rows.append(scores.clone())
        return scores


@pytest.mark.parametrize("wrong", [False, True], ids=["drafts-kept", "drafts-rejected"])
def test_install_step_hooks(model: Any, wrong: bool) -> None:
    """A decoding request fed drafts gets logits at every draft position (the model's own predictions there, whose
    picks the hooks see), keeps the drafts the hooks accept and then the pick after them, and its cache is rolled
    back past the others: the output is the plain greedy one whether every draft is kept or every one rejected."""
    prompt = [5, 9, 17, 3, 44, 2, 8]
    plain = build_manager(model)
    plain.start()
    try:
        plain.add_request(input_ids=prompt, request_id="plain", max_new_tokens=12)
        expected = result(plain, "plain").generated_tokens
    finally:
        plain.stop(block=True, timeout=30)
    assert len(expected) == 12, "the reference ended early: pick another prompt"

    hooks = _DraftHooks(expected, wrong, model.config.vocab_size)
    processor = _RowsProcessor(hooks)
    manager = build_manager(model)
    compat.install_logits_processor(manager, processor)
    compat.install_step_hooks(manager, hooks)
    manager.start()
    try:
        manager.add_request(input_ids=prompt, request_id="drafted", max_new_tokens=12, plan=plan_for(prompt))
        output = result(manager, "drafted")
    finally:
        manager.stop(block=True, timeout=30)
    assert output.error is None, output.error
    assert output.generated_tokens == expected, broken("a request fed drafts no longer decodes as it would alone")
    drafted = [rows for rows in processor.rows if rows.size(0) > 1]
    assert drafted, broken("no step fed drafts: the scheduler hook is not called")
    assert [len(picks) for picks in hooks.picks] == [rows.size(0) for rows in drafted], "the hooks saw other picks"
    assert hooks.proposed[0][2] > 0, "the first decoding step had no room for drafts"
    if not wrong:
        # Each extra row is the prediction after one more draft: its argmax is the draft that follows.
        first = drafted[0].argmax(dim=-1).tolist()
        done = hooks.proposed[0][0]
        assert first[1:] == expected[done : done + len(first) - 1], broken("draft rows are not at draft positions")
        assert len(processor.rows) < 12, "keeping every draft took as many steps as plain decoding"
    # The cache length the hooks see grows by what was kept (plus one), never by the rejected drafts.
    positions = [position for _, position, _ in hooks.proposed]
    generated = [count for count, _, _ in hooks.proposed]
    assert [p - g for p, g in zip(positions, generated)] == [len(prompt) - 1] * len(positions), broken(
        "a rejected draft's cache entry was not rolled back"
    )


def test_reexported_classes() -> None:
    assert compat.BatchRequest is FutureRequestState, broken("FutureRequestState moved")
    assert {"state", "has_new_token"} <= set(FutureRequestState.__slots__), broken("FutureRequestState.state")
    for name in ("fill_defaults", "prepare_tensor_args", "__call__"):
        assert name in compat.ContinuousBatchingLogitsProcessor.__abstractmethods__, broken(
            f"ContinuousBatchingLogitsProcessor.{name} is no longer the extension point"
        )
    for name in ("deliver", "deliver_batch", "fail_and_deliver"):
        assert callable(getattr(compat.OutputRouter, name, None)), broken(f"OutputRouter.{name}")
    fields = set(compat.GenerationOutput.__dataclass_fields__)
    assert {"request_id", "generated_tokens", "error"} <= fields, broken("GenerationOutput fields")
    assert callable(getattr(compat.BaseStreamer, "put", None)) and callable(
        getattr(compat.BaseStreamer, "end", None)
    ), broken("BaseStreamer.put / end")


def test_every_compat_function_has_a_contract_test() -> None:
    functions = [
        name
        for name, value in vars(compat).items()
        if inspect.isfunction(value) and value.__module__ == compat.__name__ and not name.startswith("_")
    ]
    assert functions, "no functions found in transformers_compat"
    missing = [name for name in functions if f"test_{name}" not in globals()]
    assert not missing, f"transformers_compat functions without a contract test here: {missing}"
    exported = set(compat.__all__)
    assert set(functions) - {"installed_version"} <= exported, set(functions) - exported
