import dataclasses
import json
import os

import faiss
import numpy as np
import pytest

from inference.index import (
    BY_LIST_FROM,
    EXACT_BELOW,
    MAX_NLIST,
    IndexParams,
    Probe,
    build_index,
    check_params_fit,
    choose_params,
    exact_probe,
    load_index,
    measure_recall,
    save_index,
    search_exact,
    tune_search,
)

N, DIM, QUERIES = 5000, 32, 40
KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")


def _numpy_top_k(vectors, queries, k, metric="ip"):
    """The independent reference: every score, a full sort; row positions (Q, k) and scores (Q, k)."""
    vectors, queries = vectors.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def _clusters(n, rng, clusters=50):
    """Unit vectors (n, DIM) from a Gaussian mixture."""
    centers = rng.standard_normal((clusters, DIM))
    x = centers[rng.integers(0, clusters, n)] / np.sqrt(DIM) + 0.15 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    ids = rng.choice(2**62, size=N, replace=False).astype(np.int64) - 2**61  # arbitrary, some negative
    vectors = _clusters(N + QUERIES, rng)
    return ids, vectors[:N], vectors[N:]


def _params(kind, metric="ip", **overrides):
    return dataclasses.replace(choose_params(N, DIM, kind=kind, metric=metric), **overrides)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_flat_equals_numpy_top_k(metric, backend):
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((2000, DIM)) * rng.uniform(0.2, 3, (2000, 1))).astype(np.float32)  # mixed norms
    queries = rng.standard_normal((30, DIM)).astype(np.float32)
    ids = np.arange(2000, dtype=np.int64) * 11 - 5000
    index = build_index(ids, vectors, IndexParams("flat", metric), backend=backend)
    found, scores = index.search(queries, 20)
    rows, expected = _numpy_top_k(vectors, queries, 20, metric)
    np.testing.assert_array_equal(found, ids[rows])
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    exact_ids, exact_scores = search_exact(ids, vectors, queries, 20, metric)
    np.testing.assert_array_equal(exact_ids, ids[rows])
    np.testing.assert_allclose(exact_scores, expected, rtol=1e-4, atol=1e-4)


def test_metric_changes_the_ranking():
    # the norms differ by up to 15x, so inner product and cosine must disagree somewhere
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((500, DIM)) * rng.uniform(0.2, 3, (500, 1))).astype(np.float32)
    queries = rng.standard_normal((10, DIM)).astype(np.float32)
    ids = np.arange(500)
    by_ip = build_index(ids, vectors, IndexParams("flat", "ip")).search(queries, 10)[0]
    by_cosine = build_index(ids, vectors, IndexParams("flat", "cosine")).search(queries, 10)[0]
    assert (by_ip != by_cosine).any()


@pytest.mark.parametrize(("kind", "at_10", "at_100"), [("ivf_flat", 0.95, 0.9), ("ivf_pq", 0.8, 0.85),
                                                       ("hnsw", 0.95, 0.95)])
def test_ann_recall_against_numpy(data, kind, at_10, at_100):
    ids, vectors, queries = data
    overrides = {"nprobe": 8} if kind != "hnsw" else {}  # a real approximation: 8 of 128 lists
    index = build_index(ids, vectors, _params(kind, **overrides))
    recall = measure_recall(index, exact_probe(ids, vectors, queries))
    found, _ = index.search(queries, 100)
    rows, _ = _numpy_top_k(vectors, queries, 100)
    for k, floor in ((10, at_10), (100, at_100)):
        expected = np.mean([len(set(f[:k]) & set(ids[r[:k]])) / k for f, r in zip(found, rows, strict=True)])
        assert recall[f"recall@{k}"] == pytest.approx(expected)
        assert expected >= floor
    assert measure_recall(build_index(ids, vectors, IndexParams("flat")), exact_probe(ids, vectors, queries)) == {
        "recall@10": 1.0, "recall@100": 1.0}


