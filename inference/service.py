"""The HTTP API over the pipeline: ``POST /recommend``, ``POST /feedback``, ``GET /healthz``,
``GET /metrics``.

`Recommender` holds the pipeline of the published artefact version through `LiveArtifacts`:
a new version is built, warmed up and must answer a probe query before it is swapped in, so a
version that cannot answer is refused and the previous one keeps serving. The pipeline it
replaces is closed as soon as no request reads it, and the memory it held goes back to the
system (`release_freed_memory`). Each answer gets a
request id; feedback on its items (a click) updates the `SourceBandit` that explore orderers
read, and answers and feedback go to the `ImpressionLog` when one is given, for off-policy
evaluation. `create_app` serves a recommender with FastAPI; `recstack serve` runs it with uvicorn.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi import Query as QueryParameter
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from evaluation.shadow import ShadowRunner
from inference.artifacts import LiveArtifacts
from inference.impressions import Feedback, Impression, ImpressionLog
from inference.memory import release_freed_memory
from inference.metrics import ServiceMetrics, StageMetrics
from inference.pipeline.bandits import SharedSourceBandit, SourceBandit, strategy_arm
from inference.pipeline.config import PipelineConfig
from inference.pipeline.executor import Budget, BudgetSpent, Pipeline, Response, build_pipeline, within
from inference.pipeline.types import Query
from inference.store import (
    EmbeddedStore,
    ItemRows,
    RedisStore,
    Store,
    StoreError,
    StoreUnavailable,
    redis_address,
    restore_version,
)
from inference.version import ServingVersion, open_version

log = logging.getLogger(__name__)

RETIRE_CHECK_S = 0.5  # how often a swapped-out version is checked for requests still reading it
HEALTH_WRITE_S = 1.0  # how often each worker of `recstack serve --workers N` writes its health (`HealthBoard`)
MAX_RECENT_ITEMS = 1000  # the most recent items one request may send
MAX_CONTEXT_KEYS = 64  # the most context features one request may send
MAX_CONTEXT_TEXT = 256  # the longest context name or text value
MAX_SHADOW_K = 1000
MAX_REMEMBERED_ANSWERS = 100_000  # answered requests feedback can name: the newest (`AnswerStore`)
MAX_REPORTED_ERRORS = 10  # validation errors a 422 body lists
EXCERPT_CHARS = 100  # the most of an input an error body quotes
CONTROL = "control"  # the arm of the live config in an experiment, and of every request outside one
OPEN_PATHS = ("/healthz",)  # answered without the API key
UNQUEUED_PATHS = ("/healthz", "/metrics")  # answered at any load, without waiting for a turn
RETRY_AFTER_S = 1
TURN_WEIGHT = 0.1  # of the latest turn in the running mean of how long admitted requests hold theirs
RETRY_AFTER = [(b"retry-after", str(RETRY_AFTER_S).encode())]
RETRY_AFTER_HEADER = {"Retry-After": str(RETRY_AFTER_S)}


@dataclass(frozen=True, eq=False)  # one per load: counted by identity (`Recommender._readers`)
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

    def pipelines(self, experiment: Experiment | None) -> dict[str, Pipeline]:
        """The live pipeline (`CONTROL`) and, in ``experiment``, its arm's, by arm."""
        pipelines = {CONTROL: self.pipeline}
        if self.treatment is not None:
            pipelines[experiment.name] = self.treatment
        return pipelines

    @property
    def degraded(self) -> str | None:
        """Why the version answers without its Redis store (`DegradingStore`), or None."""
        return getattr(self.pipeline.stages.hydrator.store, "degraded", None)

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
    degraded: bool = False  # answered from the version's embedded snapshot: Redis failed


