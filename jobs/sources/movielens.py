"""Loader for the GroupLens MovieLens releases (`movielens`), the dataset with real timestamps.

The path is the folder of one release; its files say which layout it is:

| layout | releases | files |
|---|---|---|
| `100k` | ml-100k | `u.item` (latin-1, `|`-separated: movie_id, title, release_date, video_release_date, IMDb_URL, one 0/1 flag per genre in `u.genre` order), `u.data` (tab-separated: user_id, item_id, rating, unix_timestamp), `u.genre` (optional `name|index` lines; without it the 19 genres of the 100K release) |
| `dat` | ml-1m, ml-10m | `movies.dat` (`MovieID::Title::Genres`, genres `|`-separated), `ratings.dat` (`UserID::MovieID::Rating::Timestamp`) |
| `csv` | ml-20m, ml-25m, ml-32m, ml-latest | `movies.csv` (`movieId,title,genres`, CSV quoting), `ratings.csv` (`userId,movieId,rating,timestamp`), `links.csv` (optional: `movieId,imdbId,tmdbId`) |

Items: title as given; categories ["Movies", <genres>] ("(no genres listed)" is no genre); brand and price
null; description "Released 01-Jan-1995. Genres: Animation, Children's, Comedy." (each part only when known;
the `dat` and `csv` releases have no release date, so the year at the end of the title, "Toy Story (1995)",
is the date there); attributes {release_date, imdb_url} (100k) or {imdb_id, tmdb_id} (links.csv) when
known. Interactions: event_type "rating", rating as float, event_ts from the unix seconds (UTC). Numeric
ids are normalised ("007" -> "7") on both files so they join.

Text: `u.item` is latin-1 (as GroupLens wrote it); the other files are read as UTF-8, and a line that is not
valid UTF-8 as latin-1 (ml-1m's movies.dat is latin-1, the newer releases UTF-8).

Every layout is streamed: files are read a line at a time (a line is read at most MAX_ROW_BYTES into
memory; a longer one is quarantined as `row_too_large` and skipped), the catalog handed over in chunks of
items and the ratings in chunks of events, so the 25-million-rating release never sits whole in the
driver. Duplicate ratings (same user, movie and time) are caught across chunks with a
CompactEventKeys (about 10 bytes a rating).

A line with the wrong number of fields, a non-0/1 genre flag or a non-numeric id/rating/timestamp is
quarantined as `bad_field_type` with the key `<file>:<line>` (or the movie id when it is readable); blank
lines are skipped and not counted; a `csv` file whose header is not the release's stops the load with one
line. All other rules are the shared ones (jobs.sources.base).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path

from jobs.sources.base import (
    DEFAULT_CHUNK_ROWS,
    DESCRIPTION_OPTIONS,
    MAX_ROW_BYTES,
    BatchBuilder,
    CompactEventKeys,
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
NO_GENRES = "(no genres listed)"
# layout: (item file, ratings file); the first whose two files are both in the folder is the one read
LAYOUTS = {"100k": ("u.item", "u.data"), "dat": ("movies.dat", "ratings.dat"), "csv": ("movies.csv", "ratings.csv")}
CSV_HEADERS = {
    "movies.csv": ["movieId", "title", "genres"],
    "ratings.csv": ["userId", "movieId", "rating", "timestamp"],
    "links.csv": ["movieId", "imdbId", "tmdbId"],
}
_HINT = ("pass a MovieLens release folder: u.item + u.data (ml-100k), movies.dat + ratings.dat (ml-1m, "
         "ml-10m) or movies.csv + ratings.csv (ml-20m, ml-25m, ml-32m, ml-latest)")
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


@dataclass(frozen=True)
class Release:
    """Which files of a MovieLens folder are read, and how."""

    layout: str  # a key of LAYOUTS
    items: Path
    ratings: Path

    @property
    def folder(self) -> Path:
        return self.items.parent


def _cannot_read(file: Path, e: OSError) -> SourceError:
    return SourceError(f"{NAME}: {file}: cannot read ({e.strerror or e}): check the path and permissions")


def locate(path: str | Path | None) -> Release:
    if path is None or str(path) == "":
        raise SourceError(f"{NAME}: no path given: {_HINT}")
    folder = Path(path)
    try:
        if not folder.exists():
            raise SourceError(f"{NAME}: {folder}: path does not exist: {_HINT}")
        if not folder.is_dir():
            raise SourceError(f"{NAME}: {folder}: is a file, not a folder: {_HINT}")
        for layout, (items, ratings) in LAYOUTS.items():
            if (folder / items).is_file() and (folder / ratings).is_file():
                return Release(layout, folder / items, folder / ratings)
        # Name what is missing of the layout the folder has started (ml-100k's when it has none of them).
        started = next((files for files in LAYOUTS.values() if any((folder / f).is_file() for f in files)),
                       LAYOUTS["100k"])
        missing = [f for f in started if not (folder / f).is_file()]
    except OSError as e:
        raise SourceError(
            f"{NAME}: {folder}: cannot read the folder ({e.strerror or e}): check the path and permissions"
        ) from e
    raise SourceError(f"{NAME}: {folder}: missing {' and '.join(missing)}: {_HINT}")


def _decode(raw: bytes, encoding: str | None) -> str:
    if encoding:
        return raw.decode(encoding, "replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _lines(file: Path, encoding: str | None = None) -> Iterator[tuple[int, str, bool, int, int]]:
    """(line number, text, too large, size in bytes, bytes read so far) of every non-blank line, reading
    at most MAX_ROW_BYTES + 1 bytes at a time: a longer line is skipped to its end and handed over as its
    first window with `too large` set. `encoding` None: UTF-8, a line that is not valid UTF-8 as latin-1.
    A UTF-8 byte order mark at the start (a file saved by a spreadsheet) is dropped."""
    try:
        with open(file, "rb") as f:
            done = lineno = 0
            while True:
                raw = f.readline(MAX_ROW_BYTES + 1)
                if not raw:
                    return
                lineno += 1
                size = len(raw)
                done += size
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                too_large = size > MAX_ROW_BYTES and not raw.endswith(b"\n")
                rest = raw
                while rest and not rest.endswith(b"\n"):  # the rest of a huge line, a window at a time
                    rest = f.readline(MAX_ROW_BYTES + 1)
                    done += len(rest)
                    size += len(rest)
                text = _decode(raw, encoding).rstrip("\r\n")
                if too_large or text.strip():
                    yield lineno, text, too_large, size, done
    except OSError as e:
        raise _cannot_read(file, e) from e


def _size(file: Path) -> int:
    try:
        return file.stat().st_size
    except OSError as e:
        raise _cannot_read(file, e) from e


def read_genres(file: Path) -> tuple[str, ...]:
    """ml-100k's genre names in flag order (u.genre), or the release's 19 when the file is absent."""
    if not file.is_file():
        return GENRES
    by_index: dict[int, str] = {}
    for lineno, line, _, _, _ in _lines(file, "latin-1"):
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


def _description(released: str, genres: list[str]) -> str | None:
    parts = []
    if released:
        parts.append(f"Released {released}.")
    if genres:
        parts.append(f"Genres: {', '.join(genres)}.")
    return " ".join(parts) or None


def _csv_fields(line: str) -> list[str] | None:
    """A CSV line's fields (split on commas unless it quotes), or None when the csv module cannot read it
    (a quoted field over its 128 KiB limit, a stray quote in strict places)."""
    if '"' not in line:
        return line.split(",")
    try:
        return next(csv.reader([line]))
    except csv.Error:
        return None


def _header(file: Path, line: str) -> None:
    """The first non-blank line of a release's CSV must be its header."""
    expected = CSV_HEADERS[file.name]
    if [f.strip() for f in _csv_fields(line) or []] != expected:
        raise SourceError(f"{NAME}: {file}: the first line is {line[:200]!r}, expected the header "
                          f"{','.join(expected)!r}: {_HINT}")


