"""Semantic-ID quantizers: determinism, unique IDs, checkpoint round trips, metrics, input guards.

Sizes are tiny on purpose: the file shares two cores with Spark and must stay well under a minute.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from models.mpq import dedup_tuples
from models.quantizers import (
    QuantizerConfig,
    TrainedQuantizers,
    add_collision_digit,
    assign,
    assign_one,
    codebook_metrics,
    load_checkpoint,
    save_checkpoint,
    train_one,
    train_quantizers,
)
from models.rq import dedup_last_level, kmeans

# One thread: on a CPU shared with Spark, two OpenMP threads spin against each other and run slower.
torch.set_num_threads(1)

TINY = dict(
    levels=3,
    codebook_size=16,
    mpq_experts=3,
    mpq_codebook_size=16,
    latent_dim=8,
    hidden_dims=(32,),
    mpq_hidden_dims=(16,),
    epochs=3,
    batch_size=64,
    kmeans_iters=10,
)


def clustered(n: int = 240, d: int = 24, clusters: int = 6, seed: int = 0) -> np.ndarray:
    """Unit vectors around a few centres, like normalised sentence embeddings of a small catalogue."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def item_ids(n: int) -> list[str]:
    return [f"item-{i:05d}" for i in range(n)]


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered()


@pytest.fixture(scope="module", params=["rq_kmeans", "rq_vae"])
def trained(request, data) -> TrainedQuantizers:
    return train_quantizers(data, QuantizerConfig(rq_method=request.param, **TINY), device="cpu")


# ------------------------------------------------------------------------------------------- config


def test_config_hash_is_stable_short_hex_and_tracks_every_field():
    a, b = QuantizerConfig(), QuantizerConfig()
    assert a.config_hash() == b.config_hash() and hash(a) == hash(b)
    assert len(a.config_hash()) == 12 and int(a.config_hash(), 16) >= 0
    assert QuantizerConfig(seed=1).config_hash() != a.config_hash()
    assert QuantizerConfig(rq_method="rq_vae").config_hash() != a.config_hash()
    # Hidden dims arrive as lists from YAML/JSON; the hash must not care.
    assert QuantizerConfig(hidden_dims=[512, 256, 128]).config_hash() == a.config_hash()
    with pytest.raises(ValueError):
        QuantizerConfig(rq_method="pq")


def test_mpq_dedup_settings_count_in_the_hash_only_when_on():
    off = QuantizerConfig(mpq_dedup=False)
    assert off.config_hash() != QuantizerConfig().config_hash()
    assert QuantizerConfig(mpq_dedup_top_k=3).config_hash() != QuantizerConfig().config_hash()
    # Off, the top-k changes nothing, and the hash is the one from before the settings existed.
    assert QuantizerConfig(mpq_dedup=False, mpq_dedup_top_k=3).config_hash() == off.config_hash()
    assert off.config_hash() == "c2ca6e189687"


# ------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("rq_method", ["rq_kmeans", "rq_vae"])
def test_same_seed_same_data_gives_identical_codes(rq_method, data):
    cfg = QuantizerConfig(rq_method=rq_method, **TINY)
    ids = item_ids(len(data))
    first = assign(train_quantizers(data, cfg, device="cpu"), data, ids)
    # Consume the global RNG in between: training must not depend on it.
    torch.rand(100)
    np.random.rand(100)
    second = assign(train_quantizers(data, cfg, device="cpu"), data, ids)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_different_seed_changes_codes(data):
    ids = item_ids(len(data))
    a = assign(train_quantizers(data, QuantizerConfig(seed=0, **TINY), device="cpu"), data, ids)[0]
    b = assign(train_quantizers(data, QuantizerConfig(seed=1, **TINY), device="cpu"), data, ids)[0]
    assert not np.array_equal(a, b)


