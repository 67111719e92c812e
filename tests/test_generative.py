"""REG4Rec's generative recommender: constrained decoding, dynamic step order, CORP, rewards, a short run.

Decoding tests use small hand-made token catalogues and an untrained (or scripted) head; the end-to-end
test reuses the ranker's tiny Delta lakehouse (tests/test_ranker.py) plus a silver.item_knowledge table.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_ranker import CB, DS, N_ITEMS, build_lakehouse, item_id, sequence_rows, write

from feature_store import delta
from models.generative import (
    Credit,
    GenerativeConfig,
    GenerativeRecommender,
    ItemKind,
    aggregate,
    alignment_examples,
    banned_matrix,
    beam_search,
    build_catalog,
    build_examples,
    corp_keep,
    dense_scores,
    item_logprob,
    item_rewards,
    knowledge_credit,
    load_category_paths,
    load_item_kinds,
    user_sequences,
)
from models.ranker_data import DataError, ItemFeatures, load_item_features, pin

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=10)


def fake_feats(tuples: list[list[int] | None], sizes: list[int]) -> ItemFeatures:
    """ItemFeatures holding only MPQ columns; None = an item without tokens (the reader's missing code)."""
    n, m = len(tuples), len(sizes)
    codes = np.zeros((n + 1, m), dtype=np.int64)
    codes[0] = sizes
    for i, t in enumerate(tuples, 1):
        codes[i] = sizes if t is None else t
    return ItemFeatures(item_ids=[f"i{i:03d}" for i in range(n)], codebook_version="cb", embedder=None,
                        sid_codes=codes, sid_sizes=[s + 1 for s in sizes],
                        sid_columns=[f"mpq_{e}" for e in range(m)], knowledge=np.zeros((n + 1, 1), np.float32),
                        knowledge_ok=np.zeros(n + 1, bool))


def random_catalog(seed: int = 0, n: int = 40, sizes=(5, 4, 6)):
    rng = np.random.default_rng(seed)
    all_tuples = np.stack(np.meshgrid(*[np.arange(s) for s in sizes], indexing="ij"), -1).reshape(-1, len(sizes))
    picked = all_tuples[rng.choice(len(all_tuples), n, replace=False)].tolist()
    tuples: list = list(picked)
    tuples.append(list(picked[3]))  # item 41 shares item 4's tuple
    tuples.append(None)  # item 42 has no tokens
    return fake_feats(tuples, list(sizes))


def untrained(cat, seed=0):
    torch.manual_seed(seed)
    return GenerativeRecommender(cat, GenerativeConfig(**TINY)).eval()


# ---------------------------------------------------------------- constrained decoding


def test_catalog_counts_shared_tuples_and_items_without_tokens():
    cat = build_catalog(random_catalog())
    assert cat.stats["items_without_mpq"] == 1 and cat.stats["items_sharing_a_tuple"] == 2
    assert cat.stats["shared_tuples"] == 1 and not bool(cat.has_tokens[42]) and not bool(cat.has_tokens[0])
    with pytest.raises(DataError, match="no MPQ tokens"):
        f = random_catalog()
        build_catalog(ItemFeatures(f.item_ids, "cb", None, f.sid_codes[:, :0], [], [], f.knowledge, f.knowledge_ok))


@pytest.mark.parametrize("dynamic", [False, True])
def test_constrained_decoding_yields_only_real_items_with_their_path_scores(dynamic):
    feats = random_catalog()
    cat = build_catalog(feats)
    model = untrained(cat)
    h = torch.randn(3, 16)
    history = torch.tensor([[1, 2, 0], [5, 0, 0], [4, 7, 9]])
    banned = banned_matrix(history, cat.n_items)
    first = list(range(cat.n_experts)) if dynamic else [0]
    items, scores = beam_search(model, cat, h, banned, first, dynamic=dynamic, beam=5)
    reached = torch.isfinite(scores)
    assert reached.any(-1).all()
    for b in range(3):
        got = items[b][reached[b]]
        assert cat.has_tokens[got].all(), "only items with MPQ tokens can be produced"
        assert not banned[b, got].any(), "history items are never produced"
        # every beam names a tuple of the catalogue: at most beam x paths distinct tuples
        assert len({tuple(cat.codes[i].tolist()) for i in got.tolist()}) <= 5 * len(first)


def test_exhaustive_fixed_order_beam_scores_every_item_by_its_path_probability():
    feats = random_catalog()
    cat = build_catalog(feats)
    model = untrained(cat, seed=1)
    h = torch.randn(2, 16)
    banned = banned_matrix(torch.tensor([[3], [0]]), cat.n_items)
    items, scores = beam_search(model, cat, h, banned, [0], dynamic=False, beam=1000)
    dense = dense_scores(items, scores, cat.n_items)[:, 0]
    real = torch.arange(cat.n_items + 1)[cat.has_tokens]
    for b in range(2):
        ok = real[~banned[b, real]]
        assert torch.isfinite(dense[b, ok]).all() and torch.isinf(dense[b, 42]) and torch.isinf(dense[b, 0])
        order = torch.arange(cat.n_experts)[None]
        lp = item_logprob(model, h[b: b + 1], ok[None], order)[0]
        share = cat.tuple_count[ok].float().log()
        assert torch.allclose(dense[b, ok], lp - share, atol=1e-4)
    # Two items sharing a tuple split its probability: equal scores, log 2 below the tuple's path score.
    assert dense[1, 4] == dense[1, 41]


class ScriptedHead:
    """A head whose logits are fixed per expert and record the committed sets it is asked about."""

    def __init__(self, peaks: dict[int, list[tuple[int, float]]], m: int, k: int):
        self.peaks, self.m, self.k = peaks, m, k
        self.calls: list[torch.Tensor] = []

    def head(self, h, committed, tokens):
        self.calls.append(committed.clone())
        logits = torch.zeros(*h.shape[:-1], self.m, self.k)
        for e, peaks in self.peaks.items():
            for tok, v in peaks:
                logits[..., e, tok] = v
        return logits


def test_dynamic_order_commits_the_expert_whose_best_valid_token_is_most_confident():
    # After committing expert 0 = token 0 the consistent items are 1 and 2: expert 1 tokens {1},
    # expert 2 tokens {0, 1}. Expert 2's globally best token (3) names no consistent item, so it must not
    # count: constrained, expert 1 (token 1 at logit 4) is more confident than expert 2 (token 0 at 1).
    feats = fake_feats([[0, 1, 0], [0, 1, 1], [1, 0, 3], [2, 2, 2]], [3, 3, 4])
    cat = build_catalog(feats)
    script = ScriptedHead({0: [(0, 6.0)], 1: [(1, 4.0)], 2: [(3, 9.0), (0, 1.0)]}, m=3, k=4)
    h = torch.zeros(1, 8)
    banned = banned_matrix(torch.zeros(1, 1, dtype=torch.long), cat.n_items)
    items, scores = beam_search(script, cat, h, banned, [0], dynamic=True, beam=1)
    second = script.calls[2][0, 0, 0]  # committed set of the top beam when step 3 is scored
    assert second.tolist() == [True, True, False], "expert 1 is committed second"
    reached = items[0, 0][torch.isfinite(scores[0, 0])].tolist()
    assert reached == [1]  # token 0 of expert 2 beats token 1 under the script
    # Unconstrained confidence would have picked expert 2 (logit 9): the fixed order differs here.
    script2 = ScriptedHead({0: [(0, 6.0)], 1: [(1, 0.5)], 2: [(0, 3.0)]}, m=3, k=4)
    beam_search(script2, cat, h, banned, [0], dynamic=True, beam=1)
    assert script2.calls[2][0, 0, 0].tolist() == [True, False, True]


# ---------------------------------------------------------------- CORP


def test_corp_drops_the_disagreeing_path_and_the_path_without_items():
    n = 30
    s = torch.full((2, 4, n + 1), float("-inf"))
    for p in (0, 1):
        s[0, p, 1:11] = torch.linspace(-1, -5, 10)
    s[0, 2, 5:15] = torch.linspace(-1, -5, 10)  # half its top items agree with the others
    s[0, 3, 20:30] = torch.linspace(-0.5, -2, 10)  # confident, but disagrees with everyone
    keep, agreement = corp_keep(s[:1], top_k=10, min_agreement=0.3)
    assert keep[0].tolist() == [True, True, True, False]
    assert agreement[0, 3] == 0 and agreement[0, 2] == pytest.approx(0.6)
    # user 2: path 0 reaches nothing, the others disagree pairwise: fallback keeps every path with items
    s[1, 1, 1:3] = -1.0
    s[1, 2, 5:7] = -1.0
    s[1, 3, 9:11] = -1.0
    keep, _ = corp_keep(s, top_k=10, min_agreement=0.3)
    assert keep[1].tolist() == [False, True, True, True]
    agg = aggregate(s[:1], keep[:1])
    assert torch.isinf(agg[0, 25]), "items only the pruned path reached are not ranked"
    assert agg[0, 1] == pytest.approx(float(torch.log(torch.exp(s[0, :2, 1]).sum() / 3)))
    assert torch.isfinite(aggregate(s[:1])[0, 25])  # without pruning it would have been ranked


# ---------------------------------------------------------------- PARS / MSRA rewards


def test_alignment_examples_and_msra_rewards_never_use_validation_or_test_targets():
    seq = np.arange(1, 11)  # 10 distinct items; 9 = validation target, 10 = test target
    rng = np.random.default_rng(0)
    cfg = GenerativeConfig(msra_horizon=3, msra_weight=0.6, msra_discount=0.5, pars_catalog_credit=0.4)
    for _ in range(50):
        for ex in alignment_examples(seq, rng, per_user=8, max_len=50, horizon=3):
            seen = {ex.target, *ex.future.tolist(), *ex.input.tolist(), *ex.history.tolist()}
            assert not seen & {9, 10}
            t = int(np.flatnonzero(seq == ex.target)[0])
            assert ex.future.tolist() == seq[t + 1: min(t + 4, 8)].tolist()
    paths = [None, *[["A", "B", "C"]] * 8, ["A", "B", "X"], ["A", "B", "C"]]
    cands = np.array([5, 6, 7, 9, 10, 2, 0])
    r = item_rewards(cands, target=5, future=np.array([6, 7]), credit=Credit(paths), config=cfg, msra=True)
    assert r[0] == 1.0
    assert r[1] == pytest.approx(0.6) and r[2] == pytest.approx(0.4)  # max(0.6 * 0.5, 0.4 * 3/3)
    assert r[3] == pytest.approx(0.4 * 2 / 3) and r[4] == pytest.approx(0.4)  # category credit only
    assert r[6] == 0.0
    plain = item_rewards(cands, target=5, future=np.array([6, 7]), credit=Credit(paths), config=cfg, msra=False)
    assert plain[1] == pytest.approx(0.4) and plain[0] == 1.0
    # Too short for a training target: no example at all.
    assert alignment_examples(np.array([1, 2, 3]), rng, 4, 50, 3) == []


def test_knowledge_credit_adds_to_catalog_credit_and_never_reaches_the_target():
    film, doc = ItemKind("film", frozenset({"popcorn"})), ItemKind("documentary", frozenset())
    kinds = [None, film, ItemKind("film", frozenset()), ItemKind("popcorn", frozenset()), doc, None]
    assert knowledge_credit(kinds, 1, 2) == 1.0  # the same product type
    assert knowledge_credit(kinds, 1, 3) == 0.5  # a type the target's complements name
    assert knowledge_credit(kinds, 3, 1) == 0.0  # complements are the target's, not the candidate's
    assert knowledge_credit(kinds, 1, 4) == 0.0 and knowledge_credit(kinds, 1, 5) == 0.0  # other type; none
    paths = [None, ["A", "B"], ["A", "X"], ["C"], ["A", "B"], ["A", "B"]]
    cfg = GenerativeConfig(pars_catalog_credit=0.4, pars_knowledge_credit=0.6)
    cands = np.array([1, 2, 3, 4, 5, 0])
    catalog_only = item_rewards(cands, 1, np.zeros(0, np.int64), Credit(paths), cfg, msra=False)
    assert catalog_only.tolist() == pytest.approx([1.0, 0.2, 0.0, 0.4, 0.4, 0.0])
    both = item_rewards(cands, 1, np.zeros(0, np.int64), Credit(paths, kinds), cfg, msra=False)
    # the larger of the two credits: 0.6 x 1 for the other film, 0.6 x 0.5 for popcorn (no catalog credit),
    # the catalog's where the knowledge gives less
    assert both.tolist() == pytest.approx([1.0, 0.6, 0.3, 0.4, 0.4, 0.0])
    with pytest.raises(ValueError, match="pars_knowledge_credit must lie in"):
        GenerativeConfig(pars_knowledge_credit=1.0)


@pytest.fixture
def glake(tmp_path) -> str:
    return str(build_lakehouse(tmp_path / "lh", n_users=60))  # with silver.item_knowledge


def test_examples_from_the_lakehouse_hold_no_held_out_target(glake):
    from jobs.train_generative import READ

    pinned = pin(glake, tables=READ)
    feats = load_item_features(pinned)
    index = feats.index()
    held = {r["user_id"]: {index[r["valid_item_id"]], index[r["test_item_id"]]}
            for r in delta.read_arrow("gold.user_sequences", glake).to_pylist()}
    rng = np.random.default_rng(0)
    n = 0
    for user, seq in user_sequences(pinned, feats):
        # the walks never repeat an item, so a held-out target may not appear anywhere in an example
        for ex in alignment_examples(seq, rng, per_user=10, max_len=50, horizon=3):
            assert not ({ex.target, *ex.future.tolist(), *ex.input.tolist(), *ex.history.tolist()} & held[user])
            n += 1
    assert n > 0 and len(build_examples(pinned, feats, GenerativeConfig(pars_examples_per_user=10))) == n
    paths, stats = load_category_paths(pinned, feats)
    assert stats["items_with_category_path"] == N_ITEMS and paths[index[item_id(4)]] == ["Root", "dept1", "leaf4"]


def test_item_kinds_come_from_the_newest_model_written_rows_only(glake):
    from jobs.train_generative import KNOWLEDGE, READ

    # Item 0 gets a newer row from another model; item 1's only row has a product type that is a catalog
    # fact (source `catalog`), so it has no kind; item 2 gets a newer row that failed (ignored).
    rows = delta.read_arrow(KNOWLEDGE, glake).to_pylist()
    by_id = {r["item_id"]: r for r in rows}
    later = DS + dt.timedelta(days=1)
    newer = {**by_id[item_id(0)], "model": "m2", "product_type": " Film ", "complements": ["Popcorn"], "ds": later}
    catalog_fact = {**by_id[item_id(1)], "field_source": [("product_type", "catalog")]}
    failed = {**by_id[item_id(2)], "model": "m3", "product_type": "other", "status": "failed", "ds": later}
    rows = [catalog_fact if r["item_id"] == item_id(1) else r for r in rows]
    write(Path(glake), KNOWLEDGE, [*rows, newer, failed], mode="overwrite")
    pinned = pin(glake, tables=READ + (KNOWLEDGE,))
    feats = load_item_features(pinned)
    index = feats.index()
    kinds, stats = load_item_kinds(pinned, feats)
    assert kinds[index[item_id(0)]] == ItemKind("film", frozenset({"popcorn"}))
    assert kinds[index[item_id(1)]] is None
    assert kinds[index[item_id(2)]] == ItemKind("type2", frozenset({"comp2", "only2"}))
    assert stats["items_with_product_type"] == N_ITEMS - 1 and stats["items_without_product_type"] == 1
    assert stats["product_type_sources"] == {"m": N_ITEMS - 2, "m2": 1}


# ---------------------------------------------------------------- end to end

SMALL = dict(d_model=16, n_layers=1, n_heads=2, batch_size=16, lr=5e-3, dropout=0.1, max_epochs=3, patience=3,
             beam=8, pars_epochs=1, pars_examples_per_user=2, eval_batch_size=64, select_users=0)


def test_short_training_run_end_to_end_records_the_run_and_checkpoints(glake, tmp_path):
    from jobs.train_generative import train

    torch.set_num_threads(1)
    config = GenerativeConfig(seed=2, **SMALL)
    out = train(glake, config, ds=DS, artifacts=str(tmp_path / "art"), progress=False)
    m = out["metrics"]
    assert set(m["variants"]) == {"fixed_order", "+dynamic_paths", "+corp", "+pars", "+msra"}
    for r in m["variants"].values():
        assert set(r["test"]) == {f"{k}@{n}" for k in ("recall", "ndcg") for n in (5, 10, 20)}
        assert all(0.0 <= v <= 1.0 for v in r["test"].values()) and r["users_per_second"] > 0
    assert m["test_users"] == 60 and m["alignment_examples"] > 0
    base = [h for h in m["history"] if h["stage"] == "base"]
    assert base[-1]["loss"] < base[0]["loss"]
    ckpt = Path(m["checkpoint_dir"])
    assert ckpt.parent.name == "generative" and {p.name for p in ckpt.iterdir()} >= {"base.pt", "pars.pt", "msra.pt",
                                                                                   "meta.json"}
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["table_versions"]["gold.user_sequences"] == delta.table_version("gold.user_sequences", glake)
    runs = delta.read_arrow("ops.training_runs", glake).to_pylist()
    assert [r["run_id"] for r in runs] == ["train_generative__2026-11-22__s2"]
    assert runs[0]["model"].startswith("generative:") and runs[0]["device"] == "cpu"
    assert json.loads(runs[0]["config"])["codebook_version"] == CB
    # Another table version is another checkpoint version.
    write(Path(glake), "gold.user_sequences", sequence_rows(60, seed=4), mode="overwrite")
    out2 = train(glake, GenerativeConfig(seed=2, **{**SMALL, "max_epochs": 1}), ds=DS, artifacts=str(tmp_path / "art"),
                 progress=False, record=False, variants=["fixed_order"])
    assert out2["metrics"]["version"] != m["version"]


def test_pars_knowledge_trains_on_request_and_pins_the_knowledge_it_read(glake, tmp_path):
    from jobs.train_generative import KNOWLEDGE, load_data, train
    from models.generative import fit_variants

    torch.set_num_threads(1)
    config = GenerativeConfig(seed=3, **{**SMALL, "max_epochs": 1})
    pinned, feats, cat, credit, _ = load_data(glake, config)
    assert credit.kinds is None and KNOWLEDGE not in pinned.versions  # not read unless asked for
    with pytest.raises(ValueError, match="needs the items' kinds"):
        fit_variants(pinned, feats, cat, credit, config, ("fixed_order", "+pars_knowledge"))
    out = train(glake, config, ds=DS, artifacts=str(tmp_path / "art"), progress=False, record=False,
                variants=["+pars", "+pars_knowledge"])
    m = out["metrics"]
    assert set(m["variants"]) == {"+pars", "+pars_knowledge"}
    # The credit is the only difference between the two: without it they train to the same weights.
    same = train(glake, GenerativeConfig(seed=3, pars_knowledge_credit=0.0, **{**SMALL, "max_epochs": 1}), ds=DS,
                 artifacts=str(tmp_path / "art0"), progress=False, record=False, variants=["+pars", "+pars_knowledge"])
    a, b = same["metrics"]["variants"]["+pars"], same["metrics"]["variants"]["+pars_knowledge"]
    assert a["test"] == b["test"] and a["valid_select"] == b["valid_select"]
    # Without +pars_knowledge the knowledge credit is not part of the checkpoint version.
    from models.generative import version_of
    assert version_of(config, pinned, feats.codebook_version) == version_of(
        GenerativeConfig(seed=3, pars_knowledge_credit=0.1, **{**SMALL, "max_epochs": 1}), pinned, feats.codebook_version)
    assert m["version"] != version_of(config, pinned, feats.codebook_version)
    assert out["table_versions"][KNOWLEDGE] == delta.table_version(KNOWLEDGE, glake)
    assert m["data"]["items_with_product_type"] == N_ITEMS and m["data"]["product_type_sources"] == {"m": N_ITEMS}
    assert {h["stage"] for h in m["history"]} == {"base", "pars", "pars_knowledge"}
    assert (Path(m["checkpoint_dir"]) / "pars_knowledge.pt").exists()


def test_codebook_version_mismatch_is_a_clear_error(glake):
    from jobs.train_generative import load_data

    write(Path(glake), "gold.user_sequences", sequence_rows(20, version="cb-other"), mode="overwrite")
    with pytest.raises(DataError, match="codebook version mismatch"):
        load_data(glake, GenerativeConfig(**SMALL))


def test_cli_help_and_a_clear_error_on_a_missing_lakehouse(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-m", "jobs.train_generative", "--help"], capture_output=True, text=True,
                       cwd=ROOT, env=env)
    assert p.returncode == 0 and "ops.training_runs" in p.stdout
    p = subprocess.run([sys.executable, "-m", "jobs.train_generative", "--lakehouse", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 1 and "train_generative failed" in p.stderr and "not written yet" in p.stderr


def test_train_generative_dag_is_scheduled_on_the_published_gold_assets(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    from airflow.models import DagBag

    from jobs.callbacks import on_failure

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.dags["train_generative"]
    published = {a.uri for a in bag.dags["reaseq_nightly"].get_task("publish").outlets}
    assert {a.uri for a in dag.timetable.asset_condition.objects} == published
    assert [t.task_id for t in dag.tasks] == ["train_generative"] and dag.max_active_runs == 1
    assert on_failure in list(dag.tasks[0].on_failure_callback or [])


_ = dt  # keep the datetime import for readers adapting the fixtures


def test_variant_names_for_help_match_the_models_variants():
    from jobs.train_generative import VARIANT_NAMES
    from models.generative import DEFAULT_VARIANTS, VARIANTS

    assert VARIANT_NAMES == list(VARIANTS) and "+pars_knowledge" not in DEFAULT_VARIANTS


def test_bench_keeps_the_knowledge_credit_only_when_it_helps_on_validation(tmp_path, monkeypatch):
    import bench.lakehouse
    from bench.generative import credit_verdict, markdown, parse_args

    assert "+pars_knowledge" not in parse_args([]).variants
    assert parse_args(["--knowledge", "local"]).variants[-1] == "+pars_knowledge"

    def rec(valid: list, test):
        metric = {"mean": test, "std": 0.0}
        return {**{m: metric for m in ("recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20")},
                "valid_select": {"mean": float(np.mean(valid)), "values": valid}, "train_seconds": {"mean": 1.0},
                "users_per_second": {"mean": 1.0}}

    res = {"fixed_order": rec([0.10], 0.09), "+pars": rec([0.10, 0.10], 0.10), "+pars_knowledge": rec([0.09, 0.09], 0.11)}
    verdict = credit_verdict(res)
    # Selected on validation, never on test: a better test figure does not keep it.
    assert verdict == {"valid_recall@10_ratio": 0.9, "test_recall@10_ratio": 1.1, "seeds_better": "0 of 2",
                       "helps": False}
    # Paired by seed: a higher mean that one seed carries is not enough.
    res["+pars_knowledge"] = rec([0.13, 0.09], 0.10)
    assert credit_verdict(res)["valid_recall@10_ratio"] == 1.1 and not credit_verdict(res)["helps"]
    res["+pars_knowledge"] = rec([0.11, 0.105], 0.10)
    assert credit_verdict(res)["helps"]
    res["+pars_knowledge"] = rec([0.09, 0.09], 0.11)
    meta = {"date": "d", "seeds": [0], "threads": 1, "machine": {"cpu_count": 2}, "knowledge_credit": {"ml": verdict},
            "datasets": {"ml": {"items": 3, "test_users": 2, "data": {"items_with_product_type": 3,
                                                                      "product_type_sources": {"gemma": 3}}}}}
    assert "no help on validation, leave it off" in markdown({"ml": res}, meta)

    # A model's lakehouse is never built from a consumer benchmark: a clear exit until it exists.
    monkeypatch.setattr(bench.lakehouse, "CACHE_DIR", str(tmp_path))
    (tmp_path / "data").mkdir()  # the shared data may be absent here
    monkeypatch.setitem(bench.lakehouse.DATASETS, "movielens_100k", ("movielens", tmp_path / "data"))
    assert "make bench-lakehouse KNOWLEDGE=local DATASETS=movielens_100k" in bench.lakehouse.unusable(
        "movielens_100k", "local")  # the benchmark skips it and says how to build it
    with pytest.raises(SystemExit, match="make bench-lakehouse KNOWLEDGE=local DATASETS=movielens_100k"):
        bench.lakehouse.consumer_lakehouse("movielens_100k", "local")
    home = bench.lakehouse.root_for("movielens_100k", "local")
    home.mkdir(parents=True)
    (home / "BUILT.json").write_text(json.dumps({"fingerprint": "old", "backlog": 5}))
    root, build = bench.lakehouse.consumer_lakehouse("movielens_100k", "local")
    assert root == str(home / "lakehouse") and build["backlog"] == 5 and build["matches_current_code"] is False
    assert bench.lakehouse.unusable("movielens_100k", "local") is None
