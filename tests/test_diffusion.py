"""Masked diffusion beyond-log model: forward masking, reverse unmasking order, leakage, mapping to items."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs.infer_beyond_log import training_prefixes
from models import diffusion as D


def small_vocab(n_items: int = 12):
    # two levels plus a collision digit; items 0..n-1 get distinct groups
    ids = [f"i{k}" for k in range(n_items)]
    codes = [[k % 4, k // 4, 0] for k in range(n_items)]
    return D.SemanticVocab.build(ids, codes)


def test_vocab_maps_groups_back_to_items_and_skips_unknown():
    vocab = small_vocab()
    assert vocab.level_sizes == [4, 3, 1]
    assert vocab.item_for([1, 2, 0]) == vocab.index("i9")
    assert vocab.item_for([3, 2, 1]) is None  # a group no item has
    idx, skipped = vocab.encode(["i1", "nope", "i2"])
    assert idx == [1, 2] and skipped == 1


def test_vocab_rejects_mixed_group_lengths_and_counts_ambiguous_groups():
    with pytest.raises(ValueError, match="different lengths"):
        D.SemanticVocab.build(["a", "b"], [[1, 2], [1, 2, 3]])
    v = D.SemanticVocab.build(["a", "b", "c"], [[1, 2], [1, 2], [0, 0]])
    assert v.ambiguous_groups == 1 and v.item_for([1, 2]) == 0


def test_forward_masking_rate_follows_t_and_never_touches_padding():
    g = torch.Generator().manual_seed(0)
    b, t, levels = 4000, 6, 3
    tokens = torch.zeros(b, t, levels, dtype=torch.long)
    lengths = torch.full((b,), 4)
    pad = torch.arange(t).view(1, t) >= lengths.view(b, 1)
    noised, m, tt = D.mask_tokens(tokens, pad, lengths, [9, 9, 9], g, suffix_prob=0.0, min_t=0.05, max_suffix=2)
    assert not m[pad].any()
    assert (noised[m] == 9).all() and (noised[~m] == 0).all()
    rate = m[:, :4].float().mean(dim=(1, 2))
    # the per-sequence masked share tracks t (12 tokens per sequence: loose per-row, tight on average)
    assert abs(float((rate - tt).mean())) < 0.02
    assert float(torch.corrcoef(torch.stack([rate, tt]))[0, 1]) > 0.8
    assert m.flatten(1).any(1).all()  # every sequence has something to learn


def test_suffix_masking_only_noises_the_last_items():
    g = torch.Generator().manual_seed(1)
    b, t, levels = 500, 8, 2
    tokens = torch.zeros(b, t, levels, dtype=torch.long)
    lengths = torch.full((b,), 8)
    pad = torch.zeros(b, t, dtype=torch.bool)
    _, m, _ = D.mask_tokens(tokens, pad, lengths, [5, 5], g, suffix_prob=1.0, min_t=0.5, max_suffix=3)
    assert not m[:, :5].any()      # at most the last 3 items
    assert m[:, 7].any()


def test_loss_weights_masked_tokens_by_one_over_t():
    logits = [torch.zeros(1, 2, 4)]  # uniform: CE = log 4 per token
    targets = torch.zeros(1, 2, 1, dtype=torch.long)
    mask = torch.tensor([[[True], [False]]])
    loss = D.diffusion_loss(logits, targets, mask, torch.tensor([0.5]), torch.tensor([2]))
    assert float(loss) == pytest.approx(np.log(4) / 0.5 / 2)


class _Scripted(torch.nn.Module):
    """A model whose confidence is fixed per (slot, level): checks the reverse process's commit order."""

    def __init__(self, level_sizes, slots, conf):
        super().__init__()
        self.level_sizes, self.config = level_sizes, D.DiffusionConfig(slots=slots, max_len=4)
        self.conf = conf  # [slots, levels] probabilities of token 1
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    @property
    def mask_ids(self):
        return list(self.level_sizes)

    def forward(self, tokens, pad, at):
        self.calls.append(tokens.clone())
        assert at.tolist() == [[2, 3]]  # logits asked for the appended slots only
        out = []
        for level, n in enumerate(self.level_sizes):
            p = torch.full((1, 2, n), 1e-6)
            for s in range(self.conf.shape[0]):
                p[:, s, 1] = self.conf[s, level]
                p[:, s, 0] = 1 - self.conf[s, level]
            out.append(p.log())
        return out


