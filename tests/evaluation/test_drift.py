from collections import Counter

import numpy as np
import pandas as pd
import pytest

from data.schema import FeatureSpec
from evaluation.drift import (
    EMPTY_BIN_SHARE,
    categorical_psi,
    drift_report,
    feature_drift,
    ks_statistic,
    population_stability_index,
)


def test_psi_hand_case():
    # reference 1..10, 2 bins: quantiles [1, 5.5, 10], so one inner edge 5.5 and shares r = [0.5, 0.5].
    # current [0, 2, 3, 4, 11]: 0 and 11 lie outside the reference and go to the end bins, c = [0.8, 0.2].
    # PSI = (0.8 - 0.5) ln(0.8 / 0.5) + (0.2 - 0.5) ln(0.2 / 0.5) = 0.3 ln 1.6 + 0.3 ln 2.5 = 0.4159
    psi = population_stability_index(np.arange(1, 11), [0, 2, 3, 4, 11], bins=2)
    assert psi == pytest.approx(0.3 * np.log(1.6) + 0.3 * np.log(2.5))
    assert psi == pytest.approx(0.41589, abs=1e-5)


def test_psi_gives_an_empty_bin_the_epsilon_share():
    # current [1, 2] fills only the first bin: c = [1, 0] counts as [1, 1e-4]
    # PSI = 0.5 ln 2 + (1e-4 - 0.5) ln(1e-4 / 0.5) = 0.3466 + 4.2578 = 4.6044
    psi = population_stability_index(np.arange(1, 11), [1, 2], bins=2)
    eps = EMPTY_BIN_SHARE
    assert psi == pytest.approx(0.5 * np.log(2) + (eps - 0.5) * np.log(eps / 0.5))
    assert psi == pytest.approx(4.6044, abs=1e-4)


def test_psi_cuts_repeated_quantiles_once():
    # reference six 0s then 1, 2, 3, 4; 4 bins: quantiles [0, 0, 0, 1.75, 4] (0.75 sits at position 6.75,
    # between 1 and 2), deduplicated to [0, 1.75, 4]: one inner edge, r = [0.7, 0.3].
    # current [0, 0, 5, 5]: c = [0.5, 0.5]; PSI = -0.2 ln(5/7) + 0.2 ln(5/3) = 0.0673 + 0.1022
    reference = [0] * 6 + [1, 2, 3, 4]
    psi = population_stability_index(reference, [0, 0, 5, 5], bins=4)
    assert psi == pytest.approx(-0.2 * np.log(0.5 / 0.7) + 0.2 * np.log(0.5 / 0.3))
    assert population_stability_index(reference, reference, bins=4) == 0
    assert population_stability_index([3.0] * 5, [1.0, 7.0], bins=10) == 0  # one bin: nothing can move


def reference_psi(reference, current, bins):
    """Independent: pandas.qcut's deduplicated quantile edges, opened at both ends, and pandas.cut."""
    _, edges = pd.qcut(reference, bins, retbins=True, duplicates="drop")
    edges[0], edges[-1] = -np.inf, np.inf
    r = pd.Series(pd.cut(reference, edges)).value_counts(sort=False, normalize=True).to_numpy()
    c = pd.Series(pd.cut(current, edges)).value_counts(sort=False, normalize=True).to_numpy()
    r, c = np.maximum(r, EMPTY_BIN_SHARE), np.maximum(c, EMPTY_BIN_SHARE)
    return np.sum((c - r) * np.log(c / r))


@pytest.mark.parametrize("bins", [2, 5, 10, 20])
def test_psi_matches_a_pandas_reference(bins):
    rng = np.random.default_rng(bins)
    reference = np.round(rng.lognormal(size=3000), 1)  # rounding makes ties and repeated quantiles
    for current in (np.round(rng.lognormal(0.3, size=500), 1), rng.normal(size=200), reference[:10]):
        assert population_stability_index(reference, current, bins) == pytest.approx(
            reference_psi(reference, current, bins))


def test_categorical_psi_hand_case():
    # r = {a: 0.5, b: 0.5}, c = {a: 0.75, b: 0.25}: 0.25 ln 1.5 + 0.25 ln 2 = 0.2747
    assert categorical_psi(list("aabb"), list("aaab")) == pytest.approx(0.25 * np.log(1.5) + 0.25 * np.log(2))
    # c = {a: 0.75, c: 0.25}: b is empty in current and c unseen in the reference, each its own bin
    # 0.25 ln 1.5 + (1e-4 - 0.5) ln(1e-4 / 0.5) + (0.25 - 1e-4) ln(0.25 / 1e-4) = 0.1014 + 4.2577 + 1.9552
    eps = EMPTY_BIN_SHARE
    expected = 0.25 * np.log(1.5) + (eps - 0.5) * np.log(eps / 0.5) + (0.25 - eps) * np.log(0.25 / eps)
    assert categorical_psi(list("aabb"), list("aaac")) == pytest.approx(expected)
    assert categorical_psi(list("aabb"), list("aaac")) == pytest.approx(6.3143, abs=1e-4)


