import json
import sys
from pathlib import Path

import numpy as np
import pytest

from data.fetch import fetch_wheel_folder
from data.obd import load_obd
from evaluation.ope import (
    Z95,
    bootstrap_interval,
    direct_method,
    doubly_robust,
    effective_sample_size,
    ips,
    sndr,
    snips,
    switch_dr,
)

# Hand-computed cases. Four logged rows:
#   r  = [1,    0,    1,   0  ]
#   p  = [0.5,  0.25, 0.2, 0.5]
#   pi = [1,    0.5,  0,   0.5]  ->  w = pi / p = [2, 2, 0, 1]
R, P, PI = [1.0, 0.0, 1.0, 0.0], [0.5, 0.25, 0.2, 0.5], [1.0, 0.5, 0.0, 0.5]
Q_LOGGED, Q_TARGET = [0.6, 0.1, 0.5, 0.2], [0.5, 0.2, 0.3, 0.2]


def check(estimate, value, std_error):
    assert estimate.value == pytest.approx(value)
    assert estimate.std_error == pytest.approx(std_error)
    assert estimate.low == pytest.approx(value - Z95 * std_error)
    assert estimate.high == pytest.approx(value + Z95 * std_error)


def test_ips_hand_case():
    # terms w r = [2, 0, 0, 0]: mean 0.5; deviations [1.5, -.5, -.5, -.5], squares sum 3, / (n-1) = 1,
    # so std 1 and SE = 1 / sqrt(4) = 0.5
    check(ips(R, P, PI), 0.5, 0.5)


def test_ips_clips_weights():
    # max_weight 1.5: w = [1.5, 1.5, 0, 1], terms [1.5, 0, 0, 0]: mean 0.375; squares of deviations
    # 1.125^2 + 3 * 0.375^2 = 1.6875, / 3 = 0.5625, std 0.75, SE 0.375
    check(ips(R, P, PI, max_weight=1.5), 0.375, 0.375)


def test_snips_hand_case():
    # sum(w r) / sum(w) = 2 / 5 = 0.4; mean(w) = 1.25. Delta-method terms V + w (r - V) / mean(w):
    # [0.4 + 0.96, 0.4 - 0.64, 0.4 + 0, 0.4 - 0.32]; SE^2 = (0.96^2 + 0.64^2 + 0 + 0.32^2) / (3 * 4)
    check(snips(R, P, PI), 0.4, np.sqrt((0.96**2 + 0.64**2 + 0.32**2) / 12))


def test_direct_method_hand_case():
    # mean([0.5, 0.2, 0.3, 0.2]) = 0.3; deviations [.2, -.1, 0, -.1], SE^2 = 0.06 / (3 * 4) = 0.005
    check(direct_method(Q_TARGET), 0.3, np.sqrt(0.005))


def test_doubly_robust_hand_case():
    # r - q_logged = [0.4, -0.1, 0.5, -0.2], times w = [0.8, -0.2, 0, -0.2]; plus q_target gives terms
    # [1.3, 0, 0.3, 0]: mean 0.4; deviations [.9, -.4, -.1, -.4], SE^2 = 1.14 / (3 * 4) = 0.095
    check(doubly_robust(R, P, PI, Q_LOGGED, Q_TARGET), 0.4, np.sqrt(0.095))
    # max_weight 1: w = [1, 1, 0, 1], terms [0.9, 0.1, 0.3, 0]: mean 0.325
    assert doubly_robust(R, P, PI, Q_LOGGED, Q_TARGET, max_weight=1).value == pytest.approx(0.325)


def test_effective_sample_size_hand_case():
    # w = [2, 2, 0, 1]: 5^2 / 9
    assert effective_sample_size([2, 2, 0, 1]) == pytest.approx(25 / 9)
    assert effective_sample_size(np.full(7, 0.3)) == pytest.approx(7)


# A simulated contextual bandit with known truth: C equally likely contexts, K actions, a known
# click probability per (context, action), a stochastic logging policy and a different target policy.

C, K = 50, 5


