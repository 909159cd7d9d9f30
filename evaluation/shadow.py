"""Shadow comparison: how a candidate (shadow) pipeline's answers differ from the live one's on the same requests.

For two ranked lists of unique item ids a and b (best first):

    overlap_at_k            |a[:k] & b[:k]| / k; a list shorter than k misses its empty slots
    rank_biased_overlap     RBO_ext of Webber, Moffat and Zobel, "A similarity measure for indefinite
                            rankings" (ACM TOIS 2010), eq. 32: the agreement |a[:d] & b[:d]| / d at each
                            depth d, weighted by p^(d-1) (the top d carry 1 - p^d of the weight),
                            extrapolated past the lists' ends. 1 for identical lists, 0 for disjoint ones
    kendall_tau             Kendall's tau between the two orders of the items both lists hold (ids are
                            unique, so there are no ties and tau-b is tau-a)
    mean_rank_displacement  mean |rank in a - rank in b| over the items both lists hold

`compare_responses` averages them over requests; `ShadowRunner` serves the live pipeline's answers
while it mirrors a sample of the requests to the shadow pipeline on a background thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

if TYPE_CHECKING:  # the executor imports torch; comparing answers does not need it
    from inference.pipeline.executor import Response
    from inference.pipeline.types import Query

log = logging.getLogger(__name__)

RBO_P = 0.9  # compare_responses' RBO persistence: the top 10 carry 65% of the weight
MAX_PENDING = 1000  # shadow calls queued at most; past this, sampled requests skip the shadow


@dataclass(frozen=True)
class ShadowComparison:
    """Means over ``requests`` paired answers, each cut to its top ``k`` items.

    ``kendall_tau`` averages the requests whose answers share at least 2 items and
    ``mean_rank_displacement`` those sharing at least 1 (NaN when none do). ``source_share_change``
    maps each source to its share of the shadow's top-k items minus its share of the live ones',
    over all requests together.
    """

    requests: int
    k: int
    overlap_at_k: float
    rank_biased_overlap: float
    kendall_tau: float
    mean_rank_displacement: float
    identical_top_k: float
    source_share_change: dict[str, float]


def overlap_at_k(a: ArrayLike, b: ArrayLike, k: int) -> float:
    """|a[:k] & b[:k]| / k for two ranked lists of unique ids."""
    _check_k(k)
    a, b = _check_ranking(a, "a"), _check_ranking(b, "b")
    return len(np.intersect1d(a[:k], b[:k], assume_unique=True)) / k


def rank_biased_overlap(a: ArrayLike, b: ArrayLike, p: float = 0.9) -> float:
    """RBO_ext (Webber et al. 2010, eq. 32) of two ranked lists of unique ids, of any lengths.

    With S the shorter list (length s), L the longer (length l) and X_d = |S[:d] & L[:d]|:

        RBO_ext = (1-p)/p (sum_{d=1..l} X_d / d p^d + sum_{d=s+1..l} X_s (d - s) / (s d) p^d)
                  + ((X_l - X_s) / l + X_s / s) p^l

    A list that is a prefix of the other scores 1. An empty list shares nothing: 0 against a
    non-empty one, 1 against another empty one.
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    short, long = sorted((_check_ranking(a, "a"), _check_ranking(b, "b")), key=len)
    s, l = len(short), len(long)  # noqa: E741 -- the paper's names
    if s == 0:
        return float(l == 0)
    _, in_short, in_long = np.intersect1d(short, long, assume_unique=True, return_indices=True)
    x = np.cumsum(np.bincount(np.maximum(in_short, in_long), minlength=l))  # (l,) X_d at d = 1..l
    d = np.arange(1, l + 1)
    weight = p ** d.astype(np.float64)
    x_s, x_l = x[s - 1], x[l - 1]
    extrapolated = np.sum((x_s * (d - s) / (s * d) * weight)[s:])
    return float((1 - p) / p * (np.sum(x / d * weight) + extrapolated) + ((x_l - x_s) / l + x_s / s) * p**l)


def kendall_tau(a: ArrayLike, b: ArrayLike) -> float:
    """Kendall's tau of the items both ranked lists hold: (concordant - discordant) pairs over all
    pairs, in [-1, 1]; NaN when they share fewer than 2 items."""
    _, rank_a, rank_b = _shared_ranks(a, b)
    n = len(rank_a)
    if n < 2:
        return np.nan
    agreement = np.sign(np.subtract.outer(rank_a, rank_a)) * np.sign(np.subtract.outer(rank_b, rank_b))  # (n, n)
    return float(agreement.sum() / (n * (n - 1)))  # each pair counted twice, above and below the diagonal


def mean_rank_displacement(a: ArrayLike, b: ArrayLike) -> float:
    """Mean |rank in a - rank in b| of the items both ranked lists hold; NaN when they share none."""
    _, rank_a, rank_b = _shared_ranks(a, b)
    return float(np.mean(np.abs(rank_a - rank_b))) if len(rank_a) else np.nan


