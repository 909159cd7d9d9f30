"""A synthetic dataset whose click probabilities are known exactly.

The generator draws hidden parameters (the `GroundTruth`) and then a log of exposures:

    user   segment centre + noise -> start taste; the end taste keeps (1 - drift) of it,
           and the taste u(t) moves in a straight line from start to end over the period
    item   category centre + noise -> factor v_i; bias falls with log price, so a cold
           item's category and price carry signal
    exposure  user ~ lognormal activity, item ~ Zipf popularity over a random order,
              timestamp uniform in the item's availability window (created .. removed)
    click  ~ Bernoulli(sigmoid(SCALE * <u(t), v_i> + item_bias_i + GLOBAL_BIAS))

The log is drawn one time slice at a time, so it never exists whole: the period is cut into
``ceil(interactions / LOG_CHUNK)`` equal slices, and a slice holds item i with weight
popularity_i x (seconds of i's window inside the slice) / (seconds of i's window). The slice
sizes are one multinomial draw of all the exposures; each slice then draws its exposures from
its own weights with its own generator (seeded by the seed and the slice's number) and sorts
them by time. Every row is still an independent exposure, and the log is in timestamp order.

Ids are the ground truth's row indices: ``user_id == user_idx`` and ``item_id == item_idx``,
both 0-based. Interactions carry ``click_prob`` (the true p(click | exposed)) and
``exposure_prob`` (the probability that an exposure drew that item). Items never removed
have ``removed_at == NOT_REMOVED``. The Bayes-optimal AUC of any rows is
``evaluation.metrics.auc(rows.label, rows.click_prob)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from data.dataset import Dataset
from data.schema import FeatureSpec, Schema

START = 1_704_067_200  # 2024-01-01 00:00:00 UTC
DAY = 86_400
NOT_REMOVED = -1
GROUND_TRUTH_FILE = "ground_truth.npz"
CHUNK = 1 << 20  # rows per block in click_probability, bounds its memory to ~200 MB
LOG_CHUNK = 1 << 20  # exposures per time slice of the log, on average

# Chosen so the click rate is ~20% and ranking by the true probability gives AUC ~0.78.
SCALE = 1.2
GLOBAL_BIAS = -1.8
SEGMENTS = 8
COUNTRIES = np.array(["US", "IN", "BR", "GB", "DE", "FR", "JP", "MX", "CA", "ES"], dtype=object)
CHURN = 0.2  # share of items removed during the period
MODERATED = 0.02


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes and shape of the generated data; ``drift`` = 1 - corr(start taste, end taste)."""

    users: int = 1000
    items: int = 500
    interactions: int = 20000
    seed: int = 0
    dim: int = 16
    categories: int = 20
    days: int = 90
    zipf: float = 1.1
    drift: float = 0.5

    def __post_init__(self) -> None:
        for name in ("users", "items", "interactions", "dim", "categories", "days"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 1 <= value < 2**31:
                raise ValueError(f"SyntheticConfig.{name} must be an integer in [1, 2**31), got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"SyntheticConfig.seed must be an integer >= 0, got {self.seed!r}")
        if not self.zipf >= 0:
            raise ValueError(f"SyntheticConfig.zipf must be >= 0 (0 is uniform), got {self.zipf!r}")
        if not 0 <= self.drift <= 1:
            raise ValueError(f"SyntheticConfig.drift must be in [0, 1], got {self.drift!r}")


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """The generator's hidden parameters; rows are user_idx / item_idx (== the ids).

    user_start, user_end: (U, D) float32 tastes at the period's start and end
    item_factors: (I, D) float32; item_bias: (I,) float32
    popularity: (I,) float64, the exposure distribution over items (sums to 1)
    """

    user_start: np.ndarray
    user_end: np.ndarray
    item_factors: np.ndarray
    item_bias: np.ndarray
    popularity: np.ndarray
    start: int
    seconds: int
    scale: float
    global_bias: float

    def click_probability(self, user_idx: np.ndarray, item_idx: np.ndarray,
                          timestamp: np.ndarray) -> np.ndarray:
        """Exact p(click | exposed), float32, for inputs that broadcast to one shape.

        Taste before the period is the start taste and after it the end taste.
        """
        users, items, times = np.broadcast_arrays(user_idx, item_idx, timestamp)
        _check_index("user_idx", users, len(self.user_start))
        _check_index("item_idx", items, len(self.item_factors))
        shape = users.shape
        users, items, times = users.ravel(), items.ravel(), times.ravel()
        out = np.empty(len(users), dtype=np.float32)
        for lo in range(0, len(out), CHUNK):
            u, i = users[lo:lo + CHUNK], items[lo:lo + CHUNK]
            frac = np.clip((times[lo:lo + CHUNK] - self.start) / self.seconds, 0, 1).astype(np.float32)
            v = self.item_factors[i]  # (n, D)
            # <u(t), v> is linear in t, so interpolate the two dot products, not the tastes
            at_start = np.einsum("nd,nd->n", self.user_start[u], v)
            at_end = np.einsum("nd,nd->n", self.user_end[u], v)
            logit = self.scale * (at_start + frac * (at_end - at_start)) + self.item_bias[i] + self.global_bias
            out[lo:lo + CHUNK] = 1 / (1 + np.exp(-logit))
        return out.reshape(shape)

    def save(self, path: Path) -> None:
        np.savez(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> GroundTruth:
        with np.load(path) as npz:
            values = {f.name: npz[f.name] for f in fields(cls)}
        return cls(**{k: v if v.ndim else v.item() for k, v in values.items()})


def load_ground_truth(dataset_dir: Path) -> GroundTruth:
    """The ground truth saved beside a synthetic dataset's tables."""
    path = Path(dataset_dir) / GROUND_TRUTH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{dataset_dir}: no {GROUND_TRUTH_FILE}; is it a synthetic dataset?")
    return GroundTruth.load(path)


def generate(config: SyntheticConfig) -> Dataset:
    """Users, items and a timestamp-sorted exposure log, drawn slice by slice as it is read (the
    Dataset's ``log``); ground truth in ``extras``."""
    # one stream per table, so the same seed gives the same users and items at any log size
    user_rng, item_rng = map(np.random.default_rng, np.random.SeedSequence(config.seed).spawn(2))
    users, user_start, user_end, activity = _draw_users(user_rng, config)
    items, item_factors, item_bias, popularity = _draw_items(item_rng, config)
    truth = GroundTruth(user_start, user_end, item_factors, item_bias, popularity,
                        START, config.days * DAY, SCALE, GLOBAL_BIAS)
    features = (
        FeatureSpec("user_id", "users", "categorical"),
        FeatureSpec("segment", "users", "categorical"),
        FeatureSpec("age", "users", "numerical", buckets=8),
        FeatureSpec("country", "users", "categorical"),
        FeatureSpec("item_id", "items", "categorical"),
        FeatureSpec("category", "items", "categorical"),
        FeatureSpec("price", "items", "numerical", buckets=8),
    )
    schema = Schema("synthetic", features, source={"generator": "data.synthetic", "config": asdict(config)})
    return Dataset(lambda: _draw_log(config, truth, activity, items), users, items, schema,
                   extras={"ground_truth": lambda d: truth.save(Path(d) / GROUND_TRUTH_FILE)})


def _check_index(name: str, idx: np.ndarray, size: int) -> None:
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        raise ValueError(f"{name} must be in [0, {size}), got values in [{idx.min()}, {idx.max()}]")


def _draw_users(rng: np.random.Generator, config: SyntheticConfig):
    """Users table, start and end tastes (U, D) with E|u|^2 ~ 1, and activity weights."""
    n, dim = config.users, config.dim
    centres = rng.standard_normal((SEGMENTS, dim), dtype=np.float32)

    def taste() -> tuple[np.ndarray, np.ndarray]:
        segment = rng.integers(SEGMENTS, size=n)
        noise = rng.standard_normal((n, dim), dtype=np.float32)
        return segment, (centres[segment] + noise) / np.float32(np.sqrt(2 * dim))

    segment, start = taste()
    _, target = taste()  # where the user drifts to: a fresh draw from the population
    keep = np.float32(1 - config.drift)
    end = keep * start + np.sqrt(1 - keep**2, dtype=np.float32) * target
    segment_age = rng.uniform(22, 55, SEGMENTS)
    country_share = 1 / np.arange(1, len(COUNTRIES) + 1)
    users = pd.DataFrame({
        "user_id": np.arange(n, dtype=np.int64),
        "segment": np.array([f"segment_{k}" for k in range(SEGMENTS)], dtype=object)[segment],
        "age": np.clip(np.round(segment_age[segment] + rng.normal(0, 8, n)), 18, 80).astype(np.int64),
        "country": COUNTRIES[rng.choice(len(COUNTRIES), n, p=country_share / country_share.sum())],
    })
    return users, start, end, rng.lognormal(0, 1, n)


def _draw_items(rng: np.random.Generator, config: SyntheticConfig):
    """Items table, factors (I, D) with E v_d^2 ~ 1, biases and popularity."""
    n, dim, end = config.items, config.dim, START + config.days * DAY
    centres = rng.standard_normal((config.categories, dim), dtype=np.float32)
    category = rng.integers(config.categories, size=n)
    noise = rng.standard_normal((n, dim), dtype=np.float32)
    factors = (centres[category] + noise) / np.float32(np.sqrt(2))
    log_price = rng.normal(3, 0.7, config.categories)[category] + rng.normal(0, 0.5, n)
    bias = (0.5 * (3 - log_price) + rng.normal(0, 0.3, n)).astype(np.float32)  # cheaper: more clicks
    weights = (rng.permutation(n) + 1.0) ** -config.zipf
    # half the items exist before the period; the rest appear up to a day before its end
    created = np.where(rng.random(n) < 0.5,
                       START - rng.uniform(0, 365 * DAY, n),
                       START + rng.uniform(0, (config.days - 1) * DAY, n)).astype(np.int64)
    live = np.maximum(created, START)
    removed = np.where(rng.random(n) < CHURN,
                       live + 3600 + rng.uniform(0, 1, n) * (end - live - 3600),
                       NOT_REMOVED).astype(np.int64)
    items = pd.DataFrame({
        "item_id": np.arange(n, dtype=np.int64),
        "title": np.array([f"item {i}" for i in range(n)], dtype=object),  # a name to show, not a feature
        "category": np.array([f"category_{k}" for k in range(config.categories)], dtype=object)[category],
        "available": removed == NOT_REMOVED,
        "moderated": rng.random(n) < MODERATED,
        "created_at": created,
        "removed_at": removed,
        "price": np.round(np.exp(log_price), 2).astype(np.float32),
        "inventory": rng.geometric(0.05, n) - 1,
    })
    return items, factors, bias, weights / weights.sum()


def _draw_log(config: SyntheticConfig, truth: GroundTruth, activity: np.ndarray,
              items: pd.DataFrame) -> Iterator[pd.DataFrame]:
    """The exposure log, one time slice per frame (see the module doc)."""
    n, end = config.interactions, START + config.days * DAY
    removed = items["removed_at"].to_numpy()
    opens = np.maximum(items["created_at"].to_numpy(), START)
    closes = np.where(removed == NOT_REMOVED, end, removed)  # >= opens + 1 hour by construction
    per_second = truth.popularity / (closes - opens)
    slices = -(-n // LOG_CHUNK)
    edges = START + np.arange(slices + 1) * (end - START) // slices

    def inside(s: int) -> tuple[np.ndarray, np.ndarray]:
        """Where each item's window enters slice ``s``, and its seconds inside (I,) each."""
        lo = np.maximum(opens, edges[s])
        return lo, np.maximum(np.minimum(closes, edges[s + 1]) - lo, 0)

    mass = np.array([per_second @ inside(s)[1] for s in range(slices)])
    sizes = _log_rng(config, 0).multinomial(n, mass / mass.sum())
    user_share = activity / activity.sum()
    for s in np.flatnonzero(sizes):
        rng, size = _log_rng(config, s + 1), sizes[s]
        lo, seconds = inside(s)
        weight = per_second * seconds
        # size iid draws as counts per id (~15x faster than rng.choice); the users are shuffled
        # and the rows put in timestamp order below, so each row is still an independent draw
        item = np.repeat(np.arange(config.items), rng.multinomial(size, weight / weight.sum()))
        user = rng.permutation(np.repeat(np.arange(config.users), rng.multinomial(size, user_share)))
        timestamp = lo[item] + (rng.random(size) * seconds[item]).astype(np.int64)
        order = np.argsort(timestamp, kind="stable")
        user, item, timestamp = user[order], item[order], timestamp[order]
        click_prob = truth.click_probability(user, item, timestamp)
        yield pd.DataFrame({
            "user_id": user,
            "item_id": item,
            "timestamp": timestamp,
            "label": (rng.random(size, dtype=np.float32) < click_prob).astype(np.float32),
            "click_prob": click_prob,
            "exposure_prob": truth.popularity[item].astype(np.float32),
        }, copy=False)


def _log_rng(config: SyntheticConfig, k: int) -> np.random.Generator:
    """The log's k-th generator: a child of the third stream `generate` spawns from the seed."""
    return np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(2, k)))
