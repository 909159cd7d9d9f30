import logging
import threading
import time

import numpy as np
import pytest

import evaluation.shadow
from evaluation.shadow import (
    ShadowRunner,
    compare_responses,
    kendall_tau,
    mean_rank_displacement,
    overlap_at_k,
    rank_biased_overlap,
)
from inference.pipeline.executor import Response
from inference.pipeline.types import Query


def response(item_ids, sources=None):
    n = len(item_ids)
    sources = ["ann"] * n if sources is None else sources
    return Response(np.array(item_ids, np.int64), np.linspace(1, 0, n, dtype=np.float32), np.array(sources),
                    np.ones(n), np.zeros(0, np.int64), np.zeros(0, str))


# A = [1, 2, 3, 4] and B = [2, 1, 3, 5] share {1, 2, 3}. Depth by depth:
#   d = 1: {1} & {2} = {}            X_1 = 0, agreement A_1 = 0
#   d = 2: {1, 2} & {2, 1}           X_2 = 2, A_2 = 1
#   d = 3: {1, 2, 3} & {2, 1, 3}     X_3 = 3, A_3 = 1
#   d = 4: adds 4 and 5, not shared  X_4 = 3, A_4 = 0.75
# Ranks of the shared items (0-based) in A: 1 -> 0, 2 -> 1, 3 -> 2; in B: 1 -> 1, 2 -> 0, 3 -> 2.
A, B = [1, 2, 3, 4], [2, 1, 3, 5]


def test_rbo_hand_cases():
    # equal lengths, eq. 32 reduces to (1 - p) sum_d A_d p^(d-1) + A_4 p^4; at p = 0.5:
    # 0.5 (0 + 0.5 + 0.25 + 0.75 * 0.125) + 0.75 * 0.0625 = 0.421875 + 0.046875 = 15/32
    assert rank_biased_overlap(A, B, p=0.5) == pytest.approx(15 / 32)
    # at p = 0.9: 0.1 (0.9 + 0.81 + 0.75 * 0.729) + 0.75 * 0.6561 = 0.225675 + 0.492075
    assert rank_biased_overlap(A, B) == pytest.approx(0.71775)
    # uneven: S = [1, 2] (s = 2), L = [2, 3, 1] (l = 3), p = 0.5. X_1 = 0, X_2 = |{1,2} & {2,3}| = 1,
    # X_3 = |{1,2} & {2,3,1}| = 2; (1-p)/p = 1:
    #   sum_d X_d / d p^d               = 0 + 1/2 * 1/4 + 2/3 * 1/8 = 1/8 + 1/12 = 5/24
    #   sum_{d=3} X_s (d-s) / (s d) p^d = 1 * 1 / 6 * 1/8          = 1/48
    #   ((X_l - X_s) / l + X_s / s) p^l = (1/3 + 1/2) * 1/8         = 5/48
    # total 10/48 + 1/48 + 5/48 = 1/3
    assert rank_biased_overlap([1, 2], [2, 3, 1], p=0.5) == pytest.approx(1 / 3)
    assert rank_biased_overlap([2, 3, 1], [1, 2], p=0.5) == pytest.approx(1 / 3)


def test_rbo_properties_from_the_paper():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.permutation(30)[: rng.integers(1, 30)]
        b = rng.permutation(30)[: rng.integers(1, 30)]
        value = rank_biased_overlap(a, b)
        assert 0 <= value <= 1
        assert value == pytest.approx(rank_biased_overlap(b, a))  # symmetric
        assert rank_biased_overlap(a, a) == pytest.approx(1)  # identical
        assert rank_biased_overlap(a, a + 100) == 0  # disjoint
    assert rank_biased_overlap([5, 6], [5, 6, 7, 8]) == pytest.approx(1)  # a prefix: extrapolated to agree
    assert rank_biased_overlap([], []) == 1 and rank_biased_overlap([], [1]) == 0
    # top-weighted: swapping the first two items costs more than swapping the last two
    assert rank_biased_overlap([1, 2, 3, 4], [2, 1, 3, 4]) < rank_biased_overlap([1, 2, 3, 4], [1, 2, 4, 3])


