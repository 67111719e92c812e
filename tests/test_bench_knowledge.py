"""The knowledge-recovery benchmark (bench/knowledge.py): the sample is blind, the scores are the
standard measures on hand-checked cases, and the catalog heuristic scores nothing when blind."""

from __future__ import annotations

import pytest

from bench import knowledge
from llm_agents.types import KnowledgeResult
from tests.conftest import SHARED_DATA


def result(item_id: str, path: list[str], ptype: str | None = None, brand: str | None = None,
           status: str = "ok") -> KnowledgeResult:
    return KnowledgeResult(item_id=item_id, content_hash="h", prompt_version="p", model="m", status=status,
                           category_path=path, product_type=ptype,
                           attributes={"Brand": brand} if brand else {}, answers_valid=4)


class Exact:
    """A similarity that knows only equal strings: keeps the hand cases free of the embedder."""

    def __call__(self, a: str, b: str) -> float:
        return float(bool(a) and a == b)


def test_hierarchical_f1_counts_shared_path_prefixes_and_a_failed_item_as_empty():
    truth = {"a": {"path": ["Lab", "Glassware", "Beakers"], "brand": "Pyrex"},
             "b": {"path": ["Lab", "Scales"], "brand": "Ohaus"},
             "c": {"path": ["Tools", "Drills"], "brand": None}}
    answers = [result("a", ["lab ", "GLASSWARE", "Flasks"], "beakers", "pyrex"),  # 2 of 3 prefixes; type = leaf
               result("b", ["Lab"], "scale", "Mettler"),  # 1 of 1 predicted, 1 of 2 true
               result("c", ["Tools", "Drills"], status="failed")]  # failed: scores as no answer
    s = knowledge.score("scientific", answers, truth, Exact())
    # prefixes: predicted 3 + 1 + 0 = 4, true 3 + 2 + 2 = 7, shared 2 + 1 + 0 = 3
    assert s["precision"] == round(3 / 4, 4) and s["recall"] == round(3 / 7, 4)
    assert s["f1"] == round(2 * (3 / 4) * (3 / 7) / (3 / 4 + 3 / 7), 4)
    assert s["level_accuracy"]["level_1"] == {"items": 3, "exact": round(2 / 3, 4), "similar": round(2 / 3, 4),
                                              "mean_cosine": round(2 / 3, 4)}
    assert s["level_accuracy"]["level_2"]["exact"] == round(1 / 3, 4)
    assert s["level_accuracy"]["level_3"]["items"] == 1
    assert s["product_type_vs_leaf"]["exact"] == round(1 / 3, 4)
    assert s["brand"] == {"items": 2, "exact": 0.5, "similar": 0.5, "mean_cosine": 0.5}


def test_genres_score_as_a_set():
    truth = {"1": {"path": ["Comedy", "Drama"], "brand": None}, "2": {"path": ["Action"], "brand": None}}
    s = knowledge.score("movielens_100k", [result("1", ["Drama", "Romance"]), result("2", ["Action"])], truth, Exact())
    assert (s["precision"], s["recall"]) == (round(2 / 3, 4), round(2 / 3, 4))


@pytest.mark.skipif(not (SHARED_DATA / "movielens_100k").exists() or not (SHARED_DATA / "amazon18_scientific").exists(),
                    reason="the shared datasets are absent")
def test_the_sample_is_seeded_and_blind_and_the_heuristic_recovers_nothing_blind():
    from llm_agents import LLMConfig, reason_items

    items, truth = knowledge.sample("scientific", 25, seed=3)
    again, _ = knowledge.sample("scientific", 25, seed=3)
    assert [i.item_id for i in items] == [i.item_id for i in again] and len(items) == 25
    assert all(not i.categories and i.brand is None for i in items)
    assert all(not {k.lower() for k in i.attributes} & set(knowledge.BRAND_KEYS) for i in items)
    assert all(len(t["path"]) >= 1 for t in truth.values()) and sum(bool(t["brand"]) for t in truth.values()) > 20
    films, _ = knowledge.sample("movielens_100k", 25, seed=3)
    assert all("Genres:" not in (f.description or "") for f in films)
    # The heuristic re-parses catalog fields: with them hidden it has no category path to give.
    answers = reason_items(items, LLMConfig(backend="offline"))
    s = knowledge.score("scientific", answers, truth, Exact())
    assert s["recall"] == 0.0 and s["brand"]["exact"] == 0.0
