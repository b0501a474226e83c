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
