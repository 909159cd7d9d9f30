import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.power import NormalIndPower

from evaluation.ab import (
    compare_means,
    compare_proportions,
    cuped,
    logged_experiment,
    required_sample_size,
    sample_ratio_mismatch,
)

Z975 = NormalDist().inv_cdf(0.975)


def test_compare_means_hand_case():
    # control [1, 3]: mean 2, variance 2; treatment [4, 6]: mean 5, variance 2.
    # SE^2 = 2/2 + 2/2 = 2; difference 3, relative 3/2 = 1.5, t = 3 / sqrt(2) = 2.1213.
    # df = 2^2 / (1^2/1 + 1^2/1) = 2, where P(|T| > t) = 1 - t / sqrt(2 + t^2) = 1 - sqrt(4.5 / 6.5)
    # = 1 - 3 / sqrt(13) = 0.16795; the 95% interval is 3 +- t_{0.975, 2} sqrt(2) = 3 +- 4.3027 * 1.4142.
    result = compare_means([1.0, 3.0], [4.0, 6.0])
    assert (result.control_mean, result.treatment_mean) == (2.0, 5.0)
    assert result.difference == 3.0
    assert result.relative_difference == 1.5
    assert result.std_error == pytest.approx(math.sqrt(2))
    assert result.degrees_of_freedom == pytest.approx(2)
    assert result.statistic == pytest.approx(3 / math.sqrt(2))
    assert result.p_value == pytest.approx(1 - 3 / math.sqrt(13))
    assert result.low == pytest.approx(3 - 4.302653 * math.sqrt(2))
    assert result.high == pytest.approx(3 + 4.302653 * math.sqrt(2))


def test_compare_means_welch_degrees_of_freedom():
    # control [1, 2, 3, 4]: variance 5/3, so v_c / n_c = 5/12; treatment [3, 5, 7]: variance 4, v_t / n_t = 4/3.
    # SE^2 = 5/12 + 4/3 = 7/4; df = (7/4)^2 / ((5/12)^2 / 3 + (4/3)^2 / 2) = (49/16) / (409/432) = 1323/409.
    result = compare_means([1, 2, 3, 4], [3, 5, 7], alpha=0.1)
    assert result.std_error == pytest.approx(math.sqrt(7 / 4))
    assert result.degrees_of_freedom == pytest.approx(1323 / 409)
    assert result.p_value == pytest.approx(2 * (1 - stats.t.cdf(2.5 / math.sqrt(7 / 4), 1323 / 409)), rel=1e-9)
    half_width = stats.t.ppf(0.95, 1323 / 409) * math.sqrt(7 / 4)
    assert (result.low, result.high) == pytest.approx((2.5 - half_width, 2.5 + half_width))


def test_aa_tests_on_skewed_data_have_uniform_p_values():
    # 1,000 A/A tests, 200 units per group, lognormal (skewness ~6) like revenue per user
    rng = np.random.default_rng(0)
    p_values = np.array([compare_means(*rng.lognormal(0.0, 1.0, size=(2, 200))).p_value for _ in range(1000)])
    assert 0.03 <= np.mean(p_values < 0.05) <= 0.07
    counts, _ = np.histogram(p_values, bins=10, range=(0, 1))
    assert counts.min() >= 65 and counts.max() <= 135


def test_intervals_cover_the_true_difference():
    rng = np.random.default_rng(1)
    effect = 0.3  # the treatment shifts every unit's lognormal value up by 0.3
    covered = [(lambda r: r.low <= effect <= r.high)(compare_means(c, t + effect))
               for c, t in rng.lognormal(0.0, 1.0, size=(1000, 2, 200))]
    assert 0.93 <= np.mean(covered) <= 0.97


