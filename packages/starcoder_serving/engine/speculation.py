"""Speculative decoding inside the continuous batch: which requests draft, how many tokens, and what it yielded.

Per step, before the batch is scheduled (``transformers_compat.install_step_hooks`` calls ``propose``), each
decoding request may get draft tokens from ``drafting.NgramDrafter``. The step feeds them after the request's
last token, so one forward pass gives the model's distribution at every draft position; ``BatchSampler``
processes each position with its own history and picks the token the request would have picked there without
speculation. The longest run of drafts equal to those picks is kept, plus the pick after it (``verify`` in
``batch_sampler.py``): at least one token per step, as before, and up to ``k + 1``.

**Exact.** A pick is the same function of (logits, the request's parameters and history, seed, step) as without
speculation: greedy picks the argmax; a sampled row adds Gumbel noise keyed by (seed, step, token), so a draft
``t`` is kept exactly when the request's own sample at that step is ``t``, which happens with probability
p(t), and otherwise the token kept is that sample, distributed as p without ``t``, renormalised: speculative
sampling with a point-mass draft, whose output distribution is p's. A seeded request gives the same text with
speculation on or off, under any load.

**Never slower.** Verifying a draft costs a query position in the forward pass: close to free while a step is
memory-bound (one user, a GPU) and paid for in full once the batch is compute-bound. So:

* drafts only take the step's *spare* tokens: the token budget less every decoding request's own token and
  every waiting prompt (new prompts go first: time to first token), and no more than ``step_token_limit``
  tokens in all (past it a step is compute-bound);
* ``k`` adapts per request: after a step that kept every draft it grows by 2, after a partial one it is what
  was kept plus one, and after a step that kept none the request stops drafting for 1, 2, 4 ... 16 steps before
  it tries one token again, so a request whose drafts are wrong costs almost nothing;
* a new request starts from what recent ones got (the acceptance rate of the last verifications, all requests
  together): ``k`` in proportion, and, when drafts have mostly missed lately, already backed off, so a stream of
  short requests whose drafts miss does not pay a full first draft each.

Requests that cannot be checked exactly draft nothing: those past a sliding window (StarCoder2: 4,096 tokens),
where a rejected draft's cache entry would overwrite one the window still needs.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import torch

from starcoder_serving.engine.drafting import Drafter, NgramDrafter, TokenHistory
from starcoder_serving.engine.transformers_compat import DecodingRow

_MAX_BACKOFF_STEPS = 16
# How fast the recent acceptance rate follows each verification, and below which a new request starts backed off.
_RECENT_WEIGHT = 0.1
_COLD_START = 0.25


@dataclasses.dataclass
class SpeculationStats:
    """Counts since the engine started (read from any thread; written by the batch thread)."""

    drafted: int = 0  # draft tokens fed to the model
    accepted: int = 0  # of those, kept
    verified_steps: int = 0  # request-steps that checked drafts

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def default_step_tokens(device: torch.device) -> int:
    """``speculative_step_tokens`` when unset: 64 on a GPU; 12 on a CPU, whose batch attends through one masked
    product over every sequence's keys, so a draft costs in proportion to the whole batch's context (a lone request
    drafts its full k, 12 or more decoding requests draft nothing; docs/benchmarks.md, "Speculative decoding")."""
    return 12 if device.type == "cpu" else 64


class _Row:
    __slots__ = ("backoff", "failures", "history", "k", "prompt_length", "synced")

    def __init__(self, row: DecodingRow, max_tokens: int, recent_acceptance: float) -> None:
        self.history = TokenHistory(row.prompt)
        self.prompt_length = len(row.prompt)
        self.synced = 0  # generated tokens already in history
        cold = recent_acceptance < _COLD_START
        self.k = 1 if cold else max(1, round(max_tokens * recent_acceptance))
        self.failures = 3 if cold else 0
        self.backoff = 1 << (self.failures - 1) if cold else 0

    def sync(self, row: DecodingRow) -> None:
        if self.synced < len(row.generated):
            self.history.extend(row.generated[self.synced :])
            self.synced = len(row.generated)


class Speculator:
    """The drafting policy and its counters; lives on the batch thread (``install_step_hooks``' ``StepHooks``)."""

    def __init__(
        self,
        *,
        max_tokens: int,
        step_token_limit: int,
        sliding_window: int | None = None,
        drafter: Drafter | None = None,
        adaptive: bool = True,
    ) -> None:
        self.max_tokens = max_tokens
        self.step_token_limit = step_token_limit
        self.sliding_window = sliding_window
        self.drafter: Drafter = drafter or NgramDrafter()
        self.adaptive = adaptive
        self.stats = SpeculationStats()
        self.step_drafts: dict[str, list[int]] = {}
        self._rows: dict[str, _Row] = {}
        self._recent_acceptance = 1.0  # kept / drafted over the last verifications (an exponential average)
        self._stats_lock = threading.Lock()
        # Set by BatchedWorker: the sampler's layout of the step's draft rows and, after it, its verdict on the picks.
        self.extra_rows: Callable[[], list[tuple[str, int]]] = list
        self._verify: Callable[[list[int]], dict[str, int]] = lambda picks: {}

    def attach(
        self, extra_rows: Callable[[], list[tuple[str, int]]], verify: Callable[[list[int]], dict[str, int]]
    ) -> None:
        self.extra_rows = extra_rows
        self._verify = verify

    def propose(self, rows: list[DecodingRow], token_room: int) -> dict[str, list[int]]:
        room = min(token_room, self.step_token_limit - len(rows))
        known = self._rows
        if len(known) > len(rows):  # requests that ended (or left decoding) since: forget them
            current = {row.request_id for row in rows}
            for request_id in [rid for rid in known if rid not in current]:
                del known[request_id]
                self.drafter.forget(request_id)
        drafts: dict[str, list[int]] = {}
        for row in rows:
            if room <= 0:
                break
            state = known.get(row.request_id)
            if state is None or state.prompt_length != len(row.prompt):
                state = known[row.request_id] = _Row(row, self.max_tokens, self._recent_acceptance)
            if state.backoff > 0:
                state.backoff -= 1
                continue
            k = min(state.k, row.tokens_left - 1, room)
            if self.sliding_window is not None:
                # Every position written this step must be inside the window's first pass over the ring buffer.
                k = min(k, self.sliding_window - 1 - row.position)
            if k <= 0:
                continue
            state.sync(row)
            tokens = self.drafter.propose(row.request_id, state.history, k)
            if tokens:
                drafts[row.request_id] = tokens
                room -= len(tokens)
        return drafts

    def scheduled(self, drafts: dict[str, list[int]]) -> None:
        self.step_drafts = drafts

    def verified(self, picks: list[int]) -> dict[str, int]:
        kept = self._verify(picks)
        drafted = accepted = 0
        for request_id, tokens in self.step_drafts.items():
            count = kept.get(request_id, 0)
            drafted += len(tokens)
            accepted += count
            if self.adaptive and (state := self._rows.get(request_id)) is not None:
                self._adapt(state, len(tokens), count)
                self._recent_acceptance += _RECENT_WEIGHT * (count / len(tokens) - self._recent_acceptance)
        with self._stats_lock:
            self.stats.drafted += drafted
            self.stats.accepted += accepted
            self.stats.verified_steps += len(self.step_drafts)
        return kept

    def _adapt(self, state: _Row, drafted: int, kept: int) -> None:
        if kept == drafted:
            state.k = min(self.max_tokens, state.k + 2)
            state.failures = 0
        elif kept == 0:
            state.failures += 1
            state.k = 1
            state.backoff = min(_MAX_BACKOFF_STEPS, 1 << (state.failures - 1))
        else:
            state.k = kept + 1
            state.failures = 0

    def snapshot(self) -> SpeculationStats:
        with self._stats_lock:
            return dataclasses.replace(self.stats)
