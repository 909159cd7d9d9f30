"""The executor on a refreshed version: the example config answers; fail-open sources that raise
or time out are counted and skipped, fail-closed ones fail the request; blending keeps the first
source; filters' reasons reach the response; scores align; the stats add up."""

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from data.candidates import CandidatesConfig, build_candidates
from data.dataset import write_dataset
from inference.export import export_models
from inference.pipeline.config import PipelineConfig, load_pipeline_config
from inference.pipeline.executor import (
    Hydrator,
    Pipeline,
    SourceError,
    SourceSlot,
    Stages,
    blend,
    build_pipeline,
    open_pipeline,
)
from inference.pipeline.filters import ItemFeatureFilter, SeenItemsFilter
from inference.pipeline.orderers import TopKOrderer
from inference.pipeline.scorers import ModelInputs, TorchScriptScorer
from inference.pipeline.types import Candidates, Query
from inference.store import EmbeddedStore, StoreError, load_snapshot_into_redis
from inference.version import open_version
from tests.conftest import RUN_CONFIGS, training_state_restored
from training.train import RunConfig, train_ranker

EXAMPLE = Path(__file__).parents[3] / "configs" / "pipeline.yaml"
UNKNOWN_ITEM = 10**6


class Fixed:
    """A fake source: after ``sleep`` seconds, proposes ``ids`` (scores falling from 1) or raises ``error``."""

    def __init__(self, name, ids=(), error=None, sleep=0.0):
        self.name, self.ids, self.error, self.sleep = name, np.array(ids, np.int64), error, sleep

    def __call__(self, query, k):
        time.sleep(self.sleep)
        if self.error is not None:
            raise self.error
        ids = self.ids[:k]
        return Candidates(ids, np.full(len(ids), self.name), np.linspace(1, 0, len(ids), dtype=np.float32))


class Halving:
    """A fake stochastic orderer: keeps everything, each slot with propensity 0.5."""

    name = "halving"

    def __call__(self, query, scored):
        return scored, np.full(len(scored), 0.5)


def slot(source, fail_open=True, timeout_s=5.0, quota=100):
    return SourceSlot(source, quota, timeout_s, fail_open)


@pytest.fixture(scope="module")
def parts(version):
    """The version's hydrator and linear scorer, shared by the pipelines the tests build."""
    models = version.directory / "models"
    hydrator = Hydrator(version.store, ModelInputs.load(models, "query_tower").encoder.schema)
    return hydrator, TorchScriptScorer(models, "linear")


@pytest.fixture
def make(version, parts):
    """Builds pipelines over fake sources (closed after the test): ``make(slots, filters=..., orderers=...)``."""
    built = []

    def build(slots, filters=(), orderers=None, allow_anonymous=True):
        hydrator, scorer = parts
        stages = Stages(list(slots), list(filters), hydrator, scorer, orderers or [TopKOrderer()])
        built.append(Pipeline(stages, max_k=50, allow_anonymous=allow_anonymous, workers=4))
        return built[-1]

    yield build
    for pipeline in built:
        pipeline.close()


@pytest.fixture(scope="module")
def unavailable(version):
    """Two items the store marks unavailable, and two it marks available."""
    ids = np.arange(200)
    available = version.store.item_features(ids).features["available"].to_numpy(bool, na_value=False)
    return ids[~available][:2].tolist(), ids[available][:2].tolist()


def example_config(**changes):
    raw = yaml.safe_load(EXAMPLE.read_text())
    for source in raw["sources"]:
        source["timeout_s"] = 5.0  # the tower's first calls compile it; the example's 50 ms is for a warm server
    return PipelineConfig.model_validate(raw | changes)


