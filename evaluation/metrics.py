"""Offline metrics: click-through ranking (AUC, log loss, calibration) and top-k retrieval.

Inputs may be numpy arrays, lists or torch tensors (detached and moved to the CPU); every
metric is computed with numpy in float64. Retrieval metrics follow RecBole's definitions:

    recall@k     hits / |relevant|
    precision@k  hits / k
    hit@k        1 if any hit
    mrr@k        1 / rank of the first hit, 0 without one
    ndcg@k       sum over hits of 1 / log2(rank + 1), over the same sum for the first
                 min(|relevant|, k) ranks (binary relevance)
    map@k        sum over hits of precision@(its rank), over min(|relevant|, k)

Beyond accuracy, over the lists of all users (item indices, -1 for an empty slot):

    coverage               distinct listed items / catalogue size
    intra_list_diversity   mean over lists of the mean over item pairs of 1 - Jaccard(label sets)
    novelty                mean over listed items of -log2(share of users who know the item)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd


def auc(labels: Any, scores: Any) -> float:
    """ROC AUC: the share of (positive, negative) pairs whose positive scores higher, a tie counting 1/2.

    This is Mann-Whitney U / (positives * negatives), equal to the rank-sum formula with tied
    ranks averaged. Raises ValueError when the labels hold only one class.
    """
    y, s = _labels_and_values(labels, scores, "scores")
    twice_u, pos, neg = _mann_whitney(np.zeros(len(y), dtype=np.int8), y, s)
    if pos[0] == 0 or neg[0] == 0:
        present = "positives (1)" if neg[0] == 0 else "negatives (0)"
        raise ValueError(f"auc needs both classes, but all {len(y)} labels are {present}")
    return float(twice_u[0] / (2 * pos[0] * neg[0]))


def grouped_auc(groups: Any, labels: Any, scores: Any) -> float:
    """AUC per group (e.g. user), averaged with each group weighted by its number of rows (impressions).

    Groups with only one class have no AUC and are skipped; ValueError when every group is.
    """
    y, s = _labels_and_values(labels, scores, "scores")
    g = _as_array(groups).ravel()
    if len(g) != len(y):
        raise ValueError(f"groups has {len(g)} values but labels has {len(y)}")
    twice_u, pos, neg = _mann_whitney(g, y, s)
    both = (pos > 0) & (neg > 0)
    if not both.any():
        raise ValueError(f"grouped_auc needs a group with both classes; none of {len(pos)} groups has one")
    per_group = twice_u[both] / (2 * pos[both] * neg[both])
    return float(np.average(per_group, weights=(pos + neg)[both]))


def log_loss(labels: Any, probabilities: Any, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, with probabilities clipped to [eps, 1 - eps]."""
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    y, p = _labels_and_probabilities(labels, probabilities)
    p = np.clip(p, eps, 1 - eps)
    return float(-np.mean(np.where(y == 1, np.log(p), np.log1p(-p))))


def calibration(labels: Any, probabilities: Any) -> float:
    """Mean predicted probability over the observed positive rate: 1 is calibrated, above 1 over-predicts."""
    y, p = _labels_and_probabilities(labels, probabilities)
    if not y.any():
        raise ValueError(f"calibration needs an observed positive: the observed rate of {len(y)} labels is 0")
    return float(p.mean() / y.mean())


def calibration_table(labels: Any, probabilities: Any, bins: int = 10) -> pd.DataFrame:
    """Reliability table over ``bins`` equal-width probability bins, one row per bin.

    Columns: low, high (bin i holds low <= p < high; the last bin also holds 1), count,
    mean_predicted and observed_rate (both NaN for an empty bin).
    """
    _check_positive(bins, "bins")
    y, p = _labels_and_probabilities(labels, probabilities)
    edges = np.linspace(0.0, 1.0, bins + 1)
    bin_of = np.minimum(np.searchsorted(edges, p, side="right") - 1, bins - 1)
    count = np.bincount(bin_of, minlength=bins)
    with np.errstate(invalid="ignore"):  # 0 / 0 is NaN for empty bins
        mean_predicted = np.bincount(bin_of, weights=p, minlength=bins) / count
        observed_rate = np.bincount(bin_of, weights=y, minlength=bins) / count
    return pd.DataFrame({"low": edges[:-1], "high": edges[1:], "count": count,
                         "mean_predicted": mean_predicted, "observed_rate": observed_rate})


