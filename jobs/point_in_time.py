"""Beyond-log contexts as of earlier cuts, for training a consumer without showing it the future.

A training concern, not a nightly stage: the ranker (jobs/train_ranker.py) asks for them; the nightly
`infer_beyond_log` publishes one current inference per user. The same diffusion method and checkpoints
(jobs/infer_beyond_log.py) are used one cut earlier.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jobs.infer_beyond_log import load_sequences, load_vocab, train_or_load_at, training_prefixes
from jobs.progress import Progress


class PointInTimeUnavailable(RuntimeError):
    """The published inference cannot be reproduced as of earlier cuts; the message says what to do."""


def point_in_time_contexts(root: str, artifacts: str, published_model_version: str, *, top_n: int = 10,
                           sequences_version: int | None = None,
                           semantic_ids_version: int | None = None) -> tuple[dict[str, dict[str, list[str]]], dict]:
    """Beyond-log inferences as a training job may use them without seeing the future.

    gold.user_augmented_behaviors holds one inference per user, made from every event but the test
    target by a model trained on every event but the validation and test targets: right for scoring the
    test target, wrong for training or selecting a consumer, whose earlier targets that inference has
    already seen (or, for the validation target, was made after). This rebuilds the same method one cut
    earlier, the way the nightly table looked before those events happened: an *as-of* model with the
    published model's configuration, trained on every user's events but the last three, infers

    * "train": from every event but the last three, for the last training target (events[-3]);
    * "valid": from every event but the last two, for the validation target (events[-2]);

    so each context is made by a model that never saw its target, from history before it. One difference
    remains, said plainly: the train context is inferred from exactly the sequence the as-of model
    trained on, while the validation (and the published test) history holds one event its model never
    saw; matching that would take a second as-of model (trained on all but the last four). Returns ({"train": {user: item_ids}, "valid": ...}, stats).
    The as-of model is cached under artifacts/diffusion/ (its version hashes its exact training sequences).
    """
    from models import diffusion as D

    meta_path = Path(artifacts) / "diffusion" / published_model_version / "meta.json"
    if not published_model_version.startswith(D.MODEL_FAMILY.rsplit("-", 1)[0]):
        raise PointInTimeUnavailable(
            f"point-in-time beyond-log contexts: {published_model_version!r} is not a diffusion model (the llm "
            "method's inferences cannot be rebuilt as of earlier cuts); train with the published table as context "
            "(ranker setting beyond_log_point_in_time=false)")
    if not published_model_version.startswith(D.MODEL_FAMILY) or not meta_path.exists():
        raise PointInTimeUnavailable(
            f"point-in-time beyond-log contexts need the diffusion checkpoint of {published_model_version!r} "
            f"({meta_path} not found): run infer_beyond_log with beyond_log.method=diffusion on this lakehouse "
            "and artifacts folder, or train with the published table as context "
            "(ranker setting beyond_log_point_in_time=false)")
    meta = json.loads(meta_path.read_text())
    # Where it runs is this host's choice (device and threads are not part of the model version).
    cfg = D.DiffusionConfig.from_dict({**meta["config"], "device": "auto"})
    codebook_version = meta["codebook_version"]
    try:
        vocab = load_vocab(root, codebook_version, semantic_ids_version)
    except ValueError as exc:
        raise PointInTimeUnavailable(
            f"point-in-time beyond-log contexts: {published_model_version} was trained on codebook "
            f"{codebook_version}, which the pinned gold.item_semantic_ids does not hold ({exc}); rerun "
            "infer_beyond_log after assign_semantic_ids") from exc
    sequences = load_sequences(root, sequences_version)
    train_seqs, _ = training_prefixes(vocab, sequences, drop=3)
    if not train_seqs:
        raise PointInTimeUnavailable("point-in-time beyond-log contexts: no user has the 5 events an as-of model "
                                     "needs (2 to train on, then the training, validation and test targets)")
    model, version, reused, train_meta = train_or_load_at(artifacts, cfg, vocab, train_seqs, codebook_version,
                                                          latest=False)
    out: dict[str, dict[str, list[str]]] = {}
    stats = {"asof_model_version": version, "asof_reused_checkpoint": reused, "asof_train": train_meta,
             "asof_training_sequences": len(train_seqs), "published_model_version": published_model_version}
    start = time.perf_counter()
    for split, drop in (("train", 3), ("valid", 2)):
        users, histories = [], []
        for user_id, items in sequences:
            items = items or []
            if len(items) < drop + 1:
                continue
            idx, _ = vocab.encode(items[:-drop])
            if idx:
                users.append(user_id)
                histories.append(idx)
        bar = Progress(f"point-in-time contexts ({split})", len(histories))
        results = D.infer(model, vocab, histories, top_n, progress=bar)
        out[split] = {u: [vocab.item_ids[i] for i in r.item_idx] for u, r in zip(users, results, strict=True)
                      if r.item_idx}
        stats[f"{split}_users_with_context"] = len(out[split])
    stats["infer_seconds"] = round(time.perf_counter() - start, 2)
    return out, stats
