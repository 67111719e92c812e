"""Train REG4Rec's generative recommender over the MPQ tokens and record the run in ops.training_runs.

    python -m jobs.train_generative                                  # every variant on the configured lakehouse
    python -m jobs.train_generative --variants fixed_order +corp --seed 1 --epochs 10
    python -m jobs.train_generative --lakehouse /path/to/lakehouse --set beam=20 --no-record

No Spark: gold.user_sequences, gold.item_semantic_ids, silver.item_embeddings (the ranker's reader aligns
them), bronze.catalog_items (category paths: PARS's catalog credit) and, for +pars_knowledge only,
silver.item_knowledge (product types: its knowledge credit) are read at pinned Delta versions through Arrow; the model is trained with torch (models.generative); checkpoints go to
<artifacts>/generative/<version>/ where the version hashes the configuration, the pinned table versions
and the codebook version; one ops.training_runs row (model `generative:<model version>`) is MERGEd on
run_id. Settings: models.generative.GenerativeConfig's defaults, then the `generative` section of the
configuration (REASEQ__GENERATIVE__<KEY>), then the flags. Progress lines go to the `reaseq` logger.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from jobs.context import JobResult, RunContext
from jobs.progress import EpochProgress, duration, progress_line
from jobs.train_ranker import _parse_set, write_training_run

log = logging.getLogger("reaseq")
MODEL_FAMILY = "generative"
# Kept in sync with models.generative.VARIANTS without importing torch for --help (a test checks).
VARIANT_NAMES = ["fixed_order", "+dynamic_paths", "+corp", "+pars", "+msra", "+pars_knowledge"]
READ = ("gold.user_sequences", "gold.item_semantic_ids", "bronze.catalog_items")  # sequences, tokens, catalog paths
# Pinned only when +pars_knowledge is trained: otherwise each night's knowledge commit would be a new
# checkpoint version of models that never read it.
KNOWLEDGE = "silver.item_knowledge"


def default_run_id(ds: dt.date, seed: int) -> str:
    return f"train_generative__{ds.isoformat()}__s{seed}"


def generative_config(ctx_config: dict | None, overrides: dict | None = None):
    from models.generative import GenerativeConfig

    merged = dict((ctx_config or {}).get("generative") or {})
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return GenerativeConfig.from_dict(merged)


def load_data(root: str, config, versions: dict[str, int] | None = None, knowledge: bool = False):
    """(pinned tables, item features, token catalogue, reward credit, data statistics) for one lakehouse;
    `knowledge`: also the items' kinds from silver.item_knowledge (what +pars_knowledge needs)."""
    from models.generative import Credit, build_catalog, load_category_paths, load_item_kinds
    from models.ranker_data import Pinned, load_item_features, pin

    t0 = time.perf_counter()
    pinned = pin(root, tables=READ + ((KNOWLEDGE,) if knowledge else ()), versions=versions)
    # The item features without the knowledge: the ranker's reader would turn it into tokens nobody reads here.
    features = Pinned(pinned.root, {k: v for k, v in pinned.versions.items() if k != KNOWLEDGE})
    feats = load_item_features(features, embedder=config.embedder, batch_size=config.read_batch_rows)
    cat = build_catalog(feats)
    paths, path_stats = load_category_paths(pinned, feats, config.read_batch_rows)
    kinds, kind_stats = load_item_kinds(pinned, feats, config.read_batch_rows) if knowledge else (None, {})
    stats = {**feats.stats, **cat.stats, **path_stats, **kind_stats, "load_seconds": round(time.perf_counter() - t0, 2)}
    return pinned, feats, cat, Credit(paths, kinds), stats