def test_compare_proportions_hand_case():
    # control 20 / 200 = 0.10, treatment 30 / 200 = 0.15: difference 0.05, relative 0.5.
    # Unpooled SE^2 = 0.1 * 0.9 / 200 + 0.15 * 0.85 / 200 = 0.00045 + 0.0006375 = 0.0010875.
    # Pooled rate 50 / 400 = 0.125: z = 0.05 / sqrt(0.125 * 0.875 * (2 / 200)) = 0.05 / 0.033072 = 1.5119.
    result = compare_proportions(20, 200, 30, 200)
    assert (result.control_mean, result.treatment_mean) == (0.1, 0.15)
    assert result.difference == pytest.approx(0.05)
    assert result.relative_difference == pytest.approx(0.5)
    assert result.std_error == pytest.approx(math.sqrt(0.0010875))
    assert result.degrees_of_freedom == math.inf
    assert result.statistic == pytest.approx(0.05 / math.sqrt(0.125 * 0.875 * 0.01))
    assert result.p_value == pytest.approx(0.1306, abs=1e-4)
    assert result.low == pytest.approx(0.05 - Z975 * math.sqrt(0.0010875))
    assert result.high == pytest.approx(0.05 + Z975 * math.sqrt(0.0010875))


def test_compare_proportions_matches_pearson_chi_square_and_welch():
    # Reference 1: the pooled z^2 is Pearson's chi-square of the 2x2 table, N (ad - bc)^2 / (row and column sums)
    a, b, c, d = 20, 180, 30, 170
    chi2 = 400 * (a * d - b * c) ** 2 / ((a + b) * (c + d) * (a + c) * (b + d))
    result = compare_proportions(a, a + b, c, c + d)
    assert result.statistic**2 == pytest.approx(chi2)
    # Reference 2: on the 0/1 outcomes, Welch's SE uses variances with ddof 1, larger by n / (n - 1)
    clicks_c, clicks_t = np.repeat([1.0, 0.0], [a, b]), np.repeat([1.0, 0.0], [c, d])
    welch = compare_means(clicks_c, clicks_t)
    assert welch.difference == pytest.approx(result.difference)
    assert welch.std_error == pytest.approx(result.std_error * math.sqrt(200 / 199))


def test_cuped_hand_case():
    # X = [1, 2, 3], Y = [2, 4, 7]: cov(Y, X) = ((-1)(-7/3) + 0 + (1)(8/3)) / 2 = 2.5, var(X) = 1, theta = 2.5;
    # Y - 2.5 (X - 2) = [4.5, 4, 4.5]
    np.testing.assert_allclose(cuped([2.0, 4.0, 7.0], [1.0, 2.0, 3.0]), [4.5, 4.0, 4.5])


def test_cuped_shrinks_the_standard_error_without_bias():
    # Pre-period X ~ Gamma(2, 5) (variance 50); Y = 0.8 X + N(0, 3^2) + effect: corr(Y, X)^2 = 32 / 41
    rng = np.random.default_rng(3)
    effect, n = 1.0, 500
    raw, adjusted = [], []
    for _ in range(300):
        treated = rng.permutation(np.repeat([False, True], n))
        x = rng.gamma(2.0, 5.0, 2 * n)
        y = 0.8 * x + rng.normal(0.0, 3.0, 2 * n) + effect * treated
        raw.append(compare_means(y[~treated], y[treated]))
        y_cuped = cuped(y, x)
        adjusted.append(compare_means(y_cuped[~treated], y_cuped[treated]))
    raw_se = np.mean([r.std_error for r in raw])
    adjusted_se = np.mean([r.std_error for r in adjusted])
    assert adjusted_se / raw_se == pytest.approx(math.sqrt(1 - 32 / 41), rel=0.05)
    estimates = np.array([r.difference for r in adjusted])
    assert abs(estimates.mean() - effect) < 3 * estimates.std() / math.sqrt(len(estimates))
    assert estimates.std() == pytest.approx(adjusted_se, rel=0.15)  # the reported SE is the spread it shows


