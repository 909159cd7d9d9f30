"""The HTTP API over the pipeline: ``POST /recommend``, ``GET /healthz``, ``GET /metrics``.

`Recommender` holds the pipeline of the published artefact version through `LiveArtifacts`:
a new version is built, warmed up and must answer a probe query before it is swapped in, so a
version that cannot answer is refused and the previous one keeps serving. The pipeline it
replaces is closed `GRACE_S` later, once the requests that read it are done. `create_app`
serves a recommender with FastAPI; `recstack serve` runs that app with uvicorn.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from inference.pipeline.executor import (
    LATENCY_BUCKETS_MS,
    Pipeline,
    PipelineConfig,
    PipelineStats,
    Response,
    build_pipeline,
)
from inference.pipeline.types import Query
from inference.refresh.artifacts import LiveArtifacts
from inference.refresh.job import open_version
from inference.store import StoreError

log = logging.getLogger(__name__)

GRACE_S = 60.0  # a swapped-out pipeline is closed this long after the swap: longer than any request takes
MAX_RECENT_ITEMS = 1000  # the most recent items one request may send
PROMETHEUS_TEXT = "text/plain; version=0.0.4"


@dataclass(frozen=True)
class Serving:
    """One loaded version: its name and its warmed-up pipeline."""

    version: str
    pipeline: Pipeline


class Recommender:
    """The pipeline ``config`` declares over the published version under ``root``.

    Each version is loaded, warmed up and must answer ``probe`` with at least one item before it
    serves. The default probe is an anonymous query for 10 items (a pipeline with
    ``allow_anonymous: false`` needs a probe with a user every version knows); its context must
    hold what the models read, e.g. {"hour": 12, "weekday": 3}. Once started, it looks for a new
    version every ``poll_s`` seconds. Call `close` when done.
    """

    def __init__(self, root: Path, config: PipelineConfig, probe: Query | None = None, poll_s: float = 5.0) -> None:
        probe = probe or Query(user_id=None, k=min(10, config.max_k))
        if probe.user_id is None and not config.allow_anonymous:
            raise ValueError("the pipeline config has allow_anonymous: false, so it would refuse an anonymous "
                             "probe query; expected a probe with a known user (recstack serve --probe-user ID)")
        self.config = config
        self.probe = probe
        self._lock = threading.Lock()
        self._latest: Pipeline | None = None  # the pipeline the last successful load built
        self._retiring: list[tuple[threading.Timer, Pipeline]] = []
        self.live: LiveArtifacts[Serving] = LiveArtifacts(root, self._load, poll_s)

    def start(self) -> Recommender:
        """Polls for new versions in a background thread."""
        self.live.start()
        return self

    def recommend(self, query: Query) -> tuple[str, Response]:
        """The serving version's name and its answer to ``query``."""
        serving = self.live.state  # read once: a swap during the request does not change its pipeline
        return serving.version, serving.pipeline(query)

    def close(self) -> None:
        """Stops polling and closes every pipeline, the serving one included."""
        self.live.stop()
        with self._lock:
            for timer, pipeline in self._retiring:
                timer.cancel()
                pipeline.close()
            self._retiring.clear()
        self.live.state.pipeline.close()

    def _load(self, directory: Path) -> Serving:
        """`LiveArtifacts`' loader: raises unless the version's pipeline answers the probe query."""
        pipeline = build_pipeline(self.config, open_version(directory))
        try:
            pipeline.warm_up(self.probe)
            response = pipeline(self.probe)  # warm_up only logs failures; this call raises them
            if len(response.item_ids) == 0:
                raise ValueError(f"{directory}: the warm-up query {self.probe} answered no items; expected some")
        except Exception:
            pipeline.close()
            raise
        pipeline.stats = PipelineStats()  # the probe is not traffic
        # LiveArtifacts swaps in what a load returns, so the pipeline built before now retires
        previous, self._latest = self._latest, pipeline
        if previous is not None:
            self._retire(previous)
        return Serving(directory.name, pipeline)

    def _retire(self, pipeline: Pipeline) -> None:
        timer = threading.Timer(GRACE_S, pipeline.close)
        timer.daemon = True
        with self._lock:
            self._retiring = [(t, p) for t, p in self._retiring if t.is_alive()]
            self._retiring.append((timer, pipeline))
        timer.start()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Strict):
    """The body of ``POST /recommend``: a `Query`."""

    user_id: int | None = None  # None: an anonymous visitor
    context: dict[str, bool | int | float | str] = {}
    recent_items: list[int] = Field([], max_length=MAX_RECENT_ITEMS)  # oldest first
    k: int = Field(10, ge=1)  # at most the config's max_k