class DegradingStore(Store):
    """Store ``version`` in Redis (``connect()``, a `RedisStore`) while Redis answers, and the
    version's embedded snapshot (``open_fallback()``, opened at the first failure) while it does
    not: a read that raises `StoreError` (Redis down, or back without the version) is answered
    from the snapshot, and the store stays ``degraded`` (why, for `/healthz`) until a read, tried
    again every ``retry_s`` by one request, succeeds. So a request never fails for Redis; it is
    only marked degraded. When Redis answers without the version (it restarted empty),
    ``restore()`` loads it there again in a background thread, one call at a time."""

    def __init__(self, version: str, connect: Callable[[], Store], open_fallback: Callable[[], Store],
                 restore: Callable[[], object] | None = None, retry_s: float = 1.0) -> None:
        self.version, self.retry_s = version, retry_s
        self._connect, self._open_fallback, self._restore = connect, open_fallback, restore
        self._primary: Store | None = None
        self._fallback: Store | None = None
        self._restoring: threading.Thread | None = None
        self._lock = threading.Lock()
        self._retry_at = 0.0
        self.degraded: str | None = None
        self._call("get_list", "popular")  # connects now, or starts degraded

    def user_features(self, user_id: int) -> dict | None:
        return self._call("user_features", user_id)

    def item_features(self, item_ids: np.ndarray) -> ItemRows:
        return self._call("item_features", item_ids)

    def get_list(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return self._call("get_list", name)

    def close(self) -> None:
        for store in (self._primary, self._fallback):
            if store is not None:
                store.close()

    def _call(self, operation: str, *args: object) -> object:
        if self._turn_to_try():
            try:
                if self._primary is None:
                    self._primary = self._connect()
                result = getattr(self._primary, operation)(*args)
            except StoreError as error:
                self._failed(error)
            else:
                if self.degraded is not None:
                    log.warning("store %s: redis answers again; leaving the degraded mode", self.version)
                    self.degraded = None
                return result
        with self._lock:
            if self._fallback is None:
                self._fallback = self._open_fallback()
        return getattr(self._fallback, operation)(*args)

    def _turn_to_try(self) -> bool:
        """True unless degraded and another request tried Redis less than ``retry_s`` ago."""
        with self._lock:
            if self.degraded is None:
                return True
            now = time.monotonic()
            if now < self._retry_at:
                return False
            self._retry_at = now + self.retry_s
            return True

    def _failed(self, error: StoreError) -> None:
        stale = None
        with self._lock:
            if self.degraded is None:
                log.error("store %s: %s; answering from the version's embedded snapshot (degraded)", self.version,
                          error)
            self._retry_at = time.monotonic() + self.retry_s
            if isinstance(error, StoreUnavailable):
                self.degraded = "redis is unavailable"
                return
            self.degraded = "redis does not hold the serving version"
            stale, self._primary = self._primary, None  # reopened once restored: its schema and base are read anew
            if self._restore is not None:
                self.degraded += "; loading it there again"
                if self._restoring is None or not self._restoring.is_alive():
                    self._restoring = threading.Thread(target=self._restore_version, name=f"restore-{self.version}",
                                                       daemon=True)
                    self._restoring.start()
        if stale is not None:
            stale.close()

    def _restore_version(self) -> None:
        log.warning("store %s: redis does not hold the version; loading it there from the version's snapshot",
                    self.version)
        try:
            self._restore()
        except Exception as error:  # noqa: BLE001 -- the next failed read tries again
            log.error("store %s: loading the version into redis failed: %s: %s", self.version,
                      type(error).__name__, error)


class AnswerStore:
    """What feedback needs of each answered request (each item's source, the strategy drawn), by
    request id, in SQLite: the newest ``max_rows`` answers, each one deleting the oldest past that.
    A row holds the request id and its k items and sources as JSON (at most ``max_k`` items;
    about 300 bytes on disk at k = 10, so 30 MB for `MAX_REMEMBERED_ANSWERS`). In a file (WAL mode),
    the workers of one server share it, so feedback finds an answer whichever worker gave it;
    ``":memory:"`` keeps it in this process. Thread-safe."""

    def __init__(self, path: str | Path = ":memory:", max_rows: int = MAX_REMEMBERED_ANSWERS) -> None:
        self.max_rows = max_rows
        self._lock = threading.Lock()  # one connection, shared by the request threads
        self._db = sqlite3.connect(path, timeout=10.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")  # the server's scratch file: it does not outlive the server
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (n INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, "
                         "slots TEXT NOT NULL, strategy TEXT)")

    def put(self, request_id: str, item_ids: list[int], sources: list[str], strategy: str | None) -> None:
        slots = json.dumps([item_ids, sources])
        with self._lock, self._db:  # one transaction
            n = self._db.execute("INSERT INTO answers (request_id, slots, strategy) VALUES (?, ?, ?)",
                                 (request_id, slots, strategy)).lastrowid
            self._db.execute("DELETE FROM answers WHERE n <= ?", (n - self.max_rows,))

    def get(self, request_id: str) -> tuple[dict[int, str], str | None] | None:
        """({item: source}, the strategy drawn or None) of ``request_id``, or None when not remembered."""
        with self._lock:
            row = self._db.execute("SELECT slots, strategy FROM answers WHERE request_id = ?", (request_id,)).fetchone()
        if row is None:
            return None
        items, sources = json.loads(row[0])
        return dict(zip(items, sources, strict=True)), row[1]

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM answers").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class UnknownRequest(KeyError):
    """Feedback names a request id the recommender does not remember."""


class Recommender:
    """The pipeline ``config`` declares over the published version under ``root``.

    Each version is loaded, warmed up and must answer ``probe`` with at least one item before it
    serves. The default probe is an anonymous query for 10 items (a pipeline with
    ``allow_anonymous: false`` needs a probe with a user every version knows); the context it
    leaves out is completed as any request's is (`PipelineConfig.time_features`). Once started, it looks for a new
    version every ``poll_s`` seconds. Call `close` when done (it does not close ``log``).

    ``bandit`` counts every served slot by source, and by strategy (`strategy_arm`) when a bandit
    orderer drew one for the request, and the rewards `feedback` reports to both, across
    versions (and across servers, through Redis, when the config names a Redis store); feedback
    can name the items of the newest `MAX_REMEMBERED_ANSWERS` answered requests, kept in the
    `AnswerStore` at ``answers`` (a SQLite file the workers of one server share; None: in this
    process). Its `ServiceMetrics` count what it serves and how (``metrics``). With
    ``experiment``, each version also builds its arm's pipeline, which must answer the probe too.
    With ``shadow``, each version also builds the shadow pipeline; one that fails to build or warm
    up leaves the version serving without a shadow.
    """

    def __init__(self, root: Path, config: PipelineConfig, probe: Query | None = None, poll_s: float = 5.0,
                 log: ImpressionLog | None = None, shadow: Shadow | None = None,
                 experiment: Experiment | None = None, answers: Path | None = None) -> None:
        probe = probe or Query(user_id=None, k=min(10, config.max_k))
        if probe.user_id is None and not config.allow_anonymous:
            raise ValueError("the pipeline config has allow_anonymous: false, so it would refuse an anonymous "
                             "probe query; expected a probe with a known user (recstack serve --probe-user ID)")
        self.config, self.probe, self.log, self.shadow, self.experiment = config, probe, log, shadow, experiment
        # with a Redis store, every server behind the load balancer learns from all the traffic
        self.bandit = SharedSourceBandit(*redis_address(config.redis)) if config.redis else SourceBandit()
        self.metrics = ServiceMetrics()
        self._answers = AnswerStore(answers or ":memory:")
        self._lock = threading.Lock()
        self._latest: Serving | None = None  # what the last successful load built: it serves, or is about to
        self._readers: Counter[Serving] = Counter()  # requests reading each version
        self._retired: set[Serving] = set()  # replaced by a newer load; closed once nothing reads them
        try:
            self.live: LiveArtifacts[Serving] = LiveArtifacts(root, self._load, poll_s)  # loads the current version
        except BaseException:
            self.bandit.close()
            self._answers.close()
            raise

    def start(self) -> Recommender:
        """Polls for new versions in a background thread."""
        self.live.start()
        return self

    def recommend(self, query: Query) -> Served:
        """The serving version's answer to ``query``, counted in the bandit and logged."""
        request_id = uuid.uuid4().hex
        arm = CONTROL if self.experiment is None else self.experiment.arm(query.user_id, request_id)
        serving = self._lease()  # read once: a swap during the request neither changes nor closes its pipeline
        try:
            response = serving.answer(query, arm)
        finally:
            self._release(serving)
        served = Served(request_id, serving.version, arm, response, serving.degraded is not None)
        if served.degraded:
            self.metrics.degraded_requests.inc()
        items, sources = response.item_ids.tolist(), response.sources.tolist()
        strategy = response.strategy  # drawn by a bandit orderer among strategies, or None
        drawn = None if strategy is None else strategy.name
        self.bandit.served(sources)
        slots = Counter(sources)
        if strategy is not None:
            self.bandit.served([strategy_arm(drawn)] * len(items))  # its reward per slot, as a source's
            slots[strategy_arm(drawn)] = len(items)
        for source, n in slots.items():
            self.metrics.source_served.labels(source).inc(n)
        self._answers.put(served.request_id, items, sources, drawn)
        if self.log is not None:
            self.log.write(Impression(
                served.request_id, time.time(), serving.version, arm, query.user_id, query.context, query.recent_items,
                query.k, tuple(items), tuple(sources), tuple(response.scores.tolist()),
                tuple(response.propensities.tolist()), drawn, None if strategy is None else strategy.propensity,
            ))
        self.update_metrics(serving)
        return served

    def feedback(self, request_id: str, item_id: int, reward: float) -> tuple[str, str | None]:
        """Credits ``reward`` in [0, 1] (a click: 1) for ``item_id`` of an answered request to the
        source that proposed it and to the strategy drawn for the request (None: none), which it
        returns; logs it. `UnknownRequest` for a request id not among those remembered,
        ValueError for an item that request did not serve."""
        slots, strategy = self._answers.get(request_id) or (None, None)
        if slots is None:
            raise UnknownRequest(f"request_id {request_id!r} is not among the recently answered requests")
        if item_id not in slots:
            raise ValueError(f"item_id {item_id} was not served in request {request_id!r}; "
                             f"it served {list(slots)[:20]}")
        credited = [slots[item_id]] + ([] if strategy is None else [strategy_arm(strategy)])
        for arm in credited:
            self.bandit.rewarded(arm, reward)
            self.metrics.source_rewards.labels(arm).inc(reward)
        if self.log is not None:
            self.log.write(Feedback(request_id, item_id, reward, time.time()))
        return slots[item_id], strategy

    def close(self) -> None:
        """Stops polling and closes every pipeline, the serving one included, and the bandit."""
        self.live.stop()
        with self._lock:
            retired, self._retired = self._retired, set()
        for serving in retired:
            serving.close()
        self.live.state.close()
        self.bandit.close()
        self._answers.close()

    def update_metrics(self, serving: Serving | None = None) -> None:
        """Copies into `metrics` what other parts count in this process for ``serving`` (default:
        the serving version): its scorers' fallbacks, its shadow's calls, whether it is degraded;
        and the impression log's losses. Called after each request and before each scrape."""
        serving = serving or self.live.state
        metrics = self.metrics
        for arm, pipeline in serving.pipelines(self.experiment).items():
            for scorer, n in list(getattr(pipeline.stages.scorer, "fallbacks", {}).items()):
                metrics.copy(metrics.scorer_fallbacks, (scorer, serving.version, arm), n)
        if serving.shadow is not None:
            counts = serving.shadow.counts
            for outcome in ("shadowed", "failed", "skipped"):
                metrics.copy(metrics.shadow_calls, (serving.version, outcome), counts[outcome])
        if self.log is not None:
            metrics.copy(metrics.impressions_dropped, (), self.log.dropped)
        metrics.store_degraded.set(float(serving.degraded is not None))

    def _load(self, directory: Path) -> Serving:
        """`LiveArtifacts`' loader: raises unless the version's pipeline answers the probe query."""
        version = self._open(directory)
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
        for arm, built in serving.pipelines(self.experiment).items():  # counted from here on: the probe is not traffic
            built.stats = StageMetrics(self.metrics, serving.version, arm)
        # LiveArtifacts swaps in what a load returns, so what the previous load built retires
        previous, self._latest = self._latest, serving
        if previous is not None:
            self._retire(previous)
        return serving

    def _open(self, directory: Path) -> ServingVersion:
        """The version in ``directory``; with a Redis store in the config, a `DegradingStore` over
        the version's keys there and its embedded snapshot, which loads the version into Redis
        again while it is the one served (or being loaded first) and Redis lacks it."""
        if self.config.redis is None:
            return open_version(directory)
        host, port = redis_address(self.config.redis)

        def open_store(version: str) -> Store:
            def restore() -> None:  # only the version this server answers with, not one it retired
                if self._latest is None or self._latest.version == directory.name:
                    restore_version(directory / "store", host, port, version)

            return DegradingStore(version, lambda: RedisStore(host, port, version, self.config.redis_timeout_s),
                                  lambda: EmbeddedStore.open(directory / "store", version), restore)

        return open_version(directory, open_store)

    def _probe(self, pipeline: Pipeline, directory: Path, what: str = "") -> None:
        """Warms ``pipeline`` up; raises unless it answers the probe query (at most its max_k) with some items."""
        probe = dataclasses.replace(self.probe, k=min(self.probe.k, pipeline.max_k))
        pipeline.warm_up(probe)
        response = pipeline(probe)  # warm_up only logs failures; this call raises them
        if len(response.item_ids) == 0:
            raise ValueError(f"{directory}: {what}the probe query {probe} answered no items; expected some")

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

    def _lease(self) -> Serving:
        """The serving state, held open for the caller until it calls `_release`."""
        with self._lock:
            serving = self.live.state
            self._readers[serving] += 1
        return serving

    def _release(self, serving: Serving) -> None:
        with self._lock:
            self._readers[serving] -= 1
            if not self._readers[serving]:
                del self._readers[serving]
        self._close_retired(serving)

    def _retire(self, serving: Serving) -> None:
        """Closes ``serving``, which the load in progress replaces, once it stops serving (the
        swap follows the load) and the last request reading it is done; a request's `_release`
        or a check every `RETIRE_CHECK_S`, whichever comes first."""
        with self._lock:
            self._retired.add(serving)

        def close_when_idle() -> None:
            while not self._close_retired(serving):
                time.sleep(RETIRE_CHECK_S)

        threading.Thread(target=close_when_idle, name=f"retire-{serving.version}", daemon=True).start()

    def _close_retired(self, serving: Serving) -> bool:
        """Closes ``serving`` if it retired, serves no more and no request reads it; False while it must wait."""
        with self._lock:
            if serving not in self._retired:
                return True  # not retired, or already closed
            if self._readers[serving] or serving is self.live.state:
                return False
            self._retired.remove(serving)
        serving.close()
        release_freed_memory()
        log.info("closed version %s's pipelines", serving.version)
        return True


Int64 = Annotated[int, Field(ge=-(2**63), lt=2**63)]
ContextKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CONTEXT_TEXT)]
ContextValue = bool | Int64 | float | Annotated[str, StringConstraints(max_length=MAX_CONTEXT_TEXT)]
DisplayScalar = bool | int | float | str | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # NaN and Infinity are not JSON numbers


