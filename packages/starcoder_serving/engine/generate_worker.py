"""The thread that runs plain ``model.generate()``, one request at a time, for the requests ``path_choice``
sends here: beam search; with ``async_batching`` on, those that need their latest token on the host each step
(n-gram and multi-token bad-word bans, logprobs); and everything when continuous batching is off. It also scores
prompts (``score``: OpenAI's ``echo`` with ``logprobs``, TGI's ``decoder_input_details``).

Serves every sampling parameter (beam search included), in the batch's order (``batch_sampler.py``), and records
the same logprobs: the model's own distribution, before any processing. Tokens reach the request's event
queue through a transformers streamer as they are produced; a stopping criterion polls the job's
cancel flag every step, so a cancelled request stops within one token.

Prompt scoring is a side task, run a chunk of ``SCORING_CHUNK_TOKENS`` positions at a time over the model's KV cache
(``PromptScorer``), keeping per position only the chosen token's logprob and the top alternatives. Chunks take
turns: with each other (one chunk of each scoring in progress, round robin), with the batch (after a chunk, the batch
runs about as long as the chunk took), and with a ``generate()`` in progress (one chunk between two of its steps), so
a short scoring never waits behind a long beam search or a long scoring, and neither parks the batch for long. A
scoring whose future is cancelled (its client left) is dropped before its next chunk.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, overload

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from starcoder_serving.engine.jobs import GenerationPlan, Job
from starcoder_serving.engine.transformers_compat import BaseStreamer
from starcoder_serving.errors import GenerationFailed, out_of_memory
from starcoder_serving.events import DoneEvent, FinishReason, TokenEvent, TokenLogprob

logger = logging.getLogger(__name__)


# Parameters whose processors _logits_processors builds itself, in the batch's order; generate() would
# otherwise put them before our logprob recorder, logit bias and presence/frequency penalties.
_BUILT_HERE = frozenset(
    {
        "repetition_penalty",
        "no_repeat_ngram_size",
        "bad_words_ids",
        "min_new_tokens",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
    }
)
# What generate() is told for them, and for the other processors it would build before our list (transformers
# 5.23, ``_get_logits_processor``): "off". generate() fills a parameter it is not given from the checkpoint's
# generation_config.json; a request has inherited those defaults already (``SamplingParams.with_model_defaults``)
# and its own values are built here, while the checkpoint's lengths, forced tokens, sequence bias and guidance are
# not served by the batch either. So generate() builds no processor before ours, except transformers'
# InfNanRemoveLogitsProcessor when a request sends ``remove_invalid_values`` (it changes only NaN and
# infinite logits, which a model does not produce; the recorder and _CleanRows clean them the same way after it).
_OFF_IN_GENERATE: dict[str, Any] = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    # None, not 0: a min_new_tokens of 0 makes generate() set min_length to the prompt's length (a no-op
    # MinLengthLogitsProcessor before ours, and a warning about both being set).
    "min_new_tokens": None,
    "exponential_decay_length_penalty": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "min_length": 0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "guidance_scale": None,
}
# Prompt positions per forward pass when a prompt is scored: the most any scoring holds the model at once, and the
# most logits (this many rows of the vocabulary) it holds in memory. Also the rows of a finished beam search's
# logits turned into logprobs at a time.
SCORING_CHUNK_TOKENS = 512


class _CancelCriterion(StoppingCriteria):
    def __init__(self, job: Job) -> None:
        self._job = job

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), self._job.cancelled.is_set(), dtype=torch.bool, device=input_ids.device
        )


class ModelAccess(Protocol):
    """How this worker shares the model with another user of it (the continuous-batching loop)."""

    def exclusive(self) -> contextlib.AbstractContextManager[None]: ...

    def yield_to_batch(self, seconds: float = 0.0) -> None: ...


class _BetweenSteps(StoppingCriteria):
    """Never stops; between two decode steps hands the model to the batch loop for one of its steps, and runs one
    chunk of a prompt scoring if one waits (``GenerateWorker._between_steps``)."""

    def __init__(self, worker: GenerateWorker) -> None:
        self._worker = worker

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        self._worker._between_steps()
        return torch.zeros((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)


class AdditivePenalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties: subtract ``presence`` from the logit of every token
    generated so far, and ``frequency`` times its count. The prompt's tokens are not counted.

    They apply after the repetition penalty and before temperature and top-k/top-p, as in the batch.
    """

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self._prompt_length = prompt_length
        self._presence = presence
        self._frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self._prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self._frequency * counts - self._presence * (counts > 0).to(scores.dtype)