def reference_rbo(a, b, p):
    """Independent: eq. 32 of Webber et al. term by term, with sets."""
    short, long = sorted((list(a), list(b)), key=len)
    s, l = len(short), len(long)  # noqa: E741

    def x(d):
        return len(set(short[:d]) & set(long[:d]))

    total = sum(x(d) / d * p**d for d in range(1, l + 1))
    total += sum(x(s) * (d - s) / (s * d) * p**d for d in range(s + 1, l + 1))
    return (1 - p) / p * total + ((x(l) - x(s)) / l + x(s) / s) * p**l


def test_rbo_matches_the_paper_term_by_term():
    rng = np.random.default_rng(1)
    for p in (0.5, 0.9, 0.98):
        for _ in range(10):
            a = rng.permutation(40)[: rng.integers(1, 25)]
            b = rng.permutation(40)[: rng.integers(1, 25)]
            assert rank_biased_overlap(a, b, p) == pytest.approx(reference_rbo(a, b, p))


def test_kendall_tau_and_displacement_hand_cases():
    # pairs of shared items: (1, 2) A says 1 first, B says 2 first: discordant; (1, 3) and (2, 3) concordant.
    # tau = (2 - 1) / 3; displacement = (|0 - 1| + |1 - 0| + |2 - 2|) / 3 = 2/3
    assert kendall_tau(A, B) == pytest.approx(1 / 3)
    assert mean_rank_displacement(A, B) == pytest.approx(2 / 3)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == -1 and kendall_tau([1, 2, 3], [1, 9, 2, 3]) == 1
    assert np.isnan(kendall_tau([1, 2], [2, 3])) and np.isnan(mean_rank_displacement([1], [2]))


def test_kendall_tau_matches_a_pair_count():
    rng = np.random.default_rng(2)
    for _ in range(10):
        a, b = rng.permutation(20)[:15], rng.permutation(20)[:12]
        shared = [i for i in a if i in b]
        rank_a, rank_b = {v: r for r, v in enumerate(a)}, {v: r for r, v in enumerate(b)}
        pairs = [(u, v) for i, u in enumerate(shared) for v in shared[i + 1:]]
        score = sum(np.sign(rank_a[u] - rank_a[v]) * np.sign(rank_b[u] - rank_b[v]) for u, v in pairs)
        assert kendall_tau(a, b) == pytest.approx(score / len(pairs))


def test_overlap_at_k_hand_cases():
    assert overlap_at_k(A, B, 1) == 0 and overlap_at_k(A, B, 2) == 1 and overlap_at_k(A, B, 4) == 0.75
    assert overlap_at_k([1, 2], [1, 2], 4) == 0.5  # the two empty slots count as misses


def test_compare_responses_hand_case():
    live = [response([1, 2, 3, 4], ["ann", "ann", "pop", "pop"]), response([7, 8], ["ann", "pop"])]
    shadow = [response([2, 1, 3, 5], ["ann", "ann", "pop", "ed"]), response([7, 8], ["ann", "pop"])]
    result = compare_responses(live, shadow, k=4)
    # request 1 is A against B (see above); request 2 is identical but fills only 2 of 4 slots
    assert (result.requests, result.k) == (2, 4)
    assert result.overlap_at_k == pytest.approx((0.75 + 0.5) / 2)
    assert result.rank_biased_overlap == pytest.approx((0.71775 + 1) / 2)
    assert result.kendall_tau == pytest.approx((1 / 3 + 1) / 2)
    assert result.mean_rank_displacement == pytest.approx((2 / 3 + 0) / 2)
    assert result.identical_top_k == 0.5
    # live slots: ann 3, pop 3 of 6; shadow: ann 3, pop 2, ed 1 of 6
    assert result.source_share_change == pytest.approx({"ann": 0, "ed": 1 / 6, "pop": -1 / 6})
    # at k = 1 only the first items count: 1 against 2, then 7 against 7
    top1 = compare_responses(live, shadow, k=1)
    assert (top1.overlap_at_k, top1.identical_top_k) == (0.5, 0.5)
    assert np.isnan(top1.kendall_tau) and top1.mean_rank_displacement == 0


def test_compare_responses_with_empty_answers():
    # live [1] against an empty shadow answer: nothing shared (RBO 0); two empty answers are identical (RBO 1)
    result = compare_responses([response([1]), response([])], [response([]), response([])], k=3)
    assert (result.overlap_at_k, result.rank_biased_overlap, result.identical_top_k) == (0, 0.5, 0.5)
    assert np.isnan(result.kendall_tau) and np.isnan(result.mean_rank_displacement)
    assert result.source_share_change == {"ann": -1.0}