class RecommendRequest(_Strict):
    """The body of ``POST /recommend``: a `Query`. Context features it leaves out are derived
    from the request time or read as missing (see `PipelineConfig.time_features`)."""

    user_id: Int64 | None = None  # None: an anonymous visitor
    context: dict[ContextKey, ContextValue] = Field({}, max_length=MAX_CONTEXT_KEYS)
    recent_items: list[Int64] = Field([], max_length=MAX_RECENT_ITEMS)  # oldest first
    k: int = Field(10, ge=1, le=2**31)  # at most the config's max_k


class RecommendedItem(_Strict):
    item_id: int
    score: float
    source: str
    propensity: float | None  # None: the orderer chose deterministically with no defined propensity (NaN)
    # the item columns the pipeline config's `display` names, e.g. {"title": ...}; left out when it names none
    display: dict[str, DisplayScalar | list[DisplayScalar]] | None = Field(None, exclude_if=lambda shown: shown is None)


class Recommendation(_Strict):
    """The reply of ``POST /recommend``: its request id (for feedback), ranked items, and how many
    items each filter reason removed."""

    request_id: str
    version: str
    variant: str  # the experiment arm: "control" outside an experiment
    strategy: str | None  # the strategy a bandit orderer drew, which feedback credits too; None: none
    items: list[RecommendedItem]
    removed: dict[str, int]
    degraded: bool  # answered without the Redis store, from the version's own snapshot


