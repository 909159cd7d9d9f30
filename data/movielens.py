"""MovieLens as a canonical dataset.

`load_ml100k` reads the ML-100K copy inside RecBole's wheel (its tab-separated "atomic"
files). `load_movielens` reads a raw GroupLens download and picks the layout by the name of
the ratings file:

    u.data       ML-100K      tab separated; u.user and u.item are `|` separated, u.item is
                              latin-1 with 19 genre flags
    ratings.dat  ML-1M, 10M   `::` separated; optional users.dat and movies.dat
    ratings.csv  ML-20M, 25M  header userId,movieId,rating,timestamp; optional movies.csv

Every rating is an implicit positive: ``label`` is 1.0 and the stars stay in ``rating``.
Interactions are sorted by user, then time (ties keep file order). The ``recent_items``
sequence feature is declared in the schema but not stored: training and serving build it
from the history they are allowed to see (`data.encoders.recent_items`).
``year`` is float32, NaN where the title has no year (in RecBole's ML-100K: item 267, whose
title and year read "unkonwn", and item 1412, whose year reads "V"). ``category`` is the
first genre. An item's ``created_at`` is its first rating; items nobody rated get the last
rating time. Without user or movie files the users and items tables hold only the ids.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

from data.dataset import Dataset
from data.fetch import fetch_wheel_folder
from data.schema import FeatureSpec, Schema
from data.tables import Column, DataError, check_table, read_table

RECENT_ITEMS = 20
RATINGS_FILES = ("u.data", "ratings.dat", "ratings.csv")
GENRES_100K = np.array(
    ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
     "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
     "Romance", "Sci-Fi", "Thriller", "War", "Western"],
    dtype=object,
)  # the order of u.item's flags

RATINGS = (
    Column("user_id", "int"),
    Column("item_id", "int"),
    Column("rating", "float"),
    Column("timestamp", "time"),
)
USERS = (
    Column("user_id", "int"),
    Column("age", "int"),
    Column("gender", "str"),
    Column("occupation", "str"),
    Column("zip_code", "str"),
)
MOVIES = (Column("item_id", "int"), Column("title", "str"), Column("genres", "str"))

FEATURES = (
    FeatureSpec("user_id", "users", "categorical"),
    FeatureSpec("age", "users", "numerical", buckets=8),
    FeatureSpec("gender", "users", "categorical"),
    FeatureSpec("occupation", "users", "categorical"),
    FeatureSpec("zip_prefix", "users", "categorical"),
    FeatureSpec("item_id", "items", "categorical"),
    FeatureSpec("genres", "items", "multi_hot"),
    FeatureSpec("year", "items", "numerical", buckets=8),
    FeatureSpec("hour", "interactions", "categorical"),
    FeatureSpec("weekday", "interactions", "categorical"),
    FeatureSpec("recent_items", "interactions", "sequence", max_len=RECENT_ITEMS, source="item_id"),
)


def load_ml100k() -> Dataset:
    """MovieLens-100K from the recbole 1.2.1 wheel: 100,000 ratings, 943 users, 1,682 items."""
    folder = fetch_wheel_folder("recbole", "1.2.1", "recbole/dataset_example/ml-100k")
    ratings = read_atomic(folder / "ml-100k.inter", RATINGS)
    users = read_atomic(folder / "ml-100k.user", USERS, key="user_id")
    items = read_atomic(
        folder / "ml-100k.item",
        MOVIES,
        key="item_id",
        rename={"movie_title": "title", "release_year": "year", "class": "genres"},
    )
    items["year"] = pd.to_numeric(items["year"], errors="coerce").astype("float32")
    items["genres"] = items["genres"].str.split(" ")
    source = {"package": "recbole==1.2.1", "folder": "recbole/dataset_example/ml-100k"}
    return build_dataset("ml-100k", ratings, users, items, source)


def load_movielens(path: Path) -> Dataset:
    """Raw MovieLens from a ratings file or the folder holding it (layouts in the module doc)."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in RATINGS_FILES if (path / name).is_file()]
        if not found:
            raise DataError(f"{path}: no MovieLens ratings file; expected one of {list(RATINGS_FILES)}")
        path = found[0]
    elif not path.is_file():
        raise DataError(f"{path}: no such file or folder")
    folder = path.parent
    if path.name == "u.data":
        ratings, users, items = read_100k_files(folder)
    elif path.name == "ratings.dat":
        ratings, users, items = read_dat_files(folder)
    elif path.name == "ratings.csv":
        ratings, users, items = read_csv_files(folder)
    else:
        raise DataError(f"{path}: not a MovieLens ratings file; expected one of {list(RATINGS_FILES)}")
    source = {"path": str(path), "layout": path.name}
    return build_dataset(folder.resolve().name, ratings, users, items, source)