def test_ids_shapes_ranges_and_uniqueness(trained, data):
    rq_codes, mpq_tokens, metrics = assign(trained, data, item_ids(len(data)))
    n, cfg = len(data), trained.config
    assert rq_codes.shape == (n, cfg.levels + 1) and rq_codes.dtype == np.int32
    assert rq_codes[:, :-1].min() >= 0 and rq_codes[:, :-1].max() < cfg.codebook_size
    assert len({tuple(r) for r in rq_codes}) == n
    assert metrics["rq_unique_full_id_share"] == 1.0
    assert mpq_tokens.shape == (n, cfg.mpq_experts) and mpq_tokens.dtype == np.int32
    assert mpq_tokens.min() >= 0 and mpq_tokens.max() < cfg.mpq_codebook_size
    for key in ("rq_utilization", "rq_perplexity", "mpq_utilization", "mpq_perplexity"):
        assert all(0 < v <= (cfg.codebook_size if "perplexity" in key else 1) for v in metrics[key]), key
    assert 0 <= metrics["rq_collision_rate"] <= metrics["rq_collision_rate_nearest"] <= 1
    if cfg.rq_method == "rq_kmeans":  # three epochs are too few to ask this of the networks
        assert metrics["rq_recon_mse"] < metrics["embedding_mean_sq"]
    assert trained.metrics["n_items"] == n and trained.metrics["reductions"] == []
    assert set(trained.train_seconds) == {cfg.rq_method, "mpq"}


def test_ids_stay_unique_without_last_level_dedup(data):
    # Two codes per level: the prefixes must collide, and only the extra digit separates the items.
    cfg = QuantizerConfig(rq_dedup_last_level=False, **{**TINY, "codebook_size": 2, "levels": 2})
    tq = train_quantizers(data, cfg, device="cpu")
    rq_codes, _, metrics = assign(tq, data, item_ids(len(data)))
    assert metrics["rq_collision_rate"] == metrics["rq_collision_rate_nearest"] == 1.0
    assert len({tuple(r) for r in rq_codes}) == len(data)
    assert rq_codes[:, -1].max() == metrics["rq_max_collision_digit"] > 0


def test_assignment_does_not_depend_on_row_order(trained, data):
    ids = item_ids(len(data))
    codes, tokens, _ = assign(trained, data, ids)
    perm = np.random.default_rng(3).permutation(len(data))
    codes_p, tokens_p, _ = assign(trained, data[perm], [ids[i] for i in perm])
    np.testing.assert_array_equal(codes_p, codes[perm])
    np.testing.assert_array_equal(tokens_p, tokens[perm])


def test_checkpoint_round_trip_reassigns_identically(trained, data, tmp_path):
    ids = item_ids(len(data))
    before = assign(trained, data, ids)
    path = tmp_path / "nested" / "quantizers.pt"
    save_checkpoint(trained, path)
    loaded = load_checkpoint(path)
    after = assign(loaded, data, ids)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    assert before[2] == after[2]
    assert loaded.config == trained.config
    assert loaded.metrics == trained.metrics and loaded.train_seconds == trained.train_seconds
    assert type(loaded.rq) is type(trained.rq)


def test_load_rejects_foreign_file(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"format": "something-else"}, path)
    with pytest.raises(ValueError, match="not a"):
        load_checkpoint(path)


@pytest.mark.parametrize("method", ["rq_kmeans", "rq_vae", "mpq"])
def test_train_one_returns_model_and_seconds(method, data):
    model, seconds = train_one(method, data, QuantizerConfig(**TINY), device="cpu")
    assert seconds > 0 and not model.training
    codes = model.encode(torch.from_numpy(data))
    assert codes.shape == (len(data), TINY["mpq_experts"] if method == "mpq" else TINY["levels"])


