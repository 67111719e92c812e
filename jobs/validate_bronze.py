"""Quality gate on the bronze tables: Great Expectations suites; a failure stops the run.

Each failed expectation is also written to silver.quarantine (key `suite:<expectation>`) so the
reason is queryable next to the row-level quarantine, and the JSON report stays under reports/.
"""

from __future__ import annotations

from jobs.context import JobResult, RunContext
from jobs.quality import gate
from jobs.runtime import cli_main

TABLES = ("bronze.catalog_items", "bronze.interactions")


def run(ctx: RunContext) -> JobResult:
    return gate(ctx, TABLES)


if __name__ == "__main__":
    raise SystemExit(cli_main("validate_bronze"))
