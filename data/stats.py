"""Summary statistics of a canonical dataset (`recstack data stats`)."""

from __future__ import annotations

from pathlib import Path

import duckdb
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
    """Counts, sparsity, item-popularity Gini, time range, label mean and split sizes; the
    interactions are aggregated by DuckDB over the parquet file, not read whole."""
    ds = read_dataset(path, tables=("users", "items"))
    log = Path(path) / "interactions.parquet"
    with duckdb.connect() as con:
        con.read_parquet(str(log)).create_view("log")
        n, active_users, label_mean, start, end = con.execute(
            "SELECT count(*), count(DISTINCT user_id), avg(label), min(timestamp), max(timestamp) FROM log"
        ).fetchall()[0]  # fetchall: DuckDB leaves a fetchone result open on the connection
        counts = con.execute("SELECT item_id, count(*) AS n FROM log GROUP BY item_id").df()
    n_users, n_items = len(ds.users), len(ds.items)
    item_counts = counts.set_index("item_id")["n"].reindex(ds.items["item_id"], fill_value=0).to_numpy()
    stats = {
        "dataset": ds.schema.name,
        "interactions": n,
        "users": n_users,
        "items": n_items,
        "active_users": active_users,
        "active_items": int((item_counts > 0).sum()),
        "sparsity": 1.0 - n / (n_users * n_items),
        "popularity_gini": gini(item_counts),
        "label_mean": label_mean,
        "time_start": _iso(start),
        "time_end": _iso(end),
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
