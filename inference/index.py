"""The item index: top-k item search by inner product over item vectors, keyed by int64 item ids.

Start with `choose_params` (which index a catalogue needs for a target recall), then `build_index`
and `ItemIndex.search`. Kinds: exact ``flat``, and the approximate ``ivf_flat`` (the default above
`EXACT_BELOW` items), ``ivf_pq`` (compressed codes) and ``hnsw`` (a graph). Metric ``ip`` scores by
inner product; ``cosine`` normalises item and query vectors first.

Backends, one search API: FAISS on a GPU when FAISS sees one (the CPU index stays the master copy,
so it is what `save_index` writes), FAISS on the CPU otherwise, and, for ``flat``, exact search
with torch on "cuda" when present or the CPU. A refresh job replaces re-embedded items with
`ItemIndex.remove` then `ItemIndex.add`, widens the search with `tune_search` until the
recall `measure_recall` finds on a `Probe` (queries and their exact neighbours) meets its
target, and writes `ItemIndex.info` into its manifest.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np
import torch
from faiss.contrib.big_batch_search import BigBatchSearcher, BlockComputer

from inference.artifacts import link_or_copy

KINDS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
METRICS = ("ip", "cosine")
BACKENDS = ("auto", "faiss", "torch")
EXACT_BELOW = 20_000  # catalogues smaller than this are searched exactly: a flat scan is already fast
RECALL_K = 100  # choose_params aims at recall@100
MIN_NPROBE = 16
MAX_NLIST = 4096  # k-means costs nlist^2 x points per list, assigning N items N x nlist: past ~1M items
                  # more lists cost more to build (and to pick among per query) than they save in scanning
TUNING_FIELDS = {
    "flat": (),
    "ivf_flat": ("nlist", "nprobe"),
    "ivf_pq": ("nlist", "nprobe", "pq_m", "pq_bits"),
    "hnsw": ("hnsw_m", "ef_search", "ef_construction"),
}
SEARCH_FIELD = {"ivf_flat": "nprobe", "ivf_pq": "nprobe", "hnsw": "ef_search"}  # what `tune_search` widens
MAX_EF_SEARCH = 4096
GPU_MAX_K = 2048  # FAISS GPU indexes answer k <= 2048; larger k is searched on the CPU copy
SCORE_BUDGET = 2**25  # floats of (queries x items) scores held at once by exact search
BY_LIST_FROM = 16  # queries per IVF list (on average) from which IVF-flat search goes list by list:
                   # 1.5x query by query at 16, 2.4x at 64 (2,000 items per list, 64 dims, one thread)
FAISS_CLASSES = {"flat": faiss.IndexFlat, "ivf_flat": faiss.IndexIVFFlat, "ivf_pq": faiss.IndexIVFPQ,
                 "hnsw": faiss.IndexHNSWFlat}
INDEX_FILE, LABELS_FILE, INFO_FILE, DELTA_FILE = "index.faiss", "labels.npz", "index.json", "delta.npz"
MAX_DELTA = 0.1  # `save_index` writes a delta until the changes reach this share of the base's items


@dataclass(frozen=True)
class IndexParams:
    """What to build. Fields the kind does not use are None; change one with `dataclasses.replace`.

    nlist: IVF lists (k-means centroids); nprobe: lists scanned per query. hnsw_m: graph links per
    node; ef_search / ef_construction: candidate-list sizes while searching / building. pq_m: PQ
    sub-vectors per item (dim must be a multiple); pq_bits: bits per sub-vector code.
    """

    kind: str
    metric: str = "ip"
    nlist: int | None = None
    nprobe: int | None = None
    hnsw_m: int | None = None
    ef_search: int | None = None
    ef_construction: int | None = None
    pq_m: int | None = None
    pq_bits: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind = {self.kind!r}; expected one of {KINDS}")
        if self.metric not in METRICS:
            raise ValueError(f"metric = {self.metric!r}; expected one of {METRICS}")
        for field in ("nlist", "nprobe", "hnsw_m", "ef_search", "ef_construction", "pq_m", "pq_bits"):
            value = getattr(self, field)
            if field not in TUNING_FIELDS[self.kind]:
                if value is not None:
                    raise ValueError(f"{field} = {value!r}, but kind {self.kind!r} does not use it; expected None")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} = {value!r}; kind {self.kind!r} needs a positive int")
        if self.nprobe is not None and self.nprobe > self.nlist:
            raise ValueError(f"nprobe = {self.nprobe}; expected at most nlist = {self.nlist}")
        if self.pq_bits is not None and self.pq_bits > 16:
            raise ValueError(f"pq_bits = {self.pq_bits}; expected at most 16")


def choose_params(num_items: int, dim: int, target_recall: float = 0.95, kind: str | None = None,
                  metric: str = "ip") -> IndexParams:
    """The index for ``num_items`` vectors of ``dim`` dims that should reach ``target_recall`` at k = 100.

    Without ``kind``: ``flat`` below `EXACT_BELOW` items or for a target of 1, else ``ivf_flat``
    (it supports removal and addition). IVF: nlist the power of two nearest 4 sqrt(N), at most
    `MAX_NLIST` and N / 39 (39 training points per list); nprobe scans 1.6 / (1 - target) times
    the lists the top 100 would fill (32x at 0.95), and at least `MIN_NPROBE` lists. HNSW: M 32,
    ef_search 8 / (1 - target).
    IVF-PQ: as IVF, with 8-bit codes of 2-dim sub-vectors where dim allows; the compression caps
    its recall whatever nprobe. These rules were calibrated with `benchmarks/index.py` (clustered
    unit vectors, 100k and 1M items); where neighbourhoods are sparser (there, at 20k-50k items)
    IVF falls short of the target, so check a build with `measure_recall`. Override a field with
    ``dataclasses.replace(params, nprobe=64)``; `build_index` checks the result.
    """
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 1:
        raise ValueError(f"num_items = {num_items!r}; expected a positive int")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim = {dim!r}; expected a positive int")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target_recall = {target_recall!r}; expected a value in (0, 1]")
    if kind is None:
        kind = "flat" if num_items < EXACT_BELOW or target_recall == 1 else "ivf_flat"
    elif kind != "flat" and target_recall == 1:
        raise ValueError(f"target_recall = 1 needs exact search; kind {kind!r} is approximate, expected 'flat'")
    misses = max(1 - target_recall, 1e-3)  # the work to find the top 100 grows about as 1 / miss rate
    if kind in ("ivf_flat", "ivf_pq"):
        nlist = min(2 ** round(math.log2(4 * math.sqrt(num_items))), MAX_NLIST, max(1, num_items // 39))
        lists_for_top_k = RECALL_K * nlist / num_items  # lists the top 100 would fill, packed together
        nprobe = min(nlist, max(MIN_NPROBE, math.ceil(1.6 * lists_for_top_k / misses)))
        if kind == "ivf_flat":
            params = IndexParams(kind, metric, nlist=nlist, nprobe=nprobe)
        else:
            pq_m = max(m for m in range(1, max(1, dim // 2) + 1) if dim % m == 0)
            params = IndexParams(kind, metric, nlist=nlist, nprobe=nprobe, pq_m=pq_m, pq_bits=8)
    elif kind == "hnsw":
        params = IndexParams(kind, metric, hnsw_m=32, ef_search=math.ceil(8 / misses), ef_construction=80)
    else:
        params = IndexParams(kind, metric)
    check_params_fit(params, num_items, dim)
    return params


def check_params_fit(params: IndexParams, num_items: int, dim: int) -> None:
    """Raises ValueError when ``params`` cannot index ``num_items`` vectors of ``dim`` dims."""
    if params.nlist is not None and params.nlist > num_items:
        raise ValueError(f"nlist = {params.nlist}; expected at most the {num_items} items it is trained on")
    if params.pq_m is not None and dim % params.pq_m:
        raise ValueError(f"pq_m = {params.pq_m}; expected a divisor of dim = {dim}")
    if params.pq_bits is not None and num_items < 2**params.pq_bits:
        raise ValueError(f"pq_bits = {params.pq_bits} needs at least {2**params.pq_bits} items to train; "
                         f"got {num_items}")


class ItemIndex:
    """Live items' vectors, searchable by inner product; built by `build_index` or `load_index`.

    Each added vector gets a label, its row in ``self._ids`` (label -> item id), which is what FAISS
    stores. Flat indexes compact rows on removal (labels stay row numbers); IVF lists drop removed
    labels; HNSW cannot delete, so its removed labels stay in the graph, ``self._live`` marks them
    dead and search excludes them. ``recall`` is what `measure_recall` last found for this index;
    `add` and `remove` reset it to None.

    An index `load_index` read remembers its base, the files it came from: the first ``_base``
    labels are theirs, and the vectors added since (``_added``, one array per `add`) are kept,
    with their IVF lists for IVF kinds (``_assigned``), so `save_index` can write the change alone.
    """

    def __init__(self, params: IndexParams, dim: int, backend: str, store: faiss.Index | torch.Tensor,
                 ids: np.ndarray, live: np.ndarray) -> None:
        self.params, self.dim, self.backend = params, dim, backend
        self._store = store  # a CPU FAISS index, or (labels, D) item vectors for torch
        self._ids, self._live = ids, live  # (labels,) int64 item ids, (labels,) bool
        self._base: tuple[Path, int, np.ndarray] | None = None  # (directory, labels, their live flags)
        self._added: list[np.ndarray] = []
        self._assigned: list[np.ndarray] = []
        self._changed()

    def __len__(self) -> int:
        return self._count

    def info(self) -> dict:
        """What a manifest records: kind, metric, params, items, dim, backend and the last measured recall."""
        return {"kind": self.params.kind, "metric": self.params.metric, "params": asdict(self.params),
                "items": len(self), "dim": self.dim, "backend": self.backend, "recall": self.recall}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Item ids (Q, k') and scores (Q, k') of each query's best k' = min(k, len(self)) items, best first.

        ``queries`` is (Q, D). A row an approximate index fills with fewer than k' hits (FAISS pads
        with -1) is searched again over every live item: all IVF lists, or HNSW's flat storage.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k = {k!r}; expected a positive int")
        queries = self._prepare(queries, "queries")
        k = min(k, len(self))
        if k == 0:
            return np.empty((len(queries), 0), np.int64), np.empty((len(queries), 0), np.float32)
        if isinstance(self._store, torch.Tensor):
            scores, labels = self._search_torch(queries, k)
        else:
            params = None if self._selector is None else faiss.SearchParametersHNSW(
                sel=self._selector, efSearch=self.params.ef_search)
            by_list = (self.params.kind == "ivf_flat" and self.backend == "faiss-cpu"
                       and len(queries) * self.params.nprobe >= BY_LIST_FROM * self.params.nlist)
            scores, labels = (self._search_by_list(queries, k) if by_list
                              else self._searcher(k).search(queries, k, params=params))
            short = (labels < 0).any(axis=1)
            if short.any():
                scores[short], labels[short] = self._search_every_item(queries[short], k)
        return self._ids[labels], scores

    def add(self, ids: np.ndarray, vectors: np.ndarray, lists: np.ndarray | None = None) -> None:
        """Adds items: ``ids`` (N,) int64 not live in the index, ``vectors`` (N, D); for IVF kinds,
        ``lists`` (N,) is each vector's IVF list as the index's quantizer assigns it (None: assign here)."""
        ids = _check_ids(ids)
        vectors = self._prepare(vectors, "vectors")
        if len(ids) != len(vectors):
            raise ValueError(f"ids has {len(ids)} rows but vectors has {len(vectors)}; expected one vector per id")
        clash = ids[np.isin(ids, self._ids[self._live])]
        if clash.size:
            raise ValueError(f"ids {clash[:10].tolist()} are already in the index; remove them before adding again")
        labels = np.arange(len(self._ids), len(self._ids) + len(ids), dtype=np.int64)
        if isinstance(self._store, torch.Tensor):
            self._store = torch.cat([self._store, torch.from_numpy(vectors).to(self._store.device)])
        elif self.params.kind in ("ivf_flat", "ivf_pq"):
            if lists is None:
                lists = self._store.quantizer.assign(vectors, 1)[:, 0]
            lists = np.ascontiguousarray(lists, dtype=np.int64)
            if lists.shape != ids.shape or ((lists < 0) | (lists >= self._store.nlist)).any():
                raise ValueError(f"lists has shape {lists.shape} or values outside [0, {self._store.nlist}); "
                                 "expected one IVF list per vector")
            self._store.add_core(len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(labels), faiss.swig_ptr(lists))
            if self._base is not None:
                self._assigned.append(lists)
        else:
            self._store.add(vectors)  # flat and HNSW number rows in order, so each row's label is its row
        self._ids = np.concatenate([self._ids, ids])
        self._live = np.concatenate([self._live, np.ones(len(ids), bool)])
        if self._base is not None:
            self._added.append(vectors)
        self._changed()

    def remove(self, ids: np.ndarray) -> None:
        """Removes the items ``ids`` (N,) int64; every id must be live in the index."""
        ids = _check_ids(ids)
        labels = np.flatnonzero(self._live & np.isin(self._ids, ids))
        missing = np.setdiff1d(ids, self._ids[labels])
        if missing.size:
            raise ValueError(f"ids {missing[:10].tolist()} are not in the index; expected ids of live items")
        if self.params.kind == "flat":
            if isinstance(self._store, torch.Tensor):
                keep = np.ones(len(self._ids), bool)
                keep[labels] = False
                self._store = self._store[torch.from_numpy(keep).to(self._store.device)]
            else:
                self._store.remove_ids(faiss.IDSelectorBatch(labels))  # shifts later rows up, as np.delete does
            self._ids, self._live = np.delete(self._ids, labels), np.delete(self._live, labels)
        else:
            if self.params.kind != "hnsw":
                self._store.remove_ids(faiss.IDSelectorBatch(labels))
            self._live[labels] = False
        self._changed()

    def set_search(self, value: int) -> None:
        """Sets what search scans: nprobe for IVF kinds, ef_search for HNSW (other kinds have nothing)."""
        field = SEARCH_FIELD.get(self.params.kind)
        if field is None:
            raise ValueError(f"kind {self.params.kind!r} is exact; it has no search breadth to set")
        self.params = replace(self.params, **{field: value})  # validates, e.g. nprobe <= nlist
        if isinstance(self._store, faiss.Index) and field == "nprobe":
            self._store.nprobe = value
        elif isinstance(self._store, faiss.Index):
            self._store.hnsw.efSearch = value
        self._gpu = None  # the GPU copy holds the old nprobe

    def _to_faiss(self) -> faiss.Index:
        """The CPU FAISS index (for torch, a flat index of its vectors), whose labels index ``self._ids``."""
        if isinstance(self._store, torch.Tensor):
            flat = faiss.IndexFlatIP(self.dim)
            flat.add(self._store.cpu().numpy())
            return flat
        return self._store

    def _changed(self) -> None:
        """Recomputes what search reads on every call, after the items changed; forgets the recall."""
        self._count = int(self._live.sum())
        self._selector = None  # HNSW's live labels, while some are dead; the bitmap is kept alive with it
        if self.params.kind == "hnsw" and self._count < len(self._live):
            self._selector = faiss.IDSelectorBitmap(np.packbits(self._live, bitorder="little"))
        self._gpu: tuple[faiss.StandardGpuResources, faiss.Index] | None = None
        self.recall: dict[str, float] | None = None

    def _prepare(self, vectors: np.ndarray, what: str) -> np.ndarray:
        """``vectors`` as C-contiguous float32 (N, D), checked finite and, for cosine, normalised."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"{what} has shape {vectors.shape}; expected (N, {self.dim})")
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        if bad.size:
            raise ValueError(f"{what} rows {bad[:10].tolist()} hold NaN or inf; expected finite values")
        if self.params.metric == "cosine":
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)  # (N, 1)
            zero = np.flatnonzero(norms[:, 0] == 0)
            if zero.size:
                raise ValueError(f"{what} rows {zero[:10].tolist()} are zero; cosine needs non-zero vectors")
            vectors = vectors / norms
        return vectors

    def _searcher(self, k: int) -> faiss.Index:
        """The GPU copy when there is one and it can answer k, else the CPU index."""
        if self.backend != "faiss-gpu" or k > GPU_MAX_K:
            return self._store
        if self._gpu is None:  # copied again after every add or remove: the CPU index is the master
            resources = faiss.StandardGpuResources()
            self._gpu = (resources, faiss.index_cpu_to_gpu(resources, 0, self._store))
        return self._gpu[1]

    def _search_by_list(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and labels (Q, k) from the nprobe lists each query probes, as the IVF search finds
        them, computed list by list: each list's vectors against all the queries that probe it in one
        matrix product (FAISS's big-batch search), instead of one query's lists at a time."""
        searcher = BigBatchSearcher(self._store, queries, k)
        computer = BlockComputer(self._store, method="pairwise_distances")
        searcher.decode_func, searcher.by_residual = computer.decode_func, computer.by_residual
        searcher.coarse_quantization()
        searcher.reorder_assign()
        for number in range(self._store.nlist):
            subset, probing, list_labels, vectors = searcher.prepare_bucket(number)
            scores, _ = computer.block_search(probing, vectors, list_labels, k)
            searcher.add_results_to_heap(subset, scores, list_labels, None)
        searcher.rh.finalize()
        return searcher.rh.D, searcher.rh.I

    def _search_every_item(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and labels (Q, k) from every live item: IVF over all its lists, HNSW over its flat storage."""
        if self.params.kind == "hnsw":
            storage = faiss.downcast_index(self._store.storage)
            return storage.search(queries, k, params=faiss.SearchParameters(sel=self._selector))
        return self._store.search(queries, k, params=faiss.SearchParametersIVF(nprobe=self.params.nlist))

    def _search_torch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        items = self._store  # (N, D)
        rows = max(1, SCORE_BUDGET // len(items))
        scores, labels = [], []
        for chunk in torch.from_numpy(queries).to(items.device).split(rows):
            top = torch.topk(chunk @ items.T, k, dim=1)  # scores (rows, N)
            scores.append(top.values.cpu())
            labels.append(top.indices.cpu())
        return torch.cat(scores).numpy(), torch.cat(labels).numpy()


def build_index(ids: np.ndarray, vectors: np.ndarray, params: IndexParams, backend: str = "auto",
                seed: int = 0) -> ItemIndex:
    """An index of ``vectors`` (N, D) float32 keyed by ``ids`` (N,) int64 (any distinct values).

    ``backend``: "faiss", "torch" (``flat`` only) or "auto" (FAISS, except ``flat`` with torch when
    torch sees CUDA and FAISS no GPU). ``seed`` fixes IVF's k-means. Training uses at most 64
    vectors per IVF list, a seeded sample.
    """
    ids = _check_ids(ids)
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f"vectors has shape {vectors.shape}; expected (N, D) with D >= 1")
    if len(ids) == 0:
        raise ValueError("ids and vectors are empty; expected at least one item")
    check_params_fit(params, len(ids), vectors.shape[1])
    index = _empty_index(params, vectors.shape[1], _resolve_backend(backend, params.kind))
    if params.kind in ("ivf_flat", "ivf_pq"):
        index._store.cp.seed = seed
        index._store.cp.max_points_per_centroid = 64
        if params.kind == "ivf_pq":
            index._store.pq.cp.seed = seed
        index._store.train(index._prepare(vectors, "vectors"))
    index.add(ids, vectors)
    return index


def search_exact(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int,
                 metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k (FAISS's BLAS scan, `faiss.knn`): item ids (Q, k') and scores (Q, k'), best
    first, k' = min(k, N)."""
    if metric not in METRICS:
        raise ValueError(f"metric = {metric!r}; expected one of {METRICS}")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
    queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
    if metric == "cosine":
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores, rows = faiss.knn(queries, vectors, min(k, len(vectors)), metric=faiss.METRIC_INNER_PRODUCT)
    return np.asarray(ids)[rows], scores


PROBE_K = 256  # exact neighbours a probe keeps per query: room for removals before it is recomputed


@dataclass(frozen=True)
class Probe:
    """Recall probe: ``queries`` (Q, D) and their exact neighbours among the index's live items,
    best first: ``ids`` (Q, K) and ``scores`` (Q, K), by ``metric``.

    `Probe.updated` follows a change of the items without a full scan, so an incremental refresh
    measures recall on the same queries as the version it starts from.
    """

    queries: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    metric: str

    def updated(self, removed: np.ndarray, added: np.ndarray, vectors: np.ndarray, k: int = RECALL_K) -> Probe | None:
        """The probe after removing the items ``removed`` and adding ``added`` with ``vectors`` (N, D):
        each query keeps its neighbours that remain, merged with the added items' exact scores,
        to the width every query still has. That is exact: an item outside a query's old top K
        has K better ones, of which at most the removed ones are gone. None when the width falls
        below ``k``: then recompute it with `exact_probe`.
        """
        keep = ~np.isin(self.ids, np.concatenate([removed, added]))  # (Q, K); re-added ids get new scores
        width = int(keep.sum(axis=1).min()) if len(keep) else 0
        if width < k:
            return None
        kept = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # the kept columns, still best first
        ids, scores = np.take_along_axis(self.ids, kept, 1), np.take_along_axis(self.scores, kept, 1)
        if len(added):
            new_ids, new_scores = search_exact(added, vectors, self.queries, width, self.metric)
            ids, scores = np.concatenate([ids, new_ids], 1), np.concatenate([scores, new_scores], 1)
            best = np.argsort(-scores, axis=1, kind="stable")[:, :width]
            ids, scores = np.take_along_axis(ids, best, 1), np.take_along_axis(scores, best, 1)
        return Probe(self.queries, ids, scores, self.metric)

    def save(self, path: Path) -> None:
        np.savez(path, queries=self.queries, ids=self.ids, scores=self.scores, metric=self.metric)

    @classmethod
    def load(cls, path: Path) -> Probe:
        try:
            with np.load(path) as saved:
                return cls(saved["queries"], saved["ids"], saved["scores"], str(saved["metric"]))
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not a saved recall probe: {err}") from err


def exact_probe(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, metric: str = "ip",
                k: int = PROBE_K) -> Probe:
    """The `Probe` of ``queries`` (Q, D) over the items ``ids`` (N,) with ``vectors`` (N, D): `search_exact`."""
    found, scores = search_exact(ids, vectors, queries, k, metric)
    return Probe(np.ascontiguousarray(queries, dtype=np.float32), found, scores, metric)


def measure_recall(index: ItemIndex, probe: Probe, ks: tuple[int, ...] = (10, 100)) -> dict[str, float]:
    """Mean share of each probe query's exact top-k that ``index`` returns in its top-k, for each k
    in ``ks``: {"recall@10": ..., "recall@100": ...}. k is capped at the index's size.

    The probe must be over the index's live items (`exact_probe` of them) and hold max(ks) neighbours.
    """
    if not ks or min(ks) < 1:
        raise ValueError(f"ks = {ks!r}; expected positive ints")
    if probe.queries.shape[1:] != (index.dim,) or probe.metric != index.params.metric:
        raise ValueError(f"the probe holds {probe.metric} queries of shape {probe.queries.shape}; expected "
                         f"(Q, {index.dim}) by {index.params.metric}")
    if probe.ids.shape[1] < min(max(ks), len(index)):
        raise ValueError(f"the probe holds {probe.ids.shape[1]} neighbours per query; expected {max(ks)}")
    found, _ = index.search(probe.queries, max(ks))
    recall = {}
    for k in ks:
        k_ = min(k, len(index))
        hits = [len(np.intersect1d(f[:k_], e[:k_])) for f, e in zip(found, probe.ids, strict=True)]
        recall[f"recall@{k}"] = float(np.mean(hits) / k_)
    return recall


def tune_search(index: ItemIndex, probe: Probe, target_recall: float, k: int = RECALL_K) -> dict[str, float]:
    """Doubles nprobe (IVF) or ef_search (HNSW) until recall@k on ``probe`` reaches
    ``target_recall`` or the search covers everything (nprobe = nlist, ef_search = `MAX_EF_SEARCH`).

    `choose_params` guesses the breadth from the catalogue's size; how clustered the vectors are
    decides what it really needs, so a refresh measures and widens. Sets ``index.recall`` to what
    the final breadth reaches (recall@10 and recall@k) and returns it.
    """
    field = SEARCH_FIELD.get(index.params.kind)
    recall = measure_recall(index, probe, (10, k))
    while field is not None and recall[f"recall@{k}"] < target_recall:
        value = getattr(index.params, field)
        limit = index.params.nlist if field == "nprobe" else MAX_EF_SEARCH
        if value >= limit:
            break
        index.set_search(min(2 * value, limit))
        recall = measure_recall(index, probe, (10, k))
    index.recall = recall
    return recall


def save_index(index: ItemIndex, directory: str | Path) -> None:
    """Writes ``index`` into ``directory``: the CPU FAISS index, its labels' ids and live flags, and params.

    An IVF or HNSW index `load_index` read, changed since by at most `MAX_DELTA` of its base's
    items, is written as its change alone: the base's index and label files hard-linked (they
    are immutable) and ``delta.npz``, the ids to remove from the base and the ids and vectors
    to add (with their IVF lists, so that loading does not assign them again), which
    `load_index` applies. So an incremental refresh neither rewrites nor rehashes a large index.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    delta = _delta(index)
    if delta is None:
        faiss.write_index(index._to_faiss(), str(directory / INDEX_FILE))
        np.savez(directory / LABELS_FILE, ids=index._ids, live=index._live)
    else:
        for name in (INDEX_FILE, LABELS_FILE):
            link_or_copy(index._base[0] / name, directory / name)
        np.savez(directory / DELTA_FILE, **delta)
    info = {"params": asdict(index.params), "dim": index.dim, "recall": index.recall}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def _delta(index: ItemIndex) -> dict[str, np.ndarray] | None:
    """What changed since the index's base ({"removed", "added", "vectors"}), or None to write it whole."""
    if index._base is None or index.params.kind == "flat":  # flat rows move on removal; flat indexes are small
        return None
    _, n, was_live = index._base
    removed = index._ids[:n][was_live & ~index._live[:n]]
    new = index._live[n:]
    if len(removed) + int(new.sum()) > MAX_DELTA * max(int(was_live.sum()), 1):
        return None
    vectors = np.concatenate(index._added) if index._added else np.zeros((0, index.dim), np.float32)
    delta = {"removed": removed, "added": index._ids[n:][new], "vectors": vectors[new]}
    if index.params.kind != "hnsw":
        delta["lists"] = np.concatenate([np.zeros(0, np.int64), *index._assigned])[new]
    return delta


def load_index(directory: str | Path, backend: str = "auto") -> ItemIndex:
    """The index `save_index` wrote into ``directory``; ValueError names a file that is unreadable or inconsistent."""
    directory = Path(directory)
    path = directory / INFO_FILE
    try:
        info = json.loads(path.read_text())
        params, dim = IndexParams(**info["params"]), int(info["dim"])
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a saved index description: {err}") from err
    path = directory / LABELS_FILE
    try:
        with np.load(path) as labels:
            ids, live = labels["ids"], labels["live"]
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a saved label table: {err}") from err
    if ids.dtype != np.int64 or live.dtype != bool or ids.shape != live.shape or ids.ndim != 1:
        raise ValueError(f"{path} holds ids {ids.dtype} {ids.shape} and live {live.dtype} {live.shape}; "
                         "expected int64 and bool of one length")
    path = directory / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        store = faiss.read_index(str(path))
    except RuntimeError as err:
        raise ValueError(f"{path} is not a readable FAISS index: {err}") from err
    expected = len(ids) if params.kind == "hnsw" else int(live.sum())
    if store.d != dim or store.ntotal != expected:
        raise ValueError(f"{path} holds {store.ntotal} vectors of {store.d} dims; "
                         f"expected {expected} of {dim} dims from {directory / LABELS_FILE}")
    if not isinstance(store, FAISS_CLASSES[params.kind]) or store.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"{path} holds a {type(store).__name__} with metric {store.metric_type}; expected "
                         f"{FAISS_CLASSES[params.kind].__name__} by inner product for kind {params.kind!r}")
    backend = _resolve_backend(backend, params.kind)
    if backend.startswith("torch"):
        store = torch.from_numpy(store.reconstruct_n(0, store.ntotal)).to(backend.removeprefix("torch-"))
    index = ItemIndex(params, dim, backend, store, ids, live.copy())
    if params.kind in SEARCH_FIELD:  # the base file holds the breadth it was saved with
        index.set_search(getattr(params, SEARCH_FIELD[params.kind]))
    if params.kind != "flat":
        index._base = (directory, len(ids), live)
    path = directory / DELTA_FILE
    if path.is_file():
        try:
            with np.load(path) as delta:
                removed, added, vectors = delta["removed"], delta["added"], delta["vectors"]
                lists = delta.get("lists")  # None in a delta written before lists were kept
            index.remove(removed)
            index.add(added, vectors, lists)
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not a delta of the index beside it: {err}") from err
    index.recall = info.get("recall")
    return index


def _check_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"ids has shape {ids.shape} and dtype {ids.dtype}; expected (N,) integers")
    ids = ids.astype(np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"ids {unique[counts > 1][:10].tolist()} appear more than once; expected distinct ids")
    return ids


def _resolve_backend(backend: str, kind: str) -> str:
    """One of "faiss-gpu", "faiss-cpu", "torch-cuda", "torch-cpu" for ``backend`` and ``kind``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}; expected one of {BACKENDS}")
    faiss_gpu = faiss.get_num_gpus() > 0 and kind != "hnsw"  # FAISS has no GPU HNSW
    if backend == "torch" and kind != "flat":
        raise ValueError(f"backend 'torch' searches exactly; kind = {kind!r}, expected 'flat'")
    if backend == "torch" or (backend == "auto" and kind == "flat" and not faiss_gpu and torch.cuda.is_available()):
        return "torch-cuda" if torch.cuda.is_available() else "torch-cpu"
    return "faiss-gpu" if faiss_gpu else "faiss-cpu"


def _empty_index(params: IndexParams, dim: int, backend: str) -> ItemIndex:
    if backend.startswith("torch"):
        store = torch.empty((0, dim), dtype=torch.float32, device=backend.removeprefix("torch-"))
    else:
        description = {
            "flat": "Flat",
            "ivf_flat": f"IVF{params.nlist},Flat",
            "ivf_pq": f"IVF{params.nlist},PQ{params.pq_m}x{params.pq_bits}np",
            "hnsw": f"HNSW{params.hnsw_m},Flat",
        }[params.kind]
        store = faiss.index_factory(dim, description, faiss.METRIC_INNER_PRODUCT)
        if params.kind in ("ivf_flat", "ivf_pq"):
            store.nprobe = params.nprobe
        elif params.kind == "hnsw":
            store.hnsw.efConstruction, store.hnsw.efSearch = params.ef_construction, params.ef_search
    return ItemIndex(params, dim, backend, store, np.empty(0, np.int64), np.empty(0, bool))