class RecommendedItem(_Strict):
    item_id: int
    score: float
    source: str
    propensity: float


class Recommendation(_Strict):
    """The reply of ``POST /recommend``: ranked items, and how many items each filter reason removed."""

    version: str
    items: list[RecommendedItem]
    removed: dict[str, int]


class Health(_Strict):
    """The reply of ``GET /healthz``: the serving version, and each refused version's error."""

    version: str
    refused: dict[str, str]


def create_app(recommender: Recommender) -> FastAPI:
    """The HTTP API over ``recommender``.

    ``POST /recommend`` answers 400 for a request the pipeline refuses (``k`` above ``max_k``, a
    user the config does not answer, a bad context) and 503 when a fail-closed source, every
    scorer or the Redis store fails. ``GET /metrics`` exposes the serving pipeline's `PipelineStats`.
    """
    app = FastAPI(title="recstack")

    @app.post("/recommend")
    def recommend(request: RecommendRequest) -> Recommendation:
        query = Query(request.user_id, request.context, tuple(request.recent_items), request.k)
        try:
            version, response = recommender.recommend(query)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        except (RuntimeError, StoreError) as e:  # a SourceError, every scorer failed, or Redis is down
            log.warning("request %s failed: %s", query, e)
            raise HTTPException(503, str(e)) from e
        items = [RecommendedItem(item_id=i, score=s, source=src, propensity=p)
                 for i, s, src, p in zip(response.item_ids.tolist(), response.scores.tolist(),
                                         response.sources.tolist(), response.propensities.tolist(), strict=True)]
        return Recommendation(version=version, items=items, removed=Counter(response.reasons.tolist()))

    @app.get("/healthz")
    def healthz() -> Health:
        return Health(version=recommender.live.version, refused=dict(recommender.live.refused))

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        serving = recommender.live.state
        text = format_metrics(serving.version, serving.pipeline.stats.snapshot())
        return PlainTextResponse(text, media_type=PROMETHEUS_TEXT)

    return app


@contextmanager
def serve_in_thread(recommender: Recommender, start_timeout_s: float = 10.0) -> Iterator[str]:
    """Serves ``recommender``'s app with uvicorn on a free loopback port in a daemon thread of this
    process (tests, benchmarks, notebooks); yields its base URL and stops the server on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(recommender), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port} within {start_timeout_s} s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(start_timeout_s)


def format_metrics(version: str, snapshot: dict) -> str:
    """A `PipelineStats.snapshot()` of ``version`` in the Prometheus text format 0.0.4: the request
    counters, and per stage the calls, failures, timeouts and a latency histogram in seconds."""
    lines = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])

    for key, help_text in (("requests", "Requests the pipeline ran (not those refused before, e.g. k > max_k)."),
                           ("failed_requests", "Requests the pipeline ran that failed.")):
        family(f"recstack_{key}_total", "counter", help_text)
        lines.append(f"recstack_{key}_total{_labels(version=version)} {snapshot[key]}")
    stages = snapshot["stages"]
    for key, help_text in (("calls", "Completed calls of a pipeline stage."),
                           ("failures", "Calls of a candidate source that raised."),
                           ("timeouts", "Calls of a candidate source that timed out.")):
        family(f"recstack_stage_{key}_total", "counter", help_text)
        lines.extend(f"recstack_stage_{key}_total{_labels(stage=stage, version=version)} {counts[key]}"
                     for stage, counts in stages.items())
    name = "recstack_stage_latency_seconds"
    family(name, "histogram", "Latency of completed calls of a pipeline stage.")
    bounds = [f"{ms / 1000:g}" for ms in LATENCY_BUCKETS_MS] + ["+Inf"]
    for stage, counts in stages.items():
        cumulative = list(accumulate(counts["latency_ms"].values()))  # per-bucket counts, in bound order
        lines.extend(f"{name}_bucket{_labels(stage=stage, version=version, le=le)} {n}"
                     for le, n in zip(bounds, cumulative, strict=True))
        lines.append(f"{name}_sum{_labels(stage=stage, version=version)} {counts['total_ms'] / 1000!r}")
        lines.append(f"{name}_count{_labels(stage=stage, version=version)} {cumulative[-1]}")
    return "\n".join(lines) + "\n"


def _labels(**labels: str) -> str:
    escaped = {k: v.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in escaped.items()) + "}"
