"""The nightly refresh's stages in dependency order: the one list the DAG and the runtime share.

Kept free of imports so the DAG file can read it at parse time without loading anything heavy.
"""

PIPELINE = [
    "ingest_catalog",
    "ingest_interactions",
    "validate_bronze",
    "reason_items",
    "embed_items",
    "train_quantizer",
    "assign_semantic_ids",
    "build_user_sequences",
    "infer_beyond_log",
    "build_user_features",
    "validate_gold",
    "publish",
]
