"""The request handler: one generic loop over the stages a YAML config declares.

    Query -> sources (concurrently, each with a quota, a timeout and a fail-open flag)
          -> blend (each item once; the first source in config order keeps it)
          -> filters (in config order) -> hydrate (request + item features; with `blend: scoring`,
             each candidate's source and retrieval score) -> scorer -> orderers
          -> Response (items, scores, source of each item, propensity of each slot, removal reasons,
             the strategy a bandit orderer drew)

Start with `open_pipeline`, which opens a version directory with the store a `PipelineConfig`
(config.py; see configs/pipeline.yaml) names and builds its `Pipeline` (`build_pipeline`, over a
loaded `ServingVersion`). `PipelineStats` (stats.py) measures every stage.
Sources run on a thread pool the pipeline shares between requests; a source that times out
keeps its thread until it returns, so its timeout bounds the request, not the source's work.
A server bounds each request by a `Budget` (`within`): every source waits at most the budget's
remaining time, and the stages after retrieval do not start once it is spent or its client is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd

from data.columns import FeatureColumns
from data.schema import Schema
from data.tables import KEYS
from inference.pipeline.bandits import SourceBandit
from inference.pipeline.config import TIME_FIELDS, PipelineConfig, time_zone
from inference.pipeline.filters import Filter
from inference.pipeline.orderers import Orderer, Strategy, StrategyBanditOrderer, by_score
from inference.pipeline.scorers import FallbackScorer, ModelInputs, Scorer
from inference.pipeline.sources import QUERY_TOWER, AnnSource, CandidateSource, request_features
from inference.pipeline.stats import PipelineStats
from inference.pipeline.types import CANDIDATE_FEATURES, Candidates, Query
from inference.store import RedisStore, Store, redis_address
from inference.version import ServingVersion, open_version

log = logging.getLogger(__name__)


class SourceError(RuntimeError):
    """A fail-closed source raised or timed out, so the request fails."""


class BudgetSpent(RuntimeError):
    """A request's `Budget` ran out, or its client went away, before a stage could start."""


@dataclass(frozen=True)
class Budget:
    """How long a request may still run: until ``deadline`` (``time.monotonic()``), and only while
    its client waits (``abandoned`` is set when it goes away)."""

    deadline: float
    abandoned: threading.Event = field(default_factory=threading.Event)

    def remaining(self) -> float:
        """Seconds left, 0 once the deadline passed or the client went away."""
        return 0.0 if self.abandoned.is_set() else max(0.0, self.deadline - time.monotonic())

    def check(self, stage: str) -> None:
        """Raises `BudgetSpent` unless ``stage`` may still start."""
        if self.abandoned.is_set():
            raise BudgetSpent(f"the client went away before stage {stage!r}")
        if time.monotonic() >= self.deadline:
            raise BudgetSpent(f"the request's time budget was spent before stage {stage!r}")


_budget: ContextVar[Budget | None] = ContextVar("request_budget", default=None)


@contextmanager
def within(budget: Budget) -> Iterator[None]:
    """Pipelines called in this block (on this thread, shadows excepted) stay within ``budget``."""
    token = _budget.set(budget)
    try:
        yield
    finally:
        _budget.reset(token)


class ContextCompleter:
    """Fills in the request-time features (``features``) a query's context lacks: each one that
    ``derived`` maps to a `TIME_FIELDS` key from the request's clock in ``zone``; any other as None,
    which the encoders read as a missing value (the out-of-vocabulary id, the train mean)."""

    def __init__(self, features: list[str], derived: dict[str, str], zone: ZoneInfo) -> None:
        self.features, self.derived, self.zone = features, derived, zone

    def __call__(self, query: Query) -> Query:
        missing = [name for name in self.features if name not in query.context]
        if not missing:
            return query
        now = datetime.now(self.zone)
        filled = {name: TIME_FIELDS[self.derived[name]](now) if name in self.derived else None for name in missing}
        return dataclasses.replace(query, context={**query.context, **filled})


