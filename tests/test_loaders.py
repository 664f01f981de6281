"""Tests of the data loaders on tiny hand-written files, and on the real data when present.

The real datasets are never copied into the repository: they are read from
``../shared/datasets`` next to the repository, and those tests are skipped when
that folder is absent.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig, default_config
from common.data import load_dataset, load_site
from common.data._parse import parse_rating_scale
from common.data.dataset import Catalogue
from common.data.download import ensure_raw_files
from common.data.interactions_file import load_interactions_file, read_csv
from common.data.lightgcn import load_lightgcn
from common.data.movielens import (
    HALF_STARS,
    ML_100K_GENRES,
    STARS,
    load_movielens_100k,
    load_movielens_dat,
)
from common.data.site_folder import load_catalogue_folder
from common.errors import InputError
from common.graph.release import ItemGraph, contribution, length, sensitivity

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


@contextmanager
def raises(*parts: str) -> Iterator[None]:
    """Expect an :class:`InputError` whose message contains every one of ``parts``."""
    with pytest.raises(InputError) as info:
        yield
    for part in parts:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


# --- MovieLens-100K --------------------------------------------------------------------------


def genre_flags(*genres: str) -> str:
    return "|".join("1" if g in genres else "0" for g in ML_100K_GENRES)


U_ITEM = (
    f"10|Paper Boats (1995)|01-Jan-1995||http://x|{genre_flags('Animation', 'Comedy')}\n"
    f"2|Rêve bleu, Le (1995)|01-Jan-1995||http://y|{genre_flags('Drama', 'Musical')}\n"
    f"7|Cold Movie (1990) |01-Jan-1990||http://z|{genre_flags('unknown')}\n"
)
U_USER = "1|24|M|technician|85711\n3|53|F|other|T8H1N\n20|17|M|student|12345\n"
U_DATA = "1\t10\t5\t100\n3\t2\t3\t200\n1\t2\t4\t300\n"


@pytest.fixture
def ml100k(tmp_path: Path) -> Path:
    write(tmp_path / "u.item", U_ITEM, "latin-1")
    write(tmp_path / "u.user", U_USER)
    write(tmp_path / "u.data", U_DATA)
    return tmp_path


def test_movielens_100k_happy_path(ml100k: Path) -> None:
    data = load_movielens_100k(ml100k)
    assert data.name == "ml-100k"
    assert data.catalogue.item_ids == ("2", "7", "10")
    assert data.user_ids == ("1", "3", "20")
    assert data.catalogue.item_text == (
        "Rêve bleu, Le (1995). Genres: Drama, Musical.",
        "Cold Movie (1990). Genres: unknown.",
        "Paper Boats (1995). Genres: Animation, Comedy.",
    )
    assert data.catalogue.rating_levels == STARS
    i = data.interactions
    assert i.user.tolist() == [0, 1, 0]
    assert i.item.tolist() == [2, 0, 0]
    assert i.rating.tolist() == [5.0, 3.0, 4.0]
    assert i.timestamp.tolist() == [100, 200, 300]
    assert (i.user.dtype, i.item.dtype, i.rating.dtype, i.timestamp.dtype) == (
        np.int64,
        np.int64,
        np.float32,
        np.int64,
    )
    assert data.canonical_split is None


def test_movielens_100k_user_features(ml100k: Path) -> None:
    data = load_movielens_100k(ml100k)
    names = data.catalogue.user_feature_names
    assert names[:9] == (
        "age:<18",
        "age:18-24",
        "age:25-34",
        "age:35-44",
        "age:45-49",
        "age:50-55",
        "age:56+",
        "gender:F",
        "gender:M",
    )
    assert len(names) == 9 + 21 and "occupation:technician" in names
    assert data.user_features.shape == (3, 30) and data.user_features.dtype == np.float32
    assert data.user_features.sum(axis=1).tolist() == [3.0, 3.0, 3.0]
    hot = [{names[j] for j in np.flatnonzero(row)} for row in data.user_features]
    assert hot[0] == {"age:18-24", "gender:M", "occupation:technician"}
    assert hot[1] == {"age:50-55", "gender:F", "occupation:other"}
    assert hot[2] == {"age:<18", "gender:M", "occupation:student"}
    columns = data.user_columns
    assert columns["age-group"].tolist() == ["18-24", "50-55", "<18"]
    assert columns["gender"].tolist() == ["M", "F", "M"]
    assert columns["occupation"].tolist() == ["technician", "other", "student"]
    assert columns["zip-region"].tolist() == ["8", "T", "1"]


def test_movielens_100k_optional_files(ml100k: Path) -> None:
    (ml100k / "u.user").unlink()
    write(ml100k / "u.genre", "".join(f"G{i}|{i}\n" for i in range(19)) + "\n")
    data = load_movielens_100k(ml100k)
    assert data.user_ids == ("1", "3")
    assert data.user_features.shape == (2, 0) and data.user_columns == {}
    assert data.catalogue.item_text[2] == "Paper Boats (1995). Genres: G3, G5."


def test_movielens_100k_u_occupation_names(ml100k: Path) -> None:
    write(ml100k / "u.occupation", "technician\nother\nstudent\n")
    names = load_movielens_100k(ml100k).catalogue.user_feature_names
    assert names[9:] == ("occupation:technician", "occupation:other", "occupation:student")


@pytest.mark.parametrize(
    ("file", "text", "where", "field"),
    [
        ("u.data", "1\t10\t5\t100\n3\t2\tx\t200\n", "u.data:2:", "field 'rating'"),
        ("u.data", "1\t10\t6\t100\n", "u.data:1:", "field 'rating'"),
        ("u.data", "1\t10\t4.5\t100\n", "u.data:1:", "field 'rating'"),
        ("u.data", "1\t10\t5\n", "u.data:1:", "field 'timestamp'"),
        ("u.data", "1\tten\t5\t100\n", "u.data:1:", "field 'item'"),
        ("u.data", "\n1\t99\t5\t100\n", "u.data:2:", "field 'item'"),
        ("u.data", "1\t10\t5\t100\n5\t10\t5\t100\n", "u.data:2:", "field 'user'"),
        ("u.user", "1|24|M|astronaut|85711\n", "u.user:1:", "field 'occupation'"),
        ("u.user", "1|24|X|other|85711\n", "u.user:1:", "field 'gender'"),
        ("u.user", "1|-3|M|other|85711\n", "u.user:1:", "field 'age'"),
        ("u.user", "1|24|M|other|85711\n1|25|F|other|1\n", "u.user:2:", "field 'user'"),
        ("u.item", f"10|Paper Boats (1995)|x||y|{genre_flags()}|0\n", "u.item:1:", "expected 24"),
        ("u.item", "10|Paper Boats (1995)|x||y|2" + "|0" * 18 + "\n", "u.item:1:", "'unknown'"),
    ],
)
def test_movielens_100k_bad_input(ml100k: Path, file: str, text: str, where: str, field: str):
    write(ml100k / file, text)
    with raises(where, field):
        load_movielens_100k(ml100k)


def test_movielens_100k_empty_file(ml100k: Path) -> None:
    write(ml100k / "u.data", "\n")
    with raises("u.data", "file is empty"):
        load_movielens_100k(ml100k)


def test_movielens_100k_missing_file(ml100k: Path) -> None:
    (ml100k / "u.item").unlink()
    with raises("u.item", "file not found"):
        load_movielens_100k(ml100k)


def test_movielens_100k_latin1_title(ml100k: Path) -> None:
    assert (ml100k / "u.item").read_bytes().count(b"R\xeave bleu") == 1
    assert load_movielens_100k(ml100k).catalogue.item_text[0].startswith("Rêve bleu, Le")


def test_duplicates_error_names_both_lines(ml100k: Path) -> None:
    write(ml100k / "u.data", U_DATA + "3\t2\t1\t50\n")
    with raises("u.data:4:", "line 2", "field 'item'", "keep-latest"):
        load_movielens_100k(ml100k)


def test_duplicates_keep_latest(ml100k: Path, caplog: pytest.LogCaptureFixture) -> None:
    # (3, 2): the older row comes last; (1, 10): equal times, so the later line wins.
    write(ml100k / "u.data", U_DATA + "3\t2\t1\t50\n1\t10\t2\t100\n")
    with caplog.at_level(logging.WARNING):
        data = load_movielens_100k(ml100k, on_duplicate="keep-latest")
    assert "u.data" in caplog.text and "replaced 2 duplicate" in caplog.text
    kept = sorted(
        zip(
            data.interactions.user.tolist(),
            data.interactions.item.tolist(),
            data.interactions.rating.tolist(),
            strict=True,
        )
    )
    assert kept == [(0, 0, 4.0), (0, 2, 2.0), (1, 0, 3.0)]


def test_invalid_duplicate_policy(ml100k: Path) -> None:
    with raises("on-duplicate", "'drop'", "keep-latest"):
        load_movielens_100k(ml100k, on_duplicate="drop")


def test_movielens_100k_canonical_split(ml100k: Path) -> None:
    write(ml100k / "u1.base", "1\t10\t5\t100\n1\t2\t4\t300\n")
    write(ml100k / "u1.test", "3\t2\t3\t200\n")
    train, test = load_movielens_100k(ml100k, canonical_split="u1").canonical_split
    assert (train.user.tolist(), train.item.tolist()) == ([0, 0], [2, 0])
    assert (test.user.tolist(), test.item.tolist(), test.rating.tolist()) == ([1], [0], [3.0])


@pytest.mark.parametrize(
    ("test_line", "where", "field"),
    [
        ("3\t2\t4\t200\n", "u1.test:1:", "field 'rating'"),
        ("3\t10\t3\t200\n", "u1.test:1:", "field 'item'"),
        ("1\t2\t4\t300\n", "u1.test:1:", "u1.base:2"),
    ],
)
def test_movielens_100k_canonical_split_checks(ml100k: Path, test_line, where, field) -> None:
    write(ml100k / "u1.base", "1\t10\t5\t100\n1\t2\t4\t300\n")
    write(ml100k / "u1.test", test_line)
    with raises(where, field):
        load_movielens_100k(ml100k, canonical_split="u1")


def test_movielens_100k_invalid_split_name(ml100k: Path) -> None:
    with raises("canonical split", "'u6'", "'u1'", "'ub'"):
        load_movielens_100k(ml100k, canonical_split="u6")


# --- MovieLens-1M / 10M ----------------------------------------------------------------------


def test_movielens_1m(tmp_path: Path) -> None:
    movies = "1::Été tardif (2001)::Comedy|Romance\n3::Night Train (1995)::Action\n"
    write(tmp_path / "movies.dat", movies, "latin-1")
    write(tmp_path / "users.dat", "6::F::1::10::55117-1234\n2::M::56::0::02139\n")
    write(tmp_path / "ratings.dat", "6::3::4::978300760\n2::1::5::978300761\n")
    data = load_movielens_dat(tmp_path)
    assert data.name == "ml-1m" and data.catalogue.rating_levels == STARS
    assert data.catalogue.item_text == (
        "Été tardif (2001). Genres: Comedy, Romance.",
        "Night Train (1995). Genres: Action.",
    )
    assert data.user_ids == ("2", "6")
    assert data.interactions.user.tolist() == [1, 0]
    assert data.interactions.item.tolist() == [1, 0]
    assert data.user_columns["age-group"].tolist() == ["56+", "<18"]
    assert data.user_columns["occupation"].tolist() == ["other", "K-12 student"]
    assert data.user_columns["zip-region"].tolist() == ["0", "5"]
    names = data.catalogue.user_feature_names
    assert len(names) == 7 + 2 + 21 and data.user_features.shape == (2, 30)
    assert {names[j] for j in np.flatnonzero(data.user_features[1])} == {
        "age:<18",
        "gender:F",
        "occupation:K-12 student",
    }


def test_movielens_10m(tmp_path: Path) -> None:
    write(tmp_path / "movies.dat", "1::Été tardif (2001)::Comedy|Romance\n")
    write(tmp_path / "ratings.dat", "5::1::3.5::1\n9::1::5::2\n")
    data = load_movielens_dat(tmp_path)
    assert data.name == "ml-10m" and data.catalogue.rating_levels == HALF_STARS
    assert data.catalogue.item_text == ("Été tardif (2001). Genres: Comedy, Romance.",)
    assert data.interactions.rating.tolist() == [3.5, 5.0]
    assert data.user_features.shape == (2, 0) and data.user_columns == {}


@pytest.mark.parametrize(
    ("file", "text", "where", "field"),
    [
        ("users.dat", "6::F::2::10::55117\n", "users.dat:1:", "field 'age'"),
        ("users.dat", "6::F::1::21::55117\n", "users.dat:1:", "field 'occupation'"),
        ("users.dat", "6::F::1::1::\n", "users.dat:1:", "field 'zip code'"),
        ("ratings.dat", "6::1::0::1\n", "ratings.dat:1:", "field 'rating'"),
        ("ratings.dat", "6::1::4::1\n6::1::4.5::2\n", "ratings.dat:2:", "users.dat is present"),
        ("ratings.dat", "6::1::nan::1\n", "ratings.dat:1:", "field 'rating'"),
        ("ratings.dat", "6::1::4::1.5\n", "ratings.dat:1:", "field 'timestamp'"),
        ("ratings.dat", "7::1::4::1\n", "ratings.dat:1:", "field 'user'"),
    ],
)
def test_movielens_dat_bad_input(tmp_path: Path, file: str, text: str, where: str, field: str):
    write(tmp_path / "movies.dat", "1::Été tardif (2001)::Comedy\n")
    write(tmp_path / "users.dat", "6::F::1::10::55117\n")
    write(tmp_path / "ratings.dat", "6::1::4::1\n")
    write(tmp_path / file, text)
    with raises(where, field):
        load_movielens_dat(tmp_path)


def test_movielens_dat_scale_is_the_releases_not_the_ratings_present(tmp_path: Path) -> None:
    """ML-1M (users.dat) rates 1..5 and ML-10M (no users.dat) 0.5..5, whatever is rated."""
    write(tmp_path / "movies.dat", "1::Été tardif (2001)::Comedy\n")
    write(tmp_path / "ratings.dat", "5::1::3::1\n9::1::5::2\n")
    data = load_movielens_dat(tmp_path)  # whole stars only, yet ML-10M's files
    assert data.name == "ml-10m" and data.catalogue.rating_levels == HALF_STARS
    assert data.catalogue.derived_from_data == ()
    write(tmp_path / "ratings.dat", "5::1::3::1\n9::1::5.5::2\n")
    with raises("ratings.dat:2:", "field 'rating'", "half-star rating 0.5-5.0", "'5.5'"):
        load_movielens_dat(tmp_path)


# --- LightGCN --------------------------------------------------------------------------------


@pytest.fixture
def lightgcn(tmp_path: Path) -> Path:
    write(tmp_path / "train.txt", "0 0 1 2\n1 2\n2 1 3\n")
    write(tmp_path / "test.txt", "0 3\n1\n\n2 0\n")
    return tmp_path


def test_lightgcn_happy_path(lightgcn: Path) -> None:
    data = load_lightgcn(lightgcn, name="tiny")
    assert data.name == "tiny"
    assert data.user_ids == ("0", "1", "2") and data.catalogue.item_ids == ("0", "1", "2", "3")
    train, test = data.canonical_split
    assert train.user.tolist() == [0, 0, 0, 1, 2, 2]
    assert train.item.tolist() == [0, 1, 2, 2, 1, 3]
    assert (test.user.tolist(), test.item.tolist()) == ([0, 2], [3, 0])
    assert len(data.interactions) == 8 and data.interactions.rating.tolist() == [1.0] * 8
    assert data.interactions.timestamp is None and data.catalogue.item_text is None
    assert data.catalogue.rating_levels == (1.0,) and data.catalogue.implicit
    assert data.user_features.shape == (3, 0)
    assert load_lightgcn(lightgcn).name == lightgcn.name


def test_lightgcn_zero_item_user_counts(tmp_path: Path) -> None:
    write(tmp_path / "train.txt", "0 1\n")
    write(tmp_path / "test.txt", "0 0\n\n4\n")
    data = load_lightgcn(tmp_path)
    assert data.num_users == 5 and data.num_items == 2


def test_lightgcn_id_lists(lightgcn: Path) -> None:
    write(lightgcn / "user_list.txt", "org_id remap_id\n343 0\n17 1\n99 2\n")
    write(lightgcn / "item_list.txt", "org_id remap_id\na 0\nb 1\nc 2\nd 3\ne 4\n")
    data = load_lightgcn(lightgcn)
    assert data.user_ids == ("343", "17", "99")
    assert data.catalogue.item_ids == ("a", "b", "c", "d", "e")


@pytest.mark.parametrize(
    ("file", "text", "where", "field"),
    [
        ("train.txt", "0 0 1 2\n1 x\n", "train.txt:2:", "field 'item'"),
        ("train.txt", "0 0 1 2\n\n-1 2\n", "train.txt:3:", "field 'user'"),
        ("test.txt", "", "test.txt", "file is empty"),
        ("item_list.txt", "org_id remap_id\na 0\nb 1\n", "train.txt:1:", "item_list.txt"),
        ("item_list.txt", "org_id remap_id\na 0\nb 2\n", "item_list.txt:3:", "field 'remap_id'"),
        ("item_list.txt", "org remap\na 0\n", "item_list.txt:1:", "org_id remap_id"),
        ("user_list.txt", "org_id remap_id\n5 0\n6 1\n", "train.txt:3:", "field 'user'"),
    ],
)
def test_lightgcn_bad_input(lightgcn: Path, file: str, text: str, where: str, field: str):
    write(lightgcn / file, text)
    with raises(where, field):
        load_lightgcn(lightgcn)


def test_lightgcn_undecodable(lightgcn: Path) -> None:
    (lightgcn / "test.txt").write_bytes(b"0 3\n1 \xff\n")
    with raises("test.txt:2:", "0xff", "utf-8"):
        load_lightgcn(lightgcn)


def test_lightgcn_duplicates(lightgcn: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(lightgcn / "train.txt", "0 0 1 2 1\n1 2\n2 1 3\n")
    with raises("train.txt:1:", "line 1", "field 'item'"):
        load_lightgcn(lightgcn)
    write(lightgcn / "train.txt", "0 0 1 2\n1 2\n2 1 3 0\n")
    with raises("test.txt:4:", "train.txt:3"):
        load_lightgcn(lightgcn)
    with caplog.at_level(logging.WARNING):
        train, test = load_lightgcn(lightgcn, on_duplicate="keep-latest").canonical_split
    assert "replaced 1 duplicate" in caplog.text and "train.txt" in caplog.text
    assert (train.user.tolist(), train.item.tolist()) == ([0, 0, 0, 1, 2, 2], [0, 1, 2, 2, 1, 3])
    assert (test.user.tolist(), test.item.tolist()) == ([0, 2], [3, 0])


# --- Generic CSV / TSV -----------------------------------------------------------------------


def test_interactions_csv(tmp_path: Path) -> None:
    write(
        tmp_path / "ratings.csv",
        ' User ,Item,RATING,timestamp\nalice,"Heat, 1995",4,100\n'
        "bob,Up,2.5,2024-05-01T00:00:01Z\r\n\nalice,Up,1,2024-05-01\n",
    )
    write(
        tmp_path / "items.csv", 'item,text\nUp,"A house, balloons."\n"Heat, 1995",Crime\nCold,x\n'
    )
    data = load_interactions_file(tmp_path / "ratings.csv", tmp_path / "items.csv")
    assert data.name == "ratings"
    assert data.user_ids == ("alice", "bob")
    assert data.catalogue.item_ids == ("Cold", "Heat, 1995", "Up")
    assert data.catalogue.item_text == ("x", "Crime", "A house, balloons.")
    assert data.catalogue.rating_levels == (1.0, 2.5, 4.0)
    assert data.interactions.user.tolist() == [0, 1, 0]
    assert data.interactions.item.tolist() == [1, 2, 2]
    assert data.interactions.timestamp.tolist() == [100, 1714521601, 1714521600]


def test_interactions_tsv_implicit_numeric_ids(tmp_path: Path) -> None:
    write(tmp_path / "clicks.tsv", "user\titem\n10\t3\n9\t20\n10\t20\n")
    data = load_interactions_file(tmp_path / "clicks.tsv", name="clicks")
    assert data.user_ids == ("9", "10") and data.catalogue.item_ids == ("3", "20")
    assert data.catalogue.rating_levels == (1.0,) and data.catalogue.item_text is None
    assert data.interactions.rating.tolist() == [1.0, 1.0, 1.0]
    assert data.interactions.timestamp is None
    assert data.interactions.user.tolist() == [1, 0, 1]


def test_interactions_delimiter(tmp_path: Path) -> None:
    write(tmp_path / "data.txt", "user;item\n1;2\n")
    with raises("data.txt", "delimiter", "rename the file to .csv"):
        load_interactions_file(tmp_path / "data.txt")
    assert len(load_interactions_file(tmp_path / "data.txt", delimiter=";").interactions) == 1


def test_a_folder_given_as_an_interactions_file(tmp_path: Path) -> None:
    with raises(f"{tmp_path}: is a folder; expected a .csv, .tsv, .tab file"):
        load_interactions_file(tmp_path)


def test_interactions_rating_levels(tmp_path: Path) -> None:
    write(tmp_path / "r.csv", "user,item,rating\n1,2,3\n1,3,5\n")
    data = load_interactions_file(tmp_path / "r.csv", rating_levels=[5, 1, 2, 3, 4])
    assert data.catalogue.rating_levels == STARS
    assert data.catalogue.derived_from_data == ("item ids",)
    with raises("r.csv:3:", "field 'rating'", "on the scale 1, 2, 3 (rating-scale)", "'5'"):
        load_interactions_file(tmp_path / "r.csv", rating_levels=[1, 2, 3])
    write(tmp_path / "i.csv", "user,item\n1,2\n")
    with raises("rating-scale", "no rating column"):
        load_interactions_file(tmp_path / "i.csv", rating_levels=[1, 2])
    assert load_interactions_file(tmp_path / "i.csv", rating_levels=[1]).catalogue.implicit
    with raises("rating-scale", "no level"):
        load_interactions_file(tmp_path / "r.csv", rating_levels=[])


@pytest.mark.parametrize(
    ("text", "levels"),
    [
        ("1..5", STARS),
        (" 1 .. 10 ", tuple(map(float, range(1, 11)))),
        ("0.5..5 step 0.5", HALF_STARS),
        ("0.1..0.5 step 0.1", (0.1, 0.2, 0.3, 0.4, 0.5)),
        ("-2..2", (-2.0, -1.0, 0.0, 1.0, 2.0)),
        ("1,2,3,4,5", STARS),
        ("5, 1, 3", (1.0, 3.0, 5.0)),
    ],
)
def test_rating_scale_forms(text: str, levels: tuple[float, ...]) -> None:
    assert parse_rating_scale(text) == levels


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "neither a range nor a list"),
        ("1-5", "neither a range nor a list"),
        ("1..5 step x", "neither a range nor a list"),
        ("1,two,3", "neither a range nor a list"),
        ("0.5..5", "without a step needs whole-number ends"),
        ("5..1", "a start below its end"),
        ("1..5 step 0", "a positive step"),
        ("1..5 step 3", "not on the grid"),
        ("1..100000", "more than 1000 levels"),
        ("1,2,2", "listed twice"),
        ("1,nan", "not a finite number"),
        ("3", "two levels at least"),
    ],
)
def test_rating_scale_errors_name_the_key_the_value_and_the_forms(text: str, problem: str):
    with raises("rating-scale: ", problem, f"got {text!r}", '"1..5"', '"0.5..5 step 0.5"', "1,2,3"):
        parse_rating_scale(text)


def test_interactions_encoding(tmp_path: Path) -> None:
    write(tmp_path / "r.csv", "user,item\nJosé,1\n", "latin-1")
    with raises("r.csv:2:", "utf-8", "Save the file as utf-8"):
        load_interactions_file(tmp_path / "r.csv")
    data = load_interactions_file(tmp_path / "r.csv", encoding="latin-1")
    assert data.user_ids == ("José",)
    with raises("encoding", "'klingon'"):
        load_interactions_file(tmp_path / "r.csv", encoding="klingon")


@pytest.mark.parametrize(
    ("text", "where", "field"),
    [
        ("", "r.csv", "file is empty"),
        ("user,item,rating\n", "r.csv", "no data rows"),
        ("user,item,ratng\n1,2,3\n", "r.csv:1:", "field 'ratng'"),
        ("user,rating\n1,3\n", "r.csv:1:", "field 'item'"),
        ("user,item,user\n1,2,3\n", "r.csv:1:", "field 'user'"),
        ("user,item,rating\n1,2,3\n1,3\n", "r.csv:3:", "field 'rating'"),
        ("user,item,rating\n1,2,3\n1,3,good\n", "r.csv:3:", "field 'rating'"),
        ("user,item,rating\n1,2,inf\n", "r.csv:2:", "field 'rating'"),
        ("user,item\n1,2\n,3\n", "r.csv:3:", "field 'user'"),
        ("user,item,timestamp\n1,2,yesterday\n", "r.csv:2:", "field 'timestamp'"),
        ('user,item\n1,"2\n3,4\n', "r.csv:2:", "malformed"),
        ("user,item,timestamp\n1,2,5\n1,2,6\n", "r.csv:3:", "line 2"),
    ],
)
def test_interactions_bad_input(tmp_path: Path, text: str, where: str, field: str) -> None:
    write(tmp_path / "r.csv", text)
    with raises(where, field):
        load_interactions_file(tmp_path / "r.csv")


def test_header_names_match_the_expected_names_case_insensitively(tmp_path: Path) -> None:
    # users.csv of a site folder names MovieLens features such as gender:F.
    write(tmp_path / "users.csv", "User,GENDER:f,gender:M\n1,1.0,0.0\n")
    table = read_csv(tmp_path / "users.csv", ("user", "gender:F", "gender:M"), (), None, "utf-8")
    assert table.columns == {"user": ["1"], "gender:F": ["1.0"], "gender:M": ["0.0"]}
    write(tmp_path / "users.csv", "user,gender:F,gender:X\n1,1.0,0.0\n")
    with raises("users.csv:1:", "field 'gender:X'", "unknown column(s) ['gender:X']"):
        read_csv(tmp_path / "users.csv", ("user", "gender:F", "gender:M"), (), None, "utf-8")


TRAIN_CSV = "user,item,rating,timestamp\na,1,4,10\na,2,3,20\nb,2,5,30\nb,3,1,40\n"


def test_interactions_split_of_ones_own(tmp_path: Path) -> None:
    write(tmp_path / "train.csv", TRAIN_CSV)
    write(tmp_path / "val.csv", "user,item,rating,timestamp\nb,1,2,50\n")
    write(tmp_path / "test.csv", "user,item,rating,timestamp\na,3,5,60\n\nb,4,1,70\n")
    write(tmp_path / "items.csv", "item,text\n1,One\n2,Two\n3,Three\n4,Four\n")
    data = load_interactions_file(
        tmp_path / "train.csv",
        tmp_path / "items.csv",
        test_path=tmp_path / "test.csv",
        val_path=tmp_path / "val.csv",
    )
    train, test = data.canonical_split
    assert (len(train), len(data.canonical_val), len(test)) == (4, 1, 2)
    assert len(data.interactions) == 7 and data.user_ids == ("a", "b")
    assert [data.catalogue.item_ids[i] for i in test.item] == ["3", "4"]
    assert test.timestamp.tolist() == [60, 70] and data.canonical_val.rating.tolist() == [2.0]


@pytest.mark.parametrize(
    ("test_text", "where", "problem"),
    [
        ("user,item,timestamp\na,3,60\n", "test.csv", "field 'rating'"),
        ("user,item,rating\na,3,5\n", "test.csv", "field 'timestamp'"),
        ("user,item,rating,timestamp\n\nb,3,2,90\n", "test.csv:3:", "train.csv:5"),
    ],
)
def test_interactions_split_of_ones_own_checks(
    tmp_path: Path, test_text: str, where: str, problem: str
) -> None:
    write(tmp_path / "train.csv", TRAIN_CSV)
    write(tmp_path / "test.csv", test_text)
    with raises(where, problem):
        load_interactions_file(tmp_path / "train.csv", test_path=tmp_path / "test.csv")


def test_a_test_file_may_have_new_users_and_items(tmp_path: Path) -> None:
    """Issue 27.4: a user or item only in the test file is kept (not refused), as a new
    user (no training rows) or a new item; with an item file, an item outside it is still
    an error (nothing can score an item nobody published)."""
    write(tmp_path / "train.csv", TRAIN_CSV)
    write(tmp_path / "test.csv", "user,item,rating,timestamp\na,3,5,60\nc,1,4,70\na,9,2,80\n")
    data = load_interactions_file(tmp_path / "train.csv", test_path=tmp_path / "test.csv")
    assert data.user_ids == ("a", "b", "c") and data.catalogue.item_ids == ("1", "2", "3", "9")
    train, test = data.canonical_split
    assert len(test) == 3 and 2 not in train.user and 3 not in train.item
    write(tmp_path / "items.csv", "item\n1\n2\n3\n")
    with raises("test.csv:4:", "field 'item'", "items.csv"):
        load_interactions_file(
            tmp_path / "train.csv", tmp_path / "items.csv", test_path=tmp_path / "test.csv"
        )


def test_interactions_item_text_checks(tmp_path: Path) -> None:
    write(tmp_path / "r.csv", "user,item\n1,2\n1,3\n")
    write(tmp_path / "items.tsv", "item\ttext\n2\tTwo\n")
    with raises("r.csv:3:", "field 'item'", "items.tsv"):
        load_interactions_file(tmp_path / "r.csv", tmp_path / "items.tsv")
    write(tmp_path / "items.tsv", "item\ttext\n2\tTwo\n3\tThree\n2\tAgain\n")
    with raises("items.tsv:4:", "field 'item'", "line 2"):
        load_interactions_file(tmp_path / "r.csv", tmp_path / "items.tsv")


def test_interactions_keep_latest(tmp_path: Path) -> None:
    write(tmp_path / "r.csv", "user,item,rating,timestamp\n1,2,5,20\n1,2,3,10\n1,3,4,1\n")
    data = load_interactions_file(tmp_path / "r.csv", on_duplicate="keep-latest")
    assert data.interactions.rating.tolist() == [5.0, 4.0]
    assert data.catalogue.rating_levels == (3.0, 4.0, 5.0)


# --- Public catalogue and scale: the audit of issue 24 ---------------------------------------

ITEMS = tuple(f"m{k:02d}" for k in range(40))
NEW_ITEM = ITEMS[-1]  # in the catalogue file, rated by nobody but the user added
ADDED_LINE = 62  # after the header and the 60 ratings of audit_data


def audit_data(folder: Path, name: str, added: str = "") -> Path:
    """Five users rating 12 items each of a 40-item catalogue on 1..5 (nobody rates
    ``NEW_ITEM``), then the lines ``added``. One file per content: loads are cached by path."""
    rng = np.random.default_rng(0)
    lines = ["user,item,rating"]
    for user in range(5):
        for item in rng.choice(len(ITEMS) - 1, size=12, replace=False):
            lines.append(f"u{user},{ITEMS[item]},{rng.integers(1, 6)}")
    return write(folder / f"{name}.csv", "\n".join(lines) + "\n" + added)


def audit_config(data: Path, **overrides) -> RunConfig:
    """DP (the default) with the public catalogue file and ``rating-scale = "1..5"``."""
    write(data.parent / "items.csv", "item\n" + "\n".join(ITEMS) + "\n")
    keys = {"item_text_path": str(data.parent / "items.csv"), "rating_scale": "1..5"}
    return default_config(dataset="csv", data_path=str(data), **keys | overrides)


def round_1(config: RunConfig) -> tuple[np.ndarray, Catalogue]:
    """Round 1's sum over every user (all at one site) and the catalogue."""
    site = load_site(config, 0, 1)
    return contribution(config, site, 1, ItemGraph()), site.catalogue


