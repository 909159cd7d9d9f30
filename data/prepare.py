"""`recstack data prepare`: load a source, check it, split it, fit encoders, write the directory
with its encoded parts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from data.dataset import Dataset, write_dataset
from data.encoders import FeatureEncoder
from data.splits import split_interactions


def prepare(ds: Dataset, out: Path, split: str = "random", seed: int = 2020, overwrite: bool = False,
            positive_rating: float | None = None) -> Path:
    """Writes ``ds`` as a canonical dataset at ``out`` with a split and encoders fitted on train.

    With ``positive_rating`` the label becomes ``rating >= positive_rating`` (explicit ratings as
    a click-through task). Nothing is written unless every check passes; the write is atomic.
    """
    ds.check()
    if positive_rating is not None:
        if "rating" not in ds.interactions.columns:
            raise ValueError(f"positive_rating={positive_rating} needs a rating column; {ds.schema.name!r} has none")
        ds.interactions["label"] = (ds.interactions["rating"] >= positive_rating).astype("float32")
    ds.split = split_interactions(ds.interactions, split, seed)
    encoder = FeatureEncoder.fit(ds.schema, ds.part("train"), ds.users, ds.items)
    ds.schema = replace(encoder.schema, split={"method": split, "seed": seed})
    ds.extras["encoders"] = lambda d: encoder.save(d / "encoders.json")
    return write_dataset(ds, out, overwrite=overwrite)
