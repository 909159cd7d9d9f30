"""The HTTP API served by uvicorn over a refreshed version: recommendations, 400/422/503 errors,
health, Prometheus metrics, a hot swap under traffic, and refused versions that leave the old
one serving."""

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import hypothesis
import numpy as np
import pandas as pd
import pytest
import redis
import schemathesis
import torch
import yaml
from hypothesis import strategies
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode

from data.prepare import prepare
from data.schema import FeatureSpec
from data.synthetic import SyntheticConfig, generate
from inference.artifacts import ArtifactError, ArtifactRoot, write_manifest
from inference.impressions import ImpressionLog, logged_slots, read_requests
from inference.pipeline.config import PipelineConfig
from inference.pipeline.scorers import TorchScriptScorer, TorchScriptSpec
from inference.pipeline.sources import ListSource
from inference.pipeline.types import Query
from inference.refresh.job import RefreshConfig, refresh
from inference.service import (
    CONTROL,
    HEALTH_WRITE_S,
    MAX_RECENT_ITEMS,
    RETIRE_CHECK_S,
    AnswerStore,
    Experiment,
    HealthBoard,
    Limits,
    Recommender,
    Serving,
    Shadow,
    WorkerHealth,
    create_app,
    serve_in_thread,
)
from inference.store import EmbeddedStore, load_snapshot_into_redis
from training.train import RunConfig, train_ranker, train_retrieval

EXAMPLE = Path(__file__).parents[2] / "configs" / "pipeline.yaml"
FUZZ_EXAMPLES = 400  # per endpoint: the three with inputs make at least 1,000 requests
CONFIG = RefreshConfig(pools={"user_n": 20, "similar_k": 10, "similar_items": 50})

LINEAR = [TorchScriptSpec(kind="torchscript", model="linear")]
NO_SUCH_RANKER = [TorchScriptSpec(kind="torchscript", model="no_such_ranker")]


def example_config() -> dict:
    raw = yaml.safe_load(EXAMPLE.read_text())
    for source in raw["sources"]:
        source["timeout_s"] = 5.0  # the example's tens of milliseconds are for an idle server, not a busy test machine
    return raw


def pipeline_config() -> PipelineConfig:
    return PipelineConfig.model_validate(example_config())


@pytest.fixture(scope="module")
def root(tiny_dataset, trained_runs, tmp_path_factory) -> Path:
    """An artefact root of this module's own, with v0001 published."""
    root = tmp_path_factory.mktemp("artifacts")
    refresh(tiny_dataset, trained_runs["two_tower"].parent, root, CONFIG)
    return root


@pytest.fixture(scope="module")
def recommender(root):
    recommender = Recommender(root, pipeline_config(), poll_s=0.1).start()
    yield recommender
    recommender.close()


@pytest.fixture(scope="module")
def url(recommender):
    """The app's base URL, served by uvicorn on a free loopback port in a daemon thread; each
    request may take 10 s (a version swap on a busy test machine can take seconds)."""
    with serve_in_thread(recommender, limits=Limits(request_timeout_s=10.0)) as base:
        yield base


def call(url: str, path: str, body: dict | None = None, headers: dict | None = None,
         timeout_s: float = 30) -> tuple[int, str, str]:
    """(status, content type, body text) of a GET, or of a POST of ``body`` as JSON."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


def recommend(url: str, **body) -> tuple[int, dict]:
    status, _, text = call(url, "/recommend", body)
    return status, json.loads(text)


def metrics(url: str, headers: dict | None = None) -> dict[tuple[str, frozenset], float]:
    """The samples of /metrics by (name, labels), parsed by prometheus-client's own parser."""
    status, content_type, text = call(url, "/metrics", headers=headers)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_a_recommendation_has_k_items_and_none_of_the_recent_ones(url):
    status, first = recommend(url, user_id=7, k=20)
    assert status == 200 and first["version"] == "v0001" and len(first["items"]) == 20
    assert re.fullmatch(r"[0-9a-f]{32}", first["request_id"])
    recent = [item["item_id"] for item in first["items"][:3]]
    status, reply = recommend(url, user_id=7, recent_items=recent, context={}, k=20)
    ids = [item["item_id"] for item in reply["items"]]
    assert status == 200 and len(ids) == 20 == len(set(ids)) and not set(ids) & set(recent)
    assert reply["removed"]["seen"] >= 1
    assert set(reply["items"][0]) == {"item_id", "score", "source", "propensity", "display"}
    assert all(item["display"] == {"title": f"item {item['item_id']}"} for item in reply["items"])  # the example's
    assert len(recommend(url, k=5)[1]["items"]) == 5  # an anonymous visitor


def test_a_config_without_display_columns_answers_without_them(root):
    recommender = Recommender(root, pipeline_config().model_copy(update={"display": []}))
    try:
        with serve_in_thread(recommender) as base:
            status, reply = recommend(base, user_id=7, k=5)
    finally:
        recommender.close()
    assert status == 200 and len(reply["items"]) == 5
    assert all(set(item) == {"item_id", "score", "source", "propensity"} for item in reply["items"])