def test_unmasking_commits_the_most_confident_token_first_and_remasks_the_rest():
    conf = torch.tensor([[0.6, 0.9], [0.7, 0.95]])  # slot 1 level 1 most confident, then slot 0 level 1 ...
    model = _Scripted([3, 3], slots=2, conf=conf)
    tokens = torch.zeros(1, 4, 2, dtype=torch.long)
    pad = torch.zeros(1, 4, dtype=torch.bool)
    decoded, confidence, order, _ = D.unmask(model, tokens, pad, torch.tensor([2]), slots=2, tokens_per_step=1)
    # flat index = slot * levels + level
    assert order.tolist() == [[3, 1, 2, 0]]
    assert (decoded == 1).all()
    assert torch.allclose(confidence[0], conf, atol=1e-5)
    # step k sees exactly k committed tokens; the others are still [MASK] (remasked)
    masked_per_step = [int((c[0, 2:] == 3).sum()) for c in model.calls]
    assert masked_per_step == [4, 3, 2, 1]


def test_training_prefixes_leave_out_validation_and_test_targets():
    vocab = small_vocab()
    seqs = [("u1", ["i0", "i1", "i2", "i3", "i4"]), ("u2", ["i5", "i6", "i7"]), ("u3", ["i8", "i9"])]
    train, skipped = training_prefixes(vocab, seqs)
    assert train == [[0, 1, 2]]  # u2's prefix has one item (too short to learn from), u3 has none
    held_out = {"i3", "i4", "i6", "i7", "i8", "i9"}
    assert not {vocab.item_ids[i] for s in train for i in s} & held_out
    assert skipped == 0
    # drop=3: the as-of model behind the ranker's point-in-time contexts never sees the last training target
    assert training_prefixes(vocab, seqs, drop=3)[0] == [[0, 1]]


def test_a_short_training_run_learns_a_deterministic_successor_and_maps_back_to_items():
    vocab = small_vocab()
    # item k is always followed by item k+1: the model must learn it from the tokens
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(300):
        start = int(rng.integers(0, 6))
        seqs.append(list(range(start, start + 6)))
    cfg = D.DiffusionConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.0, epochs=40, batch_size=64, lr=3e-3,
                            slots=2, max_len=8, seed=0, device="cpu")
    model, stats = D.train(vocab, seqs, cfg)
    assert stats.last_loss < stats.first_loss * 0.7
    res = D.infer(model, vocab, [[2, 3, 4], [5, 6, 7]], top_n=4)
    assert res[0].item_idx[0] == 5 and res[1].item_idx[0] == 8
    for r, hist in zip(res, [[2, 3, 4], [5, 6, 7]], strict=True):
        assert len(r.item_idx) == 4 and not set(r.item_idx) & set(hist)
        assert len(set(r.item_idx)) == 4
        assert r.decoded_valid + r.decoded_invalid + r.decoded_seen == 2


def test_a_step_cap_trains_fewer_whole_epochs_and_names_another_model():
    """A million users must not train 30 epochs: `max_steps` bounds the optimizer steps in whole epochs
    (the last one crossing the cap), and the cap is part of the model's version."""
    vocab = small_vocab()
    seqs = [[k % 6, (k + 1) % 6, (k + 2) % 6, (k + 3) % 6] for k in range(300)]
    kw = dict(d_model=16, n_layers=1, n_heads=2, epochs=40, batch_size=64, slots=2, max_len=6, seed=0, device="cpu")
    capped = D.DiffusionConfig(**kw, max_steps=50)
    _, stats = D.train(vocab, seqs, capped)
    per_epoch = stats.steps // stats.epochs
    assert stats.steps == per_epoch * stats.epochs and 1 < stats.epochs < 40
    assert stats.steps >= 50 > stats.steps - per_epoch
    assert stats.last_loss < stats.first_loss
    assert capped.config_hash() != D.DiffusionConfig(**kw, max_steps=None).config_hash()


