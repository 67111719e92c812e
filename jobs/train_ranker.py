"""Train the sequential ranker on the current lakehouse and record the run in ops.training_runs.

    python -m jobs.train_ranker                          # variant "all" on the configured lakehouse
    python -m jobs.train_ranker --variant id_only --seed 1 --epochs 20
    python -m jobs.train_ranker --lakehouse /path/to/lakehouse --set dropout=0.2 --no-record

No Spark: the tables are read at pinned Delta versions through Arrow (models.ranker_data), the model is
trained with torch (models.ranker), and the one ops.training_runs row is MERGEd on run_id with deltalake,
so rerunning a day rewrites its row. Settings: models.ranker.RankerConfig's defaults, then the `ranker`
section of the configuration (REASEQ__RANKER__<KEY>, e.g. REASEQ__RANKER__MAX_EPOCHS=20), then the flags.
Progress lines (epoch, loss, validation Recall@10, sequences/s, ETA) go to the `reaseq` logger.
Variants with the beyond-log context (`+beyond_log`, `all`) first rebuild it as of the validation cut and
the last training target (jobs.point_in_time.point_in_time_contexts): the first run on a lakehouse
trains that as-of diffusion model (cached under artifacts/diffusion/), later runs reuse it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from typing import Any

from jobs.context import JobResult, RunContext
from jobs.progress import EpochProgress, duration, rate
from models.variants import VARIANTS

VARIANT_NAMES = list(VARIANTS)  # the training DAG's parameter and --help (no torch import)

log = logging.getLogger("reaseq")
MODEL_NAME = "sasrec-ranker-v1"


def default_run_id(ds: dt.date, variant: str, seed: int) -> str:
    return f"train_ranker__{ds.isoformat()}__{variant}__s{seed}"


def ranker_config(ctx_config: dict | None, overrides: dict | None = None):
    from models.ranker import RankerConfig

    merged = dict((ctx_config or {}).get("ranker") or {})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return RankerConfig.from_dict(merged)


def write_training_run(root: str, row: dict) -> None:
    """MERGE one row into ops.training_runs on run_id (deltalake, no JVM); creates the table if needed."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from feature_store import delta
    from feature_store.catalog import TRAINING_RUNS

    table = pa.Table.from_pylist([row], schema=TRAINING_RUNS.schema)
    path = delta.table_path(TRAINING_RUNS.name, root)
    if not delta.exists(TRAINING_RUNS.name, root):
        write_deltalake(path, table, mode="append", description=TRAINING_RUNS.description)
        return
    (
        DeltaTable(path)
        .merge(table, predicate="t.run_id = s.run_id", source_alias="s", target_alias="t")
        .when_matched_update_all()
        .when_not_matched_insert_all()
        .execute()
    )


def summary_embedder(embedding: dict | None = None):
    """(texts -> unit vectors, its name) with the pipeline's embedder (the `embedding` section, by default
    the configuration's): what embeds the agents' summaries for the ranker's llm_knowledge family."""
    from jobs.config import load_config
    from models.embedder import EmbedderConfig, embed_texts

    cfg = EmbedderConfig.from_dict(embedding if embedding is not None else load_config().get("embedding"))
    return (lambda texts: embed_texts(texts, cfg)), cfg.name


def load_data(root: str, config, versions: dict[str, int] | None = None, artifacts: str | None = None,
              embedding: dict | None = None):
    """(pinned tables, item features, beyond-log contexts, data statistics) for one lakehouse.

    The agents' summaries are embedded (`embedding`: the pipeline's embedder settings) only when the
    variant uses the llm_knowledge family.

    Beyond-log: the published map (gold.user_augmented_behaviors) and, when the variant uses it in
    point-in-time mode, the as-of inferences for the validation and training targets
    (jobs.point_in_time.point_in_time_contexts, which needs the published model's checkpoint under
    `artifacts`).
    """
    from models.ranker_data import (
        AUGMENTED,
        SEMANTIC_IDS,
        SEQUENCES,
        BeyondLogContexts,
        check_user_features,
        item_lists_to_index,
        load_beyond_log,
        load_item_features,
        pin,
    )

    t0 = time.perf_counter()
    pinned = pin(root, versions=versions)
    embed, embed_name = summary_embedder(embedding) if config.use_llm_knowledge else (None, None)
    feats = load_item_features(pinned, embedder=config.embedder, batch_size=config.read_batch_rows, embed=embed)
    feats.stats["summary_embedder"] = embed_name
    published, bl_stats = load_beyond_log(pinned, feats, config.beyond_log_model, config.beyond_log_k,
                                          config.read_batch_rows)
    beyond = published
    if config.use_beyond_log and config.beyond_log_point_in_time:
        from jobs.point_in_time import PointInTimeUnavailable, point_in_time_contexts

        if artifacts is None:
            raise PointInTimeUnavailable("point-in-time beyond-log contexts need the artifacts folder that holds "
                                         "the diffusion checkpoints (the configuration's `artifacts`)")
        t1 = time.perf_counter()
        by_split, pit_stats = point_in_time_contexts(
            root, artifacts, bl_stats["beyond_log_model_version"], top_n=config.beyond_log_k,
            sequences_version=pinned.versions[SEQUENCES], semantic_ids_version=pinned.versions[SEMANTIC_IDS])
        train_ctx, unknown_train = item_lists_to_index(by_split["train"], feats, config.beyond_log_k)
        valid_ctx, unknown_valid = item_lists_to_index(by_split["valid"], feats, config.beyond_log_k)
        beyond = BeyondLogContexts(train=train_ctx, valid=valid_ctx, test=published)
        bl_stats["beyond_log_point_in_time"] = {
            **pit_stats, "items_outside_vocabulary": unknown_train + unknown_valid,
            "seconds": round(time.perf_counter() - t1, 2), "augmented_table_version": pinned.versions[AUGMENTED]}
        log.info("point-in-time beyond-log contexts from %s: %d training and %d validation users (%.0fs)",
                 pit_stats["asof_model_version"], len(train_ctx), len(valid_ctx), time.perf_counter() - t1)
    stats = {**feats.stats, **bl_stats, **check_user_features(pinned, config.read_batch_rows),
             "load_seconds": round(time.perf_counter() - t0, 2)}
    return pinned, feats, beyond, stats


