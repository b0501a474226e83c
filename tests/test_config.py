"""config.yaml is what Baseten builds: it must satisfy truss's own loader and lay out an image."""

from __future__ import annotations

import re
from pathlib import Path

import pydantic
import pytest
import yaml
from starcoder_serving.settings import ENV_OVERRIDES, ServingSettings, resolve_placement
from truss.base.truss_config import Accelerator, TrussConfig
from truss.contexts.image_builder.serving_image_builder import ServingImageBuilderContext
from truss.contexts.local_loader.docker_build_emulator import DockerBuildEmulator

from devtools.truss_local import REPO_ROOT, local_truss_copy

CONFIG_PATH = REPO_ROOT / "config.yaml"


def test_config_validates_with_truss() -> None:
    config = TrussConfig.from_yaml(CONFIG_PATH)
    assert config.resources.accelerator.accelerator == Accelerator.A100
    assert config.python_version == "py311"
    assert "hf_access_key" in config.secrets
    assert config.model_metadata["example_model_input"] == {"prompt": "def compute_fib(n):"}
    assert config.runtime.predict_concurrency >= 1
    # The weights are cached at build time, read with the same secret.
    (repo,) = config.model_cache.models
    assert repo.repo_id == "bigcode/starcoder" and repo.runtime_secret_name == "hf_access_key"
    assert ServingSettings.from_sources(config.model_metadata, environ={}).local_weights_dir == str(repo.runtime_path)


def test_requirements_are_pinned_exactly() -> None:
    requirements = TrussConfig.from_yaml(CONFIG_PATH).requirements
    names = {re.split(r"==", line)[0] for line in requirements}
    assert {"torch", "transformers", "accelerate", "safetensors", "huggingface_hub"} <= names
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.+]*", line) for line in requirements), requirements
    # The same pins as local development, so what is tested is what is deployed.
    dev_pins = {l.strip() for l in (REPO_ROOT / "requirements-dev.txt").read_text().splitlines() if "==" in l}
    assert set(requirements) <= dev_pins


def test_model_metadata_settings_are_valid() -> None:
    metadata = yaml.safe_load(CONFIG_PATH.read_text())["model_metadata"]
    settings = ServingSettings.from_sources(metadata, environ={})
    assert (settings.checkpoint, settings.dtype, settings.device) == ("bigcode/starcoder", None, None)
    # Unset, they follow the machine: the GPU deployment loads on CUDA in bfloat16.
    assert settings.resolved_placement(cuda_available=True) == ("cuda", "bfloat16")
    assert settings.context_window is None  # the checkpoint's own (n_positions: 8192)
    assert settings.default_max_new_tokens <= settings.max_new_tokens_cap


def test_environment_overrides_config() -> None:
    settings = ServingSettings.from_sources(
        {"checkpoint": "bigcode/starcoder", "local_weights_dir": "/app/model_cache/starcoder"},
        environ={"STARCODER_CHECKPOINT": "/tmp/tiny", "STARCODER_DEVICE": "cpu", "STARCODER_DTYPE": "float32"},
    )
    assert (settings.resolved_checkpoint(), settings.device, settings.dtype) == ("/tmp/tiny", "cpu", "float32")


@pytest.mark.parametrize(
    ("device", "dtype", "cuda_available", "expected"),
    [
        (None, None, True, ("cuda", "bfloat16")),
        (None, None, False, ("cpu", "float32")),
        ("auto", None, False, ("cpu", "float32")),
        ("auto", None, True, ("cuda", "bfloat16")),
        ("cpu", None, True, ("cpu", "float32")),
        ("cuda:1", None, True, ("cuda:1", "bfloat16")),
        (None, "float16", False, ("cpu", "float16")),
        ("cuda", "bfloat16", False, ("cuda", "bfloat16")),  # explicit values are kept, even where they fail
        ("cpu", "auto", False, ("cpu", "auto")),  # transformers' "auto": the checkpoint's own dtype
    ],
)
def test_placement_follows_the_machine_when_unset(
    device: str | None, dtype: str | None, cuda_available: bool, expected: tuple[str, str]
) -> None:
    assert resolve_placement(device, dtype, cuda_available) == expected
    environ = {k: v for k, v in {"STARCODER_DEVICE": device, "STARCODER_DTYPE": dtype}.items() if v}
    settings = ServingSettings.from_sources({}, environ=environ)
    assert settings.resolved_placement(cuda_available) == expected


# A value other than the default for every setting, as an environment variable spells it.
NON_DEFAULT: dict[str, tuple[str, object]] = {
    "checkpoint": ("/tmp/tiny", "/tmp/tiny"),
    "local_weights_dir": ("/tmp/weights", "/tmp/weights"),
    "dtype": ("float16", "float16"),
    "device": ("cpu", "cpu"),
    "attn_implementation": ("flash_attention_2", "flash_attention_2"),
    "context_window": ("1024", 1024),
    "context_token_budget": ("2048", 2048),
    "default_max_new_tokens": ("100", 100),
    "max_new_tokens_cap": ("4096", 4096),
    "max_num_return_sequences": ("3", 3),
    "max_num_beams": ("2", 2),
    "max_stop_sequences": ("3", 3),
    "max_stop_sequence_chars": ("64", 64),
    "max_queued_requests": ("16", 16),
    "continuous_batching": ("false", False),
    "max_batch_sequences": ("4", 4),
    "max_batch_tokens": ("512", 512),
    "kv_page_size": ("64", 64),
    "kv_num_blocks": ("32", 32),
    "kv_memory_fraction": ("0.5", 0.5),
    "prefix_sharing": ("0", False),
    "cuda_graphs": ("decode", "decode"),
    "compile_level": ("2", 2),
    "async_batching": ("true", True),
    "cpu_threads": ("3", 3),
    "stream_interval_ms": ("0.5", 0.5),
    "speculative_tokens": ("0", 0),
    "speculative_step_tokens": ("32", 32),
    "log_request_text": ("1", True),
    "instruction_template_file": ("other.json", "other.json"),
    "chat_template_file": ("other.jinja", "other.jinja"),
    "chat_stop": ('["\\nUser:", "\\n###"]', ("\nUser:", "\n###")),
    "end_tokens": ("[]", ()),
}