def test_assign_one_matches_assign_for_each_quantizer(dup_trained, dup_data):
    ids = item_ids(len(dup_data))
    codes, tokens, metrics = assign(dup_trained, dup_data, ids)
    one_rq, rq_metrics = assign_one(dup_trained.rq, dup_data, ids, dup_trained.config)
    one_mpq, mpq_metrics = assign_one(dup_trained.mpq, dup_data, ids, dup_trained.config)
    np.testing.assert_array_equal(one_rq, codes)
    np.testing.assert_array_equal(one_mpq, tokens)
    assert {**rq_metrics, **mpq_metrics} == metrics
    assert "mpq_tuple_unique_share" not in rq_metrics and "rq_collision_rate" not in mpq_metrics
    empty, _ = assign_one(dup_trained.mpq, np.zeros((0, 24), np.float32), [], dup_trained.config)
    assert empty.shape == (0, TINY["mpq_experts"])


def test_train_one_rejects_unknown_method(data):
    with pytest.raises(ValueError, match="unknown quantizer method"):
        train_one("pq", data, QuantizerConfig(**TINY), device="cpu")


def test_progress_reports_every_stage(data):
    seen = []
    train_quantizers(
        data, QuantizerConfig(**TINY), device="cpu", progress=lambda s, i, n: seen.append((s, i, n))
    )
    assert ("rq_kmeans", 3, 3) in seen and ("mpq", TINY["epochs"], TINY["epochs"]) in seen


# ------------------------------------------------------------------------------------------- small data, guards


def test_too_few_items_reduce_codebooks_and_say_so():
    x = clustered(n=40, d=8)
    with pytest.warns(UserWarning) as caught:
        tq = train_quantizers(x, QuantizerConfig(**{**TINY, "codebook_size": 256, "mpq_codebook_size": 64}))
    messages = sorted(str(w.message) for w in caught)
    assert "codebook_size reduced from 256 to 16" in messages[0]
    assert "mpq_codebook_size reduced from 64 to 16" in messages[1]
    assert tq.rq.codebook_size == 16 and tq.mpq.codebook_size == 16  # largest power of two <= 40 / 2
    reduced = {r["parameter"]: (r["requested"], r["used"]) for r in tq.metrics["reductions"]}
    assert reduced == {"codebook_size": (256, 16), "mpq_codebook_size": (64, 16)}
    assert len(tq.metrics["warnings"]) == 2
    rq_codes, tokens, _ = assign(tq, x, item_ids(40))
    assert rq_codes[:, :-1].max() < 16 and tokens.max() < 16
    assert len({tuple(r) for r in rq_codes}) == 40


def test_four_items_still_train_and_three_do_not():
    x = clustered(n=4, d=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tq = train_quantizers(x, QuantizerConfig(**TINY), device="cpu")
    assert tq.rq.codebook_size == 2
    with pytest.raises(ValueError, match="at least 4 items"):
        train_quantizers(x[:3], QuantizerConfig(**TINY), device="cpu")


def test_nan_inf_and_wrong_dimension_rows_are_rejected(trained, data):
    bad = data.copy()
    bad[3, 0] = np.nan
    bad[7, 5] = np.inf
    with pytest.raises(ValueError, match="2 of 240 embedding rows contain NaN or inf"):
        train_quantizers(bad, trained.config, device="cpu")
    with pytest.raises(ValueError, match="2 of 240"):
        assign(trained, bad, item_ids(len(bad)))
    ragged = [*data[:10], data[10][:5]]
    with pytest.raises(ValueError, match="1 of 11 embedding rows do not have dimension 24"):
        train_quantizers(ragged, trained.config, device="cpu")
    with pytest.raises(ValueError, match="expected 24"):
        assign(trained, data[:, :10], item_ids(len(data)))
    with pytest.raises(ValueError, match="item ids"):
        assign(trained, data, item_ids(len(data) - 1))


def test_assign_accepts_a_list_of_vectors_and_no_rows(trained, data):
    ids = item_ids(5)
    np.testing.assert_array_equal(assign(trained, list(data[:5]), ids)[0], assign(trained, data[:5], ids)[0])
    codes, tokens, metrics = assign(trained, np.zeros((0, 24), np.float32), [])
    assert codes.shape == (0, trained.config.levels + 1) and tokens.shape == (0, trained.config.mpq_experts)
    assert metrics["n_items"] == 0


# ------------------------------------------------------------------------------------------- digit and metrics by hand


def test_collision_digit_follows_item_id_order_not_row_order():
    codes = np.array([[1, 2], [1, 2], [0, 0], [1, 2]])
    out = add_collision_digit(codes, ["b", "a", "z", "c"])
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out[:, -1], [1, 0, 0, 2])
    np.testing.assert_array_equal(out[:, :-1], codes)
    rev = add_collision_digit(codes[::-1], ["c", "z", "a", "b"])
    np.testing.assert_array_equal(rev, out[::-1])
    with pytest.raises(ValueError, match="duplicates"):
        add_collision_digit(codes, ["a", "a", "b", "c"])
    with pytest.raises(ValueError, match="3 item ids for 4 rows"):
        add_collision_digit(codes, ["a", "b", "c"])