def make_bandit(seed=0):
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0.05, 0.6, (C, K))  # click probability of each (context, action)
    logits = rng.normal(size=(C, K))
    logging = 0.8 * np.exp(logits) / np.exp(logits).sum(1, keepdims=True) + 0.2 / K  # every p >= 0.04
    target = np.exp(8 * theta) / np.exp(8 * theta).sum(1, keepdims=True)  # favours the better actions
    truth = float(np.mean(np.sum(target * theta, axis=1)))  # exact: contexts are uniform
    return theta, logging, target, truth


def simulate_log(theta, logging, target, n, rng):
    """n logged rows; the reward models are the true click rates (good) and half of them (biased)."""
    x = rng.integers(C, size=n)
    a = np.minimum((rng.random(n)[:, None] > np.cumsum(logging[x], axis=1)).sum(1), K - 1)
    r = (rng.random(n) < theta[x, a]).astype(float)
    biased = 0.5 * theta
    return {
        "rewards": r, "propensities": logging[x, a], "target_probabilities": target[x, a],
        "good": (theta[x, a], np.sum(target[x] * theta[x], axis=1)),
        "biased": (biased[x, a], np.sum(target[x] * biased[x], axis=1)),
    }


@pytest.fixture(scope="module")
def bandit():
    theta, logging, target, truth = make_bandit()
    log = simulate_log(theta, logging, target, 50_000, np.random.default_rng(1))
    return log, truth


def log_args(log):
    return log["rewards"], log["propensities"], log["target_probabilities"]


def test_ips_snips_and_dr_with_a_biased_model_find_the_true_value(bandit):
    log, truth = bandit
    mean_reward = log["rewards"].mean()
    assert abs(mean_reward - truth) > 0.05  # the logging policy's own value is far from the target's
    for estimate in (ips(*log_args(log)), snips(*log_args(log)), doubly_robust(*log_args(log), *log["biased"])):
        assert abs(estimate.value - truth) < 3 * estimate.std_error


def test_direct_method_with_a_biased_model_misses_the_true_value(bandit):
    log, truth = bandit
    biased, good = direct_method(log["biased"][1]), direct_method(log["good"][1])
    assert abs(biased.value - truth) > 20 * biased.std_error  # its interval is narrow and wrong
    assert abs(good.value - truth) < 3 * good.std_error


def test_a_good_reward_model_gives_doubly_robust_a_smaller_standard_error_than_ips(bandit):
    log, _ = bandit
    # The model removes the spread of the click rates across (context, action), not the Bernoulli
    # noise of each click, which both keep: here 0.0037 against 0.0050
    assert doubly_robust(*log_args(log), *log["good"]).std_error < 0.85 * ips(*log_args(log)).std_error


def test_95_percent_intervals_cover_the_truth_about_95_percent_of_the_time():
    theta, logging, target, truth = make_bandit()
    rng = np.random.default_rng(2)
    covered = {"ips": 0, "snips": 0, "dr": 0}
    trials = 300
    for _ in range(trials):
        log = simulate_log(theta, logging, target, 2_000, rng)
        for name, estimate in (("ips", ips(*log_args(log))), ("snips", snips(*log_args(log))),
                               ("dr", doubly_robust(*log_args(log), *log["biased"]))):
            covered[name] += estimate.low <= truth <= estimate.high
    for name, count in covered.items():  # binomial(300, 0.95): sd 3.8, so 270..297 is about +-4 sd
        assert 270 <= count <= 297, (name, count)


def test_snips_delta_method_standard_error_matches_a_bootstrap():
    theta, logging, target, _ = make_bandit()
    rng = np.random.default_rng(3)
    r, p, pi = log_args(simulate_log(theta, logging, target, 2_000, rng))
    rows = rng.integers(len(r), size=(2_000, len(r)))  # 2,000 bootstrap resamples of the rows
    w = pi[rows] / p[rows]
    bootstrap = np.sum(w * r[rows], axis=1) / np.sum(w, axis=1)
    assert snips(r, p, pi).std_error == pytest.approx(bootstrap.std(ddof=1), rel=0.05)


# The Open Bandit Dataset sample: the "random" policy's click rate estimated from the "bts" log.