class Hydrator:
    """Candidates -> the same candidates with feature columns: the request's (`request_features`),
    ``item_id``, with ``by_source`` each candidate's `CANDIDATE_FEATURES` (`candidate_columns`,
    for `blend: scoring`), and every item column of the store, so any scorer finds its columns.
    The item columns are read from the store unless the candidates carry them all (an
    `ItemFeatureFilter` read them)."""

    name = "hydrate"

    def __init__(self, store: Store, schema: Schema, by_source: bool = False) -> None:
        self.store, self.schema, self.by_source = store, schema, by_source
        self.item_columns = store.item_columns()

    def __call__(self, query: Query, candidates: Candidates) -> Candidates:
        requests = FeatureColumns.from_values([request_features(query, self.store, self.schema)])
        return self.hydrate(requests, [len(candidates)], candidates)

    def hydrate(self, requests: FeatureColumns, counts: list[int], candidates: Candidates) -> Candidates:
        """``candidates`` of several requests in turn, request i's ``counts[i]`` of them with row i of
        ``requests``; the store is read once for them all."""
        carried = candidates.columns
        if carried is not None and all(name in carried for name in self.item_columns):
            items = carried.select(self.item_columns)
        else:
            items = self.store.item_features(candidates.item_ids).columns
        own = {KEYS["items"]: candidates.item_ids}
        if self.by_source:
            own |= candidate_columns(candidates)
        clash = sorted(set(requests) & {*own, *items})
        if clash:
            raise ValueError(f"request features {clash} are also item or candidate columns; expected each column "
                             "from one place")
        rows = requests.take(np.repeat(np.arange(len(requests)), counts))
        columns = FeatureColumns(rows.arrays | own | items.arrays, len(candidates))
        return Candidates(candidates.item_ids, candidates.sources, candidates.scores, columns)


def candidate_columns(candidates: Candidates) -> dict[str, np.ndarray]:
    """Each candidate's `CANDIDATE_FEATURES`, as `blend: scoring` passes them a ranker: the name of
    the source that proposed it, and its retrieval score, the two-tower score of user and item,
    which is the ANN source's own score; NaN (a missing number) for the other sources' candidates,
    whose scores measure something else (popularity, similarity)."""
    retrieval = np.where(candidates.sources == AnnSource.name, candidates.scores, np.nan)
    return dict(zip(CANDIDATE_FEATURES, (candidates.sources, retrieval), strict=True))


@dataclass(frozen=True)
class SourceSlot:
    """A source as the pipeline runs it: at most ``quota`` candidates within ``timeout_s``; when it
    raises or times out, a ``fail_open`` one contributes nothing and any other fails the request."""

    source: CandidateSource
    quota: int
    timeout_s: float
    fail_open: bool


@dataclass(frozen=True)
class Stages:
    """A pipeline's stages, in the order they run, after ``completer`` filled in the query's context."""

    sources: list[SourceSlot]
    filters: list[Filter]
    hydrator: Hydrator
    scorer: Scorer
    orderers: list[Orderer | StrategyBanditOrderer]
    completer: ContextCompleter = field(default_factory=lambda: ContextCompleter([], {}, ZoneInfo("UTC")))


@dataclass(frozen=True)
class Response:
    """M ranked items: ``item_ids`` (M,) int64, ``scores`` (M,) float32, ``sources`` (M,) the source
    of each, ``propensities`` (M,) float64 of each slot; ``removed`` (R,) item ids and ``reasons``
    (R,) str, one per item a filter removed, filter after filter; ``strategy``, the strategy a
    bandit orderer drew for the request, if it chooses among strategies."""

    item_ids: np.ndarray
    scores: np.ndarray
    sources: np.ndarray
    propensities: np.ndarray
    removed: np.ndarray
    reasons: np.ndarray
    display: FeatureColumns | None = field(default=None, kw_only=True)  # (M,) display columns; None: none

    def display_rows(self) -> list[dict[str, object]]:
        """One dict per item: its ``display`` values by column, as JSON values (None where missing,
        a list for a list column); empty dicts when the pipeline shows no columns."""
        if self.display is None:
            return [{} for _ in self.item_ids]
        return [{name: _json_value(self.display[name][row]) for name in self.display}
                for row in range(len(self.display))]
    strategy: Strategy | None = None