def test_categorical_psi_matches_a_counter_reference():
    rng = np.random.default_rng(0)
    reference = rng.choice(["x", "y", "z", 7], size=400, p=[0.5, 0.3, 0.15, 0.05])
    current = rng.choice(["x", "y", "w", 7], size=250, p=[0.3, 0.3, 0.3, 0.1])  # "w" is new, "z" gone
    ref, cur = Counter(reference.tolist()), Counter(current.tolist())
    expected = 0.0
    for category in set(ref) | set(cur):
        r = ref[category] / len(reference) or EMPTY_BIN_SHARE
        c = cur[category] / len(current) or EMPTY_BIN_SHARE
        expected += (c - r) * np.log(c / r)
    assert categorical_psi(reference, current) == pytest.approx(expected)
    assert categorical_psi(reference, reference) == 0


def brute_force_d(reference, current):
    reference, current = np.asarray(reference), np.asarray(current)
    return max(abs(np.mean(reference <= t) - np.mean(current <= t)) for t in np.r_[reference, current])


def test_ks_statistic_matches_brute_force():
    rng = np.random.default_rng(0)
    cases = [(rng.normal(size=50), rng.normal(0.3, size=80)),
             (rng.integers(0, 5, size=60), rng.integers(1, 6, size=45)),  # many ties
             ([1.0, 2.0, 3.0], [2.5]), ([4.0], [4.0])]
    for reference, current in cases:
        assert ks_statistic(reference, current).statistic == pytest.approx(brute_force_d(reference, current))
    # hand case: ECDFs of [1, 2, 3] and [2.5] differ most at 2: |2/3 - 0| = 2/3
    assert ks_statistic([1.0, 2.0, 3.0], [2.5]).statistic == pytest.approx(2 / 3)


def kolmogorov_tail_theta_form(lam):
    """Independent: 1 - sqrt(2 pi) / lam sum_k exp(-(2k - 1)^2 pi^2 / (8 lam^2)), the other series for K's CDF."""
    k = np.arange(1, 50)
    return 1 - np.sqrt(2 * np.pi) / lam * np.sum(np.exp(-((2 * k - 1) ** 2) * np.pi**2 / (8 * lam**2)))


def test_ks_p_value_matches_the_theta_series():
    rng = np.random.default_rng(1)
    for shift in (0.0, 0.1, 0.2, 0.4):
        reference, current = rng.normal(size=300), rng.normal(shift, size=200)
        result = ks_statistic(reference, current)
        n_e = 300 * 200 / 500
        lam = (np.sqrt(n_e) + 0.12 + 0.11 / np.sqrt(n_e)) * result.statistic
        assert result.p_value == pytest.approx(kolmogorov_tail_theta_form(lam), abs=1e-12)


@pytest.mark.parametrize(("level", "critical"), [(0.10, 1.224), (0.05, 1.358), (0.01, 1.628)])
def test_ks_p_value_crosses_the_level_at_the_published_critical_d(level, critical):
    # reference 0..n-1 and current shifted by s: D = s / n exactly. n = 20000 each: n_e = 10000, so the
    # large-sample critical D is critical / 100, i.e. s = critical * 200; just below it p > level, just above p < level
    n = 20_000
    below, above = int(np.floor(critical * 200)), int(np.ceil(critical * 200))
    p_below = ks_statistic(np.arange(n), np.arange(n) + below).p_value
    p_above = ks_statistic(np.arange(n), np.arange(n) + above).p_value
    assert p_above < level < p_below
    assert p_below == pytest.approx(level, rel=0.05) and p_above == pytest.approx(level, rel=0.05)


def test_ks_rejects_about_5_percent_of_samples_without_drift():
    rng = np.random.default_rng(2)
    p = np.array([ks_statistic(rng.normal(size=200), rng.normal(size=300)).p_value for _ in range(1000)])
    assert 0.035 <= np.mean(p < 0.05) <= 0.065  # binomial(1000, 0.05): sd 0.007
    assert ks_statistic(np.arange(10.0), np.arange(10.0)).p_value == 1


def samples(seed=0, n=5000):
    rng = np.random.default_rng(seed)

    def frame(shift):
        return pd.DataFrame({
            "price": rng.normal(shift, 1, n),  # drifts in the current sample
            "age": rng.normal(30, 5, n),
            "device": rng.choice(["ios", "android", "web"], n, p=[0.3, 0.5, 0.2]),
        })

    return frame(0.0), frame(1.0)


