"""Training data for the sequential ranker, streamed from the Delta feature tables through Arrow.

No Spark and no whole-table pandas: every table is read at a *pinned* Delta version (`pin`), in Arrow
record batches (`feature_store.delta.arrow_batches`), and turned into small integer arrays as it streams.

* `pin(root)` records the version of each table read, once, before anything is read; every later read
  uses those versions, so a pipeline run that writes while training goes on cannot change what the run
  sees, and the versions go into ops.training_runs.
* `load_item_features` builds the one item-index vocabulary (index 0 is padding, items 1..N in item-id
  order: the catalogue of the sequences' codebook version plus every item the sequences mention) and
  aligns every item feature matrix to it by an item_id join, one matrix per feature family, so that an
  ablation says where a gain comes from:
  - semantic tokens (gold.item_semantic_ids: RQ codes without the collision digit, MPQ tokens);
  - catalog facts (bronze.catalog_items, no agent involved): category-path levels, brand, price band;
  - what the agents said beyond the catalog (silver.item_knowledge, only fields whose `field_source` is
    not `catalog`): product type, attributes the catalog does not list, audiences, scenarios, occasions,
    complements and substitutes as a bag of shared tokens, and the summary embedded by the pipeline's
    embedder. `stats["knowledge_sources"]` counts the items per model (or heuristic) that wrote them.
  Row order in the source tables never matters. The inline semantic IDs of gold.user_sequences are
  checked against the aligned codes, so tables from different runs fail loudly instead of training on
  misaligned features.
* `load_beyond_log` maps gold.user_augmented_behaviors (status ok, one model_version) to item indices.
* `check_user_features` streams gold.user_features for coverage and NaN counts. Its columns are not model
  inputs: they aggregate every event of a user, the held-out validation and test targets included.
* `SequenceStream` is the torch IterableDataset: each iteration streams gold.user_sequences again at the
  pinned version and yields collated batches (train: prefixes before the validation target, shuffled
  through a bounded buffer; valid/test: leave-one-out inputs with their target and full history).

Bad input: a missing table raises TableMissing naming it; sequences from several codebook versions, or one
the semantic-ID table lacks, raise DataError; users with fewer than 3 events (no validation target) are
skipped and counted; items without semantic IDs, catalog values or knowledge fall back to a learned
"missing" embedding and are counted (`stats`), never silently shifted onto another item.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import IterableDataset

from feature_store import delta

SEQUENCES = "gold.user_sequences"
SEMANTIC_IDS = "gold.item_semantic_ids"
AUGMENTED = "gold.user_augmented_behaviors"
USER_FEATURES = "gold.user_features"
KNOWLEDGE = "silver.item_knowledge"
CATALOG = "bronze.catalog_items"
READ_TABLES = (SEQUENCES, SEMANTIC_IDS, AUGMENTED, USER_FEATURES, KNOWLEDGE, CATALOG)
MIN_EVENTS = 3  # a user needs a validation and a test target and at least one input item
CATEGORY_DEPTH = 5  # category-path levels read, the root included (the root is then dropped: all alike)
MIN_FIELD_ITEMS = 2  # a value held by one item only says nothing beyond its ID: it counts as missing
PRICE_BANDS = 8  # catalog price bands: quantiles of log price over the items that have one
# The agents' fields that are theirs alone (the catalog states category, brand and price; price_tier
# restates the price): one token per value, e.g. "audiences=home bakers".
LLM_SINGLE_FIELDS = ("product_type",)
LLM_LIST_FIELDS = ("audiences", "scenarios", "occasions", "complements", "substitutes")
MAX_LLM_TOKENS = 32  # per item: 1 type + 5 lists of at most 4 + a few attributes fit
CATALOG_ATTRIBUTE_KEYS = {"brand", "brand name", "manufacturer", "maker", "price", "cost", "category",
                          "categories", "category path"}


class DataError(ValueError):
    """The feature tables cannot be trained on as they are; the message says what to fix."""


# ---------------------------------------------------------------- pinning


@dataclass(frozen=True)
class Pinned:
    """A lakehouse root and the Delta version of every table a run reads."""

    root: str
    versions: dict[str, int]

    def batches(self, name: str, columns: list[str], batch_size: int = 4096, filter=None) -> Iterator[pa.RecordBatch]:
        dt = delta.delta_table(name, self.root, self.versions[name])
        yield from dt.to_pyarrow_dataset().to_batches(columns=columns, batch_size=batch_size, filter=filter)

    def to_json(self) -> str:
        return json.dumps(self.versions, sort_keys=True)


def pin(root: str, tables: tuple[str, ...] = READ_TABLES, versions: dict[str, int] | None = None) -> Pinned:
    """Resolve the current version of each table (or take the given ones); missing tables are named together."""
    versions = dict(versions or {})
    missing = [t for t in tables if t not in versions and not delta.exists(t, root)]
    if missing:
        raise delta.TableMissing(
            f"the ranker reads {', '.join(missing)}, not written yet under {root}: run the nightly refresh "
            "(`make run`) first"
        )
    for t in tables:
        versions.setdefault(t, delta.table_version(t, root))
    return Pinned(root=root, versions=versions)


# ---------------------------------------------------------------- item vocabulary and features


@dataclass
class ItemFeatures:
    """Every item feature, row i describing item_ids[i - 1]; row 0 is padding."""

    item_ids: list[str]
    codebook_version: str
    embedder: str | None
    sid_codes: np.ndarray  # int64 [N+1, n_tokens]; missing = sid_sizes[c] - 1
    sid_sizes: list[int]  # per token column: codebook size + 1 (the "missing" code)
    sid_columns: list[str]  # e.g. rq_0, rq_1, rq_2, mpq_0 ...
    # The model's summary embedded (unit vectors; zero where missing), from the agents' knowledge only.
    knowledge: np.ndarray  # float32 [N+1, dim]
    knowledge_ok: np.ndarray  # bool [N+1]
    stats: dict = field(default_factory=dict)
    # Catalog facts (bronze.catalog_items) as categorical columns: category_1.., brand, price_band:
    # int64 [N+1, n_columns], 0 = missing or rare; catalog_sizes[c] values per column (with the 0).
    catalog_fields: np.ndarray | None = None
    catalog_sizes: list[int] = field(default_factory=list)
    catalog_columns: list[str] = field(default_factory=list)
    # The agents' own fields as a bag of shared tokens: int64 [N+1, T], 0 = padding; llm_vocab[j - 1]
    # is token j's text ("product_type=digital scale").
    llm_tokens: np.ndarray | None = None
    llm_vocab: list[str] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def index(self) -> dict[str, int]:
        return {item: i + 1 for i, item in enumerate(self.item_ids)}

    def sid_prefix_codes(self, min_items: int = MIN_FIELD_ITEMS) -> tuple[np.ndarray, list[int]]:
        """The token columns with each RQ level replaced by the prefix up to it: (c1), (c1, c2), ...

        A residual code means something only under its parents, so level l's token names the path to it.
        A prefix fewer than `min_items` items share says nothing beyond the item's ID and gets the column's
        "missing" code, as items without semantic IDs do. MPQ columns (unordered experts) are unchanged.
        """
        codes = self.sid_codes.copy()
        sizes = list(self.sid_sizes)
        rq = [c for c, name in enumerate(self.sid_columns) if name.startswith("rq_")]
        missing = np.zeros(len(codes), dtype=bool)
        missing[0] = True
        for depth, c in enumerate(rq):
            missing |= self.sid_codes[:, c] == self.sid_sizes[c] - 1
            keys = self.sid_codes[:, rq[: depth + 1]]
            _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
            inverse = inverse.reshape(-1)
            shared = (counts[inverse] >= min_items) & ~missing
            ids = np.full(len(codes), -1, dtype=np.int64)
            _, ids[shared] = np.unique(inverse[shared], return_inverse=True)
            sizes[c] = int(ids.max()) + 2
            codes[:, c] = np.where(shared, ids, sizes[c] - 1)
        return codes, sizes

    def vocab_array(self) -> pa.Array:
        return pa.array(self.item_ids, pa.string())


def _to_index(values: pa.Array, vocab: pa.Array, what: str) -> np.ndarray:
    """item_id strings -> vocabulary indices (1-based); an id outside the vocabulary is an error."""
    idx = pc.index_in(values, value_set=vocab)
    if idx.null_count:
        unknown = pc.filter(values, pc.is_null(idx)).unique().to_pylist()[:5]
        raise DataError(f"{what}: {idx.null_count} item ids outside the vocabulary, e.g. {unknown}")
    return idx.to_numpy(zero_copy_only=False).astype(np.int64) + 1


def sequence_codebook_version(pinned: Pinned, batch_size: int = 4096) -> tuple[str, set[str], dict]:
    """(the sequences' one codebook version, every item id they mention, user counts), streamed."""
    versions: set[str] = set()
    items: set[str] = set()
    users = short = 0
    for b in pinned.batches(SEQUENCES, ["item_ids", "seq_len", "codebook_version"], batch_size):
        users += b.num_rows
        short += int(pc.sum(pc.less(b.column("seq_len"), MIN_EVENTS)).as_py() or 0)
        versions.update(v for v in b.column("codebook_version").unique().to_pylist())
        items.update(pc.unique(pc.list_flatten(b.column("item_ids"))).to_pylist())
    if users == 0:
        raise DataError(f"{SEQUENCES} (version {pinned.versions[SEQUENCES]}) has no rows")
    if None in versions:
        raise DataError(f"{SEQUENCES}: rows without codebook_version; rebuild the sequences")
    if len(versions) != 1:
        raise DataError(f"{SEQUENCES} mixes codebook versions {sorted(versions)}: rebuild the sequences")
    items.discard(None)
    return versions.pop(), items, {"users": users, "users_too_short": short}


def load_item_features(pinned: Pinned, *, embedder: str | None = None, batch_size: int = 4096,
                       embed: Callable[[list[str]], np.ndarray] | None = None) -> ItemFeatures:
    """Every item feature aligned to one vocabulary. `embed` (texts -> unit vectors, e.g. the pipeline's
    MiniLM) embeds the agents' summaries; without it no item has a summary vector."""
    version, seq_items, user_counts = sequence_codebook_version(pinned, batch_size)

    # Semantic IDs of that codebook version, streamed and filtered at the source.
    sid_rows: dict[str, tuple[list[int], list[int]]] = {}
    embedders: set[str] = set()
    seen_versions: set[str] = set()
    dupes = 0
    for b in pinned.batches(SEMANTIC_IDS, ["item_id", "codebook_version", "rq_codes", "mpq_tokens", "embedder"],
                            batch_size):
        seen_versions.update(b.column("codebook_version").unique().to_pylist())
        b = b.filter(pc.equal(b.column("codebook_version"), version))
        embedders.update(e for e in b.column("embedder").unique().to_pylist() if e)
        for item, rq, mpq in zip(b.column("item_id").to_pylist(), b.column("rq_codes").to_pylist(),
                                 b.column("mpq_tokens").to_pylist(), strict=True):
            dupes += item in sid_rows
            rq, mpq = rq or [], mpq or []
            if any(c is None or c < 0 for c in rq + mpq):
                raise DataError(f"{SEMANTIC_IDS}: item {item} has null or negative codes under {version!r}")
            sid_rows[item] = (rq, mpq)
    if not sid_rows:
        raise DataError(
            f"codebook version mismatch: {SEQUENCES} was built with {version!r} but {SEMANTIC_IDS} "
            f"(version {pinned.versions[SEMANTIC_IDS]}) holds only {sorted(v for v in seen_versions if v)}; "
            "rerun assign_semantic_ids and build_user_sequences together"
        )
    if dupes:
        raise DataError(f"{SEMANTIC_IDS}: {dupes} duplicate item ids under codebook version {version!r}")

    item_ids = sorted(set(sid_rows) | seq_items)
    index = {item: i + 1 for i, item in enumerate(item_ids)}
    n = len(item_ids)

    # Token columns: the L hierarchical codes (the collision digit only numbers items that share all L
    # codes: it means nothing across prefixes, and the ID embedding already tells such items apart),
    # then one column per MPQ expert.
    rq_len = {len(r) for r, _ in sid_rows.values() if r}
    mpq_len = {len(m) for _, m in sid_rows.values() if m}
    if len(rq_len) > 1 or len(mpq_len) > 1:
        raise DataError(f"{SEMANTIC_IDS}: codes of several lengths under {version!r}: rq {rq_len}, mpq {mpq_len}")
    n_rq = max(rq_len or {1}) - 1
    n_mpq = max(mpq_len or {0})
    cols = [f"rq_{i}" for i in range(n_rq)] + [f"mpq_{i}" for i in range(n_mpq)]
    codes = np.full((n + 1, len(cols)), -1, dtype=np.int64)
    for item, (rq, mpq) in sid_rows.items():
        row = (rq[:n_rq] if len(rq) == n_rq + 1 else [-1] * n_rq) + (mpq if len(mpq) == n_mpq else [-1] * n_mpq)
        codes[index[item]] = row
    sizes = [int(codes[:, c].max()) + 2 for c in range(len(cols))]  # + the "missing" code
    for c in range(len(cols)):
        codes[codes[:, c] < 0, c] = sizes[c] - 1
    without_sid = sum(1 for item in item_ids if item not in sid_rows)

    if embedder is None:
        if len(embedders) > 1:
            raise DataError(f"{SEMANTIC_IDS}: several embedders {sorted(embedders)} under {version!r}; "
                            "name one (ranker.embedder)")
        embedder = next(iter(embedders), None)

    if CATALOG in pinned.versions:
        cat, cat_sizes, cat_cols, cat_stats = _catalog_fields(pinned, index, n, batch_size)
    else:  # a caller that pinned without the catalog asked for no catalog facts
        cat, cat_sizes, cat_cols, cat_stats = None, [], [], {"catalog_fields": "not read"}
    if KNOWLEDGE in pinned.versions:
        tokens, vocab, summaries, llm_stats = _llm_knowledge(pinned, index, n, batch_size)
    else:
        tokens, vocab, summaries, llm_stats = None, [], {}, {"knowledge_sources": "not read"}
    know, know_ok = _summary_vectors(summaries, n, embed)
    llm_stats["items_with_summary_vector"] = int(know_ok.sum())

    stats = {
        "codebook_version": version, "embedder": embedder, "items": n, "catalog_items": len(sid_rows),
        "sequence_items_without_semantic_id": without_sid,
        "sid_columns": cols, "sid_sizes": sizes, **user_counts, **cat_stats, **llm_stats,
    }
    feats = ItemFeatures(item_ids=item_ids, codebook_version=version, embedder=embedder, sid_codes=codes,
                         sid_sizes=sizes, sid_columns=cols, knowledge=know, knowledge_ok=know_ok, stats=stats,
                         catalog_fields=cat, catalog_sizes=cat_sizes, catalog_columns=cat_cols,
                         llm_tokens=tokens, llm_vocab=vocab)
    check_sequence_alignment(pinned, feats, batch_size)
    return feats


def newest_knowledge(pinned: Pinned, index: dict[str, int], columns: list[str], batch_size: int = 4096,
                     usable: Callable[[dict], bool] | None = None) -> tuple[dict[int, dict], int]:
    """Per item index, its newest `ok` silver.item_knowledge row (the given columns) that `usable` accepts;
    newest by ds, then prompt_version, model and content_hash, so the choice never depends on row order.
    Also how many rows were read."""
    order = ["ds", "prompt_version", "model", "content_hash"]
    cols = list(dict.fromkeys(["item_id", "status", *order, *columns]))
    best: dict[int, tuple] = {}
    rows = 0
    for b in pinned.batches(KNOWLEDGE, cols, batch_size):
        for values in zip(*(b.column(c).to_pylist() for c in cols), strict=True):
            rows += 1
            row = dict(zip(cols, values, strict=True))
            i = index.get(row["item_id"])
            if i is None or row["status"] != "ok" or (usable is not None and not usable(row)):
                continue
            key = (row["ds"].toordinal() if row["ds"] else 0, *(row[c] or "" for c in order[1:]))
            if i not in best or key > best[i][0]:
                best[i] = (key, row)
    return {i: row for i, (_, row) in best.items()}, rows


def _categorical_columns(names: list[str], values: dict[int, list], n: int) -> tuple[np.ndarray, list[int], list[str], dict]:
    """Per column, the values at least MIN_FIELD_ITEMS items share as ids 1.. (0: missing or rare). A
    column with fewer than two shared values is dropped (one value shared by all, such as the catalog's
    root category, tells nothing)."""
    kept_cols, kept_names, sizes, per_col = [], [], [], {}
    for c, name in enumerate(names):
        counts: dict[str, int] = {}
        for row in values.values():
            if row[c] is not None:
                counts[row[c]] = counts.get(row[c], 0) + 1
        shared = sorted(v for v, k in counts.items() if k >= MIN_FIELD_ITEMS)
        if len(shared) < 2:
            continue
        ids = {v: j + 1 for j, v in enumerate(shared)}
        col = np.zeros(n + 1, dtype=np.int64)
        for i, row in values.items():
            col[i] = ids.get(row[c], 0)
        kept_cols.append(col)
        kept_names.append(name)
        sizes.append(len(shared) + 1)
        per_col[name] = {"values": len(shared), "items_with_value": int((col > 0).sum())}
    fields = np.stack(kept_cols, axis=1) if kept_cols else np.zeros((n + 1, 0), dtype=np.int64)
    return fields, sizes, kept_names, per_col


def normalize_text(text) -> str | None:
    """Lower case, runs of whitespace made one space; None for nothing left (how a knowledge value is compared)."""
    out = " ".join(str(text).split()).lower() if text is not None else ""
    return out or None


def _catalog_fields(pinned: Pinned, index: dict[str, int], n: int, batch_size: int):
    """The catalog's own facts as categorical columns: one per category-path level (the prefix up to that
    level, so two leaves of the same name under different parents stay apart), the brand, and the price
    band (PRICE_BANDS quantiles of log price over the vocabulary's items with a price)."""
    rows: dict[int, tuple[list[str], str | None, float | None]] = {}
    for b in pinned.batches(CATALOG, ["item_id", "categories", "brand", "price"], batch_size):
        for item, cats, brand, price in zip(*(b.column(c).to_pylist() for c in ("item_id", "categories", "brand",
                                                                                "price")), strict=True):
            i = index.get(item)
            if i is None:
                continue
            if i in rows:
                raise DataError(f"{CATALOG}: item {item} appears twice (its key is item_id)")
            path = [str(x).strip() for x in (cats or []) if x is not None and str(x).strip()]
            ok_price = price if price is not None and math.isfinite(price) and price > 0 else None
            rows[i] = (path, normalize_text(brand), ok_price)
    prices = np.log([p for _, _, p in rows.values() if p is not None])
    edges = np.quantile(prices, np.linspace(0, 1, PRICE_BANDS + 1)[1:-1]) if len(prices) else np.zeros(0)
    values = {}
    for i, (path, brand, price) in rows.items():
        levels = [" > ".join(path[: d + 1]) if d < len(path) else None for d in range(CATEGORY_DEPTH)]
        band = None if price is None else f"band {int(np.searchsorted(edges, math.log(price), side='right'))}"
        values[i] = levels + [brand, band]
    names = [f"category_{d + 1}" for d in range(CATEGORY_DEPTH)] + ["brand", "price_band"]
    fields, sizes, kept, per_col = _categorical_columns(names, values, n)
    return fields, sizes, kept, {"catalog_rows": len(rows), "catalog_fields": per_col}


def _llm_knowledge(pinned: Pinned, index: dict[str, int], n: int, batch_size: int):
    """What the agents said beyond the catalog, per item (its newest `ok` knowledge row): a bag of the tokens
    at least MIN_FIELD_ITEMS items share, and the summary text. A field counts only where the row's
    `field_source` names a model (or, for rows written before that column, is absent); attribute keys
    that restate catalog facts (brand, price, category) never count."""
    cols = [*LLM_SINGLE_FIELDS, *LLM_LIST_FIELDS, "attributes", "summary", "field_source", "model"]
    newest, rows = newest_knowledge(pinned, index, cols, batch_size)
    per_item: dict[int, list[str]] = {}
    summaries: dict[int, str] = {}
    sources: dict[str, int] = {}
    for i, row in newest.items():
        source = dict(row["field_source"] or [])
        theirs = {f for f in (*LLM_SINGLE_FIELDS, *LLM_LIST_FIELDS, "attributes", "summary")
                  if source.get(f, row["model"]) != "catalog"}
        toks = [f"{f}={v}" for f in LLM_SINGLE_FIELDS if f in theirs and (v := normalize_text(row[f]))]
        toks += [f"{f}={v}" for f in LLM_LIST_FIELDS if f in theirs for x in (row[f] or []) if (v := normalize_text(x))]
        if "attributes" in theirs:
            toks += [f"attribute {k}={v}" for key, val in (row["attributes"] or [])
                     if (k := normalize_text(key)) and k not in CATALOG_ATTRIBUTE_KEYS and (v := normalize_text(val))]
        summary = normalize_text(row["summary"]) if "summary" in theirs else None
        if summary:
            summaries[i] = str(row["summary"]).strip()
        if toks:
            per_item[i] = list(dict.fromkeys(toks))
        if toks or summary:
            sources[row["model"]] = sources.get(row["model"], 0) + 1
    counts: dict[str, int] = {}
    for toks in per_item.values():
        for t in toks:
            counts[t] = counts.get(t, 0) + 1
    vocab = sorted(t for t, k in counts.items() if k >= MIN_FIELD_ITEMS)
    ids = {t: j + 1 for j, t in enumerate(vocab)}
    kept = {i: [ids[t] for t in toks if t in ids][:MAX_LLM_TOKENS] for i, toks in per_item.items()}
    width = max((len(v) for v in kept.values()), default=0)
    tokens = np.zeros((n + 1, max(width, 1)), dtype=np.int64)
    for i, v in kept.items():
        tokens[i, : len(v)] = v
    stats = {"knowledge_rows": rows, "knowledge_sources": dict(sorted(sources.items())),
             "items_with_knowledge": sum(sources.values()), "items_with_llm_tokens": int((tokens > 0).any(1).sum()),
             "llm_vocabulary": len(vocab)}
    return tokens, vocab, summaries, stats


def _summary_vectors(summaries: dict[int, str], n: int, embed: Callable[[list[str]], np.ndarray] | None):
    """The summaries embedded, aligned to the vocabulary: (float32 [N+1, dim] unit rows, ok mask)."""
    ok = np.zeros(n + 1, dtype=bool)
    if not summaries or embed is None:
        return np.zeros((n + 1, 1), dtype=np.float32), ok
    order = sorted(summaries)
    vecs = np.asarray(embed([summaries[i] for i in order]), dtype=np.float32)
    finite = np.isfinite(vecs).all(axis=1)
    mat = np.zeros((n + 1, vecs.shape[1]), dtype=np.float32)
    rows = np.asarray(order)[finite]
    mat[rows] = vecs[finite]
    ok[rows] = True
    return mat, ok


def check_sequence_alignment(pinned: Pinned, feats: ItemFeatures, batch_size: int = 4096) -> None:
    """The inline semantic IDs of gold.user_sequences must equal the aligned codes of the same items."""
    n_rq = sum(c.startswith("rq_") for c in feats.sid_columns)
    if n_rq == 0:
        return
    vocab = feats.vocab_array()
    mismatched = checked = 0
    example = None
    for b in pinned.batches(SEQUENCES, ["item_ids", "semantic_ids"], batch_size):
        items = pc.list_flatten(b.column("item_ids"))
        sids = pc.list_flatten(b.column("semantic_ids"))
        if len(items) != len(sids):
            raise DataError(f"{SEQUENCES}: item_ids and semantic_ids differ in length")
        present = pc.is_valid(sids)
        items, sids = pc.filter(items, present), pc.filter(sids, present)
        if not len(items):
            continue
        rows = _to_index(items, vocab, SEQUENCES)
        lens = pc.list_value_length(sids).to_numpy(zero_copy_only=False)
        good = lens >= n_rq
        flat = pc.list_flatten(sids).to_numpy(zero_copy_only=False)
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        inline = np.stack([flat[starts[good] + k] for k in range(n_rq)], axis=1)
        expect = feats.sid_codes[rows[good], :n_rq]
        bad = (inline != expect).any(axis=1)
        mismatched += int(bad.sum()) + int((~good).sum())
        checked += len(rows)
        if example is None and bad.any():
            j = int(np.argmax(bad))
            example = (items[int(np.flatnonzero(good)[j])].as_py(), inline[j].tolist(), expect[j].tolist())
    feats.stats["sequence_events_checked"] = checked
    if mismatched:
        raise DataError(
            f"{SEQUENCES} and {SEMANTIC_IDS} disagree on the semantic IDs of {mismatched} of {checked} events "
            f"(e.g. item {example[0]}: {example[1]} in the sequences, {example[2]} in the table): the tables "
            "come from different runs; rerun build_user_sequences" if example else
            f"{SEQUENCES}: {mismatched} events with malformed semantic IDs"
        )


# ---------------------------------------------------------------- user-side tables


def load_beyond_log(pinned: Pinned, feats: ItemFeatures, model_version: str | None = None, top_k: int = 10,
                    batch_size: int = 4096) -> tuple[dict[str, np.ndarray], dict]:
    """user_id -> inferred item indices (status ok, best first, at most top_k; an item outside the vocabulary
    keeps its rank slot as 0), and counts."""
    by_version: dict[str, list[int]] = {}
    for b in pinned.batches(AUGMENTED, ["model_version", "ds", "status"], batch_size):
        for mv, ds, st in zip(*(b.column(c).to_pylist() for c in ("model_version", "ds", "status")), strict=True):
            rec = by_version.setdefault(mv, [0, 0, ds.toordinal() if ds else 0])
            rec[0] += 1
            rec[1] += st == "ok"
            rec[2] = max(rec[2], ds.toordinal() if ds else 0)
    if model_version is None:
        if not by_version:
            raise DataError(f"{AUGMENTED} (version {pinned.versions[AUGMENTED]}) has no rows")
        # The newest model's rows (latest ds), then the one with most usable rows, then by name.
        model_version = max(by_version, key=lambda m: (by_version[m][2], by_version[m][1], m))
    elif model_version not in by_version:
        raise DataError(f"{AUGMENTED} has no rows of model_version {model_version!r}; it has {sorted(by_version)}")
    index = feats.index()
    out: dict[str, np.ndarray] = {}
    status: dict[str, int] = {}
    unknown = empty = 0
    filt = pc.field("model_version") == model_version
    for b in pinned.batches(AUGMENTED, ["user_id", "item_ids", "status"], batch_size, filter=filt):
        for user, items, st in zip(*(b.column(c).to_pylist() for c in ("user_id", "item_ids", "status")),
                                   strict=True):
            status[st] = status.get(st, 0) + 1
            if st != "ok":
                continue
            slots, n_unknown = _rank_slots(items, index, top_k)
            unknown += n_unknown
            if slots is None:
                empty += 1
                continue
            out[user] = slots
    return out, {"beyond_log_model_version": model_version, "beyond_log_status": status,
                 "beyond_log_users": len(out), "beyond_log_items_outside_vocabulary": unknown,
                 "beyond_log_ok_rows_without_items": empty, "beyond_log_models": sorted(by_version)}


@dataclass
class BeyondLogContexts:
    """Beyond-log context per split (user_id -> item indices), each made without seeing its split's target.

    test: the published table (every event but the test target); valid and train: the point-in-time
    inferences of jobs.point_in_time.point_in_time_contexts (as of the validation cut and of the last
    training target). A train context belongs to the last training position only.
    """

    train: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]
    test: dict[str, np.ndarray]