def read_atomic(
    path: Path, columns: tuple[Column, ...], key: str | None = None, rename: dict | None = None
) -> pd.DataFrame:
    """Reads a RecBole atomic file (header ``name:type``, tab separated) and checks ``columns``."""
    df = read_delimited(path, "\t", header=0, text=True)
    df = df.rename(columns=lambda c: c.split(":")[0]).rename(columns=rename or {})
    return check_table(df, str(path), columns, key=key)


def read_100k_files(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """u.data with u.user and u.item where present."""
    ratings = read_raw(folder / "u.data", "\t", ["user_id", "item_id", "rating", "timestamp"], RATINGS)
    users = items = None
    if (folder / "u.user").is_file():
        fields = ["user_id", "age", "gender", "occupation", "zip_code"]
        users = read_raw(folder / "u.user", "|", fields, USERS, key="user_id", text=True)
    if (folder / "u.item").is_file():
        fields = ["item_id", "title", "release_date", "video_release_date", "imdb_url", *GENRES_100K]
        checks = (*MOVIES[:2], *(Column(genre, "bool") for genre in GENRES_100K))
        raw = read_raw(folder / "u.item", "|", fields, checks, key="item_id", text=True)
        flags = raw[list(GENRES_100K)].to_numpy(bool)
        raw["genres"] = [GENRES_100K[row].tolist() for row in flags]
        items = split_title(raw[["item_id", "title", "genres"]])
    return ratings, users, items


def read_dat_files(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame | None]:
    """ratings.dat with users.dat and movies.dat where present.

    ratings.dat is read with the C parser splitting on single colons, which leaves an empty
    field between each pair of values (the python parser, which takes ``::``, is ~10x slower).
    """
    fields = ["user_id", "_", "item_id", "__", "rating", "___", "timestamp"]
    ratings = read_raw(folder / "ratings.dat", ":", fields, RATINGS)
    ratings = ratings[["user_id", "item_id", "rating", "timestamp"]]
    users = items = None
    if (folder / "users.dat").is_file():
        fields = ["user_id", "gender", "age", "occupation", "zip_code"]
        users = read_raw(folder / "users.dat", "::", fields, USERS, key="user_id", text=True)
    if (folder / "movies.dat").is_file():
        fields = ["item_id", "title", "genres"]
        movies = read_raw(folder / "movies.dat", "::", fields, MOVIES, key="item_id", text=True)
        movies["genres"] = movies["genres"].str.split("|")
        items = split_title(movies)
    return ratings, users, items


def read_csv_files(folder: Path) -> tuple[pd.DataFrame, None, pd.DataFrame | None]:
    """ratings.csv with movies.csv where present; these layouts have no user file."""
    file = folder / "ratings.csv"
    mapping = {"user_id": "userId", "item_id": "movieId", "rating": "rating", "timestamp": "timestamp"}
    ratings = check_table(read_table(file, mapping)[list(mapping)], str(file), RATINGS)
    items = None
    if (folder / "movies.csv").is_file():
        file = folder / "movies.csv"
        movies = read_table(file, {"item_id": "movieId", "title": "title", "genres": "genres"})
        movies = check_table(movies, str(file), MOVIES, key="item_id")
        movies["genres"] = movies["genres"].str.split("|")
        items = split_title(movies[["item_id", "title", "genres"]])
    return ratings, None, items


def read_raw(
    path: Path,
    sep: str,
    fields: list[str],
    columns: tuple[Column, ...],
    key: str | None = None,
    text: bool = False,
) -> pd.DataFrame:
    """Reads a header-less ``sep``-separated file into ``fields`` and checks ``columns``.

    ``text`` reads every field as a string (so zip codes keep leading zeros) and decodes
    latin-1 when the file is not UTF-8; the checks then convert ids and numbers.
    """
    df = read_delimited(path, sep, header=None, text=text)
    if df.shape[1] != len(fields):
        raise DataError(
            f"{path}: expected {len(fields)} fields separated by {sep!r} ({', '.join(fields)}), "
            f"found {df.shape[1]} in the first line"
        )
    df.columns = fields
    return check_table(df, str(path), columns, key=key)


def read_delimited(path: Path, sep: str, header: int | None, text: bool) -> pd.DataFrame:
    """pandas.read_csv without quoting or NA words, raising DataError for unreadable files."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return pd.read_csv(
            path,
            sep=sep,
            header=header,
            engine="python" if len(sep) > 1 else "c",
            dtype=str if text else None,
            encoding=detect_encoding(path) if text else "utf-8",
            quoting=csv.QUOTE_NONE,
            keep_default_na=False,
            na_values=[""],
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as {sep!r}-separated text: {e}") from e


def detect_encoding(path: Path) -> str:
    """UTF-8 when the file decodes as UTF-8, else latin-1 (ML-100K's u.item, ML-1M's movies.dat)."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return "latin-1"
    return "utf-8"


def split_title(movies: pd.DataFrame) -> pd.DataFrame:
    """'Toy Story (1995)' -> title 'Toy Story', year 1995.0; without a trailing year, NaN."""
    parts = movies["title"].str.extract(r"^(.*?)\s*\((\d{4})\)\s*$")
    out = movies.copy()
    out["title"] = parts[0].fillna(movies["title"].str.strip())
    out["year"] = pd.to_numeric(parts[1]).astype("float32")
    return out[["item_id", "title", "year", "genres"]]


def build_dataset(
    name: str,
    ratings: pd.DataFrame,
    users: pd.DataFrame | None,
    items: pd.DataFrame | None,
    source: dict,
) -> Dataset:
    """Canonical tables from checked ratings, users and movies; the schema keeps the features present."""
    interactions = build_interactions(ratings)
    users = build_users(users, interactions)
    items = build_items(items, interactions)
    tables = {"interactions": interactions, "users": users, "items": items}
    features = tuple(f for f in FEATURES if f.kind == "sequence" or f.name in tables[f.table].columns)
    return Dataset(interactions, users, items, Schema(name, features, source={"loader": "movielens", **source}))


def build_interactions(ratings: pd.DataFrame) -> pd.DataFrame:
    """Sorts by user and time; adds label 1.0, float32 rating, UTC hour and weekday."""
    order = np.lexsort((ratings["timestamp"].to_numpy(), ratings["user_id"].to_numpy()))  # stable
    df = ratings.iloc[order].reset_index(drop=True)
    time = pd.to_datetime(df["timestamp"], unit="s", utc=True)
    df["label"] = np.ones(len(df), dtype="float32")
    df["rating"] = df["rating"].astype("float32")
    df["hour"] = time.dt.hour
    df["weekday"] = time.dt.weekday  # Monday is 0
    return df[["user_id", "item_id", "timestamp", "label", "rating", "hour", "weekday"]]


def build_users(users: pd.DataFrame | None, interactions: pd.DataFrame) -> pd.DataFrame:
    """user_id, age, gender, occupation, zip_prefix (first 3 characters); ids only without a file."""
    if users is None:
        return pd.DataFrame({"user_id": np.unique(interactions["user_id"])})
    out = users.copy()
    out["zip_prefix"] = out["zip_code"].str[:3]
    return out[["user_id", "age", "gender", "occupation", "zip_prefix"]]


def build_items(items: pd.DataFrame | None, interactions: pd.DataFrame) -> pd.DataFrame:
    """Adds category (first genre), available, moderated and created_at (first rating)."""
    first_rated = interactions.groupby("item_id")["timestamp"].min()
    out = pd.DataFrame({"item_id": first_rated.index}) if items is None else items.copy()
    if "genres" in out.columns:
        out["category"] = [genres[0] if genres else "unknown" for genres in out["genres"]]
    else:
        out["category"] = "unknown"
    out["available"] = True
    out["moderated"] = False
    last = interactions["timestamp"].max()
    out["created_at"] = out["item_id"].map(first_rated).fillna(last).astype("int64")
    return out
