"""Online A/B test analysis of a control and a treatment variant on per-unit metrics.

Each unit (user or session) contributes one value, so the two groups are independent samples.
With means m, sample variances v (ddof 1) and sizes n per group (c control, t treatment):

    compare_means          difference m_t - m_c, Welch's SE sqrt(v_c/n_c + v_t/n_t), Welch-Satterthwaite
                           df = SE^4 / ((v_c/n_c)^2/(n_c-1) + (v_t/n_t)^2/(n_t-1)), two-sided Student t
                           p-value and interval difference +- t_{1-alpha/2, df} SE
    compare_proportions    difference of rates; interval from the unpooled SE sqrt(p(1-p)/n summed),
                           p-value from the pooled z-test (both rates p0 under the null)
    cuped                  Y - theta (X - mean X), theta = cov(Y, X) / var(X) over both groups pooled:
                           the same expected difference, variance shrunk by 1 - corr(Y, X)^2
    sample_ratio_mismatch  p-value of the chi-square (1 df) goodness-of-fit test of the group sizes
                           against the designed split; below 0.001, distrust the whole experiment
    required_sample_size   units per variant to detect a relative change with a two-sided normal test:
                           2 (z_{1-alpha/2} + z_power)^2 std^2 / (minimum_effect * mean)^2
    logged_experiment      all of it for an experiment the service ran: per user (an anonymous request
                           is a unit of its own), reward per request, from the impression log's slots

The distributions are scipy.stats'; the sample size is statsmodels' `NormalIndPower`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats
from statsmodels.stats.power import NormalIndPower

from evaluation.checks import finite_values


@dataclass(frozen=True)
class Comparison:
    """Treatment against control: ``difference`` = treatment_mean - control_mean, and its test.

    ``relative_difference`` is difference / control_mean (NaN when control_mean is 0). ``statistic`` is
    Welch's t, or the pooled z for proportions, whose ``degrees_of_freedom`` is inf (normal). [low, high]
    is the (1 - alpha) confidence interval of the difference.
    """

    control_mean: float
    treatment_mean: float
    difference: float
    relative_difference: float
    std_error: float
    degrees_of_freedom: float
    statistic: float
    p_value: float
    low: float
    high: float


def compare_means(control: ArrayLike, treatment: ArrayLike, alpha: float = 0.05) -> Comparison:
    """Welch's unequal-variance t-test and interval for the difference of means of two groups (N_c,), (N_t,)."""
    _check_open_unit(alpha, "alpha")
    c, t = finite_values(control, "control", min_count=2), finite_values(treatment, "treatment", min_count=2)
    var_c, var_t = c.var(ddof=1) / len(c), t.var(ddof=1) / len(t)  # squared standard errors of the means
    if var_c + var_t == 0:
        raise ValueError(f"compare_means needs variation in a group; control and treatment are constant "
                         f"({c[0]} and {t[0]})")
    std_error = math.sqrt(var_c + var_t)
    df = float((var_c + var_t) ** 2 / (var_c**2 / (len(c) - 1) + var_t**2 / (len(t) - 1)))
    mean_c, mean_t = float(c.mean()), float(t.mean())
    difference = mean_t - mean_c
    statistic = difference / std_error
    half_width = stats.t.ppf(1 - alpha / 2, df) * std_error
    return Comparison(mean_c, mean_t, difference, _relative(difference, mean_c), std_error, df, statistic,
                      2 * stats.t.sf(abs(statistic), df), difference - half_width, difference + half_width)


def compare_proportions(successes_c: int, n_c: int, successes_t: int, n_t: int,
                        alpha: float = 0.05) -> Comparison:
    """Difference of success rates (e.g. click-through): unpooled normal interval, pooled z-test p-value."""
    _check_open_unit(alpha, "alpha")
    rate_c = _check_count(successes_c, n_c, "successes_c", "n_c")
    rate_t = _check_count(successes_t, n_t, "successes_t", "n_t")
    pooled = (successes_c + successes_t) / (n_c + n_t)
    if pooled in (0, 1):
        raise ValueError(f"compare_proportions needs a success and a failure overall; the pooled rate is {pooled}")
    difference = rate_t - rate_c
    statistic = difference / math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_t))
    std_error = math.sqrt(rate_c * (1 - rate_c) / n_c + rate_t * (1 - rate_t) / n_t)
    half_width = stats.norm.ppf(1 - alpha / 2) * std_error
    return Comparison(rate_c, rate_t, difference, _relative(difference, rate_c), std_error, math.inf,
                      statistic, _normal_two_sided_p(statistic), difference - half_width, difference + half_width)


def cuped(metric: ArrayLike, covariate: ArrayLike) -> np.ndarray:
    """CUPED-adjusted metric Y - theta (X - mean X), theta = cov(Y, X) / var(X), all (N,) over both groups.

    X must be unaffected by the treatment (e.g. the same metric before the experiment); then the expected
    difference between groups is unchanged and its variance shrinks by 1 - corr(Y, X)^2 (Deng et al. 2013).
    Split the result with the assignment mask before `compare_means`.
    """
    y, x = finite_values(metric, "metric", min_count=2), finite_values(covariate, "covariate", min_count=2)
    if len(x) != len(y):
        raise ValueError(f"covariate has {len(x)} values but metric has {len(y)}")
    centred = x - x.mean()
    if not centred.any():
        raise ValueError(f"covariate must vary to adjust the metric; all {len(x)} values are {x[0]}")
    theta = np.dot(centred, y - y.mean()) / np.dot(centred, centred)
    return y - theta * centred