def test_sample_ratio_mismatch():
    # 50.5 / 49.5 split: chi2 = (n_c - N/2)^2 / (N/4) = 5000^2 / 250000 = 100 at 1M units, 50^2 / 2500 = 1 at 10k
    assert sample_ratio_mismatch(505_000, 495_000) == pytest.approx(math.erfc(10 / math.sqrt(2)))
    assert sample_ratio_mismatch(505_000, 495_000) < 0.001
    assert sample_ratio_mismatch(5_050, 4_950) == pytest.approx(0.3173, abs=1e-4)
    assert sample_ratio_mismatch(5_050, 4_950) > 0.001
    # designed 60 / 40 split: Pearson's sum of (observed - expected)^2 / expected over both cells
    chi2 = 100**2 / 6000 + 100**2 / 4000
    assert sample_ratio_mismatch(6_100, 3_900, expected_share=0.6) == pytest.approx(
        2 * (1 - NormalDist().cdf(math.sqrt(chi2))))
    assert sample_ratio_mismatch(6_000, 4_000, expected_share=0.6) == 1.0


def test_required_sample_size_hand_case():
    # 2 (z_0.975 + z_0.8)^2 std^2 / delta^2 = 2 (1.95996 + 0.84162)^2 * 2^2 / (0.1 * 10)^2 = 2 * 7.8489 * 4 = 62.8
    assert required_sample_size(10.0, 2.0, 0.1) == 63
    # alpha 0.01, power 0.9: 2 (2.57583 + 1.28155)^2 = 29.76 per unit of (std / delta)^2
    assert required_sample_size(10.0, 2.0, 0.1, alpha=0.01, power=0.9) == 120


@pytest.mark.parametrize(("alpha", "power", "effect"), [(0.05, 0.8, 0.5), (0.01, 0.9, 0.5), (0.05, 0.8, 0.05)])
def test_required_sample_size_agrees_with_the_closed_form(alpha, power, effect):
    # statsmodels also counts rejections in the far tail, which lowers n by a relative 2.4e-6 here
    closed_form = 2 * ((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) / effect) ** 2
    unrounded = NormalIndPower().solve_power(effect, alpha=alpha, power=power, ratio=1.0)
    assert unrounded == pytest.approx(closed_form, rel=5e-6)
    assert required_sample_size(10.0, 2.0, effect * 2.0 / 10.0, alpha=alpha, power=power) == math.ceil(unrounded)


def test_required_sample_size_gives_the_power_in_simulation():
    rng = np.random.default_rng(5)
    n = required_sample_size(10.0, 2.0, 0.05)  # detect +0.5 on a mean of 10
    control = rng.normal(10.0, 2.0, size=(4000, n))
    treatment = rng.normal(10.5, 2.0, size=(4000, n))
    z = (treatment.mean(1) - control.mean(1)) / np.sqrt((control.var(1, ddof=1) + treatment.var(1, ddof=1)) / n)
    assert np.mean(np.abs(z) > Z975) == pytest.approx(0.8, abs=0.025)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: compare_means([1.0], [1.0, 2.0]), "control has 1 values; expected at least 2"),
    (lambda: compare_means([1.0, 2.0], [1.0, np.nan, 3.0]), r"treatment must be finite; 1 values are not.*\[1\]"),
    (lambda: compare_means([[1.0, 2.0]], [1.0, 2.0]), r"control must be one value per row"),
    (lambda: compare_means([2.0, 2.0], [3.0, 3.0]), "needs variation"),
    (lambda: compare_means([1.0, 2.0], [1.0, 3.0], alpha=1.0), r"alpha must be in \(0, 1\), got 1.0"),
    (lambda: compare_proportions(5, 4, 1, 10), r"successes_c must be an integer in \[0, n_c=4\], got 5"),
    (lambda: compare_proportions(1, 10, -1, 10), r"successes_t must be an integer"),
    (lambda: compare_proportions(1, 0, 1, 10), "n_c must be an integer >= 1"),
    (lambda: compare_proportions(1.5, 10, 1, 10), "successes_c"),
    (lambda: compare_proportions(0, 10, 0, 10), "pooled rate is 0"),
    (lambda: compare_proportions(1, 10, 1, 10, alpha=0), "alpha"),
    (lambda: cuped([1.0, 2.0, 3.0], [1.0, 2.0]), "covariate has 2 values but metric has 3"),
    (lambda: cuped([1.0, 2.0], [4.0, 4.0]), "covariate must vary"),
    (lambda: sample_ratio_mismatch(-1, 10), "n_control must be a count"),
    (lambda: sample_ratio_mismatch(0, 0), "both 0"),
    (lambda: sample_ratio_mismatch(10, 10, expected_share=1.0), "expected_share"),
    (lambda: required_sample_size(10.0, 0.0, 0.1), "baseline_std must be finite and > 0"),
    (lambda: required_sample_size(0.0, 1.0, 0.1), "baseline_mean must be finite and nonzero"),
    (lambda: required_sample_size(10.0, 1.0, -0.1), "minimum_effect"),
    (lambda: required_sample_size(10.0, 1.0, 0.1, power=1.2), r"power must be in \(0, 1\)"),
])
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def logged_slots_of(rng, users: int, share: float, rates: dict[str, float], slots: int = 5) -> pd.DataFrame:
    """Slots of 1-4 requests per user, each user in one arm, rewards Bernoulli(rates[arm])."""
    rows = []
    for user in range(users):
        arm = "treatment" if rng.random() < share else "control"
        for r in range(rng.integers(1, 5)):
            for position in range(slots):
                rows.append({"request_id": f"{user}-{r}", "user_id": user, "variant": arm, "position": position,
                             "reward": float(rng.random() < rates[arm])})
    return pd.DataFrame(rows).astype({"user_id": "Int64"})


