"""Where the server's knobs come from: config.yaml's ``model_metadata``, overridable by environment.

The same code serves StarCoder-15.5B on an A100 and the tiny local model on a laptop CPU; only these
settings differ, so every one of them can be overridden by an environment variable: field ``name`` by
``STARCODER_NAME`` (``ENV_OVERRIDES``). A tuple of strings (``chat_stop``, ``end_tokens``) is read as a JSON list.
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Mapping
from typing import Any, Literal

import pydantic

Dtype = Literal["bfloat16", "float16", "float32", "auto"]
# Which of the batch's two forward paths replay CUDA graphs: "varlen" (any step with a prefill chunk),
# "decode" (transformers' fast path: one new token per sequence, flash attention's paged kernel only),
# both, none, or "auto" (transformers decides: graphs where the attention needs no mask).
CudaGraphs = Literal["off", "varlen", "decode", "both", "auto"]
_GRAPH_SWITCHES: dict[str, CudaGraphs] = {
    "0": "off",
    "false": "off",
    "no": "off",
    "1": "both",
    "true": "both",
    "yes": "both",
}

ENV_PREFIX = "STARCODER_"


class ServingSettings(pydantic.BaseModel):
    """Everything the engine needs to know that is not in a request."""

    model_config = pydantic.ConfigDict(extra="ignore", frozen=True)

    checkpoint: str = "bigcode/starcoder"
    # Checked before `checkpoint`: where truss's build-time weight cache puts the files.
    local_weights_dir: str | None = None
    # None (unset): they follow the machine, resolved at load (``resolve_placement``): CUDA in bfloat16 where
    # torch sees a GPU, else the CPU in float32. dtype "auto" is transformers' (the checkpoint's own dtype);
    # device "auto" means the same as unset.
    dtype: Dtype | None = None
    device: str | None = None
    attn_implementation: str = "sdpa"
    # None: the checkpoint's own window (n_positions / max_position_embeddings, family/profile.py). A number
    # caps it lower (a checkpoint's window is never exceeded: positions past it were never trained).
    context_window: int | None = pydantic.Field(None, ge=16)
    # Tokens a fill-in-the-middle prompt's repository context (repository name, other files) may take at most; the
    # file being completed comes first, and the nearest files fill the rest (text/repo_context.py).
    context_token_budget: int = pydantic.Field(4096, ge=0)
    default_max_new_tokens: int = pydantic.Field(256, ge=1)
    max_new_tokens_cap: int = pydantic.Field(2048, ge=1)
    max_num_return_sequences: int = pydantic.Field(8, ge=1)
    max_num_beams: int = pydantic.Field(8, ge=1)
    # Editor clients send many: Continue sends 12 for StarCoder, 15 for StarCoder2.
    max_stop_sequences: int = pydantic.Field(32, ge=0)
    max_stop_sequence_chars: int = pydantic.Field(256, ge=1)
    # Requests admitted to the engine (running + waiting); past this the server answers 503.
    max_queued_requests: int = pydantic.Field(256, ge=1)
    # Continuous batching (engine/batch_worker.py): concurrent requests share each forward pass over a
    # paged KV cache. False: every request runs alone through model.generate() (the seed's behaviour).
    continuous_batching: bool = True
    # Sequences decoded together in one step (the rest wait for a slot, still admitted).
    max_batch_sequences: int = pydantic.Field(64, ge=1)
    # Query tokens per forward pass (prefill chunks + one per decoding sequence). None: derived from memory.
    max_batch_tokens: int | None = pydantic.Field(None, ge=1)
    # Tokens per KV-cache page (block), and the number of blocks. kv_num_blocks None: sized from
    # kv_memory_fraction of the accelerator memory left free after loading the weights.
    kv_page_size: int = pydantic.Field(256, ge=4)
    kv_num_blocks: int | None = pydantic.Field(None, ge=1)
    kv_memory_fraction: float | None = pydantic.Field(None, gt=0.0, le=0.95)
    # Reuse the KV pages of an identical prompt prefix (shared system prompts, FIM file headers).
    prefix_sharing: bool = True
    # GPU only, off until measured (docs/benchmarks.md): CUDA graphs for the batch's forward passes
    # (true/false mean both/off), and torch.compile of them (transformers' default_compile_level,
    # 0 = off .. 3 = most, slowest warm-up). Either one captures warm-up graphs before serving.
    cuda_graphs: CudaGraphs = "off"
    compile_level: int = pydantic.Field(0, ge=0, le=3)
    # transformers' double-buffered batch loop: the next step is prepared while this one runs. The host
    # then lags the device by a step, so requests that need their latest token on the host (n-gram and
    # multi-token bad-word bans, logprobs) are served by generate() instead (engine/path_choice.py).
    async_batching: bool = False
    # Speculative decoding in the batch (engine/speculation.py): up to this many draft tokens per request and step,
    # drafted from the request's own prompt and output (n-gram lookup) and checked in the same forward pass; the
    # output is the same as without it. 0: off. Also off with CUDA graphs, compile or async batching.
    speculative_tokens: int = pydantic.Field(8, ge=0, le=32)
    # Drafts only fill a step up to this many query tokens in all (decoding requests' own tokens included): past
    # it a step is compute-bound and a wrong draft costs throughput. None: by device, 64 on a GPU and 12 on a CPU
    # (speculation.default_step_tokens says why).
    speculative_step_tokens: int | None = pydantic.Field(None, ge=1)
    # A model on the CPU: torch's threads for a forward pass of few tokens (a decode step). None: one per core
    # but one, which stays free for the HTTP event loop; a pool spread over every core stalls each of a small
    # step's tiny operations whenever another thread needs a core. Prefill chunks use every core
    # (engine/cpu_threads.py; docs/benchmarks.md, "Per-token costs").
    cpu_threads: int | None = pydantic.Field(None, ge=1)
    # A stream's tokens reach the HTTP side at most this often (a request's first token and its end at once):
    # each hand-over from the batch thread costs the batch about 0.25 ms of GIL traffic on a small CPU, so
    # steps faster than this are delivered a few at a time. Steps slower than this (StarCoder-15.5B on a GPU)
    # are never held. 0: every step at once (engine/jobs.py, PacedDelivery).
    stream_interval_ms: float = pydantic.Field(4.0, ge=0.0, le=100.0)
    # Debugging only: the per-request log line (api/metrics.py) also carries the prompt and completion text. Off:
    # a request's text never reaches the logs.
    log_request_text: bool = False
    instruction_template_file: str = "instruction_template.json"
    # For tokenizers without a chat template of their own: the template file, and where its answers end
    # (where the model would begin the human's next turn).
    chat_template_file: str = "chat_template.jinja"
    chat_stop: tuple[str, ...] = ("\nHuman:",)
    # Tokens that also end a generation when the vocabulary has them, though the checkpoint's config does
    # not list them: StarCoder2 ends a file with <file_sep>.
    end_tokens: tuple[str, ...] = ("<file_sep>",)

    @pydantic.field_validator("cuda_graphs", mode="before")
    @classmethod
    def _graph_switch(cls, value: Any) -> Any:
        """Booleans (and their environment spellings) keep meaning what they meant before the per-path choice."""
        if isinstance(value, bool):
            return "both" if value else "off"
        if isinstance(value, str):
            return _GRAPH_SWITCHES.get(value.strip().lower(), value.strip().lower())
        return value

    @property
    def graph_paths(self) -> tuple[bool, bool] | None:
        """transformers' ``use_cuda_graph``: (varlen, decode), or None to let it decide."""
        if self.cuda_graphs == "auto":
            return None
        return (self.cuda_graphs in ("varlen", "both"), self.cuda_graphs in ("decode", "both"))

    @pydantic.model_validator(mode="after")
    def _default_fits_cap(self) -> ServingSettings:
        if self.default_max_new_tokens > self.max_new_tokens_cap:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens_cap ({self.max_new_tokens_cap})"
            )
        return self

    @classmethod
    def from_sources(
        cls, model_metadata: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> ServingSettings:
        """config.yaml's ``model_metadata``, with every setting whose variable is set (and not empty) replaced
        by the environment's value."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = dict(model_metadata or {})
        for env_name, field in ENV_OVERRIDES.items():
            if environ.get(env_name):
                values[field] = _from_environment(env_name, field, environ[env_name])
        if environ.get("STARCODER_CHECKPOINT") and not environ.get("STARCODER_LOCAL_WEIGHTS_DIR"):
            # An explicit checkpoint beats the build-time cache of the default one.
            values["local_weights_dir"] = None
        return cls.model_validate(values)

    def resolved_placement(self, cuda_available: bool) -> tuple[str, str]:
        """(device, dtype) to load on: see ``resolve_placement``."""
        return resolve_placement(self.device, self.dtype, cuda_available)

    def resolved_checkpoint(self) -> str:
        """The local weight cache when truss populated it, else the checkpoint (path or hub id)."""
        if self.local_weights_dir and os.path.isfile(os.path.join(self.local_weights_dir, "config.json")):
            return self.local_weights_dir
        return self.checkpoint


# Environment variable -> settings field, one per field: ``STARCODER_<FIELD>``. Environment wins over config.yaml.
ENV_OVERRIDES: dict[str, str] = {f"{ENV_PREFIX}{name.upper()}": name for name in ServingSettings.model_fields}
# Fields read from the environment as a JSON list (of strings), e.g. STARCODER_CHAT_STOP='["\\nHuman:"]'.
_JSON_LIST_FIELDS = frozenset(
    name for name, field in ServingSettings.model_fields.items() if typing.get_origin(field.annotation) is tuple
)


def _from_environment(env_name: str, field: str, text: str) -> Any:
    """A variable's text as the field's value: as it is (pydantic converts numbers and booleans), or, for a tuple
    of strings, a JSON list."""
    if field not in _JSON_LIST_FIELDS:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        problem = f"is not valid JSON ({error.msg})"
    else:
        if isinstance(value, list):
            return value  # pydantic checks that its items are strings
        problem = "is not a list"
    raise ValueError(f'{env_name} must be a JSON list of strings, e.g. {env_name}=\'["a", "b"]\'; {text!r} {problem}.')


def resolve_placement(device: str | None, dtype: str | None, cuda_available: bool) -> tuple[str, str]:
    """Where and in what precision to load: an explicit device and dtype are kept; an unset device (or "auto")
    is "cuda" when a GPU is available, else "cpu"; an unset dtype is bfloat16 on CUDA and float32 elsewhere
    (bfloat16 on a CPU is slow and less exact)."""
    if device is None or device.strip().lower() in ("", "auto"):
        device = "cuda" if cuda_available else "cpu"
    if dtype is None:
        dtype = "bfloat16" if device.split(":")[0] == "cuda" else "float32"
    return device, dtype
