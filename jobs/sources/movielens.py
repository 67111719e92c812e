"""Loader for MovieLens 100K (`movielens`), the secondary dataset with real timestamps.

The path is the folder of the GroupLens `ml-100k` files (e.g. /work/shared/data/movielens_100k):

- `u.item` (required, latin-1, pipe-separated): movie_id | title | release_date | video_release_date |
  IMDb_URL | then one 0/1 flag per genre, in the order of `u.genre`.
- `u.data` (required, tab-separated): user_id, item_id, rating, unix_timestamp.
- `u.genre` (optional): `name|index` lines; without it the 19 genres of the 100K release are used.

Items: title as given; description "Released 01-Jan-1995. Genres: Animation, Children's, Comedy." (each part
only when known); categories ["Movies", <genres in u.genre order>]; brand and price null; attributes
{release_date, imdb_url} when non-empty. Interactions: event_type "rating", rating as float, event_ts from the
unix seconds (UTC). Numeric ids are normalised ("007" -> "7") on both files so they join.

A line with the wrong number of fields, a non-0/1 genre flag or a non-numeric id/rating/timestamp is
quarantined as `bad_field_type` with the key `<file>:<line>` (or the movie id when it is readable); blank
lines are skipped and not counted. All other rules are the shared ones (jobs.sources.base).
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

from jobs.sources.base import (
    DESCRIPTION_OPTIONS,
    MAX_ROW_BYTES,
    BatchBuilder,
    SourceBatch,
    SourceError,
    check_options,
    description_limits,
)

NAME = "movielens"
OPTIONS = DESCRIPTION_OPTIONS
EVENT_TYPE = "rating"
GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
_HINT = "pass the ml-100k folder holding u.item and u.data"


def _read_text(file: Path, encoding: str) -> str:
    try:
        return file.read_bytes().decode(encoding, "replace")
    except OSError as e:
        raise SourceError(
            f"{NAME}: {file}: cannot read ({e.strerror or e}): check the path and permissions"
        ) from e


def locate(path: str | Path | None) -> Path:
    if path is None or str(path) == "":
        raise SourceError(f"{NAME}: no path given: {_HINT}")
    folder = Path(path)
    try:
        if not folder.exists():
            raise SourceError(f"{NAME}: {folder}: path does not exist: {_HINT}")
        if not folder.is_dir():
            raise SourceError(f"{NAME}: {folder}: is a file, not a folder: {_HINT}")
        missing = [n for n in ("u.item", "u.data") if not (folder / n).is_file()]
    except OSError as e:
        raise SourceError(
            f"{NAME}: {folder}: cannot read the folder ({e.strerror or e}): check the path and permissions"
        ) from e
    if missing:
        raise SourceError(f"{NAME}: {folder}: missing {' and '.join(missing)}: {_HINT}")
    return folder


def read_genres(file: Path) -> tuple[str, ...]:
    if not file.is_file():
        return GENRES
    by_index: dict[int, str] = {}
    for lineno, line in enumerate(_read_text(file, "latin-1").splitlines(), 1):
        if not line.strip():
            continue
        name, sep, index = line.rpartition("|")
        if not sep or not index.strip().isdigit() or not name.strip():
            raise SourceError(
                f"{NAME}: {file}: line {lineno} is not 'name|index': "
                "fix it or delete u.genre to use the built-in genres"
            )
        by_index[int(index)] = name.strip()
    if sorted(by_index) != list(range(len(by_index))) or not by_index:
        raise SourceError(
            f"{NAME}: {file}: genre indexes are not 0..n-1: "
            "fix it or delete u.genre to use the built-in genres"
        )
    return tuple(by_index[i] for i in range(len(by_index)))


def _norm_id(text: str) -> str:
    if not (text.isascii() and text.isdigit()):
        text = text.strip()
        if not (text.isascii() and text.isdigit()):
            return text
    return text.lstrip("0") or "0"


def _description(release_date: str, genres: list[str]) -> str | None:
    parts = []
    if release_date:
        parts.append(f"Released {release_date}.")
    if genres:
        parts.append(f"Genres: {', '.join(genres)}.")
    return " ".join(parts) or None


def _load_items(b: BatchBuilder, file: Path, genres: tuple[str, ...]) -> None:
    n_fields = 5 + len(genres)
    for lineno, line in enumerate(_read_text(file, "latin-1").split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{file.name}:{lineno}"
        raw = {"file": file.name, "line": lineno, "text": line}
        fields = line.split("|")
        movie_id = _norm_id(fields[0])
        if len(line) > MAX_ROW_BYTES:  # latin-1: one byte per char
            b.reject_item(
                movie_id or None,
                "row_too_large",
                f"line is {len(line)} bytes (max {MAX_ROW_BYTES})",
                raw,
                where=where,
            )
            continue
        if len(fields) != n_fields:
            b.reject_item(
                movie_id or None,
                "bad_field_type",
                f"{len(fields)} fields, expected {n_fields}",
                raw,
                where=where,
            )
            continue
        flags = [f.strip() for f in fields[5:]]
        if any(f not in ("0", "1") for f in flags):
            b.reject_item(movie_id or None, "bad_field_type", "genre flags must be 0 or 1", raw, where=where)
            continue
        item_genres = [g for g, f in zip(genres, flags, strict=True) if f == "1"]
        release_date, imdb_url = fields[2].strip(), fields[4].strip()
        attributes = {k: v for k, v in (("release_date", release_date), ("imdb_url", imdb_url)) if v}
        entry = {
            "title": fields[1],
            "description": _description(release_date, item_genres),
            "categories": ["Movies", *item_genres],
            "brand": None,
            "price": None,
            "attributes": attributes,
        }
        b.add_item(movie_id, entry, raw=raw, where=where, raw_size=len(line))


def _load_interactions(b: BatchBuilder, file: Path) -> None:
    name = file.name
    for lineno, line in enumerate(_read_text(file, "utf-8").split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        raw = {"file": name, "line": lineno, "text": line}
        if len(line) > MAX_ROW_BYTES:
            b.reject_interaction(f"{name}:{lineno}", "row_too_large", f"line is {len(line)} chars", raw)
            continue
        fields = line.split("\t")
        if len(fields) != 4:
            fields = line.split()
        if len(fields) != 4:
            b.reject_interaction(
                f"{name}:{lineno}", "bad_field_type", f"{len(fields)} fields, expected 4", raw
            )
            continue
        user, item, rating_text, ts_text = fields
        try:
            rating = float(rating_text)
            ts_us = int(ts_text) * 1_000_000
        except ValueError:
            b.reject_interaction(
                f"{name}:{lineno}", "bad_field_type", "rating or timestamp is not a number", raw
            )
            continue
        b.add_interaction(_norm_id(user), _norm_id(item), ts_us, EVENT_TYPE, rating, raw=raw)


def load(path: str | Path | None, *, until: date | None = None, options: dict | None = None) -> SourceBatch:
    opts = check_options(NAME, options, OPTIONS)
    folder = locate(path)
    genres = read_genres(folder / "u.genre")
    b = BatchBuilder(NAME, until=until, **description_limits(opts))
    _load_items(b, folder / "u.item", genres)
    _load_interactions(b, folder / "u.data")
    return b.build()