def test_drift_report_flags_a_shifted_mean_and_not_a_stable_feature():
    reference, current = samples()  # price's mean moves by one standard deviation; age and device stay
    report = drift_report(reference, current)
    assert report.index.tolist() == ["price", "age", "device"]
    assert report["kind"].tolist() == ["numerical", "numerical", "categorical"]
    assert report["alert"].tolist() == [True, False, False]
    assert report.loc["price", "psi"] > 0.5 and report.loc["price", "ks_p_value"] < 1e-10
    assert report.loc["age", "psi"] < 0.02 and report.loc["age", "ks_p_value"] > 0.01
    assert report.loc["device", "psi"] < 0.02 and np.isnan(report.loc["device", "ks_statistic"])


def test_drift_report_counts_missing_values_and_leaves_them_out():
    reference = pd.DataFrame({"x": [1.0, 2.0, np.nan, 4.0], "c": ["a", None, "b", "b"]})
    current = pd.DataFrame({"x": [1.0, np.nan, np.nan, 4.0], "c": pd.Categorical(["a", "a", "b", "b"])})
    report = drift_report(reference, current, columns=["x", "c"], psi_alert=0.1)
    assert report.loc["x", "missing_reference"] == 0.25 and report.loc["x", "missing_current"] == 0.5
    assert report.loc["c", "missing_reference"] == 0.25 and report.loc["c", "missing_current"] == 0
    assert report.loc["x", "psi"] == pytest.approx(population_stability_index([1.0, 2.0, 4.0], [1.0, 4.0]))
    # c: r = {a: 1/3, b: 2/3}, c = {a: 1/2, b: 1/2}: (1/6) ln 1.5 + (1/6) ln(4/3) = 0.1155 > 0.1
    assert report.loc["c", "psi"] == pytest.approx(np.log(1.5) / 6 + np.log(4 / 3) / 6)
    assert report.loc["c", "alert"]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: population_stability_index([1.0, 2.0], [1.0], bins=1), "bins must be an integer >= 2, got 1"),
    (lambda: population_stability_index([1.0, np.nan], [1.0]), r"reference must be finite; 1 values .* rows \[1\]"),
    (lambda: population_stability_index([1.0], []), "current has 0 values; expected at least 1"),
    (lambda: ks_statistic([[1.0, 2.0]], [1.0]), r"reference must be one value per row, shape \(N,\)"),
    (lambda: categorical_psi(["a", None], ["a"]), r"reference holds 1 missing values, the first at rows \[1\]"),
    (lambda: categorical_psi(["a"], [["a", "b"]]), r"current holds unhashable values such as \['a', 'b'\]"),
])
def test_the_statistics_refuse_bad_samples(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_drift_report_refuses_bad_frames():
    reference, current = samples(n=50)
    with pytest.raises(ValueError, match=r"columns \['price'\] are not in current"):
        drift_report(reference, current.drop(columns="price"))
    with pytest.raises(ValueError, match=r"columns \['size'\] are not in reference"):
        drift_report(reference, current, columns=["age", "size"])
    with pytest.raises(ValueError, match="current has no rows"):
        drift_report(reference, current.iloc[:0])
    with pytest.raises(ValueError, match="column 'age': current has 0 values; expected at least 1"):
        drift_report(reference, current.assign(age=np.nan))
    with pytest.raises(ValueError, match=r"column 'age': it is numerical \(float64\) in reference but categorical"):
        drift_report(reference, current.assign(age="old"))
    with pytest.raises(ValueError, match="column 'tags': reference holds unhashable values"):
        drift_report(reference.assign(tags=[[1, 2]] * 50), current.assign(tags=[[1]] * 50))
    with pytest.raises(ValueError, match="psi_alert must be a finite PSI > 0, got 0"):
        drift_report(reference, current, psi_alert=0)


def test_feature_drift_reads_each_schema_kind():
    features = [FeatureSpec("genres", "items", "multi_hot"), FeatureSpec("occupation", "users", "categorical"),
                FeatureSpec("age", "users", "numerical", buckets=4),
                FeatureSpec("recent", "interactions", "sequence", max_len=5, source="occupation")]
    rng = np.random.default_rng(0)
    reference = pd.DataFrame({"genres": [["a", "b"], ["a"]] * 500, "occupation": rng.integers(0, 3, 1000),
                              "age": rng.normal(30, 5, 1000), "recent": [[1, 2]] * 1000})
    current = pd.DataFrame({"genres": [["b"], ["b", "c"]] * 500, "occupation": rng.integers(0, 3, 1000),
                            "age": rng.normal(30, 5, 1000), "recent": [[3]] * 1000})
    report = feature_drift(reference, current, features)
    assert report.index.tolist() == ["genres", "occupation", "age"]  # the sequence is left out
    assert report.loc["genres", "psi"] == pytest.approx(categorical_psi(["a", "b", "a"] * 500, ["b", "b", "c"] * 500))
    assert report.loc["occupation", "kind"] == "categorical" and report.loc["age", "kind"] == "numerical"
    assert report["alert"].tolist() == [True, False, False]