class _TrainingLog(EpochProgress):
    """The base training's epochs (ETA to the early stop), the alignment stages' epochs, and the test
    decode of each inference mode (users, rate, ETA)."""

    def __init__(self, prefix: str, config, eval_users: int = 0):
        super().__init__(prefix, config.patience, config.select_metric)
        self.eval_users = eval_users

    def epoch(self, rec: dict) -> None:
        eta, _ = self.epoch_done(rec["epoch"], rec["max_epochs"], rec["best_epoch"],
                                 early_stopping=rec["stage"] == "base")
        log.info("%s: %s epoch %d/%d loss %.4f valid(fixed order) %s %.4f (best %.4f @ %d) %s/epoch, stage ETA %s",
                 self.prefix, rec["stage"], rec["epoch"], rec["max_epochs"], rec["loss"], self.select_metric,
                 rec["valid"], rec["best"], rec["best_epoch"], duration(self.epoch_times[-1]), eta)
        stop_by = min(rec["max_epochs"], rec["best_epoch"] + self.patience) if rec["stage"] == "base" \
            else rec["max_epochs"]
        if rec["epoch"] >= stop_by:
            self.restart()

    def eval(self, what: str, users: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        log.info("%s: %s", self.prefix, progress_line(f"test decode ({what})", users, self.eval_users,
                                                     now - self.epoch_start, "users"))
        self.last = now


def checkpoint_saver(directory: Path, config, pinned, stats):
    import torch

    directory.mkdir(parents=True, exist_ok=True)

    def save(stage: str, model, res) -> None:
        torch.save(model.state_dict(), directory / f"{stage}.pt")
        meta_path = directory / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        meta.update({"config": config.to_dict(), "table_versions": pinned.versions,
                     "codebook_version": stats["codebook_version"], "mpq_experts": stats["mpq_experts"],
                     "mpq_codebook_sizes": stats["mpq_codebook_sizes"]})
        meta.setdefault("stages", {})[stage] = {"best_epoch": res.best_epoch, "epochs": res.epochs,
                                                 "valid_select": res.valid}
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))

    return save


def train(root: str, config, *, ds: dt.date, artifacts: str | None = None, run_id: str | None = None,
          record: bool = True, variants: list[str] | None = None, data: tuple | None = None,
          progress: bool = True) -> dict[str, Any]:
    """Train and evaluate the variants; returns the ops.training_runs row as a dict (metrics decoded)."""
    import torch

    from models.generative import DEFAULT_VARIANTS, MODEL_VERSION, fit_variants, version_of

    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    variants = tuple(variants or DEFAULT_VARIANTS)
    run_id = run_id or default_run_id(ds, config.seed)
    pinned, feats, cat, credit, stats = data or load_data(root, config, knowledge="+pars_knowledge" in variants)
    version = version_of(config, pinned, feats.codebook_version)
    ckpt = Path(artifacts or "artifacts") / "generative" / version
    prefix = f"train_generative[s{config.seed}]"
    log.info("%s: %d items (%d with MPQ tokens, %d sharing a tuple), %d users, tables %s, checkpoints %s", prefix,
             feats.n_items, stats["items_with_mpq"], stats["items_sharing_a_tuple"], stats["users"], pinned.to_json(),
             ckpt)
    prog = _TrainingLog(prefix, config, eval_users=stats["users"] - stats["users_too_short"]) if progress else None
    res = fit_variants(pinned, feats, cat, credit, config, variants,
                       on_epoch=prog.epoch if prog else None, on_step=prog.step if prog else None,
                       on_eval=prog.eval if prog else None, save=checkpoint_saver(ckpt, config, pinned, stats))
    extra = res.pop("_extra")
    seconds = time.perf_counter() - t0
    metrics = {
        "variants": res, "data": stats, "checkpoint_dir": str(ckpt), "version": version,
        "test_users": extra.get("test_users"), "targets_without_mpq": extra.get("targets_without_mpq"),
        "alignment_examples": extra.get("alignment_examples"), "path_counts": extra.get("path_counts"),
        "history": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in h.items()}
                    for h in extra["history"]],
    }
    conf = {**config.to_dict(), "model_version": MODEL_VERSION, "codebook_version": feats.codebook_version,
            "embedder": feats.embedder, "variants": list(variants), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads()}
    row = {
        "run_id": run_id, "model": f"{MODEL_FAMILY}:{MODEL_VERSION}", "started_at": started,
        "seconds": round(seconds, 3), "table_versions": json.dumps({"root": root, **pinned.versions}, sort_keys=True),
        "config": json.dumps(conf, sort_keys=True, default=str), "seed": int(config.seed),
        "metrics": json.dumps(metrics, sort_keys=True, default=str), "device": extra["device"], "ds": ds,
    }
    if record:
        write_training_run(root, row)
    for v, r in res.items():
        log.info("%s: %-15s test recall@10 %.4f ndcg@10 %.4f | %.0f users/s | train %s", prefix, v,
                 r["test"]["recall@10"], r["test"]["ndcg@10"], r["users_per_second"], duration(r["train_seconds"]))
    log.info("%s: done in %s%s", prefix, duration(seconds),
             f"; recorded in ops.training_runs as {run_id}" if record else "")
    return {**row, "metrics": metrics, "config": conf, "table_versions": {"root": root, **pinned.versions}}