def test_bad_bodies_are_refused_naming_the_field(url):
    status, reply = recommend(url, user_id=7, userid=7)
    assert status == 422 and reply["detail"][0]["loc"] == ["body", "userid"]
    status, reply = recommend(url, recent_items=list(range(MAX_RECENT_ITEMS + 1)))
    assert status == 422 and reply["detail"][0]["loc"] == ["body", "recent_items"]
    status, reply = recommend(url, k=101)
    assert status == 400 and reply["detail"] == "Query.k = 101; expected at most max_k = 100"


def test_a_failing_fail_closed_source_or_scorer_chain_is_503_naming_no_internals(url, monkeypatch, caplog):
    before = metrics(url)[("recstack_failed_requests_total", frozenset({("version", "v0001"), ("variant", "control")}))]

    def refuse(self, query, k):
        raise ConnectionError("store unreachable")

    with monkeypatch.context() as patch:
        patch.setattr(ListSource, "__call__", refuse)  # "popular" is fail-closed, "user" fail-open
        status, reply = recommend(url, user_id=7)
    assert status == 503 and reply["detail"] == "the recommendation could not be computed; retry later"
    assert "source 'popular' failed: ConnectionError: store unreachable" in caplog.text  # the log has the details
    with monkeypatch.context() as patch:
        patch.setattr(TorchScriptScorer, "__call__", refuse)
        status, reply = recommend(url, user_id=7)
    assert status == 503 and "every scorer of" in caplog.text
    after = metrics(url)[("recstack_failed_requests_total", frozenset({("version", "v0001"), ("variant", "control")}))]
    assert after == before + 2


def test_a_version_that_fails_the_warm_up_query_is_refused(root, monkeypatch):
    monkeypatch.setattr(ListSource, "__call__", lambda self, query, k: 1 / 0)
    with pytest.raises(ArtifactError, match=r"nothing to serve.*v0001.*SourceError: source 'popular' failed"):
        Recommender(root, pipeline_config())


def test_a_version_whose_pipeline_fails_to_build_is_refused_and_its_store_closed(root, monkeypatch):
    opened, closed, open_store = [], [], EmbeddedStore.open
    monkeypatch.setattr(EmbeddedStore, "open", lambda *args: opened.append(open_store(*args)) or opened[-1])
    monkeypatch.setattr(EmbeddedStore, "close", lambda self: closed.append(self))  # a Redis connection, in production
    broken = pipeline_config().model_copy(update={"scorer": NO_SUCH_RANKER})
    with pytest.raises(ArtifactError, match="nothing to serve.*no_such_ranker"):
        Recommender(root, broken)
    assert opened and closed == opened


def test_health_names_the_serving_version(url):
    status, _, text = call(url, "/healthz")
    assert status == 200 and json.loads(text) == {"version": "v0001", "refused": {}, "degraded": None, "workers": None}


def test_metrics_are_prometheus_text_and_count_requests(url):
    requests = ("recstack_requests_total", frozenset({("version", "v0001"), ("variant", "control")}))
    before = metrics(url)
    assert recommend(url, user_id=3)[0] == 200
    samples = metrics(url)
    assert samples[requests] == before[requests] + 1
    buckets = defaultdict(list)
    for (name, labels), value in samples.items():
        if name == "recstack_stage_latency_seconds_bucket":
            le = dict(labels)["le"]
            buckets[labels - {("le", le)}].append((float(le), value))
    assert {dict(labels)["stage"] for labels in buckets} >= {"source:ann", "source:popular", "hydrate", "scorer"}
    for labels, counts in buckets.items():
        cumulative = [n for _, n in sorted(counts)]
        assert cumulative == sorted(cumulative) and len(cumulative) == 13
        assert samples["recstack_stage_latency_seconds_count", labels] == cumulative[-1]
        assert samples["recstack_stage_latency_seconds_sum", labels] >= 0
        assert samples["recstack_stage_calls_total", labels] == cumulative[-1]


def test_a_new_version_swaps_in_under_traffic_and_a_broken_one_is_refused(url, recommender, root, tiny_dataset,
                                                                          trained_runs):
    replies, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            status, reply = recommend(url, user_id=7, k=10)
            replies.append((status, reply.get("version")))

    client = threading.Thread(target=traffic)
    client.start()
    try:
        wait_for(lambda: replies)
        refresh(tiny_dataset, trained_runs["two_tower"].parent, root, CONFIG, incremental=True)
        wait_for(lambda: recommender.live.version == "v0002")
        time.sleep(0.2)  # traffic on the new version
    finally:
        stop.set()
        client.join()
    statuses, versions = zip(*replies, strict=True)
    assert set(statuses) == {200} and versions[0] == "v0001" and versions[-1] == "v0002"
    assert json.loads(call(url, "/healthz")[2]) == {"version": "v0002", "refused": {}, "degraded": None,
                                                     "workers": None}
    assert ("recstack_requests_total", frozenset({("version", "v0002"), ("variant", "control")})) in metrics(url)

    artifacts = ArtifactRoot(root)
    with artifacts.build() as (version, staging):  # a version with nothing in it but its manifest
        write_manifest(staging, {"version": version})
    artifacts.publish(version)
    wait_for(lambda: version in recommender.live.refused)
    health = json.loads(call(url, "/healthz")[2])
    assert health["version"] == "v0002" and "store" in health["refused"][version]
    status, reply = recommend(url, user_id=7)
    assert status == 200 and reply["version"] == "v0002"