def item_lists_to_index(by_user: dict[str, list[str]], feats: ItemFeatures, top_k: int) -> tuple[dict, int]:
    """user_id -> item indices of the first top_k items (one outside the vocabulary keeps its rank slot as 0);
    and how many items were outside the vocabulary."""
    index = feats.index()
    out, unknown = {}, 0
    for user, items in by_user.items():
        slots, n_unknown = _rank_slots(items, index, top_k)
        unknown += n_unknown
        if slots is not None:
            out[user] = slots
    return out, unknown


def _rank_slots(items: list[str] | None, index: dict[str, int], top_k: int) -> tuple[np.ndarray | None, int]:
    """The first top_k items as indices, an unknown item keeping its rank slot as padding (0) so the items
    after it keep their rank; None when no item is known. Also how many of them were unknown."""
    rows = [index.get(i) for i in (items or [])][:top_k]
    unknown = sum(r is None for r in rows)
    rows = [r or 0 for r in rows]
    return (np.asarray(rows, dtype=np.int64) if any(rows) else None), unknown


def check_user_features(pinned: Pinned, batch_size: int = 4096) -> dict:
    """Coverage and NaN counts of gold.user_features (read for lineage and checks, not a model input)."""
    rows = 0
    nan: dict[str, int] = {}
    numeric = ("days_since_last", "mean_gap_days")
    for b in pinned.batches(USER_FEATURES, ["user_id", *numeric], batch_size):
        rows += b.num_rows
        for c in numeric:
            col = b.column(c)
            nan[c] = nan.get(c, 0) + col.null_count + int(pc.sum(pc.is_nan(col.fill_null(0.0))).as_py() or 0)
    return {"user_features_rows": rows, "user_features_nan_or_null": nan}


