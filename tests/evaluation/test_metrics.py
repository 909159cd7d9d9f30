import math

import numpy as np
import pytest
import torch

from evaluation.metrics import (
    auc,
    calibration,
    calibration_table,
    coverage,
    grouped_auc,
    intra_list_diversity,
    log_loss,
    novelty,
    per_user_retrieval_metrics,
    retrieval_metrics,
    topk_from_scores,
)

# Independent references: the definitions written out naively, one pair or one user at a time.


def _pairwise_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _per_user_grouped_auc(groups, labels, scores):
    total = weight = 0.0
    for g in np.unique(groups):
        y, s = labels[groups == g], scores[groups == g]
        if 0 < y.sum() < len(y):
            total += len(y) * _pairwise_auc(y, s)
            weight += len(y)
    return total / weight


def _naive_topk(scores, k, exclude):
    top = []
    for row, excluded in zip(scores, exclude, strict=True):
        ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))  # best first, ties to the lower index
        top.append([i for i in ranked if i not in set(excluded)][:k])
    return np.array(top)


def _naive_retrieval(topk, relevant, k):
    sums = dict.fromkeys(("recall", "precision", "hit", "mrr", "ndcg", "map"), 0.0)
    users = 0
    for ranked, rel in zip(topk, relevant, strict=True):
        rel = set(rel)
        if not rel:
            continue
        users += 1
        hit_ranks = [r for r, item in enumerate(ranked[:k], start=1) if item in rel]
        sums["recall"] += len(hit_ranks) / len(rel)
        sums["precision"] += len(hit_ranks) / k
        sums["hit"] += bool(hit_ranks)
        sums["mrr"] += 1 / hit_ranks[0] if hit_ranks else 0.0
        ideal = sum(1 / math.log2(r + 1) for r in range(1, min(len(rel), k) + 1))
        sums["ndcg"] += sum(1 / math.log2(r + 1) for r in hit_ranks) / ideal
        sums["map"] += sum((n + 1) / r for n, r in enumerate(hit_ranks)) / min(len(rel), k)
    return {f"{name}@{k}": value / users for name, value in sums.items()}


# Click-through metrics


def test_auc_hand_case_with_a_tie():
    # pairs (pos, neg): (0.9, 0.9) tie = 1/2, (0.9, 0.1) = 1, (0.5, 0.9) = 0, (0.5, 0.1) = 1 -> 2.5 / 4
    assert auc([1, 0, 1, 0], [0.9, 0.9, 0.5, 0.1]) == 0.625


def test_auc_matches_pairwise_count_and_takes_tensors():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 600)
    scores = rng.integers(0, 25, 600) / 25  # many ties
    expected = _pairwise_auc(labels, scores)
    assert auc(labels, scores) == pytest.approx(expected, abs=1e-9)
    assert auc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(expected, abs=1e-9)


def test_grouped_auc_hand_case():
    groups = ["a", "a", "b", "b", "b", "c", "c"]
    labels = [1, 0, 1, 0, 0, 1, 1]
    scores = [0.9, 0.1, 0.2, 0.5, 0.1, 0.3, 0.3]
    # a: AUC 1 over 2 rows; b: AUC 1/2 over 3 rows; c: one class, skipped
    assert grouped_auc(groups, labels, scores) == pytest.approx((2 * 1 + 3 * 0.5) / 5, abs=1e-12)


def test_grouped_auc_matches_per_user_loop():
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 40, 800)
    labels = rng.integers(0, 2, 800)
    scores = rng.integers(0, 10, 800).astype(float)
    expected = _per_user_grouped_auc(groups, labels, scores)
    assert grouped_auc(groups, labels, scores) == pytest.approx(expected, abs=1e-9)


