"""The serving pipeline measured stage by stage on held-out interactions.

Every user with a positive (label > 0) in the held-out part (valid or test) of a canonical
dataset asks the pipeline for its top ``max(ks)``. The user's history (train rows; for test,
train and valid rows, oldest first) is the request's ``recent_items``, so the seen filter
removes it, and the held-out positives are the relevant items. The request's context is that
of the user's first held-out row. The stages are the serving ones (`Pipeline.stages`), run in
batches of users where a stage allows it: the ANN source embeds and searches a batch at once,
and the scorer scores a batch's candidates in one call; the other sources, the filters, the
hydrator and the orderers answer one request at a time, as in serving. Offline, sources have no
timeout; a fail-open source that raises contributes nothing and is counted.

The report (`evaluate_offline`):

    sources     each source's recall within its quota, the recall it alone has (held-out items
                no other source found), its share of the final slots and its hits in them
    stages      the candidates' recall after blending and after each filter: the scorer's ceiling
    lists       NDCG, MAP, recall, precision, MRR and hit at each k of the final list, of the
                candidates in blend order after each stage, and of two baselines: retrieval
                alone (the ANN source's own order, seen items removed) and popularity (the
                items most users hold in their histories, seen items removed)
    paired      per user NDCG@k of the pipeline minus retrieval alone: mean and 95% bootstrap
                interval over users
    beyond      coverage, intra-list diversity over an item column and novelty at each k
    truth       (synthetic data) expected clicks at each k by the generator's click
                probabilities: the pipeline, retrieval alone, and the oracle top-k of every
                available unseen item

`format_table` prints it; `evaluation.plots` draws it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from data.columns import FeatureColumns
from data.dataset import read_dataset, read_part
from data.synthetic import load_ground_truth
from data.tables import KEYS
from evaluation import metrics
from inference.pipeline.executor import Hydrator, Pipeline, SourceSlot, blend
from inference.pipeline.filters import Filter, ItemFeatureFilter
from inference.pipeline.sources import AnnSource, query_row, request_features
from inference.pipeline.types import CANDIDATE_FEATURES, Candidates, Query

METRICS = ("ndcg", "map", "recall", "precision", "mrr", "hit")
PARTS = ("valid", "test")
PIPELINE, RETRIEVAL, POPULARITY = "pipeline", "retrieval", "popularity"  # the lists every report compares


@dataclass(frozen=True)
class OfflineConfig:
    """What `evaluate_offline` measures: the held-out ``part``, the list lengths ``ks``, a seeded
    sample of ``users`` (default every user with a held-out positive), the item column
    ``diversity_column`` (one label or a list of labels per item) and, on synthetic data,
    expected clicks by the generator's ``truth``; ``seed`` draws the sample and the bootstrap."""

    part: str = "test"
    ks: tuple[int, ...] = (10, 20, 50)
    users: int | None = None
    seed: int = 0
    diversity_column: str = "category"
    truth: bool = False
    batch_size: int = 256  # users per batch of the ANN source and the scorer
    resamples: int = 2000  # bootstrap resamples of the paired difference

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"part {self.part!r}; expected one of {PARTS}")
        if not self.ks or any(k < 1 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"ks {list(self.ks)}; expected distinct list lengths of at least 1")
        for name in ("users", "batch_size", "resamples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} = {value}; expected at least 1")


@dataclass(frozen=True)
class HeldOut:
    """U evaluated users, each with: ``user_ids`` (U,), ``history`` their items before the part,
    oldest first, ``relevant`` their held-out positives, ``contexts`` the request context of their
    first held-out row and ``times`` (U,) its timestamp. ``item_ids`` (I,) is the catalogue and
    ``item_share`` (I,) the share of history users holding each item (at least one user's worth)."""

    user_ids: np.ndarray
    history: list[np.ndarray]
    relevant: list[np.ndarray]
    contexts: list[dict]
    times: np.ndarray
    item_ids: np.ndarray
    item_share: np.ndarray