def _epoch_logger(prefix: str, config):
    """on_step / on_epoch callbacks of `fit` that log progress (jobs/progress.py's format)."""
    prog = EpochProgress(prefix, config.patience, config.select_metric)

    def epoch_done(rec: dict) -> None:
        eta, eta_max = prog.epoch_done(rec["epoch"], rec["max_epochs"], rec["best_epoch"])
        metric = config.select_metric
        log.info("%s: epoch %d/%d loss %.4f valid %s %.4f (best %.4f @ %d) %s seq/s ETA %s (at most %s)",
                 prefix, rec["epoch"], rec["max_epochs"], rec["loss"], metric, rec["valid"][metric], rec["best"],
                 rec["best_epoch"], rate(rec["sequences_per_second"]), eta, eta_max)

    return prog.step, epoch_done


def train(root: str, config, *, ds: dt.date, run_id: str | None = None, record: bool = True,
          data: tuple | None = None, progress: bool = True, artifacts: str | None = None) -> dict[str, Any]:
    """Train one ranker; returns the ops.training_runs row as a dict (metrics and config decoded)."""
    import torch

    from models.ranker import MODEL_VERSION, fit, make_streams

    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    run_id = run_id or default_run_id(ds, config.variant, config.seed)
    pinned, feats, beyond, stats = data or load_data(root, config, artifacts=artifacts)
    prefix = f"train_ranker[{config.variant} s{config.seed}]"
    log.info("%s: %d items, %d users (%d too short to evaluate), tables %s", prefix, feats.n_items,
             stats["users"], stats["users_too_short"], pinned.to_json())
    on_step, on_epoch = _epoch_logger(prefix, config) if progress else (None, None)
    model, res = fit(feats, make_streams(pinned, feats, config, beyond), config, on_epoch=on_epoch, on_step=on_step)
    seconds = time.perf_counter() - t0
    metrics = {
        "test": res.test, "valid": res.valid, "best_epoch": res.best_epoch, "epochs": res.epochs,
        "stopped_early": res.stopped_early, "train_seconds": round(res.train_seconds, 3),
        "fit_seconds": round(res.fit_seconds, 3),
        "sequences_per_second": round(res.sequences_per_second, 1), "train_sequences": res.train_sequences,
        "eval_users": res.eval_users, "data": stats, "stream_counts": res.counts,
        "loss": [round(h["loss"], 5) for h in res.history],
        "valid_curve": [round(h["valid"][config.select_metric], 5) for h in res.history],
        # the learned score bonus per beyond-log context rank: how far the ranker trusts the inferred items
        "beyond_log_copy_bonus": ([round(float(v), 4) for v in model.copy.detach().cpu()]
                                  if model.copy is not None else None),
    }
    conf = {**config.to_dict(), "model_version": MODEL_VERSION, "codebook_version": feats.codebook_version,
            "embedder": feats.embedder, "beyond_log_model_version": stats.get("beyond_log_model_version"),
            "beyond_log_asof_model_version": (stats.get("beyond_log_point_in_time") or {}).get("asof_model_version"),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    row = {
        "run_id": run_id, "model": f"{MODEL_NAME}:{config.variant}", "started_at": started,
        "seconds": round(seconds, 3), "table_versions": json.dumps({"root": root, **pinned.versions}, sort_keys=True),
        "config": json.dumps(conf, sort_keys=True, default=str), "seed": int(config.seed),
        "metrics": json.dumps(metrics, sort_keys=True, default=str), "device": res.device, "ds": ds,
    }
    if record:
        write_training_run(root, row)
    t = res.test
    log.info("%s: done in %s, best epoch %d of %d; test recall@10 %.4f ndcg@10 %.4f (valid recall@10 %.4f)%s",
             prefix, duration(seconds), res.best_epoch, res.epochs, t["recall@10"], t["ndcg@10"],
             res.valid.get("recall@10", float("nan")), f"; recorded in ops.training_runs as {run_id}" if record else "")
    return {**row, "metrics": metrics, "config": conf, "table_versions": {"root": root, **pinned.versions}}


def run(ctx: RunContext) -> JobResult:
    """Entry for jobs.runtime.execute (spark-submit path): settings from the `ranker` config section."""
    config = ranker_config(ctx.config)
    out = train(ctx.root, config, ds=ctx.ds, run_id=f"{ctx.run_id}__{config.variant}__s{config.seed}",
                artifacts=ctx.artifacts)
    m = out["metrics"]
    return JobResult(rows_in=m["data"]["users"], rows_out=1, metrics={
        "training_run_id": out["run_id"], "test": m["test"], "best_epoch": m["best_epoch"],
        "table_versions": out["table_versions"],
    })


def run_task(ds: str, run_id: str | None = None, conf: dict | None = None) -> dict:
    """Airflow entry: train on the configured lakehouse; conf carries ranker settings (variant, seed, ...)."""
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("reaseq").setLevel(logging.INFO)
    conf = {k: v for k, v in (conf or {}).items() if v not in (None, "")}
    lakehouse = conf.pop("lakehouse", None)
    ctx = RunContext.create(ds=ds, overrides={"lakehouse": lakehouse} if lakehouse else None, dag_id="train_ranker")
    config = ranker_config(ctx.config, conf)
    out = train(ctx.root, config, ds=ctx.ds, run_id=run_id, artifacts=ctx.artifacts)
    return {"run_id": out["run_id"], "test": out["metrics"]["test"], "best_epoch": out["metrics"]["best_epoch"]}


def _parse_set(values: list[str]) -> dict:
    import yaml

    out = {}
    for v in values:
        if "=" not in v:
            raise SystemExit(f"--set {v!r}: use KEY=VALUE, e.g. --set dropout=0.2")
        k, raw = v.split("=", 1)
        out[k.strip()] = yaml.safe_load(raw)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train_ranker",
        description="Train the SASRec-style ranker on the feature tables (read at pinned Delta versions through "
        "Arrow, no Spark), evaluate it by leave-one-out full ranking, and record the run in ops.training_runs.",
    )
    p.add_argument("--lakehouse", help="root of the Delta tables (default: the configuration's `lakehouse`)")
    p.add_argument("--variant", choices=VARIANT_NAMES, help="item inputs (default: all)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--epochs", type=int, dest="max_epochs", help="most epochs (default: 60; early stopping first)")
    p.add_argument("--patience", type=int, help="epochs without a better validation Recall@10 before stopping")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="sequences per batch (default: 256)")
    p.add_argument("--lr", type=float, help="learning rate (default: 1e-3)")
    p.add_argument("--device", help="auto | cpu | cuda (default: auto: CUDA with mixed precision when present)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other ranker setting (models.ranker.RankerConfig), e.g. --set dropout=0.2")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--ds", help="logical date YYYY-MM-DD recorded with the run (default: today, UTC)")
    p.add_argument("--run-id", help="ops.training_runs key (default: train_ranker__<ds>__<variant>__s<seed>)")
    p.add_argument("--no-record", action="store_true", help="do not write ops.training_runs")
    args = p.parse_args(argv)
    # Idle OpenMP threads sleep instead of spinning: on a CPU shared with Spark, spinning threads made
    # two-thread training several times slower than one. Must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("reaseq").setLevel(logging.INFO)
    import torch

    from feature_store.delta import TableMissing
    from models.ranker_data import DataError

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: getattr(args, k) for k in ("variant", "seed", "max_epochs", "patience", "batch_size", "lr",
                                               "device")}
    overrides.update(_parse_set(args.set))
    try:
        ctx = RunContext.create(ds=args.ds, overrides={"lakehouse": args.lakehouse} if args.lakehouse else None,
                                dag_id="train_ranker")
        config = ranker_config(ctx.config, overrides)
        train(ctx.root, config, ds=ctx.ds, run_id=args.run_id, record=not args.no_record, artifacts=ctx.artifacts)
    except (TableMissing, DataError, ValueError, RuntimeError) as exc:
        print(f"train_ranker failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