def test_log_loss_hand_case_and_clipping():
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2, abs=1e-12)
    assert log_loss([0], [1.0], eps=1e-7) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_log_loss_matches_elementwise_loop():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 1000)
    probabilities = rng.random(1000)
    expected = -sum(math.log(p) if y else math.log(1 - p) for y, p in zip(labels, probabilities, strict=True)) / 1000
    assert log_loss(labels, probabilities) == pytest.approx(expected, abs=1e-9)


def test_calibration_hand_case():
    # mean predicted 0.375 over observed rate 0.25
    assert calibration([1, 0, 0, 0], [0.5, 0.5, 0.25, 0.25]) == 1.5


def test_calibration_table_hand_case():
    table = calibration_table([0, 1, 1, 1], [0.1, 0.2, 0.6, 1.0], bins=4)
    assert table["count"].tolist() == [2, 0, 1, 1]  # 1.0 belongs to the last bin
    assert table["low"].tolist() == [0.0, 0.25, 0.5, 0.75]
    np.testing.assert_allclose(table["mean_predicted"], [0.15, np.nan, 0.6, 1.0])
    np.testing.assert_allclose(table["observed_rate"], [0.5, np.nan, 1.0, 1.0])


def test_calibration_table_matches_per_bin_loop():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    probabilities = rng.random(500)
    table = calibration_table(labels, probabilities, bins=5)
    for i, row in table.iterrows():
        inside = (probabilities >= i / 5) & (probabilities < (i + 1) / 5)
        assert row["count"] == inside.sum()
        assert row["mean_predicted"] == pytest.approx(probabilities[inside].mean(), abs=1e-9)
        assert row["observed_rate"] == pytest.approx(labels[inside].mean(), abs=1e-9)


# Retrieval metrics


def test_topk_from_scores_excludes_best_items_and_breaks_ties_by_index():
    scores = np.array([[0.1, 0.9, 0.5, 0.5, 0.95], [0.3, 0.3, 0.3, 0.3, 0.3]])
    top = topk_from_scores(scores, 3, exclude=[[4, 1], []])
    assert top.tolist() == [[2, 3, 0], [0, 1, 2]]
    assert top.dtype == np.int64


def test_topk_from_scores_pads_rows_with_too_few_items():
    top = topk_from_scores(torch.tensor([[0.2, 0.1, 0.7]]), 2, exclude=[np.array([0, 2])])
    assert top.tolist() == [[1, -1]]


def test_topk_from_scores_matches_sorted_loop():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 8, (50, 40)).astype(np.float32)  # many ties
    exclude = [rng.choice(40, rng.integers(0, 20), replace=False) for _ in range(50)]
    top = topk_from_scores(scores, 10, exclude)
    np.testing.assert_array_equal(top, _naive_topk(scores, 10, exclude))
    assert not any(set(row) & set(excluded) for row, excluded in zip(top, exclude, strict=True))


TOPK = np.array([[5, 2, 7], [1, 2, 3], [0, 1, 2], [4, 5, 6]])
RELEVANT = [[5, 7], [3, 9, 8, 6], [4], []]  # the last user has none and is skipped


def test_per_user_retrieval_metrics_hand_case():
    m = per_user_retrieval_metrics(TOPK, RELEVANT, k=3)
    ideal_2, ideal_3 = 1 + 1 / math.log2(3), 1 + 1 / math.log2(3) + 1 / 2
    # user 0: hits at ranks 1 and 3 of 2 relevant; user 1: a hit at rank 3 of 4 relevant; user 2: no hit
    np.testing.assert_allclose(m["recall@3"], [1, 1 / 4, 0, np.nan])
    np.testing.assert_allclose(m["precision@3"], [2 / 3, 1 / 3, 0, np.nan])
    np.testing.assert_allclose(m["hit@3"], [1, 1, 0, np.nan])
    np.testing.assert_allclose(m["mrr@3"], [1, 1 / 3, 0, np.nan])
    np.testing.assert_allclose(m["ndcg@3"], [(1 + 1 / 2) / ideal_2, (1 / 2) / ideal_3, 0, np.nan])
    # average precision: user 0 precision 1/1 and 2/3 at its hits over 2; user 1 1/3 over min(4, 3)
    np.testing.assert_allclose(m["map@3"], [(1 + 2 / 3) / 2, (1 / 3) / 3, 0, np.nan])