def test_codebook_metrics_on_hand_made_codes():
    rq = np.array([[0, 1], [0, 1], [1, 2], [2, 3]])
    mpq = np.array([[0, 1, 2], [0, 1, 2], [3, 1, 0], [1, 1, 1]])
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    recon = x + 0.5  # error 0.25 everywhere
    full = add_collision_digit(rq, ["a", "b", "c", "d"])
    m = codebook_metrics(
        rq,
        4,
        full_ids=full,
        mpq_tokens=mpq,
        mpq_codebook_size=4,
        embeddings=x,
        rq_reconstruction=recon,
        mpq_reconstruction=x,
    )
    assert m["rq_utilization"] == [0.75, 0.75]
    # Level 0 usage is (2, 1, 1) of 4: entropy 1.5 bits, perplexity 2 ** 1.5.
    assert m["rq_perplexity"][0] == pytest.approx(2**1.5)
    assert m["rq_collision_rate"] == 0.5 and m["rq_items_colliding"] == 2 and m["rq_unique_prefixes"] == 3
    assert m["rq_unique_full_id_share"] == 1.0 and m["rq_max_collision_digit"] == 1
    assert m["mpq_tuple_unique_share"] == 0.5 and m["mpq_duplicate_tuple_groups"] == 1
    assert m["mpq_utilization"] == [0.75, 0.25, 0.75]
    assert m["mpq_perplexity"][1] == pytest.approx(1.0)
    assert m["mpq_perplexity"][2] == pytest.approx(
        math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    )
    assert m["rq_recon_mse"] == pytest.approx(0.25) and m["mpq_recon_mse"] == 0.0


def test_dedup_moves_only_the_farther_colliders_to_their_nearest_free_code():
    # Prefix (0,) holds items a, b, c on code 1 and d on code 2; prefix (1,) has e alone on code 1.
    codes = np.array([[0, 1], [0, 1], [0, 1], [0, 2], [1, 1]])
    ids = ["a", "b", "c", "d", "e"]
    dist = {  # squared distances to last-level codes 0..3, rows of the colliding items a, b, c
        0: [5.0, 0.2, 1.0, 4.0],
        1: [3.0, 0.1, 0.5, 2.0],  # closest to code 1: keeps it
        2: [0.9, 0.3, 0.4, 2.5],
    }
    new, moved = dedup_last_level(codes, ids, lambda rows: np.array([dist[int(r)] for r in rows]))
    # c wins code 0 (0.9 < a's 4.0 for code 3, a's 5.0 for 0); a gets the last free code 3; d keeps 2.
    np.testing.assert_array_equal(new[:, 1], [3, 1, 0, 2, 1])
    assert moved == 2
    np.testing.assert_array_equal(new[:, 0], codes[:, 0])
    untouched, none_moved = dedup_last_level(codes[3:], ids[3:], lambda rows: pytest.fail("no collisions"))
    assert none_moved == 0 and np.array_equal(untouched, codes[3:])