class Pipeline:
    """Answers queries with ``stages``, each item with its ``display`` item columns; refuses a
    ``Query.k`` above ``max_k`` and, unless ``allow_anonymous``, anonymous users and users the store
    does not know. Call `close` when done."""

    def __init__(self, stages: Stages, max_k: int, allow_anonymous: bool, workers: int,
                 display: tuple[str, ...] = ()) -> None:
        names = [f"source:{s.source.name}" for s in stages.sources] + [f"filter:{f.name}" for f in stages.filters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stages {duplicates} appear more than once; expected unique source and filter names")
        self.stages, self.max_k, self.allow_anonymous, self.display = stages, max_k, allow_anonymous, display
        self.stats = PipelineStats()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="pipeline-source")

    def __call__(self, query: Query) -> Response:
        """The answer to ``query``, within the `Budget` of the enclosing `within` block, if any."""
        self._check(query)
        query = self.stages.completer(query)
        budget = _budget.get()
        with self.stats.request():
            candidates = self._retrieve(query, budget)
            removed, reasons = [np.zeros(0, np.int64)], [np.zeros(0, str)]
            for stage in self.stages.filters:
                _check_budget(budget, f"filter:{stage.name}")
                started = time.perf_counter()
                result = stage(query, candidates)
                self.stats.record(f"filter:{stage.name}", started, len(candidates), len(result.kept))
                candidates = result.kept
                removed.append(result.removed)
                reasons.append(result.reasons)
            _check_budget(budget, "hydrate")
            started = time.perf_counter()
            candidates = self.stages.hydrator(query, candidates)
            self.stats.record("hydrate", started, len(candidates), len(candidates))
            _check_budget(budget, "scorer")
            candidates = self._score(query, candidates)
            candidates, propensities, strategy = self._order(query, candidates)
        display = candidates.columns.select(list(self.display)) if self.display else None
        return Response(candidates.item_ids, candidates.scores, candidates.sources, propensities,
                        np.concatenate(removed), np.concatenate(reasons), strategy, display=display)

    def warm_up(self, query: Query, calls: int = 2) -> None:
        """Calls every source with ``query`` ``calls`` times, untimed, then answers it ``calls``
        times, and starts the stats afresh.

        TorchScript optimises a model during its first calls (~300 ms for the query tower), which
        a source's timeout of tens of milliseconds would cut; a server warms up before traffic.
        A stage that fails here is logged and left to fail (or not) on real requests.
        """
        complete = self.stages.completer(query)
        for _ in range(calls):
            for slot in self.stages.sources:
                try:
                    slot.source(complete, slot.quota)
                except Exception as error:  # noqa: BLE001 -- warming up, not answering
                    log.warning("source %r failed while warming up: %s", slot.source.name, error)
        for _ in range(calls):
            try:
                self(query)
            except Exception as error:  # noqa: BLE001
                log.warning("the warm-up request failed: %s", error)
        self.stats = PipelineStats()

    def close(self, close_store: bool = True) -> None:
        """Stops the source threads, without waiting for sources that are still running, closes
        the scorers' connections (Triton's), and the store (a Redis connection; nothing for the
        embedded one) unless another pipeline over the same version still reads it."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        close_scorer = getattr(self.stages.scorer, "close", None)  # scorers without connections have none
        if close_scorer is not None:
            close_scorer()
        if close_store:
            self.stages.hydrator.store.close()

    def _check(self, query: Query) -> None:
        if query.k > self.max_k:
            raise ValueError(f"Query.k = {query.k}; expected at most max_k = {self.max_k}")
        if self.allow_anonymous:
            return
        if query.user_id is None:
            raise ValueError("Query.user_id is None (anonymous); expected a known user (allow_anonymous is false)")
        store = self.stages.hydrator.store
        if store.user_features(query.user_id) is None:
            raise ValueError(f"Query.user_id = {query.user_id} is unknown to store version {store.version!r}; "
                             "expected a known user (allow_anonymous is false)")

    def _retrieve(self, query: Query, budget: Budget | None) -> Candidates:
        """Every source's candidates, blended; each source waited for until its own deadline, or
        the budget's if that comes first."""
        _check_budget(budget, "sources")
        started = time.perf_counter()
        futures = [self._pool.submit(self._fetch, slot, query) for slot in self.stages.sources]
        found = []
        for slot, future in zip(self.stages.sources, futures, strict=True):
            wait = started + slot.timeout_s - time.perf_counter()
            if budget is not None:
                wait = min(wait, budget.remaining())
            try:
                found.append(future.result(timeout=max(0.0, wait)))
            except Exception as error:  # the source's own error, or the wait's timeout
                timed_out = not future.done()
                future.cancel()
                self.stats.count_failure(f"source:{slot.source.name}", timed_out)
                _check_budget(budget, f"source:{slot.source.name}")  # cut short by the budget, not failed
                what = (f"timed out after {slot.timeout_s} s" if timed_out
                        else f"failed: {type(error).__name__}: {error}")
                if not slot.fail_open:
                    raise SourceError(f"source {slot.source.name!r} {what}") from error
                log.warning("source %r %s; it is fail-open, so it contributes nothing", slot.source.name, what)
        _check_budget(budget, "blend")  # a source cut short by the budget fails the request
        started = time.perf_counter()
        blended = blend(found)
        self.stats.record("blend", started, sum(map(len, found)), len(blended))
        return blended

    def _fetch(self, slot: SourceSlot, query: Query) -> Candidates:
        started = time.perf_counter()
        found = slot.source(query, slot.quota)
        found = found.take(np.arange(min(len(found), slot.quota)))
        self.stats.record(f"source:{slot.source.name}", started, slot.quota, len(found))
        return found

    def _score(self, query: Query, candidates: Candidates) -> Candidates:
        scorer = self.stages.scorer
        started = time.perf_counter()
        scores = np.asarray(scorer(query, candidates), np.float32)
        if scores.shape != (len(candidates),):
            raise RuntimeError(f"scorer {scorer.name!r} returned scores of shape {scores.shape}; "
                               f"expected ({len(candidates)},)")
        self.stats.record("scorer", started, len(candidates), len(candidates))
        return Candidates(candidates.item_ids, candidates.sources, scores, candidates.columns)

    def _order(self, query: Query, candidates: Candidates) -> tuple[Candidates, np.ndarray, Strategy | None]:
        """The orderers in turn over the candidates ranked by score (ties in blend order); a slot's
        propensity is the product of each orderer's for its item; the strategy drawn, if any."""
        candidates = candidates.take(by_score(candidates))
        propensities, strategy = np.ones(len(candidates)), None
        for orderer in self.stages.orderers:
            started = time.perf_counter()
            if isinstance(orderer, StrategyBanditOrderer):
                ranked, chosen, strategy = orderer.draw(query, candidates)
            else:
                ranked, chosen = orderer(query, candidates)
            self.stats.record(f"orderer:{orderer.name}", started, len(candidates), len(ranked))
            rows = pd.Index(candidates.item_ids).get_indexer(ranked.item_ids)  # item ids are unique after blending
            if (rows < 0).any():
                raise RuntimeError(f"orderer {orderer.name!r} returned items {ranked.item_ids[rows < 0][:5].tolist()} "
                                   "it was not given; expected it to only drop or reorder")
            candidates, propensities = ranked, propensities[rows] * chosen
        return candidates, propensities, strategy