@pytest.mark.parametrize("task", ["rating", "ranking"])
def test_a_rating_off_the_scale_is_an_error_and_one_user_moves_only_their_own_term(
    tmp_path: Path, task: str
) -> None:
    """The audit's first case: a user who rates 10 on a 1..5 file no longer rescales
    everyone's ratings; it is an error, and a user on the scale adds their own term only."""
    off_scale = audit_data(tmp_path, "off-scale", "intruder,m09,10\n")
    with raises(f"{off_scale}:{ADDED_LINE}:", "field 'rating'", "1, 2, 3, 4, 5 (rating-scale)"):
        load_dataset(audit_config(off_scale))
    ratings = "intruder,m03,5\nintruder,m07,1\n"
    before, catalogue = round_1(audit_config(audit_data(tmp_path, "others"), task=task))
    after, catalogue_after = round_1(audit_config(audit_data(tmp_path, "all", ratings), task=task))
    alone_data = write(tmp_path / "alone.csv", "user,item,rating\n" + ratings)
    alone, _ = round_1(audit_config(alone_data, task=task))
    assert catalogue_after == catalogue and catalogue.rating_levels == STARS
    assert catalogue.derived_from_data == ()
    np.testing.assert_allclose(after - before, alone, atol=1e-9)  # nobody else's term moved
    bound = sensitivity(audit_config(tmp_path / "all.csv", task=task), catalogue, 1)
    assert 0 < np.linalg.norm(after - before) <= bound + 1e-9