def _links(folder: Path) -> dict[str, dict[str, str]]:
    """links.csv of the csv releases: movie id -> {imdb_id, tmdb_id} (each when given)."""
    file = folder / "links.csv"
    if not file.is_file():
        return {}
    out: dict[str, dict[str, str]] = {}
    header = True
    for _, line, _, _, _ in _lines(file):
        if header:
            _header(file, line)
            header = False
            continue
        fields = _csv_fields(line)
        if fields is None or len(fields) != 3:
            continue  # links are an extra, not an item: a broken line loses only the ids it had
        movie, imdb, tmdb = (f.strip() for f in fields)
        out[_norm_id(movie)] = {k: v for k, v in (("imdb_id", f"tt{imdb}" if imdb else ""), ("tmdb_id", tmdb)) if v}
    return out


def _read_items(b: BatchBuilder, release: Release) -> Iterator[int]:
    """Feed every movie to the builder; yields the bytes of the item file read after each line."""
    file = release.items
    genres = read_genres(release.folder / "u.genre") if release.layout == "100k" else ()
    links = _links(release.folder) if release.layout == "csv" else {}
    header = release.layout == "csv"  # the first non-blank line of a CSV
    for lineno, line, too_large, size, done in _lines(file, "latin-1" if release.layout == "100k" else None):
        where = f"{file.name}:{lineno}"
        raw = {"file": file.name, "line": lineno, "text": line}
        if too_large:
            movie_id = _norm_id(re.split(r"::|[|,]", line, maxsplit=1)[0])
            b.reject_item(movie_id or None, "row_too_large", f"line is {size} bytes (max {MAX_ROW_BYTES})", raw,
                          where=where)
            yield done
            continue
        if release.layout == "100k":
            fields = line.split("|")
            movie_id = _norm_id(fields[0])
            n_fields = 5 + len(genres)
            if len(fields) != n_fields:
                b.reject_item(movie_id or None, "bad_field_type", f"{len(fields)} fields, expected {n_fields}",
                              raw, where=where)
                yield done
                continue
            flags = [f.strip() for f in fields[5:]]
            if any(f not in ("0", "1") for f in flags):
                b.reject_item(movie_id or None, "bad_field_type", "genre flags must be 0 or 1", raw, where=where)
                yield done
                continue
            title = fields[1]
            item_genres = [g for g, f in zip(genres, flags, strict=True) if f == "1"]
            released, imdb_url = fields[2].strip(), fields[4].strip()
            attributes = {k: v for k, v in (("release_date", released), ("imdb_url", imdb_url)) if v}
        else:
            if header:
                _header(file, line)
                header = False
                yield done
                continue
            if release.layout == "csv":
                fields = _csv_fields(line) or []
            else:
                fields = line.split("::")
                if len(fields) > 3:  # a title holding "::": the id is first and the genres last
                    fields = [fields[0], "::".join(fields[1:-1]), fields[-1]]
            movie_id = _norm_id(fields[0]) if fields else ""
            if len(fields) != 3:
                b.reject_item(movie_id or None, "bad_field_type",
                              f"{len(fields)} fields, expected 3" if fields else "not a readable CSV line", raw,
                              where=where)
                yield done
                continue
            title = fields[1]
            item_genres = [g.strip() for g in fields[2].split("|") if g.strip() and g.strip() != NO_GENRES]
            year = _TITLE_YEAR.search(title)
            released = year.group(1) if year else ""
            attributes = dict(links.get(movie_id, {}))
        entry = {
            "title": title,
            "description": _description(released, item_genres),
            "categories": ["Movies", *item_genres],
            "brand": None,
            "price": None,
            "attributes": attributes,
        }
        b.add_item(movie_id, entry, raw=raw, where=where, raw_size=size)
        yield done


