"""Dead-letter policy of the LLM stage: count failed attempts, skip what keeps failing, requeue on demand.

An item that fails deterministically (a model that obeys an injected instruction and breaks the
schema, a server that always answers one item with invalid JSON) would otherwise be sent again by
every nightly run, since its `(item_id, content_hash, prompt_version, model)` never gets a knowledge
row. `reason_items` therefore counts failed attempts per that key in `ops.llm_attempts` (one per
execution that sent the item and quarantined it; a run the circuit breaker stops counts nothing) and,
once `failures` reaches `llm.dead_letter_after` (0 = never), leaves the item out of the work set and
writes a `dead_letter` quarantine row for it in every run instead, so each item of the catalog still
ends as a knowledge row or a quarantine row with a reason. A new content hash, prompt version or model
is a new key with no failures: the item is retried automatically. An operator resets the counter with

    python -m jobs.cli requeue-llm --item ID [ID ...] | --all | --list

which writes through `deltalake` (no JVM). The quarantine keeps every failure's reason and raw answer.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Iterable, Sequence
from typing import Any

TABLE = "ops.llm_attempts"
KEY = ("item_id", "content_hash", "prompt_version", "model")
REASON = "dead_letter"
REQUEUE_CMD = "python -m jobs.cli requeue-llm"


def dead_letter_reason(row: dict[str, Any], limit: int) -> str:
    """The quarantine reason of a skipped item: code, count, the command that requeues it, the last error."""
    return (
        f"{REASON}: skipped after {row['failures']} failed attempts (limit {limit}) of this content with prompt "
        f"{row['prompt_version']} and model {row['model']}; fix the cause, then `{REQUEUE_CMD} --item "
        f"{row['item_id']}`; last: {row.get('last_reason') or '?'}"
    )[:500]


def attempt_rows(
    previous: dict[tuple, dict[str, Any]],
    failed: Iterable[dict[str, Any]],
    succeeded: Iterable[tuple],
    ds: dt.date,
    run_id: str,
) -> list[dict[str, Any]]:
    """The ops.llm_attempts rows this run writes.

    `previous` maps a key to its current row; `failed` holds this run's quarantined items (the key's
    four columns and `reason`); `succeeded` the keys that got knowledge now (their counter closes as `ok`).
    """
    out = []
    for f in failed:
        key = tuple(f[k] for k in KEY)
        prev = previous.get(key) or {}
        out.append({
            **dict(zip(KEY, key, strict=True)),
            "failures": int(prev.get("failures") or 0) + 1,
            "total_failures": int(prev.get("total_failures") or 0) + 1,
            "status": "failing",
            "last_reason": (f.get("reason") or "failed")[:500],
            "first_failed_ds": prev.get("first_failed_ds") or ds,
            "last_failed_ds": ds,
            "last_failed_run_id": run_id,
            "requeued_at": prev.get("requeued_at"),
            "ds": ds,
            "run_id": run_id,
        })
    for key in succeeded:
        prev = previous.get(tuple(key))
        if prev is not None and prev.get("status") != "ok":
            out.append({**prev, "failures": 0, "status": "ok", "ds": ds, "run_id": run_id})
    return out


# ---------------------------------------------------------------- the operator's side (no Spark)


def read_attempts(root: str) -> list[dict[str, Any]]:
    from feature_store import delta

    if not delta.exists(TABLE, root):
        return []
    return delta.read_arrow(TABLE, root).to_pylist()


def requeue(root: str, items: Sequence[str] | None = None, everything: bool = False,
            now: dt.datetime | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Reset the counters of the named items (or of every item): (rows reset, named items with no failures).

    Nothing is written when a named item has no failed attempts recorded.
    """
    import pyarrow as pa

    from feature_store import delta
    from feature_store.catalog import get

    failing = [r for r in read_attempts(root) if r["failures"] > 0]
    if everything:
        chosen, unknown = failing, []
    else:
        wanted = list(dict.fromkeys(items or ()))
        have = {r["item_id"] for r in failing}
        unknown = [i for i in wanted if i not in have]
        chosen = [r for r in failing if r["item_id"] in set(wanted)]
    if unknown or not chosen:
        return [], unknown
    now = now or dt.datetime.now(dt.UTC)
    before = [dict(r) for r in chosen]
    run_id = f"requeue-llm__{now:%Y-%m-%dT%H:%M:%SZ}"
    for r in chosen:
        r.update(failures=0, status="requeued", requeued_at=now, ds=now.date(), run_id=run_id)
    spec = get(TABLE)
    from deltalake import DeltaTable

    (
        DeltaTable(delta.table_path(TABLE, root))
        .merge(pa.Table.from_pylist(chosen, schema=spec.schema),
               predicate=" AND ".join(f"t.{k} = s.{k}" for k in KEY), source_alias="s", target_alias="t")
        .when_matched_update_all()
        .execute()
    )
    return before, []


def _short(text: str | None, n: int = 100) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def main(root: str, items: Sequence[str] | None, everything: bool, listing: bool, limit: int) -> int:
    """`python -m jobs.cli requeue-llm`: 0 done (or nothing to do), 1 a named item has nothing to requeue."""
    if listing:
        rows = sorted((r for r in read_attempts(root) if r["failures"] > 0),
                      key=lambda r: (-r["failures"], r["item_id"]))
        if not rows:
            print(f"no item has failed LLM attempts under {root}")
            return 0
        dead = sum(limit > 0 and r["failures"] >= limit for r in rows)
        print(f"{len(rows)} item version(s) with failed LLM attempts under {root}; {dead} dead-lettered "
              f"(llm.dead_letter_after = {limit}{', never' if limit == 0 else ''})")
        print(f"{'item_id':24} {'failures':>8} {'dead':>5}  {'last failed':11} {'prompt':10} {'model':24} last reason")
        for r in rows:
            is_dead = "yes" if limit > 0 and r["failures"] >= limit else "no"
            print(f"{r['item_id']:24} {r['failures']:8d} {is_dead:>5}  {str(r['last_failed_ds'] or ''):11} "
                  f"{r['prompt_version']:10} {_short(r['model'], 24):24} {_short(r['last_reason'], 80)}")
        print(f"requeue: {REQUEUE_CMD} --item ID [ID ...] | --all")
        return 0
    reset, unknown = requeue(root, items, everything)
    if unknown:
        print(f"requeue-llm: no failed LLM attempts recorded for {', '.join(unknown)} under {root}; nothing changed "
              f"(see the failing items: {REQUEUE_CMD} --list)", file=sys.stderr)
        return 1
    if not reset:
        print(f"nothing to requeue: no item has failed LLM attempts under {root}")
        return 0
    ids = list(dict.fromkeys(r["item_id"] for r in reset))
    print(f"requeued {len(ids)} item(s) ({len(reset)} counter(s) reset to 0):")
    for r in reset:
        print(f"  {r['item_id']} (prompt {r['prompt_version']}, model {r['model']}): {r['failures']} failed "
              f"attempt(s), last: {_short(r['last_reason'])}")
    print("the next reason_items run (make run, or the nightly DAG) sends them to the LLM again")
    return 0
