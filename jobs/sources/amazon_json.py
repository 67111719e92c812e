"""Loader for Amazon review datasets in the LC-Rec JSON layout (`amazon-json`).

The path is a folder holding exactly one `<Name>.item.json` and one `<Name>.inter.json` (for example
/work/shared/data/amazon18_scientific: Scientific.item.json, Scientific.inter.json; see its PROVENANCE.md).

`<Name>.item.json`: one JSON object {item_id: {"title", "description", "brand", "categories"}}.
- categories is one string, the path root first, joined with "," and no space; names can themselves contain
  ", ", so it is split with the regex `,(?! )`. A list of strings is accepted as well.
- description "." (the preprocessing's marker for "no description"), "" and any other description without a
  letter or digit (" .", "-.") become null.
- titles keep the trailing "." the preprocessing added to every title.
- optional "price" (number or "$12.99") and "attributes" (object of str) are read when present; any other
  key is ignored.
- a key that occurs twice in the object is a duplicate item id (the first wins; plain `json` would silently
  keep the last, so the top level is read entry by entry and objects inside with a first-wins pairs hook).

`<Name>.inter.json`: one JSON object {user_id: [item_id, ...]}, each list oldest first, without timestamps.
Every element is one raw interaction row; a user whose value is not a list counts as one row, quarantined.
The rows get event_type "review", rating null and a derived, deterministic event_ts:

    event_ts = 2018-01-01T00:00:00Z + position days + offset(user_id) seconds

where position is the element's index in the user's list (0 = oldest; if a user id occurs twice in the
object, or two keys clean to the same id, the second list continues the first's positions, so a user's
event times never repeat) and offset(user_id) = int(user_id) % 86400 when the
id is decimal digits, otherwise int(sha256(user_id)[:12 hex], 16) % 86400. The order within a user is kept,
timestamps are unique per (user, position) and two users rarely share a second. The dates carry no meaning
beyond order: `until` selects by position (until=2018-01-05 keeps each user's first five events).

Both files are read as streams of top-level entries (`JsonObjectStream`: a window of READ_CHARS
characters, each entry decoded by the `json` module), never whole; `iter_catalog` hands the catalog over
in chunks, so ingest_catalog's memory follows the chunk, not the file. The bytes are decoded as UTF-8
with errors='replace', so broken bytes inside strings become U+FFFD and go through the shared rules
(jobs.sources.base). A file that is not JSON raises SourceError naming the file, line and column.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from jobs.progress import Progress
from jobs.sources.base import (
    DEFAULT_CHUNK_ROWS,
    DESCRIPTION_OPTIONS,
    BatchBuilder,
    SourceBatch,
    SourceError,
    check_options,
    description_limits,
    epoch_us,
)

NAME = "amazon-json"
OPTIONS = DESCRIPTION_OPTIONS
EVENT_TYPE = "review"
BASE_TS = datetime(2018, 1, 1, tzinfo=UTC)
_CATEGORY_SPLIT = re.compile(r",(?! )")
_US_PER_DAY = 86_400_000_000


def _first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object inside an entry keeps the first of duplicate keys, as the top level does."""
    obj: dict[str, Any] = {}
    for k, v in pairs:
        obj.setdefault(k, v)
    return obj


