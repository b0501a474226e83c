"""model/model.py as truss drives it: constructor kwargs, the weight-cache handshake, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.model import Model
from tests.conftest import DATA_DIR


class WeightCache:
    """Stands in for truss's LazyDataResolverV2, which needs Baseten's weight-pointer manifest to run."""

    def __init__(self) -> None:
        self.waited = 0

    def block_until_download_complete(self) -> str:
        self.waited += 1
        return ""


@pytest.fixture
def tiny_env(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STARCODER_CHECKPOINT", str(tiny_model_dir))
    monkeypatch.setenv("STARCODER_DEVICE", "cpu")
    monkeypatch.setenv("STARCODER_DTYPE", "float32")
    monkeypatch.setenv("STARCODER_CONTINUOUS_BATCHING", "false")  # one worker thread is enough here


def test_load_waits_for_the_weight_cache_before_loading(tiny_env: None) -> None:
    cache = WeightCache()
    model = Model(config={"model_metadata": {}}, data_dir=DATA_DIR, secrets={}, lazy_data_resolver=cache)
    assert cache.waited == 0  # nothing blocks in __init__
    model.load()
    assert cache.waited == 1


@pytest.mark.parametrize(("secrets", "expected"), [({}, None), ({"hf_access_key": "hf_abc\n"}, "hf_abc")])
def test_the_token_comes_from_the_hf_access_key_secret(secrets: dict[str, str], expected: str | None) -> None:
    model = Model(config={}, data_dir=DATA_DIR, secrets=secrets)
    assert model._hf_token() == expected


@pytest.fixture
def batching_env(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STARCODER_CHECKPOINT", str(tiny_model_dir))
    monkeypatch.setenv("STARCODER_DEVICE", "cpu")
    monkeypatch.setenv("STARCODER_DTYPE", "float32")


def loaded() -> Model:
    model = Model(config={"model_metadata": {}}, data_dir=DATA_DIR, secrets={})
    model.load()
    return model


def test_load_warms_up_both_paths_before_ready(batching_env: None) -> None:
    """The batch's KV cache exists before the first user request, and the warm-up is not counted as traffic."""
    model = loaded()
    engine = model._engine
    assert engine is not None
    try:
        assert engine.kv_cache_tokens is not None and engine.kv_cache_tokens > 0
        assert all(count == 0 for count in engine.routed.values()), engine.routed
        assert engine.requests_in_progress == 0 and model.is_healthy()
    finally:
        engine.shutdown()


def test_healthy_until_the_generate_worker_is_gone(batching_env: None) -> None:
    model = loaded()
    assert model.is_healthy()
    engine = model._engine
    assert engine is not None
    engine._worker.shutdown()
    engine._worker._thread.join(timeout=10)
    assert not model.is_healthy()
    assert "generate() worker" in (engine.health() or "")
    engine.shutdown()


def test_a_dead_batch_loop_is_restarted_and_unhealthy_only_if_that_fails(
    batching_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = loaded()
    engine = model._engine
    assert engine is not None and engine._batched is not None
    manager = engine._batched._manager
    manager.background_thread_status.record_fatal_error(RuntimeError("the loop crashed"))
    manager.stop(block=True, timeout=10)
    assert model.is_healthy() and manager.is_running()  # the health check restarted it
    manager.background_thread_status.record_fatal_error(RuntimeError("the loop crashed again"))
    manager.stop(block=True, timeout=10)

    def cannot_start() -> None:
        raise RuntimeError("no memory for the cache")

    monkeypatch.setattr(manager, "start", cannot_start)
    assert not model.is_healthy()
    assert "could not be restarted" in (engine.health() or "")
    monkeypatch.undo()
    engine.shutdown()


def test_an_unusable_device_is_unhealthy(batching_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    model = loaded()
    engine = model._engine
    assert engine is not None

    def poisoned() -> object:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    # A poisoned CUDA context cannot be made on a CPU; what the engine sees of it is that any device use raises.
    monkeypatch.setattr(engine.model, "get_output_embeddings", poisoned)
    assert not model.is_healthy()
    assert "illegal memory access" in (engine.health() or "")
    monkeypatch.undo()
    assert model.is_healthy()
    engine.shutdown()