def test_ids_round_trip(data):
    ids, vectors, _ = data
    index = build_index(ids, vectors, _params("ivf_flat"))
    found, _ = index.search(vectors[:200], 1)
    np.testing.assert_array_equal(found[:, 0], ids[:200])  # each item is its own best match
    assert found.dtype == np.int64


@pytest.mark.parametrize("k", [N - 1, N + 50])
def test_sparse_ivf_rows_are_completed_exactly(data, k):
    ids, vectors, queries = data
    index = build_index(ids, vectors, _params("ivf_flat", nprobe=1))
    _, raw = index._store.search(queries, k)
    assert (raw < 0).any(), "one list should not hold k items: the completion path must run"
    found, scores = index.search(queries, k)
    assert found.shape == (QUERIES, min(k, N))
    assert np.isin(found, ids).all()
    assert all(len(set(row)) == found.shape[1] for row in found)
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    rows, expected = _numpy_top_k(vectors, queries, found.shape[1])
    short = (raw < 0).any(axis=1)
    np.testing.assert_allclose(scores[short], expected[short], rtol=1e-4, atol=1e-4)


def test_many_queries_go_list_by_list_and_find_what_one_at_a_time_finds(data, monkeypatch):
    ids, vectors, _ = data
    rng = np.random.default_rng(3)
    index = build_index(ids, vectors, _params("ivf_flat"))
    gone = rng.choice(N, 500, replace=False)
    index.remove(ids[gone])
    fresh = _clusters(200, rng)
    index.add(ids[gone[:200]], fresh)
    queries = _clusters(1000, rng)
    assert len(queries) * index.params.nprobe >= BY_LIST_FROM * index.params.nlist
    calls = []
    by_list = index._search_by_list
    monkeypatch.setattr(index, "_search_by_list", lambda *args: calls.append(1) or by_list(*args))

    found, scores = index.search(queries, 50)
    assert calls, "1,000 queries should search list by list"
    one_scores = np.stack([index.search(q[None], 50)[1][0] for q in queries[:100]])  # below the threshold
    np.testing.assert_allclose(scores[:100], one_scores, rtol=1e-5, atol=1e-6)
    expected_scores, expected = index._store.search(queries, 50)  # FAISS's own IVF search, query by query
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-6)
    assert (found == index._ids[expected]).mean() > 0.999  # only near-ties may swap
    assert not np.isin(found, ids[gone[200:]]).any()

    k = N - 600  # more than a query's lists hold: each row is completed over every list
    found, scores = index.search(queries[:200], k)
    assert found.shape == (200, k) and np.isin(found, index._ids[index._live]).all()
    _, expected_scores = _numpy_top_k(np.concatenate([np.delete(vectors, gone, axis=0), fresh]), queries[:200], k)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kind", "backend"), [("flat", "faiss"), ("flat", "torch"), ("ivf_flat", "faiss"),
                                               ("ivf_pq", "faiss"), ("hnsw", "faiss")])
def test_removed_items_never_return_and_added_ones_do(data, kind, backend):
    ids, vectors, _ = data
    rng = np.random.default_rng(1)
    index = build_index(ids, vectors, _params(kind), backend=backend)
    gone = rng.choice(N, 1500, replace=False)
    index.remove(ids[gone])
    assert len(index) == N - 1500
    found, _ = index.search(vectors[gone[:100]], 20)  # each removed item would be its own best match
    assert not np.isin(found, ids[gone]).any()
    everything, _ = index.search(vectors[:5], N)  # k beyond the live items: every live item, once
    assert everything.shape == (5, N - 1500)
    assert all(set(row) == set(np.delete(ids, gone)) for row in everything)

    back = gone[:300]  # re-embedded: their new vectors are other items' old ones, shifted
    fresh = _clusters(300, rng)
    index.add(ids[back], fresh)
    assert len(index) == N - 1200
    found, _ = index.search(fresh, 10)
    top = 10 if kind == "ivf_pq" else 1  # PQ codes may reorder near neighbours
    assert np.mean([i in row[:top] for i, row in zip(ids[back], found, strict=True)]) >= 0.97
    found, _ = index.search(vectors[gone[300:400]], 20)
    assert not np.isin(found, ids[gone[300:]]).any()
    with pytest.raises(ValueError, match="already in the index"):
        index.add(ids[back[:2]], fresh[:2])
    with pytest.raises(ValueError, match="not in the index"):
        index.remove(ids[gone[300:302]])