@pytest.mark.parametrize("n_seqs, epochs", [(3, 1), (20, 2), (80, 2)])
def test_a_tiny_catalog_trains_without_a_degenerate_schedule(n_seqs, epochs):
    # A few optimiser steps in all (80 users, 2 epochs: 10 steps) once made OneCycleLR divide by zero.
    vocab = small_vocab()
    seqs = [[k % 6, (k + 1) % 6, (k + 2) % 6] for k in range(n_seqs)]
    cfg = D.DiffusionConfig(d_model=16, n_layers=1, n_heads=2, epochs=epochs, slots=2, max_len=6, seed=0,
                            device="cpu")
    _, stats = D.train(vocab, seqs, cfg)
    assert np.isfinite(stats.last_loss)


def test_checkpoint_round_trip(tmp_path):
    vocab = small_vocab()
    cfg = D.DiffusionConfig(d_model=16, n_layers=1, n_heads=2, epochs=1, slots=1, max_len=6, device="cpu")
    model, _ = D.train(vocab, [[0, 1, 2], [3, 4, 5]], cfg)
    D.save(model, vocab, tmp_path / "v", {"x": 1})
    again = D.load(tmp_path / "v", "cpu")
    a = D.infer(model, vocab, [[0, 1]], top_n=3)[0]
    b = D.infer(again, vocab, [[0, 1]], top_n=3)[0]
    assert a.item_idx == b.item_idx


