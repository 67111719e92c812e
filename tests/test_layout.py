"""The house's rules, read from the code's imports (function-level imports included): packages import one
way, `dags -> jobs -> {llm_agents, models} -> feature_store`, and no files import each other in a loop."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dags", "jobs", "llm_agents", "models", "feature_store", "bench")
# What each package may import of ours (itself always).
ALLOWED = {
    "dags": {"jobs", "feature_store"},
    "jobs": {"llm_agents", "models", "feature_store"},
    "llm_agents": set(),
    "models": {"feature_store"},
    "feature_store": set(),
    "bench": {"jobs", "llm_agents", "models", "feature_store"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str] | None = None) -> set[str]:
    """The project modules a file imports, anywhere in it (relative imports resolved). `from pkg import mod`
    counts as importing pkg.mod, not pkg, when `modules` lists pkg.mod."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            subs = [f"{base}.{a.name}" for a in node.names if modules and f"{base}.{a.name}" in modules]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        else:
            continue
        out.update(t for t in targets if t.split(".")[0] in PACKAGES or t.split(".")[0] == "tests")
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    return {name: {t for t in imports_of(path, set(files)) if t in files and t != name} for name, path in files.items()}


def test_packages_import_one_way_and_never_the_tests():
    wrong = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            for target in imports_of(path):
                top = target.split(".")[0]
                if top != pkg and top not in ALLOWED[pkg]:
                    wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, "imports against dags -> jobs -> {llm_agents, models} -> feature_store:\n" + "\n".join(wrong)


def test_no_files_import_each_other_in_a_loop():
    edges = graph()
    state, loops = {}, []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                loops.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not loops, "files that import each other in a loop:\n" + "\n".join(loops)


def test_each_stage_declares_every_table_its_module_names():
    """jobs/stages.py's lineage decides the DAG's edges: a stage reading a table it does not declare could
    run before the table is written."""
    import re

    from jobs.stages import LINEAGE

    table = re.compile(r"[\"']((?:bronze|silver|gold)\.[a-z_]+)[\"']")
    # Written by the runtime for every stage, not by the stage's own code.
    everywhere = {"silver.quarantine", "ops.pipeline_runs"}
    # Named as the source_table of quarantine rows (items whose embeddings cannot get an ID), not read.
    about = {"train_quantizer": {"gold.item_semantic_ids"}}
    missing = {}
    for stage, (reads, writes) in LINEAGE.items():
        named = set(table.findall((ROOT / "jobs" / f"{stage}.py").read_text()))
        if stage == "infer_beyond_log":  # its LLM method lives in its own module
            named |= set(table.findall((ROOT / "jobs" / "beyond_llm.py").read_text()))
        undeclared = named - set(reads) - set(writes) - everywhere - about.get(stage, set())
        if undeclared:
            missing[stage] = sorted(undeclared)
    assert not missing, f"tables named in a stage's module but not in its lineage: {missing}"


def test_no_stage_imports_another_stage():
    """What stages share lives in modules of its own (jobs/llm.py, codebooks.py, quality.py, sources/),
    so a stage can change without reaching into another."""
    from jobs.stages import PIPELINE

    stages = {f"jobs.{s}" for s in PIPELINE}
    edges = graph()
    wrong = sorted(f"{s} imports {t}" for s in stages for t in edges[s] if t in stages)
    assert not wrong, "\n".join(wrong)


def test_on_an_object_store_the_stages_commit_one_after_another():
    """s3a:// with Delta's default LogStore takes one writer at a time: no two stages side by side."""
    from jobs.stages import PIPELINE, edges

    assert ("ingest_catalog", "validate_bronze") in edges() and ("ingest_interactions", "validate_bronze") in edges()
    assert edges(concurrent_commits=False) == list(zip(PIPELINE, PIPELINE[1:], strict=False))