def test_retrieval_metrics_average_over_users_with_relevant_items():
    m = retrieval_metrics(TOPK, RELEVANT, k=3)
    assert m["recall@3"] == pytest.approx((1 + 1 / 4 + 0) / 3, abs=1e-12)
    assert m["mrr@3"] == pytest.approx((1 + 1 / 3 + 0) / 3, abs=1e-12)
    assert retrieval_metrics(TOPK, RELEVANT, k=1) == pytest.approx(
        {"recall@1": 1 / 6, "precision@1": 1 / 3, "hit@1": 1 / 3, "mrr@1": 1 / 3, "ndcg@1": 1 / 3, "map@1": 1 / 3},
        abs=1e-12
    )


def test_retrieval_metrics_match_per_user_loop():
    rng = np.random.default_rng(5)
    scores = rng.random((60, 30))
    exclude = [rng.choice(30, rng.integers(0, 15), replace=False) for _ in range(60)]
    relevant = [rng.choice(30, rng.integers(0, 6), replace=False) for _ in range(60)]
    top = topk_from_scores(scores, 10, exclude)
    for k in (1, 5, 10):
        expected = _naive_retrieval(top, relevant, k)
        assert retrieval_metrics(top, relevant, k) == pytest.approx(expected, abs=1e-9)


def test_padding_never_counts_as_a_hit():
    # -1 must not match item width - 1 of the previous user
    assert retrieval_metrics(np.array([[0, 2], [1, -1]]), [[2], [0]], k=2)["hit@2"] == 0.5


# Beyond accuracy: LISTS ranks items 0..5; GENRES gives each its label set (item 5 has none)

LISTS = np.array([[0, 1, 2], [0, 3, -1], [4, -1, -1]])
GENRES = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=bool)


def _naive_diversity(topk, labels):
    per_list = []
    for row in topk:
        items = [i for i in row if i >= 0]
        sets = [set(np.flatnonzero(labels[i])) for i in items]
        pairs = [(a, b) for n, a in enumerate(sets) for b in sets[n + 1:]]
        if pairs:
            per_list.append(np.mean([1 - len(a & b) / len(a | b) if a | b else 0.0 for a, b in pairs]))
    return float(np.mean(per_list))


def test_beyond_accuracy_hand_case():
    assert coverage(LISTS, n_items=6) == pytest.approx(5 / 6)  # items 0..4 of 6
    # list 0: pairs (0,1) 1 - 1/2, (0,2) 1, (1,2) 1 - 1/2 -> 2/3; list 1: (0,3) alike -> 0; list 2 has no pair
    assert intra_list_diversity(LISTS, GENRES) == pytest.approx((2 / 3 + 0) / 2)
    share = np.array([1.0, 0.5, 0.25, 0.5, 0.125, 1.0])
    # listed items 0, 1, 2, 0, 3, 4: self-information 0, 1, 2, 0, 1, 3
    assert novelty(LISTS, share) == pytest.approx(7 / 6)


def test_beyond_accuracy_match_naive_references():
    rng = np.random.default_rng(6)
    labels = rng.random((40, 5)) < 0.3  # some items without labels
    top = topk_from_scores(rng.random((30, 40)), 8, [rng.choice(40, 35, replace=False) for _ in range(30)])
    assert intra_list_diversity(top, labels) == pytest.approx(_naive_diversity(top, labels), abs=1e-9)
    assert coverage(top, 40) == pytest.approx(len({i for row in top for i in row if i >= 0}) / 40)
    share = rng.uniform(0.01, 1, 40)
    listed = [i for row in top for i in row if i >= 0]
    assert novelty(top, share) == pytest.approx(sum(-math.log2(share[i]) for i in listed) / len(listed))


