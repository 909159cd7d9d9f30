"""`recstack data prepare`: load a source, check it, split it, fit encoders, write the directory."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from data.dataset import Dataset, write_dataset
from data.encoders import FeatureEncoder
from data.splits import split_interactions


def prepare(ds: Dataset, out: Path, split: str = "random", seed: int = 2020, overwrite: bool = False) -> Path:
    """Writes ``ds`` as a canonical dataset at ``out`` with a split and encoders fitted on train.

    Nothing is written unless every check passes; the write itself is atomic.
    """
    ds.check()
    ds.split = split_interactions(ds.interactions, split, seed)
    encoder = FeatureEncoder.fit(ds.schema, ds.part("train"), ds.users, ds.items)
    ds.schema = replace(encoder.schema, split={"method": split, "seed": seed})
    ds.extras["encoders"] = lambda d: encoder.save(d / "encoders.json")
    return write_dataset(ds, out, overwrite=overwrite)