def locate(path: str | Path | None) -> tuple[Path, Path]:
    """The (item file, inter file) of a dataset folder, or SourceError saying what is wrong."""
    hint = "pass the folder holding <Name>.item.json and <Name>.inter.json"
    if path is None or str(path) == "":
        raise SourceError(f"{NAME}: no path given: {hint}")
    folder = Path(path)
    try:
        if not folder.exists():
            raise SourceError(f"{NAME}: {folder}: path does not exist: {hint}")
        if not folder.is_dir():
            raise SourceError(f"{NAME}: {folder}: is a file, not a folder: {hint}")
        names = sorted(p.name for p in folder.iterdir())
    except OSError as e:
        raise SourceError(
            f"{NAME}: {folder}: cannot read the folder ({e.strerror or e}): check the path and permissions"
        ) from e
    item_files = [n for n in names if n.endswith(".item.json")]
    inter_files = [n for n in names if n.endswith(".inter.json")]
    if len(item_files) != 1 or len(inter_files) != 1:
        found = ", ".join(item_files + inter_files) or "no *.item.json / *.inter.json files"
        raise SourceError(
            f"{NAME}: {folder}: expected exactly one <Name>.item.json and one <Name>.inter.json, "
            f"found {found}: {hint}"
        )
    stem_item = item_files[0][: -len(".item.json")]
    stem_inter = inter_files[0][: -len(".inter.json")]
    if stem_item != stem_inter:
        raise SourceError(
            f"{NAME}: {folder}: {item_files[0]} and {inter_files[0]} do not share a name: "
            "rename them to the same <Name>"
        )
    return folder / item_files[0], folder / inter_files[0]


def _cannot_read(file: Path, e: OSError) -> SourceError:
    return SourceError(f"{NAME}: {file}: cannot read ({e.strerror or e}): check the path and permissions")


# What the streaming reader holds besides the entry it is parsing: the file is read this many characters
# at a time, so a catalog larger than the driver's memory is read in constant memory (the builder keeps
# only item ids across chunks). An entry still unparsed at MAX_ENTRY_CHARS is a broken file rather than a
# big item (rows over MAX_ROW_BYTES are quarantined anyway): reading stops there with the parse error.
READ_CHARS = 1 << 20
MAX_ENTRY_CHARS = 64 << 20
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder(strict=False, object_pairs_hook=_first_wins)
_TOP_LEVEL_KIND = {"[": "list", '"': "str", "t": "bool", "f": "bool", "n": "null"}


class _Reader:
    """A window over a text file for the streaming parser: `buf[pos:]` is what is left to parse, and
    line/column of any position are kept across the characters already dropped (for error messages)."""

    def __init__(self, f, file: Path):
        self.f, self.file = f, file
        self.buf, self.pos, self.eof = "", 0, False
        self.line_base, self.col_base = 1, 1  # line and column of buf[0] in the file

    def fill(self, at_least: int | None = None) -> None:
        """Drop what is parsed, then read `at_least` (default READ_CHARS, looked up now: tests shrink it) more
        characters, fewer at the end of the file."""
        at_least = at_least or READ_CHARS
        if self.pos:
            gone = self.buf[: self.pos]
            nl = gone.count("\n")
            self.line_base += nl
            self.col_base = (len(gone) - gone.rfind("\n")) if nl else self.col_base + len(gone)
            self.buf, self.pos = self.buf[self.pos :], 0
        try:
            more = self.f.read(at_least)
        except OSError as e:
            raise _cannot_read(self.file, e) from e
        self.eof = not more
        self.buf += more

    def peek(self) -> str:
        if self.pos >= len(self.buf) and not self.eof:
            self.fill()
        return self.buf[self.pos : self.pos + 1]

    def skip_ws(self) -> None:
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return
            self.fill()

    def error(self, msg: str, at: int | None = None) -> SourceError:
        at = self.pos if at is None else at
        nl = self.buf.count("\n", 0, at)
        line = self.line_base + nl
        col = (at - self.buf.rfind("\n", 0, at)) if nl else self.col_base + at
        return SourceError(f"{NAME}: {self.file}: not valid JSON at line {line} col {col} ({msg}): fix or re-export the file")

    def value(self) -> Any:
        """Decode the JSON value at pos, reading more while it may be cut by the window's end."""
        want = READ_CHARS
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.eof or len(self.buf) - self.pos > MAX_ENTRY_CHARS:
                    raise self.error(e.msg, e.pos) from e
            except (ValueError, RecursionError) as e:
                raise SourceError(
                    f"{NAME}: {self.file}: cannot parse the JSON ({str(e)[:200]}): fix or re-export the file"
                ) from e
            else:
                # A number that ends at the window's edge may go on in the next read ("12" of "125").
                if end < len(self.buf) or self.eof:
                    self.pos = end
                    return value
            want *= 2  # a big entry: read more each time, so parsing it again stays O(n log n)
            self.fill(want)


