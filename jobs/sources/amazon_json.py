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
  keep the last, so the object is read with a pairs hook).

`<Name>.inter.json`: one JSON object {user_id: [item_id, ...]}, each list oldest first, without timestamps.
Every element is one raw interaction row; a user whose value is not a list counts as one row, quarantined.
The rows get event_type "review", rating null and a derived, deterministic event_ts:

    event_ts = 2018-01-01T00:00:00Z + position days + offset(user_id) seconds

where position is the element's index in the user's list (0 = oldest; if a user id occurs twice in the
object the second list continues the first's positions) and offset(user_id) = int(user_id) % 86400 when the
id is decimal digits, otherwise int(sha256(user_id)[:12 hex], 16) % 86400. The order within a user is kept,
timestamps are unique per (user, position) and two users rarely share a second. The dates carry no meaning
beyond order: `until` selects by position (until=2018-01-05 keeps each user's first five events).

Both files are read whole (they are a few MB) with the `json` module; the bytes are decoded as UTF-8 with
errors='replace', so broken bytes inside strings become U+FFFD and go through the shared rules
(jobs.sources.base). A file that is not JSON raises SourceError naming the file, line and column.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from jobs.sources.base import (
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


class _Obj(dict):
    """A JSON object that remembers all its (key, value) pairs in file order, duplicates included."""

    pairs: list[tuple[str, Any]]


def _pairs_hook(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj()
    for k, v in pairs:
        obj.setdefault(k, v)
    obj.pairs = pairs
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


def read_json_object(file: Path, what: str) -> _Obj:
    """Parse a whole JSON file whose top level must be an object; errors name the file, line and column."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise SourceError(
            f"{NAME}: {file}: cannot read ({e.strerror or e}): check the path and permissions"
        ) from e
    text = data.decode("utf-8-sig", "replace")
    try:
        doc = json.loads(text, strict=False, object_pairs_hook=_pairs_hook)
    except json.JSONDecodeError as e:
        raise SourceError(
            f"{NAME}: {file}: not valid JSON at line {e.lineno} col {e.colno} ({e.msg}): "
            "fix or re-export the file"
        ) from e
    except (ValueError, RecursionError) as e:
        raise SourceError(
            f"{NAME}: {file}: cannot parse the JSON ({str(e)[:200]}): fix or re-export the file"
        ) from e
    if not isinstance(doc, _Obj):
        raise SourceError(
            f"{NAME}: {file}: top level is a JSON {type(doc).__name__}, expected an object {what}: "
            "point the loader at an LC-Rec style export"
        )
    return doc


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


def load(path: str | Path | None, *, until: date | None = None, options: dict | None = None) -> SourceBatch:
    opts = check_options(NAME, options, OPTIONS)
    item_file, inter_file = locate(path)
    items = read_json_object(item_file, "{item_id: {title, description, brand, categories}}")
    inters = read_json_object(inter_file, "{user_id: [item_id, ...]}")

    b = BatchBuilder(NAME, until=until, **description_limits(opts))
    for n, (item_id, value) in enumerate(items.pairs):
        b.add_item(item_id, _item_entry(value), raw={item_id: value}, where=f"{item_file.name}:entry {n}")

    next_position: dict[str, int] = {}
    for user_id, seq in inters.pairs:
        if not isinstance(seq, list):
            b.reject_interaction(
                f"{user_id}" or f"{inter_file.name}:user {len(next_position)}",
                "bad_field_type",
                f"the value of user {user_id[:80]!r} is a JSON {_json_type(seq)}, "
                "expected a list of item ids",
                {user_id: seq},
            )
            continue
        start = next_position.get(user_id, 0)
        next_position[user_id] = start + len(seq)
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
    return b.build()