# ---------------------------------------------------------------- the torch dataset


def _left_pad(seqs: list[np.ndarray], width: int | None = None) -> torch.Tensor:
    width = width or max((len(s) for s in seqs), default=1) or 1
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, width - len(s):] = s[-width:]
    return torch.from_numpy(out)


def _right_pad(seqs: list[np.ndarray]) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=1) or 1
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out)


class SequenceStream(IterableDataset):
    """Collated batches of one split, streamed from gold.user_sequences at the pinned version.

    split "train": per user with >= 4 events, the prefix before the validation target (last max_len + 1
    items) as input[:-1] -> target[1:], shuffled through a buffer of `buffer_size` users (seeded by
    seed + epoch; call set_epoch) and batched by similar length (`_bucketed`). "valid": input = events before the validation target, target = it.
    "test": input = events before the test target (the validation target included), target = it.
    Eval batches carry `history` (every stored event before the target) for excluding seen items.
    Users with fewer than 3 events are skipped (counted in `last_counts`).
    """

    def __init__(self, pinned: Pinned, feats: ItemFeatures, split: str, *, batch_size: int = 256,
                 max_len: int = 50, beyond_log: dict[str, np.ndarray] | None = None, beyond_log_k: int = 10,
                 shuffle: bool | None = None, seed: int = 0, buffer_size: int = 20000,
                 read_batch_rows: int = 2048, bucket_batches: int = 32):
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be train, valid or test, not {split!r}")
        self.pinned, self.feats, self.split = pinned, feats, split
        self.batch_size, self.max_len = batch_size, max_len
        self.beyond_log, self.beyond_log_k = beyond_log, beyond_log_k
        self.shuffle = (split == "train") if shuffle is None else shuffle
        self.seed, self.epoch, self.buffer_size, self.read_batch_rows = seed, 0, buffer_size, read_batch_rows
        self.bucket_batches = max(1, bucket_batches)
        self._vocab = feats.vocab_array()
        self.last_counts: dict[str, int] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rows(self) -> Iterator[tuple[str, np.ndarray]]:
        counts = {"arrow_batches": 0, "max_arrow_batch_rows": 0, "users_read": 0, "users_too_short": 0}
        self.last_counts = counts
        cols = ["user_id", "item_ids", "valid_item_id", "test_item_id"]
        for b in self.pinned.batches(SEQUENCES, cols, self.read_batch_rows):
            counts["arrow_batches"] += 1
            counts["max_arrow_batch_rows"] = max(counts["max_arrow_batch_rows"], b.num_rows)
            counts["users_read"] += b.num_rows
            lists = b.column("item_ids")
            flat = _to_index(pc.list_flatten(lists), self._vocab, SEQUENCES)
            offsets = lists.offsets.to_numpy() - lists.offsets[0].as_py()
            users = b.column("user_id").to_pylist()
            valid = self._target_index(b.column("valid_item_id"))
            test = self._target_index(b.column("test_item_id"))
            for i, user in enumerate(users):
                seq = flat[offsets[i]: offsets[i + 1]]
                if len(seq) < MIN_EVENTS:
                    counts["users_too_short"] += 1
                    continue
                if seq[-1] != test[i] or seq[-2] != valid[i]:
                    raise DataError(f"{SEQUENCES}: user {user}'s valid_item_id / test_item_id are not the last "
                                    "two items of the sequence")
                yield user, seq

    def _target_index(self, col: pa.Array) -> np.ndarray:
        return pc.index_in(col, value_set=self._vocab).fill_null(-1).to_numpy(zero_copy_only=False) + 1

    def _examples(self) -> Iterator[tuple]:
        aug_k = self.beyond_log_k
        for user, seq in self._rows():
            aug = self.beyond_log.get(user, np.zeros(0, np.int64))[:aug_k] if self.beyond_log is not None else None
            if self.split == "train":
                prefix = seq[:-2][-(self.max_len + 1):]
                if len(prefix) < 2:
                    self.last_counts["users_without_training_pair"] = (
                        self.last_counts.get("users_without_training_pair", 0) + 1)
                    continue
                yield prefix[:-1], prefix[1:], aug
            else:
                cut = len(seq) - (2 if self.split == "valid" else 1)
                yield seq[:cut][-self.max_len:], int(seq[cut]), aug, seq[:cut]

    def _shuffled(self) -> Iterator[tuple]:
        if not self.shuffle:
            yield from self._examples()
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        buf: list = []
        for ex in self._examples():
            if len(buf) < self.buffer_size:
                buf.append(ex)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], ex = ex, buf[j]
            yield ex
        rng.shuffle(buf)
        yield from buf

    def _bucketed(self) -> Iterator[list[tuple]]:
        """Batches of similar input length (little padding), from pools of `bucket_batches` batches.

        Train: the pool comes from the shuffle buffer, ties in length are broken at random and the
        batches leave the pool in random order, so batch composition changes every epoch.
        """
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        pool_size = self.batch_size * self.bucket_batches
        pool: list = []

        def drain():
            keys = [len(ex[0]) for ex in pool]
            if self.shuffle:
                order = np.lexsort((rng.random(len(pool)), keys))
            else:
                order = np.argsort(keys, kind="stable")
            batches = [[pool[j] for j in order[i: i + self.batch_size]]
                       for i in range(0, len(pool), self.batch_size)]
            if self.shuffle:
                rng.shuffle(batches)
            return batches

        for ex in self._shuffled():
            pool.append(ex)
            if len(pool) >= pool_size:
                yield from drain()
                pool = []
        if pool:
            yield from drain()

    def _collate(self, chunk: list[tuple]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.split == "train":
            out["input"] = _left_pad([c[0] for c in chunk])
            out["target"] = _left_pad([c[1] for c in chunk], out["input"].shape[1])
        else:
            out["input"] = _left_pad([c[0] for c in chunk])
            out["target"] = torch.tensor([c[1] for c in chunk], dtype=torch.int64)
            out["history"] = _right_pad([c[3] for c in chunk])
        if self.beyond_log is not None:
            out["context"] = _right_pad([c[2] for c in chunk])
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for chunk in self._bucketed():
            yield self._collate(chunk)


def n_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