def test_a_swapped_out_version_is_closed_once_the_last_request_reading_it_is_done(root, tmp_path, tiny_dataset,
                                                                                  trained_runs, monkeypatch):
    copy = tmp_path / "artifacts"
    shutil.copytree(root / "v0001", copy / "v0001")
    (copy / "CURRENT").write_text("v0001\n")
    closed, reading, finish, answers = [], threading.Event(), threading.Event(), []
    close, answer = Serving.close, Serving.answer

    def record_close(serving: Serving) -> None:  # Servings of other tests' servers may close meanwhile
        closed.append(serving)
        close(serving)

    def answer_slowly_for_user_1(serving: Serving, query: Query, arm: str = CONTROL):
        if serving is first and query.user_id == 1:
            reading.set()
            finish.wait(600)  # the swap may take minutes on a busy machine
        return answer(serving, query, arm)

    monkeypatch.setattr(Serving, "close", record_close)
    monkeypatch.setattr(Serving, "answer", answer_slowly_for_user_1)
    recommender = Recommender(copy, pipeline_config(), poll_s=3600)
    first = recommender.live.state
    slow = threading.Thread(target=lambda: answers.append(recommender.recommend(Query(user_id=1, k=5))))
    try:
        slow.start()
        assert reading.wait(600)
        refresh(tiny_dataset, trained_runs["two_tower"].parent, copy, CONFIG, incremental=True)
        assert recommender.live.refresh() and recommender.live.version == "v0002"
        assert recommender.recommend(Query(user_id=2, k=5)).version == "v0002"
        second = recommender.live.state
        time.sleep(3 * RETIRE_CHECK_S)
        assert first not in closed  # the slow request still reads v0001
        finish.set()
        slow.join(600)
        assert answers[0].version == "v0001" and len(answers[0].response.item_ids) == 5
        wait_for(lambda: first in closed)
    finally:
        finish.set()
        recommender.close()
    assert [s.version for s in closed if s in (first, second)] == ["v0001", "v0002"]


def test_feedback_remembers_the_newest_answers_in_a_file_two_workers_share(tmp_path):
    first, second = (AnswerStore(tmp_path / "answers.sqlite", max_rows=10) for _ in range(2))  # as two workers do
    try:
        for n in range(100):
            (first if n % 2 else second).put(f"r{n:03d}", [n, 1000 + n], ["ann", "popular"], "plain" if n % 3 else None)
        assert len(first) == len(second) == 10
        assert second.get("r091") == ({91: "ann", 1091: "popular"}, "plain") and first.get("r090")[1] is None
        assert first.get("r089") is None and second.get("r089") is None
    finally:
        first.close()
        second.close()


def wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_pipeline_refusing_anonymous_visitors_is_probed_with_a_known_user(root):
    strict = pipeline_config().model_copy(update={"allow_anonymous": False})
    with pytest.raises(ValueError, match="allow_anonymous: false.*--probe-user"):
        Recommender(root, strict)
    with pytest.raises(ArtifactError, match=r"user_id = 999999 is unknown to store version"):
        Recommender(root, strict, Query(user_id=999_999))
    recommender = Recommender(root, strict, Query(user_id=7))
    try:
        assert len(recommender.recommend(Query(user_id=7, k=5)).response.item_ids) == 5
    finally:
        recommender.close()


def test_feedback_credits_the_items_source_and_names_what_it_cannot_find(url):
    _, reply = recommend(url, user_id=7, k=10)
    item = reply["items"][0]
    served = ("recstack_source_served_total", frozenset({("source", item["source"])}))
    rewards = ("recstack_source_rewards_total", frozenset({("source", item["source"])}))
    before = metrics(url)
    body = {"request_id": reply["request_id"], "item_id": item["item_id"]}
    status, _, text = call(url, "/feedback", body)
    assert status == 200 and json.loads(text) == {"source": item["source"], "strategy": None}
    after = metrics(url)
    assert after[rewards] == before.get(rewards, 0) + 1 and after[served] >= 1
    status, _, text = call(url, "/feedback", {**body, "request_id": "f" * 32})
    assert status == 404 and "request_id 'ffffffffffffffffffffffffffffffff' is not among" in json.loads(text)["detail"]
    status, _, text = call(url, "/feedback", {**body, "item_id": -5})
    assert status == 400 and "item_id -5 was not served in request" in json.loads(text)["detail"]
    status, _, text = call(url, "/feedback", {**body, "reward": 2})
    assert status == 422 and json.loads(text)["detail"][0]["loc"] == ["body", "reward"]