class ExponentialDecay(LogitsProcessor):
    """transformers' ExponentialDecayLengthPenalty: after ``start`` new tokens, the end tokens' scores rise by
    (factor ** (new tokens - start) - 1) * |score|. Computed in float64 tensors, as the batch does: a power past
    float range is +inf (an end token then wins) where transformers' Python float raises OverflowError."""

    def __init__(self, start: int, factor: float, end_ids: torch.Tensor, prompt_length: int) -> None:
        self._start = prompt_length + start
        self._factor = factor
        self._end_ids = end_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        past = input_ids.shape[-1] - self._start
        if past <= 0:
            return scores
        growth = float(torch.tensor(self._factor, dtype=torch.float64).pow(past)) - 1.0
        ends = scores[:, self._end_ids]
        penalty = (ends.abs() * growth).masked_fill(~torch.isfinite(ends), 0.0)
        return scores.index_copy(1, self._end_ids, ends + penalty)


class LogitBias(LogitsProcessor):
    """OpenAI's logit_bias: a fixed amount added to chosen tokens' logits."""

    def __init__(self, bias: dict[int, float]) -> None:
        self._ids = list(bias)
        self._values = list(bias.values())

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = torch.tensor(self._ids, dtype=torch.long, device=scores.device)
        values = torch.tensor(self._values, dtype=scores.dtype, device=scores.device)
        return scores.index_add(1, ids, values.expand(scores.shape[0], -1))


def _clean(scores: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, +inf -> the largest float (the batch's ``_clean``)."""
    return torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(scores.dtype).max)


def _raw_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The model's own log-distribution of each row of raw logits, in float32 (vLLM's default logprobs)."""
    return torch.log_softmax(_clean(logits.float()), dim=-1)


def _score_rows(logits: torch.Tensor, targets: torch.Tensor, top: int) -> tuple[torch.Tensor, ...]:
    """For each row of raw logits: the logprob of its target token, and the ``top`` most likely tokens' ids (int32)
    and logprobs, on the CPU (what ``PromptScores`` holds)."""
    logprobs = _raw_logprobs(logits)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).cpu()
    if not top:
        rows = len(chosen)
        return chosen, torch.empty((rows, 0), dtype=torch.int32), torch.empty((rows, 0), dtype=torch.float32)
    values, indices = logprobs.topk(top, dim=-1)
    return chosen, indices.to(torch.int32).cpu(), values.cpu()


class _CleanRows(LogitsProcessor):
    """Extreme but valid values (a 1e-30 repetition penalty) overflow logits: NaN -> -inf, +inf -> the
    largest float, so sampling and beam scores stay defined (the batch does the same)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return _clean(scores)


class _LogprobRecorder(LogitsProcessor):
    """Keeps the last step's logprobs: the model's own distribution, log_softmax of the raw logits before any
    processing (it is the first processor), as the batch records them. One sequence (row 0): not for beam search,
    whose rows are beams (``GenerateWorker._score_tokens`` scores its tokens once it is done)."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = _raw_logprobs(scores[0])
        return scores


class _TokenForwarder(BaseStreamer):
    """Receives each new token from ``generate`` and forwards it to the job's event queue."""

    def __init__(self, job: Job, recorder: _LogprobRecorder | None) -> None:
        self._job = job
        self._recorder = recorder
        self._seen_prompt = False
        self.count = 0
        self.last_token: int | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:  # generate() first pushes the prompt itself
            self._seen_prompt = True
            return
        for token_id in value.reshape(-1).tolist():
            self._forward(int(token_id))

    def _forward(self, token_id: int) -> None:
        if self.count == 0:
            self._job.first_token_at = time.perf_counter()
        self.count += 1
        self.last_token = token_id
        logprob = self._logprob(token_id)
        self._job.emit(TokenEvent((token_id,), () if logprob is None else (logprob,)))

    def _logprob(self, token_id: int) -> TokenLogprob | None:
        if self._recorder is None or self._recorder.last is None:
            return None
        row = self._recorder.last
        k = self._job.plan.top_logprobs or 0
        top: tuple[tuple[int, float], ...] = ()
        if k:
            values, indices = row.topk(k)
            top = tuple(zip(indices.tolist(), values.tolist()))
        return TokenLogprob(token_id, float(row[token_id]), top)

    def forward_all(self, token_ids: list[int], logprobs: Sequence[TokenLogprob] | None = None) -> None:
        """A finished beam search's tokens, with their logprob entries when the request asked for them."""
        if token_ids and self.count == 0:
            self._job.first_token_at = time.perf_counter()
        for i, token_id in enumerate(token_ids):
            self.count += 1
            self.last_token = token_id
            entries = (logprobs[i],) if logprobs is not None else ()
            self._job.emit(TokenEvent((token_id,), entries))

    def end(self) -> None:
        pass


