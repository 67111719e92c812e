"""The sequential ranker: Arrow reader (streaming, pinning, alignment, bad input), metrics, training, DAG.

Test tables are small Delta tables written directly with deltalake from the catalog's Arrow schemas
(no Spark): a catalogue of N items where each user walks i -> i+1 -> ... (mod N) from a random start,
so a model learns something in a few epochs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from deltalake import write_deltalake

from feature_store import delta
from feature_store.catalog import get
from models.ranker import RankerConfig, SASRec, fit, make_streams, metrics_from_ranks, rank_of_target
from models.ranker_data import (
    DataError,
    ItemFeatures,
    SequenceStream,
    check_user_features,
    item_lists_to_index,
    load_beyond_log,
    load_item_features,
    pin,
)

ROOT = Path(__file__).resolve().parent.parent
DS = dt.date(2026, 11, 22)
TS0 = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
CB = "cb-test"
N_ITEMS = 30
DIM = 8


def item_id(i: int) -> str:
    return f"it{i % N_ITEMS:03d}"


def codes(i: int) -> tuple[list[int], list[int]]:
    i %= N_ITEMS
    return [i % 4, (i // 4) % 4, i % 3, 0], [i % 5, (i * 7) % 6]


def vector(i: int) -> list[float]:
    rng = np.random.default_rng(1000 + i % N_ITEMS)
    return rng.normal(size=DIM).astype(np.float32).tolist()


def write(root: Path, name: str, rows: list[dict], mode: str = "append") -> None:
    table = pa.Table.from_pylist(rows, schema=get(name).schema)
    write_deltalake(delta.table_path(name, str(root)), table, mode=mode)


def sequence_rows(n_users: int, seed: int = 0, version: str = CB, min_len: int = 3, max_len: int = 9) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start, length = int(rng.integers(N_ITEMS)), int(rng.integers(min_len, max_len + 1))
        items = [start + k for k in range(length)]
        rows.append({
            "user_id": f"u{u:03d}", "item_ids": [item_id(i) for i in items],
            "event_ts": [TS0 + dt.timedelta(days=k) for k in range(length)],
            "semantic_ids": [codes(i)[0] for i in items], "seq_len": length, "n_events_total": length,
            "valid_item_id": item_id(items[-2]) if length >= 3 else None,
            "test_item_id": item_id(items[-1]) if length >= 2 else None,
            "codebook_version": version, "ds": DS, "run_id": "test",
        })
    return rows


def knowledge_rows(n: int = N_ITEMS) -> list[dict]:
    """silver.item_knowledge as the agents write it: the catalog's path (source `catalog`), and the model's
    product type, audiences, complements, a color attribute and a summary, shared by several items each; the
    brand attribute restates the catalog."""
    source = [("category_path", "catalog"), ("product_type", "m"), ("audiences", "m"), ("complements", "m"),
              ("attributes", "m"), ("summary", "m")]
    return [{"item_id": item_id(i), "content_hash": "h", "prompt_version": "p", "model": "m",
             "category_path": ["Root", f"dept{i % 3}", f"leaf{i % 6}"], "product_type": f"type{i % 5}",
             "attributes": [("brand", f"Brand{i % 4}"), ("color", f"c{i % 3}")], "audiences": [f"aud{i % 2}"],
             "complements": [f"comp{i % 7}", f"only{i}"], "summary": f"summary {i % 10}",
             "field_source": source, "status": "ok", "ds": DS, "run_id": "test"}
            for i in range(n)]


def catalog_rows(n: int = N_ITEMS) -> list[dict]:
    """bronze.catalog_items: category paths shared by several items, 4 brands, prices 1..n."""
    return [{"item_id": item_id(i), "title": f"item {i}", "categories": ["Root", f"dept{i % 3}", f"leaf{i % 6}"],
             "brand": f"Brand{i % 4}", "price": float(i + 1), "content_hash": "h", "source": "test",
             "first_seen_ds": DS, "last_seen_ds": DS, "ds": DS, "run_id": "test"} for i in range(n)]


def embed(texts: list[str]) -> np.ndarray:
    """A deterministic stand-in for the sentence embedder: the same text gives the same unit vector."""
    seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in texts]
    out = np.stack([np.random.default_rng(seed).normal(size=DIM) for seed in seeds])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def build_lakehouse(root: Path, n_users: int = 60, order_seed: int | None = None, short_users: int = 0) -> Path:
    """A small lakehouse of the tables the pipeline writes; order_seed shuffles the row order of every item
    table."""
    rng = np.random.default_rng(order_seed)
    perm = rng.permutation(N_ITEMS) if order_seed is not None else np.arange(N_ITEMS)
    sid_rows, emb_rows = [], []
    for i in perm:
        rq, mpq = codes(int(i))
        sid_rows.append({"item_id": item_id(int(i)), "codebook_version": CB, "rq_codes": rq, "mpq_tokens": mpq,
                         "embedder": "test-embedder", "ds": DS, "run_id": "test"})
        vec = vector(int(i))
        emb_rows.append({"item_id": item_id(int(i)), "embedder": "test-embedder", "embedding": vec, "dim": DIM,
                         "text_hash": "h", "prompt_version": "p", "model": "m", "ds": DS, "run_id": "test"})
    # Another codebook version's rows and another dataset's embeddings must be ignored.
    sid_rows.append({"item_id": "other-1", "codebook_version": "cb-old", "rq_codes": [9, 9, 9, 0],
                     "mpq_tokens": [9, 9], "embedder": "test-embedder", "ds": DS, "run_id": "old"})
    emb_rows.append({"item_id": "other-1", "embedder": "test-embedder", "embedding": [1.0] * DIM, "dim": DIM,
                     "text_hash": "h", "prompt_version": "p", "model": "m", "ds": DS, "run_id": "old"})
    write(root, "gold.item_semantic_ids", sid_rows)
    write(root, "silver.item_embeddings", emb_rows)
    know = knowledge_rows()
    write(root, "silver.item_knowledge", [know[int(i)] for i in perm])
    cat = catalog_rows()
    write(root, "bronze.catalog_items", [cat[int(i)] for i in perm])
    seqs = sequence_rows(n_users) + sequence_rows(short_users, seed=99, min_len=1, max_len=2)
    for k, r in enumerate(seqs[n_users:]):
        r["user_id"] = f"short{k}"
    if order_seed is not None:
        seqs = [seqs[j] for j in rng.permutation(len(seqs))]
    write(root, "gold.user_sequences", seqs)
    aug = []
    for r in seqs:
        last = int(r["item_ids"][-1][2:]) if r["item_ids"] else 0
        aug.append({"user_id": r["user_id"], "model_version": "test-bl-v1",
                    "item_ids": [item_id(last + 3), item_id(last + 4)], "scores": [0.6, 0.4],
                    "semantic_ids": [codes(last + 3)[0], codes(last + 4)[0]],
                    "status": "ok" if r["seq_len"] >= 3 else "history_too_short", "n_history": r["seq_len"] - 1,
                    "ds": DS, "run_id": "test"})
    write(root, "gold.user_augmented_behaviors", aug)
    write(root, "gold.user_features", [{
        "user_id": r["user_id"], "n_events": r["seq_len"], "n_items": r["seq_len"], "first_event_ts": TS0,
        "last_event_ts": TS0, "days_since_last": float("nan") if k == 0 else 1.0, "mean_gap_days": 1.0,
        "category_affinity": [], "audience_affinity": [], "scenario_affinity": [], "top_category": None,
        "n_augmented": 2, "augmented_top_category": None, "ds": DS, "run_id": "test",
    } for k, r in enumerate(seqs)])
    return root


@pytest.fixture
def lake(tmp_path) -> str:
    return str(build_lakehouse(tmp_path / "lh"))


# ---------------------------------------------------------------- reader


def test_reader_streams_in_batches_and_never_reads_a_whole_table(lake, monkeypatch):
    def whole_table(*a, **k):
        raise AssertionError("the ranker must stream, not read whole tables")

    monkeypatch.setattr(delta, "read_arrow", whole_table)
    pinned = pin(lake)
    feats = load_item_features(pinned, batch_size=7)
    beyond, _ = load_beyond_log(pinned, feats, batch_size=7)
    check_user_features(pinned, batch_size=7)
    stream = SequenceStream(pinned, feats, "train", batch_size=8, read_batch_rows=4, bucket_batches=1)
    batches = list(stream)
    assert stream.last_counts["arrow_batches"] >= 60 // 4
    assert stream.last_counts["max_arrow_batch_rows"] <= 4
    assert stream.last_counts["users_read"] == 60
    assert all(b["input"].shape[0] <= 8 for b in batches)
    # Every training position predicts the next item of the prefix: target[t] == input[t + 1].
    b = batches[0]
    inp, tgt = b["input"], b["target"]
    both = (inp[:, 1:] != 0) & (tgt[:, :-1] != 0)
    assert torch.equal(inp[:, 1:][both], tgt[:, :-1][both])


def test_training_uses_only_the_prefix_before_the_validation_target(lake):
    pinned = pin(lake)
    feats = load_item_features(pinned)
    index = feats.index()
    seqs = {r["user_id"]: r for r in delta.read_arrow("gold.user_sequences", lake).to_pylist()}
    train = SequenceStream(pinned, feats, "train", batch_size=1000, shuffle=False)
    valid = SequenceStream(pinned, feats, "valid", batch_size=1000)
    test = SequenceStream(pinned, feats, "test", batch_size=1000)
    seen_train = {tuple(x[x != 0].tolist()) for x in next(iter(train))["target"]}
    for r in seqs.values():
        ids = [index[i] for i in r["item_ids"]]
        assert tuple(ids[1:-2]) in seen_train or len(ids) < 4  # targets stop before the validation item
    vb, tb = next(iter(valid)), next(iter(test))
    expect_valid = sorted(index[r["valid_item_id"]] for r in seqs.values())
    expect_test = sorted(index[r["test_item_id"]] for r in seqs.values())
    assert sorted(vb["target"].tolist()) == expect_valid
    assert sorted(tb["target"].tolist()) == expect_test
    # The test input ends with the validation target; the validation input does not contain it at the end.
    valid_of = {index[r["test_item_id"]]: index[r["valid_item_id"]] for r in seqs.values()}
    assert all(tb["input"][k, -1].item() == valid_of[t] for k, t in enumerate(tb["target"].tolist()))


def test_pinned_version_is_unchanged_by_a_later_write(lake):
    pinned = pin(lake)
    feats = load_item_features(pinned)
    before = sorted(next(iter(SequenceStream(pinned, feats, "test", batch_size=1000)))["target"].tolist())
    write(Path(lake), "gold.user_sequences", sequence_rows(10, seed=5), mode="overwrite")
    assert delta.table_version("gold.user_sequences", lake) == pinned.versions["gold.user_sequences"] + 1
    after = sorted(next(iter(SequenceStream(pinned, feats, "test", batch_size=1000)))["target"].tolist())
    assert after == before and len(after) == 60
    fresh = pin(lake)
    assert len(next(iter(SequenceStream(fresh, feats, "test", batch_size=1000)))["target"]) == 10


def test_features_align_to_one_vocabulary_whatever_the_source_row_order(tmp_path):
    a = load_item_features(pin(str(build_lakehouse(tmp_path / "a"))), embed=embed)
    b = load_item_features(pin(str(build_lakehouse(tmp_path / "b", order_seed=7))), embed=embed)
    assert a.item_ids == b.item_ids == sorted(item_id(i) for i in range(N_ITEMS))
    for name in ("sid_codes", "knowledge", "catalog_fields", "llm_tokens"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.llm_vocab == b.llm_vocab
    # Each row holds exactly its own item's source features (the other codebook's row is ignored).
    index = b.index()
    for i in range(N_ITEMS):
        row = index[item_id(i)]
        rq, mpq = codes(i)
        assert b.sid_codes[row].tolist() == rq[:3] + mpq
        assert np.allclose(b.knowledge[row], embed([f"summary {i % 10}"])[0])
        tokens = {b.llm_vocab[t - 1] for t in b.llm_tokens[row] if t}
        assert f"product_type=type{i % 5}" in tokens and f"complements=comp{i % 7}" in tokens
    assert "other-1" not in index
    # Padding row: the "missing" code of every column, no knowledge.
    assert b.sid_codes[0].tolist() == [s - 1 for s in b.sid_sizes] and not b.knowledge_ok[0]
    assert not b.catalog_fields[0].any() and not b.llm_tokens[0].any()
    # Without an embedder no item has a summary vector (the families still load).
    c = load_item_features(pin(str(tmp_path / "a")))
    assert not c.knowledge_ok.any() and np.array_equal(c.llm_tokens, a.llm_tokens)


def test_catalog_facts_come_from_the_catalog_and_leave_rare_values_out(tmp_path):
    root = build_lakehouse(tmp_path / "lh", order_seed=3)
    # Item 0's brand is held by no other item (rare: "missing"), item 1 has no price; the knowledge table's
    # category paths are not read for catalog facts: a newer knowledge row with another path changes nothing.
    cat = catalog_rows()
    cat[0]["brand"], cat[1]["price"] = "OnlyMine", None
    write(root, "bronze.catalog_items", cat, mode="overwrite")
    write(root, "silver.item_knowledge", [{**knowledge_rows()[2], "category_path": ["Other"], "content_hash": "h2",
                                           "ds": DS + dt.timedelta(days=1)}])
    feats = load_item_features(pin(str(root)))
    # The root level is the same for every item (no information): left out.
    assert feats.catalog_columns == ["category_2", "category_3", "brand", "price_band"]
    assert feats.catalog_sizes[:3] == [4, 7, 5] and feats.catalog_fields.shape == (N_ITEMS + 1, 4)
    index = feats.index()
    expect = [lambda i: i % 3, lambda i: i % 6, lambda i: i % 4]
    for c, key in enumerate(expect):
        for i in range(N_ITEMS):
            for j in range(N_ITEMS):
                if c == 2 and 0 in (i, j):
                    continue
                same = feats.catalog_fields[index[item_id(i)], c] == feats.catalog_fields[index[item_id(j)], c]
                assert same == (key(i) == key(j)), (feats.catalog_columns[c], i, j)
    assert feats.catalog_fields[index[item_id(0)], 2] == 0  # its brand is held by no other item
    # Price bands: 8 quantile bands of log price, monotone in price; no price, no band.
    bands = [feats.catalog_fields[index[item_id(i)], 3] for i in range(2, N_ITEMS)]
    assert bands == sorted(bands) and len(set(bands)) == 8 and feats.catalog_fields[index[item_id(1)], 3] == 0
    assert feats.stats["catalog_fields"]["brand"] == {"values": 4, "items_with_value": N_ITEMS - 1}
    # The facts reach the item table of the catalog variants only.
    base = dict(d_model=8, n_heads=2, n_layers=1)
    feats.catalog_fields[index[item_id(5)], 1] = feats.catalog_fields[index[item_id(6)], 1]
    torch.manual_seed(0)
    items = SASRec(feats, RankerConfig(variant="+catalog", **base)).items
    assert items.use_catalog and len(items.catalog) == 4 and not items.use_tokens and not items.use_summary
    for variant in ("+semantic_ids", "+llm_knowledge", "+beyond_log", "id_only"):
        assert not SASRec(feats, RankerConfig(variant=variant, **base)).items.use_catalog, variant
    with torch.no_grad():
        before = items()
        items.catalog[1].weight[feats.catalog_fields[index[item_id(6)], 1]] += 1.0
        changed = (items() - before).abs().sum(1) > 0
    rows = {index[item_id(i)] for i in range(N_ITEMS) if i % 6 == 0} | {index[item_id(5)]}
    assert set(torch.nonzero(changed).flatten().tolist()) == rows


def test_llm_knowledge_is_only_what_a_model_said_beyond_the_catalog(tmp_path):
    root = build_lakehouse(tmp_path / "lh", order_seed=5)
    # Item 3's newest row says its product type came from the catalog: not the model's, left out. Item 4's
    # newest row is a heuristic's, item 5's newest row failed (its older ok row counts).
    newer = DS + dt.timedelta(days=1)
    rows = knowledge_rows()
    write(root, "silver.item_knowledge", [
        {**rows[3], "field_source": [*rows[3]["field_source"][:1], ("product_type", "catalog"),
                                     *rows[3]["field_source"][2:]], "ds": newer, "content_hash": "h2"},
        {**rows[4], "model": "offline-heuristic-v1", "field_source": [("product_type", "offline-heuristic-v1")],
         "summary": None, "ds": newer, "content_hash": "h2"},
        {**rows[5], "product_type": "never", "status": "failed", "ds": newer, "content_hash": "h2"},
    ])
    feats = load_item_features(pin(str(root)), embed=embed)
    index = feats.index()

    def tokens(i):
        return {feats.llm_vocab[t - 1] for t in feats.llm_tokens[index[item_id(i)]] if t}

    # The catalog's facts never become knowledge tokens: no category path, no brand attribute.
    assert not [t for t in feats.llm_vocab if "brand" in t or "dept" in t or "leaf" in t]
    assert tokens(0) == {"product_type=type0", "audiences=aud0", "complements=comp0", "attribute color=c0"}
    assert "product_type=type3" not in tokens(3) and "audiences=aud1" in tokens(3)
    assert "product_type=type0" in tokens(5)  # its newer row failed: the older ok row counts
    assert "product_type=never" not in feats.llm_vocab
    # A value only one item holds ("only<i>") tells nothing beyond its ID.
    assert not [t for t in feats.llm_vocab if t.startswith("complements=only")]
    # Which model or heuristic wrote the knowledge, in items.
    assert feats.stats["knowledge_sources"] == {"m": N_ITEMS - 1, "offline-heuristic-v1": 1}
    assert feats.stats["items_with_summary_vector"] == N_ITEMS - 1  # the heuristic's row has no summary
    assert not feats.knowledge_ok[index[item_id(4)]] and feats.knowledge_ok[index[item_id(5)]]
    # The knowledge reaches the item table of the llm variants only; one token moves exactly its items.
    base = dict(d_model=8, n_heads=2, n_layers=1)
    torch.manual_seed(0)
    items = SASRec(feats, RankerConfig(variant="+llm_knowledge", **base)).items
    assert items.use_tokens and items.use_summary and not items.use_catalog and not items.use_sid
    assert SASRec(feats, RankerConfig(variant="catalog+llm", **base)).items.use_catalog
    assert not SASRec(feats, RankerConfig(variant="+catalog", **base)).items.use_tokens
    token = feats.llm_vocab.index("audiences=aud1") + 1
    with torch.no_grad():
        before = items()
        items.bag.weight[token] += 1.0
        changed = (items() - before).abs().sum(1) > 0
    assert set(torch.nonzero(changed).flatten().tolist()) == {index[item_id(i)] for i in range(1, N_ITEMS, 2)}


def test_semantic_id_prefixes_by_hand():
    # rq columns: (c1, c2, c3); the last row and the padding row have no semantic IDs (code 9 = missing).
    codes = np.array([[9, 9, 9, 5], [0, 1, 2, 0], [0, 1, 3, 1], [0, 2, 2, 0], [1, 1, 2, 4], [9, 9, 9, 5]])
    feats = ItemFeatures(item_ids=list("abcde"), codebook_version=CB, embedder=None, sid_codes=codes,
                         sid_sizes=[10, 10, 10, 6], sid_columns=["rq_0", "rq_1", "rq_2", "mpq_0"],
                         knowledge=np.zeros((6, 1), np.float32), knowledge_ok=np.zeros(6, bool))
    prefix, sizes = feats.sid_prefix_codes()
    # (0) is shared by a, b, c; (1) by d alone -> missing. (0, 1) is shared by a, b; (0, 2) only by c.
    # No (c1, c2, c3) is shared: the whole column is "missing". MPQ stays as it was.
    assert sizes == [2, 2, 1, 6]
    assert prefix.tolist() == [[1, 1, 0, 5], [0, 0, 0, 0], [0, 0, 0, 1], [0, 1, 0, 0], [1, 1, 0, 4], [1, 1, 0, 5]]
    # Level 2's code 1 under different parents (a, d) is one unigram but two different prefixes.
    assert codes[1, 1] == codes[4, 1] and prefix[4, 1] != prefix[1, 1]
    assert np.array_equal(feats.sid_codes, codes)  # the features themselves are left as read
    # The model embeds the prefixes by default, the per-level codes when sid_prefix is off.
    base = dict(variant="+semantic_ids", d_model=8, n_heads=2, n_layers=1)
    assert SASRec(feats, RankerConfig(**base)).items.codes.tolist() == prefix.tolist()
    assert SASRec(feats, RankerConfig(sid_prefix=False, **base)).items.codes.tolist() == codes.tolist()


# ---------------------------------------------------------------- bad input


def test_missing_table_is_named(tmp_path):
    root = build_lakehouse(tmp_path / "lh")
    import shutil

    shutil.rmtree(delta.table_path("gold.user_augmented_behaviors", str(root)))
    with pytest.raises(delta.TableMissing, match="gold.user_augmented_behaviors"):
        pin(str(root))


def test_codebook_version_mismatch_is_an_error(lake):
    write(Path(lake), "gold.user_sequences", sequence_rows(20, version="cb-other"), mode="overwrite")
    with pytest.raises(DataError, match="codebook version mismatch.*cb-other"):
        load_item_features(pin(lake))
    rows = sequence_rows(20) + [dict(r, user_id=f"x{k}", codebook_version="cb-old")
                                for k, r in enumerate(sequence_rows(3))]
    write(Path(lake), "gold.user_sequences", rows, mode="overwrite")
    with pytest.raises(DataError, match="mixes codebook versions"):
        load_item_features(pin(lake))


def test_sequences_disagreeing_with_the_semantic_id_table_are_an_error(lake):
    rows = sequence_rows(20)
    rows[3]["semantic_ids"] = [[3, 3, 3, 1]] + rows[3]["semantic_ids"][1:]
    write(Path(lake), "gold.user_sequences", rows, mode="overwrite")
    with pytest.raises(DataError, match="disagree on the semantic IDs of 1 of"):
        load_item_features(pin(lake))


def test_short_histories_and_nan_vectors_are_skipped_and_counted(tmp_path):
    root = str(build_lakehouse(tmp_path / "lh", short_users=4))
    pinned = pin(root)

    def nan_for_five(texts):  # an embedder that fails on one summary gives that item no vector
        out = embed(texts)
        out[[k for k, t in enumerate(texts) if t == "summary 5"]] = np.nan
        return out

    feats = load_item_features(pinned, embed=nan_for_five)
    assert feats.stats["users_too_short"] == 4 and feats.stats["users"] == 64
    assert feats.stats["items_with_summary_vector"] == N_ITEMS - 3  # items 5, 15, 25 share that summary
    assert not feats.knowledge_ok[feats.index()[item_id(5)]] and np.isfinite(feats.knowledge).all()
    assert check_user_features(pinned)["user_features_nan_or_null"]["days_since_last"] == 1
    beyond, stats = load_beyond_log(pinned, feats)
    assert stats["beyond_log_status"] == {"ok": 60, "history_too_short": 4} and len(beyond) == 60
    stream = SequenceStream(pinned, feats, "valid", batch_size=1000)
    assert len(next(iter(stream))["target"]) == 60
    # An inferred item outside the vocabulary keeps its rank slot empty; a row of unknown items only is left out.
    aug = delta.read_arrow("gold.user_augmented_behaviors", root).to_pylist()
    first, second = [r for r in aug if r["status"] == "ok"][:2]
    first["item_ids"] = ["gone", item_id(7), item_id(8)]
    second["item_ids"] = ["gone", "gone-too"]
    write(Path(root), "gold.user_augmented_behaviors", aug, mode="overwrite")
    beyond, stats = load_beyond_log(pin(root), feats, top_k=2)
    index = feats.index()
    assert beyond[first["user_id"]].tolist() == [0, index[item_id(7)]] and second["user_id"] not in beyond
    assert stats["beyond_log_items_outside_vocabulary"] == 3 and stats["beyond_log_ok_rows_without_items"] == 1
    assert stream.last_counts["users_too_short"] == 4


# ---------------------------------------------------------------- metrics


def test_rank_counts_ties_against_the_target():
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.9, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4]])
    target = torch.tensor([0, 2, 0, 0])
    assert rank_of_target(scores, target).tolist() == [0, 2, 3, 3]
    # Same result when the tied items are listed in another order.
    assert rank_of_target(scores[:, [0, 2, 1, 3]], torch.tensor([0, 1, 0, 0])).tolist() == [0, 2, 3, 3]


def test_recall_and_ndcg_by_hand():
    m = metrics_from_ranks(torch.tensor([0, 1, 4, 9, 25]))
    assert m["recall@5"] == pytest.approx(3 / 5)
    assert m["recall@10"] == pytest.approx(4 / 5)
    assert m["recall@20"] == pytest.approx(4 / 5)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5)
    assert metrics_from_ranks(torch.tensor([100]))["ndcg@20"] == 0.0


# ---------------------------------------------------------------- training and the recorded run

SMALL = dict(d_model=16, n_layers=1, n_heads=2, batch_size=16, lr=5e-3, dropout=0.1, max_epochs=4, patience=4,
             eval_batch_size=64)
# The fixture's augmented table is written by hand (no diffusion checkpoint behind it): the published map
# is the context of every split, as it was before point-in-time contexts.
PUBLISHED = dict(beyond_log_point_in_time=False)
TINY_DIFFUSION = dict(d_model=16, n_layers=1, n_heads=2, epochs=3, batch_size=16, slots=2, max_len=12, threads=1)


@pytest.fixture
def pit_lake(tmp_path) -> tuple[str, str]:
    """A lakehouse whose augmented table comes from a real (tiny) diffusion checkpoint under artifacts/."""
    from jobs.infer_beyond_log import load_sequences, load_vocab, train_or_load_at, training_prefixes
    from models import diffusion as D

    root = str(build_lakehouse(tmp_path / "pit", n_users=80))
    artifacts = str(tmp_path / "artifacts")
    torch.set_num_threads(1)
    vocab = load_vocab(root, CB)
    sequences = load_sequences(root)
    cfg = D.DiffusionConfig(**TINY_DIFFUSION)
    model, version, _, _ = train_or_load_at(artifacts, cfg, vocab, training_prefixes(vocab, sequences)[0], CB)
    users = [(u, vocab.encode(items[:-1])[0]) for u, items in sequences]
    results = D.infer(model, vocab, [h for _, h in users], 5)
    write(Path(root), "gold.user_augmented_behaviors", [{
        "user_id": u, "model_version": version, "item_ids": [vocab.item_ids[i] for i in r.item_idx],
        "scores": r.scores, "semantic_ids": [vocab.codes[i].tolist() for i in r.item_idx], "status": "ok",
        "n_history": len(h), "ds": DS, "run_id": "test"} for (u, h), r in zip(users, results, strict=True)],
        mode="overwrite")
    return root, artifacts


def test_short_training_run_learns_and_records_the_run(lake):
    from jobs.train_ranker import train

    torch.set_num_threads(1)
    config = RankerConfig(variant="all", seed=3, **SMALL, **PUBLISHED)
    out = train(lake, config, ds=DS, progress=False)
    m = out["metrics"]
    assert m["loss"][-1] < m["loss"][0]
    for split in ("valid", "test"):
        assert set(m[split]) == {f"{k}@{n}" for k in ("recall", "ndcg") for n in (5, 10, 20)}
        assert all(0.0 <= v <= 1.0 for v in m[split].values())
    assert m["eval_users"] == 60 and m["epochs"] <= 4
    runs = delta.read_arrow("ops.training_runs", lake).to_pylist()
    assert [r["run_id"] for r in runs] == ["train_ranker__2026-11-22__all__s3"]
    row = runs[0]
    assert row["seed"] == 3 and row["model"].endswith(":all") and row["device"] == "cpu"
    versions = json.loads(row["table_versions"])
    assert versions["gold.user_sequences"] == delta.table_version("gold.user_sequences", lake)
    assert json.loads(row["config"])["codebook_version"] == CB
    assert json.loads(row["metrics"])["test"] == pytest.approx(m["test"])
    # A rerun of the same day rewrites its row (MERGE on run_id).
    train(lake, RankerConfig(variant="all", seed=3, **{**SMALL, **PUBLISHED, "max_epochs": 1}), ds=DS, progress=False)
    assert delta.read_arrow("ops.training_runs", lake).num_rows == 1


def test_training_is_seeded(lake):
    torch.set_num_threads(1)
    pinned = pin(lake)
    feats = load_item_features(pinned)
    beyond, _ = load_beyond_log(pinned, feats)
    results = []
    for _ in range(2):
        config = RankerConfig(variant="+beyond_log", seed=1, **{**SMALL, **PUBLISHED, "max_epochs": 2})
        _, res = fit(feats, make_streams(pinned, feats, config, beyond), config)
        results.append(([h["loss"] for h in res.history], res.test))
    assert results[0] == results[1]


def test_beyond_log_context_scores_the_test_target_only(lake):
    """The published inference was made from every event but the test target: selection must not see it."""
    pinned = pin(lake)
    feats = load_item_features(pinned)
    beyond, _ = load_beyond_log(pinned, feats)
    streams = make_streams(pinned, feats, RankerConfig(variant="+beyond_log", **SMALL, **PUBLISHED), beyond)
    assert "context" in next(iter(streams["train"])) and "context" in next(iter(streams["test"]))
    assert "context" not in next(iter(streams["valid"]))
    assert "context" not in next(iter(make_streams(pinned, feats, RankerConfig(variant="+catalog"), beyond)["test"]))
    # Point in time is the default and needs per-split contexts, not the published map alone.
    with pytest.raises(ValueError, match="per-split contexts"):
        make_streams(pinned, feats, RankerConfig(variant="+beyond_log", **SMALL), beyond)


def test_point_in_time_context_reaches_the_last_position_only():
    """A context made for the last target must not inform earlier positions (their targets are older)."""
    feats = ItemFeatures(item_ids=[f"i{k}" for k in range(20)], codebook_version=CB, embedder=None,
                         sid_codes=np.zeros((21, 0), np.int64), sid_sizes=[], sid_columns=[],
                         knowledge=np.zeros((21, 1), np.float32), knowledge_ok=np.zeros(21, bool))
    inp = torch.tensor([[0, 3, 4, 5, 6], [1, 2, 3, 4, 5]])
    ctx_a, ctx_b = torch.tensor([[7, 8], [9, 0]]), torch.tensor([[10, 11], [12, 13]])
    for pit, changed_before_last in ((True, False), (False, True)):
        torch.manual_seed(0)
        model = SASRec(feats, RankerConfig(variant="+beyond_log", beyond_log_point_in_time=pit,
                                          beyond_log_attend=True, **SMALL)).eval()
        table = model.items()
        ha, hb = model.encode(inp, table, ctx_a), model.encode(inp, table, ctx_b)
        assert not torch.allclose(ha[:, -1], hb[:, -1])
        assert (not torch.allclose(ha[:, :-1], hb[:, :-1])) is changed_before_last
        # Training rows h[mask]: the context's copy bonus reaches the last position's rows only (point in time).
        mask = inp != 0
        rows = model.context_rows(ctx_a, mask)
        is_last = torch.zeros_like(mask)
        is_last[:, -1] = True
        with_context = (rows != 0).any(1)
        assert rows.shape == (int(mask.sum()), 2)
        assert with_context.tolist() == (is_last[mask] if pit else torch.ones_like(with_context)).tolist()
        assert rows[with_context][-1].tolist() == ctx_a[1].tolist()


def test_copy_bonus_raises_exactly_the_context_items_by_rank():
    feats = ItemFeatures(item_ids=[f"i{k}" for k in range(6)], codebook_version=CB, embedder=None,
                         sid_codes=np.zeros((7, 0), np.int64), sid_sizes=[], sid_columns=[],
                         knowledge=np.zeros((7, 1), np.float32), knowledge_ok=np.zeros(7, bool))
    model = SASRec(feats, RankerConfig(variant="+beyond_log", beyond_log_k=3, **SMALL)).eval()
    with torch.no_grad():
        model.copy.copy_(torch.tensor([2.0, 1.0, 0.5]))
        h, table = torch.randn(2, 16), model.items()
        plain = model.scores(h, table)
        boosted = model.scores(h, table, torch.tensor([[4, 2, 0], [6, 0, 0]]))
    diff = (boosted - plain).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    expect = torch.zeros(2, 7)
    expect[0, 4], expect[0, 2], expect[1, 6] = 2.0, 1.0, 2.0
    assert torch.allclose(diff, expect) and torch.isinf(boosted[:, 0]).all()
    # An inferred item outside the vocabulary keeps its rank slot (as padding): the next item keeps rank 3.
    ctx, unknown = item_lists_to_index({"u": ["i3", "gone", "i1"]}, feats, top_k=3)
    assert ctx["u"].tolist() == [4, 0, 2] and unknown == 1
    with torch.no_grad():
        diff = (model.scores(h[:1], table, torch.as_tensor(ctx["u"])[None]) - plain[:1]).nan_to_num(
            0.0, posinf=0.0, neginf=0.0)
    expect = torch.zeros(1, 7)
    expect[0, 4], expect[0, 2] = 2.0, 0.5
    assert torch.allclose(diff, expect, atol=1e-6)  # h[:1] @ table may round unlike h @ table


def test_point_in_time_contexts_come_from_a_model_that_never_saw_their_targets(pit_lake):
    from jobs.infer_beyond_log import fingerprint, load_sequences, load_vocab, training_prefixes
    from jobs.point_in_time import point_in_time_contexts
    from models import diffusion as D

    root, artifacts = pit_lake
    published = delta.read_arrow("gold.user_augmented_behaviors", root)["model_version"][0].as_py()
    latest = (Path(artifacts) / "diffusion" / "LATEST").read_text()
    by_split, stats = point_in_time_contexts(root, artifacts, published, top_n=5)
    vocab, sequences = load_vocab(root, CB), load_sequences(root)
    # The as-of model trained on every user's events but the last three: never on a context's target.
    asof = stats["asof_model_version"]
    meta = json.loads((Path(artifacts) / "diffusion" / asof / "meta.json").read_text())
    expected = training_prefixes(vocab, sequences, drop=3)[0]
    assert asof != published and meta["train"]["sequences"] == len(expected) == stats["asof_training_sequences"]
    assert asof == D.model_version(D.DiffusionConfig(**TINY_DIFFUSION), CB, fingerprint(expected, vocab))
    assert (Path(artifacts) / "diffusion" / "LATEST").read_text() == latest  # the published model stays current
    items = dict(sequences)
    model = D.load(Path(artifacts) / "diffusion" / asof, "cpu")
    for split, drop in (("train", 3), ("valid", 2)):
        ctx = by_split[split]
        assert ctx and set(ctx) <= {u for u, s in sequences if len(s) > drop}
        for user, inferred in ctx.items():
            assert not set(inferred) & set(items[user][:-drop])  # made from the history before the cut
        # Each split's context is the as-of model's inference from exactly the events before its cut.
        users = sorted(ctx)[:8]
        again = D.infer(model, vocab, [vocab.encode(items[u][:-drop])[0] for u in users], 5)
        assert [[vocab.item_ids[i] for i in r.item_idx] for r in again] == [ctx[u] for u in users]
    assert stats["train_users_with_context"] == len(by_split["train"])
    # A rerun reuses the as-of checkpoint.
    assert point_in_time_contexts(root, artifacts, published, top_n=5)[1]["asof_reused_checkpoint"] is True


def test_point_in_time_training_run_and_its_clear_errors(pit_lake, lake):
    from jobs.point_in_time import PointInTimeUnavailable
    from jobs.train_ranker import load_data, train

    root, artifacts = pit_lake
    torch.set_num_threads(1)
    # Each split reads its own contexts: train and valid the as-of inferences, test the published table.
    config = RankerConfig(variant="+beyond_log", **SMALL)
    pinned, feats, beyond, _ = load_data(root, config, artifacts=artifacts)
    published, _ = load_beyond_log(pinned, feats)
    streams = make_streams(pinned, feats, config, beyond)
    assert streams["train"].beyond_log is beyond.train and streams["valid"].beyond_log is beyond.valid
    assert streams["test"].beyond_log is beyond.test
    assert {u: v.tolist() for u, v in beyond.test.items()} == {u: v.tolist() for u, v in published.items()}
    assert any(not np.array_equal(beyond.train[u], beyond.test.get(u, [])) for u in beyond.train)
    out = train(root, RankerConfig(variant="+beyond_log", **{**SMALL, "max_epochs": 2}), ds=DS, progress=False,
                artifacts=artifacts, record=False)
    pit = out["metrics"]["data"]["beyond_log_point_in_time"]
    assert out["config"]["beyond_log_asof_model_version"] == pit["asof_model_version"]
    assert pit["train_users_with_context"] > 0 and pit["valid_users_with_context"] > 0
    assert len(out["metrics"]["beyond_log_copy_bonus"]) == RankerConfig().beyond_log_k
    # The hand-written table of `lake` has no checkpoint behind it: say so, and what to do instead.
    with pytest.raises(PointInTimeUnavailable, match="not a diffusion model.*beyond_log_point_in_time=false"):
        train(lake, RankerConfig(variant="all", **SMALL), ds=DS, progress=False, artifacts=artifacts, record=False)
    with pytest.raises(PointInTimeUnavailable, match="artifacts folder"):
        train(lake, RankerConfig(variant="all", **SMALL), ds=DS, progress=False, record=False)


# ---------------------------------------------------------------- entry points


def test_cli_help_and_a_clear_error_on_a_missing_lakehouse(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "jobs.train_ranker", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    assert p.returncode == 0 and "ops.training_runs" in p.stdout
    p = subprocess.run([sys.executable, "-m", "jobs.train_ranker", "--lakehouse", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 1
    assert "train_ranker failed" in p.stderr and "not written yet" in p.stderr


def test_train_ranker_dag_is_scheduled_on_the_published_gold_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["train_ranker"]
    published = {a.uri for a in bag.dags["reaseq_nightly"].get_task("publish").outlets}
    scheduled = {a.uri for a in dag.timetable.asset_condition.objects}  # AssetAll: every table updated
    assert scheduled == published and len(published) == 4
    assert [t.task_id for t in dag.tasks] == ["train_ranker"]
    assert dag.max_active_runs == 1