def test_the_example_config_answers_without_seen_or_unavailable_items(version):
    assert [(s.kind, s.model) for s in load_pipeline_config(EXAMPLE).scorer] == [("torchscript", "deepfm"),
                                                                             ("torchscript", "linear")]
    pipeline = build_pipeline(example_config(), version)
    try:
        popular = version.store.get_list("popular")[0]
        query = Query(user_id=7, recent_items=tuple(popular[:3].tolist()), k=20)
        response = pipeline(query)
        anonymous = pipeline(Query(user_id=None, k=5))
    finally:
        pipeline.close()
    assert len(response.item_ids) == 20 and len(set(response.item_ids)) == 20
    assert not set(response.item_ids) & set(query.recent_items)
    assert version.store.item_features(response.item_ids).features["available"].all()
    assert {"seen"} <= set(response.reasons) and len(response.removed) == len(response.reasons)
    assert set(response.sources) <= {"ann", "user", "similar", "popular"}
    assert (np.diff(response.scores) <= 0).all() and (response.propensities == 1).all()
    assert len(anonymous.item_ids) == 5


def test_fail_open_sources_that_raise_or_time_out_are_skipped_and_counted(make):
    pipeline = make([slot(Fixed("broken", error=ConnectionError("refused"))),
                     slot(Fixed("slow", [1, 2], sleep=1.0), timeout_s=0.05),
                     slot(Fixed("good", [3, 4, 5]))])
    started = time.perf_counter()
    response = pipeline(Query(user_id=7, k=10))
    assert time.perf_counter() - started < 0.9  # it did not wait for the slow source
    assert sorted(response.item_ids.tolist()) == [3, 4, 5] and set(response.sources) == {"good"}
    stages = pipeline.stats.snapshot()["stages"]
    assert stages["source:broken"]["failures"] == 1 and stages["source:broken"]["calls"] == 0
    assert stages["source:slow"]["timeouts"] == 1
    assert stages["source:good"]["calls"] == 1 and stages["source:good"]["out"] == 3


def test_a_fail_closed_source_fails_the_request_naming_it(make):
    raising = make([slot(Fixed("good", [3])), slot(Fixed("editorial", error=KeyError("gone")), fail_open=False)])
    with pytest.raises(SourceError, match="source 'editorial' failed: KeyError"):
        raising(Query(user_id=7))
    assert raising.stats.snapshot()["failed_requests"] == 1
    slow = make([slot(Fixed("editorial", [3], sleep=1.0), fail_open=False, timeout_s=0.05)])
    with pytest.raises(SourceError, match=r"source 'editorial' timed out after 0.05 s"):
        slow(Query(user_id=7))


def test_blending_keeps_each_item_once_from_the_first_source(make):
    first, second = Fixed("first", [5, 6, 7]), Fixed("second", [7, 8, 5, 9])
    blended = blend([first(None, 10), second(None, 10)])
    assert blended.item_ids.tolist() == [5, 6, 7, 8, 9]
    assert blended.sources.tolist() == ["first", "first", "first", "second", "second"]
    response = make([slot(first), slot(second)])(Query(user_id=7, k=10))
    sources = dict(zip(response.item_ids.tolist(), response.sources.tolist(), strict=True))
    assert sources == {5: "first", 6: "first", 7: "first", 8: "second", 9: "second"}


def test_quotas_cap_each_source(make):
    response = make([slot(Fixed("a", [1, 2, 3, 4]), quota=2), slot(Fixed("b", [5, 6, 7]), quota=1)])(
        Query(user_id=7, k=10))
    assert sorted(response.item_ids.tolist()) == [1, 2, 5]


def test_filter_reasons_reach_the_response_and_scores_align(version, parts, make, unavailable):
    blocked, fine = unavailable
    proposed = [*blocked, UNKNOWN_ITEM, 150, *fine]
    pipeline = make([slot(Fixed("fixed", proposed))],
                    filters=[SeenItemsFilter(), ItemFeatureFilter(version.store, "available", True)])
    response = pipeline(Query(user_id=7, recent_items=(150,), k=10))
    assert sorted(response.item_ids.tolist()) == sorted(fine)
    reasons = dict(zip(response.removed.tolist(), response.reasons.tolist(), strict=True))
    assert reasons == {150: "seen", blocked[0]: "available != True", blocked[1]: "available != True",
                       UNKNOWN_ITEM: "unknown item"}

    hydrator, scorer = parts  # the response's scores are the scorer's for those very items
    ranked = Candidates(response.item_ids, response.sources, response.scores)
    expected = scorer(Query(user_id=7), hydrator(Query(user_id=7, recent_items=(150,)), ranked))
    np.testing.assert_allclose(response.scores, expected, atol=1e-6)