def test_a_user_alone_on_an_item_leaves_the_release_length_as_it_is(tmp_path: Path) -> None:
    """The audit's second case: a user who rates an item nobody else has."""
    config = audit_config(audit_data(tmp_path, "others"))
    with_user = audit_config(audit_data(tmp_path, "all", f"loner,{NEW_ITEM},4\n"))
    before, catalogue = round_1(config)
    after, catalogue_after = round_1(with_user)
    assert catalogue_after == catalogue and catalogue.num_items == len(ITEMS)
    empty = ItemGraph()
    assert length(config, catalogue, 1, empty) == length(with_user, catalogue_after, 1, empty)
    assert before.shape == after.shape == (2 * len(ITEMS) + 2,)  # offsets, global mean
    assert np.linalg.norm(after - before) <= sensitivity(config, catalogue, 1) + 1e-9
    outside = audit_data(tmp_path, "outside", "loner,m99,4\n")
    with raises(f"{outside}:{ADDED_LINE}:", "field 'item'", "'m99' is not in the item-text file"):
        load_dataset(audit_config(outside))


def test_under_dp_csv_data_needs_a_public_catalogue_and_scale(tmp_path: Path) -> None:
    data = audit_data(tmp_path, "ratings")
    with raises(
        "item-text-path: dp = true needs the public catalogue of csv data, e.g. ",
        'item-text-path = "/data/items.csv"',
        'catalogue-path = "/data/catalogue"',
        "rating-scale: dp = true needs the public rating scale of csv data, e.g. ",
        'rating-scale = "1..5"',
    ):
        load_dataset(default_config(dataset="csv", data_path=str(data)))
    with raises("rating-scale: dp = true", 'rating-scale = "1..5"'):
        load_dataset(audit_config(data, rating_scale=""))
    with raises("item-text-path: dp = true", 'item-text-path = "/data/items.csv"'):
        load_dataset(audit_config(data, item_text_path=""))
    assert load_dataset(audit_config(data, rating_scale="", implicit=True)).catalogue.implicit
    derived = load_dataset(default_config(dataset="csv", data_path=str(data), dp=False))
    assert derived.catalogue.derived_from_data == ("item ids", "rating scale")
    assert derived.catalogue.num_items < len(ITEMS)  # the items rated, not the file's
    implicit = write(tmp_path / "clicks.csv", "user,item\na,m01\n")
    assert load_dataset(audit_config(implicit, rating_scale="")).catalogue.implicit


