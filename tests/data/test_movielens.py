from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from data.fetch import fetch_wheel_folder
from data.movielens import load_ml100k, load_movielens
from data.tables import DataError

# (user, item, rating, timestamp); user 2 rates two items in the same second
RATINGS = [(1, 1, 5, 978300760), (1, 3, 3, 978302109), (2, 3, 4, 978298413),
           (2, 2, 1, 978299000), (2, 1, 2, 978299000), (1, 2, 4, 978301968)]
TITLES = {1: "Toy Story (1995)", 2: "Misérables, Les (1995)", 3: "Star Wars: Episode IV (1977)"}
GENRES = {1: ["Animation", "Children's", "Comedy"], 2: ["Drama", "Musical"], 3: ["Action", "Sci-Fi"]}
FLAGS_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
              "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
              "Romance", "Sci-Fi", "Thriller", "War", "Western"]


@pytest.fixture(scope="module")
def ml100k():
    return load_ml100k().check()


def test_ml100k_has_every_rating_user_and_movie(ml100k):
    inter = fetch_wheel_folder("recbole", "1.2.1", "recbole/dataset_example/ml-100k") / "ml-100k.inter"
    assert len(ml100k.interactions) == sum(1 for _ in inter.open()) - 1 == 100_000
    assert len(ml100k.users) == 943
    assert len(ml100k.items) == 1682
    assert (ml100k.interactions["label"] == 1.0).all()
    assert ml100k.interactions["rating"].dtype == np.float32
    assert ml100k.schema.names == ["user_id", "age", "gender", "occupation", "zip_prefix", "item_id",
                                   "genres", "year", "hour", "weekday", "recent_items"]


def test_ml100k_known_rows(ml100k):
    inter = ml100k.interactions
    row = inter[(inter["user_id"] == 196) & (inter["item_id"] == 242)].iloc[0]
    assert (row["rating"], row["timestamp"]) == (3.0, 881250949)
    when = datetime.fromtimestamp(881250949, UTC)
    assert (row["hour"], row["weekday"]) == (when.hour, when.weekday())

    toy_story = ml100k.items.set_index("item_id").loc[1]
    assert (toy_story["title"], toy_story["year"]) == ("Toy Story", 1995)
    assert toy_story["genres"] == ["Animation", "Children's", "Comedy"]
    assert toy_story["category"] == "Animation"
    assert toy_story["created_at"] == inter.loc[inter["item_id"] == 1, "timestamp"].min()
    # RecBole's copy has no year for these two ("unkonwn" and "V")
    assert ml100k.items.loc[ml100k.items["year"].isna(), "item_id"].tolist() == [267, 1412]

    user = ml100k.users.set_index("user_id").loc[1]
    assert user.tolist() == [24, "M", "technician", "857"]


def write_100k(folder, ratings=RATINGS):
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings))
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|01040\n")
    lines = []
    for item, title in TITLES.items():
        flags = "|".join("1" if g in GENRES[item] else "0" for g in FLAGS_100K)
        lines.append(f"{item}|{title}|01-Jan-1995||http://example.com/{item}|{flags}\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))


def write_1m(folder, side_files=True):
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    if side_files:
        (folder / "users.dat").write_text("1::M::24::technician::85711\n2::F::53::other::01040\n")
        movies = "".join(f"{i}::{t}::{'|'.join(GENRES[i])}\n" for i, t in TITLES.items())
        (folder / "movies.dat").write_bytes(movies.encode("latin-1"))


def write_20m(folder):
    lines = ["userId,movieId,rating,timestamp\n"] + [f"{u},{i},{r}.0,{t}\n" for u, i, r, t in RATINGS]
    (folder / "ratings.csv").write_text("".join(lines))
    movies = [f'{i},"{t}",{"|".join(GENRES[i])}\n' for i, t in TITLES.items()]
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(movies)
                                       + "4,Never Rated (2001),(no genres listed)\n")


@pytest.mark.parametrize("write", [write_100k, write_1m, write_20m])
def test_each_raw_layout_gives_the_same_interactions(tmp_path, write):
    write(tmp_path)
    ds = load_movielens(tmp_path).check()
    inter = ds.interactions
    expected = sorted(RATINGS, key=lambda r: (r[0], r[3]))  # stable: the tie keeps file order
    assert list(zip(inter["user_id"], inter["item_id"], inter["rating"], inter["timestamp"],
                    strict=True)) == expected
    assert "recent_items" not in inter.columns  # built from visible history at training time
    assert inter["label"].dtype == np.float32 and (inter["label"] == 1).all()

    items = ds.items.set_index("item_id")
    assert items.loc[2, "title"] == "Misérables, Les"
    assert items.loc[3, "title"] == "Star Wars: Episode IV"
    assert items.loc[3, "year"] == 1977
    assert items.loc[1, "genres"] == GENRES[1]
    assert items.loc[2, "category"] == "Drama"
    assert items.loc[1, "created_at"] == 978299000


def test_raw_users_keep_zip_leading_zeros(tmp_path):
    write_1m(tmp_path)
    users = load_movielens(tmp_path / "ratings.dat").users.set_index("user_id")
    assert users.loc[2].tolist() == [53, "F", "other", "010"]


def test_csv_layout_keeps_unrated_movies_and_has_no_user_features(tmp_path):
    write_20m(tmp_path)
    ds = load_movielens(tmp_path / "ratings.csv").check()
    never = ds.items.set_index("item_id").loc[4]
    assert never["genres"] == ["(no genres listed)"]
    assert never["created_at"] == max(t for *_, t in RATINGS)
    assert ds.users.columns.tolist() == ["user_id"]
    assert "age" not in ds.schema.names and "genres" in ds.schema.names


def test_ratings_without_side_files_get_id_tables(tmp_path):
    write_1m(tmp_path, side_files=False)
    ds = load_movielens(tmp_path).check()
    assert ds.users["user_id"].tolist() == [1, 2]
    assert ds.items["item_id"].tolist() == [1, 2, 3]
    assert (ds.items["category"] == "unknown").all()
    assert ds.schema.names == ["user_id", "item_id", "hour", "weekday", "recent_items"]


def test_malformed_rating_names_file_column_and_row(tmp_path):
    write_100k(tmp_path, ratings=[(1, 1, 5, 978300760), (1, 2, "three", 978301968)])
    with pytest.raises(DataError, match=r"u\.data: column 'rating' has the wrong dtype") as e:
        load_movielens(tmp_path)
    assert any(line.split()[:1] == ["2"] and "three" in line for line in str(e.value).splitlines())


def test_extra_field_in_ratings_dat_names_the_file_and_line(tmp_path):
    write_1m(tmp_path)
    with (tmp_path / "ratings.dat").open("a") as f:
        f.write("1::2::3::4::5\n")
    with pytest.raises(DataError, match=r"ratings\.dat: cannot be read.*line 7"):
        load_movielens(tmp_path)


def test_duplicate_movie_id_names_movies_dat(tmp_path):
    write_1m(tmp_path)
    with (tmp_path / "movies.dat").open("a") as f:
        f.write("3::Star Wars again (1977)::Action\n")
    with pytest.raises(DataError, match=r"movies\.dat: column 'item_id' has duplicate ids in 2 rows"):
        load_movielens(tmp_path)


def test_folder_without_ratings_is_rejected(tmp_path):
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "other.csv")
    with pytest.raises(DataError, match="no MovieLens ratings file"):
        load_movielens(tmp_path)
    with pytest.raises(DataError, match="not a MovieLens ratings file"):
        load_movielens(tmp_path / "other.csv")