def test_kmeans_keeps_every_code_in_use_and_is_seeded():
    x = torch.from_numpy(clustered(n=64, d=6, clusters=2))
    for balanced in (False, True):
        c1, a1 = kmeans(x, 16, 20, torch.Generator().manual_seed(0), balanced)
        c2, a2 = kmeans(x, 16, 20, torch.Generator().manual_seed(0), balanced)
        assert torch.equal(c1, c2) and torch.equal(a1, a2)
        assert len(torch.unique(a1)) == 16


# ------------------------------------------------------------------------------------ MPQ tuple de-duplication


def with_duplicates(n: int = 240, copies: int = 16) -> np.ndarray:
    """clustered() plus exact copies of some rows: copies always share every MPQ token."""
    x = clustered(n)
    return np.concatenate([x, x[np.arange(copies) * 7], x[:2]])  # rows 0 and 1 appear three times


@pytest.fixture(scope="module")
def dup_data() -> np.ndarray:
    return with_duplicates()


@pytest.fixture(scope="module")
def dup_trained(dup_data) -> TrainedQuantizers:
    return train_quantizers(dup_data, QuantizerConfig(**TINY), device="cpu")


def nearest_only(tq: TrainedQuantizers) -> TrainedQuantizers:
    return dataclasses.replace(tq, config=tq.config.model_copy(update={"mpq_dedup": False}))


def test_mpq_dedup_makes_tuples_unique_by_moving_one_token(dup_trained, dup_data):
    ids = item_ids(len(dup_data))
    _, tokens, metrics = assign(dup_trained, dup_data, ids)
    _, nearest, raw = assign(nearest_only(dup_trained), dup_data, ids)
    n = len(dup_data)
    assert len({tuple(t) for t in tokens}) == n and metrics["mpq_tuple_unique_share"] == 1.0
    assert metrics["mpq_items_in_duplicate_tuples"] == 0 and metrics["mpq_dedup_unresolved_items"] == 0
    assert metrics["mpq_tuple_unique_rate_nearest"] == raw["mpq_tuple_unique_share"] < 1.0
    assert "mpq_tuple_unique_rate_nearest" in dup_trained.metrics
    changed = (tokens != nearest).sum(1)
    assert set(changed.tolist()) <= {0, 1}  # one expert's token, never more
    assert metrics["mpq_dedup_moved_items"] == int((changed == 1).sum()) >= 18
    # In every group sharing a nearest tuple the smallest item id (here: the first row) keeps it and the
    # others move; items with a tuple of their own keep it.
    _, group = np.unique(nearest, axis=0, return_inverse=True)
    for g in np.unique(group):
        rows = np.flatnonzero(group.ravel() == g)
        assert changed[rows[0]] == 0 and (changed[rows[1:]] == 1).all()
    assert (changed[240:] == 1).all()  # the copies
    assert tokens.min() >= 0 and tokens.max() < TINY["mpq_codebook_size"]
    assert raw["mpq_dedup_moved_items"] == 0
    assert raw["mpq_tuple_unique_rate_nearest"] == raw["mpq_tuple_unique_share"]


def test_mpq_dedup_is_deterministic_for_a_checkpoint(dup_trained, dup_data, tmp_path):
    ids = item_ids(len(dup_data))
    _, tokens, metrics = assign(dup_trained, dup_data, ids)
    np.testing.assert_array_equal(assign(dup_trained, dup_data, ids)[1], tokens)
    # Row order does not matter, item ids do.
    perm = np.random.default_rng(5).permutation(len(dup_data))
    shuffled = assign(dup_trained, dup_data[perm], [ids[i] for i in perm])[1]
    np.testing.assert_array_equal(shuffled, tokens[perm])
    # A reloaded checkpoint gives the same tokens and metrics.
    save_checkpoint(dup_trained, tmp_path / "q.pt")
    loaded = load_checkpoint(tmp_path / "q.pt")
    assert loaded.config.mpq_dedup
    _, tokens_l, metrics_l = assign(loaded, dup_data, ids)
    np.testing.assert_array_equal(tokens_l, tokens)
    assert metrics_l == metrics