def compare_responses(live: list[Response], shadow: list[Response], k: int) -> ShadowComparison:
    """Means of the list metrics over paired answers to the same requests (live[i] and shadow[i]),
    each answer cut to its top ``k`` items; RBO with p = ``RBO_P``."""
    _check_k(k)
    if len(live) != len(shadow):
        raise ValueError(f"live has {len(live)} responses but shadow has {len(shadow)}; expected one pair per request")
    if not live:
        raise ValueError("live and shadow hold no responses; expected at least one pair")
    tops = [(a.item_ids[:k], b.item_ids[:k]) for a, b in zip(live, shadow, strict=True)]
    live_shares = _source_shares([r.sources[:k] for r in live])
    shadow_shares = _source_shares([r.sources[:k] for r in shadow])
    return ShadowComparison(
        requests=len(live),
        k=k,
        overlap_at_k=_mean_over(tops, lambda a, b: overlap_at_k(a, b, k)),
        rank_biased_overlap=_mean_over(tops, lambda a, b: rank_biased_overlap(a, b, RBO_P)),
        kendall_tau=_mean_over(tops, kendall_tau),
        mean_rank_displacement=_mean_over(tops, mean_rank_displacement),
        identical_top_k=_mean_over(tops, np.array_equal),
        source_share_change={source: shadow_shares.get(source, 0.0) - live_shares.get(source, 0.0)
                             for source in sorted(live_shares.keys() | shadow_shares.keys())},
    )


class ShadowRunner:
    """Answers each query with ``live`` and mirrors a seeded random ``sample`` share of them to ``shadow``.

    Both are a `Pipeline` or any callable ``Query -> Response``. The shadow runs on one background
    thread after the live answer is computed, so it neither delays nor fails the live answer: its
    exceptions are logged and counted, and when ``MAX_PENDING`` shadow calls are queued a sampled
    request skips the shadow (also counted). `report` compares the last ``max_pairs`` recorded pairs;
    call `close` when done (it waits for queued shadow calls; the pipelines stay open).
    """

    def __init__(self, live: Callable[[Query], Response], shadow: Callable[[Query], Response],
                 sample: float = 1.0, seed: int = 0, max_pairs: int = 10_000) -> None:
        if not 0 < sample <= 1:
            raise ValueError(f"sample must be a share in (0, 1], got {sample!r}")
        if max_pairs < 1:
            raise ValueError(f"max_pairs = {max_pairs}; expected at least 1 recorded pair")
        self.live, self.shadow, self.sample = live, shadow, sample
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # guards the generator, the counts and the pairs
        self._counts = {"requests": 0, "shadowed": 0, "failed": 0, "skipped": 0, "pending": 0}
        self._pairs: deque[tuple[Response, Response]] = deque(maxlen=max_pairs)  # the latest, for a server
        self._closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shadow")

    def __call__(self, query: Query) -> Response:
        if self._closed:
            raise RuntimeError("this ShadowRunner is closed; expected calls before close()")
        answer = self.live(query)
        with self._lock:  # submitting under the lock: close() cannot shut the pool down in between
            self._counts["requests"] += 1
            if self._closed or self._rng.random() >= self.sample:
                return answer
            if self._counts["pending"] >= MAX_PENDING:
                self._counts["skipped"] += 1
                return answer
            self._counts["pending"] += 1
            self._pool.submit(self._run_shadow, query, answer)
        return answer

    @property
    def counts(self) -> dict[str, int]:
        """A copy: live ``requests``; shadow calls ``shadowed`` (completed), ``failed``, ``skipped``
        (queue full) and ``pending`` (queued or running)."""
        with self._lock:
            return dict(self._counts)

    def report(self, k: int) -> ShadowComparison:
        """`compare_responses` over the last ``max_pairs`` pairs recorded."""
        with self._lock:
            pairs = list(self._pairs)
        if not pairs:
            raise ValueError(f"no shadow call has completed yet (counts: {self.counts}); expected at least one pair")
        live, shadow = zip(*pairs, strict=True)
        return compare_responses(list(live), list(shadow), k)

    def close(self) -> None:
        """Waits for the queued shadow calls; further queries are refused."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)

    def _run_shadow(self, query: Query, answer: Response) -> None:
        try:
            mirrored = self.shadow(query)
        except Exception as error:  # noqa: BLE001 -- a failing shadow must not reach the live path
            log.warning("shadow pipeline failed on %r: %s: %s", query, type(error).__name__, error)
            with self._lock:
                self._counts["failed"] += 1
                self._counts["pending"] -= 1
            return
        with self._lock:
            self._counts["shadowed"] += 1
            self._counts["pending"] -= 1
            self._pairs.append((answer, mirrored))


def _mean_over(pairs: list[tuple[np.ndarray, np.ndarray]], metric: Callable[[np.ndarray, np.ndarray], float]) -> float:
    """The mean of ``metric`` over the pairs it is defined for (not NaN); NaN when it is defined for none."""
    values = np.array([metric(a, b) for a, b in pairs], dtype=np.float64)
    return float(np.nanmean(values)) if (~np.isnan(values)).any() else np.nan


def _source_shares(sources: list[np.ndarray]) -> dict[str, float]:
    """Each source's share of all the slots in ``sources`` (one array per request)."""
    names, counts = np.unique(np.concatenate([np.zeros(0, str), *sources]), return_counts=True)
    return {str(name): float(count / counts.sum()) for name, count in zip(names, counts, strict=True)}


def _shared_ranks(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ids both ranked lists hold and their 0-based ranks in a and in b."""
    return np.intersect1d(_check_ranking(a, "a"), _check_ranking(b, "b"), assume_unique=True, return_indices=True)


def _check_ranking(ids: ArrayLike, name: str) -> np.ndarray:
    """``ids`` as a (N,) array of unique ids, best first."""
    x = np.asarray(ids)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a ranked list of ids, shape (N,), got shape {x.shape}")
    values, counts = np.unique(x, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name} ranks ids {values[counts > 1][:5].tolist()} more than once; expected unique ids")
    return x


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
