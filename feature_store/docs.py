"""Generate docs/tables.md from the table catalog (kept in sync by tests/test_catalog.py).

    python -m feature_store.docs            # rewrite docs/tables.md
    python -m feature_store.docs --check    # exit 1 when docs/tables.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from feature_store.catalog import TABLES

DOC = Path(__file__).resolve().parent.parent / "docs" / "tables.md"


def render() -> str:
    out = [
        "# Tables",
        "",
        "Generated from `feature_store/catalog.py` by `python -m feature_store.docs`; do not edit by hand.",
        "Every table is a Delta table at `<lakehouse>/<layer>/<table>/` (default `lakehouse/` under the project).",
        "Writes are MERGEs on the key, so reruns and backfills are idempotent.",
        "",
    ]
    for spec in TABLES.values():
        out += [f"## `{spec.name}`", "", spec.description, ""]
        out.append(f"- key: `({', '.join(spec.key)})`")
        if spec.partition_by:
            out.append(f"- partitioned by: `{', '.join(spec.partition_by)}`")
        if spec.preserve_on_update:
            out.append(f"- kept from the existing row on update: `{', '.join(spec.preserve_on_update)}`")
        if spec.version_pinned_by:
            out.append(f"- its Delta version is pinned by {spec.version_pinned_by}: never compacted by publish")
        if spec.cluster_by:
            out.append(f"- compaction sorts it by {', '.join(f'`{c}`' for c in spec.cluster_by)} (Z-order), so a lookup "
                       "by it opens one file")
        out.append(f"- owner: {spec.owner}")
        out += ["", "| column | type | nullable | notes |", "|---|---|---|---|"]
        for f in spec.schema:
            out.append(f"| `{f.name}` | `{f.type}` | {'yes' if f.nullable else 'no'} | "
                       f"{spec.column_docs.get(f.name, '')} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m feature_store.docs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="fail when docs/tables.md differs from the catalog")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is stale: run `python -m feature_store.docs`", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