def test_every_setting_is_overridable_by_its_environment_variable() -> None:
    """Every field ``f`` is read from ``STARCODER_{F}`` over config.yaml's value; a tuple of strings as a JSON list."""
    assert set(NON_DEFAULT) == set(ServingSettings.model_fields), "give the new setting a value here"
    assert ENV_OVERRIDES == {f"STARCODER_{field.upper()}": field for field in ServingSettings.model_fields}
    defaults = ServingSettings()
    for field, (text, value) in NON_DEFAULT.items():
        assert getattr(defaults, field) != value, field
        name = f"STARCODER_{field.upper()}"
        metadata = {field: getattr(defaults, field)} if getattr(defaults, field) is not None else {}
        assert getattr(ServingSettings.from_sources(metadata, environ={name: text}), field) == value, name
    # All at once (the int, bool and tuple kinds together, as a deployment would set them).
    everything = {f"STARCODER_{field.upper()}": text for field, (text, _) in NON_DEFAULT.items()}
    settings = ServingSettings.from_sources({}, environ=everything)
    assert {field: getattr(settings, field) for field in NON_DEFAULT} == {f: v for f, (_, v) in NON_DEFAULT.items()}


@pytest.mark.parametrize(("text", "problem"), [("\\nHuman:", "is not valid JSON"), ('"\\nHuman:"', "is not a list")])
def test_a_tuple_setting_needs_a_json_list(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=f"STARCODER_CHAT_STOP must be a JSON list of strings.*{problem}"):
        ServingSettings.from_sources({}, environ={"STARCODER_CHAT_STOP": text})


def test_an_explicit_checkpoint_skips_the_build_time_cache_unless_the_cache_is_named_too() -> None:
    cached = {"local_weights_dir": "/app/model_cache/starcoder"}
    assert ServingSettings.from_sources(cached, environ={"STARCODER_CHECKPOINT": "/tmp/x"}).local_weights_dir is None
    both = {"STARCODER_CHECKPOINT": "/tmp/x", "STARCODER_LOCAL_WEIGHTS_DIR": "/tmp/cache"}
    assert ServingSettings.from_sources(cached, environ=both).local_weights_dir == "/tmp/cache"


@pytest.mark.parametrize(
    ("spelling", "paths"),
    [
        ("0", (False, False)),
        ("false", (False, False)),
        ("off", (False, False)),
        ("1", (True, True)),
        ("TRUE", (True, True)),
        ("both", (True, True)),
        ("varlen", (True, False)),
        ("decode", (False, True)),
        ("auto", None),
    ],
)
def test_cuda_graphs_switch_names_the_paths(spelling: str, paths: tuple[bool, bool] | None) -> None:
    """transformers' use_cuda_graph is (varlen, decode) or None (its own choice); the old boolean spellings still work."""
    settings = ServingSettings.from_sources({}, environ={"STARCODER_CUDA_GRAPHS": spelling})
    assert settings.graph_paths == paths


def test_a_misspelt_cuda_graphs_value_is_refused_with_the_choices() -> None:
    with pytest.raises(pydantic.ValidationError, match="'off', 'varlen', 'decode', 'both' or 'auto'"):
        ServingSettings.from_sources({}, environ={"STARCODER_CUDA_GRAPHS": "sometimes"})


def test_truss_lays_out_the_image_build_context(tmp_path: Path) -> None:
    """What `truss push` uploads, minus the hub lookup of model_cache (no internet here)."""
    truss_dir = local_truss_copy(tmp_path / "truss")
    assert not (truss_dir / ".venv").exists() and not (truss_dir / "tests").exists()  # .truss_ignore works
    build_dir, fs_dir = tmp_path / "build", tmp_path / "fs"
    build_dir.mkdir()
    fs_dir.mkdir()
    ServingImageBuilderContext.run(truss_dir).prepare_image_build_dir(build_dir)
    dockerfile = (build_dir / "Dockerfile").read_text()
    assert "COPY --chown=root:root ./packages /packages" in dockerfile
    for pin in TrussConfig.from_yaml(CONFIG_PATH).requirements:
        assert pin in (build_dir / "requirements.txt").read_text()
    DockerBuildEmulator(build_dir / "Dockerfile", build_dir).run(fs_dir)
    app = fs_dir / "app"
    assert (app / "main.py").is_file() and (app / "model" / "model.py").is_file()
    assert (app / "data" / "chat_template.jinja").is_file()
    assert (fs_dir / "packages" / "starcoder_serving" / "engine" / "engine.py").is_file()