def test_propensities_multiply_across_orderers(make):
    response = make([slot(Fixed("a", [1, 2, 3]))], orderers=[Halving(), TopKOrderer()])(Query(user_id=7, k=2))
    np.testing.assert_array_equal(response.propensities, [0.5, 0.5])


def test_bad_requests_and_configs_name_the_value(version, make):
    pipeline = make([slot(Fixed("a", [1]))], allow_anonymous=False)
    with pytest.raises(ValueError, match="Query.k = 51; expected at most max_k = 50"):
        pipeline(Query(user_id=7, k=51))
    with pytest.raises(ValueError, match="user_id is None.*allow_anonymous is false"):
        pipeline(Query(user_id=None))
    with pytest.raises(ValueError, match=f"user_id = {10**9} is unknown to store version"):
        pipeline(Query(user_id=10**9))
    with pytest.raises(ValueError, match=r"stages \['source:a'\] appear more than once"):
        make([slot(Fixed("a")), slot(Fixed("a"))])
    with pytest.raises(ValueError, match="max_kk"):
        example_config(max_kk=10)
    with pytest.raises(ValueError, match=r"orderers \['max_per_source'\]; expected exactly one of \['top_k'"):
        example_config(orderers=[{"kind": "max_per_source", "cap": 5}])
    with pytest.raises(ValueError, match="kind"):
        example_config(filters=[{"kind": "moderation"}])


def test_stats_count_every_stage_under_concurrent_requests(make):
    pipeline = make([slot(Fixed("a", [1, 2, 3])), slot(Fixed("b", [3, 4]))], filters=[SeenItemsFilter()])

    def ask():
        for _ in range(10):
            pipeline(Query(user_id=7, recent_items=(1,), k=2))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = pipeline.stats.snapshot()
    assert snapshot["requests"] == 40 and snapshot["failed_requests"] == 0
    stages = snapshot["stages"]
    assert set(stages) == {"source:a", "source:b", "blend", "filter:seen", "hydrate", "scorer", "orderer:top_k"}
    assert stages["blend"]["in"] == 40 * 5 and stages["blend"]["out"] == 40 * 4
    assert stages["filter:seen"]["in"] == 40 * 4 and stages["filter:seen"]["out"] == 40 * 3
    assert stages["orderer:top_k"]["out"] == 40 * 2
    for counts in stages.values():
        assert counts["calls"] == 40 and sum(counts["latency_ms"].values()) == 40 and counts["total_ms"] >= 0


def test_warm_up_calls_every_source_untimed_then_starts_the_stats_afresh(make):
    calls = []

    class Counting(Fixed):
        def __call__(self, query, k):
            calls.append(self.name)
            return super().__call__(query, k)

    pipeline = make([slot(Counting("slow", [1], sleep=0.1), timeout_s=0.05),
                     slot(Counting("broken", error=ConnectionError("refused")))])
    pipeline(Query(user_id=7))
    pipeline.warm_up(Query(user_id=7))
    assert calls.count("slow") == 5 and calls.count("broken") == 5  # a request; two calls, two requests
    assert pipeline.stats.snapshot() == {"requests": 0, "failed_requests": 0, "stages": {}}


