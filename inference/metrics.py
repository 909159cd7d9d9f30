"""The server's Prometheus metrics, as prometheus-client metric objects, so that the workers of
one ``recstack serve --workers N`` add up in its multiprocess mode.

`ServiceMetrics` holds them all; `StageMetrics` is what a serving pipeline records its requests
and stages into (in place of its `PipelineStats`). Counts that other parts keep in process (a
scorer's fallbacks, the shadow's calls, the impression log's losses) are copied in by their
increase since the last copy (`ServiceMetrics.copy`), after each request and before each scrape.
With ``PROMETHEUS_MULTIPROC_DIR`` set (by ``recstack serve --workers N`` before its workers
start), every worker writes its values there and `exposition` sums them over the workers
(`MultiProcessCollector`); the supervisor calls ``mark_process_dead`` for each worker that exits.
"""

from __future__ import annotations

import glob
import os
import threading
import time
from collections import Counter as Counts
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

from inference.pipeline.stats import LATENCY_BUCKETS_MS

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
PIPELINE_LABELS = ("version", "variant")


def multiprocess_mode() -> bool:
    """True when metric values go to files that the workers of one server share."""
    return bool(os.environ.get(MULTIPROCESS_DIR))


class WorkerFiles(multiprocess.MultiProcessCollector):
    """The workers' metric files, summed, skipping any still empty: prometheus-client creates a
    worker's file before it sizes it, and one read in between (a scrape while a worker starts, or
    a worker killed then) made every scrape fail (prometheus/client_python#1199). Its values count
    from the next scrape on."""

    def collect(self) -> Iterator:
        return self.merge([f for f in glob.glob(os.path.join(self._path, "*.db")) if _sized(f)], accumulate=True)


def _sized(path: str) -> bool:
    try:
        return os.path.getsize(path) > 0
    except OSError:  # removed since the listing: a dead worker's live gauges
        return False


class ServiceMetrics:
    """Every metric of one server: in its own registry in a single process (so each app counts
    from zero), in the shared files with several workers."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # no auto_describe: registering reads no worker's file
        if multiprocess_mode():
            WorkerFiles(self.registry)
        own = None if multiprocess_mode() else self.registry
        self.requests = Counter("recstack_requests", "Requests the pipeline ran (not those refused before, e.g. "
                                "k > max_k).", PIPELINE_LABELS, registry=own)
        self.failed_requests = Counter("recstack_failed_requests", "Requests the pipeline ran that failed.",
                                       PIPELINE_LABELS, registry=own)
        stage = ("stage", *PIPELINE_LABELS)
        self.stage_calls = Counter("recstack_stage_calls", "Completed calls of a pipeline stage.", stage, registry=own)
        self.stage_failures = Counter("recstack_stage_failures", "Calls of a candidate source that raised.", stage,
                                      registry=own)
        self.stage_timeouts = Counter("recstack_stage_timeouts", "Calls of a candidate source that timed out.", stage,
                                      registry=own)
        self.stage_latency = Histogram("recstack_stage_latency_seconds", "Latency of completed calls of a pipeline "
                                       "stage.", stage, buckets=[ms / 1000 for ms in LATENCY_BUCKETS_MS], registry=own)
        self.scorer_fallbacks = Counter("recstack_scorer_fallbacks", "Scorer calls that failed over to the next "
                                        "scorer, by scorer.", ("scorer", *PIPELINE_LABELS), registry=own)
        self.source_served = Counter("recstack_source_served", "Slots this server served from a candidate source.",
                                     ("source",), registry=own)
        self.source_rewards = Counter("recstack_source_rewards", "Rewards (clicks) this server credited to a "
                                      "candidate source's slots.", ("source",), registry=own)
        self.impressions_dropped = Counter("recstack_impressions_dropped", "Impressions and feedback the log could "
                                           "not write.", registry=own)
        self.shadow_calls = Counter("recstack_shadow_calls", "Requests mirrored to the shadow pipeline, by outcome.",
                                    ("version", "outcome"), registry=own)
        self.shed = Counter("recstack_shed_requests", "Requests answered 503 at once: no turn free in time "
                            "(queue_full, queue_wait: expected to wait too long, queue_timeout), or their budget "
                            "spent or client gone before a stage (deadline, abandoned).", ("reason",), registry=own)
        self.refused = Counter("recstack_refused_requests", "Requests refused before parsing (unauthorized, "
                               "body_too_large).", ("reason",), registry=own)
        self.in_flight = Gauge("recstack_in_flight_requests", "Requests holding a turn.", registry=own,
                               multiprocess_mode="livesum")
        self.degraded_requests = Counter("recstack_degraded_requests", "Requests answered without the Redis store, "
                                         "from the version's embedded snapshot.", registry=own)
        self.store_degraded = Gauge("recstack_store_degraded", "1 while the serving version answers without Redis "
                                    "(in any worker).", registry=own, multiprocess_mode="livemax")
        self._copied: Counts = Counts()  # what `copy` counted so far, by (counter, labels)
        self._lock = threading.Lock()

    def copy(self, counter: Counter, labels: tuple[str, ...], total: float) -> None:
        """Adds to ``counter``'s ``labels`` what ``total``, a count kept elsewhere in this process,
        grew by since the last copy."""
        with self._lock:
            grown = total - self._copied[counter, labels]
            if grown > 0:
                (counter.labels(*labels) if labels else counter).inc(grown)
                self._copied[counter, labels] = total

    def exposition(self) -> bytes:
        """The text format of every metric, summed over the workers in multiprocess mode."""
        return generate_latest(self.registry)


class StageMetrics:
    """What a serving pipeline records (the calls it makes on its `PipelineStats`) counted into
    ``metrics`` for one ``version`` and experiment arm (``variant``)."""

    def __init__(self, metrics: ServiceMetrics, version: str, variant: str) -> None:
        self.metrics, self.labels = metrics, (version, variant)
        self._requests = metrics.requests.labels(*self.labels)
        self._failed = metrics.failed_requests.labels(*self.labels)
        self._stages: dict[str, tuple] = {}  # stage -> its (calls, latency) children

    def record(self, stage: str, started: float, n_in: int, n_out: int) -> None:
        """One completed call of ``stage``, begun at ``time.perf_counter()`` = ``started``."""
        seconds = time.perf_counter() - started
        children = self._stages.get(stage)
        if children is None:
            children = self._stages[stage] = (self.metrics.stage_calls.labels(stage, *self.labels),
                                              self.metrics.stage_latency.labels(stage, *self.labels))
        children[0].inc()
        children[1].observe(seconds)

    def count_failure(self, stage: str, timed_out: bool) -> None:
        counter = self.metrics.stage_timeouts if timed_out else self.metrics.stage_failures
        counter.labels(stage, *self.labels).inc()

    @contextmanager
    def request(self) -> Iterator[None]:
        """Counts the request, and counts it failed when the block raises."""
        self._requests.inc()
        with self._failed.count_exceptions():
            yield