def read_held_out(data_dir: Path, part: str, context: list[str], users: int | None = None,
                  seed: int = 0) -> HeldOut:
    """The users of ``data_dir`` with a positive in ``part`` (a seeded sample of ``users`` of them);
    ``context`` names the interaction columns each request carries. ValueError when the part has
    no positive row or lacks a context column."""
    if part not in PARTS:
        raise ValueError(f"part {part!r}; expected one of {PARTS}")
    dataset = read_dataset(data_dir, tables=("items",))
    rows = read_part(data_dir, part)
    positives = rows[rows[dataset.schema.label] > 0]
    if positives.empty:
        raise ValueError(f"{data_dir}: the {part} part holds no positive rows ({len(rows)} rows); "
                         "expected held-out interactions to evaluate")
    missing = sorted(set(context) - set(rows.columns))
    if missing:
        raise ValueError(f"{data_dir}: the {part} rows lack request context {missing}, which the pipeline reads")
    before = pd.concat([read_part(data_dir, p) for p in ("train", "valid")[:PARTS.index(part) + 1]])
    user_ids = np.sort(positives[KEYS["users"]].unique())
    if users is not None and users < len(user_ids):
        user_ids = np.sort(np.random.default_rng(seed).choice(user_ids, users, replace=False))
    first = positives.sort_values("timestamp", kind="stable").drop_duplicates(KEYS["users"]).set_index(KEYS["users"])
    history = before.sort_values("timestamp", kind="stable").groupby(KEYS["users"])[KEYS["items"]].agg(list)
    relevant = positives.groupby(KEYS["users"])[KEYS["items"]].unique()
    item_ids = dataset.items[KEYS["items"]].to_numpy(np.int64)
    holders = before.drop_duplicates([KEYS["users"], KEYS["items"]])[KEYS["items"]].value_counts()
    n_users = max(before[KEYS["users"]].nunique(), 1)
    share = np.maximum(holders.reindex(item_ids, fill_value=0).to_numpy(), 1) / n_users
    return HeldOut(
        user_ids=user_ids.astype(np.int64),
        history=[np.asarray(history.get(u, []), np.int64) for u in user_ids],
        relevant=[np.asarray(relevant[u], np.int64) for u in user_ids],
        contexts=first.loc[user_ids, context].to_dict("records") if context else [{} for _ in user_ids],
        times=first.loc[user_ids, "timestamp"].to_numpy(),
        item_ids=item_ids,
        item_share=share,
    )


def ann_slot(pipeline: Pipeline) -> SourceSlot:
    """The pipeline's ANN source, the retrieval-alone baseline; ValueError when it has none."""
    for slot in pipeline.stages.sources:
        if isinstance(slot.source, AnnSource):
            return slot
    names = [slot.source.name for slot in pipeline.stages.sources]
    raise ValueError(f"the pipeline's sources {names} hold no ann source; retrieval alone needs one")


def request_context(pipeline: Pipeline) -> list[str]:
    """The request-time features the pipeline's models read: the interaction features, other than
    sequences and the candidates' own `CANDIDATE_FEATURES`, of the ANN source's query tower and of
    each scorer's ranker."""
    scorer = pipeline.stages.scorer
    models = [ann_slot(pipeline).source.inputs,
              *(s.inputs for s in getattr(scorer, "scorers", [scorer]) if hasattr(s, "inputs"))]
    names = {name for inputs in models for name in inputs.features
             if inputs.encoder.schema.feature(name).table == "interactions"
             and inputs.encoder.schema.feature(name).kind != "sequence" and name not in CANDIDATE_FEATURES}
    return sorted(names)


@dataclass
class StageLists:
    """Per-user results of `run_pipeline`, U rows each: ranked lists (U, K) of item ids (-1: no item),
    the final list's sources (U, K) ("" for no item), and hit counts (U,) per source and stage."""

    final: np.ndarray
    final_sources: np.ndarray
    retrieval: np.ndarray
    stage_top: dict[str, np.ndarray]
    source_hits: dict[str, np.ndarray]
    alone_hits: dict[str, np.ndarray]
    stage_hits: dict[str, np.ndarray]
    stage_sizes: dict[str, np.ndarray]
    failures: dict[str, int]


