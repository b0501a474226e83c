"""variants/*.yaml: one deployable file per checkpoint of the family, generated from one catalogue."""

from __future__ import annotations

from pathlib import Path

import pytest
from starcoder_serving.settings import ServingSettings
from truss.base.truss_config import TrussConfig
from truss.base.truss_spec import TrussSpec
from truss.contexts.image_builder.serving_image_builder import ServingImageBuilderContext

from devtools import variants
from devtools.family_catalogue import CATALOGUE, DEFAULT_VARIANT
from devtools.truss_local import REPO_ROOT, local_truss_copy

VARIANT_FILES = sorted((REPO_ROOT / "variants").glob("*.yaml"))
REQUIRED = {
    "starcoder",
    "starcoderbase-1b",
    "starcoderbase-3b",
    "starcoderbase-7b",
    "starcoder2-3b",
    "starcoder2-7b",
    "starcoder2-15b",
    "starcoder-gpteacher",
}
GPU_MEMORY_GB = {gpu.accelerator: gpu.memory_gb for gpu in variants.GPUS}


def test_every_catalogue_entry_has_its_file_and_the_required_ones_exist() -> None:
    names = {path.stem for path in VARIANT_FILES}
    assert names == {checkpoint.name for checkpoint in CATALOGUE}
    assert REQUIRED <= names


def test_the_committed_files_are_what_the_generator_writes() -> None:
    """Edit the catalogue, not a generated file: `python -m devtools.variants` rewrites them."""
    assert variants.main(["--check"]) == 0
    assert (REPO_ROOT / "config.yaml").read_text() == (REPO_ROOT / "variants" / f"{DEFAULT_VARIANT}.yaml").read_text()


@pytest.mark.parametrize("path", VARIANT_FILES, ids=lambda p: p.stem)
def test_variant_validates_and_its_checkpoint_agrees(path: Path) -> None:
    # What `truss push --config variants/<name>.yaml` loads: the truss directory is the repository root.
    spec = TrussSpec(REPO_ROOT, config_path=path)
    config: TrussConfig = spec.config
    config.validate_forbid_extra()  # what `truss push` checks before uploading
    assert (REPO_ROOT / config.model_module_dir / "model.py").is_file()
    (repo,) = config.model_cache.models
    metadata = config.model_metadata
    settings = ServingSettings.from_sources(metadata, environ={})
    # The checkpoint is named once for the build-time cache and once for load(): they must agree.
    assert repo.repo_id == settings.checkpoint
    assert settings.local_weights_dir == str(repo.runtime_path)
    assert repo.runtime_secret_name in config.secrets
    # Files the settings name exist in data/.
    for name in (settings.chat_template_file, settings.instruction_template_file):
        assert (REPO_ROOT / config.data_dir / name).is_file(), name
    # truss admits as many requests as the engine queues (else they would wait unseen in truss's queue).
    assert config.runtime.predict_concurrency == settings.max_queued_requests
    assert settings.max_batch_sequences <= settings.max_queued_requests


@pytest.mark.parametrize("checkpoint", CATALOGUE, ids=lambda c: c.name)
def test_sizing_fits_the_chosen_gpu(checkpoint: object) -> None:
    sizing = variants.size(checkpoint)  # type: ignore[arg-type]
    memory = GPU_MEMORY_GB[sizing.gpu.accelerator]
    # Weights + CUDA context + what the KV pages take + the rest left for activations <= the GPU.
    assert sizing.weights_gb + variants.CUDA_RESERVED_GB + sizing.free_gb == pytest.approx(memory)
    assert sizing.kv_gb < sizing.free_gb
    # The batch fits the cache at typical lengths; a full-window request always finds room.
    typical = sizing.shape.cached_tokens(variants.TYPICAL_TOKENS)
    assert sizing.max_batch_sequences * typical * sizing.kv_bytes_per_token <= sizing.kv_gb * 1e9
    assert sizing.full_window_sequences >= variants.MIN_FULL_WINDOW_SEQUENCES
    # Beam search's own cache (num_beams full windows) fits in what the KV pages leave over.
    beams_bytes = sizing.max_num_beams * sizing.full_window_tokens * sizing.kv_bytes_per_token
    assert beams_bytes <= (sizing.free_gb - sizing.kv_gb) * 1e9


def test_small_models_go_on_small_gpus_and_15b_ones_on_an_a100() -> None:
    chosen = {c.name: variants.size(c).gpu.accelerator for c in CATALOGUE}
    for name in ("starcoderbase-1b", "starcoderbase-3b", "starcoderbase-7b", "starcoder2-3b", "starcoder2-7b"):
        assert chosen[name] == "A10G", name
    for name in ("starcoder", "starcoder2-15b", "starcoder-gpteacher"):
        assert chosen[name] == "A100", name


@pytest.mark.parametrize("path", VARIANT_FILES, ids=lambda p: p.stem)
def test_truss_lays_out_each_variants_image(path: Path, tmp_path: Path) -> None:
    """`truss push --config` uploads the directory with the variant as its config.yaml: truss must build it."""
    truss_dir = local_truss_copy(tmp_path / "truss", config_path=path)
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    ServingImageBuilderContext.run(truss_dir).prepare_image_build_dir(build_dir)
    assert "COPY --chown=root:root ./packages /packages" in (build_dir / "Dockerfile").read_text()
    assert (
        TrussConfig.from_yaml(build_dir / "config.yaml").model_metadata["checkpoint"]
        == (TrussConfig.from_yaml(path).model_metadata["checkpoint"])
    )


def test_gpteacher_speaks_alpaca(tiny_model_dir: Path) -> None:
    """The fine-tune's chat turns and instructions both render as the Alpaca prompts it was trained on."""
    from starcoder_serving.engine.engine import Engine

    from tests.conftest import DATA_DIR, tiny_settings

    metadata = TrussSpec(
        REPO_ROOT, config_path=REPO_ROOT / "variants" / "starcoder-gpteacher.yaml"
    ).config.model_metadata
    overrides = {k: metadata[k] for k in ("chat_template_file", "chat_stop", "instruction_template_file")}
    engine = Engine.load(tiny_settings(tiny_model_dir, continuous_batching=False, **overrides), DATA_DIR)
    try:
        chat = engine.chat.render([{"role": "user", "content": "Reverse a list."}])
        instruction = engine.instructions.render("Reverse a list.", None)
        assert chat.text == instruction.text
        assert chat.text.endswith("### Instruction:\nReverse a list.\n\n### Response:")
        assert chat.implied_stop == instruction.implied_stop == ("\n### Instruction:",)
    finally:
        engine.shutdown()
