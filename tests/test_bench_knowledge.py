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
    level_1 = s["level_accuracy"]["level_1"]
    assert {k: level_1[k] for k in ("items", "exact", "similar", "mean_cosine")} == {
        "items": 3, "exact": round(2 / 3, 4), "similar": round(2 / 3, 4), "mean_cosine": round(2 / 3, 4)}
    lo, hi = level_1["exact_ci95"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1 and lo < hi  # three items: a wide interval around 2/3
    assert s["level_accuracy"]["level_2"]["exact"] == round(1 / 3, 4)
    assert s["level_accuracy"]["level_3"]["items"] == 1
    assert s["product_type_vs_leaf"]["exact"] == round(1 / 3, 4)
    assert {k: s["brand"][k] for k in ("items", "exact", "similar", "mean_cosine")} == {
        "items": 2, "exact": 0.5, "similar": 0.5, "mean_cosine": 0.5}


def test_the_interval_narrows_with_more_items_and_is_a_point_when_every_item_agrees():
    assert knowledge.ci95([1, 1, 1, 1]) == [1.0, 1.0]
    assert knowledge.ci95([1]) is None  # one item: no interval
    few = knowledge.ci95([1, 0] * 10)
    many = knowledge.ci95([1, 0] * 500)
    assert few[0] < 0.5 < few[1] and many[0] < 0.5 < many[1]
    assert many[1] - many[0] < (few[1] - few[0]) / 3  # ~1/sqrt(n): 50x the items, ~7x narrower
    assert knowledge.ci95([1, 0] * 10) == few  # the same seed gives the same interval


def test_kept_answers_load_back_equal(tmp_path):
    truth = {"a": {"path": ["Lab", "Glassware"], "brand": "Pyrex"}, "b": {"path": ["Lab", "Scales"], "brand": None}}
    answers = [result("a", ["Lab", "Glassware"], "Glassware", "Pyrex"), result("b", ["Tools"], status="failed")]
    kept = knowledge.answers_path(tmp_path, "scientific", "local")
    knowledge.save_answers(kept, answers, "gemma@sha256:x", 12.5)
    again, model, seconds = knowledge.load_answers(kept)
    assert (model, seconds) == ("gemma@sha256:x", 12.5) and again == answers
    assert knowledge.score("scientific", again, truth, Exact()) == knowledge.score("scientific", answers, truth, Exact())


@pytest.mark.skipif(not (SHARED_DATA / "amazon18_scientific").exists(), reason="the shared datasets are absent")
def test_rescore_reads_the_kept_answers_and_keeps_the_other_datasets_results(tmp_path):
    import json

    items, _ = knowledge.sample("scientific", 5, seed=0)
    # A model that named every item's category "Lab Supplies": kept as an earlier run would have kept it.
    answers = [result(i.item_id, ["Lab Supplies"], "Thing") for i in items]
    knowledge.save_answers(knowledge.answers_path(tmp_path, "scientific", "local"), answers, "gemma@sha256:x", 12.5)
    earlier = {"movielens_100k": {"local": {
        "model": "m", "scores": {"f1": 0.3, "precision": 0.3, "recall": 0.3},
        "cost": {"schema_valid_rate": 1.0, "answered": 9, "items": 9, "seconds_per_item": 4.0,
                 "completion_tokens_per_item": 300}}}, "meta": {}}
    (tmp_path / "knowledge.json").write_text(json.dumps(earlier))
    argv = ["--datasets", "scientific", "--items", "5", "--methods", "local", "--rescore", "--out", str(tmp_path)]
    assert knowledge.main(argv) == 0
    written = json.loads((tmp_path / "knowledge.json").read_text())
    assert written["movielens_100k"] == earlier["movielens_100k"]  # not run now: kept
    local = written["scientific"]["local"]
    assert local["model"] == "gemma@sha256:x" and local["cost"]["seconds"] == 12.5 and local["cost"]["answered"] == 5
    assert local["scores"]["precision"] == 0.0  # "Lab Supplies" is no level-1 category of this catalog
    assert (tmp_path / "knowledge.md").exists() and (tmp_path / "knowledge.png").exists()
