"""URIs of the Airflow Assets the nightly refresh publishes: the one list every DAG file shares.

Import-free (standard library only) so DAG files can read it at parse time: `reaseq_nightly`'s publish
task emits these Assets and downstream DAGs (e.g. `train_ranker`) are scheduled on the same URIs.
"""

from __future__ import annotations

import os

GOLD_TABLES = ("item_semantic_ids", "user_sequences", "user_augmented_behaviors", "user_features")


def lakehouse_uri() -> str:
    """The lakehouse root as an Asset URI (REASEQ_LAKEHOUSE_URI, default file://lakehouse)."""
    return os.environ.get("REASEQ_LAKEHOUSE_URI", "file://lakehouse")


def gold_asset_uris(base: str | None = None) -> list[str]:
    base = (base or lakehouse_uri()).rstrip("/")
    return [f"{base}/gold/{t}" for t in GOLD_TABLES]
