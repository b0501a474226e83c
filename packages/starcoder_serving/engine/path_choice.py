"""Which of the two generation paths serves a request: a pure function of its effective parameters.

Two paths share one model (see ``engine.py``):

* **batched** -- transformers' continuous batching (``ContinuousBatchingManager``, paged KV cache):
  every admitted request decodes in one shared batch. It can only honour what its per-request
  logits processors support (``cb_logits_processors.py`` in transformers 5.23): temperature,
  top-k and top-p, with ``do_sample`` fixed for the whole manager. Greedy is served as
  sampling from ``top_k=1`` (a one-token distribution: the argmax, exactly).
* **generate** -- plain ``model.generate()`` one request at a time (``GenerateWorker``): serves every
  ``GenerationConfig`` parameter.

Routing table (``params`` are the *effective* values: request > model generation_config > transformers
defaults, so a checkpoint whose ``generation_config.json`` sets e.g. a repetition penalty is routed right):

==========================================================  =========  ==============================================
Parameter (when active)                                     Path       Why
==========================================================  =========  ==============================================
max_new_tokens, max_length, stop sequences, streaming       batched    per-request limit in ``add_request``; stop
                                                                       sequences are matched on the event loop
do_sample=False (greedy), any seed                          batched    ``top_k=1``: deterministic, seed irrelevant
do_sample=True with temperature / top_k / top_p, no seed    batched    per-request CB logits processors
early_stopping, length_penalty                              batched    beam-search-only: ignored without beams
do_sample=True with ``seed``                                generate   the batch shares one RNG; only a lone
                                                                       ``generate`` reproduces a seeded sample
num_beams > 1, num_return_sequences > 1                     generate   CB has no beam search; forking is per manager
top_logprobs / logprobs                                     generate   CB returns only the sampled token's logprob
                                                                       after warping (0.0 for emulated greedy)
min_new_tokens > 0 (min_length)                             generate   MinNewTokensLength: unsupported by CB
repetition_penalty != 1.0                                   generate   RepetitionPenalty: unsupported by CB
presence_penalty / frequency_penalty != 0 (OpenAI routes)   generate   our own logits processor, generate() only
no_repeat_ngram_size, bad_words_ids, suppress_tokens,       generate   not CB-aware: would be dropped / wrong on the
begin_suppress_tokens, exponential_decay_length_penalty                packed (1, tokens) batch layout
typical_p != 1, epsilon_cutoff, eta_cutoff, min_p           generate   no per-request CB version
renormalize_logits, remove_invalid_values, max_time         generate   not supported per request in CB
any parameter not named above                               generate   conservative default
continuous_batching disabled in settings                    generate   everything, one request at a time
==========================================================  =========  ==============================================
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any


class Path(str, enum.Enum):
    BATCHED = "batched"
    GENERATE = "generate"


@dataclasses.dataclass(frozen=True)
class Route:
    path: Path
    reason: str


# Parameters the batched path serves (with any value, subject to the checks in `choose_path`).
_BATCHABLE = frozenset(
    {
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "num_beams",
        "num_return_sequences",
        "early_stopping",
        "length_penalty",
    }
)

# Parameter -> values at which it does nothing. Any other value sends the request to `generate`.
_INACTIVE: dict[str, tuple[Any, ...]] = {
    "min_new_tokens": (None, 0),
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None, []),
    "suppress_tokens": (None, []),
    "begin_suppress_tokens": (None, []),
    "exponential_decay_length_penalty": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "min_p": (None,),
    "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False),
    "max_time": (None,),
}


def choose_path(
    params: Mapping[str, Any],
    *,
    seed: int | None = None,
    top_logprobs: int | None = None,
    additive_penalties: bool = False,
    continuous_batching: bool = True,
    request_keys: frozenset[str] | set[str] | None = None,
) -> Route:
    """Decide the path for one request.

    ``params``: effective generation parameters (request over model defaults). ``request_keys``: the
    names the client actually sent (defaults to ``params``' keys); an unknown one goes to ``generate``.
    """
    if not continuous_batching:
        return Route(Path.GENERATE, "continuous batching is disabled")
    if (params.get("num_beams") or 1) > 1:
        return Route(Path.GENERATE, "num_beams > 1 (beam search)")
    if (params.get("num_return_sequences") or 1) > 1:
        return Route(Path.GENERATE, "num_return_sequences > 1")
    if top_logprobs is not None:
        return Route(Path.GENERATE, "logprobs requested")
    if additive_penalties:
        return Route(Path.GENERATE, "presence/frequency penalties have no batched version")
    if params.get("do_sample") and seed is not None:
        return Route(Path.GENERATE, "seeded sampling needs its own RNG")
    for name, inactive in _INACTIVE.items():
        value = params.get(name)
        if isinstance(value, tuple):
            value = list(value)
        if value not in inactive:
            return Route(Path.GENERATE, f"{name} is not supported by continuous batching")
    keys = params.keys() if request_keys is None else request_keys
    unknown = sorted(set(keys) - _BATCHABLE - set(_INACTIVE))
    if unknown:
        return Route(Path.GENERATE, f"{unknown[0]} is not known to the batched path")
    return Route(Path.BATCHED, "sampling" if params.get("do_sample") else "greedy")


def batched_sampling_kwargs(params: Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """The per-request ``temperature`` / ``top_k`` / ``top_p`` for ``ContinuousBatchingManager.add_request``.

    All three are always sent, so the manager-wide placeholders never apply. Greedy is ``top_k=1``:
    the warped distribution has a single token (the argmax) and sampling returns it with certainty.
    """
    if not params.get("do_sample"):
        return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
    temperature = params.get("temperature")
    top_k = params.get("top_k")
    top_p = params.get("top_p")
    return {
        "temperature": float(1.0 if temperature is None else temperature),
        # generate() skips top-k when it is 0/None; the batched warper needs 1 <= k <= vocab.
        "top_k": int(vocab_size if not top_k else min(int(top_k), vocab_size)),
        "top_p": float(1.0 if top_p is None else top_p),
    }


def effective_parameters(model_defaults: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, Any]:
    """Request values over the model's (non-None) generation defaults, as ``generate()`` resolves them."""
    merged = {key: value for key, value in model_defaults.items() if value is not None}
    merged.update(request)
    return merged