def test_an_exploring_pipeline_logs_answers_and_feedback_for_off_policy_evaluation(root, tmp_path):
    raw = pipeline_config().model_dump()
    raw["orderers"][-1] = {"kind": "explore", "epsilon": 0.5, "seed": 0}
    log = ImpressionLog(tmp_path / "log")
    recommender = Recommender(root, PipelineConfig.model_validate(raw), log=log)
    try:
        served = [recommender.recommend(Query(user_id=user, k=10)) for user in range(1, 21)]
        clicked = served[0].response.item_ids[3]
        assert recommender.feedback(served[0].request_id, int(clicked), 1.0) == (served[0].response.sources[3], None)
    finally:
        recommender.close()
        log.close()
    propensities = np.concatenate([s.response.propensities for s in served])
    assert (propensities < 1).any() and ((propensities > 0) & (propensities <= 1)).all()
    slots = logged_slots(tmp_path / "log")
    assert len(slots) == 200 and slots["reward"].sum() == 1.0
    first = slots[slots["request_id"] == served[0].request_id].sort_values("position")
    assert first["item_id"].tolist() == served[0].response.item_ids.tolist()
    np.testing.assert_allclose(first["propensity"], served[0].response.propensities)
    assert first.loc[first["item_id"] == clicked, "reward"].tolist() == [1.0]


def test_a_strategy_bandit_names_its_strategy_logs_it_and_feedback_credits_it(root, tmp_path):
    raw = pipeline_config().model_dump(by_alias=True)
    raw["orderers"][-1] = {"kind": "bandit", "policy": "epsilon_greedy", "epsilon": 0.5, "seed": 0, "strategies": {
        "diverse": [{"kind": "mmr", "column": "category", "lambda": 0.2}], "plain": []}}
    log = ImpressionLog(tmp_path / "log")
    recommender = Recommender(root, PipelineConfig.model_validate(raw), log=log)
    try:
        with serve_in_thread(recommender) as base:
            replies = [recommend(base, user_id=user, k=5)[1] for user in range(1, 21)]
            first = replies[0]
            status, _, text = call(base, "/feedback", {"request_id": first["request_id"],
                                                       "item_id": first["items"][1]["item_id"]})
        counts = recommender.bandit.snapshot()
    finally:
        recommender.close()
        log.close()
    drawn = [reply["strategy"] for reply in replies]
    assert set(drawn) == {"diverse", "plain"}
    assert status == 200 and json.loads(text) == {"source": first["items"][1]["source"], "strategy": drawn[0]}
    for name in ("diverse", "plain"):  # served per slot, rewarded per click, as a source is
        served = sum(len(reply["items"]) for reply in replies if reply["strategy"] == name)
        assert counts[f"strategy:{name}"] == {"served": served, "rewards": float(name == drawn[0]),
                                             "estimate": pytest.approx((float(name == drawn[0]) + 1) / (served + 2))}
    requests = read_requests(tmp_path / "log")
    assert requests["strategy"].tolist() == drawn
    assert ((requests["strategy_propensity"] > 0) & (requests["strategy_propensity"] < 1)).all()
    assert logged_slots(tmp_path / "log")["reward"].sum() == 1.0


def test_a_shadow_config_runs_beside_the_live_one_and_a_broken_one_leaves_the_live_serving(root):
    candidate = pipeline_config().model_copy(update={"scorer": LINEAR})
    recommender = Recommender(root, pipeline_config(), shadow=Shadow(candidate, sample=1.0))
    try:
        with serve_in_thread(recommender) as base:
            live = [recommend(base, user_id=user, k=10)[1] for user in range(1, 11)]
            recommender.live.state.shadow.close()  # waits for the mirrored calls
            status, _, text = call(base, "/shadow?k=5")
            samples = metrics(base)
        assert status == 200 and all(len(answer["items"]) == 10 for answer in live)
        report = json.loads(text)
        assert report["counts"] == {"requests": 10, "shadowed": 10, "failed": 0, "skipped": 0, "pending": 0}
        comparison = report["comparison"]
        assert comparison["requests"] == 10 and comparison["k"] == 5
        assert 0 <= comparison["rank_biased_overlap"] <= 1 and comparison["identical_top_k"] < 1  # another ranker
        version = report["version"]
        assert samples["recstack_shadow_calls_total", frozenset({("version", version), ("outcome", "shadowed")})] == 10
    finally:
        recommender.close()

    broken = pipeline_config().model_copy(update={"scorer": NO_SUCH_RANKER})
    recommender = Recommender(root, pipeline_config(), shadow=Shadow(broken))
    try:
        with serve_in_thread(recommender) as base:
            assert recommend(base, user_id=3, k=5)[0] == 200
            status, _, text = call(base, "/shadow")
        assert status == 404 and "has no shadow pipeline: ValueError" in json.loads(text)["detail"]
    finally:
        recommender.close()
    with pytest.raises(ValueError, match="shadow sample = 0"):
        Shadow(candidate, sample=0)


