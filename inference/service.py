"""The HTTP API over the pipeline: ``POST /recommend``, ``POST /feedback``, ``GET /healthz``,
``GET /metrics``.

`Recommender` holds the pipeline of the published artefact version through `LiveArtifacts`:
a new version is built, warmed up and must answer a probe query before it is swapped in, so a
version that cannot answer is refused and the previous one keeps serving. The pipeline it
replaces is closed `GRACE_S` later, once the requests that read it are done. Each answer gets a
request id; feedback on its items (a click) updates the `SourceBandit` that explore orderers
read, and answers and feedback go to the `ImpressionLog` when one is given, for off-policy
evaluation. `create_app` serves a recommender with FastAPI; `recstack serve` runs it with uvicorn.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi import Query as QueryParameter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from evaluation.shadow import ShadowRunner
from inference.impressions import Feedback, Impression, ImpressionLog
from inference.pipeline.bandits import SharedSourceBandit, SourceBandit
from inference.pipeline.executor import (
    LATENCY_BUCKETS_MS,
    Pipeline,
    PipelineConfig,
    PipelineStats,
    Response,
    build_pipeline,
    open_pipeline_version,
)
from inference.pipeline.types import Query
from inference.refresh.artifacts import LiveArtifacts
from inference.refresh.job import ServingVersion
from inference.store import StoreError, redis_address

log = logging.getLogger(__name__)

GRACE_S = 60.0  # a swapped-out pipeline is closed this long after the swap: longer than any request takes
MAX_RECENT_ITEMS = 1000  # the most recent items one request may send
MAX_REMEMBERED = 100_000  # answered requests whose items feedback can still name
CONTROL = "control"  # the arm of the live config in an experiment, and of every request outside one
PROMETHEUS_TEXT = "text/plain; version=0.0.4"


@dataclass(frozen=True)
class Serving:
    """One loaded version: its name, its warmed-up pipeline and, with a shadow config, the runner
    mirroring a sample of its requests to the shadow pipeline (or why there is none)."""

    version: str
    pipeline: Pipeline
    treatment: Pipeline | None = None  # the experiment's arm, when one runs
    shadow: ShadowRunner | None = None
    shadow_error: str | None = None

    def answer(self, query: Query, arm: str = CONTROL) -> Response:
        """The answer of ``arm``'s pipeline; a control request's shadow, if any, runs later, off this thread."""
        if arm != CONTROL:
            return self.treatment(query)
        return self.shadow(query) if self.shadow is not None else self.pipeline(query)

    def close(self) -> None:
        if self.shadow is not None:
            self.shadow.close()  # waits for the shadow calls it queued
            self.shadow.shadow.close(close_store=False)  # the store is the live pipeline's
        if self.treatment is not None:
            self.treatment.close(close_store=False)
        self.pipeline.close()


@dataclass(frozen=True)
class Experiment:
    """An A/B test: the users whose hashed id falls below ``share`` get the pipeline ``config``
    declares (the arm ``name``), everyone else the live config (`CONTROL`). The hash covers the
    name and the user id, so a user stays in one arm across requests, versions and servers, and
    two experiments split users independently; anonymous visitors are assigned per request."""

    name: str
    config: PipelineConfig
    share: float = 0.5

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) or self.name == CONTROL:
            raise ValueError(f"experiment name {self.name!r}; expected letters, digits, '_', '.' or '-', "
                             f"other than {CONTROL!r}")
        if not 0 < self.share < 1:
            raise ValueError(f"experiment share = {self.share!r}; expected a share of users in (0, 1)")

    def arm(self, user_id: int | None, request_id: str) -> str:
        """``name`` or `CONTROL` for a request of ``user_id`` (None: anonymous, split by ``request_id``)."""
        unit = f"user:{user_id}" if user_id is not None else f"request:{request_id}"
        digest = hashlib.blake2b(f"{self.name}/{unit}".encode(), digest_size=8).digest()
        return self.name if int.from_bytes(digest, "big") / 2**64 < self.share else CONTROL


@dataclass(frozen=True)
class Shadow:
    """A candidate pipeline config run beside the live one, on the same loaded version, for a
    seeded random ``sample`` share of requests; `GET /shadow` compares the last ``pairs`` answers."""

    config: PipelineConfig  # its `redis` is not used: the shadow reads the live pipeline's store
    sample: float = 0.1
    pairs: int = 1000

    def __post_init__(self) -> None:
        if not 0 < self.sample <= 1 or self.pairs < 1:
            raise ValueError(f"shadow sample = {self.sample!r}, pairs = {self.pairs!r}; expected a share in (0, 1] "
                             "and at least 1 pair")


@dataclass(frozen=True)
class Served:
    """One answered request: its id (for feedback), the version and experiment arm that answered, and the answer."""

    request_id: str
    version: str
    variant: str
    response: Response


class UnknownRequest(KeyError):
    """Feedback names a request id the recommender does not remember."""


class Recommender:
    """The pipeline ``config`` declares over the published version under ``root``.

    Each version is loaded, warmed up and must answer ``probe`` with at least one item before it
    serves. The default probe is an anonymous query for 10 items (a pipeline with
    ``allow_anonymous: false`` needs a probe with a user every version knows); its context must
    hold what the models read, e.g. {"hour": 12, "weekday": 3}. Once started, it looks for a new
    version every ``poll_s`` seconds. Call `close` when done (it does not close ``log``).

    ``bandit`` counts every served slot by source and the rewards `feedback` reports, across
    versions (and across servers, through Redis, when the config names a Redis store); feedback
    can name the items of the last `MAX_REMEMBERED` answered requests. With
    ``experiment``, each version also builds its arm's pipeline, which must answer the probe too.
    With ``shadow``, each version also builds the shadow pipeline; one that fails to build or warm
    up leaves the version serving without a shadow.
    """

    def __init__(self, root: Path, config: PipelineConfig, probe: Query | None = None, poll_s: float = 5.0,
                 log: ImpressionLog | None = None, shadow: Shadow | None = None,
                 experiment: Experiment | None = None) -> None:
        probe = probe or Query(user_id=None, k=min(10, config.max_k))
        if probe.user_id is None and not config.allow_anonymous:
            raise ValueError("the pipeline config has allow_anonymous: false, so it would refuse an anonymous "
                             "probe query; expected a probe with a known user (recstack serve --probe-user ID)")
        self.config, self.probe, self.log, self.shadow, self.experiment = config, probe, log, shadow, experiment
        # with a Redis store, every server behind the load balancer learns from all the traffic
        self.bandit = SharedSourceBandit(*redis_address(config.redis)) if config.redis else SourceBandit()
        self._served: OrderedDict[str, dict[int, str]] = OrderedDict()  # request id -> {item: source}
        self._lock = threading.Lock()
        self._latest: Serving | None = None  # what the last successful load built
        self._retiring: list[tuple[threading.Timer, Serving]] = []
        try:
            self.live: LiveArtifacts[Serving] = LiveArtifacts(root, self._load, poll_s)  # loads the current version
        except BaseException:
            self.bandit.close()
            raise

    def start(self) -> Recommender:
        """Polls for new versions in a background thread."""
        self.live.start()
        return self

    def recommend(self, query: Query) -> Served:
        """The serving version's answer to ``query``, counted in the bandit and logged."""
        serving = self.live.state  # read once: a swap during the request does not change its pipeline
        request_id = uuid.uuid4().hex
        arm = CONTROL if self.experiment is None else self.experiment.arm(query.user_id, request_id)
        response = serving.answer(query, arm)
        served = Served(request_id, serving.version, arm, response)
        items, sources = response.item_ids.tolist(), response.sources.tolist()
        self.bandit.served(sources)
        with self._lock:
            self._served[served.request_id] = dict(zip(items, sources, strict=True))
            while len(self._served) > MAX_REMEMBERED:
                self._served.popitem(last=False)
        if self.log is not None:
            self.log.write(Impression(
                served.request_id, time.time(), serving.version, arm, query.user_id, query.context, query.recent_items,
                query.k, tuple(items), tuple(sources), tuple(response.scores.tolist()),
                tuple(response.propensities.tolist()),
            ))
        return served

    def feedback(self, request_id: str, item_id: int, reward: float) -> str:
        """Credits ``reward`` in [0, 1] (a click: 1) for ``item_id`` of an answered request to the
        source that proposed it, which it returns; logs it. `UnknownRequest` for a request id not
        among the last `MAX_REMEMBERED` answered, ValueError for an item that request did not serve."""
        with self._lock:
            slots = self._served.get(request_id)
        if slots is None:
            raise UnknownRequest(f"request_id {request_id!r} is not among the last {MAX_REMEMBERED} answered requests")
        if item_id not in slots:
            raise ValueError(f"item_id {item_id} was not served in request {request_id!r}; "
                             f"it served {list(slots)[:20]}")
        self.bandit.rewarded(slots[item_id], reward)
        if self.log is not None:
            self.log.write(Feedback(request_id, item_id, reward, time.time()))
        return slots[item_id]

    def close(self) -> None:
        """Stops polling and closes every pipeline, the serving one included, and the bandit."""
        self.live.stop()
        with self._lock:
            for timer, serving in self._retiring:
                timer.cancel()
                serving.close()
            self._retiring.clear()
        self.live.state.close()
        self.bandit.close()

    def _load(self, directory: Path) -> Serving:
        """`LiveArtifacts`' loader: raises unless the version's pipeline answers the probe query."""
        version = open_pipeline_version(self.config, directory)
        pipeline = treatment = None
        try:
            pipeline = build_pipeline(self.config, version, self.bandit)
            self._probe(pipeline, directory)
            if self.experiment is not None:
                treatment = build_pipeline(self.experiment.config, version, self.bandit)
                self._probe(treatment, directory, f"experiment {self.experiment.name!r}: ")
        except BaseException:
            for built in (treatment, pipeline):
                if built is not None:
                    built.close(close_store=False)
            version.store.close()  # a Redis connection
            raise
        serving = self._with_shadow(Serving(directory.name, pipeline, treatment), version)
        # LiveArtifacts swaps in what a load returns, so what the previous load built retires
        previous, self._latest = self._latest, serving
        if previous is not None:
            self._retire(previous)
        return serving

    def _probe(self, pipeline: Pipeline, directory: Path, what: str = "") -> None:
        """Warms ``pipeline`` up; raises unless it answers the probe query (at most its max_k) with some items."""
        probe = dataclasses.replace(self.probe, k=min(self.probe.k, pipeline.max_k))
        pipeline.warm_up(probe)
        response = pipeline(probe)  # warm_up only logs failures; this call raises them
        if len(response.item_ids) == 0:
            raise ValueError(f"{directory}: {what}the probe query {probe} answered no items; expected some")
        pipeline.stats = PipelineStats()  # the probe is not traffic

    def _with_shadow(self, serving: Serving, version: ServingVersion) -> Serving:
        """``serving`` with the shadow pipeline over the same version, when one is configured and
        answers the probe query; otherwise without, and the reason."""
        if self.shadow is None:
            return serving
        shadow = None
        try:
            shadow = build_pipeline(self.shadow.config, version, self.bandit)  # explores as the live one learnt
            self._probe(shadow, version.directory, "shadow: ")
        except Exception as error:  # noqa: BLE001 -- a broken shadow must not stop the live version
            if shadow is not None:
                shadow.close(close_store=False)
            log.error("version %s serves without its shadow: %s: %s", serving.version, type(error).__name__, error)
            return dataclasses.replace(serving, shadow_error=f"{type(error).__name__}: {error}")
        runner = ShadowRunner(serving.pipeline, shadow, self.shadow.sample, max_pairs=self.shadow.pairs)
        return dataclasses.replace(serving, shadow=runner)

    def _retire(self, serving: Serving) -> None:
        timer = threading.Timer(GRACE_S, serving.close)
        timer.daemon = True
        with self._lock:
            self._retiring = [(t, s) for t, s in self._retiring if t.is_alive()]
            self._retiring.append((timer, serving))
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
    """The reply of ``POST /recommend``: its request id (for feedback), ranked items, and how many
    items each filter reason removed."""

    request_id: str
    version: str
    variant: str  # the experiment arm: "control" outside an experiment
    items: list[RecommendedItem]
    removed: dict[str, int]