def test_torch_backend_equals_faiss_flat_after_a_refresh(data):
    ids, vectors, queries = data
    by_faiss = build_index(ids, vectors, IndexParams("flat"), backend="faiss")
    by_torch = build_index(ids, vectors, IndexParams("flat"), backend="torch")
    assert by_torch.backend.startswith("torch") and by_faiss.backend.startswith("faiss")
    for index in (by_faiss, by_torch):
        index.remove(ids[100:400])
        index.add(ids[100:200], vectors[1000:1100] * 1.5)
    found_faiss, scores_faiss = by_faiss.search(queries, 50)
    found_torch, scores_torch = by_torch.search(queries, 50)
    np.testing.assert_array_equal(found_torch, found_faiss)
    np.testing.assert_allclose(scores_torch, scores_faiss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "backend"), [("flat", "torch"), ("ivf_flat", "faiss"), ("ivf_pq", "faiss"),
                                               ("hnsw", "faiss")])
def test_save_load_round_trip(data, tmp_path, kind, backend):
    ids, vectors, queries = data
    index = build_index(ids, vectors, _params(kind, "cosine"), backend=backend)
    index.remove(ids[:500])  # HNSW keeps these in its graph: the loaded index must still exclude them
    index.add(ids[:100], vectors[:100] * 2)
    index.recall = measure_recall(index, exact_probe(np.concatenate([ids[500:], ids[:100]]),
                                                     np.concatenate([vectors[500:], vectors[:100]]), queries, "cosine"))
    save_index(index, tmp_path / "index")
    loaded = load_index(tmp_path / "index", backend=backend)
    assert loaded.info() == index.info()
    for k in (10, N):
        expected, expected_scores = index.search(queries, k)
        found, scores = loaded.search(queries, k)
        np.testing.assert_array_equal(found, expected)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)


def test_info_reports_recall_until_the_index_changes(data):
    ids, vectors, queries = data
    index = build_index(ids, vectors, _params("ivf_flat", nprobe=8))
    assert index.info()["recall"] is None
    index.recall = measure_recall(index, exact_probe(ids, vectors, queries))
    info = index.info()
    assert info["kind"] == "ivf_flat" and info["items"] == N and info["dim"] == DIM
    assert info["params"]["nprobe"] == 8 and info["backend"] == "faiss-cpu"
    assert info["recall"] == measure_recall(index, exact_probe(ids, vectors, queries))
    index.remove(ids[:1])
    assert index.info()["recall"] is None


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_index_file_is_a_clear_error(data, tmp_path, damage):
    ids, vectors, _ = data
    save_index(build_index(ids, vectors, _params("ivf_flat")), tmp_path)
    path = tmp_path / "index.faiss"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"not an index" + raw[12:])
    with pytest.raises(ValueError, match="index.faiss"):
        load_index(tmp_path)


