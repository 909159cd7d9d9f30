"""Train/valid/test splits of the interaction rows, each deterministic by seed.

Every function returns one code per row: 0 train, 1 valid, 2 test (see `data.dataset.PARTS`).
Ties in time are broken by a seeded random key, so the same seed gives the same split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TRAIN, VALID, TEST = 0, 1, 2
METHODS = ("random", "temporal", "user-temporal", "leave-last")


def split_interactions(interactions: pd.DataFrame, method: str, seed: int, **kwargs) -> np.ndarray:
    """Dispatches to one of `METHODS` by name."""
    if method == "random":
        return random_split(interactions, seed, **kwargs)
    if method == "temporal":
        return temporal_split(interactions, seed, **kwargs)
    if method == "user-temporal":
        return user_temporal_split(interactions, seed, **kwargs)
    if method == "leave-last":
        return leave_last_split(interactions, seed, **kwargs)
    raise ValueError(f"split method {method!r} is not one of {METHODS}")


def temporal_split(interactions: pd.DataFrame, seed: int, valid: float = 0.1, test: float = 0.1) -> np.ndarray:
    """Global time split: the oldest rows train, the newest ``test`` fraction test.

    Every train row is no later than every valid row, and every valid row no later than
    every test row.
    """
    _check_fractions(valid, test)
    n = len(interactions)
    order = np.lexsort((_tiebreak(n, seed), interactions["timestamp"].to_numpy()))
    codes = np.empty(n, dtype=np.int8)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    n_test, n_valid = int(round(n * test)), int(round(n * valid))
    codes[:] = TRAIN
    codes[position >= n - n_test - n_valid] = VALID
    codes[position >= n - n_test] = TEST
    return codes


def leave_last_split(interactions: pd.DataFrame, seed: int, n: int = 1) -> np.ndarray:
    """Per user, the last ``n`` interactions test and the ``n`` before them valid.

    Users with at most ``2 * n`` interactions stay wholly in train, so every user that
    appears in valid or test also has train history.
    """
    if n < 1:
        raise ValueError(f"leave-last n must be >= 1, got {n}")
    users = interactions["user_id"].to_numpy()
    order = np.lexsort((_tiebreak(len(users), seed), interactions["timestamp"].to_numpy(), users))
    from_end, count = _rank_within_group(users[order], reverse=True)
    codes_sorted = np.full(len(users), TRAIN, dtype=np.int8)
    eligible = count > 2 * n
    codes_sorted[eligible & (from_end < 2 * n)] = VALID
    codes_sorted[eligible & (from_end < n)] = TEST
    codes = np.empty_like(codes_sorted)
    codes[order] = codes_sorted
    return codes


def random_split(interactions: pd.DataFrame, seed: int, valid: float = 0.1, test: float = 0.1) -> np.ndarray:
    """Per user, a seeded random ``valid``/``test`` fraction (rounded down) of their rows.

    The rest, at least one row per user, is train.
    """
    users = interactions["user_id"].to_numpy()
    return _per_user_fractions(users, np.lexsort((_tiebreak(len(users), seed), users)), valid, test)


def user_temporal_split(interactions: pd.DataFrame, seed: int, valid: float = 0.1, test: float = 0.1) -> np.ndarray:
    """Per user, in time order: the newest ``test`` fraction (rounded down) of their rows test,
    the ``valid`` fraction before those valid, the rest (at least one row) train.

    Each user's train rows are no later than their valid rows, and those no later than their
    test rows; unlike `temporal_split`, every user in valid or test has train history.
    """
    users = interactions["user_id"].to_numpy()
    order = np.lexsort((_tiebreak(len(users), seed), -interactions["timestamp"].to_numpy(), users))
    return _per_user_fractions(users, order, valid, test)  # newest first within each user


def _per_user_fractions(users: np.ndarray, order: np.ndarray, valid: float, test: float) -> np.ndarray:
    """Codes giving each user's first ``test`` fraction of rows in ``order`` (grouped by user) to
    test and the next ``valid`` fraction to valid, both rounded down."""
    _check_fractions(valid, test)
    rank, count = _rank_within_group(users[order])
    n_valid = np.floor(count * valid).astype(np.int64)
    n_test = np.floor(count * test).astype(np.int64)
    codes_sorted = np.full(len(users), TRAIN, dtype=np.int8)
    codes_sorted[rank < n_valid + n_test] = VALID
    codes_sorted[rank < n_test] = TEST
    codes = np.empty_like(codes_sorted)
    codes[order] = codes_sorted
    return codes


def _rank_within_group(groups_sorted: np.ndarray, reverse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each row inside its run of equal values, and the run's size, per row."""
    n = len(groups_sorted)
    starts = np.flatnonzero(np.r_[True, groups_sorted[1:] != groups_sorted[:-1]])
    sizes = np.diff(np.r_[starts, n])
    count = np.repeat(sizes, sizes)
    rank = np.arange(n) - np.repeat(starts, sizes)
    return (count - 1 - rank if reverse else rank), count


def _tiebreak(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def _check_fractions(valid: float, test: float) -> None:
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise ValueError(f"valid={valid} and test={test} must be fractions in [0, 1) summing to below 1")
