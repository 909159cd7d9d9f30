"""`PipelineStats`: a pipeline's request and per-stage counters, with latency histograms."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)  # histogram upper bounds


class PipelineStats:
    """Thread-safe counters of a pipeline: requests and failed requests, and per stage
    (``source:<name>``, ``blend``, ``filter:<name>``, ``hydrate``, ``scorer``, ``orderer:<name>``)
    the completed calls, a latency histogram, candidates in (a source's: its quota) and out, and
    for sources the failures and timeouts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = {"requests": 0, "failed_requests": 0}
        self._stages: dict[str, dict] = {}

    def record(self, stage: str, started: float, n_in: int, n_out: int) -> None:
        """One completed call of ``stage``, begun at ``time.perf_counter()`` = ``started``."""
        ms = (time.perf_counter() - started) * 1000
        with self._lock:
            counts = self._stage(stage)
            counts["calls"] += 1
            counts["in"] += n_in
            counts["out"] += n_out
            counts["total_ms"] += ms
            counts["latency"][bisect.bisect_left(LATENCY_BUCKETS_MS, ms)] += 1

    def count_failure(self, stage: str, timed_out: bool) -> None:
        with self._lock:
            self._stage(stage)["timeouts" if timed_out else "failures"] += 1

    @contextmanager
    def request(self) -> Iterator[None]:
        """Counts the request, and counts it failed when the block raises."""
        with self._lock:
            self._requests["requests"] += 1
        try:
            yield
        except Exception:
            with self._lock:
                self._requests["failed_requests"] += 1
            raise

    def snapshot(self) -> dict:
        """A copy: {"requests", "failed_requests", "stages": {stage: {"calls", "in", "out", "total_ms",
        "failures", "timeouts", "latency_ms": {"<=1": calls, ..., ">5000": calls}}}}."""
        labels = [f"<={b}" for b in LATENCY_BUCKETS_MS] + [f">{LATENCY_BUCKETS_MS[-1]}"]
        with self._lock:
            stages = {name: {**{k: v for k, v in counts.items() if k != "latency"},
                             "latency_ms": dict(zip(labels, counts["latency"], strict=True))}
                      for name, counts in self._stages.items()}
            return {**self._requests, "stages": stages}

    def _stage(self, stage: str) -> dict:
        return self._stages.setdefault(stage, {"calls": 0, "in": 0, "out": 0, "total_ms": 0.0, "failures": 0,
                                               "timeouts": 0, "latency": [0] * (len(LATENCY_BUCKETS_MS) + 1)})