def run_pipeline(pipeline: Pipeline, held_out: HeldOut, k: int, batch_size: int = 256,
                 seconds: dict[str, float] | None = None) -> StageLists:
    """Every held-out user's request through the pipeline's stages, keeping what each stage
    proposed; ``seconds`` (when given) accumulates each stage's time."""
    if k > pipeline.max_k:
        raise ValueError(f"k = {k} exceeds the pipeline config's max_k = {pipeline.max_k}")
    seconds = seconds if seconds is not None else defaultdict(float)
    ann = ann_slot(pipeline)
    stage_names = ["blend", *(f"filter:{f.name}" for f in pipeline.stages.filters)]
    source_names = [slot.source.name for slot in pipeline.stages.sources]
    n = len(held_out.user_ids)
    lists = StageLists(
        final=np.full((n, k), -1, np.int64), final_sources=np.full((n, k), "", object),
        retrieval=np.full((n, k), -1, np.int64),
        stage_top={name: np.full((n, k), -1, np.int64) for name in stage_names},
        source_hits={name: np.zeros(n, np.int64) for name in source_names},
        alone_hits={name: np.zeros(n, np.int64) for name in source_names},
        stage_hits={name: np.zeros(n, np.int64) for name in stage_names},
        stage_sizes={name: np.zeros(n, np.int64) for name in stage_names},
        failures=dict.fromkeys(source_names, 0),
    )
    for lo in range(0, n, batch_size):
        users = range(lo, min(lo + batch_size, n))
        queries = [Query(int(held_out.user_ids[u]), held_out.contexts[u], tuple(held_out.history[u].tolist()), k)
                   for u in users]
        found: list[list[Candidates]] = [[] for _ in queries]
        for slot in pipeline.stages.sources:
            with _timed(seconds, f"source:{slot.source.name}"):
                if slot is ann:  # searched deeper for retrieval alone, which skips seen items
                    depth = max(ann.quota, k + max(len(q.recent_items) for q in queries))
                    ann_ids, ann_scores = search_ann(ann.source, queries, depth)  # (B, depth') each
                    proposed = [Candidates(ids[:ann.quota], np.full(len(ids[:ann.quota]), ann.source.name),
                                           scores[:ann.quota]) for ids, scores in zip(ann_ids, ann_scores, strict=True)]
                else:
                    proposed = [_propose(slot, query) for query in queries]
            lists.failures[slot.source.name] += sum(p is None for p in proposed)
            for row, candidates in enumerate(proposed):
                if candidates is not None:
                    found[row].append(candidates)
        for row, u in enumerate(users):
            unseen = ann_ids[row][~np.isin(ann_ids[row], held_out.history[u])][:k]
            lists.retrieval[u, :len(unseen)] = unseen
            _count_source_hits(lists, u, found[row], held_out.relevant[u])
        with _timed(seconds, "blend"):
            candidates = [blend(sources) for sources in found]
        _record_stage(lists, "blend", users, candidates, held_out.relevant)
        for stage in pipeline.stages.filters:
            with _timed(seconds, f"filter:{stage.name}"):
                candidates = filter_batch(stage, queries, candidates)
            _record_stage(lists, f"filter:{stage.name}", users, candidates, held_out.relevant)
        with _timed(seconds, "hydrate"):
            batch = hydrate_batch(pipeline.stages.hydrator, queries, candidates)
        with _timed(seconds, "scorer"):
            scored = Candidates(batch.item_ids, batch.sources, _score(pipeline, queries[0], batch), batch.columns)
        with _timed(seconds, "orderers"):
            bounds = np.cumsum([0, *(len(c) for c in candidates)])
            for u, query, a, b in zip(users, queries, bounds[:-1], bounds[1:], strict=True):
                mine = scored.take(np.arange(a, b))
                ranked = pipeline._order(query, mine)[0]  # the serving ranking and orderers
                lists.final[u, :len(ranked)] = ranked.item_ids
                lists.final_sources[u, :len(ranked)] = ranked.sources
    return lists


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    seconds[stage] += time.perf_counter() - started