def test_an_experiment_splits_users_stably_and_logs_each_answers_arm(root, tmp_path):
    treatment = pipeline_config().model_copy(update={"scorer": LINEAR})
    experiment = Experiment("linear-ranker", treatment, share=0.5)
    log = ImpressionLog(tmp_path / "log")
    recommender = Recommender(root, pipeline_config(), log=log, experiment=experiment)
    try:
        with serve_in_thread(recommender) as base:
            first = {user: recommend(base, user_id=user, k=5)[1] for user in range(1, 41)}
            again = {user: recommend(base, user_id=user, k=5)[1] for user in range(1, 41)}
            samples = metrics(base)
        version = first[1]["version"]
        requests = {arm: samples["recstack_requests_total", frozenset({("version", version), ("variant", arm)})]
                    for arm in ("control", "linear-ranker")}
        serving = recommender.live.state
        for user, reply in first.items():  # each arm's answer is its own pipeline's
            arm = serving.treatment if reply["variant"] == "linear-ranker" else serving.pipeline
            other = serving.pipeline if reply["variant"] == "linear-ranker" else serving.treatment
            scores = [item["score"] for item in reply["items"]]
            np.testing.assert_allclose(scores, arm(Query(user_id=user, k=5)).scores, rtol=1e-6)
            assert not np.allclose(scores, other(Query(user_id=user, k=5)).scores)
    finally:
        recommender.close()
        log.close()
    arms = {user: reply["variant"] for user, reply in first.items()}
    assert arms == {user: reply["variant"] for user, reply in again.items()}  # a user keeps an arm
    assert requests == {arm: 2 * list(arms.values()).count(arm) for arm in requests}  # /metrics per arm
    assert set(arms.values()) == {"control", "linear-ranker"} and 10 <= list(arms.values()).count("control") <= 30
    assert all(arms[user] == experiment.arm(user, "any request") for user in arms)
    slots = logged_slots(tmp_path / "log")
    logged = slots.drop_duplicates("request_id").set_index("request_id")["variant"]
    assert logged.to_dict() == {reply["request_id"]: reply["variant"] for reply in [*first.values(), *again.values()]}
    with pytest.raises(ValueError, match="experiment name 'control'"):
        Experiment("control", treatment)
    with pytest.raises(ValueError, match=r"experiment share = 1; expected a share of users in \(0, 1\)"):
        Experiment("b", treatment, share=1)


def test_servers_on_a_redis_store_share_their_bandit_counts(root, redis_server):
    for store in sorted(root.glob("v*/store")):  # whichever version the recommenders serve (some are broken)
        if (store / "users.parquet").is_file():
            load_snapshot_into_redis(store, redis_server.host, redis_server.port, store.parent.name)
    config = pipeline_config().model_copy(update={"redis": f"{redis_server.host}:{redis_server.port}",
                                                  "redis_timeout_s": 2.0})
    first, second = Recommender(root, config), Recommender(root, config)
    try:
        served = first.recommend(Query(user_id=7, k=5))
        first.feedback(served.request_id, int(served.response.item_ids[0]), 1.0)
        second.recommend(Query(user_id=8, k=5))
    finally:
        first.close()  # each sends its counts on close
        second.close()
    source = served.response.sources[0]
    stored = redis.Redis(redis_server.host, redis_server.port).hgetall("recstack:bandit")
    assert float(stored[f"rewards:{source}".encode()]) == 1.0
    assert sum(float(n) for field, n in stored.items() if field.startswith(b"served:")) == 10


def slow_popular(seconds: float):
    """A ListSource call that takes ``seconds`` for the "popular" list, as a loaded store might."""
    original = ListSource.__call__

    def call_slowly(self, query, k):
        if self.name == "popular":
            time.sleep(seconds)
        return original(self, query, k)

    return call_slowly


