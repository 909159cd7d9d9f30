"""`FeatureColumns`: rows of named feature columns as aligned arrays, without a frame.

The request path reads item features from the store, joins the request's own to them and
encodes them for the models (`data.encoders.FeatureEncoder.encode`) in this form: a pandas
frame per request cost more than the store reads it held.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pandas as pd


class FeatureColumns:
    """``rows`` (N) rows of named columns: ``arrays`` maps each name to an (N,) array, a numpy
    array (objects for text, lists and missing values; NaN for a missing float) or a pandas
    masked array (integers and booleans with missing values). The columnar twin of a frame:
    `FeatureEncoder.encode` takes either, and ``to_frame`` gives the frame of the same rows."""

    def __init__(self, columns: Mapping[str, np.ndarray | pd.api.extensions.ExtensionArray], rows: int) -> None:
        wrong = {name: len(column) for name, column in columns.items() if len(column) != rows}
        if wrong:
            raise ValueError(f"columns {wrong} differ in length from the {rows} rows")
        self.arrays, self.rows = dict(columns), rows

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> FeatureColumns:
        """The columns of ``frame``: its numpy arrays, or its extension arrays (masked, categorical)."""
        return cls({name: frame[name].array if isinstance(frame[name].dtype, pd.api.extensions.ExtensionDtype)
                    else frame[name].to_numpy() for name in frame.columns}, len(frame))

    @classmethod
    def from_values(cls, rows: list[dict[str, object]]) -> FeatureColumns:
        """Rows of values by column name (each row naming the same columns) as columns, each typed
        as pandas types the column of a one-row frame, then concatenated: Python numbers of one
        kind as int64, float64 or bool; text, lists and None as objects."""
        names = list(rows[0]) if rows else []
        odd = [row for row in rows if list(row) != names]
        if odd:
            raise ValueError(f"a row names the columns {list(odd[0])}; expected those of the first row, {names}")
        return cls({name: _column([row[name] for row in rows]) for name in names}, len(rows))

    def __len__(self) -> int:
        return self.rows

    def __contains__(self, name: object) -> bool:
        return name in self.arrays

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays)

    def __getitem__(self, name: str) -> np.ndarray | pd.api.extensions.ExtensionArray:
        return self.arrays[name]

    def take(self, positions: np.ndarray) -> FeatureColumns:
        """The rows at ``positions`` (an int array or a boolean mask), in that order."""
        positions = np.asarray(positions)
        if positions.dtype == bool:
            positions = np.flatnonzero(positions)
        return FeatureColumns({name: column.take(positions) for name, column in self.arrays.items()}, len(positions))

    def select(self, names: list[str]) -> FeatureColumns:
        """Only the columns ``names``, in that order."""
        return FeatureColumns({name: self.arrays[name] for name in names}, self.rows)

    def to_frame(self) -> pd.DataFrame:
        """The rows as a frame, index 0..N-1."""
        return pd.DataFrame(self.arrays, index=pd.RangeIndex(self.rows), copy=False)


def _column(values: list) -> np.ndarray:
    """`FeatureColumns.from_values`' typing of one column's values."""
    kinds = set(map(type, values))
    if kinds in ({int}, {float}, {bool}):
        return np.array(values)
    if kinds <= {str, list, tuple, type(None)}:
        column = np.empty(len(values), object)
        for i, value in enumerate(values):  # one by one: a list stays one cell
            column[i] = value
        return column
    return np.concatenate([pd.Series([value]).to_numpy() for value in values])  # numpy scalars, mixed kinds


def equal_to(column: np.ndarray | pd.api.extensions.ExtensionArray, value: object) -> np.ndarray:
    """(N,) bool: where a column of `FeatureColumns` holds ``value``; a missing value never does."""
    equal = column == value
    if isinstance(equal, pd.api.extensions.ExtensionArray):  # a masked column: NA where it is missing
        return equal.to_numpy(bool, na_value=False)
    return np.asarray(equal, bool)