def run(ctx: RunContext) -> JobResult:
    """Entry for jobs.runtime.execute (spark-submit path): settings from the `generative` config section."""
    config = generative_config(ctx.config)
    out = train(ctx.root, config, ds=ctx.ds, artifacts=ctx.artifacts, run_id=f"{ctx.run_id}__generative__s{config.seed}")
    m = out["metrics"]
    return JobResult(rows_in=m["data"]["users"], rows_out=1, metrics={
        "training_run_id": out["run_id"], "test": {v: r["test"] for v, r in m["variants"].items()},
        "table_versions": out["table_versions"],
    })


def run_task(ds: str, run_id: str | None = None, conf: dict | None = None) -> dict:
    """Airflow entry: train on the configured lakehouse; conf carries generative settings (seed, max_epochs, ...)."""
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("reaseq").setLevel(logging.INFO)
    conf = {k: v for k, v in (conf or {}).items() if v not in (None, "")}
    lakehouse = conf.pop("lakehouse", None)
    ctx = RunContext.create(ds=ds, overrides={"lakehouse": lakehouse} if lakehouse else None,
                            dag_id="train_generative")
    config = generative_config(ctx.config, conf)
    out = train(ctx.root, config, ds=ctx.ds, artifacts=ctx.artifacts, run_id=run_id)
    return {"run_id": out["run_id"], "test": {v: r["test"] for v, r in out["metrics"]["variants"].items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train_generative",
        description="Train REG4Rec's generative recommender over the MPQ tokens (constrained decoding, dynamic "
        "reasoning paths, CORP pruning, PARS / MSRA preference alignment) on the feature tables read at pinned "
        "Delta versions through Arrow (no Spark), evaluate every variant by leave-one-out full ranking, and "
        "record the run in ops.training_runs.",
    )
    p.add_argument("--lakehouse", help="root of the Delta tables (default: the configuration's `lakehouse`)")
    p.add_argument("--variants", nargs="+", choices=VARIANT_NAMES,
                   help="variants to train and evaluate (default: all but +pars_knowledge, which also reads "
                   "silver.item_knowledge; the base model is always trained)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--epochs", type=int, dest="max_epochs", help="most base epochs (default: 20; early stopping first)")
    p.add_argument("--patience", type=int, help="base epochs without a better validation Recall@10 before stopping")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="sequences per batch (default: 256)")
    p.add_argument("--lr", type=float, help="base learning rate (default: 3e-3)")
    p.add_argument("--device", help="auto | cpu | cuda (default: auto: CUDA with mixed precision when present)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting (models.generative.GenerativeConfig), e.g. --set beam=20")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--ds", help="logical date YYYY-MM-DD recorded with the run (default: today, UTC)")
    p.add_argument("--run-id", help="ops.training_runs key (default: train_generative__<ds>__s<seed>)")
    p.add_argument("--no-record", action="store_true", help="do not write ops.training_runs")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: idle OpenMP threads sleep
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("reaseq").setLevel(logging.INFO)
    import torch

    from feature_store.delta import TableMissing
    from models.ranker_data import DataError

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: getattr(args, k) for k in ("seed", "max_epochs", "patience", "batch_size", "lr", "device")}
    overrides.update(_parse_set(args.set))
    try:
        ctx = RunContext.create(ds=args.ds, overrides={"lakehouse": args.lakehouse} if args.lakehouse else None,
                                dag_id="train_generative")
        config = generative_config(ctx.config, overrides)
        train(ctx.root, config, ds=ctx.ds, artifacts=ctx.artifacts, run_id=args.run_id, record=not args.no_record,
              variants=args.variants)
    except (TableMissing, DataError, ValueError, RuntimeError) as exc:
        print(f"train_generative failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