class PromptScores(Sequence[TokenLogprob]):
    """A scored prompt: for each of its tokens after the first, the token's logprob given the tokens before it and
    the ``top`` most likely alternatives there. Held as arrays (4 + 8 * top bytes a token); entries are built as
    they are read, so a long prompt costs no more than its numbers until its answer is rendered."""

    _BLOCK = 1024  # entries converted to Python at a time while iterating

    def __init__(
        self, token_ids: list[int], chosen: torch.Tensor, top_ids: torch.Tensor, top_values: torch.Tensor
    ) -> None:
        self._token_ids = token_ids
        self._chosen = chosen
        self._top_ids = top_ids
        self._top_values = top_values

    def __len__(self) -> int:
        return len(self._token_ids)

    @overload
    def __getitem__(self, index: int) -> TokenLogprob: ...

    @overload
    def __getitem__(self, index: slice) -> list[TokenLogprob]: ...

    def __getitem__(self, index: int | slice) -> TokenLogprob | list[TokenLogprob]:
        if isinstance(index, slice):
            return list(self._entries(*index.indices(len(self))))
        position = range(len(self))[index]  # IndexError past the end; negative indices count from it
        return next(self._entries(position, position + 1, 1))

    def __iter__(self) -> Iterator[TokenLogprob]:
        return self._entries(0, len(self), 1)

    def _entries(self, start: int, stop: int, step: int) -> Iterator[TokenLogprob]:
        if step != 1:
            for position in range(start, stop, step):
                yield from self._entries(position, position + 1, 1)
            return
        for first in range(start, stop, self._BLOCK):
            last = min(first + self._BLOCK, stop)
            ids = self._token_ids[first:last]
            chosen = self._chosen[first:last].tolist()
            top_ids = self._top_ids[first:last].tolist()
            top_values = self._top_values[first:last].tolist()
            for i, token_id in enumerate(ids):
                yield TokenLogprob(token_id, chosen[i], tuple(zip(top_ids[i], top_values[i])))