# Bad values


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: auc([1, 1, 1], [0.1, 0.2, 0.3]), "all 3 labels are positives"),
        (lambda: auc([0, 0], [0.1, 0.2]), "all 2 labels are negatives"),
        (lambda: auc([1, 0], [0.1, 0.2, 0.3]), "labels has 2 values but scores has 3"),
        (lambda: auc([1, 2], [0.1, 0.2]), r"labels must be 0 or 1, got \[2\]"),
        (lambda: auc([1, 0], [0.1, float("nan")]), "scores holds 1 NaN"),
        (lambda: auc([], []), "labels is empty"),
        (lambda: grouped_auc([0, 1], [1, 0], [0.1, 0.2]), "none of 2 groups"),
        (lambda: grouped_auc([0], [1, 0], [0.1, 0.2]), "groups has 1 values but labels has 2"),
        (lambda: log_loss([1, 0], [0.5, 1.5]), r"probabilities must be in \[0, 1\], got \[1.5\]"),
        (lambda: log_loss([1], [0.5], eps=0), "eps must be in"),
        (lambda: calibration([0, 0], [0.1, 0.2]), "observed rate of 2 labels is 0"),
        (lambda: calibration_table([1], [0.5], bins=0), "bins must be a positive integer, got 0"),
        (lambda: topk_from_scores(np.zeros((2, 3)), 0), "k must be a positive integer, got 0"),
        (lambda: topk_from_scores(np.zeros((2, 3)), 4), "k=4 exceeds the 3 items in scores"),
        (lambda: topk_from_scores(np.zeros(3), 1), r"got shape \(3,\)"),
        (lambda: topk_from_scores(np.zeros((2, 3)), 1, [[0]]), "exclude has 1 rows but there are 2 users"),
        (lambda: topk_from_scores(np.zeros((1, 3)), 1, [[3]]), "exclude holds item index 3"),
        (lambda: topk_from_scores(np.zeros((1, 3)), 1, [[0.5]]), r"integer item indices, got \[0.5\]"),
        (lambda: retrieval_metrics(TOPK, RELEVANT, k=4), "k=4 exceeds the 3 columns of topk"),
        (lambda: retrieval_metrics(TOPK, RELEVANT[:2], k=3), "relevant has 2 rows but there are 4 users"),
        (lambda: retrieval_metrics(TOPK, [[], [], [], []], k=3), "none of the 4 users"),
        (lambda: retrieval_metrics(np.array([[1, 1]]), [[1]], k=2), "topk row 0 ranks item 1 more than once"),
        (lambda: retrieval_metrics(np.array([[0, -2]]), [[1]], k=2), "topk holds item index -2"),
        (lambda: retrieval_metrics(TOPK, [[-1], [], [], []], k=3), "relevant holds item index -1"),
        (lambda: coverage(LISTS, n_items=4), "topk holds item index 4, but the catalogue has 4 items"),
        (lambda: coverage(LISTS, n_items=0), "n_items must be a positive integer, got 0"),
        (lambda: intra_list_diversity(LISTS, GENRES.astype(int)), "labels must be an .* bool matrix"),
        (lambda: intra_list_diversity(LISTS, GENRES[:4]), "topk holds item index 4, but labels has 4 items"),
        (lambda: intra_list_diversity(LISTS[2:], GENRES), "none of the 1 lists holds two items"),
        (lambda: novelty(LISTS, np.zeros(6)), r"item_share must be \(items,\) shares in \(0, 1\]"),
        (lambda: novelty(np.full((2, 2), -1), np.ones(6)), "topk lists no item in its 2 rows"),
        (lambda: novelty(np.array([[0, -3]]), np.ones(6)), "topk holds item index -3"),
    ],
)
def test_bad_values_raise_naming_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()