def _read_ratings(b: BatchBuilder, release: Release) -> Iterator[int]:
    """Feed every rating to the builder; yields the bytes of the ratings file read after each line."""
    file = release.ratings
    name = file.name
    header = release.layout == "csv"
    for lineno, line, too_large, size, done in _lines(file):
        raw = {"file": name, "line": lineno, "text": line}
        if too_large:
            b.reject_interaction(f"{name}:{lineno}", "row_too_large", f"line is {size} bytes", raw)
            yield done
            continue
        if release.layout == "100k":
            fields = line.split("\t")
            if len(fields) != 4:
                fields = line.split()
        elif release.layout == "dat":
            fields = line.split("::")
        elif header:
            _header(file, line)
            header = False
            yield done
            continue
        else:
            fields = _csv_fields(line) or []
        if len(fields) != 4:
            b.reject_interaction(f"{name}:{lineno}", "bad_field_type",
                                 f"{len(fields)} fields, expected 4" if fields else "not a readable CSV line", raw)
            yield done
            continue
        user, item, rating_text, ts_text = fields
        try:
            rating = float(rating_text)
            ts_us = int(ts_text) * 1_000_000
        except ValueError:
            b.reject_interaction(f"{name}:{lineno}", "bad_field_type", "rating or timestamp is not a number", raw)
            yield done
            continue
        b.add_interaction(_norm_id(user), _norm_id(item), ts_us, EVENT_TYPE, rating, raw=raw)
        yield done


def iter_catalog(path: str | Path | None, *, options: dict | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[SourceBatch]:
    """The movies alone, in chunks of at most `chunk_rows` kept items, read a line at a time (what
    ingest_catalog uses); the chunks' counts add up to load()'s."""
    opts = check_options(NAME, options, OPTIONS)
    release = locate(path)
    b = BatchBuilder(NAME, **description_limits(opts))
    size = _size(release.items)
    for done in _read_items(b, release):
        if b.pending_items() >= chunk_rows:
            yield replace(b.take_items(), progress=(done, size))
    yield replace(b.take_items(), progress=(size, size))


def iter_interactions(path: str | Path | None, *, until: date | None = None, options: dict | None = None,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[SourceBatch]:
    """The ratings alone, in chunks of at most `chunk_rows` events (what ingest_interactions uses): the
    movie file first (each movie's fate decides its ratings'; the kept rows are let go chunk by chunk),
    then the ratings a line at a time, their duplicates caught across chunks in about 10 bytes a rating. The
    chunks' counts add up to load()'s."""
    opts = check_options(NAME, options, OPTIONS)
    release = locate(path)
    b = BatchBuilder(NAME, until=until, event_keys=CompactEventKeys(), **description_limits(opts))
    for _ in _read_items(b, release):
        if b.pending_items() >= chunk_rows:
            b.take_items()  # only the movies' fate (kept or quarantined) is needed here
    b.take_items()
    size = _size(release.ratings)
    for done in _read_ratings(b, release):
        if b.pending_events() >= chunk_rows:
            yield replace(b.take_events(), progress=(done, size))
    yield replace(b.take_events(), progress=(size, size))


def load(path: str | Path | None, *, until: date | None = None, options: dict | None = None) -> SourceBatch:
    opts = check_options(NAME, options, OPTIONS)
    release = locate(path)
    b = BatchBuilder(NAME, until=until, **description_limits(opts))
    for _ in _read_items(b, release):
        pass
    for _ in _read_ratings(b, release):
        pass
    return b.build()
