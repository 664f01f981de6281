"""MovieLens loaders: ML-100K (the ``u.*`` files) and ML-1M / ML-10M (the ``*.dat`` files).

Both give explicit ratings with timestamps (seconds since the epoch) and one
text per movie, ``"{title}. Genres: {g1}, {g2}."`` (the title holds the year; a
movie without genres gets ``"{title}."``).
When the user file is present, users get float32 one-hot features over the ML-1M
age groups (``age:<18`` ... ``age:56+``), ``gender:F``, ``gender:M`` and
``occupation:<name>``, and the raw columns ``age-group``, ``gender``,
``occupation`` and ``zip-region`` (the first character of the zip code) for
non-IID partitioning. The user file then defines the set of users (users without
ratings are kept); a rating by a user it does not list is an error. Without it,
the users are those in the ratings file and there are no user features.

Original user and movie ids must be integers; they are re-indexed in numeric
order. Blank lines are passed over.

The catalogue (the movie file) and the rating scale are those of the published
release, never taken from the ratings: ML-100K and ML-1M rate in whole stars
1..5, ML-10M in half stars 0.5..5, and ML-1M is told from ML-10M by its files
(ML-1M ships ``users.dat``, ML-10M does not). Every rating must be on the scale.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data._parse import (
    Located,
    Table,
    check_on_duplicate,
    drop_duplicates,
    read_table,
    sorted_ids,
    table_interactions,
)
from common.data.dataset import Catalogue, Dataset, Interactions
from common.errors import InputError, file_error

ML_100K_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
AGE_GROUPS = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
GENDERS = ("F", "M")
STARS = (1.0, 2.0, 3.0, 4.0, 5.0)
HALF_STARS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
# The genres of the MovieLens-100K README and the occupations of its u.occupation,
# used when u.genre / u.occupation are absent.
ML_100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
ML_100K_OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive",
    "healthcare", "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer",
    "retired", "salesman", "scientist", "student", "technician", "writer",
)  # fmt: skip
# ML-1M occupation codes 0..20, in the order of the ML-1M README.
ML_1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker",
    "K-12 student", "lawyer", "programmer", "retired", "sales/marketing", "scientist",
    "self-employed", "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip
# ML-1M age codes; each is also the first age of its group in AGE_GROUPS.
ML_1M_AGE_CODES = (1, 18, 25, 35, 45, 50, 56)

_RATING_COLUMNS = ("user", "item", "rating", "timestamp")
_U_ITEM_COLUMNS = ("item", "title", "release date", "video release date", "IMDb URL")
_LATIN_1 = ("latin-1",)


@dataclass(frozen=True)
class _Movies:
    """The catalogue: movie ids and texts in item-index order, and the file they came from."""

    ids: tuple[str, ...]
    text: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class _Users:
    """The user set and its attributes, in user-index order."""

    ids: tuple[str, ...]
    source: str
    features: np.ndarray
    columns: dict[str, np.ndarray]
    feature_names: tuple[str, ...]


def load_movielens_100k(
    root: str | Path, canonical_split: str | None = None, on_duplicate: str = "error"
) -> Dataset:
    """Load MovieLens-100K from the folder ``root``.

    Files (all read as ISO-8859-1 / Latin-1, the encoding of ``u.item``):

    * ``u.data``: tab-separated ``user item rating timestamp``; ratings are
      integers 1-5, timestamps integer seconds.
    * ``u.item``: ``|``-separated ``id|title|release date|video release date|
      IMDb URL|`` and one 0/1 flag per genre. The genres are those of
      ``u.genre`` (``name|index`` lines) when present, else the 19 of the
      README (unknown, Action, ..., Western). Every movie listed is in the
      catalogue, rated or not; a rating of a movie not listed is an error.
    * ``u.user`` (optional): ``|``-separated ``id|age|gender|occupation|zip``;
      ages are mapped into the ML-1M age groups, occupations must be among the
      names of ``u.occupation`` (one per line) when present, else the 21 names
      that file has in the MovieLens-100K release.
    * ``X.base`` and ``X.test`` for ``canonical_split`` = X in
      :data:`ML_100K_SPLITS` (same format as ``u.data``), read into
      ``Dataset.canonical_split``. Each of their ratings must be in ``u.data``
      with the same value.

    ``on_duplicate`` decides what a repeated (user, item) pair does (in
    ``u.data``, or across ``X.base`` and ``X.test``): ``"error"`` or
    ``"keep-latest"`` (the latest timestamp; ties: the later line).
    """
    root = Path(root)
    check_on_duplicate(on_duplicate)
    if canonical_split is not None and canonical_split not in ML_100K_SPLITS:
        raise InputError(
            f"canonical split: expected one of {ML_100K_SPLITS} or None, got {canonical_split!r}"
        )
    genres = ML_100K_GENRES
    if (root / "u.genre").is_file():
        genres = _genre_names(root / "u.genre")
    movies = _read_u_item(root / "u.item", genres)
    ratings = _read_ratings(root / "u.data", "\t")
    rating = _integer_stars(ratings)
    if (root / "u.user").is_file():
        users = _read_users_100k(root / "u.user", _occupation_names(root / "u.occupation"))
    else:
        users = _users_of(ratings)
    (full,) = drop_duplicates(
        [_located(ratings, rating, users, movies)], on_duplicate, users.ids, movies.ids
    )

    split = None
    if canonical_split is not None:
        parts = []
        for suffix in ("base", "test"):
            table = _read_ratings(root / f"{canonical_split}.{suffix}", "\t")
            parts.append(_located(table, _integer_stars(table), users, movies))
            _check_rated(parts[-1], full, users.ids, movies.ids)
        train, test = drop_duplicates(parts, on_duplicate, users.ids, movies.ids)
        split = (train, test)

    return _dataset("ml-100k", movies, users, STARS, full, split)


def load_movielens_dat(root: str | Path, on_duplicate: str = "error") -> Dataset:
    """Load MovieLens-1M or -10M from the ``::``-separated ``*.dat`` files in ``root``.

    Files:

    * ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``. The scale is
      the published one of the release that the files are: with ``users.dat``,
      ML-1M (dataset name ``"ml-1m"``), the integers 1-5; without it, ML-10M
      (``"ml-10m"``), the half stars 0.5, 1.0, ..., 5.0. It never depends on
      the ratings present, which are private; every rating must be on it, else
      the error names the file, line and field. Read as Latin-1 (the file is
      ASCII).
    * ``movies.dat``: ``MovieID::Title::Genres`` with ``|``-separated genres.
      Decoded as UTF-8 (ML-10M) when that succeeds, else as Latin-1 (ML-1M).
      Every movie listed is in the catalogue; a rating of a movie not listed
      is an error.
    * ``users.dat`` (optional; ML-1M has it, ML-10M does not):
      ``UserID::Gender::Age::Occupation::Zip-code`` with the ML-1M codes: age
      1, 18, 25, 35, 45, 50, 56 and occupation 0-20. Read as Latin-1.

    ``on_duplicate``: ``"error"`` or ``"keep-latest"`` (see
    :func:`load_movielens_100k`).
    """
    root = Path(root)
    check_on_duplicate(on_duplicate)
    movies = _read_movies_dat(root / "movies.dat")
    ratings = _read_ratings(root / "ratings.dat", "::")
    ml_1m = (root / "users.dat").is_file()
    levels, name = (STARS, "ml-1m") if ml_1m else (HALF_STARS, "ml-10m")
    scale = (
        "an integer rating 1-5 (ML-1M: users.dat is present)"
        if ml_1m
        else "a half-star rating 0.5-5.0 (ML-10M: there is no users.dat)"
    )
    rating = ratings.floats("rating", scale)
    ratings.check_in("rating", rating, levels, scale)
    users = _read_users_1m(root / "users.dat") if ml_1m else _users_of(ratings)
    (interactions,) = drop_duplicates(
        [_located(ratings, rating, users, movies)], on_duplicate, users.ids, movies.ids
    )
    return _dataset(name, movies, users, levels, interactions)


def _dataset(
    name: str,
    movies: _Movies,
    users: _Users,
    levels: tuple[float, ...],
    interactions: Interactions,
    split: tuple[Interactions, Interactions] | None = None,
) -> Dataset:
    return Dataset(
        name=name,
        catalogue=Catalogue(
            item_ids=movies.ids,
            item_text=movies.text,
            rating_levels=levels,
            user_feature_names=users.feature_names,
        ),
        user_ids=users.ids,
        interactions=interactions,
        user_features=users.features,
        user_columns=users.columns,
        canonical_split=split,
    )


def _read_u_item(path: Path, genres: tuple[str, ...]) -> _Movies:
    table = read_table(path, "|", (*_U_ITEM_COLUMNS, *genres), encodings=_LATIN_1)
    flags = np.stack([_genre_flag(table, genre) for genre in genres], axis=1)
    genres_of = ([g for g, f in zip(genres, row, strict=True) if f] for row in flags)
    return _movies(table, genres_of)


def _read_movies_dat(path: Path) -> _Movies:
    table = read_table(path, "::", ("item", "title", "genres"), encodings=("utf-8", "latin-1"))
    return _movies(table, (genres.split("|") for genres in table.columns["genres"]))


def _movies(table: Table, genres_of: Iterable[list[str]]) -> _Movies:
    """The catalogue of a movie file, given each row's genre names."""
    table.ints("item", "an integer movie id")
    ids, rows = table.distinct("item")
    texts = [
        f"{title.strip()}. Genres: {', '.join(genres)}." if genres else f"{title.strip()}."
        for title, genres in zip(table.columns["title"], genres_of, strict=True)
    ]
    return _Movies(ids, tuple(texts[row] for row in rows), str(table.path))