def filter_batch(stage: Filter, queries: list[Query], candidates: list[Candidates]) -> list[Candidates]:
    """What ``stage`` keeps of each request's candidates. An `ItemFeatureFilter` reads the store,
    not the request, so it filters the whole batch in one call; other filters, one request at a time."""
    if not isinstance(stage, ItemFeatureFilter):
        return [stage(query, c).kept for query, c in zip(queries, candidates, strict=True)]
    sizes = [len(c) for c in candidates]
    request = pd.DataFrame({"request": np.repeat(np.arange(len(candidates)), sizes)})  # follows the kept rows
    kept = stage(queries[0], _concatenate(candidates, request)).kept
    bounds = np.searchsorted(kept.columns["request"], np.arange(len(candidates) + 1))
    return [Candidates(kept.item_ids[a:b], kept.sources[a:b], kept.scores[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def hydrate_batch(hydrator: Hydrator, queries: list[Query], candidates: list[Candidates]) -> Candidates:
    """Every request's candidates in turn, with the feature rows the `Hydrator` gives each (the
    request's row, ``item_id``, with ``by_source`` each candidate's `CANDIDATE_FEATURES`, the store's
    item columns); the store is read once for the batch."""
    requests = FeatureColumns.from_values([request_features(query, hydrator.store, hydrator.schema)
                                           for query in queries])
    return hydrator.hydrate(requests, [len(c) for c in candidates], _concatenate(candidates))


def _concatenate(candidates: list[Candidates], features: pd.DataFrame | None = None) -> Candidates:
    return Candidates(np.concatenate([np.zeros(0, np.int64), *(c.item_ids for c in candidates)]),
                      np.concatenate([np.zeros(0, str), *(c.sources for c in candidates)]),
                      np.concatenate([np.zeros(0, np.float32), *(c.scores for c in candidates)]), features)


def search_ann(source: AnnSource, queries: list[Query], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ANN source's answer to B queries in one batch: item ids (B, k') and scores (B, k'),
    best first, as `AnnSource` answers each one."""
    schema = source.inputs.encoder.schema
    rows = pd.concat([query_row(query, source.store, schema) for query in queries], ignore_index=True)
    missing = [name for name in source.inputs.features if name not in rows.columns]
    if missing:
        raise ValueError(f"the query tower reads {missing}, which are neither user nor sequence features; "
                         "expected them in the request context")
    with torch.inference_mode():
        vectors = source.tower(*source.inputs(rows)).numpy()  # (B, D)
    return source.index.search(vectors, k)


def _propose(slot: SourceSlot, query: Query) -> Candidates | None:
    """The source's candidates within its quota; None when a fail-open source raises."""
    try:
        found = slot.source(query, slot.quota)
    except Exception as error:
        if not slot.fail_open:
            raise RuntimeError(f"source {slot.source.name!r} failed on user {query.user_id}: {error}") from error
        return None
    return found.take(np.arange(min(len(found), slot.quota)))


def _score(pipeline: Pipeline, query: Query, batch: Candidates) -> np.ndarray:
    """(N,) scores of a batch of many requests' hydrated candidates, in one scorer call (a scorer
    reads only the candidates' feature rows, which carry each request's own columns)."""
    scores = np.asarray(pipeline.stages.scorer(query, batch), np.float32)
    if scores.shape != (len(batch),):
        raise RuntimeError(f"scorer {pipeline.stages.scorer.name!r} returned scores of shape {scores.shape}; "
                           f"expected ({len(batch)},)")
    return scores


def _count_source_hits(lists: StageLists, u: int, found: list[Candidates], relevant: np.ndarray) -> None:
    hits = {c.sources[0]: np.intersect1d(c.item_ids, relevant) for c in found if len(c)}
    for name, items in hits.items():
        others = [other for source, other in hits.items() if source != name]
        lists.source_hits[name][u] = len(items)
        lists.alone_hits[name][u] = len(np.setdiff1d(items, np.concatenate([np.zeros(0, np.int64), *others])))


def _record_stage(lists: StageLists, stage: str, users: range, candidates: list[Candidates],
                  relevant: list[np.ndarray]) -> None:
    top = lists.stage_top[stage].shape[1]
    for u, c in zip(users, candidates, strict=True):
        lists.stage_top[stage][u, :min(top, len(c))] = c.item_ids[:top]
        lists.stage_hits[stage][u] = np.isin(relevant[u], c.item_ids).sum()
        lists.stage_sizes[stage][u] = len(c)


def popularity_lists(held_out: HeldOut, k: int) -> np.ndarray:
    """(U, k) item ids: the items most history users hold, each user's own history removed."""
    ranked = held_out.item_ids[np.argsort(-held_out.item_share, kind="stable")]
    top = np.full((len(held_out.user_ids), k), -1, np.int64)
    for u, seen in enumerate(held_out.history):
        head = ranked[:k + len(seen)]
        unseen = head[~np.isin(head, seen)][:k]
        top[u, :len(unseen)] = unseen
    return top


def evaluate_offline(pipeline: Pipeline, data_dir: Path, config: OfflineConfig) -> dict:
    """The report of the module docstring, a JSON-ready dict; ``seconds`` holds each stage's time."""
    k = max(config.ks)
    seconds: dict[str, float] = defaultdict(float)
    with _timed(seconds, "read"):
        held_out = read_held_out(data_dir, config.part, request_context(pipeline), config.users, config.seed)
        items = read_dataset(data_dir, tables=("items",)).items
    if config.diversity_column not in items.columns:
        raise ValueError(f"{data_dir}: items have no column {config.diversity_column!r} for diversity; "
                         f"they have {items.columns.tolist()}")
    lists = run_pipeline(pipeline, held_out, k, config.batch_size, seconds)
    with _timed(seconds, "popularity"):
        popular = popularity_lists(held_out, k)
    started = time.perf_counter()
    position = pd.Index(held_out.item_ids)
    index = lambda ids: position.get_indexer(ids.ravel()).reshape(ids.shape)  # noqa: E731  ids -> rows, -1 stays
    relevant = [position.get_indexer(r)[position.get_indexer(r) >= 0] for r in held_out.relevant]
    n_relevant = np.array([len(r) for r in held_out.relevant], np.float64)
    ranked = {PIPELINE: lists.final, RETRIEVAL: lists.retrieval, POPULARITY: popular, **lists.stage_top}
    per_user = {name: {kk: metrics.per_user_retrieval_metrics(index(top), relevant, kk) for kk in config.ks}
                for name, top in ranked.items()}
    labels = item_labels(items[config.diversity_column])
    hits, _ = metrics.hit_matrix(index(lists.final), relevant, k)  # (U, k) whether each final slot is held out
    report = {
        "data": str(data_dir), "part": config.part, "users": len(held_out.user_ids),
        "items": len(held_out.item_ids), "ks": list(config.ks), "seed": config.seed,
        "diversity_column": config.diversity_column,
        "sources": {name: {
            "quota": slot.quota,
            "recall": float(np.mean(lists.source_hits[name] / n_relevant)),
            "alone_recall": float(np.mean(lists.alone_hits[name] / n_relevant)),
            "failures": lists.failures[name],
            **{f"share@{kk}": float(np.mean(lists.final_sources[:, :kk] == name)) for kk in config.ks},
            **{f"recall@{kk}": float(np.mean(((lists.final_sources[:, :kk] == name) & hits[:, :kk]).sum(axis=1)
                                             / n_relevant))
               for kk in config.ks},
        } for name, slot in ((s.source.name, s) for s in pipeline.stages.sources)},
        "stages": {name: {"candidates": float(lists.stage_sizes[name].mean()),
                          "recall": float(np.mean(lists.stage_hits[name] / n_relevant))}
                   for name in lists.stage_hits},
        "lists": {name: {metric: float(np.mean(values)) for kk in config.ks for metric, values in by_k[kk].items()}
                  for name, by_k in per_user.items()},
        "paired": {f"ndcg@{kk}": paired_difference(per_user[PIPELINE][kk][f"ndcg@{kk}"],
                                                   per_user[RETRIEVAL][kk][f"ndcg@{kk}"], config.resamples,
                                                   config.seed)
                   for kk in config.ks},
        "beyond": {name: {key: value for kk in config.ks for key, value in beyond_accuracy(
                       index(ranked[name][:, :kk]), labels, held_out.item_share, kk).items()}
                   for name in (PIPELINE, RETRIEVAL, POPULARITY)},
    }
    if config.truth:
        report["truth"] = expected_clicks(data_dir, held_out, {name: ranked[name] for name in (PIPELINE, RETRIEVAL)},
                                          config.ks, items)
    seconds["metrics"] = time.perf_counter() - started
    report["seconds"] = {name: round(value, 3) for name, value in seconds.items()}
    return report


def item_labels(column: pd.Series) -> np.ndarray:
    """(I, C) bool: the labels of each item of ``column``, one value or a list of values per item
    (a missing value: none)."""
    values = column.map(lambda v: list(v) if isinstance(v, list | tuple | np.ndarray) else [] if pd.isna(v) else [v])
    exploded = values.explode().dropna()
    codes, uniques = pd.factorize(exploded)
    rows = column.index.get_indexer(exploded.index)
    labels = np.zeros((len(column), len(uniques)), bool)
    labels[rows, codes] = True
    return labels


def beyond_accuracy(topk: np.ndarray, labels: np.ndarray, item_share: np.ndarray, k: int) -> dict[str, float]:
    """coverage@k, diversity@k and novelty@k of ``topk`` (U, k) item indices (-1: no item)."""
    return {f"coverage@{k}": metrics.coverage(topk, len(labels)),
            f"diversity@{k}": metrics.intra_list_diversity(topk, labels),
            f"novelty@{k}": metrics.novelty(topk, item_share)}


def paired_difference(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> dict[str, float]:
    """Mean of ``a - b`` (U,) per-user values, with the 95% percentile bootstrap interval over users."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(diff) < 2:
        raise ValueError(f"a paired difference needs at least 2 users, got {len(diff)}")
    if np.ptp(diff) == 0:  # every resample has the same mean
        return {"mean": float(diff[0]), "low": float(diff[0]), "high": float(diff[0])}
    interval = stats.bootstrap((diff,), np.mean, n_resamples=resamples, confidence_level=0.95,
                               method="percentile", rng=np.random.default_rng(seed), batch=100).confidence_interval
    return {"mean": float(diff.mean()), "low": float(interval.low), "high": float(interval.high)}


def expected_clicks(data_dir: Path, held_out: HeldOut, ranked: dict[str, np.ndarray], ks: tuple[int, ...],
                    items: pd.DataFrame, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Mean expected clicks@k per user of each (U, K) list in ``ranked`` and of the oracle (the
    k items of highest true click probability among the available items the user has not seen),
    at the time of each user's first held-out row, by the synthetic generator's ground truth."""
    truth = load_ground_truth(data_dir)
    k = max(ks)
    clicks = {name: {} for name in [*ranked, "oracle"]}
    for name, top in ranked.items():
        p = truth.click_probability(held_out.user_ids[:, None], np.maximum(top, 0), held_out.times[:, None])  # (U, K)
        p = np.where(top >= 0, p, 0.0)
        for kk in ks:
            clicks[name][f"clicks@{kk}"] = float(p[:, :kk].sum(axis=1).mean())
    available = items.set_index(KEYS["items"])["available"].reindex(np.arange(len(truth.item_factors)))
    closed = ~available.fillna(False).to_numpy(bool)  # items the catalogue does not offer
    frac = np.clip((held_out.times - truth.start) / truth.seconds, 0, 1).astype(np.float32)[:, None]  # (U, 1)
    best = np.zeros((len(held_out.user_ids), k))
    for lo in range(0, len(best), batch_size):
        users = held_out.user_ids[lo:lo + batch_size]
        taste = truth.user_start[users] + frac[lo:lo + batch_size] * (truth.user_end[users] - truth.user_start[users])
        logits = truth.scale * taste @ truth.item_factors.T + truth.item_bias  # (B, I), monotone in p(click)
        logits[:, closed] = -np.inf
        top = metrics.topk_from_scores(logits, k, exclude=held_out.history[lo:lo + batch_size])  # (B, k)
        times = held_out.times[lo:lo + batch_size, None]
        best[lo:lo + len(users)] = np.where(top >= 0, truth.click_probability(users[:, None], np.maximum(top, 0),
                                                                               times), 0.0)
    for kk in ks:
        clicks["oracle"][f"clicks@{kk}"] = float(best[:, :kk].sum(axis=1).mean())
    return clicks


def format_table(report: dict) -> str:
    """The report as aligned text tables."""
    ks = report["ks"]
    lines = [f"{report['users']} users of {report['data']} ({report['part']}), {report['items']} items"]
    sources = pd.DataFrame(report["sources"]).T
    columns = ["quota", "recall", "alone_recall", *(f"share@{k}" for k in ks), *(f"recall@{k}" for k in ks),
               "failures"]
    lines += ["", "sources (recall within quota, recall no other source has, final slots, final hits)",
              sources[columns].to_string(float_format="{:.4f}".format)]
    lines += ["", "candidates after each stage", pd.DataFrame(report["stages"]).T.to_string(
        float_format="{:.4f}".format)]
    lists = pd.DataFrame(report["lists"]).T
    lines += ["", "ranked lists", lists[[f"{m}@{k}" for k in ks for m in METRICS]].to_string(
        float_format="{:.4f}".format)]
    beyond = pd.DataFrame(report["beyond"]).T
    lines += ["", "beyond accuracy", beyond.to_string(float_format="{:.4f}".format)]
    paired = pd.DataFrame(report["paired"]).T
    paired.insert(0, "ratio", [report["lists"][PIPELINE][m] / report["lists"][RETRIEVAL][m]
                               if report["lists"][RETRIEVAL][m] else np.nan for m in paired.index])
    lines += ["", "pipeline - retrieval alone, per user (95% bootstrap interval)",
              paired.to_string(float_format="{:.4f}".format)]
    if "truth" in report:
        lines += ["", "expected clicks (ground truth)", pd.DataFrame(report["truth"]).T.to_string(
            float_format="{:.4f}".format)]
    lines += ["", "seconds: " + ", ".join(f"{name} {value:.1f}" for name, value in report["seconds"].items())]
    return "\n".join(lines)