def test_damaged_or_mismatched_side_files_are_clear_errors(data, tmp_path):
    ids, vectors, _ = data
    save_index(build_index(ids[:3000], vectors[:3000], IndexParams("flat")), tmp_path / "small")
    save_index(build_index(ids, vectors, IndexParams("flat")), tmp_path / "full")
    labels = tmp_path / "full" / "labels.npz"
    raw = labels.read_bytes()
    labels.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="labels.npz"):
        load_index(tmp_path / "full")
    labels.write_bytes((tmp_path / "small" / "labels.npz").read_bytes())  # labels of another index
    with pytest.raises(ValueError, match="holds 5000 vectors"):
        load_index(tmp_path / "full")
    hnsw = {"kind": "hnsw", "hnsw_m": 8, "ef_search": 8, "ef_construction": 8}
    (tmp_path / "small" / "index.json").write_text(json.dumps({"params": hnsw, "dim": DIM}))
    with pytest.raises(ValueError, match="holds a IndexFlat.*expected IndexHNSWFlat"):
        load_index(tmp_path / "small")
    (tmp_path / "small" / "index.json").write_text('{"params": {"kind": "flat"')
    with pytest.raises(ValueError, match="index.json"):
        load_index(tmp_path / "small")
    (tmp_path / "small" / "index.json").write_text(json.dumps({"params": {"kind": "lsh"}, "dim": DIM}))
    with pytest.raises(ValueError, match="'lsh'"):
        load_index(tmp_path / "small")
    (tmp_path / "small" / "index.faiss").unlink()
    (tmp_path / "small" / "index.json").write_text(json.dumps({"params": {"kind": "flat"}, "dim": DIM}))
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        load_index(tmp_path / "small")


def test_choose_params_picks_flat_small_and_ivf_flat_large():
    assert choose_params(EXACT_BELOW - 1, 64) == IndexParams("flat")
    assert choose_params(10**7, 64, target_recall=1.0).kind == "flat"
    large = choose_params(1_000_000, 64)
    assert large.kind == "ivf_flat" and large.nlist == 4096
    assert choose_params(10**7, 64).nlist == MAX_NLIST  # 4 sqrt(N) would be 16,384: too slow to train and fill
    assert choose_params(100_000, 64, 0.99).nprobe > choose_params(100_000, 64, 0.95).nprobe
    assert choose_params(100_000, 64, kind="hnsw").ef_search < choose_params(100_000, 64, 0.99, kind="hnsw").ef_search
    pq = choose_params(100_000, 48, kind="ivf_pq", metric="cosine")
    assert (pq.pq_m, pq.pq_bits, pq.metric) == (24, 8, "cosine")
    assert choose_params(5000, 30, kind="ivf_flat").nlist <= 5000 // 39
    assert dataclasses.replace(large, nprobe=64).nprobe == 64