def _check_budget(budget: Budget | None, stage: str) -> None:
    if budget is not None:
        budget.check(stage)


def blend(found: list[Candidates]) -> Candidates:
    """The candidates of every source in turn, each item once: the first source proposing it keeps it."""
    ids = np.concatenate([np.zeros(0, np.int64), *(c.item_ids for c in found)])
    sources = np.concatenate([np.zeros(0, str), *(c.sources for c in found)])
    scores = np.concatenate([np.zeros(0, np.float32), *(c.scores for c in found)])
    _, first = np.unique(ids, return_index=True)  # each item's first row
    keep = np.sort(first)
    return Candidates(ids[keep], sources[keep], scores[keep])


def open_pipeline(config: PipelineConfig, directory: Path, bandit: SourceBandit | None = None) -> Pipeline:
    """The pipeline ``config`` declares over the version in ``directory``."""
    version = open_pipeline_version(config, directory)
    try:
        return build_pipeline(config, version, bandit)
    except BaseException:
        version.store.close()  # a Redis connection no pipeline will close
        raise


def open_pipeline_version(config: PipelineConfig, directory: Path) -> ServingVersion:
    """The version in ``directory`` (`open_version`), its store the one ``config`` reads: the
    version's keys in Redis when ``config.redis`` names a server, its embedded snapshot otherwise."""
    open_store = None
    if config.redis:
        def open_store(version: str) -> Store:
            return RedisStore(*redis_address(config.redis), version, config.redis_timeout_s)
    return open_version(directory, open_store)