class FeedbackRequest(_Strict):
    """The body of ``POST /feedback``: a reward for one item of an answered request."""

    request_id: str = Field(max_length=64)
    item_id: Int64
    reward: float = Field(1.0, ge=0, le=1)  # a click: 1


class FeedbackReceipt(_Strict):
    """The reply of ``POST /feedback``: the source credited, and the strategy (None: none)."""

    source: str
    strategy: str | None


class ShadowReport(_Strict):
    """The reply of ``GET /shadow``: the serving version's shadow calls and, once some completed,
    how the shadow's top ``k`` compared with the live answers (`evaluation.shadow.ShadowComparison`)."""

    version: str
    counts: dict[str, int]
    comparison: dict[str, object] | None


class WorkerHealth(_Strict):
    """One server process's serving version, each refused version's error, and why it answers
    degraded (without Redis), if it does."""

    version: str
    refused: dict[str, str]
    degraded: str | None


class Health(WorkerHealth):
    """The reply of ``GET /healthz``: the answering process's health and, under ``recstack serve
    --workers N``, every worker's by pid (`HealthBoard`; None for a single process)."""

    workers: dict[str, WorkerHealth] | None = None


def worker_health(recommender: Recommender) -> WorkerHealth:
    live = recommender.live
    return WorkerHealth(version=live.version, refused=dict(live.refused), degraded=live.state.degraded)


