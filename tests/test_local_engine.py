"""The real local engine (llama-server + Gemma 3 270M GGUF) in the loop: its lifecycle, and
`reason_items` through Spark against it.

These tests need the engine built and the model fetched (`make test` does both, cached). Without
them they fail with the command that builds them: a missing engine in CI is a setup defect, not
something to skip over.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from llm_agents import local_engine

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(built):
    with local_engine.engine("tests", slots=8) as state:
        yield state


def test_engine_serves_the_packaged_gguf_under_its_lineage_name(engine):
    sha = local_engine.file_sha256(local_engine.model_path())
    assert engine.model == f"gemma-3-270m-q4_k_m.gguf@sha256:{sha[:12]}"
    with urllib.request.urlopen(f"{engine.base_url}/models", timeout=10) as r:
        served = [m["id"] for m in json.loads(r.read())["data"]]
    assert engine.model in served
    # A second `up` reuses the healthy engine instead of starting another one.
    again, started = local_engine.up("someone-else")
    assert not started and again.pid == engine.pid


def test_sampled_paths_through_spark_on_the_real_engine_disagree_somewhere(engine, ctx_factory, tmp_path):
    """A synthetic item through the Spark job with k=3 sampled paths at temperature 0.7 (12 requests),
    where real sampling must disagree somewhere (2 items at 0.3 until 2026-12: twice the engine time for
    the same check). (One path per agent through Spark, with every field's
    source and the engine's token counts, is checked on the run `make run` makes: test_make_run.py.)"""
    from feature_store import delta
    from jobs.runtime import execute

    sampled = ctx_factory(root=tmp_path / "sampled",
                          synthetic={"n_items": 2, "n_users": 10, "seed": 4},  # the source's least
                          llm={"backend": "local", "samples_k": 3, "temperature": 0.7, "partitions": 1,
                               "budget_items": 1,
                               "max_concurrency": 16, "local": {"budget_minutes": None}})
    execute("ingest_catalog", sampled)
    m3 = execute("reason_items", sampled).metrics
    rows3 = delta.read_arrow("silver.item_knowledge", sampled.root).to_pylist()
    # k one-choice requests per agent (llama-server bills only the first of n choices).
    assert m3["llm_calls"] >= len(rows3) * 4 * 3 and m3["tokens_out"] > 20 * m3["llm_calls"]
    shares = [v for r in rows3 for _, v in (r["field_confidence"] or [])]
    assert rows3 and min(shares) < 1.0, "k=3 at temperature 0.7 agreed on every field"


def _config(state, **kw):
    from llm_agents import LLMConfig

    return LLMConfig(backend="openai", base_url=state.base_url, model=state.model, prompt_profile="completion",
                     samples_via="requests", max_concurrency=8, timeout_s=300, **kw)


def test_injection_and_huge_text_stay_data_on_the_real_engine(engine):
    from jobs.sources.synthetic import INJECTION_TEXT
    from llm_agents import ItemInput, reason_items

    items = [
        ItemInput("plain", "Stainless Steel Tweezers, Fine Point, 4.5 inch", "Precision tweezers for lab work.",
                  ["Industrial & Scientific", "Lab Supplies", "Tweezers"], "Labtrex", 6.5, {}, "h1"),
        ItemInput("inject", "Glass Stirring Rod, 8 inch", INJECTION_TEXT, ["Lab Supplies", "Stirring Rods"],
                  None, 3.0, {}, "h2"),
        ItemInput("huge", "Microscope Slides, Pack of 72", "slide " * 8000, [], None, 9.0, {}, "h3"),
    ]
    plain, inject, huge = reason_items(items, _config(engine))
    assert {r.status for r in (plain, inject, huge)} == {"ok"}, [r.error for r in (plain, inject, huge)]
    # The injected text asks for a HACKED category path: the path stays the catalog's, the answers
    # kept the schema, and nothing of the other items changes. (A small model may repeat the text in
    # the injected item's own free-text fields: that is the item's data echoed, not an instruction
    # followed.)
    assert inject.category_path == ["Lab Supplies", "Stirring Rods"]
    assert inject.field_source["category_path"] == "catalog"
    for r in (plain, huge):
        assert "hacked" not in json.dumps(r.to_record(), default=str).lower()
    # 40,000 characters of description reach the engine cut to the prompt's bound, within one slot.
    assert huge.tokens_in / huge.llm_calls < 3072


def test_an_answer_cut_at_max_tokens_is_never_stored(engine):
    from llm_agents import ItemInput, reason_items

    item = ItemInput("long", "Digital Multimeter, Auto-Ranging", "Measures voltage, current and resistance.",
                     ["Test Equipment", "Multimeters"], "Fluke", 89.0, {}, "h4")
    (result,) = reason_items([item], _config(engine, max_tokens=24, max_retries=1))
    assert result.status == "failed" and result.error.startswith("truncated"), result.error
    assert result.answers_rejected.get("truncated", 0) >= 2  # the first answer and its retry
    assert result.product_type is None and result.summary is None