def test_a_pipeline_on_redis_answers_as_on_the_embedded_snapshot_and_fails_fast_without_it(version, redis_server,
                                                                                            monkeypatch):
    where = f"{redis_server.host}:{redis_server.port}"
    load_snapshot_into_redis(version.directory / "store", redis_server.host, redis_server.port,
                             version.manifest["version"])
    embedded = build_pipeline(example_config(), version)
    with monkeypatch.context() as patch:
        patch.setattr(EmbeddedStore, "open", lambda *args: 1 / 0)  # a Redis pipeline never loads the snapshot
        on_redis = open_pipeline(example_config(redis=where, redis_timeout_s=0.5), version.directory)
    try:
        popular = version.store.get_list("popular")[0]
        query = Query(user_id=7, recent_items=tuple(popular[:3].tolist()), k=20)
        expected, answered = embedded(query), on_redis(query)
        np.testing.assert_array_equal(answered.item_ids, expected.item_ids)
        np.testing.assert_allclose(answered.scores, expected.scores, rtol=1e-6)
        np.testing.assert_array_equal(answered.sources, expected.sources)
        assert answered.display_rows() == expected.display_rows()  # the example's titles, read from Redis

        redis_server.process.kill()
        redis_server.process.wait()
        started = time.perf_counter()
        with pytest.raises((SourceError, StoreError), match=where):  # the fail-closed popular list, or a filter
            on_redis(query)
        assert time.perf_counter() - started < 5
    finally:
        embedded.close()
        on_redis.close()


def test_each_item_shows_the_display_columns_the_store_holds_for_it(version):
    shown, plain = (build_pipeline(example_config(display=display), version) for display in (["title", "price"], []))
    try:
        response, bare = shown(Query(user_id=7, k=10)), plain(Query(user_id=7, k=10))
    finally:
        shown.close()
        plain.close()
    items = version.store.item_features(response.item_ids).features
    assert response.display_rows() == [{"title": f"item {i}", "price": float(price)}  # the synthetic titles
                                       for i, price in zip(response.item_ids, items["price"], strict=True)]
    assert bare.display_rows() == [{}] * 10
    with pytest.raises(ValueError, match=r"display column 'colour' is not an item column; expected one of \[.*'title'"):
        build_pipeline(example_config(display=["title", "colour"]), version)


def test_a_request_builds_no_pandas_frame(version, monkeypatch):
    pipeline = build_pipeline(example_config(display=["title"]), version)
    frames, init = [], pd.DataFrame.__init__
    monkeypatch.setattr(pd.DataFrame, "__init__", lambda self, *args, **kwargs: frames.append(args) or init(self, *args,
                                                                                                             **kwargs))
    try:
        response = pipeline(Query(user_id=7, recent_items=(1, 2), k=10))
    finally:
        pipeline.close()
    assert len(response.item_ids) == 10 and len(response.display_rows()) == 10
    assert frames == []  # store rows, request features and model inputs travel as arrays


def test_a_pipeline_that_fails_to_build_closes_the_store_it_opened(version, monkeypatch):
    closed = []
    monkeypatch.setattr(EmbeddedStore, "close", lambda self: closed.append(self))  # a Redis connection, in production
    with pytest.raises(ValueError, match="no_such_ranker"):
        open_pipeline(example_config(scorer=[{"kind": "torchscript", "model": "no_such_ranker"}]), version.directory)
    assert len(closed) == 1


def test_every_orderer_kind_runs_in_a_pipeline_and_only_reorders_or_drops(version):
    popular = version.store.get_list("popular")[0]
    orderers = [{"kind": "max_per_source", "cap": 60},
                {"kind": "boost", "column": "category", "in": ["category_1", "category_2"], "multiply": 1.5,
                 "cap": 3},
                {"kind": "boost", "list_name": "popular", "add": 0.01},
                {"kind": "mmr", "column": "category", "lambda": 0.5},
                {"kind": "spacing", "column": "category", "gap": 1},
                {"kind": "pin", "items": [int(popular[0])], "positions": [2]},
                {"kind": "bandit", "policy": "thompson", "draws": 200, "seed": 0}]
    pipeline = build_pipeline(example_config(orderers=orderers), version)
    try:
        response = pipeline(Query(user_id=7, k=10))
    finally:
        pipeline.close()
    assert len(response.item_ids) == 10 and len(set(response.item_ids)) == 10
    assert ((response.propensities > 0) & (response.propensities <= 1)).all()
    assert set(pipeline.stats.snapshot()["stages"]) >= {f"orderer:{kind}" for kind in
                                                       ("boost", "mmr", "spacing", "pin", "bandit")}