def test_a_catalogue_folder_gives_csv_data_its_catalogue_and_scale(tmp_path: Path) -> None:
    folder = tmp_path / "catalogue"
    folder.mkdir()
    write(folder / "items.csv", "item,text\n" + "".join(f"{i},Film {i}\n" for i in ITEMS))
    write(folder / "catalogue.json", '{"rating-levels": [5, 4, 3, 2, 1]}')
    data = audit_data(tmp_path, "ratings")
    config = default_config(dataset="csv", data_path=str(data), catalogue_path=str(folder))
    catalogue = load_dataset(config).catalogue
    assert catalogue == load_catalogue_folder(folder)  # the one the server builds the model from
    assert catalogue.rating_levels == STARS and catalogue.item_text[0] == "Film m00"
    assert load_dataset(config.replace(rating_scale="1,2,3,4,5")).catalogue == catalogue
    with raises("rating-scale: 1, 2, 3, 4, 5, 6 differs from the rating-levels 1, 2, 3, 4, 5"):
        load_dataset(config.replace(rating_scale="1..6"))
    with raises("item-text-path, catalogue-path", "give one"):
        load_dataset(config.replace(item_text_path=str(folder / "items.csv")))
    derived = tmp_path / "derived"
    derived.mkdir()
    write(derived / "items.csv", (folder / "items.csv").read_text())
    levels = '"rating-levels": [1, 2, 3, 4, 5]'
    write(derived / "catalogue.json", f'{{{levels}, "derived-from-data": ["item ids"]}}')
    with raises(f"catalogue-path: dp = true needs a public catalogue, and {derived}/catalogue"):
        load_dataset(config.replace(catalogue_path=str(derived)))


