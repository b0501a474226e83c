"""Generate ``config.yaml`` and ``variants/<name>.yaml``, one per checkpoint of the family, from one catalogue.

Every number a variant file carries that depends on the model (accelerator, KV-cache budget, batch and queue
sizes, beam limit, host memory) is computed here from the checkpoint's shape, with the arithmetic written
into the file's comments. Edit ``devtools/family_catalogue.py`` or the policy below, then run

    python -m devtools.variants            # rewrite the files
    python -m devtools.variants --check    # exit 1 if a committed file differs from what would be written

(the test suite runs the check). The root ``config.yaml`` is the ``starcoder`` variant, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pydantic
from starcoder_serving.family.shape import ModelShape

from devtools.family_catalogue import CATALOGUE, DEFAULT_VARIANT, KnownCheckpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
VARIANTS_DIR = REPO_ROOT / "variants"
GB = 1e9
BF16_BYTES = 2

# ---- the sizing policy ----
# Left free on any GPU after loading: CUDA context, cuBLAS workspaces, allocator fragmentation.
CUDA_RESERVED_GB = 1.5
# Share of the memory left after loading that becomes KV-cache pages; the rest holds activations, the batch's
# vocabulary-sized logits, the batch sampler's per-request state and the beam-search path's own cache.
KV_MEMORY_FRACTION = 0.8
# A typical code-completion request: a 1.5k-token prompt and 256 new tokens.
TYPICAL_TOKENS = 1536 + 256
# A variant goes on the smallest GPU whose cache holds this many full-window sequences at once.
MIN_FULL_WINDOW_SEQUENCES = 16
MAX_BATCH_SEQUENCES = 128
MAX_BEAMS = 8
MAX_BATCH_TOKENS = 2048


class Gpu(pydantic.BaseModel):
    accelerator: str  # truss's name
    memory_gb: float
    bandwidth_gbs: int


# Smallest first. An L4 has the A10G's 24 GB at half its memory bandwidth (decode speed), so the A10G is
# named and an L4 fits wherever an A10G does.
GPUS: tuple[Gpu, ...] = (
    Gpu(accelerator="A10G", memory_gb=24, bandwidth_gbs=600),
    Gpu(accelerator="A100", memory_gb=80, bandwidth_gbs=2039),
)


def host_resources(weights_gb: float) -> tuple[str, str]:
    """CPU count and memory of the replica: 1.5x the weights (the load is memory-mapped through the page
    cache, plus the tokenizer and server), in the sizes Baseten's instance types come in."""
    for memory_gi, cpu in ((16, "4"), (32, "8"), (64, "8")):
        if weights_gb * 1.5 <= memory_gi:
            return cpu, f"{memory_gi}Gi"
    return "16", "128Gi"


class Sizing(pydantic.BaseModel):
    """What a variant needs, and the numbers behind it."""

    shape: ModelShape
    parameters: int
    gpu: Gpu
    weights_gb: float
    free_gb: float
    kv_gb: float
    kv_bytes_per_token: int
    cache_tokens: int
    full_window_tokens: int  # what one full-context sequence keeps in the cache
    full_window_sequences: int
    typical_sequences: int
    max_batch_sequences: int
    max_queued_requests: int
    max_num_beams: int
    sampler_state_gb: float
    cpu: str
    host_memory: str