class FeedbackRequest(_Strict):
    """The body of ``POST /feedback``: a reward for one item of an answered request."""

    request_id: str
    item_id: int
    reward: float = Field(1.0, ge=0, le=1)  # a click: 1


class FeedbackReceipt(_Strict):
    """The reply of ``POST /feedback``: the source credited."""

    source: str


class ShadowReport(_Strict):
    """The reply of ``GET /shadow``: the serving version's shadow calls and, once some completed,
    how the shadow's top ``k`` compared with the live answers (`evaluation.shadow.ShadowComparison`)."""

    version: str
    counts: dict[str, int]
    comparison: dict[str, object] | None


class Health(_Strict):
    """The reply of ``GET /healthz``: the serving version, and each refused version's error."""

    version: str
    refused: dict[str, str]


def create_app(recommender: Recommender) -> FastAPI:
    """The HTTP API over ``recommender``.

    ``POST /recommend`` answers 400 for a request the pipeline refuses (``k`` above ``max_k``, a
    user the config does not answer, a bad context) and 503 when a fail-closed source, every
    scorer or the Redis store fails. ``POST /feedback`` answers 404 for a request id it does not
    remember and 400 for an item that request did not serve. ``GET /metrics`` exposes the serving
    pipeline's `PipelineStats`, the bandit's counts per source and the impression log's losses.
    """
    app = FastAPI(title="recstack")

    @app.post("/recommend")
    def recommend(request: RecommendRequest) -> Recommendation:
        query = Query(request.user_id, request.context, tuple(request.recent_items), request.k)
        try:
            served = recommender.recommend(query)
        except ValueError as e:
            raise HTTPException(400, str(e)) from e
        except (RuntimeError, StoreError) as e:  # a SourceError, every scorer failed, or Redis is down
            log.warning("request %s failed: %s", query, e)
            raise HTTPException(503, str(e)) from e
        response = served.response
        items = [RecommendedItem(item_id=i, score=s, source=src, propensity=p)
                 for i, s, src, p in zip(response.item_ids.tolist(), response.scores.tolist(),
                                         response.sources.tolist(), response.propensities.tolist(), strict=True)]
        return Recommendation(request_id=served.request_id, version=served.version, variant=served.variant,
                              items=items, removed=Counter(response.reasons.tolist()))

    @app.post("/feedback")
    def feedback(request: FeedbackRequest) -> FeedbackReceipt:
        try:
            return FeedbackReceipt(source=recommender.feedback(request.request_id, request.item_id, request.reward))
        except UnknownRequest as e:
            raise HTTPException(404, e.args[0]) from e
        except ValueError as e:
            raise HTTPException(400, str(e)) from e

    @app.get("/shadow")
    def shadow(k: int = QueryParameter(10, ge=1)) -> ShadowReport:
        serving = recommender.live.state
        if serving.shadow is None:
            reason = serving.shadow_error or "no shadow config (recstack serve --shadow-config)"
            raise HTTPException(404, f"version {serving.version} has no shadow pipeline: {reason}")
        counts = serving.shadow.counts
        comparison = dataclasses.asdict(serving.shadow.report(k)) if counts["shadowed"] else None
        return ShadowReport(version=serving.version, counts=counts, comparison=comparison)

    @app.get("/healthz")
    def healthz() -> Health:
        return Health(version=recommender.live.version, refused=dict(recommender.live.refused))

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        serving = recommender.live.state
        snapshots = {CONTROL: serving.pipeline.stats.snapshot()}
        if serving.treatment is not None:
            snapshots[recommender.experiment.name] = serving.treatment.stats.snapshot()
        text = format_metrics(serving.version, snapshots)
        text += format_bandit_metrics(recommender.bandit.snapshot(),
                                      None if recommender.log is None else recommender.log.dropped)
        if serving.shadow is not None:
            text += format_shadow_metrics(serving.version, serving.shadow.counts)
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