def sample_ratio_mismatch(n_control: int, n_treatment: int, expected_share: float = 0.5) -> float:
    """p-value of group sizes this far from the designed control share ``expected_share``.

    Chi-square goodness of fit with 1 degree of freedom, chi2 = (n_c - N s)^2 / (N s (1 - s)) = z^2.
    The conventional alarm is p < 0.001: the assignment or logging is broken, and no metric of the
    experiment can be trusted until that is explained.
    """
    _check_open_unit(expected_share, "expected_share")
    for value, name in ((n_control, "n_control"), (n_treatment, "n_treatment")):
        if not (float(value).is_integer() and value >= 0):
            raise ValueError(f"{name} must be a count, an integer >= 0, got {value!r}")
    total = n_control + n_treatment
    if total == 0:
        raise ValueError("sample_ratio_mismatch needs units; n_control and n_treatment are both 0")
    expected = total * expected_share
    return _normal_two_sided_p((n_control - expected) / math.sqrt(expected * (1 - expected_share)))


def required_sample_size(baseline_mean: float, baseline_std: float, minimum_effect: float,
                         alpha: float = 0.05, power: float = 0.8) -> int:
    """Units per variant for a two-sided test at ``alpha`` to detect, with probability ``power``, a change
    of ``minimum_effect`` times ``baseline_mean`` (relative: 0.02 is a 2% lift), with both groups'
    standard deviation ``baseline_std`` (statsmodels' two-sample normal power, rounded up)."""
    _check_open_unit(alpha, "alpha")
    _check_open_unit(power, "power")
    if not (math.isfinite(baseline_mean) and baseline_mean != 0):
        raise ValueError(f"baseline_mean must be finite and nonzero to scale minimum_effect, got {baseline_mean!r}")
    if not (math.isfinite(baseline_std) and baseline_std > 0):
        raise ValueError(f"baseline_std must be finite and > 0, got {baseline_std!r}")
    if not (math.isfinite(minimum_effect) and minimum_effect > 0):
        raise ValueError(f"minimum_effect must be a finite relative change > 0, got {minimum_effect!r}")
    effect_size = abs(minimum_effect * baseline_mean) / baseline_std
    return math.ceil(NormalIndPower().solve_power(effect_size, alpha=alpha, power=power, ratio=1.0))


def _normal_two_sided_p(z: float) -> float:
    """P(|Z| > |z|), from the upper tail so that tiny p-values keep their precision."""
    return float(2 * stats.norm.sf(abs(z)))


def _relative(difference: float, control_mean: float) -> float:
    return difference / control_mean if control_mean != 0 else math.nan


def _check_count(successes: int, n: int, successes_name: str, n_name: str) -> float:
    """The rate successes / n, for integers 0 <= successes <= n and n >= 1."""
    if not (float(n).is_integer() and n >= 1):
        raise ValueError(f"{n_name} must be an integer >= 1, got {n!r}")
    if not (float(successes).is_integer() and 0 <= successes <= n):
        raise ValueError(f"{successes_name} must be an integer in [0, {n_name}={n}], got {successes!r}")
    return successes / n


def _check_open_unit(value: float, name: str) -> None:
    if not 0 < value < 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")


@dataclass(frozen=True)
class ExperimentReport:
    """An experiment from its log: per arm the ``units`` (users), requests and reward (clicks);
    `compare_means` of the units' reward per request, treatment against control; and the
    sample-ratio-mismatch p-value of the units against the designed treatment share."""

    arms: dict[str, dict[str, float]]
    comparison: Comparison
    sample_ratio_p_value: float


def logged_experiment(requests: pd.DataFrame, slots: pd.DataFrame, treatment: str, share: float,
                      control: str = "control", alpha: float = 0.05) -> ExperimentReport:
    """The experiment arm ``treatment`` (a ``share`` of users by design) against ``control`` from
    ``requests``, one row per answered request with its ``variant`` and ``user_id``
    (`inference.impressions.read_requests`: a request that served nothing counts, earning 0), and
    ``slots``, one row per served slot with its ``reward`` (`inference.impressions.logged_slots`)."""
    for name, frame, columns in (("requests", requests, {"request_id", "user_id", "variant"}),
                                 ("slots", slots, {"request_id", "reward"})):
        missing = sorted(columns - set(frame.columns))
        if missing:
            raise ValueError(f"logged {name} lack columns {missing}; expected the columns of "
                             f"{'read_requests' if name == 'requests' else 'logged_slots'}")
    rewards = slots.groupby("request_id")["reward"].sum()
    requests = requests.set_index("request_id")[["variant", "user_id"]]
    requests["reward"] = rewards.reindex(requests.index, fill_value=0.0)
    arms = set(requests["variant"])
    if {control, treatment} - arms:
        raise ValueError(f"the log holds arms {sorted(arms)}; expected {control!r} and {treatment!r}")
    requests = requests[requests["variant"].isin([control, treatment])]
    unit = requests["user_id"].astype("string").fillna("request:" + requests.index.to_series())
    users = requests.groupby(unit).agg(variant=("variant", "first"), arms=("variant", "nunique"),
                                       requests=("reward", "size"), reward=("reward", "sum"))
    switched = users.index[users["arms"] > 1]
    if len(switched):
        raise ValueError(f"users {switched[:5].tolist()} were served by both arms; expected a stable split")
    users["per_request"] = users["reward"] / users["requests"]
    groups = {arm: users[users["variant"] == arm] for arm in (control, treatment)}
    summary = {arm: {"units": len(g), "requests": int(g["requests"].sum()), "reward": float(g["reward"].sum()),
                     "reward_per_request": float(g["reward"].sum() / g["requests"].sum())}
               for arm, g in groups.items()}
    comparison = compare_means(groups[control]["per_request"], groups[treatment]["per_request"], alpha)
    srm = sample_ratio_mismatch(len(groups[control]), len(groups[treatment]), 1 - share)
    return ExperimentReport(summary, comparison, srm)