def count_parameters(checkpoint: KnownCheckpoint) -> int:
    """Exact, from the architecture: the model is built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(checkpoint.config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def size(checkpoint: KnownCheckpoint) -> Sizing:
    shape = ModelShape.from_config(checkpoint.config)
    parameters = count_parameters(checkpoint)
    weights_gb = parameters * BF16_BYTES / GB
    per_token = shape.kv_bytes_per_token(BF16_BYTES)
    full_window_tokens = shape.cached_tokens(shape.context_window)
    for gpu in GPUS:
        free_gb = gpu.memory_gb - weights_gb - CUDA_RESERVED_GB
        if free_gb <= 0:
            continue
        kv_gb = free_gb * KV_MEMORY_FRACTION
        cache_tokens = int(kv_gb * GB // per_token)
        full_sequences = cache_tokens // full_window_tokens
        if full_sequences >= MIN_FULL_WINDOW_SEQUENCES or gpu is GPUS[-1]:
            break
    typical_sequences = cache_tokens // shape.cached_tokens(TYPICAL_TOKENS)
    batch = min(MAX_BATCH_SEQUENCES, typical_sequences // 8 * 8)
    # Waiting requests hold no cache: admit twice what decodes at once, so a freed slot is filled at once.
    queued = 2 * batch
    # Beam search runs beside the batch on its own cache: half of what the KV pages leave over.
    beam_budget = (free_gb - kv_gb) / 2 * GB
    beams = max(1, min(MAX_BEAMS, int(beam_budget // (full_window_tokens * per_token))))
    return Sizing(
        shape=shape,
        parameters=parameters,
        gpu=gpu,
        weights_gb=weights_gb,
        free_gb=free_gb,
        kv_gb=kv_gb,
        kv_bytes_per_token=per_token,
        cache_tokens=cache_tokens,
        full_window_tokens=full_window_tokens,
        full_window_sequences=full_sequences,
        typical_sequences=typical_sequences,
        max_batch_sequences=batch,
        max_queued_requests=queued,
        max_num_beams=beams,
        # batch_sampler.py: (2 x max_queued + 1) slots x vocabulary x 12 bytes.
        sampler_state_gb=(2 * queued + 1) * shape.vocab_size * 12 / GB,
        cpu=host_resources(weights_gb)[0],
        host_memory=host_resources(weights_gb)[1],
    )


def _yaml_value(value: object) -> str:
    # JSON is valid YAML, and quotes every string that YAML could misread.
    return json.dumps(value, ensure_ascii=False)


def render(checkpoint: KnownCheckpoint, sizing: Sizing) -> str:
    shape, gpu = sizing.shape, sizing.gpu
    gate = (
        "the model is gated: accept its licence on huggingface.co first"
        if checkpoint.gated
        else "not gated; needed only for a private or gated fork"
    )
    window = (
        f"{shape.context_window:,}-token context, {shape.sliding_window:,}-token sliding window (a sequence "
        f"keeps at most {shape.sliding_window:,} tokens of cache)"
        if shape.sliding_window
        else f"{shape.context_window:,}-token context"
    )
    patterns = "\n".join(f'      - "{p}"' for p in ("*.json", *checkpoint.weight_patterns, "*.txt"))
    extra = "".join(f"  {key}: {_yaml_value(value)}\n" for key, value in checkpoint.metadata.items())
    beams_note = (
        ""
        if sizing.max_num_beams == MAX_BEAMS
        else (
            f"  # Beam search keeps num_beams full-window caches of its own beside the batch: half the "
            f"{sizing.free_gb - sizing.kv_gb:.1f} GB\n  # the KV pages leave over holds {sizing.max_num_beams} x "
            f"{sizing.full_window_tokens:,} tokens x {sizing.kv_bytes_per_token / 1024:g} KiB.\n"
            f"  max_num_beams: {sizing.max_num_beams}\n"
        )
    )
    return f"""\
# Generated by `python -m devtools.variants` from devtools/family_catalogue.py: edit those, not this file.
# Deploy: truss push{"" if checkpoint.name == DEFAULT_VARIANT else f" --config variants/{checkpoint.name}.yaml"}
# {checkpoint.summary}
# {checkpoint.hub_id}: {shape.model_type}, {sizing.parameters / 1e9:.2f}B parameters, {window}.
model_name: {checkpoint.model_name}
description: {checkpoint.model_name} code completion with streaming, fill-in-the-middle and OpenAI-compatible routes.
python_version: py311
model_class_name: Model
model_module_dir: model
bundled_packages_dir: packages
data_dir: data

resources:
  # bf16 weights: {sizing.parameters / 1e9:.2f}B x 2 bytes = {sizing.weights_gb:.1f} GB; on the {gpu.memory_gb:g} GB \
{gpu.accelerator}, {sizing.free_gb:.1f} GB stay free
  # after loading (less {CUDA_RESERVED_GB:g} GB for the CUDA context): the smallest GPU whose KV cache holds \
{MIN_FULL_WINDOW_SEQUENCES}+ full-window sequences.
  accelerator: {gpu.accelerator}
  use_gpu: true
  cpu: "{sizing.cpu}"
  memory: {sizing.host_memory}  # 1.5 x the weights: the load is memory-mapped; headroom for the tokenizer and server

secrets:
  hf_access_key: null        # {gate}

# Fetched at build time into /app/model_cache/{checkpoint.name}, so a replica's cold start reads local files
# instead of downloading {sizing.weights_gb:.0f} GB. `load()` prefers this directory (model_metadata.local_weights_dir).
model_cache:
  - repo_id: {checkpoint.hub_id}
    revision: main
    use_volume: true
    volume_folder: {checkpoint.name}
    runtime_secret_name: hf_access_key
    allow_patterns:
{patterns}

requirements:
  - torch==2.13.0
  - transformers==5.23.0
  - accelerate==1.15.0
  - safetensors==0.8.0
  - tokenizers==0.23.3
  - huggingface_hub==2.4.0
  - pydantic==2.14.3

