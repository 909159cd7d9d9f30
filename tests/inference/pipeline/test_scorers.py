"""Scorers: in-process TorchScript equals the trained model run eagerly, scores keep the candidates'
order, and FallbackScorer falls through failing scorers and counts it."""

import threading

import numpy as np
import pytest
import torch

from data.dataset import read_dataset, read_part
from data.encoders import join_features
from inference.export import export_models, load_run
from inference.pipeline.scorers import FallbackScorer, TorchScriptScorer
from inference.pipeline.types import Candidates, Query

QUERY = Query(user_id=1)


@pytest.fixture(scope="module")
def models_dir(trained_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    export_models(trained_runs, out)
    return out


@pytest.fixture(scope="module")
def candidates(tiny_dataset) -> Candidates:
    ds = read_dataset(tiny_dataset, tables=("users", "items"))
    rows = join_features(read_part(tiny_dataset, "test").head(120), ds.users, ds.items).reset_index(drop=True)
    n = len(rows)
    return Candidates(rows["item_id"].to_numpy(), np.full(n, "test"), np.zeros(n, np.float32), rows)


@pytest.mark.parametrize("name", ["deepfm", "dlrm", "linear"])
def test_torchscript_scorer_equals_the_eager_model(name, models_dir, trained_runs, candidates):
    trained = load_run(trained_runs[name])
    with torch.no_grad():
        eager = trained.module(trained.encoder.encode(candidates.features, trained.features["features"])).numpy()
    scores = TorchScriptScorer(models_dir, name)(QUERY, candidates)
    assert scores.dtype == np.float32 and scores.shape == (len(candidates),)
    np.testing.assert_allclose(scores, eager, atol=1e-6, rtol=0)


def test_scores_follow_the_candidates_order(models_dir, candidates):
    scorer = TorchScriptScorer(models_dir, "deepfm")
    order = np.random.default_rng(0).permutation(len(candidates))
    np.testing.assert_allclose(scorer(QUERY, candidates.take(order)), scorer(QUERY, candidates)[order], atol=1e-6)
    assert scorer(QUERY, candidates.take(np.zeros(len(candidates), bool))).shape == (0,)


def test_torchscript_scorer_refuses_bad_inputs(models_dir, candidates):
    with pytest.raises(ValueError, match="expected an exported model named 'nope'"):
        TorchScriptScorer(models_dir, "nope")
    with pytest.raises(ValueError, match="'embedding'"):
        TorchScriptScorer(models_dir, "two_tower")
    bare = Candidates(candidates.item_ids, candidates.sources, candidates.scores)
    with pytest.raises(ValueError, match="features is None"):
        TorchScriptScorer(models_dir, "linear")(QUERY, bare)


class Fixed:
    """A fake scorer: returns ``value`` for every candidate, raises ``error``, or returns ``wrong_shape``."""

    def __init__(self, name, value=0.0, error=None, wrong_shape=False):
        self.name, self.value, self.error, self.wrong_shape = name, value, error, wrong_shape

    def __call__(self, query, candidates):
        if self.error is not None:
            raise self.error
        return np.full(len(candidates) + self.wrong_shape, self.value, np.float32)


def test_fallback_uses_the_first_scorer_that_answers(candidates):
    down = Fixed("down", error=ConnectionError("refused"))
    short = Fixed("short", wrong_shape=True)
    scorer = FallbackScorer([down, short, Fixed("ok", 0.5), Fixed("never", 0.9)])
    np.testing.assert_array_equal(scorer(QUERY, candidates), np.full(len(candidates), 0.5, np.float32))
    assert scorer.fallbacks == {"down": 1, "short": 1} and scorer.answered == {"ok": 1}
    assert FallbackScorer([Fixed("first", 0.1), down])(QUERY, candidates)[0] == np.float32(0.1)


def test_fallback_counts_exactly_under_concurrent_requests(candidates):
    scorer = FallbackScorer([Fixed("down", error=TimeoutError("slow")), Fixed("ok", 0.5)])
    threads = [threading.Thread(target=lambda: [scorer(QUERY, candidates) for _ in range(300)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert scorer.fallbacks == {"down": 1200} and scorer.answered == {"ok": 1200}


def test_fallback_raises_when_every_scorer_fails(candidates):
    scorer = FallbackScorer([Fixed("a", error=ConnectionError("refused")), Fixed("b", error=ValueError("bad"))])
    with pytest.raises(RuntimeError, match="every scorer.*a: ConnectionError: refused; b: ValueError: bad"):
        scorer(QUERY, candidates)
    with pytest.raises(ValueError, match="no scorers"):
        FallbackScorer([])