def test_a_rating_scale_must_equal_a_published_one(lightgcn: Path) -> None:
    assert load_dataset(default_config(rating_scale="1..5")).catalogue.rating_levels == STARS
    with raises("rating-scale: dataset = 'synthetic' has the published scale 1, 2, 3, 4, 5"):
        load_dataset(default_config(rating_scale="1..10"))
    config = default_config(dataset="lightgcn", data_path=str(lightgcn), rating_scale="1..5")
    with raises("rating-scale: dataset = 'lightgcn' has the published scale 1, got '1..5'"):
        load_dataset(config)
    with raises("rating-scale: ", "neither a range nor a list", "'1 to 5'"):
        load_dataset(default_config(rating_scale="1 to 5"))


def test_lightgcn_without_item_list_needs_dp_off(lightgcn: Path) -> None:
    config = default_config(dataset="lightgcn", data_path=str(lightgcn), task="ranking")
    with raises("data-path: dp = true", f"{lightgcn}/item_list.txt, which is missing"):
        load_dataset(config)
    assert load_lightgcn(lightgcn).catalogue.derived_from_data == ("item ids",)
    assert load_dataset(config.replace(dp=False, evaluation="exact")).num_items == 4
    write(lightgcn / "item_list.txt", "org_id remap_id\na 0\nb 1\nc 2\nd 3\n")
    assert load_lightgcn(lightgcn).catalogue.derived_from_data == ()