class JsonObjectStream:
    """The (key, value) pairs of a file whose top level is one JSON object, in file order, duplicate keys
    included, read as a stream (READ_CHARS at a time): the file is never held whole. Each value is decoded
    by the standard `json` module (strict=False; an object inside keeps its first of duplicate keys), the
    bytes as UTF-8 with errors='replace'. Errors name the file, line and column. `bytes_read` of `size`
    says how far it got (for progress lines)."""

    def __init__(self, file: Path, what: str):
        self.file, self.what = file, what
        self._raw = None
        try:
            self.size = file.stat().st_size
        except OSError as e:
            raise _cannot_read(file, e) from e

    @property
    def bytes_read(self) -> int:
        return self._raw.tell() if self._raw is not None and not self._raw.closed else self.size

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        file = self.file
        try:
            raw = open(file, "rb")  # noqa: SIM115 (closed by the TextIOWrapper below)
        except OSError as e:
            raise _cannot_read(file, e) from e
        self._raw = raw
        with io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="") as f:
            yield from self._members(_Reader(f, file))

    def _members(self, r: _Reader) -> Iterator[tuple[str, Any]]:
        r.skip_ws()
        first = r.peek()
        if first != "{":
            kind = _TOP_LEVEL_KIND.get(first) or ("number" if first and first in "-0123456789" else None)
            if kind is None:
                raise r.error("Expecting value")
            raise SourceError(
                f"{NAME}: {self.file}: top level is a JSON {kind}, expected an object {self.what}: "
                "point the loader at an LC-Rec style export"
            )
        r.pos += 1
        r.skip_ws()
        if r.peek() == "}":
            r.pos += 1
        else:
            while True:
                if r.peek() != '"':
                    raise r.error("Expecting property name enclosed in double quotes")
                key = r.value()
                r.skip_ws()
                if r.peek() != ":":
                    raise r.error("Expecting ':' delimiter")
                r.pos += 1
                r.skip_ws()
                yield key, r.value()
                r.skip_ws()
                c = r.peek()
                r.pos += 1
                if c == "}":
                    break
                if c != ",":
                    raise r.error("Expecting ',' delimiter", r.pos - 1)
                r.skip_ws()
        r.skip_ws()
        if r.peek():
            raise r.error("Extra data")


def user_offset_seconds(user_id: str) -> int:
    """Seconds added to a user's event times (see the module docstring)."""
    if user_id.isascii() and user_id.isdigit():
        return int(user_id) % 86400
    digest = hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()
    return int(digest[:12], 16) % 86400


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {str: "string", list: "array"}.get(type(value), "object")


