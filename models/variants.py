"""The ranker's feature families and the variants an ablation trains: the one list the model, the
training job's --help, the training DAG's parameter and the benchmark share. Free of imports (no torch),
so a DAG file can read it at parse time.

A family is a source of item features, named for where it comes from, so that a gain is credited to
the right place: `catalog` (the catalog's own category path, brand and price band), `semantic_ids`
(codes quantized from the item embeddings), `llm_knowledge` (what the agents said that the catalog does
not: product type, text-only attributes, audiences, scenarios, occasions, complements, substitutes and
the summary) and `beyond_log` (the user's inferred behaviours beyond the logs).
"""

FAMILIES = ("catalog", "semantic_ids", "llm_knowledge", "beyond_log")
VARIANTS: dict[str, frozenset[str]] = {
    "id_only": frozenset(),
    "+catalog": frozenset({"catalog"}),
    "+semantic_ids": frozenset({"semantic_ids"}),
    "+llm_knowledge": frozenset({"llm_knowledge"}),
    "+beyond_log": frozenset({"beyond_log"}),
    "catalog+llm": frozenset({"catalog", "llm_knowledge"}),
    "all": frozenset(FAMILIES),
}