def topk_from_scores(scores: Any, k: int, exclude: Sequence[Any] | None = None) -> np.ndarray:
    """The k best item indices per row of a (U, I) score matrix, best first: (U, k) int64.

    ``exclude`` holds one array of item indices per row (e.g. the user's train items); those
    items are never returned. Ties go to the lower item index. Items scored -inf (excluded
    ones included) are not returned either: a row with fewer than k other items is padded
    with -1. ValueError when k exceeds the number of items. For large catalogues, call this
    on batches of users.
    """
    s = _as_array(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be a (users, items) matrix, got shape {s.shape}")
    n_users, n_items = s.shape
    _check_positive(k, "k", limit=(n_items, "items in scores"))
    s = s.astype(np.result_type(s.dtype, np.float32))  # a float copy: exclusions are written into it
    if np.isnan(s).any():
        raise ValueError(f"scores holds {int(np.isnan(s).sum())} NaN values")
    if exclude is not None:
        rows, items = _flatten_per_row(exclude, n_users, "exclude")
        if items.size and items.max() >= n_items:
            raise ValueError(f"exclude holds item index {items.max()}, but scores has {n_items} items")
        s[rows, items] = -np.inf
    kth = np.partition(s, n_items - k, axis=1)[:, n_items - k]  # (U,) the k-th best score of each row
    rows, items = np.nonzero(s >= kth[:, None])  # candidates: k per row plus any ties at the k-th score
    order = np.lexsort((items, -s[rows, items], rows))  # by row, then best score, then lower index
    rows, items = rows[order], items[order]
    rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # 0-based position within the row
    top = items[rank < k].reshape(n_users, k)
    top[np.take_along_axis(s, top, axis=1) == -np.inf] = -1
    return top


def retrieval_metrics(topk: Any, relevant: Sequence[Any], k: int) -> dict[str, float]:
    """recall, precision, hit, mrr, ndcg and map at k, averaged over users with at least one relevant item.

    ``topk`` is a (U, K) matrix of ranked item indices (K >= k; -1 marks no item) and
    ``relevant`` one array of relevant item indices per user. Keys read ``"recall@10"``.
    Users without relevant items are skipped; ValueError when no user has one.
    """
    per_user = per_user_retrieval_metrics(topk, relevant, k)
    evaluated = ~np.isnan(per_user[f"recall@{k}"])
    if not evaluated.any():
        raise ValueError(f"none of the {len(evaluated)} users has a relevant item")
    return {name: float(values[evaluated].mean()) for name, values in per_user.items()}


def per_user_retrieval_metrics(topk: Any, relevant: Sequence[Any], k: int) -> dict[str, np.ndarray]:
    """The metrics of `retrieval_metrics` per user, as (U,) arrays; NaN for users without relevant items."""
    hits, n_relevant = hit_matrix(topk, relevant, k)
    n_hits = hits.sum(axis=1)
    discount = 1.0 / np.log2(np.arange(2, k + 2))  # (k,) 1 / log2(rank + 1) for ranks 1..k
    ideal_dcg = np.r_[np.nan, np.cumsum(discount)][np.minimum(n_relevant, k)]  # NaN without relevant items
    first_hit = hits.argmax(axis=1)  # 0 when there is no hit; masked by n_hits below
    skipped = np.where(n_relevant > 0, 1.0, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        metrics = {
            "recall": n_hits / n_relevant,
            "precision": n_hits / k * skipped,
            "hit": (n_hits > 0) * skipped,
            "mrr": np.where(n_hits > 0, 1.0 / (first_hit + 1), 0.0) * skipped,
            "ndcg": hits @ discount / ideal_dcg,
            "map": (hits * np.cumsum(hits, axis=1) / np.arange(1, k + 1)).sum(axis=1) / np.minimum(n_relevant, k),
        }
    return {f"{name}@{k}": values for name, values in metrics.items()}


def hit_matrix(topk: Any, relevant: Sequence[Any], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Whether each of the first k ranked items is relevant, (U, k) bool, and |relevant| per user, (U,)."""
    top = _listed_items(topk)
    _check_positive(k, "k", limit=(top.shape[1], "columns of topk"))
    top = top[:, :k]
    _check_unique_per_row(top)
    n_users = len(top)
    rows, items = _flatten_per_row(relevant, n_users, "relevant")
    width = max(int(top.max(initial=0)), int(items.max(initial=0))) + 1
    relevant_keys = np.unique(rows * width + items)  # one key per distinct (user, item) pair
    n_relevant = np.bincount(relevant_keys // width, minlength=n_users)
    keys = np.arange(n_users)[:, None] * width + top  # (U, k)
    hits = np.isin(keys, relevant_keys) & (top >= 0)  # -1 would alias the previous user's last item
    return hits, n_relevant


def coverage(topk: Any, n_items: int) -> float:
    """The share of the ``n_items`` catalogue that appears in any row of ``topk`` (U, k); -1 is no item."""
    _check_positive(n_items, "n_items")
    top = _listed_items(topk)
    listed = np.unique(top[top >= 0])
    if listed.size and listed[-1] >= n_items:
        raise ValueError(f"topk holds item index {listed[-1]}, but the catalogue has {n_items} items")
    return len(listed) / n_items


def intra_list_diversity(topk: Any, labels: Any) -> float:
    """Mean over lists with two or more items of the mean over their item pairs of 1 - |A & B| / |A | B|,
    A and B the two items' label sets (e.g. genres): 1 - [a == b] for one label per item; two
    items without labels count as alike.

    ``topk`` (U, k) item indices, -1 for no item; ``labels`` (I, C) bool, the labels of each item.
    ValueError when no list holds two items.
    """
    top = _listed_items(topk)
    sets = _as_array(labels)
    if sets.ndim != 2 or sets.dtype != bool:
        raise ValueError(f"labels must be an (items, labels) bool matrix, got shape {sets.shape} of {sets.dtype}")
    if top.size and top.max() >= len(sets):
        raise ValueError(f"topk holds item index {top.max()}, but labels has {len(sets)} items")
    listed = top >= 0  # (U, k)
    per_list = []
    for lo in range(0, len(top), 1024):  # (U, k, k) pair matrices, in blocks of lists
        block, present = top[lo:lo + 1024], listed[lo:lo + 1024]
        onehot = (sets[np.maximum(block, 0)] & present[..., None]).astype(np.float64)  # (B, k, C)
        common = onehot @ onehot.transpose(0, 2, 1)  # (B, k, k) |A & B|
        size = onehot.sum(axis=2)  # (B, k)
        union = size[:, :, None] + size[:, None, :] - common
        distance = 1 - np.divide(common, union, out=np.ones_like(common), where=union > 0)
        pairs = present[:, :, None] & present[:, None, :] & ~np.eye(block.shape[1], dtype=bool)
        n_pairs = pairs.sum(axis=(1, 2))
        with np.errstate(invalid="ignore"):
            per_list.append(np.where(pairs, distance, 0).sum(axis=(1, 2)) / n_pairs)
    values = np.concatenate([np.zeros(0), *per_list])
    if np.isnan(values).all():
        raise ValueError(f"none of the {len(top)} lists holds two items; diversity needs pairs")
    return float(np.nanmean(values))


def novelty(topk: Any, item_share: Any) -> float:
    """Mean self-information, -log2 p_i, over every listed item i of ``topk`` (U, k; -1 is no item),
    p_i = ``item_share`` (I,) the share of users who know item i, each in (0, 1]."""
    top = _listed_items(topk)
    share = _as_array(item_share).astype(np.float64)
    if share.ndim != 1 or not ((share > 0) & (share <= 1)).all():
        raise ValueError(f"item_share must be (items,) shares in (0, 1], got shape {share.shape}, "
                         f"range [{share.min(initial=np.inf)}, {share.max(initial=-np.inf)}]")
    listed = top[top >= 0]
    if listed.size == 0:
        raise ValueError(f"topk lists no item in its {len(top)} rows")
    if listed.max() >= len(share):
        raise ValueError(f"topk holds item index {listed.max()}, but item_share has {len(share)} items")
    return float(-np.log2(share[listed]).mean())


def _listed_items(topk: Any) -> np.ndarray:
    """``topk`` as a (U, k) int64 matrix of item indices, -1 for an empty slot."""
    top = _as_array(topk)
    if top.ndim != 2:
        raise ValueError(f"topk must be a (users, K) matrix, got shape {top.shape}")
    top = _integers(top, "topk")
    if top.size and top.min() < -1:
        raise ValueError(f"topk holds item index {top.min()}; only -1 may mark a missing item")
    return top


def _mann_whitney(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per group in sorted order: 2U (exact integers), positives and negatives.

    U counts (positive, negative) pairs within the group where the positive scores higher,
    a tie counting 1/2.
    """
    order = np.lexsort((scores, groups))  # by group, then ascending score
    g, s, y = groups[order], scores[order], labels[order]
    block = np.flatnonzero(np.r_[True, (g[1:] != g[:-1]) | (s[1:] != s[:-1])])  # starts of tied runs
    pos = np.add.reduceat(y, block)
    neg = np.diff(np.r_[block, len(y)]) - pos
    group = np.flatnonzero(np.r_[True, g[block[1:]] != g[block[:-1]]])  # first block of each group
    neg_before = np.cumsum(neg) - neg  # negatives in all earlier blocks, across groups
    neg_below = neg_before - np.repeat(neg_before[group], np.diff(np.r_[group, len(block)]))  # same group only
    twice_u = np.add.reduceat(pos * (2 * neg_below + neg), group)
    return twice_u, np.add.reduceat(pos, group), np.add.reduceat(neg, group)


def _labels_and_values(labels: Any, values: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels as int64 and the matching float64 values, both flattened; checks lengths and NaN."""
    y = _as_array(labels).ravel()
    v = _as_array(values).ravel().astype(np.float64)
    if len(y) != len(v):
        raise ValueError(f"labels has {len(y)} values but {name} has {len(v)}")
    if len(y) == 0:
        raise ValueError("labels is empty")
    not_binary = (y != 0) & (y != 1)
    if not_binary.any():
        raise ValueError(f"labels must be 0 or 1, got {np.unique(y[not_binary])[:5].tolist()}")
    if np.isnan(v).any():
        raise ValueError(f"{name} holds {int(np.isnan(v).sum())} NaN values")
    return y.astype(np.int64), v


def _labels_and_probabilities(labels: Any, probabilities: Any) -> tuple[np.ndarray, np.ndarray]:
    y, p = _labels_and_values(labels, probabilities, "probabilities")
    outside = (p < 0) | (p > 1)
    if outside.any():
        raise ValueError(f"probabilities must be in [0, 1], got {np.unique(p[outside])[:5].tolist()}")
    return y, p


def _flatten_per_row(per_row: Sequence[Any], n_rows: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs, int64, from one array of non-negative item indices per row."""
    if len(per_row) != n_rows:
        raise ValueError(f"{name} has {len(per_row)} rows but there are {n_rows} users")
    arrays = [_as_array(a).ravel() for a in per_row]
    items = _integers(np.concatenate(arrays) if arrays else np.zeros(0), name)
    if items.size and items.min() < 0:
        raise ValueError(f"{name} holds item index {items.min()}; item indices are >= 0")
    rows = np.repeat(np.arange(n_rows), [len(a) for a in arrays])
    return rows, items


def _integers(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as int64; ValueError for fractional values (an empty row can make an array float)."""
    ints = values.astype(np.int64)
    if (ints != values).any():
        raise ValueError(f"{name} must hold integer item indices, got {values[ints != values][:5].tolist()}")
    return ints


def _check_unique_per_row(top: np.ndarray) -> None:
    ordered = np.sort(top, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        row, col = np.argwhere(repeated)[0]
        raise ValueError(f"topk row {row} ranks item {ordered[row, col]} more than once")


def _check_positive(value: int, name: str, limit: tuple[int, str] | None = None) -> None:
    """ValueError unless ``value`` is an integer >= 1 and at most ``limit`` (a count and what it counts)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit[0]:
        raise ValueError(f"{name}={value} exceeds the {limit[0]} {limit[1]}")


def _as_array(x: Any) -> np.ndarray:
    """A numpy array of an array, list or torch tensor (detached and copied to the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)
