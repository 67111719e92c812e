"""Quality gate on the gold tables before publication (see validate_bronze for the mechanics)."""

from __future__ import annotations

from jobs.context import JobResult, RunContext
from jobs.quality import gate
from jobs.runtime import cli_main

TABLES = ("gold.item_semantic_ids", "gold.user_sequences", "gold.user_augmented_behaviors", "gold.user_features")


def run(ctx: RunContext) -> JobResult:
    return gate(ctx, TABLES)


if __name__ == "__main__":
    raise SystemExit(cli_main("validate_gold"))