@pytest.mark.parametrize(("call", "message"), [
    (lambda: choose_params(0, 64), "num_items = 0"),
    (lambda: choose_params(1000, 0), "dim = 0"),
    (lambda: choose_params(1000, 64, target_recall=1.5), "target_recall = 1.5"),
    (lambda: choose_params(10**6, 64, target_recall=1.0, kind="hnsw"), "target_recall = 1"),
    (lambda: choose_params(1000, 64, kind="lsh"), "kind = 'lsh'"),
    (lambda: choose_params(1000, 64, metric="l2"), "metric = 'l2'"),
    (lambda: choose_params(100, 64, kind="ivf_pq"), "pq_bits = 8 needs at least 256 items"),
    (lambda: dataclasses.replace(choose_params(10**6, 64), nprobe=5000), "nprobe = 5000"),
    (lambda: dataclasses.replace(choose_params(10**6, 64), nprobe=0), "nprobe = 0"),
    (lambda: dataclasses.replace(choose_params(10**6, 64), ef_search=10), "ef_search = 10"),
    (lambda: IndexParams("ivf_flat", nlist=8), "nprobe = None"),
    (lambda: IndexParams("ivf_pq", nlist=8, nprobe=1, pq_m=4, pq_bits=20), "pq_bits = 20"),
    (lambda: check_params_fit(IndexParams("ivf_flat", nlist=64, nprobe=1), 50, 8), "nlist = 64"),
    (lambda: check_params_fit(IndexParams("ivf_pq", nlist=8, nprobe=1, pq_m=5, pq_bits=8), 5000, 32), "pq_m = 5"),
])
def test_bad_params_name_the_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_items_and_queries_name_the_problem(data):
    ids, vectors, _ = data
    flat = IndexParams("flat")
    cases = [
        (lambda: build_index(np.array([1, 2, 2]), vectors[:3], flat), r"ids \[2\] appear more than once"),
        (lambda: build_index(ids[:3], np.where(np.eye(3, DIM) > 0, np.nan, vectors[:3]), flat), "rows .0, 1, 2."),
        (lambda: build_index(ids[:3], np.full((3, DIM), np.inf), flat), "NaN or inf"),
        (lambda: build_index(ids[:3], vectors[:3, :5].ravel(), flat), "expected .N, D."),
        (lambda: build_index(ids[:4], vectors[:3], flat), "ids has 4 rows but vectors has 3"),
        (lambda: build_index(ids[:0], vectors[:0], flat), "empty"),
        (lambda: build_index(ids[:3].astype(float), vectors[:3], flat), "expected .N,. integers"),
        (lambda: build_index(ids, vectors, IndexParams("ivf_flat", nlist=8000, nprobe=1)), "nlist = 8000"),
        (lambda: build_index(ids[:3], vectors[:3], IndexParams("hnsw", hnsw_m=8, ef_search=8, ef_construction=8),
                             backend="torch"), "kind = 'hnsw'"),
        (lambda: build_index(ids[:3], vectors[:3], flat, backend="cuda"), "backend = 'cuda'"),
        (lambda: build_index(ids[:2], np.zeros((2, DIM)), IndexParams("flat", "cosine")), "rows .0, 1. are zero"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    index = build_index(ids[:10], vectors[:10], flat)
    with pytest.raises(ValueError, match=r"queries has shape \(2, 5\); expected \(N, 32\)"):
        index.search(np.zeros((2, 5), np.float32), 3)
    with pytest.raises(ValueError, match="k = 0"):
        index.search(vectors[:2], 0)
    with pytest.raises(ValueError, match=r"expected \(Q, 32\) by ip"):
        measure_recall(index, exact_probe(ids[:9], vectors[:9, :5], vectors[:2, :5]))


def test_ivf_build_is_seeded(data):
    ids, vectors, queries = data
    first, second, other = (build_index(ids, vectors, _params("ivf_flat", nprobe=2), seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(first.search(queries, 50)[0], second.search(queries, 50)[0])
    centroids = [faiss.downcast_index(i._store.quantizer).reconstruct_n(0, 128) for i in (first, other)]
    assert not np.allclose(*centroids)


def test_tune_search_widens_until_the_target_recall(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((4000, 64)).astype(np.float32)  # no clusters: hard for ANN
    queries = rng.standard_normal((100, 64)).astype(np.float32)
    ids = np.arange(4000, dtype=np.int64) * 7
    index = build_index(ids, vectors, IndexParams("ivf_flat", nlist=32, nprobe=1))
    probe = exact_probe(ids, vectors, queries)
    before = measure_recall(index, probe)["recall@10"]
    recall = tune_search(index, probe, target_recall=0.97, k=10)
    assert before < 0.9 and 0.97 <= recall["recall@10"] == index.recall["recall@10"]
    assert recall == measure_recall(index, probe, ks=(10,))  # search uses what was tuned
    save_index(index, tmp_path)
    loaded = load_index(tmp_path)
    assert loaded.params == index.params
    assert measure_recall(loaded, probe, ks=(10,)) == measure_recall(index, probe, ks=(10,))


def test_tune_search_stops_when_it_scans_everything():
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((4000, 8)).astype(np.float32)
    index = build_index(np.arange(4000), vectors, IndexParams("ivf_flat", nlist=8, nprobe=1))
    recall = tune_search(index, exact_probe(np.arange(4000), vectors, -vectors[:20]), target_recall=1.0)
    assert index.params.nprobe == 8 and recall["recall@100"] == 1.0
    with pytest.raises(ValueError, match="exact"):
        build_index(np.arange(4000), vectors, IndexParams("flat")).set_search(4)


def test_set_search_widens_hnsw_and_survives_saving(tmp_path):
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((1000, 16)).astype(np.float32)
    index = build_index(np.arange(1000), vectors, IndexParams("hnsw", hnsw_m=8, ef_search=16, ef_construction=40))
    index.set_search(64)
    assert index.params.ef_search == 64
    save_index(index, tmp_path)
    assert load_index(tmp_path).params.ef_search == 64
    with pytest.raises(ValueError, match="ef_search"):
        index.set_search(0)


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_a_small_change_is_saved_as_a_delta_over_the_hard_linked_base(data, tmp_path, kind):
    ids, vectors, queries = data
    rng = np.random.default_rng(8)
    save_index(build_index(ids, vectors, _params(kind)), tmp_path / "a")
    previous, live = tmp_path / "a", ids
    for n, step in enumerate(("b", "c")):  # each save holds the whole change since the base
        index = load_index(previous)
        gone = rng.choice(live, 60, replace=False)
        new_ids = np.arange(30) + 2**62 + 100 * n
        index.remove(gone)
        index.add(gone[:30], vectors[:30] * 0.5)  # re-embedded, and 30 new ones
        index.add(new_ids, _clusters(30, rng))
        live = np.concatenate([live[~np.isin(live, gone[30:])], new_ids])
        save_index(index, tmp_path / step)
        assert (tmp_path / step / "delta.npz").is_file()
        assert os.path.samefile(tmp_path / "a" / "index.faiss", tmp_path / step / "index.faiss")
        if kind == "ivf_flat":  # the added vectors' lists are kept: loading does not assign them again
            with np.load(tmp_path / step / "delta.npz") as delta:
                expected = index._store.quantizer.assign(np.ascontiguousarray(delta["vectors"]), 1)[:, 0]
                np.testing.assert_array_equal(delta["lists"], expected)
        loaded = load_index(tmp_path / step)
        assert len(loaded) == len(index) == len(live)
        np.testing.assert_array_equal(loaded.search(queries, 50)[0], index.search(queries, 50)[0])
        previous = tmp_path / step
    if kind == "ivf_flat":
        with np.load(tmp_path / "c" / "delta.npz") as delta:
            np.savez(tmp_path / "c" / "delta.npz", **{**delta, "lists": delta["lists"] + index.params.nlist})
        with pytest.raises(ValueError, match="one IVF list per vector"):
            load_index(tmp_path / "c")
    index.remove(live[:600])  # beyond MAX_DELTA: written whole
    save_index(index, tmp_path / "d")
    assert not (tmp_path / "d" / "delta.npz").exists()
    assert not os.path.samefile(tmp_path / "a" / "index.faiss", tmp_path / "d" / "index.faiss")
    np.testing.assert_array_equal(load_index(tmp_path / "d").search(queries, 50)[0], index.search(queries, 50)[0])


def test_an_updated_probe_equals_a_fresh_exact_one(data, tmp_path):
    ids, vectors, queries = data
    probe = exact_probe(ids, vectors, queries)
    assert probe.ids.shape == (QUERIES, 256)
    removed = ids[::25]  # 200 items, some of them near every query
    added, added_vectors = np.concatenate([removed[:50], [2**62, 2**62 + 1]]), vectors[:52] * 1.2
    updated = probe.updated(removed, added, added_vectors)
    keep = ~np.isin(ids, removed)
    fresh = exact_probe(np.concatenate([ids[keep], added]), np.concatenate([vectors[keep], added_vectors]), queries)
    width = updated.ids.shape[1]
    assert 100 <= width < 256
    np.testing.assert_array_equal(updated.ids, fresh.ids[:, :width])
    np.testing.assert_allclose(updated.scores, fresh.scores[:, :width], rtol=1e-6)
    updated.save(tmp_path / "probe.npz")
    np.testing.assert_array_equal(Probe.load(tmp_path / "probe.npz").ids, updated.ids)
    assert probe.updated(probe.ids[0, :157], added[:0], added_vectors[:0]) is None  # one query kept 99
    (tmp_path / "bad.npz").write_bytes(b"no zip")
    with pytest.raises(ValueError, match="bad.npz is not a saved recall probe"):
        Probe.load(tmp_path / "bad.npz")
