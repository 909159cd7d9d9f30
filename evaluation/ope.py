"""Off-policy evaluation: a target policy's expected reward per impression from a logging policy's log.

Each of the N logged rows holds the reward r of the logged action a in context x, the logging
propensity p = pi_0(a|x) > 0 and the target policy's probability pi = pi(a|x) of that same action
(for a deterministic target, 1 where it picks the logged action and 0 elsewhere). Model-based
estimators also take a reward model's prediction for the logged action, q_logged = q(x, a), and
its expectation under the target policy, q_target = sum_b pi(b|x) q(x, b). With w = pi / p
(unbiased below assumes the logging policy gives p > 0 to every action the target can take):

    ips            mean(w r)                                 unbiased; variance grows with w
    snips          sum(w r) / sum(w)                         consistent, slightly biased; within the range of r
    direct_method  mean(q_target)                            low variance, as biased as the model
    doubly_robust  mean(q_target + w (r - q_logged))         unbiased with correct p, whatever the model

Every estimator is the mean of per-row terms, and its standard error is their sample standard
deviation over sqrt(N); the 95% interval is value +- 1.96 standard errors (normal approximation).
SNIPS uses the delta method: its terms are the linearised ratio V + w (r - V) / mean(w).
The direct method's interval covers only the sampling of contexts, not the reward model's error.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike

from evaluation.checks import check_rows, finite_values

Z95 = NormalDist().inv_cdf(0.975)  # 1.959...


@dataclass(frozen=True)
class Estimate:
    """A policy value with its standard error and 95% normal-approximation interval [low, high]."""

    value: float
    std_error: float
    low: float
    high: float


def ips(rewards: ArrayLike, propensities: ArrayLike, target_probabilities: ArrayLike,
        max_weight: float | None = None) -> Estimate:
    """Inverse propensity scoring: mean(w r) with w = pi / p, all (N,).

    ``max_weight`` clips w to at most that value: lower variance, but biased (low, for rewards >= 0).
    """
    r, p, pi = _check_log(rewards, propensities, target_probabilities)
    return mean_estimate(_importance_weights(p, pi, max_weight) * r)


def snips(rewards: ArrayLike, propensities: ArrayLike, target_probabilities: ArrayLike) -> Estimate:
    """Self-normalised IPS: sum(w r) / sum(w), all (N,); standard error by the delta method."""
    r, p, pi = _check_log(rewards, propensities, target_probabilities)
    w = pi / p
    if not w.any():
        raise ValueError(f"target_probabilities are 0 on all {len(w)} rows: SNIPS divides by sum(w) = 0")
    value = np.sum(w * r) / np.sum(w)
    return mean_estimate(value + w * (r - value) / w.mean())  # linearised terms; their mean is exactly value


def direct_method(q_target: ArrayLike) -> Estimate:
    """mean(q_target), where q_target (N,) is the reward model's expectation under the target policy.

    The interval reflects only which contexts were logged; a biased model shifts it without widening it.
    """
    return mean_estimate(finite_values(q_target, "q_target"))


def doubly_robust(rewards: ArrayLike, propensities: ArrayLike, target_probabilities: ArrayLike,
                  q_logged: ArrayLike, q_target: ArrayLike, max_weight: float | None = None) -> Estimate:
    """mean(q_target + w (r - q_logged)), all (N,): the direct method corrected by IPS on its residuals.

    ``max_weight`` clips w as in `ips`, biasing the correction.
    """
    r, p, pi = _check_log(rewards, propensities, target_probabilities)
    q_log = finite_values(q_logged, "q_logged", length=(len(r), "rewards"))
    q_tgt = finite_values(q_target, "q_target", length=(len(r), "rewards"))
    return mean_estimate(q_tgt + _importance_weights(p, pi, max_weight) * (r - q_log))


def effective_sample_size(weights: ArrayLike) -> float:
    """(sum w)^2 / sum(w^2) for importance weights w (N,): N when all are equal, 1 when one dominates."""
    w = finite_values(weights, "weights")
    check_rows(w < 0, w, "weights", "must be >= 0")
    if not w.any():
        raise ValueError(f"weights need a positive value; all {len(w)} are 0")
    return float(np.sum(w) ** 2 / np.sum(w**2))


def mean_estimate(terms: np.ndarray) -> Estimate:
    """The mean of per-row terms (N,), its standard error std(terms) / sqrt(N) and the 95% interval."""
    if len(terms) < 2:
        raise ValueError(f"a standard error needs at least 2 logged rows, got {len(terms)}")
    value = float(terms.mean())
    std_error = float(terms.std(ddof=1) / np.sqrt(len(terms)))
    return Estimate(value, std_error, value - Z95 * std_error, value + Z95 * std_error)


def _importance_weights(p: np.ndarray, pi: np.ndarray, max_weight: float | None) -> np.ndarray:
    w = pi / p
    if max_weight is None:
        return w
    if not max_weight > 0:
        raise ValueError(f"max_weight must be > 0, got {max_weight!r}")
    return np.minimum(w, max_weight)


def _check_log(rewards: ArrayLike, propensities: ArrayLike,
               target_probabilities: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rewards, propensities in (0, 1] and target probabilities in [0, 1], as equal-length float64 arrays."""
    r = finite_values(rewards, "rewards")
    p = finite_values(propensities, "propensities", length=(len(r), "rewards"))
    pi = finite_values(target_probabilities, "target_probabilities", length=(len(r), "rewards"))
    check_rows((p <= 0) | (p > 1), p, "propensities", "must be in (0, 1]")
    check_rows((pi < 0) | (pi > 1), pi, "target_probabilities", "must be in [0, 1]")
    return r, p, pi