class HealthBoard:
    """The health of every worker of one server, in a directory they share. Each worker writes its
    own ``<pid>.json`` every `HEALTH_WRITE_S` seconds (replacing it whole) and removes it when
    closed; a file not rewritten for three times that, a killed or stalled worker's, no longer
    counts."""

    def __init__(self, directory: Path, recommender: Recommender) -> None:
        self.directory, self.recommender = Path(directory), recommender
        self.directory.mkdir(parents=True, exist_ok=True)
        self._path = self.directory / f"{os.getpid()}.json"  # this worker's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._write_every, name="health-board", daemon=True)

    def start(self) -> HealthBoard:
        self._write()
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._path.unlink(missing_ok=True)

    def read(self) -> dict[str, WorkerHealth]:
        """Every worker's health that is fresh, by pid; this process's as it is now."""
        workers, oldest = {}, time.time() - 3 * HEALTH_WRITE_S
        for path in sorted(self.directory.glob("*.json")):
            try:
                if path.stat().st_mtime >= oldest:
                    workers[path.stem] = WorkerHealth.model_validate_json(path.read_bytes())
            except (OSError, ValueError):  # removed, or replaced while read: the next read has it
                continue
        workers[self._path.stem] = worker_health(self.recommender)
        return workers

    def _write(self) -> None:
        written = self._path.with_suffix(".tmp")
        written.write_text(worker_health(self.recommender).model_dump_json())
        written.replace(self._path)

    def _write_every(self) -> None:
        while not self._stop.wait(HEALTH_WRITE_S):
            try:
                self._write()
            except OSError as error:  # a full disk: /healthz reads this worker as stale
                log.warning("health board %s: %s", self.directory, error)


