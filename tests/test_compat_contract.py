"""Contract tests for engine/transformers_compat.py: each transformers internal the batch relies on is
still there and behaves as used. A failure names the pinned and the installed version: an upgrade that
moved something fails here, in CI, instead of misbehaving in production."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from starcoder_serving.engine import transformers_compat as compat
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

from tests.conftest import DATA_DIR

VERSIONS = f"transformers {transformers.__version__} installed, {compat.PINNED_TRANSFORMERS} pinned"
REPO_ROOT = DATA_DIR.parent


def broken(what: str) -> str:
    return f"{VERSIONS}: {what}. Update engine/transformers_compat.py for this version."


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture
def manager(model: Any) -> Iterator[Any]:
    cb = ContinuousBatchingConfig(num_blocks=16, page_size=16, max_batch_tokens=64, max_requests_per_batch=4)
    built = model.init_continuous_batching(
        generation_config=GenerationConfig(do_sample=False, eos_token_id=[0]), continuous_batching_config=cb
    )
    yield built
    if built.is_running():
        built.stop(block=True, timeout=30)


def test_the_pin_is_what_the_project_installs() -> None:
    pins = (REPO_ROOT / "requirements-dev.txt").read_text() + (REPO_ROOT / "config.yaml").read_text()
    assert f"transformers=={compat.PINNED_TRANSFORMERS}" in pins
    assert transformers.__version__ == compat.PINNED_TRANSFORMERS, broken("the installed version is not the pin")


def test_install_logits_processor_makes_ours_the_only_one_with_one_tensor_argument(manager: Any) -> None:
    class Probe(compat.ContinuousBatchingLogitsProcessor):
        supported_kwargs = {"marker": int}  # noqa: RUF012 - transformers declares it as a class attribute
        ignored_kwargs = ()
        seen: list[int] = []  # noqa: RUF012

        def fill_defaults(self, int32_tensor: torch.Tensor) -> None:
            int32_tensor.fill_(-1)

        def prepare_tensor_args(self, requests_with_new_token: list[compat.BatchRequest]) -> torch.Tensor:
            Probe.seen.extend(r.state.logit_processor_kwargs["marker"] for r in requests_with_new_token)
            return torch.tensor([r.state.logit_processor_kwargs["marker"] for r in requests_with_new_token])

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            assert tensor_arg.dtype == torch.int32
            return scores

    compat.install_logits_processor(manager, Probe())
    assert manager.logit_processor.tensors_required == 1, broken("tensors_required is not how the list counts")
    manager.start()
    request_id = manager.add_request([5, 6, 7], max_new_tokens=2, marker=42)
    result = manager.get_result(request_id, timeout=60)
    assert result is not None and len(result.generated_tokens) == 2, broken("a request did not complete")
    assert 42 in Probe.seen, broken("per-request kwargs no longer reach prepare_tensor_args via state")


def test_install_output_router_receives_each_steps_outputs(manager: Any) -> None:
    delivered: list[compat.GenerationOutput] = []
    done = threading.Event()

    class Router(compat.OutputRouter):
        def deliver(self, output: compat.GenerationOutput) -> None:
            self.deliver_batch([output])

        def deliver_batch(self, outputs: list[compat.GenerationOutput]) -> None:
            delivered.extend(outputs)
            if any(o.is_finished() for o in outputs):
                done.set()

    compat.install_output_router(manager, Router())
    manager.start()
    manager.add_request([5, 6, 7], request_id="r", max_new_tokens=3, streaming=True)
    assert done.wait(60), broken("the manager no longer delivers through manager.output_router")
    assert [len(o.generated_tokens) for o in delivered] == [1, 2, 3], broken("streamed outputs changed shape")


def test_generation_thread_and_wake_up_event(manager: Any) -> None:
    manager.start()
    thread = compat.generation_thread(manager)
    assert isinstance(thread, threading.Thread) and thread.is_alive(), broken("manager._generation_thread")
    assert isinstance(compat.wake_up_event(manager), threading.Event), broken("manager._wake_up_loop")


def test_pause_hand_off_lets_the_loop_take_a_step(manager: Any) -> None:
    manager.start()
    with manager.pause():
        assert compat.holds_pause(manager), broken("background_thread_status.is_pause_requested(local=True)")
        request_id = manager.add_request([5, 6, 7], max_new_tokens=1)
        for _ in range(50):  # each hand-off lets the parked loop run at least one step
            compat.hand_one_step_to_batch(manager)
            if manager.output_router.output_queue.qsize():
                break
        assert compat.holds_pause(manager)
    assert manager.get_result(request_id, timeout=60) is not None, broken("release_pause / acquire_pause")


def test_loop_failure_reports_a_crashed_loop(manager: Any) -> None:
    manager.start()
    assert compat.loop_failure(manager) is None, broken("can_accept_new_requests() on a running loop")
    manager.background_thread_status.record_fatal_error(RuntimeError("boom"))
    manager.stop(block=True, timeout=30)
    failure = compat.loop_failure(manager)
    assert failure is not None and "boom" in failure, broken("fatal_error / can_accept_new_requests")


def test_attention_implementations(model: Any, manager: Any) -> None:
    assert compat.attention_implementation(model) == "sdpa", broken("config._attn_implementation")
    # sdpa serves the paged cache as it is: the manager did not switch it.
    assert compat.original_attention_implementation(manager) is None, broken("manager._original_attn_impl")


def test_default_generation_params(model: Any) -> None:
    defaults = compat.default_generation_params(model.generation_config)
    assert defaults.get("top_k") == 50 and defaults.get("temperature") == 1.0, broken(
        "GenerationConfig._get_default_generation_params"
    )


def test_base_streamer_is_what_generate_streams_to() -> None:
    assert hasattr(compat.BaseStreamer, "put") and hasattr(compat.BaseStreamer, "end"), broken("BaseStreamer")