def test_compare_responses_refuses_bad_inputs():
    with pytest.raises(ValueError, match="live has 1 responses but shadow has 0"):
        compare_responses([response([1])], [], k=1)
    with pytest.raises(ValueError, match="no responses"):
        compare_responses([], [], k=1)
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        compare_responses([response([1])], [response([1])], k=0)
    with pytest.raises(ValueError, match=r"a ranks ids \[3\] more than once"):
        compare_responses([response([3, 3])], [response([1])], k=2)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\), got 1"):
        rank_biased_overlap(A, B, p=1)


QUERY = Query(user_id=1, k=4)


def test_a_slow_shadow_does_not_delay_the_live_answer():
    def shadow(query):
        time.sleep(0.4)
        return response([2, 1, 3, 5])

    runner = ShadowRunner(lambda query: response(A), shadow)
    started = time.perf_counter()
    answers = [runner(QUERY) for _ in range(3)]
    live_s = time.perf_counter() - started
    assert live_s < 0.2  # the shadow alone takes 3 x 0.4 s
    assert all(np.array_equal(a.item_ids, A) for a in answers)
    runner.close()  # waits for the three shadow calls
    assert time.perf_counter() - started >= 1.2
    assert runner.counts == {"requests": 3, "shadowed": 3, "failed": 0, "skipped": 0, "pending": 0}
    assert runner.report(k=4).rank_biased_overlap == pytest.approx(0.71775)
    with pytest.raises(RuntimeError, match="closed"):
        runner(QUERY)


def test_a_raising_shadow_is_counted_and_logged(caplog):
    calls = iter(range(100))

    def shadow(query):
        if next(calls) % 2:
            raise TimeoutError("ranker down")
        return response(A)

    runner = ShadowRunner(lambda query: response(A), shadow)
    with caplog.at_level(logging.WARNING, logger="evaluation.shadow"):
        answers = [runner(QUERY) for _ in range(6)]
        runner.close()
    assert len(answers) == 6
    assert runner.counts == {"requests": 6, "shadowed": 3, "failed": 3, "skipped": 0, "pending": 0}
    assert "TimeoutError: ranker down" in caplog.text
    assert runner.report(k=4).identical_top_k == 1


def test_the_runner_shadows_a_seeded_sample_and_skips_when_the_queue_is_full(monkeypatch):
    runner = ShadowRunner(lambda query: response(A), lambda query: response(A), sample=0.3, seed=0)
    for _ in range(300):
        runner(QUERY)
    runner.close()
    assert 60 <= runner.counts["shadowed"] <= 120  # binomial(300, 0.3): mean 90, sd 8

    monkeypatch.setattr(evaluation.shadow, "MAX_PENDING", 1)
    release = threading.Event()

    def blocked_shadow(query):
        release.wait(5)
        return response(A)

    runner = ShadowRunner(lambda query: response(A), blocked_shadow)
    runner(QUERY)  # queued; its shadow call blocks until released
    runner(QUERY)  # one pending already: skipped
    release.set()
    runner.close()
    assert runner.counts == {"requests": 2, "shadowed": 1, "failed": 0, "skipped": 1, "pending": 0}
    with pytest.raises(ValueError, match=r"sample must be a share in \(0, 1\], got 0"):
        ShadowRunner(lambda query: response(A), lambda query: response(A), sample=0)


def test_report_before_any_shadow_call_completes_raises():
    runner = ShadowRunner(lambda query: response(A), lambda query: response(A))
    with pytest.raises(ValueError, match="no shadow call has completed yet"):
        runner.report(k=4)
    runner.close()


def test_the_report_covers_the_latest_max_pairs_only():
    answers = iter([response(A), response(B)] + [response(A)] * 10)
    runner = ShadowRunner(lambda query: response(A), lambda query: next(answers), max_pairs=2)
    for _ in range(4):
        runner(QUERY)
    runner.close()
    assert runner.counts["shadowed"] == 4
    report = runner.report(k=4)
    assert report.requests == 2 and report.identical_top_k == 1  # the first two pairs (B among them) are gone
    with pytest.raises(ValueError, match="max_pairs = 0; expected at least 1"):
        ShadowRunner(lambda query: response(A), lambda query: response(A), max_pairs=0)