def _genre_names(path: Path) -> tuple[str, ...]:
    table = read_table(path, "|", ("genre", "index"), encodings=_LATIN_1)
    index = table.ints("index", "an integer genre index")
    wrong = np.flatnonzero(index != np.arange(len(table)))
    if wrong.size:
        row = int(wrong[0])
        raise table.error(row, "index", f"expected {row} (genres in index order 0, 1, ...)")
    return tuple(table.columns["genre"])


def _genre_flag(items: Table, genre: str) -> np.ndarray:
    flag = items.ints(genre, "a genre flag 0 or 1")
    items.check_in(genre, flag, (0, 1), "a genre flag 0 or 1")
    return flag.astype(bool)


def _occupation_names(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        return ML_100K_OCCUPATIONS
    return tuple(read_table(path, "|", ("occupation",), encodings=_LATIN_1).columns["occupation"])


def _read_ratings(path: Path, separator: str) -> Table:
    """A ratings file whose user and item columns are checked to be integers."""
    table = read_table(path, separator, _RATING_COLUMNS, encodings=_LATIN_1)
    table.ints("user", "an integer user id")
    table.ints("item", "an integer movie id")
    return table


def _integer_stars(ratings: Table) -> np.ndarray:
    rating = ratings.ints("rating", "an integer rating 1-5")
    ratings.check_in("rating", rating, STARS, "an integer rating 1-5")
    return rating


def _located(ratings: Table, rating: np.ndarray, users: _Users, movies: _Movies) -> Located:
    return table_interactions(
        ratings,
        users.ids,
        movies.ids,
        rating,
        ratings.ints("timestamp", "an integer timestamp (seconds since the epoch)"),
        users_from=users.source,
        items_from=movies.source,
    )


def _check_rated(
    part: Located, full: Interactions, user_ids: tuple[str, ...], item_ids: tuple[str, ...]
) -> None:
    """Raise unless every rating of ``part`` is in ``full`` (u.data) with the same value."""
    num_items = len(item_ids)
    key = full.user * num_items + full.item
    order = np.argsort(key)
    wanted = part.interactions.user * num_items + part.interactions.item
    at = order[np.minimum(np.searchsorted(key[order], wanted), len(order) - 1)]
    missing = np.flatnonzero(key[at] != wanted)
    if missing.size:
        row = int(missing[0])
        user = user_ids[part.interactions.user[row]]
        item = item_ids[part.interactions.item[row]]
        raise file_error(
            part.path,
            f"user {user!r} did not rate item {item!r} in u.data",
            line=int(part.line[row]),
            field="item",
        )
    differs = np.flatnonzero(full.rating[at] != part.interactions.rating)
    if differs.size:
        row = int(differs[0])
        raise file_error(
            part.path,
            f"expected the rating of u.data, {full.rating[at[row]]:g}, "
            f"got {part.interactions.rating[row]:g}",
            line=int(part.line[row]),
            field="rating",
        )


def _users_of(ratings: Table) -> _Users:
    """The users of a ratings file, without attributes."""
    ids = sorted_ids(ratings.columns["user"])
    return _Users(ids, str(ratings.path), np.zeros((len(ids), 0), np.float32), {}, ())


def _read_users_100k(path: Path, occupations: tuple[str, ...]) -> _Users:
    table = read_table(
        path, "|", ("user", "age", "gender", "occupation", "zip code"), encodings=_LATIN_1
    )
    age = table.ints("age", "an age in years")
    table.check("age", age >= 0, "an age in years")
    starts = [0, *ML_1M_AGE_CODES[1:]]
    group = np.asarray(AGE_GROUPS)[np.searchsorted(starts, age, side="right") - 1]
    occupation = np.asarray(table.columns["occupation"])
    table.check_in("occupation", occupation, occupations, f"one of {occupations}")
    return _users(table, group, occupation, occupations)


def _read_users_1m(path: Path) -> _Users:
    table = read_table(
        path, "::", ("user", "gender", "age", "occupation", "zip code"), encodings=_LATIN_1
    )
    age = table.ints("age", f"an age code {ML_1M_AGE_CODES}")
    table.check_in("age", age, ML_1M_AGE_CODES, f"an age code {ML_1M_AGE_CODES}")
    group = np.asarray(AGE_GROUPS)[np.searchsorted(ML_1M_AGE_CODES, age)]
    code = table.ints("occupation", "an occupation code 0-20")
    table.check_in("occupation", code, range(len(ML_1M_OCCUPATIONS)), "an occupation code 0-20")
    return _users(table, group, np.asarray(ML_1M_OCCUPATIONS)[code], ML_1M_OCCUPATIONS)


def _users(
    table: Table, age_group: np.ndarray, occupation: np.ndarray, occupations: tuple[str, ...]
) -> _Users:
    """Users of a user file, given each row's age group and occupation name."""
    table.ints("user", "an integer user id")
    ids, rows = table.distinct("user")
    gender = np.asarray(table.columns["gender"])
    table.check_in("gender", gender, GENDERS, "'F' or 'M'")
    zip_code = np.asarray(table.columns["zip code"])
    table.check("zip code", np.char.str_len(zip_code) > 0, "a zip code")
    columns = {
        "age-group": age_group[rows],
        "gender": gender[rows],
        "occupation": occupation[rows],
        "zip-region": np.asarray([z[0] for z in zip_code[rows]]),
    }
    features = np.concatenate(
        [
            _one_hot(columns["age-group"], AGE_GROUPS),
            _one_hot(columns["gender"], GENDERS),
            _one_hot(columns["occupation"], occupations),
        ],
        axis=1,
    )
    names = (
        tuple(f"age:{a}" for a in AGE_GROUPS)
        + tuple(f"gender:{g}" for g in GENDERS)
        + tuple(f"occupation:{o}" for o in occupations)
    )
    return _Users(ids, str(table.path), features, columns, names)


def _one_hot(values: np.ndarray, levels: tuple[str, ...]) -> np.ndarray:
    return (values[:, None] == np.asarray(levels)[None, :]).astype(np.float32)
