"""The canonical dataset directory that everything downstream reads.

    DIR/
      interactions.parquet   user_id, item_id, timestamp, label, [rating, weight, context...]
      users.parquet          user_id + features
      items.parquet          item_id, category, available, moderated, created_at + features
      schema.json            feature kinds, vocabulary sizes or hashing, embedding dims
      split/{train,valid,test}.parquet   the interaction rows of each part
      encoders.json, encoded/            with a split and fitted encoders: the encoders and each part
                                         encoded for training (see `data.encoded`)
      [extra files a source adds, e.g. ground_truth.npz for synthetic data]

A directory is written into a temporary sibling and renamed into place at the end, so a
failure at any point leaves no directory (or the previous one) behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from data.schema import Schema
from data.tables import INTERACTIONS, ITEMS, KEYS, USERS, DataError, check_table

PARTS = ("train", "valid", "test")


@dataclass
class Dataset:
    """Canonical tables; ``split`` holds 0/1/2 (train/valid/test) per interaction row."""

    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    schema: Schema
    split: np.ndarray | None = None
    extras: dict[str, Callable[[Path], None]] = field(default_factory=dict)

    def part(self, name: str) -> pd.DataFrame:
        if self.split is None:
            raise ValueError(f"dataset {self.schema.name!r} has no split")
        return self.interactions[self.split == PARTS.index(name)]

    def check(self) -> Dataset:
        """Checks the canonical columns of all three tables and that ids resolve."""
        name = self.schema.name
        self.interactions = check_table(self.interactions, f"{name}: interactions", INTERACTIONS)
        self.users = check_table(self.users, f"{name}: users", USERS, key=KEYS["users"])
        self.items = check_table(self.items, f"{name}: items", ITEMS, key=KEYS["items"])
        for key, table in (("user_id", self.users), ("item_id", self.items)):
            unknown = ~self.interactions[key].isin(table[key]).to_numpy()
            if unknown.any():
                first = self.interactions[key].to_numpy()[unknown][:5].tolist()
                raise DataError(
                    f"{name}: interactions: {int(unknown.sum())} rows have a {key} missing from the "
                    f"{key.split('_')[0]}s table, e.g. {first}"
                )
        if self.split is not None and len(self.split) != len(self.interactions):
            raise ValueError(f"split has {len(self.split)} codes for {len(self.interactions)} interactions")
        return self


def write_dataset(ds: Dataset, out: Path, overwrite: bool = False) -> Path:
    """Writes ``ds`` to ``out`` atomically and returns ``out``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ds.interactions.to_parquet(tmp / "interactions.parquet", index=False)
        ds.users.to_parquet(tmp / "users.parquet", index=False)
        ds.items.to_parquet(tmp / "items.parquet", index=False)
        ds.schema.save(tmp / "schema.json")
        if ds.split is not None:
            (tmp / "split").mkdir()
            for part in PARTS:
                ds.part(part).to_parquet(tmp / "split" / f"{part}.parquet", index=False)
        for write in ds.extras.values():
            write(tmp)
        if ds.split is not None and (tmp / "encoders.json").is_file():
            from data.encoded import ENCODED, write_encoded  # it reads datasets: imported here, not at the top

            write_encoded(tmp, tmp / ENCODED)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Renames ``new`` to ``out``; an existing ``out`` is moved aside first and removed after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_dataset(path: Path, tables: tuple[str, ...] = ("interactions", "users", "items")) -> Dataset:
    """Reads the named tables of a canonical dataset directory; split parts come from `read_part`."""
    path = Path(path)
    if not (path / "schema.json").is_file():
        raise DataError(f"{path}: not a recstack dataset (no schema.json)")
    frames = {t: pd.read_parquet(path / f"{t}.parquet") if t in tables else pd.DataFrame() for t in
              ("interactions", "users", "items")}
    return Dataset(frames["interactions"], frames["users"], frames["items"], Schema.load(path / "schema.json"))


def read_part(path: Path, part: str) -> pd.DataFrame:
    """The interaction rows of one split part (train, valid or test)."""
    if part not in PARTS:
        raise ValueError(f"split part {part!r} is not one of {PARTS}")
    file = Path(path) / "split" / f"{part}.parquet"
    if not file.is_file():
        raise DataError(f"{path}: no split part {part!r} ({file} is missing)")
    return pd.read_parquet(file)