def format_metrics(version: str, snapshots: dict[str, dict]) -> str:
    """`PipelineStats.snapshot()`s of ``version``'s pipelines by experiment arm (``variant``) in the
    Prometheus text format 0.0.4: the request counters, and per stage the calls, failures, timeouts
    and a latency histogram in seconds."""
    lines = []

    def family(name: str, kind: str, help_text: str) -> None:
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])

    for key, help_text in (("requests", "Requests the pipeline ran (not those refused before, e.g. k > max_k)."),
                           ("failed_requests", "Requests the pipeline ran that failed.")):
        family(f"recstack_{key}_total", "counter", help_text)
        lines.extend(f"recstack_{key}_total{_labels(version=version, variant=arm)} {snapshot[key]}"
                     for arm, snapshot in snapshots.items())
    stages = [(arm, stage, counts)
              for arm, snapshot in snapshots.items() for stage, counts in snapshot["stages"].items()]
    for key, help_text in (("calls", "Completed calls of a pipeline stage."),
                           ("failures", "Calls of a candidate source that raised."),
                           ("timeouts", "Calls of a candidate source that timed out.")):
        family(f"recstack_stage_{key}_total", "counter", help_text)
        lines.extend(f"recstack_stage_{key}_total{_labels(stage=stage, version=version, variant=arm)} {counts[key]}"
                     for arm, stage, counts in stages)
    name = "recstack_stage_latency_seconds"
    family(name, "histogram", "Latency of completed calls of a pipeline stage.")
    bounds = [f"{ms / 1000:g}" for ms in LATENCY_BUCKETS_MS] + ["+Inf"]
    for arm, stage, counts in stages:
        labels = {"stage": stage, "version": version, "variant": arm}
        cumulative = list(accumulate(counts["latency_ms"].values()))  # per-bucket counts, in bound order
        lines.extend(f"{name}_bucket{_labels(**labels, le=le)} {n}" for le, n in zip(bounds, cumulative, strict=True))
        lines.append(f"{name}_sum{_labels(**labels)} {counts['total_ms'] / 1000!r}")
        lines.append(f"{name}_count{_labels(**labels)} {cumulative[-1]}")
    return "\n".join(lines) + "\n"