def test_checkpoint_from_before_mpq_dedup_still_publishes_nearest_tokens(dup_trained, dup_data, tmp_path):
    path = tmp_path / "old.pt"
    save_checkpoint(dup_trained, path)
    payload = torch.load(path, weights_only=True)
    for name in ("mpq_dedup", "mpq_dedup_top_k"):
        del payload["config"][name]
    torch.save(payload, path)
    old = load_checkpoint(path)
    assert not old.config.mpq_dedup
    ids = item_ids(len(dup_data))
    nearest = assign(nearest_only(dup_trained), dup_data, ids)[1]
    np.testing.assert_array_equal(assign(old, dup_data, ids)[1], nearest)


def test_dedup_tuples_by_hand_margin_order_next_best_and_unresolved():
    # Items a, b, c share (0, 0); d holds (1, 0). Two experts, three codes each.
    tokens = np.array([[0, 0], [0, 0], [0, 0], [1, 0]], dtype=np.int32)
    ids = ["c", "a", "b", "d"]  # row 1 ("a") keeps the tuple; "b" (row 2) moves before "c" (row 0)
    dist = {  # rows 2 and 0 only: the keeper's distances are never asked for
        0: [[0.0, 0.3, 0.9], [0.0, 0.7, 0.6]],
        2: [[1.0, 1.1, 1.5], [2.0, 2.4, 2.3]],  # margins: expert 0 -> code 1 (+0.1), but (1, 0) is held
    }
    calls = []

    def distances(rows):
        calls.append(rows.tolist())
        return np.array([dist[int(r)] for r in rows])

    new, moved, unresolved = dedup_tuples(tokens, ids, distances, top_k=2)
    assert calls == [[2, 0]]  # movers only, in item-id order
    # b: (1, 0) is held by d, the next margin, +0.3, is expert 1 code 2 -> (0, 2).
    # c: expert 0 code 1 (+0.3) gives (1, 0), held; expert 1 code 2 (+0.6) gives (0, 2), just taken by b;
    # expert 1 code 1 (+0.7) gives (0, 1), free.
    np.testing.assert_array_equal(new, [[0, 1], [0, 0], [0, 2], [1, 0]])
    assert moved == 2 and unresolved == []
    # With one candidate per expert, c's two tuples are both held (by d and b): it stays and is reported.
    new1, moved1, unresolved1 = dedup_tuples(tokens, ids, distances, top_k=1)
    np.testing.assert_array_equal(new1, [[0, 0], [0, 0], [0, 2], [1, 0]])
    assert moved1 == 1 and unresolved1 == [0]
    same, none, left = dedup_tuples(tokens[2:], ids[2:], lambda rows: pytest.fail("no collisions"), 2)
    assert none == 0 and left == [] and np.array_equal(same, tokens[2:])


def test_training_sample_is_seeded_bounded_and_keeps_ids_with_their_rows():
    """train_quantizer trains a catalog above `max_train_items` on a sample: the same rows every run, in
    item-id order, each row still the vector of its id; under the cap, everything."""
    from jobs.train_quantizer import training_sample

    ids = [f"item-{i:04d}" for i in range(2500)]
    mat = np.arange(2500, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    s_ids, s_mat = training_sample(ids, mat, 1000, seed=7)
    assert len(s_ids) == 1000 and s_ids == sorted(set(s_ids))
    assert all(s_mat[k, 0] == int(i.split("-")[1]) for k, i in enumerate(s_ids))
    assert training_sample(ids, mat, 1000, seed=7)[0] == s_ids
    assert training_sample(ids, mat, 1000, seed=8)[0] != s_ids
    assert training_sample(ids, mat, 2500, seed=7)[0] == ids and training_sample(ids, mat, None, seed=7)[0] == ids