def _item_entry(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    entry = dict(value)
    desc = entry.get("description")
    if isinstance(desc, str) and not any(c.isalnum() for c in desc):
        entry["description"] = None  # ".", " ." and "-." are the preprocessing's "no description"
    cats = entry.get("categories")
    if isinstance(cats, str):
        entry["categories"] = _CATEGORY_SPLIT.split(cats) if cats.strip() else None
    return entry


ITEMS_WHAT = "{item_id: {title, description, brand, categories}}"
INTERACTIONS_WHAT = "{user_id: [item_id, ...]}"


def _read_items(b: BatchBuilder, entries: JsonObjectStream) -> Iterator[None]:
    """Feed every entry of the item file to the builder; yields after each one (the caller may take chunks)."""
    item_file = entries.file
    for n, (item_id, value) in enumerate(entries):
        b.add_item(item_id, _item_entry(value), raw={item_id: value}, where=f"{item_file.name}:entry {n}")
        yield


def iter_catalog(path: str | Path | None, *, options: dict | None = None,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[SourceBatch]:
    """The catalog alone, in chunks of at most `chunk_rows` kept items, read as a stream: what ingest_catalog
    uses, so a catalog file larger than the driver's memory is never loaded whole. Each chunk holds its
    items, its quarantine records and the rows it read; the chunks' counts add up to load()'s."""
    opts = check_options(NAME, options, OPTIONS)
    item_file, _ = locate(path)
    b = BatchBuilder(NAME, **description_limits(opts))
    entries = JsonObjectStream(item_file, ITEMS_WHAT)
    for _ in _read_items(b, entries):
        if b.pending_items() >= chunk_rows:
            yield replace(b.take_items(), progress=(entries.bytes_read, entries.size))
    yield replace(b.take_items(), progress=(entries.size, entries.size))


def _read_interactions(b: BatchBuilder, entries: JsonObjectStream) -> Iterator[None]:
    """Feed every user's events to the builder; yields after each user (the caller may take chunks).
    Positions continue per user id as the builder will clean it, so two keys that clean to one id
    continue each other's positions, and no two events of a user share a time (see event_ts above)."""
    inter_file = entries.file
    next_position: dict[str, int] = {}
    for user_id, seq in entries:
        if not isinstance(seq, list):
            b.reject_interaction(
                f"{user_id}" or f"{inter_file.name}:user {len(next_position)}",
                "bad_field_type",
                f"the value of user {user_id[:80]!r} is a JSON {_json_type(seq)}, "
                "expected a list of item ids",
                {user_id: seq},
            )
            yield
            continue
        position_key = BatchBuilder.clean_id(user_id, "user_id") or user_id
        start = next_position.get(position_key, 0)
        next_position[position_key] = start + len(seq)
        base_us = epoch_us(BASE_TS) + user_offset_seconds(user_id) * 1_000_000
        for i, raw_item in enumerate(seq):
            pos = start + i
            ts = (
                base_us + pos * _US_PER_DAY
            )  # int microseconds; absurd positions fail the builder's range check
            b.add_interaction(
                user_id,
                raw_item,
                ts,
                EVENT_TYPE,
                None,
                raw={"user_id": user_id, "position": pos, "item_id": raw_item},
                where=None
                if isinstance(raw_item, int | str) and not isinstance(raw_item, bool)
                else f"{user_id}[{pos}]",
            )
        yield


def iter_interactions(path: str | Path | None, *, until: date | None = None, options: dict | None = None,
                      chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[SourceBatch]:
    """The events alone, in chunks of at most about `chunk_rows` events (a user's list is never split),
    read as streams: the item file first (every item's fate decides its events'; the kept rows are let go
    chunk by chunk), then the user file. What ingest_interactions uses; the chunks' counts add up to
    load()'s. Event times cannot repeat here, so no set of every event key is kept."""
    opts = check_options(NAME, options, OPTIONS)
    item_file, inter_file = locate(path)
    b = BatchBuilder(NAME, until=until, **description_limits(opts))
    items = JsonObjectStream(item_file, ITEMS_WHAT)
    # The events' chunks report their own progress; this pass yields nothing, so it says where it is.
    bar = Progress("item file read for each item's fate", items.size, unit="bytes")
    for _ in _read_items(b, items):
        if b.pending_items() >= chunk_rows:
            b.take_items()  # only the items' fate (kept or quarantined) is needed here
            bar(items.bytes_read)
    b.take_items()
    bar(items.size)
    entries = JsonObjectStream(inter_file, INTERACTIONS_WHAT)
    for _ in _read_interactions(b, entries):
        if b.pending_events() >= chunk_rows:
            yield replace(b.take_events(unique_by_construction=True), progress=(entries.bytes_read, entries.size))
    yield replace(b.take_events(unique_by_construction=True), progress=(entries.size, entries.size))


def load(path: str | Path | None, *, until: date | None = None, options: dict | None = None) -> SourceBatch:
    opts = check_options(NAME, options, OPTIONS)
    item_file, inter_file = locate(path)
    b = BatchBuilder(NAME, until=until, **description_limits(opts))
    for _ in _read_items(b, JsonObjectStream(item_file, ITEMS_WHAT)):
        pass
    for _ in _read_interactions(b, JsonObjectStream(inter_file, INTERACTIONS_WHAT)):
        pass
    return b.build()
