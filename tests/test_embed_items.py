"""Embeddings: the OpenAI-compatible /v1/embeddings backend against a real local HTTP server, and the
incremental embed path (only items whose embedded text changed are embedded again)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.compute as pc
import pytest

from models.embedder import EmbedderConfig, embed_texts

DIM = 16


def _vec(text: str) -> list[float]:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).normal(size=DIM).tolist()


class _Handler(BaseHTTPRequestHandler):
    fail = False

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/embeddings" or type(self).fail:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": "boom"}')
            return
        data = [{"object": "embedding", "index": i, "embedding": _vec(t)} for i, t in enumerate(body["input"])]
        random.Random(0).shuffle(data)  # servers may answer out of order; the client must sort by index
        out = json.dumps({"object": "list", "data": data, "model": body["model"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def embeddings_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    _Handler.fail = False


def test_openai_backend_batches_orders_and_normalises(embeddings_server):
    cfg = EmbedderConfig(backend="openai", model="bge-small", base_url=embeddings_server, batch_size=3)
    texts = [f"item {i}" for i in range(8)]
    out = embed_texts(texts, cfg)
    assert out.shape == (8, DIM) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    for text, row in zip(texts, out, strict=True):
        ref = np.asarray(_vec(text), dtype=np.float32)
        assert np.allclose(row, ref / np.linalg.norm(ref), atol=1e-5)
    assert cfg.name == "bge-small@openai"


def test_openai_backend_error_names_the_server(embeddings_server):
    _Handler.fail = True
    cfg = EmbedderConfig(backend="openai", base_url=embeddings_server)
    with pytest.raises(RuntimeError, match="embeddings server .* answered 500"):
        embed_texts(["x"], cfg)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown embedding backend"):
        embed_texts(["x"], EmbedderConfig(backend="nope"))


def test_the_hashing_stand_in_is_deterministic_across_processes_and_named_as_itself():
    """bench-scale's stand-in embedder: the same vector in every Spark worker (whatever PYTHONHASHSEED),
    closer for texts sharing words, and rows that say what wrote them."""
    cfg = EmbedderConfig(backend="hashing", model="feature-hashing-384")
    texts = ["Digital lab scale, 0.01 g precision", "Precision digital scale for the lab", "Nitrile gloves, box of 100"]
    here = embed_texts(texts, cfg)
    code = ("import sys, json; from models.embedder import embed_texts, EmbedderConfig; "
            "print(json.dumps(embed_texts(json.loads(sys.argv[1]), EmbedderConfig(backend='hashing', "
            "model='feature-hashing-384')).tolist()))")
    other = subprocess.run([sys.executable, "-c", code, json.dumps(texts)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, check=True)
    assert np.allclose(here, np.asarray(json.loads(other.stdout), dtype=np.float32))
    assert here.shape == (3, 384) and np.allclose(np.linalg.norm(here, axis=1), 1.0)
    assert here[0] @ here[1] > 0.3 > abs(here[0] @ here[2])
    assert cfg.name == "feature-hashing-384@hashing"
    with pytest.raises(ValueError, match="REASEQ__EMBEDDING__MODEL=feature-hashing-384"):
        embed_texts(["x"], EmbedderConfig(backend="hashing"))


@pytest.mark.spark
@pytest.mark.slow
def test_only_changed_texts_are_embedded_again(ctx_factory, spark):
    from feature_store import delta
    from jobs.runtime import execute

    ctx = ctx_factory(synthetic={"n_items": 40, "n_users": 15, "seed": 4})
    for stage in ("ingest_catalog", "reason_items"):
        execute(stage, ctx)
    # Partitions handed over in several Arrow batches, as any partition over 10,000 rows is: pandas 3's
    # Arrow-backed strings, concatenated, once reached pyspark in chunks and failed the stage.
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "7")
    try:
        first = execute("embed_items", ctx)
    finally:
        spark.conf.unset("spark.sql.execution.arrow.maxRecordsPerBatch")
    assert first.rows_out == 40
    emb = delta.read_arrow("silver.item_embeddings", ctx.root)
    assert set(emb["dim"].to_pylist()) == {384}
    assert all(len(v) == 384 for v in emb["embedding"].to_pylist())
    assert execute("embed_items", ctx).rows_out == 0

    target = sorted(emb["item_id"].to_pylist())[0]
    path = delta.table_path("bronze.catalog_items", ctx.root)
    spark.sql(f"UPDATE delta.`{path}` SET title = concat(title, ' Pro'), content_hash = sha2(concat(title, ' Pro'), 256) "
              f"WHERE item_id = '{target}'")
    assert execute("reason_items", ctx).metrics["work_set"] == 1
    again = execute("embed_items", ctx)
    assert again.rows_out == 1
    after = delta.read_arrow("silver.item_embeddings", ctx.root)
    assert after.num_rows == 40  # MERGE on (item_id, embedder): replaced, not added
    old = emb.filter(pc.equal(emb["item_id"], target))["text_hash"][0].as_py()
    new = after.filter(pc.equal(after["item_id"], target))["text_hash"][0].as_py()
    assert old != new


@pytest.mark.spark
@pytest.mark.slow
def test_nan_and_wrong_dimension_vectors_are_quarantined_not_trained_on(ctx_factory, spark):
    from feature_store import delta
    from feature_store.catalog import ITEM_EMBEDDINGS
    from jobs.runtime import execute

    ctx = ctx_factory(synthetic={"n_items": 40, "n_users": 15, "seed": 6},
                      quantizer={"codebook_size": 8, "mpq_codebook_size": 8})
    for stage in ("ingest_catalog", "reason_items", "embed_items"):
        execute(stage, ctx)
    rows = delta.read_arrow("silver.item_embeddings", ctx.root).sort_by("item_id").slice(0, 2).to_pylist()
    rows[0]["embedding"] = [float("nan")] * 384
    rows[1]["embedding"] = [0.1] * 12
    rows[1]["dim"] = 12
    bad = spark.createDataFrame(rows, delta.spark_schema(ITEM_EMBEDDINGS))
    delta.merge(spark, bad, "silver.item_embeddings", ctx.root)

    res = execute("train_quantizer", ctx)
    assert res.rows_out == 38 and res.rows_quarantined == 2
    q = delta.read_arrow("silver.quarantine", ctx.root, filter=pc.field("stage") == "train_quantizer").to_pylist()
    reasons = {r["key"]: r["reason"] for r in q}
    assert reasons[rows[0]["item_id"]].startswith("non_finite_embedding")
    assert reasons[rows[1]["item_id"]].startswith("wrong_dimension")
    execute("assign_semantic_ids", ctx)
    sids = delta.read_arrow("gold.item_semantic_ids", ctx.root)
    assert sids.num_rows == 38 and rows[0]["item_id"] not in sids["item_id"].to_pylist()


@pytest.mark.parametrize("batch_rows", [3, 65_536])
def test_embeddings_load_sorted_by_item_with_every_bad_vector_named(tmp_path, monkeypatch, batch_rows):
    """The quantizers' input, read in one pass without Spark: rows come back in item-id order whatever
    order the table holds them in, each id with its own vector; vectors of a minority length, null ones
    and ones with NaN or inf are named with their reason; other embedders and items no longer in the
    catalog are left out. Batches of 3 rows split lengths and bad rows across batches."""
    from types import SimpleNamespace

    import pyarrow as pa
    from deltalake import write_deltalake

    from feature_store import delta
    from jobs import codebooks

    monkeypatch.setattr(codebooks, "BATCH_ROWS", batch_rows)
    rng = np.random.default_rng(3)
    good = {f"item-{k:02d}": rng.normal(size=DIM).astype(np.float32) for k in range(20)}
    rows = [(i, v.tolist()) for i, v in good.items()]
    rows += [("short", [0.5] * 4), ("short-too", [0.5] * 4), ("null", None), ("nan", [float("nan")] * DIM),
             ("inf", [0.0] * (DIM - 1) + [float("inf")]), ("gone", [1.0] * DIM)]
    random.Random(5).shuffle(rows)
    table = pa.table({"item_id": [r[0] for r in rows], "embedder": ["m"] * len(rows),
                      "embedding": pa.array([r[1] for r in rows], pa.list_(pa.float32()))})
    other = pa.table({"item_id": ["item-00"], "embedder": ["other"],
                      "embedding": pa.array([[9.0] * DIM], pa.list_(pa.float32()))})
    root = str(tmp_path)
    write_deltalake(delta.table_path("silver.item_embeddings", root), pa.concat_tables([table, other]))
    catalog = [i for i, _ in rows if i != "gone"]
    write_deltalake(delta.table_path("bronze.catalog_items", root), pa.table({"item_id": catalog}))

    ids, mat, bad = codebooks.load_embeddings(SimpleNamespace(root=root), "m")

    assert ids == sorted(good)
    assert mat.dtype == np.float32 and mat.shape == (20, DIM)
    for i, row in zip(ids, mat, strict=True):
        np.testing.assert_array_equal(row, good[i])
    assert dict(bad) == {
        "short": f"wrong_dimension: 4 != {DIM}", "short-too": f"wrong_dimension: 4 != {DIM}",
        "null": f"wrong_dimension: 0 != {DIM}",
        "nan": "non_finite_embedding: NaN or inf values", "inf": "non_finite_embedding: NaN or inf values",
    }


def test_null_vectors_do_not_vote_for_the_common_length(tmp_path):
    """More null vectors than real ones: the real ones set the length, the nulls are named."""
    from types import SimpleNamespace

    import pyarrow as pa
    from deltalake import write_deltalake

    from feature_store import delta
    from jobs import codebooks

    ids = [f"n{k}" for k in range(5)] + ["a", "b"]
    vectors = [None] * 5 + [[1.0] * DIM, [2.0] * DIM]
    root = str(tmp_path)
    write_deltalake(delta.table_path("silver.item_embeddings", root),
                    pa.table({"item_id": ids, "embedder": ["m"] * 7,
                              "embedding": pa.array(vectors, pa.list_(pa.float32()))}))
    write_deltalake(delta.table_path("bronze.catalog_items", root), pa.table({"item_id": ids}))
    got, mat, bad = codebooks.load_embeddings(SimpleNamespace(root=root), "m")
    assert got == ["a", "b"] and mat.shape == (2, DIM)
    assert dict(bad) == {f"n{k}": f"wrong_dimension: 0 != {DIM}" for k in range(5)}