class PromptScorer:
    """Scores one prompt ``chunk_tokens`` positions per forward pass, the model's KV cache carrying the earlier
    positions from one pass to the next; per position it keeps only the chosen token's logprob and the ``top``
    alternatives (log_softmax of the raw logits, computed one chunk at a time). ``step`` runs one chunk with the
    model held (inside ``exclusive()`` and ``torch.inference_mode()``); ``done`` once every position is scored."""

    def __init__(self, prompt_ids: list[int], top: int, chunk_tokens: int = SCORING_CHUNK_TOKENS) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be positive, not {chunk_tokens}")
        self.prompt_ids = prompt_ids
        self._chunk = chunk_tokens
        self._ids = torch.tensor(prompt_ids, dtype=torch.long)
        # Position i (0 <= i < n - 1) predicts token i + 1; the last token predicts nothing and is never fed.
        scored = max(len(prompt_ids) - 1, 0)
        self._chosen = torch.empty(scored, dtype=torch.float32)
        self._top_ids = torch.empty((scored, top), dtype=torch.int32)
        self._top_values = torch.empty((scored, top), dtype=torch.float32)
        self._fed = 0
        self._cache: Any = None
        self.chunks_run = 0

    @property
    def positions(self) -> int:
        return len(self._chosen)

    @property
    def chunks(self) -> int:
        return -(-self.positions // self._chunk)

    @property
    def done(self) -> bool:
        return self._fed >= self.positions

    def step(self, model: Any) -> None:
        start, end = self._fed, min(self._fed + self._chunk, self.positions)
        device = model.device
        output = model(
            input_ids=self._ids[start:end].unsqueeze(0).to(device), past_key_values=self._cache, use_cache=True
        )
        # The last chunk's cache is not needed: dropped at once, not when the scoring is.
        self._cache = output.past_key_values if end < self.positions else None
        logits = output.logits[0]
        del output
        targets = self._ids[start + 1 : end + 1].to(device)
        scored = _score_rows(logits, targets, self._top_ids.shape[1])
        self._chosen[start:end], self._top_ids[start:end], self._top_values[start:end] = scored
        self._fed = end
        self.chunks_run += 1

    def result(self) -> PromptScores:
        return PromptScores(self.prompt_ids[1:], self._chosen, self._top_ids, self._top_values)


class _Scoring:
    """A prompt scoring queued on the worker: its scorer and the future its result goes to. The future stays
    pending while it runs, so that the caller can cancel it (asyncio cancels a wrapped future when its awaiting
    task is cancelled); the worker then drops it before its next chunk."""

    def __init__(self, scorer: PromptScorer, future: concurrent.futures.Future[PromptScores]) -> None:
        self.scorer = scorer
        self.future = future
        self.started = time.perf_counter()


class GenerateWorker:
    def __init__(
        self, model: Any, eos_token_ids: set[int], pad_token_id: int, model_access: ModelAccess | None = None
    ) -> None:
        self._model = model
        # None: this worker is the model's only user. Otherwise every generate() runs inside
        # model_access.exclusive() (the batch loop parked) and yields to the batch between its steps.
        self._model_access = model_access
        self._eos_token_ids = eos_token_ids
        self._pad_token_id = pad_token_id
        # Everything submitted, in order: jobs, scorings, and None to stop. Only the worker thread reads it, moving
        # jobs and scorings to its own queues (_drain), even in the middle of a generate() (_between_steps).
        self._inbox: queue.Queue[Job | _Scoring | None] = queue.Queue()
        self._jobs: collections.deque[Job] = collections.deque()
        self._scorings: collections.deque[_Scoring] = collections.deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="generate-worker", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def score(
        self, prompt_ids: list[int], top: int, chunk_tokens: int = SCORING_CHUNK_TOKENS
    ) -> concurrent.futures.Future[PromptScores]:
        """Score a prompt on this thread, a chunk at a time, taking turns with the batch, with a ``generate()`` in
        progress and with other scorings. Cancelling the future stops the scoring before its next chunk."""
        future: concurrent.futures.Future[PromptScores] = concurrent.futures.Future()
        self._inbox.put(_Scoring(PromptScorer(prompt_ids, top, chunk_tokens), future))
        return future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self) -> None:
        self._inbox.put(None)

    def _run(self) -> None:
        while True:
            self._drain(block=not (self._jobs or self._scorings))
            if self._stopping:
                break
            if self._jobs:
                self._run_job(self._jobs.popleft())
            elif self._scorings:
                self._score_while_idle()
        for job in self._jobs:
            job.emit(DoneEvent(error=GenerationFailed("The server is shutting down.")))
        for scoring in self._scorings:
            self._settle(scoring, error=GenerationFailed("The server is shutting down."))

    def _drain(self, block: bool) -> None:
        """Move what was submitted to the worker's queues; with ``block``, wait for something first."""
        try:
            item = self._inbox.get(block=block)
            while True:
                if item is None:
                    self._stopping = True
                elif isinstance(item, _Scoring):
                    self._scorings.append(item)
                else:
                    self._jobs.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _score_while_idle(self) -> None:
        """No generate() to run: score chunk by chunk, each followed by the batch's turn, until a job comes."""
        access = self._model_access
        with access.exclusive() if access is not None else contextlib.nullcontext(), torch.inference_mode():
            while self._scorings and not self._jobs and not self._stopping:
                self._score_one_chunk()
                self._drain(block=False)

    def _between_steps(self) -> None:
        """Between two steps of a generate() (the model held): the batch's step, then one chunk of a scoring."""
        if self._model_access is not None:
            self._model_access.yield_to_batch()
        self._drain(block=False)
        if self._scorings:
            self._score_one_chunk()

    def _score_one_chunk(self) -> None:
        """One chunk of the first scoring in line, which then goes to the back of the line; then the batch runs
        about as long as the chunk took. The model is held (inside ``exclusive()``)."""
        scoring = self._scorings.popleft()
        scorer = scoring.scorer
        if scoring.future.cancelled():  # its client left
            self._log_scoring(scoring, "cancelled")
            return
        started = time.perf_counter()
        try:
            if not scorer.done:
                scorer.step(self._model)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            logger.warning("prompt scoring: CUDA out of memory (%d prompt tokens)", len(scorer.prompt_ids))
            self._settle(scoring, error=out_of_memory())
            return
        except Exception:  # the worker must survive anything one request does
            logger.exception("prompt scoring failed")
            self._settle(scoring, error=GenerationFailed("Scoring the prompt failed. Retry the request."))
            return
        if scorer.done:
            self._settle(scoring)
        else:
            self._scorings.append(scoring)
        if self._model_access is not None:
            self._model_access.yield_to_batch(time.perf_counter() - started)

    def _settle(self, scoring: _Scoring, error: Exception | None = None) -> None:
        try:
            if error is None:
                scoring.future.set_result(scoring.scorer.result())
            else:
                scoring.future.set_exception(error)
        except concurrent.futures.InvalidStateError:  # cancelled meanwhile: nobody waits for it
            pass
        self._log_scoring(scoring, "failed" if error is not None else "done")

    @staticmethod
    def _log_scoring(scoring: _Scoring, outcome: str) -> None:
        scorer = scoring.scorer
        logger.info(
            "prompt scoring %s: prompt_tokens=%d chunks=%d/%d seconds=%.3f",
            outcome,
            len(scorer.prompt_ids),
            scorer.chunks_run,
            scorer.chunks,
            time.perf_counter() - scoring.started,
        )

    def _run_job(self, job: Job) -> None:
        if job.cancelled.is_set():
            job.emit(DoneEvent(FinishReason.CANCELLED))
            return
        started = time.perf_counter()
        plan = job.plan
        sampling = plan.sampling
        beam_search = sampling.beam_search
        # Beam search's rows are beams: its tokens are scored once it is done (_score_tokens), not step by step.
        recorder = _LogprobRecorder() if plan.top_logprobs is not None and not beam_search else None
        forwarder = _TokenForwarder(job, recorder)
        access = self._model_access
        criteria = [_CancelCriterion(job), _BetweenSteps(self)]
        try:
            input_ids = torch.tensor([plan.prompt_ids], dtype=torch.long, device=self._model.device)
            with access.exclusive() if access is not None else contextlib.nullcontext(), torch.inference_mode():
                if sampling.seed is not None:
                    # Seeds CUDA too. Safe: this thread runs one job at a time, and the batch loop
                    # only steps in yield_to_batch, which restores the RNG state.
                    torch.manual_seed(sampling.seed)
                output = self._model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    # Every end token the engine knows (StarCoder2's <file_sep> too), not only the checkpoint's.
                    eos_token_id=sorted(self._eos_token_ids),
                    pad_token_id=self._pad_token_id,
                    # Beam search cannot stream: its tokens are forwarded once the best beam is known.
                    streamer=None if beam_search else forwarder,
                    stopping_criteria=StoppingCriteriaList(criteria),
                    logits_processor=self._logits_processors(plan, recorder),
                    **{k: v for k, v in sampling.generate_kwargs().items() if k not in _BUILT_HERE},
                    **_OFF_IN_GENERATE,
                )
                logprobs = None
                if beam_search and plan.top_logprobs is not None and not job.cancelled.is_set():
                    logprobs = self._score_tokens(output[0], plan.prompt_tokens, plan.top_logprobs)
            if beam_search:
                # One sequence of one prompt: nothing is padded, every id was generated.
                forwarder.forward_all(output[0, plan.prompt_tokens :].tolist(), logprobs)
            reason = self._finish_reason(job, forwarder)
            job.emit(DoneEvent(reason))
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            logger.warning("job %d: CUDA out of memory (%d prompt tokens)", job.id, plan.prompt_tokens)
            job.emit(DoneEvent(error=out_of_memory()))
        except Exception as exc:  # the worker must survive anything one request does
            logger.exception("job %d: generation failed", job.id)
            job.emit(DoneEvent(error=GenerationFailed(f"Generation failed ({type(exc).__name__}). Retry the request.")))
        finally:
            logger.info(
                "job %d done: prompt_tokens=%d completion_tokens=%d cancelled=%s seconds=%.3f",
                job.id,
                plan.prompt_tokens,
                forwarder.count,
                job.cancelled.is_set(),
                time.perf_counter() - started,
            )

    def _score_tokens(self, sequence: torch.Tensor, prompt_tokens: int, top: int) -> Sequence[TokenLogprob]:
        """Each generated token's logprob entry from one forward pass over the prompt and the generated tokens:
        the model's own distribution at each position (what prompt scoring computes), what the recorder gives a
        sampled or greedy request step by step. Runs with the model held (inside ``exclusive()``)."""
        generated = sequence[prompt_tokens:]
        if generated.numel() == 0:
            return []
        # The logits that predict each generated token: positions prompt_tokens - 1 .. len - 2.
        logits = self._model(input_ids=sequence.unsqueeze(0), logits_to_keep=generated.numel() + 1).logits[0, :-1]
        chunk = SCORING_CHUNK_TOKENS
        chunks = [
            _score_rows(logits[start : start + chunk], generated[start : start + chunk], top)
            for start in range(0, generated.numel(), chunk)
        ]
        chosen, top_ids, top_values = (torch.cat(parts) for parts in zip(*chunks))
        return PromptScores(generated.tolist(), chosen, top_ids, top_values)

    def _logits_processors(self, plan: GenerationPlan, recorder: _LogprobRecorder | None) -> LogitsProcessorList:
        """The batch's order (batch_sampler.py, vLLM's), built from transformers' public processor classes: the
        logprob recorder (the raw logits, before anything else); logit bias; repetition penalty;
        presence/frequency penalties; n-gram and multi-token bad-word bans; min_new_tokens; the exponential decay;
        suppressed tokens and single-token bad words (banned even when an end token, as in the batch);
        begin-suppressed tokens. generate() builds none of these itself (``_OFF_IN_GENERATE``) and runs this list
        before its own warpers (transformers 5.23 ``_get_logits_processor``: ``_merge_criteria_processor_list``,
        then temperature, top-k, top-p, min-p, typical, epsilon, eta), so temperature and the truncations come
        after the bias and penalties, as in the batch.
        """
        sampling = plan.sampling
        prompt_length = plan.prompt_tokens
        device = self._model.device
        end_ids = torch.tensor(sorted(self._eos_token_ids), dtype=torch.long, device=device)
        processors: list[LogitsProcessor] = []
        if recorder is not None:
            # First: the model's own distribution (vLLM's default logprobs), as the batch records it.
            processors.append(recorder)
        if sampling.logit_bias:
            processors.append(LogitBias(sampling.logit_bias))
        if sampling.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
        if sampling.presence_penalty or sampling.frequency_penalty:
            processors.append(AdditivePenalties(prompt_length, sampling.presence_penalty, sampling.frequency_penalty))
        if sampling.no_repeat_ngram_size:
            processors.append(NoRepeatNGramLogitsProcessor(sampling.no_repeat_ngram_size))
        if words := [list(word) for word in sampling.bad_words_ids if len(word) > 1]:
            processors.append(NoBadWordsLogitsProcessor(words))
        if sampling.min_new_tokens:
            processors.append(
                MinNewTokensLengthLogitsProcessor(prompt_length, sampling.min_new_tokens, end_ids, device=device)
            )
        if sampling.exponential_decay_length_penalty is not None:
            start, factor = sampling.exponential_decay_length_penalty
            processors.append(ExponentialDecay(start, factor, end_ids, prompt_length))
        if banned := [*sampling.suppress_tokens, *(word[0] for word in sampling.bad_words_ids if len(word) == 1)]:
            processors.append(SuppressTokensLogitsProcessor(banned, device=device))
        if sampling.begin_suppress_tokens:
            processors.append(
                SuppressTokensAtBeginLogitsProcessor(sampling.begin_suppress_tokens, prompt_length, device=device)
            )
        processors.append(_CleanRows())
        # The recorder went first: logprobs are of the raw logits, whatever the processors above and generate()'s
        # warpers after them do to the row that is sampled or ranked from.
        return LogitsProcessorList(processors)

    def _finish_reason(self, job: Job, forwarder: _TokenForwarder) -> FinishReason:
        if job.cancelled.is_set():
            return FinishReason.CANCELLED
        if forwarder.last_token in self._eos_token_ids:
            return FinishReason.EOS
        return FinishReason.LENGTH