def strategies(chains: dict) -> dict:
    """A Thompson bandit orderer over the strategies ``chains``."""
    return {"kind": "bandit", "policy": "thompson", "seed": 0, "strategies": chains}


@pytest.mark.parametrize(("orderers", "message"), [
    ([{"kind": "mmr", "column": "colour", "lambda": 0.5}, {"kind": "top_k"}], "mmr column = 'colour' is not an item"),
    ([{"kind": "spacing", "column": "seller", "gap": 2}, {"kind": "top_k"}], "spacing column = 'seller'"),
    ([{"kind": "mmr", "column": "category", "lambda": 1.5}, {"kind": "top_k"}], r"lambda\n.*less than or equal to 1"),
    ([{"kind": "pin", "items": [1], "positions": [100]}, {"kind": "top_k"}], "100 is past the longest list, max_k"),
    ([{"kind": "pin", "items": [1, 2], "positions": [0]}, {"kind": "top_k"}], "2 items for 1 positions"),
    ([{"kind": "boost", "column": "category", "multiply": 2.0}, {"kind": "top_k"}], "boost takes one rule"),
    ([{"kind": "bandit", "policy": "softmax"}], r"policy\n.*'epsilon_greedy', 'ucb1' or 'thompson'"),
    ([{"kind": "bandit", "policy": "ucb1"}, {"kind": "top_k"}], r"expected exactly one of \['top_k', 'explore'"),
    ([strategies({"diverse": [{"kind": "explore", "epsilon": 0.1}], "plain": []})],
     r"orderers\.0\.bandit\.strategies\.diverse\.0\n.*tag 'explore' .* expected tags: 'max_per_source'"),
    ([strategies({"diverse": [{"kind": "mmr", "column": "colour", "lambda": 0.5}], "plain": []})],
     "bandit strategy 'diverse': mmr column = 'colour' is not an item column"),
    ([strategies({"pinned": [{"kind": "pin", "items": [1], "positions": [100]}], "plain": []})],
     "100 is past the longest list, max_k"),
    ([strategies({"plain": []})], r"orderers\.0\.bandit\.strategies\n.*at least 2 items"),
    ([strategies({"a b": [], "plain": []})], r"strategies\.a b\.\[key\]\n.*should match pattern"),
])
def test_bad_orderer_configs_name_the_field(version, orderers, message):
    with pytest.raises(ValueError, match=message):
        build_pipeline(example_config(orderers=orderers), version).close()


def test_a_strategy_bandit_serves_the_chain_of_the_strategy_it_drew(version):
    first = {"kind": "max_per_source", "cap": 60}
    diverse = [{"kind": "mmr", "column": "category", "lambda": 0.0}]
    config = example_config(orderers=[first, strategies({"diverse": diverse, "plain": []})])
    pipelines = {"bandit": build_pipeline(config, version),
                 "diverse": build_pipeline(example_config(orderers=[first, *diverse, {"kind": "top_k"}]), version),
                 "plain": build_pipeline(example_config(orderers=[first, {"kind": "top_k"}]), version)}
    drawn = []
    try:
        for user in range(1, 21):
            response = pipelines["bandit"](Query(user_id=user, k=5))
            drawn.append(response.strategy.name)
            alone = pipelines[response.strategy.name](Query(user_id=user, k=5))
            assert response.item_ids.tolist() == alone.item_ids.tolist()
            assert response.strategy.propensity == pytest.approx(0.5, abs=0.15)  # no counts yet: a coin toss
            assert response.propensities[0] == 1.0  # MMR keeps the best item first: both strategies agree
            assert ((response.propensities > 0) & (response.propensities <= 1)).all()
    finally:
        for pipeline in pipelines.values():
            pipeline.close()
    assert set(drawn) == {"diverse", "plain"}


