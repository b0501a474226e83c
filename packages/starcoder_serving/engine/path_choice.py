"""Which of the two generation paths serves a request: a pure function of its sampling parameters.

Two paths share one model (see ``engine.py``):

* **batched** -- transformers' continuous batching over a paged KV cache, with our ``BatchSampler``
  (``batch_sampler.py``) applying every request's parameters row by row: all admitted requests
  decode in one shared batch.
* **generate** -- plain ``model.generate()``, one request at a time (``GenerateWorker``), interleaved
  step by step with the batch.

This table is the one place the routing is written down (the README and ``config.yaml`` point here):

=====================================================================  =========  ==========================================
Parameters                                                             Path       Why
=====================================================================  =========  ==========================================
greedy, or sampling with temperature / top_k / top_p / min_p /         batched    ``BatchSampler``: per-slot parameters, the
typical_p / epsilon_cutoff / eta_cutoff (temperature < 1e-5: greedy)              same processor order as ``generate()``
seed (any), n / num_return_sequences                                   batched    counter-based Gumbel noise per (seed, step);
                                                                                  n sequences = n rows (seed, seed+1, ...)
repetition_penalty, presence_penalty, frequency_penalty, logit_bias    batched    per-slot token counts kept on the device
min_new_tokens / min_length, exponential_decay_length_penalty          batched    per-slot step counter masks the end tokens
suppress_tokens, begin_suppress_tokens, bad_words_ids,                 batched    per-slot masks; n-gram and multi-token bans
no_repeat_ngram_size                                                              from the request's own tokens each step
logprobs / top_logprobs                                                batched    the model's raw row, read after each step
max_new_tokens, max_length, max_time, stop sequences, streaming        batched    per-request limit; max_time by the worker's
                                                                                  watcher; stop sequences on the event loop
renormalize_logits, remove_invalid_values                              batched    no-ops: rows are always cleaned, and logprobs
                                                                                  are always normalized
num_beams > 1 (beam search, with early_stopping / length_penalty)     generate   beams are not sequences the batch can hold
no_repeat_ngram_size, multi-token bad_words_ids, logprobs, when        generate   the host prepares step N+1 before step N's
async_batching is on in settings (it is off by default)                           tokens and logprobs are back
continuous_batching disabled in settings                               generate   everything, one request at a time
=====================================================================  =========  ==========================================
"""

from __future__ import annotations

import dataclasses
import enum

from starcoder_serving.engine.sampling_params import SamplingParams


class GenerationPath(str, enum.Enum):
    BATCHED = "batched"
    GENERATE = "generate"


@dataclasses.dataclass(frozen=True)
class Route:
    path: GenerationPath
    reason: str


def choose_path(sampling: SamplingParams, *, continuous_batching: bool = True, async_batching: bool = False) -> Route:
    if not continuous_batching:
        return Route(GenerationPath.GENERATE, "continuous batching is disabled")
    if sampling.beam_search:
        return Route(GenerationPath.GENERATE, "num_beams > 1 (beam search)")
    if async_batching and sampling.needs_host_history:
        return Route(
            GenerationPath.GENERATE, "asynchronous batching: n-gram / multi-token bans or logprobs need the last token"
        )
    return Route(GenerationPath.BATCHED, "greedy" if sampling.greedy else "sampling")