def build_pipeline(config: PipelineConfig, version: ServingVersion, bandit: SourceBandit | None = None) -> Pipeline:
    """The pipeline ``config`` declares over the models, index and store of a loaded ``version``
    (`open_pipeline` opens the store ``config`` names). An explore orderer reads ``bandit`` (a
    server passes the one that outlives its versions; default: a fresh one). ValueError when a
    scorer reads `CANDIDATE_FEATURES` that the config's blend does not pass."""
    _check_display(config.display, version.store)
    bandit = bandit or SourceBandit()
    models = version.directory / "models"
    tower = ModelInputs.load(models, QUERY_TOWER)
    scorers = [spec.build(version, config.triton, config.triton_timeout_s) for spec in config.scorer]
    if config.blend != "scoring":
        for scorer in scorers:
            wanted = [name for name in CANDIDATE_FEATURES if name in scorer.inputs.features]
            if wanted:
                raise ValueError(f"scorer {scorer.name!r} reads {wanted}, which only `blend: scoring` passes a "
                                 f"ranker; expected blend: scoring (the config has blend: {config.blend}), or a "
                                 "ranker without them")
    stages = Stages(
        sources=[SourceSlot(spec.build(version), spec.quota, spec.timeout_s, spec.fail_open)
                 for spec in config.sources],
        filters=[spec.build(version) for spec in config.filters],
        hydrator=Hydrator(version.store, tower.encoder.schema, by_source=config.blend == "scoring"),
        scorer=FallbackScorer(scorers),
        orderers=[spec.build(version, bandit) for spec in config.orderers],
        completer=_completer(config, [tower, *(scorer.inputs for scorer in scorers)]),
    )
    return Pipeline(stages, config.max_k, config.allow_anonymous, config.workers, tuple(config.display))


def _completer(config: PipelineConfig, models: list[ModelInputs]) -> ContextCompleter:
    """The `ContextCompleter` of the request-time features ``models`` read: their schemas'
    interaction features (sequences, and the candidates' own `CANDIDATE_FEATURES`, aside). Of
    ``config.time_features``, those the models read."""
    features = sorted({f.name for inputs in models for f in inputs.encoder.schema.features
                       if f.table == "interactions" and f.kind != "sequence" and f.name in inputs.features
                       and f.name not in CANDIDATE_FEATURES})
    derived = {name: field for name, field in config.time_features.items() if name in features}
    return ContextCompleter(features, derived, time_zone(config.time_zone))


def _check_display(columns: list[str], store: Store) -> None:
    """ValueError naming ``display`` unless each of ``columns`` is an item column of ``store``."""
    known = store.item_columns() if columns else []
    for column in columns:
        if column not in known:
            raise ValueError(f"display column {column!r} is not an item column; expected one of {sorted(known)}")


def _json_value(value: object) -> object:
    """An item column's value as JSON: a list for an array, None where missing, else a Python scalar
    (text for anything that is not a bool, number or string)."""
    if isinstance(value, np.ndarray | list | tuple):
        return [_json_value(v) for v in value]
    if pd.isna(value):
        return None
    value = value.item() if isinstance(value, np.generic) else value
    return value if isinstance(value, bool | int | float | str) else str(value)
