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
    sndr           mean(q_target) + sum(w (r - q_logged)) / sum(w)
                                                             DR's correction self-normalised, as SNIPS
    switch_dr      mean(q_target + [w <= tau] w (r - q_logged))
                                                             DR where w <= tau, the model alone elsewhere
                                                             (Wang et al., ICML 2017); tau = inf is DR

Every estimator is the mean of per-row terms, and its standard error is their sample standard
deviation over sqrt(N); the 95% interval is value +- 1.96 standard errors (normal approximation).
SNIPS and SNDR use the delta method: their terms are the linearised ratio, e.g. V + w (r - V) / mean(w).
The direct method's interval covers only the sampling of contexts, not the reward model's error.

`bootstrap_interval` gives a percentile interval instead, from the mean of resampled per-row rewards
(`Estimate.rewards`: the rows' contributions, whose mean is the value; for the self-normalised
estimators the normaliser mean(w) is the full log's, as in obp's `_estimate_round_rewards`). Rows are
drawn with numpy's legacy `RandomState(seed)`, whose stream never changes, one resample after another,
so a seed gives the same resampled rows as obp 0.4.1's `estimate_confidence_interval_by_bootstrap`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from evaluation.checks import check_rows, finite_values

Z95 = float(stats.norm.ppf(0.975))  # 1.959...


@dataclass(frozen=True)
class Estimate:
    """A policy value with its standard error and 95% normal-approximation interval [low, high].

    ``rewards`` (N,) are the rows' contributions, whose mean is ``value`` (for `bootstrap_interval`).
    """

    value: float
    std_error: float
    low: float
    high: float
    rewards: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class BootstrapInterval:
    """The mean of the resampled means and their (alpha/2, 1 - alpha/2) percentiles [low, high]."""

    mean: float
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
    # linearised terms, whose mean is exactly value
    return mean_estimate(value + w * (r - value) / w.mean(), rewards=w * r / w.mean())


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
    r, p, pi, q_log, q_tgt = _check_model_log(rewards, propensities, target_probabilities, q_logged, q_target)
    return mean_estimate(q_tgt + _importance_weights(p, pi, max_weight) * (r - q_log))


def sndr(rewards: ArrayLike, propensities: ArrayLike, target_probabilities: ArrayLike,
         q_logged: ArrayLike, q_target: ArrayLike) -> Estimate:
    """Self-normalised doubly robust: mean(q_target) + sum(w (r - q_logged)) / sum(w), all (N,).

    Its standard error linearises the ratio as SNIPS does.
    """
    r, p, pi, q_log, q_tgt = _check_model_log(rewards, propensities, target_probabilities, q_logged, q_target)
    w = pi / p
    if not w.any():
        raise ValueError(f"target_probabilities are 0 on all {len(w)} rows: SNDR divides by sum(w) = 0")
    correction = np.sum(w * (r - q_log)) / np.sum(w)
    linearised = q_tgt + correction + w * (r - q_log - correction) / w.mean()
    return mean_estimate(linearised, rewards=q_tgt + w * (r - q_log) / w.mean())


def switch_dr(rewards: ArrayLike, propensities: ArrayLike, target_probabilities: ArrayLike,
              q_logged: ArrayLike, q_target: ArrayLike, tau: float = 1.0) -> Estimate:
    """Switch-DR: mean(q_target + [w <= tau] w (r - q_logged)), all (N,); rows with w > tau rely on the model.

    tau = 0 is the direct method and tau = inf is doubly robust; larger tau trades variance for less bias.
    """
    if not tau >= 0:
        raise ValueError(f"tau must be a weight threshold >= 0, got {tau!r}")
    r, p, pi, q_log, q_tgt = _check_model_log(rewards, propensities, target_probabilities, q_logged, q_target)
    w = pi / p
    return mean_estimate(q_tgt + (w <= tau) * w * (r - q_log))


def bootstrap_interval(rewards: ArrayLike, alpha: float = 0.05, n_resamples: int = 1000,
                       seed: int = 0) -> BootstrapInterval:
    """Percentile interval of the mean of (N,) per-row ``rewards`` (an `Estimate`'s), from ``n_resamples``
    resamples of the rows drawn with `numpy.random.RandomState(seed)` (see the module docstring)."""
    values = finite_values(rewards, "rewards", min_count=2)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if not (isinstance(n_resamples, int) and n_resamples >= 2):
        raise ValueError(f"n_resamples must be an integer >= 2, got {n_resamples!r}")
    rng = np.random.RandomState(seed)
    means = np.array([np.mean(rng.choice(values, size=len(values))) for _ in range(n_resamples)])
    return BootstrapInterval(float(np.mean(means)), float(np.percentile(means, 100 * alpha / 2)),
                             float(np.percentile(means, 100 * (1 - alpha / 2))))


def effective_sample_size(weights: ArrayLike) -> float:
    """(sum w)^2 / sum(w^2) for importance weights w (N,): N when all are equal, 1 when one dominates."""
    w = finite_values(weights, "weights")
    check_rows(w < 0, w, "weights", "must be >= 0")
    if not w.any():
        raise ValueError(f"weights need a positive value; all {len(w)} are 0")
    return float(np.sum(w) ** 2 / np.sum(w**2))


def mean_estimate(terms: np.ndarray, rewards: np.ndarray | None = None) -> Estimate:
    """The mean of per-row terms (N,), its standard error std(terms) / sqrt(N) and the 95% interval.

    ``rewards`` (N,), the rows' contributions, default to the terms; they differ where the terms linearise.
    """
    if len(terms) < 2:
        raise ValueError(f"a standard error needs at least 2 logged rows, got {len(terms)}")
    value = float(terms.mean())
    std_error = float(terms.std(ddof=1) / np.sqrt(len(terms)))
    return Estimate(value, std_error, value - Z95 * std_error, value + Z95 * std_error,
                    terms if rewards is None else rewards)


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


def _check_model_log(rewards: ArrayLike, propensities: ArrayLike, target_probabilities: ArrayLike,
                     q_logged: ArrayLike, q_target: ArrayLike) -> tuple[np.ndarray, ...]:
    """`_check_log`'s three arrays and the reward model's q_logged and q_target, all (N,) float64."""
    r, p, pi = _check_log(rewards, propensities, target_probabilities)
    q_log = finite_values(q_logged, "q_logged", length=(len(r), "rewards"))
    q_tgt = finite_values(q_target, "q_target", length=(len(r), "rewards"))
    return r, p, pi, q_log, q_tgt
