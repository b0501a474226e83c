"""Where a process's threads spend their wall time, by sampling their Python stacks (a small py-spy).

torch.profiler records host operations only on the thread that opened it, while the continuous batch
runs on transformers' own thread; and the GPU machine has no py-spy. Every ``interval_s`` this reads
``sys._current_frames()`` and counts, per thread, each function on the stack (inclusive) and the
innermost one (self). Fractions are of that thread's samples.
"""

from __future__ import annotations

import collections
import sys
import threading
import time
from types import FrameType
from typing import Self

import pydantic


class ThreadProfile(pydantic.BaseModel):
    thread: str
    samples: int
    # Share of samples not parked in a wait (lock, queue, event, selector, sleep): how busy the thread was.
    busy: float
    # (function, fraction of the thread's samples with it on the stack), largest first.
    inclusive: list[tuple[str, float]]
    # (function, fraction of samples where it was the innermost Python frame), largest first.
    innermost: list[tuple[str, float]]


# Innermost frames that mean "waiting", not working.
_WAITS = (".wait", ".select", ".sleep", ".get", "._wait_for_tstate_lock", ".acquire")

# Plumbing every thread has on its stack: left out of the inclusive counts so the work shows (an idle
# thread still shows as such in the innermost counts: threading.Condition.wait, selectors...).
_PLUMBING = ("threading", "queue", "asyncio", "selectors", "concurrent.futures", "torch.utils._contextlib")


def _name(frame: FrameType) -> str:
    code = frame.f_code
    module = frame.f_globals.get("__name__", "?")
    return f"{module}.{getattr(code, 'co_qualname', code.co_name)}"


class StackSampler:
    def __init__(self, interval_s: float = 0.002) -> None:
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._innermost: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self._samples: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.is_set():
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                thread = names.get(ident, str(ident))
                self._samples[thread] += 1
                self._innermost[thread][_name(frame)] += 1
                seen: set[str] = set()
                walker: FrameType | None = frame
                while walker is not None:
                    name = _name(walker)
                    if not name.startswith(_PLUMBING):
                        seen.add(name)
                    walker = walker.f_back
                self._inclusive[thread].update(seen)
            time.sleep(self._interval_s)

    def profiles(self, top: int = 15, min_samples: int = 10) -> list[ThreadProfile]:
        out: list[ThreadProfile] = []
        for thread, samples in self._samples.most_common():
            if samples < min_samples:
                continue
            waiting = sum(n for name, n in self._innermost[thread].items() if name.endswith(_WAITS))
            out.append(
                ThreadProfile(
                    thread=thread,
                    samples=samples,
                    busy=1 - waiting / samples,
                    inclusive=[(name, n / samples) for name, n in self._inclusive[thread].most_common(top)],
                    innermost=[(name, n / samples) for name, n in self._innermost[thread].most_common(top)],
                )
            )
        return sorted(out, key=lambda profile: -profile.busy)
