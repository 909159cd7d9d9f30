"""Drift between a reference sample (e.g. the training data) and a current one (e.g. yesterday's requests).

Per feature, with r_i and c_i the reference's and the current sample's shares of bin i:

    population_stability_index  PSI = sum_i (c_i - r_i) ln(c_i / r_i) over bins cut at the reference's
                                quantiles (a numerical feature)
    categorical_psi             the same sum with one bin per category (a categorical feature)
    ks_statistic                two-sample Kolmogorov-Smirnov D = max_x |F_ref(x) - F_cur(x)| and its
                                asymptotic p-value
    drift_report                all of the above for every column of two DataFrames, with missing shares
    feature_drift               drift_report over a schema's model inputs (multi-hot values exploded),
                                e.g. the training rows against today's (`recstack evaluate drift`)

PSI is the symmetrised Kullback-Leibler divergence between the binned samples: 0 when the shares
agree, larger the more they move. A bin empty in one sample would make ln(c / r) infinite, so an
empty bin's share is taken as ``EMPTY_BIN_SHARE`` = 1e-4: a bin holding a share r of one sample and
nothing of the other then adds about r ln(r / 1e-4), e.g. 0.69 for r = 0.1. Reading of PSI, an
industry rule of thumb from credit scoring (e.g. N. Siddiqi, "Credit Risk Scorecards", Wiley
2006), not a statistical test:

    PSI < 0.1           no significant shift
    0.1 <= PSI < 0.25   a moderate shift: investigate
    PSI >= 0.25         a significant shift: act (e.g. retrain)

The KS p-value is Q(lambda) = 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 lambda^2), the Kolmogorov
distribution's upper tail (`scipy.stats.kstwobign`), at lambda = (sqrt(n_e) + 0.12 + 0.11 / sqrt(n_e)) D
with the effective sample size n_e = n_ref n_cur / (n_ref + n_cur) (Stephens' correction, as in
Numerical Recipes `kstwo`); it assumes continuous values, and with many ties it is conservative. At the 5% level
the large-sample critical D is about 1.358 / sqrt(n_e). With large samples KS flags shifts too
small to matter, which is why the alert rests on PSI.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from data.schema import FeatureSpec
from evaluation.checks import finite_values

EMPTY_BIN_SHARE = 1e-4  # the share an empty bin counts with, so that ln(c / r) stays finite


@dataclass(frozen=True)
class KSResult:
    """The two-sample Kolmogorov-Smirnov statistic D in [0, 1] and its asymptotic p-value."""

    statistic: float
    p_value: float


def population_stability_index(reference: ArrayLike, current: ArrayLike, bins: int = 10) -> float:
    """PSI of a numerical feature over ``bins`` bins cut at the reference's quantiles, both (N,).

    Repeated quantiles (a value taking up more than a bin's share) are cut once, so there may be
    fewer bins. Bin i holds edge[i-1] < x <= edge[i]; values beyond the reference's range go to the
    end bins. A constant reference leaves one bin and PSI 0.
    """
    if isinstance(bins, bool) or not isinstance(bins, int | np.integer) or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    ref = finite_values(reference, "reference", min_count=1)
    cur = finite_values(current, "current", min_count=1)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)))[1:-1]  # inner edges only
    ref_counts = np.bincount(np.searchsorted(edges, ref, side="left"), minlength=len(edges) + 1)
    cur_counts = np.bincount(np.searchsorted(edges, cur, side="left"), minlength=len(edges) + 1)
    return _psi(ref_counts / len(ref), cur_counts / len(cur))


def categorical_psi(reference: ArrayLike, current: ArrayLike) -> float:
    """PSI of a categorical feature with one bin per category of either sample, both (N,).

    A category unseen in the reference has its own bin, of reference share ``EMPTY_BIN_SHARE``.
    """
    ref = _category_shares(reference, "reference")
    cur = _category_shares(current, "current")
    categories = ref.index.union(cur.index, sort=False)
    return _psi(ref.reindex(categories, fill_value=0).to_numpy(), cur.reindex(categories, fill_value=0).to_numpy())


def ks_statistic(reference: ArrayLike, current: ArrayLike) -> KSResult:
    """Two-sample Kolmogorov-Smirnov D of two numerical samples, both (N,), and its asymptotic p-value."""
    ref = np.sort(finite_values(reference, "reference", min_count=1))
    cur = np.sort(finite_values(current, "current", min_count=1))
    points = np.concatenate([ref, cur])  # the empirical CDFs only step at the sample values
    d = np.max(np.abs(np.searchsorted(ref, points, side="right") / len(ref)
                      - np.searchsorted(cur, points, side="right") / len(cur)))
    n_e = len(ref) * len(cur) / (len(ref) + len(cur))
    lam = (np.sqrt(n_e) + 0.12 + 0.11 / np.sqrt(n_e)) * d
    return KSResult(float(d), float(stats.kstwobign.sf(lam)))


def drift_report(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str] | None = None,
                 psi_alert: float = 0.2) -> pd.DataFrame:
    """Drift of each of ``columns`` (default: all of the reference's) from ``reference`` to ``current``.

    One row per column, indexed by name: ``kind`` (numerical for numeric dtypes, otherwise
    categorical: cast integer category codes to ``"category"`` to have them read as categories),
    ``psi``, ``ks_statistic`` and ``ks_p_value`` (NaN for categorical columns), the share of missing
    values in each sample (``missing_reference``, ``missing_current``; missing values are left out
    of the other statistics) and ``alert``: PSI above ``psi_alert`` (see the module docstring for
    how to read PSI). List-valued (multi-hot, sequence) columns are refused: compare their
    exploded values, e.g. ``drift_report(ref[["genres"]].explode("genres"), cur[["genres"]].explode("genres"))``.
    """
    if not (np.isfinite(psi_alert) and psi_alert > 0):
        raise ValueError(f"psi_alert must be a finite PSI > 0, got {psi_alert!r}")
    columns = list(reference.columns) if columns is None else list(columns)
    if not columns:
        raise ValueError("columns is empty; expected at least one column to compare")
    for name, frame in (("reference", reference), ("current", current)):
        absent = [c for c in columns if c not in frame.columns]
        if absent:
            raise ValueError(f"columns {absent} are not in {name}; expected them in both samples")
        if len(frame) == 0:
            raise ValueError(f"{name} has no rows; expected a non-empty sample")
    rows = []
    for column in columns:
        try:
            rows.append(_column_drift(reference[column], current[column]))
        except ValueError as error:
            raise ValueError(f"column {column!r}: {error}") from error
    report = pd.DataFrame(rows, index=pd.Index(columns, name="column"))
    report["alert"] = report["psi"] > psi_alert
    return report


def feature_drift(reference: pd.DataFrame, current: pd.DataFrame, features: list[FeatureSpec],
                  psi_alert: float = 0.2) -> pd.DataFrame:
    """`drift_report` of each feature in ``features`` between two samples of joined rows (e.g.
    `data.encoders.join_features` of two periods' interactions): categorical features as
    categories, numerical ones as numbers, a multi-hot feature over its exploded values (each
    value of each row, e.g. each genre); sequences are left out (their items are the item ids)."""
    rows = []
    for feature in features:
        if feature.kind == "sequence":
            continue
        ref, cur = reference[[feature.name]], current[[feature.name]]
        if feature.kind == "multi_hot":
            ref, cur = ref.explode(feature.name), cur.explode(feature.name)
        if feature.kind != "numerical":
            ref, cur = ref.astype("string"), cur.astype("string")  # integer codes are categories too
        rows.append(drift_report(ref, cur, psi_alert=psi_alert))
    if not rows:
        raise ValueError(f"features {[f.name for f in features]} are all sequences; expected some to compare")
    return pd.concat(rows)


def _column_drift(reference: pd.Series, current: pd.Series) -> dict:
    kinds = {name: "numerical" if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
             else "categorical" for name, s in (("reference", reference), ("current", current))}
    if kinds["reference"] != kinds["current"]:
        raise ValueError(f"it is {kinds['reference']} ({reference.dtype}) in reference but {kinds['current']} "
                         f"({current.dtype}) in current; expected the same kind in both")
    ref, cur = reference.dropna().to_numpy(), current.dropna().to_numpy()
    if kinds["reference"] == "numerical":
        psi, ks = population_stability_index(ref, cur), ks_statistic(ref, cur)
    else:
        psi, ks = categorical_psi(ref, cur), KSResult(np.nan, np.nan)
    return {"kind": kinds["reference"], "psi": psi, "ks_statistic": ks.statistic, "ks_p_value": ks.p_value,
            "missing_reference": float(reference.isna().mean()), "missing_current": float(current.isna().mean())}


def _psi(ref_shares: np.ndarray, cur_shares: np.ndarray) -> float:
    r = np.where(ref_shares == 0, EMPTY_BIN_SHARE, ref_shares)
    c = np.where(cur_shares == 0, EMPTY_BIN_SHARE, cur_shares)
    return float(np.sum((c - r) * np.log(c / r)))


def _category_shares(values: ArrayLike, name: str) -> pd.Series:
    """The share of each category of (N,) ``values``, which must be hashable and not missing."""
    series = pd.Series(values)
    if len(series) == 0:
        raise ValueError(f"{name} is empty; expected at least one value")
    missing = series.isna().to_numpy()
    if missing.any():
        raise ValueError(f"{name} holds {int(missing.sum())} missing values, the first at rows "
                         f"{np.flatnonzero(missing)[:5].tolist()}; expected categories (drop missing values first)")
    shares = series.value_counts(normalize=True)
    unhashable = [v for v in shares.index if not pd.api.types.is_hashable(v)]  # one check per category
    if unhashable:
        raise ValueError(f"{name} holds unhashable values such as {unhashable[0]!r}; expected scalar categories "
                         "(explode multi-hot and sequence values first)")
    return shares
