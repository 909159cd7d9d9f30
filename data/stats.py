"""Summary statistics of a canonical dataset (`recstack data stats`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from data.dataset import PARTS, read_dataset


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 when all equal, towards 1 when one item has all."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n = len(x)
    if n == 0 or x.sum() == 0:
        return 0.0
    # G = sum_i (2i - n - 1) x_(i) / (n sum x), i = 1..n over the sorted values
    return float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * x.sum()))


def dataset_stats(path: Path) -> dict:
    """Counts, sparsity, item-popularity Gini, time range, label mean and split sizes."""
    ds = read_dataset(path)
    inter = ds.interactions
    n_users, n_items, n = len(ds.users), len(ds.items), len(inter)
    item_counts = inter["item_id"].value_counts().reindex(ds.items["item_id"], fill_value=0).to_numpy()
    ts = inter["timestamp"]
    stats = {
        "dataset": ds.schema.name,
        "interactions": n,
        "users": n_users,
        "items": n_items,
        "active_users": int(inter["user_id"].nunique()),
        "active_items": int((item_counts > 0).sum()),
        "sparsity": 1.0 - n / (n_users * n_items),
        "popularity_gini": gini(item_counts),
        "label_mean": float(inter["label"].mean()),
        "time_start": _iso(ts.min()),
        "time_end": _iso(ts.max()),
        "features": len(ds.schema.features),
    }
    split_dir = Path(path) / "split"
    if split_dir.is_dir():
        for part in PARTS:
            stats[f"{part}_rows"] = pq.ParquetFile(split_dir / f"{part}.parquet").metadata.num_rows
    return stats


def format_stats(stats: dict) -> str:
    """Two aligned columns, numbers with thousands separators."""
    width = max(len(k) for k in stats)
    lines = []
    for key, value in stats.items():
        if isinstance(value, float):
            text = f"{value:.4f}"
        elif isinstance(value, int):
            text = f"{value:,}"
        else:
            text = str(value)
        lines.append(f"{key:<{width}}  {text}")
    return "\n".join(lines)


def _iso(seconds: int) -> str:
    return pd.Timestamp(int(seconds), unit="s", tz="UTC").isoformat()