model_metadata:
  example_model_input: {_yaml_value(checkpoint.example_input)}
  checkpoint: {checkpoint.hub_id}
  local_weights_dir: /app/model_cache/{checkpoint.name}
  # device and dtype are left unset: they follow the machine at load (settings.py, resolve_placement), CUDA in
  # bfloat16 on this file's GPU, the CPU in float32 where torch sees none (STARCODER_CHECKPOINT=... make serve
  # on a laptop). STARCODER_DEVICE / STARCODER_DTYPE (or keys here) pin them.
  attn_implementation: sdpa
  # The context window, end tokens and FIM tokens are read from the checkpoint at load (family/profile.py).
  default_max_new_tokens: 256
  max_new_tokens_cap: 2048
{extra}  # Continuous batching (transformers' ContinuousBatchingManager, paged KV cache): concurrent
  # requests share every forward pass. Every request but beam search joins the batch (with
  # async_batching on, also those that need their last token on the host); the routing table is in
  # packages/starcoder_serving/engine/path_choice.py. The others run one at a time through
  # model.generate(), interleaved step by step with the batch.
  # STARCODER_CONTINUOUS_BATCHING=0 sends everything through generate() (the one-at-a-time baseline).
  continuous_batching: true
  # KV cache: {shape.kv_arithmetic(BF16_BYTES)}.
  # kv_memory_fraction {KV_MEMORY_FRACTION:g} of the {sizing.free_gb:.1f} GB free = {sizing.kv_gb:.1f} GB of pages \
= {sizing.cache_tokens:,} tokens:
  # {sizing.full_window_sequences:,} full-window sequences ({sizing.full_window_tokens:,} tokens) or \
{sizing.typical_sequences:,} typical ones ({TYPICAL_TOKENS:,} tokens: 1.5k prompt + 256 new) at once.
  # The other {sizing.free_gb - sizing.kv_gb:.1f} GB hold activations, the batch's logits \
({MAX_BATCH_TOKENS} tokens x {shape.vocab_size:,} x 4 bytes = {MAX_BATCH_TOKENS * shape.vocab_size * 4 / GB:.2f} GB),
  # the batch sampler's state ((2 x {sizing.max_queued_requests} + 1) slots x {shape.vocab_size:,} x 12 bytes \
= {sizing.sampler_state_gb:.2f} GB) and the beam-search path's cache.
  kv_memory_fraction: {KV_MEMORY_FRACTION:g}
  kv_page_size: 256          # tokens per page: small pages waste < 1 page per sequence
  # Sequences decoded in one step: what the cache holds of typical requests ({sizing.typical_sequences:,}), \
at most {MAX_BATCH_SEQUENCES}.
  # Decode is memory-bound up to a few hundred sequences, so a full batch costs about what one sequence does.
  max_batch_sequences: {sizing.max_batch_sequences}
  # Requests admitted (decoding + waiting for a slot); past this the server answers 503. Twice the batch:
  # waiting requests hold no cache, and a finished sequence's slot is refilled at once.
  max_queued_requests: {sizing.max_queued_requests}
  # Query tokens per forward (decode tokens + chunked prefill): bounds the activation/logits peak
  # while letting long prompts prefill in chunks.
  max_batch_tokens: {MAX_BATCH_TOKENS}
{beams_note}  prefix_sharing: true       # identical prompt prefixes (system prompts, FIM headers) share KV pages
  # Per-step overheads: CUDA graphs (off / varlen / decode / both / auto), transformers' double-buffered
  # loop, torch.compile. Off until measured on a GPU: bench/gpu_device.sh measures each alone
  # (docs/benchmarks.md, "GPU"); the settings that win go here with their figures.
  cuda_graphs: "off"
  async_batching: false
  compile_level: 0
  # Speculative decoding (engine/speculation.py): up to this many draft tokens per request and step, looked up in
  # the request's own prompt and output and checked in the same forward pass; the output is unchanged. 0: off
  # (also STARCODER_SPECULATIVE_TOKENS=0). Drafts only fill a step up to speculative_step_tokens query tokens
  # (null: 64 on a GPU, 12 on a CPU); docs/benchmarks.md, "Speculative decoding", has the figures.
  speculative_tokens: 8
  speculative_step_tokens: null

runtime:
  # The engine queues requests itself and answers 503 past `max_queued_requests`; truss's semaphore
  # must therefore admit at least that many, or requests would wait in truss's queue unseen.
  predict_concurrency: {sizing.max_queued_requests}
  streaming_read_timeout: 120
"""


def variant_files() -> dict[Path, str]:
    files: dict[Path, str] = {}
    for checkpoint in CATALOGUE:
        text = render(checkpoint, size(checkpoint))
        files[VARIANTS_DIR / f"{checkpoint.name}.yaml"] = text
        if checkpoint.name == DEFAULT_VARIANT:
            files[REPO_ROOT / "config.yaml"] = text
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report files that differ; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, text in variant_files().items():
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{'stale' if args.check else 'wrote'}: {path.relative_to(REPO_ROOT)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