# --- Download --------------------------------------------------------------------------------


ML_100K_FILES = ("u.data", "u.item", "u.user")


def test_ensure_raw_files_found(tmp_path: Path) -> None:
    for name in ML_100K_FILES:
        write(tmp_path / name, "x\n")
    assert ensure_raw_files("ml-100k", tmp_path, download=False) == tmp_path
    nested = tmp_path / "other" / "raw" / "ml-100k"
    nested.mkdir(parents=True)
    for name in ML_100K_FILES:
        write(nested / name, "x\n")
    assert ensure_raw_files("ml-100k", tmp_path / "other", download=False) == nested


def test_ensure_raw_files_missing(tmp_path: Path) -> None:
    with raises(str(tmp_path), "ratings.dat", "movies.dat", "users.dat", "download = true"):
        ensure_raw_files("ml-1m", tmp_path, download=False)
    with raises("'ml-25m'"):
        ensure_raw_files("ml-25m", tmp_path, download=False)


def test_ensure_raw_files_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_geometric.data

    def fake_download_url(url: str, folder: str) -> str:
        archive = Path(folder) / "ml-100k.zip"
        archive.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive, "w") as zf:
            for name in ML_100K_FILES:
                zf.writestr(f"ml-100k/{name}", "x\n")
        return str(archive)

    monkeypatch.setattr(torch_geometric.data, "download_url", fake_download_url)
    folder = ensure_raw_files("ml-100k", tmp_path, download=True)
    assert folder == tmp_path / "raw" / "ml-100k"
    assert sorted(p.name for p in folder.iterdir()) == sorted(ML_100K_FILES)
    assert not (tmp_path / "raw" / "ml-100k.zip").exists()


# --- Real data (never copied into the repository) --------------------------------------------


def shared(name: str) -> Path:
    folder = SHARED / name
    if not folder.is_dir():
        pytest.skip(f"real dataset not available at {folder.resolve()}")
    return folder


def test_real_movielens_100k() -> None:
    data = load_movielens_100k(shared("ml-100k"), canonical_split="u1")
    assert (data.num_users, data.num_items, len(data.interactions)) == (943, 1682, 100000)
    train, test = data.canonical_split
    assert (len(train), len(test)) == (80000, 20000)
    assert data.catalogue.item_text[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert data.catalogue.item_text[542] == "Misérables, Les (1995). Genres: Drama, Musical."
    assert data.user_features.shape == (943, 30)
    assert np.array_equal(data.user_features.sum(axis=1), np.full(943, 3.0))


def test_real_gowalla() -> None:
    data = load_lightgcn(shared("gowalla"))
    assert (data.num_users, data.num_items) == (29858, 40981)
    train, test = data.canonical_split
    assert (len(train), len(test)) == (810128, 217242)
    assert len(data.interactions) == 810128 + 217242