def test_users_without_a_usable_history_get_a_row_that_says_why(tmp_path):
    """One interaction, empty history, items without semantic IDs: counted and explained, no crash."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from feature_store import delta
    from feature_store.catalog import ITEM_SEMANTIC_IDS
    from jobs.infer_beyond_log import infer_diffusion
    from tests.conftest import make_ctx

    ctx = make_ctx(tmp_path)
    n = 12
    rows = [{"item_id": f"i{k}", "codebook_version": "cb-test", "rq_codes": [k % 4, k // 4, 0],
             "mpq_tokens": [k % 3, k % 2], "embedder": "e", "ds": ctx.ds, "run_id": "r"} for k in range(n)]
    write_deltalake(delta.table_path("gold.item_semantic_ids", ctx.root),
                    pa.Table.from_pylist(rows, schema=ITEM_SEMANTIC_IDS.schema))
    sequences = [
        ("u_ok", ["i0", "i1", "i2", "i3", "i4", "i5"]),
        ("u_ok2", ["i3", "i4", "i5", "i6", "i7"]),
        ("u_one", ["i1"]),                       # a single interaction: it is the test target
        ("u_empty", []),
        ("u_unknown", ["x1", "x2", "i2"]),       # history items without semantic IDs
        ("u_partial", ["x1", "i7", "i8", "i9"]),  # one unknown item, skipped and counted
    ]
    rows, metrics = infer_diffusion(ctx, sequences, "cb-test", top_n=3, min_history=2)
    by = {r["user_id"]: r for r in rows}
    assert set(by) == {u for u, _ in sequences}
    assert by["u_one"]["status"] == "history_too_short" and by["u_empty"]["status"] == "history_too_short"
    assert by["u_unknown"]["status"] == "no_semantic_ids" and by["u_unknown"]["item_ids"] == []
    for u in ("u_ok", "u_ok2", "u_partial"):
        r = by[u]
        assert r["status"] == "ok" and len(r["item_ids"]) == 3
        assert not set(r["item_ids"]) & set(dict(sequences)[u][:-1])
        assert r["semantic_ids"] == [[int(i[1:]) % 4, int(i[1:]) // 4, 0] for i in r["item_ids"]]
    # u_partial's prefix is x1, i7: x1 is skipped and one item is too short to learn from
    assert metrics["training_sequences"] == 2
    assert metrics["training_events_without_semantic_id"] == 2
    again_rows, again = infer_diffusion(ctx, sequences, "cb-test", top_n=3, min_history=2)
    assert again["reused_checkpoint"] is True and again["model_version"] == metrics["model_version"]
    assert [r["item_ids"] for r in again_rows] == [r["item_ids"] for r in rows]


def test_items_older_than_the_models_window_are_still_excluded():
    vocab = small_vocab()
    cfg = D.DiffusionConfig(d_model=16, n_layers=1, n_heads=2, epochs=1, slots=2, max_len=4, device="cpu")
    model, _ = D.train(vocab, [[0, 1, 2, 3], [4, 5, 6, 7]], cfg)
    history = list(range(10))  # the model sees the last 2; the other 8 must not come back
    res = D.infer(model, vocab, [history], top_n=2)[0]
    assert sorted(res.item_idx) == [10, 11]


def _scores_of_every_item(level_lp, codes, excluded, need):
    """The ranking top_items must match: every item scored, the excluded ones removed."""
    scores = sum(level_lp[g][codes[:, g]] for g in range(codes.shape[1]))
    keep = np.setdiff1d(np.arange(len(codes)), excluded)
    ranked = keep[np.argsort(-scores[keep], kind="stable")][:need]
    return ranked, scores[ranked]


def _unique_codes(rng, n, sizes):
    rows: set[tuple[int, ...]] = set()
    while len(rows) < n:
        rows.add(tuple(int(rng.integers(0, v)) for v in sizes))
    return np.array(sorted(rows, key=lambda _: rng.random()), dtype=np.int64)


@pytest.mark.parametrize("n_items,sizes", [(1, [3, 3, 1]), (8, [8]), (40, [6, 9]), (300, [6, 9, 12]), (3000, [16, 16, 8, 4])])
@pytest.mark.parametrize("sharpness", [0.1, 1.0, 8.0])
def test_top_items_are_exactly_what_scoring_every_item_ranks_first(n_items, sizes, sharpness):
    """Pruning by prefix bounds changes how many items are scored, never which come out or their scores:
    flat and peaked log-probs, one to four levels, histories excluding up to half the catalog, lists
    longer than what is left."""
    rng = np.random.default_rng(n_items + len(sizes))
    codes = _unique_codes(rng, n_items, sizes)
    index = D.PrefixIndex(codes)
    for case in range(12):
        level_lp = [torch.log_softmax(torch.randn(v) * sharpness, -1).numpy() for v in sizes]
        excluded = rng.choice(n_items, size=int(rng.integers(0, n_items // 2 + 1)), replace=False)
        need = int(rng.choice([1, 5, 50, n_items + 3]))
        items, scores, scored = D.top_items(level_lp, index, excluded.astype(np.int64), need)
        want_items, want_scores = _scores_of_every_item(level_lp, codes, excluded, need)
        assert items.tolist() == want_items.tolist(), (case, need)
        assert np.array_equal(scores, want_scores)  # the same float32 sums, bit for bit
        assert scored <= n_items - len(excluded)


def test_top_items_score_a_small_part_of_a_large_catalog_when_the_model_is_sure():
    """What makes a million items affordable: with peaked per-level log-probs (a trained model's), only
    the items under prefixes that can still reach the top ten are scored."""
    rng = np.random.default_rng(7)
    sizes = [64, 64, 16, 4]
    codes = _unique_codes(rng, 50_000, sizes)
    index = D.PrefixIndex(codes)
    level_lp = [torch.log_softmax(torch.randn(v) * 4.0, -1).numpy() for v in sizes]
    items, _, scored = D.top_items(level_lp, index, np.zeros(0, np.int64), 10)
    assert len(items) == 10
    assert scored < 50_000 // 20


def test_codes_shared_by_several_items_are_all_ranked():
    """Ambiguous groups (two items on one code) both come out, with equal scores."""
    codes = np.array([[0, 1], [0, 1], [1, 0], [1, 1]], dtype=np.int64)
    level_lp = [np.log(np.array([0.9, 0.1], np.float32)), np.log(np.array([0.2, 0.8], np.float32))]
    items, scores, _ = D.top_items(level_lp, D.PrefixIndex(codes), np.array([3], np.int64), 3)
    assert sorted(items[:2].tolist()) == [0, 1] and scores[0] == scores[1] and items[2] == 2


def test_inference_with_pruning_gives_the_lists_of_scoring_every_item():
    """Through the model: the same items, in the same order, with the same scores, as scoring the whole
    catalog for every user, while scoring fewer items."""
    rng = np.random.default_rng(11)
    codes = _unique_codes(rng, 600, [12, 12, 6, 2])
    codes[:90] = np.repeat(codes[90:120], 3, axis=0)  # 30 groups named by three items each: equal scores
    vocab = D.SemanticVocab.build([f"i{k}" for k in range(len(codes))], codes.tolist())
    seqs = [list(rng.choice(600, size=int(rng.integers(3, 9)), replace=False)) for _ in range(400)]
    cfg = D.DiffusionConfig(d_model=32, n_layers=1, n_heads=2, epochs=3, batch_size=64, slots=2, max_len=10,
                            seed=0, device="cpu")
    model, _ = D.train(vocab, seqs, cfg)
    histories = seqs[:60]
    pruned = D.infer(model, vocab, histories, top_n=20, batch_size=16)
    every = D.infer(model, vocab, histories, top_n=20, batch_size=16, exhaustive=True)
    for a, b, h in zip(pruned, every, histories, strict=True):
        assert a.item_idx == b.item_idx and a.scores == b.scores
        assert not set(a.item_idx) & set(h)
        assert b.scored == 600
    assert sum(a.scored for a in pruned) < sum(b.scored for b in every)


def test_top_items_stay_exact_with_large_scores_and_ties_at_the_cut():
    """Float32 rounding grows with the scores' size (the pruning's slack grows with it): with log-probs
    near -1e4 per level, neighbouring scores are a rounding apart, and the lists still match."""
    rng = np.random.default_rng(5)
    sizes = [64, 64, 1, 1]  # one item per prefix, at the best of the later levels: score == bound
    codes = np.array([[a, b, 0, 0] for a in range(64) for b in range(64)], dtype=np.int64)
    index = D.PrefixIndex(codes)
    for _ in range(40):
        # Every score near -40,002, where a float32 ulp is 0.004.
        level_lp = [(-1e4 - rng.random(v)).astype(np.float32) for v in sizes]
        items, scores, _ = D.top_items(level_lp, index, np.zeros(0, np.int64), 25)
        want_items, want_scores = _scores_of_every_item(level_lp, codes, np.zeros(0, np.int64), 25)
        assert items.tolist() == want_items.tolist() and np.array_equal(scores, want_scores)


def test_a_nan_log_prob_disables_pruning_instead_of_dropping_items():
    codes = _unique_codes(np.random.default_rng(2), 500, [8, 8, 8])
    level_lp = [torch.log_softmax(torch.randn(8) * 3, -1).numpy() for _ in range(3)]
    level_lp[2][5] = np.nan
    items, scores, _ = D.top_items(level_lp, D.PrefixIndex(codes), np.zeros(0, np.int64), 10)
    finite = np.isfinite(scores)
    every = sum(level_lp[g][codes[:, g]] for g in range(3))
    every = np.where(np.isnan(every), -np.inf, every)
    want = np.lexsort((np.arange(500), -every))[:10]
    assert items.tolist() == want.tolist() and finite.all()