def test_ips_and_snips_recover_the_random_policys_click_rate_from_the_bts_log():
    random_log = load_obd("random", "all").interactions
    bts_log = load_obd("bts", "all").interactions
    # The uniform-random policy shows each of the 80 items in each position with probability 1/80,
    # whatever the context: its logged propensity is that one constant.
    target_probability = random_log["propensity"].iloc[0]
    assert (random_log["propensity"] == target_probability).all()
    assert target_probability == pytest.approx(1 / 80)

    clicks = random_log["label"].to_numpy()
    observed = clicks.mean()  # 38 clicks in 10,000 impressions
    observed_se = clicks.std(ddof=1) / np.sqrt(len(clicks))
    r, p = bts_log["label"].to_numpy(), bts_log["propensity"].to_numpy()
    pi = np.full(len(r), target_probability)
    for estimate in (ips(r, p, pi), snips(r, p, pi)):
        # With ~40 clicks per log, the observed rate alone has a relative SE of 16% and the
        # estimates of ~37%, so no tight relative-error bound holds on this sample. We test that the
        # observed rate lies inside each estimate's 95% interval, and that the two independent
        # estimates differ by less than 1.96 standard errors of their difference.
        assert estimate.low <= observed <= estimate.high
        assert abs(estimate.value - observed) < Z95 * np.hypot(estimate.std_error, observed_se)
    assert effective_sample_size(pi / p) < 0.05 * len(r)  # why the estimates are this noisy


# Bad inputs


@pytest.mark.parametrize(("call", "message"), [
    (lambda: ips([1, 0, 1], [0.5, 0.5], [1, 1]), "propensities has 2 rows but rewards has 3"),
    (lambda: ips([1, np.nan, 1], P[:3], PI[:3]), r"rewards must be finite.*rows \[1\]: \[nan\]"),
    (lambda: ips(R, [0.5, 0.0, 0.2, 0.5], PI), r"propensities must be in \(0, 1\].*rows \[1\]: \[0.0\]"),
    (lambda: snips(R, [0.5, 1.5, 0.2, 2.0], PI), r"propensities must be in \(0, 1\].*rows \[1, 3\]"),
    (lambda: ips(R, P, [1, -0.1, 0, 1.2]), r"target_probabilities must be in \[0, 1\].*rows \[1, 3\]"),
    (lambda: ips(np.ones((2, 2)), P, PI), r"rewards must be one value per row.*\(2, 2\)"),
    (lambda: ips(R, P, PI, max_weight=0), "max_weight must be > 0, got 0"),
    (lambda: snips(R, P, [0, 0, 0, 0]), "target_probabilities are 0 on all 4 rows"),
    (lambda: doubly_robust(R, P, PI, Q_LOGGED[:3], Q_TARGET), "q_logged has 3 rows but rewards has 4"),
    (lambda: doubly_robust(R, P, PI, Q_LOGGED, [0.5, np.inf, 0, 0]), r"q_target must be finite.*rows \[1\]"),
    (lambda: direct_method([0.3]), "at least 2 logged rows, got 1"),
    (lambda: effective_sample_size([1, -2, 3]), r"weights must be >= 0.*rows \[1\]: \[-2.0\]"),
    (lambda: effective_sample_size([0, 0]), "weights need a positive value"),
    (lambda: switch_dr(R, P, PI, Q_LOGGED, Q_TARGET, tau=-1), "tau must be a weight threshold >= 0, got -1"),
    (lambda: sndr(R, P, [0, 0, 0, 0], Q_LOGGED, Q_TARGET), "SNDR divides by sum"),
    (lambda: bootstrap_interval([1.0, 2.0], n_resamples=1), "n_resamples must be an integer >= 2"),
    (lambda: bootstrap_interval([1.0, 2.0], alpha=0), r"alpha must be in \(0, 1\)"),
])
def test_bad_inputs_raise_value_errors_naming_the_argument_and_rows(call, message):
    with pytest.raises(ValueError, match=message):
        call()



# The same estimators as obp 0.4.1 on identical inputs (tests/fixtures/obp: the recorded outputs, the
# script and the environment that made them)