@pytest.fixture(scope="module")
def blend_version(version, tiny_dataset, trained_runs, tmp_path_factory):
    """A copy of ``version`` whose models also hold ``linear_blend``: the linear ranker trained on the
    tiny dataset's candidate table, reading each row's source and retrieval score."""
    root = tmp_path_factory.mktemp("blend")
    table = write_dataset(build_candidates(tiny_dataset, trained_runs["two_tower"].parent,
                                           CandidatesConfig(pool=20, popular_k=10, negatives=2)), root / "table")
    config = RunConfig.model_validate({**RUN_CONFIGS["linear"], "features": ["user_id", "item_id", "source",
                                                                             "retrieval_score"]})
    with training_state_restored():
        train_ranker("linear", table, root / "run", config)
    shutil.copytree(version.directory, root / "version")
    export_models({"linear_blend": root / "run"}, root / "version" / "models")
    return open_version(root / "version")


BLEND_RANKER = [{"kind": "torchscript", "model": "linear_blend"}]


def test_blend_scoring_passes_each_candidates_source_and_score_to_the_ranker(blend_version, monkeypatch):
    scored = []
    original = TorchScriptScorer.__call__

    def score_and_record(self, query, candidates):
        scored.append((candidates, original(self, query, candidates)))
        return scored[-1][1]

    monkeypatch.setattr(TorchScriptScorer, "__call__", score_and_record)
    sources = [{"kind": "ann", "quota": 20, "timeout_s": 5.0},
               {"kind": "list", "list_name": "popular", "timeout_s": 5.0}]
    pipeline = build_pipeline(example_config(blend="scoring", scorer=BLEND_RANKER, sources=sources), blend_version)
    try:
        response = pipeline(Query(user_id=7, k=10))
    finally:
        pipeline.close()
    (candidates, scores), = scored
    rows = candidates.features
    assert set(candidates.sources) >= {"ann", "popular"} and len(response.item_ids) == 10
    assert rows["source"].tolist() == candidates.sources.tolist()
    ann = candidates.sources == "ann"  # the two-tower score is the ANN source's; missing for the others
    np.testing.assert_array_equal(rows["retrieval_score"], np.where(ann, candidates.scores, np.nan))
    ranker = TorchScriptScorer(blend_version.directory / "models", "linear_blend")
    other = candidates.features.assign(source="random", retrieval_score=0.0)
    moved = ranker(Query(user_id=7), Candidates(candidates.item_ids, candidates.sources, candidates.scores, other))
    assert not np.allclose(moved, scores)  # the ranker reads them


def test_a_ranker_reading_candidate_features_needs_blend_scoring(blend_version):
    with pytest.raises(ValueError, match=r"'torchscript:linear_blend' reads \['source', 'retrieval_score'\], which "
                                         r"only `blend: scoring` passes a ranker"):
        build_pipeline(example_config(scorer=BLEND_RANKER), blend_version).close()


def test_blend_scoring_leaves_a_ranker_without_candidate_features_unchanged(version):
    answers = []
    for mode in ("retrieval", "scoring"):
        pipeline = build_pipeline(example_config(blend=mode, scorer=[{"kind": "torchscript", "model": "linear"}]),
                                  version)
        try:
            answers.append([pipeline(Query(user_id=user, k=10)) for user in (3, 7)])
        finally:
            pipeline.close()
    for retrieval, scoring in zip(*answers, strict=True):
        assert retrieval.item_ids.tolist() == scoring.item_ids.tolist()
        np.testing.assert_array_equal(retrieval.scores, scoring.scores)
