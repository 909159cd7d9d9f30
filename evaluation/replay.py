"""Replay: how a candidate ranking would have done on the traffic an exploring pipeline logged.

Each logged request (`inference.impressions.logged_slots`) served M slots; slot j showed item
a_j with propensity p_j, the probability of a_j given the slots above it (`ExploreOrderer`), and
earned reward r_j. A deterministic candidate ranking answers the same `Query` with items t_0, t_1,
... Under the cascade assumption (a slot's reward depends on its item and the items above it,
not on those below), the prefix weight

    w_j = [t_0..t_j equal a_0..a_j] / (p_0 p_1 ... p_j)

makes the mean over requests of sum_{j<d} w_j r_j an unbiased estimate of the candidate's
expected reward in its top d: the reward-interaction IPS of McInerney et al., "Counterfactual
Evaluation of Slate Recommendations with Sequential Reward Interactions" (KDD 2020), for a
deterministic target. It needs support: a candidate whose lists the logging pipeline could not
have drawn (items it never retrieved) is estimated low, which a low `matched` share shows. It
needs propensities too: slots a deterministic policy chose (a `bandit` orderer on UCB1 or greedy,
logged with a null propensity) are refused, since weighting them by 1 would be wrong.
Start with `replay`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from evaluation.ope import Estimate, effective_sample_size, mean_estimate
from inference.pipeline.types import Query

SLOT_COLUMNS = ("request_id", "position", "item_id", "propensity", "reward", "user_id", "context", "recent_items", "k")


@dataclass(frozen=True)
class DepthEstimate:
    """Reward per request in the top ``depth`` slots: what the logging pipeline earned, what the
    candidate would have earned, the share of requests whose logged top ``depth`` was the
    candidate's, and the effective sample size of the candidate's weights."""

    depth: int
    logged: Estimate
    candidate: Estimate
    matched: float
    effective_sample_size: float


def logged_queries(slots: pd.DataFrame) -> dict[str, Query]:
    """The `Query` of each logged request, by request id, in log order."""
    first = slots.drop_duplicates("request_id")
    return {row.request_id: Query(None if pd.isna(row.user_id) else int(row.user_id), dict(row.context),
                                  tuple(row.recent_items), int(row.k))
            for row in first.itertuples(index=False)}


def replay(slots: pd.DataFrame, rank: Callable[[Query], np.ndarray], depths: Sequence[int]) -> list[DepthEstimate]:
    """Estimates for each depth in ``depths`` of the deterministic ranking ``rank`` (a `Query` ->
    its item ids, best first) from ``slots``, one row per logged slot (`logged_slots`)."""
    missing = sorted(set(SLOT_COLUMNS) - set(slots.columns))
    if missing:
        raise ValueError(f"logged slots lack columns {missing}; expected the columns of logged_slots")
    if len(slots) == 0:
        raise ValueError("the log holds no served slots; expected logged requests to replay")
    bad = [d for d in depths if not 1 <= d <= slots["position"].max() + 1]
    if bad or not depths:
        raise ValueError(f"depths {list(depths)}; expected some in [1, {slots['position'].max() + 1}], "
                         "the most slots a logged request served")
    queries = logged_queries(slots)
    width = max(depths)
    shown = slots[slots["position"] < width]
    degenerate = shown["propensity"].isna()
    if degenerate.any():
        examples = shown.loc[degenerate, "request_id"].unique()[:3].tolist()
        raise ValueError(f"{int(degenerate.sum())} logged slots within depth {width} have no propensity (a "
                         f"deterministic policy chose them, e.g. requests {examples}); expected an exploring "
                         "log (explore, or a bandit orderer on epsilon_greedy or thompson)")
    row = pd.Index(list(queries)).get_indexer(shown["request_id"])
    logged = np.full((len(queries), width), -1, np.int64)  # (N, D) logged items; -1: no slot
    propensity, reward = np.ones((len(queries), width)), np.zeros((len(queries), width))
    for grid, column in ((logged, "item_id"), (propensity, "propensity"), (reward, "reward")):
        grid[row, shown["position"].to_numpy()] = shown[column].to_numpy()
    target = np.full((len(queries), width), -2, np.int64)  # (N, D) the candidate's items; -2 matches nothing
    for n, query in enumerate(queries.values()):
        items = np.asarray(rank(query), np.int64)[:width]
        target[n, :len(items)] = items
    prefix_matches = np.cumprod(target == logged, axis=1).astype(bool)  # (N, D)
    weights = prefix_matches / np.cumprod(propensity, axis=1)  # (N, D) w_j
    estimates = []
    for depth in sorted(depths):
        w = weights[:, depth - 1]
        estimates.append(DepthEstimate(
            depth,
            logged=mean_estimate(reward[:, :depth].sum(axis=1)),
            candidate=mean_estimate((weights[:, :depth] * reward[:, :depth]).sum(axis=1)),
            matched=float(prefix_matches[:, depth - 1].mean()),
            effective_sample_size=effective_sample_size(w) if w.any() else 0.0,
        ))
    return estimates