def requests_of(slots: pd.DataFrame) -> pd.DataFrame:
    """The requests of logged slots, one row each (as `read_requests` reads them)."""
    return slots.drop_duplicates("request_id")[["request_id", "user_id", "variant"]]


def test_logged_experiment_finds_a_real_lift_and_checks_the_split():
    rng = np.random.default_rng(0)
    slots = logged_slots_of(rng, 4000, 0.3, {"control": 0.10, "treatment": 0.13})
    report = logged_experiment(requests_of(slots), slots, "treatment", share=0.3)
    assert report.arms["treatment"]["units"] + report.arms["control"]["units"] == 4000
    assert report.comparison.low < 5 * 0.03 < report.comparison.high and report.comparison.p_value < 0.001
    assert report.sample_ratio_p_value > 0.001  # the split is as designed
    assert logged_experiment(requests_of(slots), slots, "treatment", share=0.5).sample_ratio_p_value < 1e-6


def test_requests_that_served_nothing_count_as_earning_nothing():
    slots = pd.DataFrame({"request_id": ["a", "b", "c", "d"], "user_id": pd.array([1, 2, 3, 4], "Int64"),
                          "variant": ["control", "control", "treatment", "treatment"], "reward": [1.0, 0.0, 1.0, 1.0]})
    empty = pd.DataFrame({"request_id": ["e"], "user_id": pd.array([3], "Int64"), "variant": ["treatment"]})
    report = logged_experiment(pd.concat([requests_of(slots), empty]), slots, "treatment", share=0.5)
    assert report.arms["treatment"] == {"units": 2, "requests": 3, "reward": 2.0, "reward_per_request": 2 / 3}
    assert report.comparison.treatment_mean == pytest.approx((0.5 + 1.0) / 2)  # user 3: 1 click in 2 requests


def test_logged_experiment_refuses_logs_it_cannot_trust():
    slots = logged_slots_of(np.random.default_rng(1), 50, 0.5, {"control": 0.1, "treatment": 0.1})
    with pytest.raises(ValueError, match=r"the log holds arms \['control', 'treatment'\]; expected 'control' and 'b'"):
        logged_experiment(requests_of(slots), slots, "b", share=0.5)
    extra = pd.DataFrame({"request_id": ["x1", "x2"], "user_id": pd.array([7, 7], "Int64"),
                          "variant": ["control", "treatment"], "position": [0, 0], "reward": [0.0, 1.0]})
    switched = pd.concat([slots, extra])
    with pytest.raises(ValueError, match=r"users \['7'\] were served by both arms"):  # user 7: one request in each
        logged_experiment(requests_of(switched), switched, "treatment", share=0.5)
    with pytest.raises(ValueError, match=r"logged requests lack columns \['variant'\]"):
        logged_experiment(requests_of(slots).drop(columns="variant"), slots, "treatment", share=0.5)