@dataclass(frozen=True)
class Limits:
    """What one server admits. At most ``max_in_flight`` requests run at once; up to ``max_queue``
    more wait for a turn, each at most ``queue_timeout_s``; the others, and those whose wait would
    be longer (`Guard`), are shed at once (503 with ``Retry-After``). An admitted request has
    ``request_timeout_s`` from its arrival (its `Budget`). A body over ``max_body_bytes`` is
    refused (413) before the rest of it is read. ``/healthz`` and ``/metrics`` are never queued."""

    max_in_flight: int = 2  # requests compute under one GIL: more at once only slows each of them
    max_queue: int = 8  # a full queue sheds at once; a longer one only adds waiting to every answer
    queue_timeout_s: float = 0.04  # a shed answer comes this soon; longer waits bought little goodput under load
    request_timeout_s: float = 1.0
    max_body_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.max_in_flight < 1 or self.max_queue < 0 or self.max_body_bytes < 1:
            raise ValueError(f"max_in_flight = {self.max_in_flight}, max_queue = {self.max_queue}, max_body_bytes = "
                             f"{self.max_body_bytes}; expected at least 1, 0 and 1")
        if not 0 < self.queue_timeout_s < self.request_timeout_s:
            raise ValueError(f"queue_timeout_s = {self.queue_timeout_s}, request_timeout_s = {self.request_timeout_s}; "
                             "expected 0 < queue_timeout_s < request_timeout_s")