def format_bandit_metrics(sources: dict[str, dict[str, float]], dropped: int | None) -> str:
    """A `SourceBandit.snapshot()` (served slots and rewards per source) and the impression log's
    dropped records (None: no log) in the Prometheus text format."""
    lines = []
    for key, help_text in (("served", "Slots served from a candidate source."),
                           ("rewards", "Rewards (clicks) credited to a candidate source's slots.")):
        name = f"recstack_source_{key}_total"
        lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} counter"])
        lines.extend(f"{name}{_labels(source=source)} {counts[key]!r}" for source, counts in sources.items())
    if dropped is not None:
        name = "recstack_impressions_dropped_total"
        lines.extend([f"# HELP {name} Impressions and feedback the log could not write.", f"# TYPE {name} counter",
                      f"{name} {dropped}"])
    return "\n".join(lines) + "\n"


def format_shadow_metrics(version: str, counts: dict[str, int]) -> str:
    """A `ShadowRunner`'s counts in the Prometheus text format: shadow calls by outcome."""
    name = "recstack_shadow_calls_total"
    lines = [f"# HELP {name} Requests mirrored to the shadow pipeline, by outcome.", f"# TYPE {name} counter"]
    lines.extend(f"{name}{_labels(version=version, outcome=outcome)} {counts[outcome]}"
                 for outcome in ("shadowed", "failed", "skipped"))
    return "\n".join(lines) + "\n"


def _labels(**labels: str) -> str:
    escaped = {k: v.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in escaped.items()) + "}"