def raw_http(url: str, request: bytes, timeout_s: float = 10) -> bytes:
    """The server's reply to the raw bytes ``request``, read until it closes the connection or the timeout."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as connection:
        connection.sendall(request)
        chunks = []
        try:
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
    return b"".join(chunks)


def test_a_large_body_is_refused_before_it_is_read_and_errors_quote_short_excerpts(url):
    head = (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000\r\nConnection: close\r\n\r\n")
    reply = raw_http(url, head + b'{"user_id": 1, "context": {"a": "')  # the other 10 MB never come
    assert reply.startswith(b"HTTP/1.1 413 ") and b"exceeds 65536 bytes" in reply
    chunked = (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + b"8000\r\n" + b" " * 0x8000 + b"\r\n") * 1
    reply = raw_http(url, chunked + b"8000\r\n" + b" " * 0x8000 + b"\r\n" + b"8000\r\n" + b" " * 0x8000 + b"\r\n")
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert json.loads(call(url, "/healthz")[2])["version"]  # the server is not stalled

    status, _, text = call(url, "/recommend", {"user_id": 7, "context": {"note": "x" * 60_000}})
    assert status == 422 and len(text) < 2000
    detail = json.loads(text)["detail"][0]
    assert detail["loc"][:3] == ["body", "context", "note"] and detail["input"].endswith("... (60000 characters)")


def test_nan_infinity_and_out_of_range_numbers_are_refused(url):
    for path, body in (("/recommend", '{"user_id": 7, "context": {"hour": NaN}}'),
                       ("/feedback", '{"request_id": "a", "item_id": 1, "reward": NaN}'),
                       ("/feedback", '{"request_id": "a", "item_id": 1, "reward": Infinity}'),
                       ("/recommend", '{"user_id": 99999999999999999999999}'),
                       ("/recommend", '{"recent_items": [-99999999999999999999999]}'),
                       ("/recommend", json.dumps({"context": {f"f{i}": i for i in range(65)}}))):
        request = urllib.request.Request(url + path, body.encode(), {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 422, (path, body)


@pytest.mark.parametrize(("limits", "reason"), [
    (Limits(max_in_flight=1, max_queue=0, queue_timeout_s=0.01), "queue_full"),
    (Limits(max_in_flight=1, max_queue=8, queue_timeout_s=0.2), "queue_wait"),  # it would time out in the queue
])
def test_requests_beyond_the_limits_are_shed_at_once_with_retry_after_and_counted(root, monkeypatch, limits, reason):
    monkeypatch.setattr(ListSource, "__call__", slow_popular(0.5))
    recommender = Recommender(root, pipeline_config())
    try:
        with serve_in_thread(recommender, limits=limits) as base:
            assert recommend(base, user_id=7)[0] == 200  # turns last 0.5 s
            first = threading.Thread(target=recommend, args=(base,), kwargs={"user_id": 7})
            first.start()
            wait_for(lambda: metrics(base)["recstack_in_flight_requests", frozenset()] == 1)
            request = urllib.request.Request(base + "/recommend", b'{"user_id": 8}',
                                             {"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as shed:
                urllib.request.urlopen(request, timeout=30)
            assert shed.value.code == 503 and shed.value.headers["Retry-After"] == "1"
            assert call(base, "/healthz")[0] == 200  # never queued
            first.join()
            samples = metrics(base)
        shed_counts = {key: n for key, n in samples.items() if key[0] == "recstack_shed_requests_total"}
        assert shed_counts == {("recstack_shed_requests_total", frozenset({("reason", reason)})): 1}
        assert samples["recstack_in_flight_requests", frozenset()] == 0
    finally:
        recommender.close()


def test_a_request_past_its_budget_or_abandoned_by_its_client_is_not_computed_further(root, monkeypatch):
    recommender = Recommender(root, pipeline_config())
    scored = []
    score = TorchScriptScorer.__call__
    monkeypatch.setattr(TorchScriptScorer, "__call__", lambda self, q, c: scored.append(q) or score(self, q, c))
    monkeypatch.setattr(ListSource, "__call__", slow_popular(0.6))
    try:
        with serve_in_thread(recommender, limits=Limits(queue_timeout_s=0.05, request_timeout_s=0.2)) as base:
            status, _, text = call(base, "/recommend", {"user_id": 7})
            assert status == 503 and "in time" in text
            with pytest.raises(TimeoutError):  # the client gives up while the popular list loads
                call(base, "/recommend", {"user_id": 7}, timeout_s=0.1)
            wait_for(lambda: metrics(base).get(("recstack_shed_requests_total",
                                                frozenset({("reason", "abandoned")}))) == 1)
            samples = metrics(base)
        assert samples["recstack_shed_requests_total", frozenset({("reason", "deadline")})] == 1
        assert scored == []
    finally:
        recommender.close()


@pytest.mark.parametrize("path,body", [("/recommend", {"user_id": 7}), ("/feedback", {"request_id": "a", "item_id": 1}),
                                       ("/shadow", None), ("/metrics", None), ("/openapi.json", None),
                                       ("/healthz", None)])
def test_with_an_api_key_every_endpoint_but_health_needs_it(recommender, path, body):
    with serve_in_thread(recommender, api_key="s3cret") as base:
        without = call(base, path, body)[0]
        wrong = call(base, path, body, {"Authorization": "Bearer guess"})[0]
        bearer = call(base, path, body, {"Authorization": "Bearer s3cret"})[0]
        header = call(base, path, body, {"X-API-Key": "s3cret"})[0]
    expected = {"/recommend": 200, "/feedback": 404, "/shadow": 404}.get(path, 200)
    if path == "/healthz":
        assert without == wrong == bearer == header == 200
    else:
        assert (without, wrong, bearer, header) == (401, 401, expected, expected)


def test_without_an_api_key_every_endpoint_answers(url):
    statuses = {path: call(url, path, body)[0] for path, body in (
        ("/recommend", {"user_id": 7}), ("/feedback", {"request_id": "a", "item_id": 1}), ("/shadow", None),
        ("/metrics", None), ("/openapi.json", None), ("/healthz", None))}
    assert statuses == {"/recommend": 200, "/feedback": 404, "/shadow": 404, "/metrics": 200, "/openapi.json": 200,
                        "/healthz": 200}


def test_fuzzed_requests_to_every_endpoint_get_no_server_error(recommender):
    """schemathesis generates bodies and parameters from /openapi.json, in and out of the schema."""
    app = create_app(recommender)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    answered = Counter()
    def fuzzer(operation):
        @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(case=strategies.one_of([operation.as_strategy(mode) for mode in GenerationMode]))
        def fuzz(case):
            response = case.call()
            answered[operation.label, response.status_code] += 1
            assert response.status_code < 500, (operation.label, case.body, response.text[:300])
            if operation.label == "POST /recommend" and response.status_code == 200:
                operation.validate_response(response)  # the reply, display columns included, as /openapi.json says

        return fuzz

    for result in schema.get_all_operations():
        fuzzer(result.ok())()
    assert sum(answered.values()) >= 1000
    assert {label for label, _ in answered} == {"POST /recommend", "POST /feedback", "GET /shadow", "GET /healthz",
                                                "GET /metrics"}


@pytest.fixture(scope="module")
def clocked_root(tmp_path_factory) -> Path:
    """A published version whose linear ranker reads request-time ``hour`` and ``weekday`` features."""
    base = tmp_path_factory.mktemp("clocked")
    dataset = generate(SyntheticConfig(users=120, items=80, interactions=4000, seed=3))
    time = pd.to_datetime(dataset.interactions["timestamp"], unit="s", utc=True)
    interactions = dataset.interactions.assign(hour=time.dt.hour, weekday=time.dt.weekday)
    clock = [FeatureSpec("hour", "interactions", "categorical"), FeatureSpec("weekday", "interactions", "categorical")]
    schema = dataset.schema.with_features([*dataset.schema.features, *clock])
    data = prepare(dataclasses.replace(dataset, log=interactions, schema=schema), base / "data",
                   split="temporal", seed=1)
    train = {"lr": 0.03, "max_epochs": 1, "batch_size": 512, "accelerator": "cpu"}
    environ, deterministic = dict(os.environ), torch.are_deterministic_algorithms_enabled()
    try:
        train_retrieval(data, base / "runs" / "two_tower", RunConfig.model_validate(
            {"train": train, "model": {"hidden_sizes": [16], "output_dim": 8}}))
        train_ranker("linear", data, base / "runs" / "linear", RunConfig.model_validate({"train": train}))
    finally:  # training sets deterministic algorithms and PL_* variables process-wide
        os.environ.clear()
        os.environ.update(environ)
        torch.use_deterministic_algorithms(deterministic)
    root = base / "artifacts"
    refresh(data, base / "runs", root, CONFIG.model_copy(update={"rankers": ["linear"]}))
    return root


def test_minimal_requests_get_k_items_with_the_context_derived_from_the_clock(clocked_root):
    config = pipeline_config().model_copy(update={"scorer": LINEAR, "time_zone": "Asia/Tokyo",
                                                  "time_features": {"hour": "hour"}})
    recommender = Recommender(clocked_root, config)  # probed with an anonymous query without context
    try:
        with serve_in_thread(recommender) as base:
            replies = [recommend(base), recommend(base, user_id=1), recommend(base, user_id=1, k=7, context={})]
            samples = metrics(base)
        assert [(status, len(reply["items"])) for status, reply in replies] == [(200, 10), (200, 10), (200, 7)]
        assert not [key for key in samples if key[0] == "recstack_scorer_fallbacks_total"]  # the ranker scored them
        completer = recommender.live.state.pipeline.stages.completer
        before = datetime.now(ZoneInfo("Asia/Tokyo")).hour
        context = completer(Query(user_id=None)).context
        assert context["hour"] in {before, datetime.now(ZoneInfo("Asia/Tokyo")).hour} and context["weekday"] is None
        assert completer(Query(user_id=None, context={"hour": 3, "weekday": 1})).context == {"hour": 3, "weekday": 1}
    finally:
        recommender.close()
    with pytest.raises(ValueError, match="time_zone 'Mars/Olympus' is not an IANA time zone"):
        PipelineConfig.model_validate(config.model_dump() | {"time_zone": "Mars/Olympus"})


def test_with_redis_down_requests_are_answered_degraded_and_redis_back_empty_gets_the_version_again(root, tmp_path,
                                                                                                    monkeypatch):
    opened, open_snapshot = [], EmbeddedStore.open

    def open_and_record(*args):  # a broken version's snapshot fails to open: it is not recorded
        store = open_snapshot(*args)
        opened.append(store.version)
        return store

    monkeypatch.setattr(EmbeddedStore, "open", open_and_record)
    executable = shutil.which("redis-server")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]

    def start_redis() -> subprocess.Popen:
        server = subprocess.Popen([executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
        wait_for(lambda: _answers(port))
        return server

    def load_versions() -> None:
        for store in sorted(root.glob("v*/store")):
            if (store / "users.parquet").is_file():
                load_snapshot_into_redis(store, "127.0.0.1", port, store.parent.name)

    server = start_redis()
    load_versions()
    config = pipeline_config().model_copy(update={"redis": f"127.0.0.1:{port}", "redis_timeout_s": 0.5})
    recommender = Recommender(root, config)
    try:
        with serve_in_thread(recommender) as base:
            status, reply = recommend(base, user_id=7)
            assert status == 200 and reply["degraded"] is False
            assert opened == []  # a healthy Redis-backed server never loads the snapshot
            server.kill()
            server.wait()
            down = [recommend(base, user_id=user) for user in range(1, 6)]
            assert [(status, reply["degraded"], len(reply["items"])) for status, reply in down] == [(200, True, 10)] * 5
            assert json.loads(call(base, "/healthz")[2])["degraded"] == "redis is unavailable"
            assert opened == [reply["version"]]  # loaded once, at the first failure
            server = start_redis()  # back, empty: the server loads the version it serves there again
            time.sleep(1.1)  # the retry interval
            status, reply = recommend(base, user_id=7)
            assert status == 200 and reply["degraded"] is True
            assert json.loads(call(base, "/healthz")[2])["degraded"] == ("redis does not hold the serving version; "
                                                                         "loading it there again")
            wait_for(lambda: recommend(base, user_id=7)[1]["degraded"] is False)
            samples = metrics(base)
            assert json.loads(call(base, "/healthz")[2])["degraded"] is None
        client = redis.Redis("127.0.0.1", port)
        assert client.exists(f"recstack:{reply['version']}:complete") == 1
        assert client.keys("recstack-restoring:*") == []  # the lock is released
        assert samples["recstack_degraded_requests_total", frozenset()] >= 6
        assert samples["recstack_store_degraded", frozenset()] == 0
    finally:
        recommender.close()
        server.kill()
        server.wait()


def test_two_workers_take_feedback_on_each_others_answers_sum_their_metrics_and_follow_a_publish(
        root, tmp_path, tiny_dataset, trained_runs):
    copy, log = tmp_path / "artifacts", tmp_path / "log"
    shutil.copytree(root / "v0001", copy / "v0001")
    (copy / "CURRENT").write_text("v0001\n")
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(example_config()))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    output = tmp_path / "server.log"
    with output.open("w") as written:
        server = subprocess.Popen([sys.executable, "-m", "recstack", "serve", "--artifacts", str(copy), "--config",
                                   str(config), "--port", str(port), "--workers", "2", "--poll-s", "0.2", "--log",
                                   str(log), "--queue-timeout-s", "5", "--request-timeout-s", "10"],
                                  cwd=EXAMPLE.parents[1], stdout=written, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def answer_and_click(user: int) -> tuple[int, str | None, int | None, bool]:
        status, reply = recommend(base, user_id=user, k=5)
        if status != 200:
            return status, None, None, False
        item = reply["items"][user % 5]
        clicked, _, text = call(base, "/feedback", {"request_id": reply["request_id"], "item_id": item["item_id"]})
        return status, reply["version"], clicked, json.loads(text)["source"] == item["source"]

    def workers() -> dict[str, str]:
        """pid: version, from /healthz (whichever worker answers lists both)."""
        return {pid: health["version"] for pid, health in json.loads(call(base, "/healthz")[2])["workers"].items()}

    try:
        wait_for(lambda: output.read_text().count("Application startup complete") == 2, timeout_s=600)
        wait_for(lambda: len(workers()) == 2)
        first = workers()
        assert set(first.values()) == {"v0001"} and os.getpid() not in map(int, first)
        with ThreadPoolExecutor(4) as clients:
            pairs = list(clients.map(answer_and_click, range(1, 201)))
        assert pairs == [(200, "v0001", 200, True)] * 200  # every feedback found its answer
        samples = metrics(base)  # one worker answers, for both
        assert samples["recstack_requests_total", frozenset({("version", "v0001"), ("variant", "control")})] == 200
        assert sum(n for (name, _), n in samples.items() if name == "recstack_source_rewards_total") == 200

        refresh(tiny_dataset, trained_runs["two_tower"].parent, copy, CONFIG, incremental=True)
        wait_for(lambda: workers() == dict.fromkeys(first, "v0002"), timeout_s=600)  # every worker, by /healthz
        assert {recommend(base, user_id=7)[1]["version"] for _ in range(20)} == {"v0002"}
        with ThreadPoolExecutor(4) as clients:
            assert set(clients.map(answer_and_click, range(1, 41))) == {(200, "v0002", 200, True)}
    finally:
        server.terminate()  # the workers close their logs
        server.wait(120)
    assert server.returncode == 0, output.read_text()[-2000:]
    answered = {record["request_id"]: (path.name.split("-")[1], record["version"])  # by the pid in the file name
                for path in (log / "impressions").glob("*.jsonl") for record in map(json.loads, path.open())}
    clicked = [(path.name.split("-")[1], record["request_id"])
               for path in (log / "feedback").glob("*.jsonl") for record in map(json.loads, path.open())]
    assert len(clicked) == 240 and sum(pid != answered[request][0] for pid, request in clicked) > 0
    assert len({pid for pid, version in answered.values() if version == "v0002"}) == 2  # both followed the publish


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_the_health_board_lists_fresh_workers_and_drops_stale_ones(tmp_path):
    live = SimpleNamespace(version="v0002", refused={"v0003": "no store"}, state=SimpleNamespace(degraded=None))
    board = HealthBoard(tmp_path / "health", SimpleNamespace(live=live)).start()
    other = WorkerHealth(version="v0001", refused={}, degraded="redis is unavailable")
    for pid, age_s in (("101", 0.0), ("102", 10 * HEALTH_WRITE_S)):  # a live worker's file, a killed one's
        path = tmp_path / "health" / f"{pid}.json"
        path.write_text(other.model_dump_json())
        os.utime(path, (time.time() - age_s,) * 2)
    (tmp_path / "health" / "103.json").write_text("{half a fi")  # caught mid-write: skipped, not fatal
    mine = WorkerHealth(version="v0002", refused={"v0003": "no store"}, degraded=None)
    assert board.read() == {"101": other, str(os.getpid()): mine}
    live.version = "v0003"  # this process's entry is read as it is now
    assert board.read()[str(os.getpid())].version == "v0003"
    board.close()
    assert not (tmp_path / "health" / f"{os.getpid()}.json").exists()