class Guard:
    """Pure ASGI middleware in front of the API: the API key, the body size and admission
    (`Limits`), before any request is parsed. Counts in ``metrics`` the requests refused (401,
    413) and shed (503) by reason, and those in flight (holding a turn, ``turn_s`` long on
    average: a running mean). Each admitted request's `Budget` is in its ``state``; its
    ``abandoned`` event is set when the client goes away."""

    def __init__(self, app: ASGIApp, limits: Limits, api_key: str | None, metrics: ServiceMetrics) -> None:
        self.app, self.limits, self.api_key, self.metrics = app, limits, api_key, metrics
        self._waiting = 0
        self.turn_s = 0.0
        self._turns = asyncio.Semaphore(limits.max_in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        budget = Budget(time.monotonic() + self.limits.request_timeout_s)
        path = scope["path"]
        if self.api_key is not None and path not in OPEN_PATHS and not self._authorised(scope):
            self.metrics.refused.labels("unauthorized").inc()
            await reply(send, 401, "a valid API key is required (Authorization: Bearer <key>, or X-API-Key)",
                        [(b"www-authenticate", b"Bearer")])
            return
        try:
            body = await self._body(scope, receive)
        except _ClientGone:
            return
        if body is None:
            self.metrics.refused.labels("body_too_large").inc()
            await reply(send, 413, f"the request body exceeds {self.limits.max_body_bytes} bytes")
            return
        if path in UNQUEUED_PATHS:
            await self._run(scope, receive, send, body, budget)
            return
        shed = await self._admit()
        if shed is not None:
            self.metrics.shed.labels(shed).inc()
            await reply(send, 503, "the server is at capacity; retry later", RETRY_AFTER)
            return
        self.metrics.in_flight.inc()
        started = time.monotonic()
        try:
            await self._run(scope, receive, send, body, budget)
        finally:
            self.metrics.in_flight.dec()
            turn_s = time.monotonic() - started
            self.turn_s = turn_s if not self.turn_s else self.turn_s + TURN_WEIGHT * (turn_s - self.turn_s)
            self._turns.release()

    def _authorised(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
        return hmac.compare_digest(given, self.api_key.encode())

    async def _body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it is known to exceed the limit (nothing more is read)."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.limits.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limits.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _admit(self) -> str | None:
        """Takes a turn, waiting at most ``queue_timeout_s``; or the reason the request is shed,
        at once when the queue is full or when the turns ahead of it (those waiting and its own,
        ``max_in_flight`` at a time, each `turn_s`) would outlast that wait: a request that would
        only time out in the queue is told so without waiting, and the event loop has less to do."""
        if self._turns.locked():
            if self._waiting >= self.limits.max_queue:
                return "queue_full"
            if (self._waiting + 1) * self.turn_s > self.limits.queue_timeout_s * self.limits.max_in_flight:
                return "queue_wait"
        self._waiting += 1
        try:
            await asyncio.wait_for(self._turns.acquire(), self.limits.queue_timeout_s)
        except TimeoutError:
            return "queue_timeout"
        finally:
            self._waiting -= 1
        return None

    async def _run(self, scope: Scope, receive: Receive, send: Send, body: bytes, budget: Budget) -> None:
        """The app on the request whose ``body`` was read; a disconnect from then on abandons ``budget``."""
        scope.setdefault("state", {})["budget"] = budget
        gone = asyncio.Event()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            budget.abandoned.set()
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, replay, send)
        finally:
            watcher.cancel()


class _ClientGone(Exception):
    """The client disconnected before its request body arrived."""


async def reply(send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Sends a JSON ``{"detail": detail}`` response with ``status`` (ASGI)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``value`` as short text: at most ``limit`` characters of it, so an error never echoes a large input."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def create_app(recommender: Recommender, limits: Limits = Limits(), api_key: str | None = None,
               board: HealthBoard | None = None) -> FastAPI:
    """The HTTP API over ``recommender``, behind a `Guard` (``limits``, and ``api_key`` when given:
    every path but ``/healthz`` then needs it). ``GET /healthz`` also lists every worker's health
    from ``board`` when given.

    ``POST /recommend`` answers 400 for a request the pipeline refuses (``k`` above ``max_k``, a
    user the config does not answer, a bad context) and 503, with ``Retry-After``, when it cannot
    answer in time or a fail-closed source, every scorer or the Redis store fails. ``POST
    /feedback`` answers 404 for a request id it does not remember and 400 for an item that request
    did not serve. A body that fails validation is 422, naming the fields, with short excerpts of
    the values. Error bodies name no internals (addresses, columns); the log has the details.
    ``GET /metrics`` exposes the recommender's `ServiceMetrics`: per version and arm its pipelines'
    requests and stages, the slots served and rewarded per source, the impression log's losses
    and the requests the `Guard` turned away (summed over the workers of ``recstack serve
    --workers N``).
    """
    app = FastAPI(title="recstack")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e["loc"]), "msg": excerpt(e["msg"]), "type": e["type"], "input": excerpt(e.get("input"))}
                  for e in error.errors()[:MAX_REPORTED_ERRORS]]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.post("/recommend")
    def recommend(body: RecommendRequest, request: Request) -> Recommendation:
        query = Query(body.user_id, body.context, tuple(body.recent_items), body.k)
        budget: Budget = request.state.budget
        try:
            with within(budget):
                served = recommender.recommend(query)
        except ValueError as e:
            raise HTTPException(400, excerpt(str(e))) from e
        except BudgetSpent as e:
            recommender.metrics.shed.labels("abandoned" if budget.abandoned.is_set() else "deadline").inc()
            raise HTTPException(503, "the request could not be answered in time; retry later",
                                RETRY_AFTER_HEADER) from e
        except (RuntimeError, StoreError) as e:  # a SourceError, every scorer failed, or Redis is down
            log.warning("request %s failed: %s", query, e)
            raise HTTPException(503, "the recommendation could not be computed; retry later", RETRY_AFTER_HEADER) from e
        response = served.response
        items = [RecommendedItem(item_id=i, score=s, source=src, propensity=None if math.isnan(p) else p,
                                 display=shown or None)
                 for i, s, src, p, shown in zip(response.item_ids.tolist(), response.scores.tolist(),
                                                response.sources.tolist(), response.propensities.tolist(),
                                                response.display_rows(), strict=True)]
        strategy = None if response.strategy is None else response.strategy.name
        return Recommendation(request_id=served.request_id, version=served.version, variant=served.variant,
                              strategy=strategy, items=items, removed=Counter(response.reasons.tolist()),
                              degraded=served.degraded)

    @app.post("/feedback")
    def feedback(body: FeedbackRequest) -> FeedbackReceipt:
        try:
            source, strategy = recommender.feedback(body.request_id, body.item_id, body.reward)
            return FeedbackReceipt(source=source, strategy=strategy)
        except UnknownRequest as e:
            raise HTTPException(404, excerpt(e.args[0])) from e
        except ValueError as e:
            raise HTTPException(400, excerpt(str(e))) from e

    @app.get("/shadow")
    def shadow(k: int = QueryParameter(10, ge=1, le=MAX_SHADOW_K)) -> ShadowReport:
        serving = recommender.live.state
        if serving.shadow is None:
            reason = serving.shadow_error or "no shadow config (recstack serve --shadow-config)"
            raise HTTPException(404, f"version {serving.version} has no shadow pipeline: {excerpt(reason)}")
        counts = serving.shadow.counts
        comparison = dataclasses.asdict(serving.shadow.report(k)) if counts["shadowed"] else None
        return ShadowReport(version=serving.version, counts=counts, comparison=comparison)

    @app.get("/healthz")
    async def healthz() -> Health:  # on the event loop: it answers while every worker thread is busy
        return Health(**dict(worker_health(recommender)), workers=None if board is None else board.read())

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        recommender.update_metrics()
        return PlainTextResponse(recommender.metrics.exposition(), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    return Guard(app, limits, api_key, recommender.metrics)


@contextmanager
def serve_in_thread(recommender: Recommender, start_timeout_s: float = 10.0, limits: Limits = Limits(),
                    api_key: str | None = None) -> Iterator[str]:
    """Serves ``create_app(recommender, limits, api_key)`` with uvicorn on a free loopback port in
    a daemon thread of this process (tests, benchmarks, notebooks); yields its base URL and stops
    the server on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(recommender, limits, api_key)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
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