OBP = Path(__file__).parents[1] / "fixtures" / "obp"
sys.path.insert(0, str(OBP))
from inputs import BOOTSTRAP, LOGS, TAUS, evaluation_policy, read_log, reward_model  # noqa: E402

OBP_REFERENCE = json.loads((OBP / "reference.json").read_text())


@pytest.mark.parametrize(("policy", "campaign"), LOGS)
def test_estimators_equal_obp_on_the_open_bandit_logs(policy, campaign):
    log = read_log(fetch_wheel_folder("obp", "0.4.1", "obp/dataset/obd"), policy, campaign)
    expected = OBP_REFERENCE["logs"][f"{policy}/{campaign}"]
    rows = np.arange(len(log["action"]))
    assert (len(rows), log["reward"].sum()) == (expected["rows"], expected["clicks"])
    pi_all, q_all = evaluation_policy(len(rows), log["n_actions"]), reward_model(len(rows), log["n_actions"])
    pi_at_position, q_at_position = pi_all[rows, :, log["position"]], q_all[rows, :, log["position"]]  # (N, A)
    r, p, pi = log["reward"], log["pscore"], pi_at_position[rows, log["action"]]
    q_logged = q_at_position[rows, log["action"]]
    q_target = np.average(q_at_position, weights=pi_at_position, axis=1)
    estimates = {
        "ips": ips(r, p, pi), "snips": snips(r, p, pi), "dm": direct_method(q_target),
        "dr": doubly_robust(r, p, pi, q_logged, q_target), "sndr": sndr(r, p, pi, q_logged, q_target),
        **{f"switch_dr_{tau:g}": switch_dr(r, p, pi, q_logged, q_target, tau) for tau in TAUS},
    }
    for name, estimate in estimates.items():
        assert estimate.value == pytest.approx(expected[name]["value"], rel=1e-12, abs=0), name
        interval = bootstrap_interval(estimate.rewards, BOOTSTRAP["alpha"], BOOTSTRAP["n_resamples"],
                                      BOOTSTRAP["seed"])
        assert [interval.mean, interval.low, interval.high] == pytest.approx(expected[name]["bootstrap"],
                                                                               rel=1e-12, abs=0), name


def test_switch_dr_spans_the_direct_method_and_doubly_robust():
    # w = [2, 2, 0, 1]: tau 1.5 keeps the correction of rows 2 and 3 only: terms [0.5, 0.2, 0.3, 0]
    assert switch_dr(R, P, PI, Q_LOGGED, Q_TARGET, tau=1.5).value == pytest.approx(0.25)
    assert switch_dr(R, P, PI, Q_LOGGED, Q_TARGET, tau=0).value == pytest.approx(direct_method(Q_TARGET).value)
    assert switch_dr(R, P, PI, Q_LOGGED, Q_TARGET, tau=np.inf).value == pytest.approx(
        doubly_robust(R, P, PI, Q_LOGGED, Q_TARGET).value)


def test_sndr_hand_case():
    # w (r - q_logged) = [0.8, -0.2, 0, -0.2], sum 0.4, over sum(w) = 5: 0.08; mean(q_target) 0.3, so 0.38
    assert sndr(R, P, PI, Q_LOGGED, Q_TARGET).value == pytest.approx(0.38)
    assert sndr(R, P, PI, Q_LOGGED, Q_TARGET).rewards.mean() == pytest.approx(0.38)


def test_sndr_and_switch_dr_with_a_biased_model_find_the_true_value(bandit):
    log, truth = bandit
    for estimate in (sndr(*log_args(log), *log["biased"]), switch_dr(*log_args(log), *log["biased"], tau=50)):
        assert abs(estimate.value - truth) < 3 * estimate.std_error


def test_bootstrap_interval_covers_like_the_normal_one(bandit):
    log, _ = bandit
    estimate = ips(*log_args(log))
    interval = bootstrap_interval(estimate.rewards, n_resamples=400, seed=1)
    assert interval.low == pytest.approx(estimate.low, rel=0.05)
    assert interval.high == pytest.approx(estimate.high, rel=0.05)
    assert bootstrap_interval(estimate.rewards, n_resamples=400, seed=1) == interval  # the seed fixes it
