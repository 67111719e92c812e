"""The pipeline's one configuration: a typed settings model holding every default.

Layers, later ones winning: the defaults in `Settings` below, then a YAML file named by REASEQ_CONFIG,
then environment variables REASEQ__<SECTION>__<KEY> (double underscores; values parsed as YAML
scalars), then a run's overrides (the DAG's params). The model is validated once per run: an unknown
key or a wrongly typed value stops the run with one line that names where it came from (the variable
or the file) and the nearest valid key (`ConfigError`; the CLI exits 2 on it).

The sections that belong to a model (embedding, quantizer, beyond_log.diffusion, ranker, generative)
are the model's own config classes, so their defaults live in one place, beside the code that reads
them. `python -m jobs.config --markdown` writes docs/configuration.md from this model (a test keeps the
two in sync); `python -m jobs.config` prints the resolved settings of this environment.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import difflib
import inspect
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from jobs.sources.base import (
    DEFAULT_CHUNK_ROWS,
    DEFAULT_MAX_DESCRIPTION_CHARS,
    DEFAULT_MAX_DESCRIPTION_TOKENS,
)
from jobs.sources.synthetic import DEFAULTS as SYNTHETIC_DEFAULTS
from models.configs import DiffusionConfig, EmbedderConfig, GenerativeConfig, QuantizerConfig, RankerConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "REASEQ__"
CONFIG_FILE_ENV = "REASEQ_CONFIG"
DOCS_FILE = PROJECT_ROOT / "docs" / "configuration.md"
# Variables of earlier versions that bypassed the configuration: each now stops a run and names its key.
RETIRED_ENV = {
    "REASEQ_SPARK_MASTER": "REASEQ__SPARK__MASTER",
    "REASEQ_SHUFFLE_PARTITIONS": "REASEQ__SPARK__SHUFFLE_PARTITIONS",
    "REASEQ_DRIVER_MEMORY": "REASEQ__SPARK__DRIVER_MEMORY",
    "REASEQ_EXECUTOR_MEMORY": "REASEQ__SPARK__EXECUTOR_MEMORY",
    "REASEQ_SPARK_UI": "REASEQ__SPARK__UI",
    "REASEQ_SPARK_LOG_LEVEL": "REASEQ__SPARK__LOG_LEVEL",
    "REASEQ_DELTA_SNAPSHOT_PARTITIONS": "REASEQ__SPARK__DELTA_SNAPSHOT_PARTITIONS",
    "REASEQ_TASK_RETRIES": "REASEQ__AIRFLOW__TASK_RETRIES",
    "REASEQ_SCHEDULE": "REASEQ__AIRFLOW__SCHEDULE",
    "REASEQ_SUBMIT": "REASEQ__AIRFLOW__SUBMIT",
    "REASEQ_DATASET": "REASEQ__DATASET",
    "REASEQ_DATA": "REASEQ__DATA",
    "REASEQ_LLM_BACKEND": "REASEQ__LLM__BACKEND",
    "REASEQ_LLM_MODEL": "REASEQ__LLM__MODEL",
    "REASEQ_LLM_BASE_URL": "REASEQ__LLM__BASE_URL",
}


# Strict: a count given as `true` or `2.5` is refused, not read as 1 or cut to 2.
PositiveInt = Annotated[int, Field(strict=True, gt=0)]
# Finite: `.inf` minutes is no budget (say null for none).
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


# The LLM section's single-underscore scheme of earlier versions: any REASEQ_LLM_<KEY> names REASEQ__LLM__<KEY>.
RETIRED_LLM_PREFIX = "REASEQ_LLM_"


class ConfigError(ValueError):
    """A setting that cannot be used; the message is one line naming the key, its source and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SourceSettings(Section):
    """What every dataset loader does to the text it reads."""

    max_description_tokens: PositiveInt = Field(
        DEFAULT_MAX_DESCRIPTION_TOKENS, description="descriptions cut to this many tokens of the embedder's tokenizer")
    max_description_chars: PositiveInt = Field(
        DEFAULT_MAX_DESCRIPTION_CHARS, description="and first to this many characters (a ceiling against huge text)")
    chunk_rows: PositiveInt = Field(
        DEFAULT_CHUNK_ROWS, description="a streamed source (amazon-json, movielens, synthetic) reaches the ingests this many items "
        "(or events) at a time: the driver holds one chunk, never the whole source")


class SyntheticSettings(Section):
    """The synthetic catalog and users (dataset: synthetic)."""

    n_items: PositiveInt = Field(SYNTHETIC_DEFAULTS["n_items"], description="catalog items")
    n_users: PositiveInt = Field(SYNTHETIC_DEFAULTS["n_users"], description="users with interactions")
    seed: StrictInt = Field(SYNTHETIC_DEFAULTS["seed"], description="the same seed gives the same catalog and logs")
    end_date: dt.date = Field(SYNTHETIC_DEFAULTS["end_date"], description="last day of the interactions (YYYY-MM-DD)")
    days: PositiveInt = Field(SYNTHETIC_DEFAULTS["days"], description="days of interactions before end_date")


class SparkSettings(Section):
    """The Spark session every stage gets (and spark-submit's --conf in a cluster)."""

    master: str = Field("local[*]", description="local[*], local[N] or spark://host:port")
    driver_memory: str = "4g"
    executor_memory: str | None = Field(None, description="cluster executors; null: Spark's default (1g)")
    shuffle_partitions: PositiveInt = Field(4, description="spark.sql.shuffle.partitions and default.parallelism")
    ui: bool = False
    log_level: Literal["ALL", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF"] = "ERROR"
    delta_snapshot_partitions: PositiveInt = Field(
        2, description="Delta rebuilds a table's state with 50 tasks by default: overhead on small tables")


class RetentionSettings(Section):
    """How long every table keeps its history (Delta time travel), enforced by publish at the end of a good run."""

    days: PositiveInt = Field(
        30, description="days of every table's history kept readable (its log and the files older versions need): "
        "cover the furthest a training run's pinned versions or a backfill look back")
    vacuum: bool = Field(
        False, description="publish VACUUMs every table (files no version within `days` needs are deleted). Off by "
        "default: a VACUUM that deletes commits a version, and the codebooks and the diffusion checkpoint pin table "
        "versions, so it would retrain them the next night")


class CompactionSettings(Section):
    """Small files merged into larger ones, by publish at the end of a good run."""

    min_small_files: PositiveInt | None = Field(
        64, description="publish compacts a table once it has this many files under half of target_mb (tables written a "
        "chunk or a record at a time gather a few every night); null: never. The tables whose versions the "
        "codebooks and the diffusion checkpoint pin are left alone (a new version would retrain them)")
    target_mb: PositiveInt = Field(128, description="size of the files compaction writes; a file under half of it counts as small")


class AirflowSettings(Section):
    """How the DAGs are scheduled and how their tasks run."""

    schedule: str = Field("0 2 * * *", description='the nightly cron (UTC), or "none" for manual runs only')
    task_retries: StrictInt = Field(2, ge=0, description="per task of the nightly DAG; `make run` sets 0 (a person at "
                                    "the terminal wants the failure now)")
    training_retries: StrictInt = Field(1, ge=0, description="per task of the training DAGs (hours of work each)")
    submit: Literal["inprocess", "spark-submit"] = Field(
        "inprocess", description="inprocess: each task runs its stage in the task's process (local Spark); "
        "spark-submit: each task submits it to the cluster of the spark_reaseq connection")


class LocalEngineSettings(Section):
    """The embedded llama.cpp engine (llm.backend: local)."""

    slots: PositiveInt = Field(8, description="concurrent request slots (llama-server --parallel)")
    context_per_slot: PositiveInt = Field(
        3072, description="tokens of context per slot: the few-shot prompt (up to ~1,300) + the answer (up to ~700)")
    budget_items: PositiveInt | None = Field(None, description="the engine's nightly item cap when llm.budget_items is null")
    budget_minutes: PositiveFloat | None = Field(
        3, description="the engine's nightly fan-out minutes when llm.budget_minutes is null: a few items at "
        "k=3 on 2 cores, so a first make run stays near 20 min")
    commit_every_items: PositiveInt = Field(
        25, description="the engine's answers per commit when llm.commit_every_items is null (a few minutes of "
        "its work on 2 cores)")


class LLMSettings(Section):
    """The reason_items stage: which model answers, and how much of the catalog per night."""

    backend: Literal["local", "openai", "offline"] = Field(
        "local", description="local: the embedded llama.cpp engine (packaged Gemma 3 270M), started and stopped "
        "by the DAG; openai: vLLM or any OpenAI-compatible server at base_url; offline: the catalog heuristic "
        "(no model; its rows say offline-heuristic-v1)")
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai only (local finds its engine's URL)")
    model: str = Field("Qwen/Qwen3-8B", description="openai only: the served model name (local: the GGUF's name and hash)")
    prompt_profile: Literal["chat", "completion"] = Field(
        "chat", description="openai only: chat (instruct models) or completion (base models); local: completion")
    api_key_env: str = Field("OPENAI_API_KEY", description="the variable holding the key (the key is never a setting)")
    local: LocalEngineSettings = Field(default_factory=LocalEngineSettings)
    max_concurrency: PositiveInt = Field(64, description="in-flight requests across all Spark partitions")
    samples_k: StrictInt = Field(3, ge=1, le=16, description="self-consistency paths per agent; the majority is kept")
    temperature: float | None = Field(
        None, ge=0, le=2, description="null: 0.3 when samples_k > 1 (paths must differ to vote), else 0. "
        "Measured on the local engine: k=3 at 0.7 voted most list fields empty; at 0.3 values close to k=1's")
    partitions: PositiveInt = Field(4, description="Spark partitions of the fan-out")
    dead_letter_after: StrictInt = Field(3, ge=0, description="skip an item after this many failed attempts of its "
                                   "content/prompt/model; 0 = never")
    budget_items: PositiveInt | None = Field(
        None, description="items sent per run, in priority order (recent interactions first, then new items); "
        "the rest is the backlog, taken first next run; null = no cap")
    budget_minutes: PositiveFloat | None = Field(
        None, description="minutes of fan-out per run: no item starts after them, items in flight finish; null = no cap")
    commit_every_items: PositiveInt | None = Field(
        None, description="answers committed to the tables every this many items, in priority order, while the "
        "next ones are asked: a run killed midway keeps them and the rerun asks only for the rest; null: 1000 "
        "(a GPU server, then sized by commit_every_minutes), llm.local.commit_every_items on the local engine; "
        "the offline heuristic commits once")
    commit_every_minutes: PositiveFloat | None = Field(
        2.0, description="with commit_every_items null and a server given by URL: chunks after the first are sized "
        "to take about this long at the rate measured so far (1,000 to 20,000 items), so a fast server is not "
        "held up by a Spark job and a commit every few seconds; a kill asks again for at most about two chunks' "
        "minutes; null: every chunk 1,000 items")
    # The client's settings: null keeps llm_agents.LLMConfig's default.
    timeout_s: PositiveFloat | None = Field(None, description="per request; null: the client's default (local: 180)")
    max_retries: StrictInt | None = Field(None, ge=0, le=20, description="per request; null: the client's default")
    backoff_base_s: float | None = Field(None, ge=0, description="first retry's wait (doubling, jittered); null: the client's default")
    backoff_max_s: float | None = Field(None, ge=0, description="longest wait between retries; null: the client's default")
    max_tokens: StrictInt | None = Field(None, ge=16, description="per answer; null: the client's default")
    circuit_failures: PositiveInt | None = Field(None, description="consecutive failures that stop the stage; "
                                                 "null: the client's default")
    samples_via: Literal["n", "requests"] | None = Field(
        None, description="n: one request with n=k choices (vLLM); requests: k requests (llama-server); null: by backend")


class SequencesSettings(Section):
    """gold.user_sequences, which the ranker, the generative model and the diffusion read."""

    max_len: PositiveInt = Field(50, description="most recent events kept per user in gold.user_sequences")


class BeyondLogSettings(Section):
    """The implicit path: inferred beyond-log behaviours per user."""

    method: Literal["diffusion", "llm"] = Field(
        "diffusion", description="diffusion (masked diffusion over semantic tokens) or llm (the agents' interests)")
    top_n: PositiveInt = Field(10, description="items inferred per user")
    min_history: PositiveInt = Field(2, description="events a user needs (the test target included) to get an inference")
    llm_partitions: PositiveInt | None = Field(None, description="method llm: Spark partitions; null: llm.partitions")
    llm_min_similarity: float = Field(
        0.25, ge=-1, le=1, description="method llm: the least MiniLM cosine between an interest phrase and an item "
        "(on the synthetic catalog a phrase's true matches score 0.4-0.6, its median item about 0.1)")
    llm_block_rows: PositiveInt = Field(16384, description="method llm: catalog rows per block of the phrase x item product")
    diffusion: DiffusionConfig = Field(default_factory=DiffusionConfig)


class QuantizerSettings(QuantizerConfig):
    """Semantic IDs: the RQ and MPQ quantizers (models.quantizers.QuantizerConfig)."""

    codebook_version: str | None = Field(None, description="assign with this trained codebook instead of training")


class Settings(Section):
    """Every setting of the pipeline, its trainers and its benchmarks."""

    lakehouse: str = Field("lakehouse", description="relative paths are under the project root; s3a://bucket/prefix in a cluster")
    artifacts: str = Field("artifacts", description="model checkpoints (quantizers, diffusion, ranker)")
    reports: str = Field("reports", description="run reports, validation reports and logs")
    dataset: Literal["synthetic", "amazon-json", "movielens"] = "synthetic"
    data: str | None = Field(None, description="the folder or file of amazon-json / movielens")
    source: SourceSettings = Field(default_factory=SourceSettings)
    synthetic: SyntheticSettings = Field(default_factory=SyntheticSettings)
    spark: SparkSettings = Field(default_factory=SparkSettings)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    compaction: CompactionSettings = Field(default_factory=CompactionSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    embedding: EmbedderConfig = Field(default_factory=EmbedderConfig)
    quantizer: QuantizerSettings = Field(default_factory=QuantizerSettings)
    sequences: SequencesSettings = Field(default_factory=SequencesSettings)
    beyond_log: BeyondLogSettings = Field(default_factory=BeyondLogSettings)
    ranker: RankerConfig = Field(default_factory=RankerConfig)
    generative: GenerativeConfig = Field(default_factory=GenerativeConfig)


# ---------------------------------------------------------------- loading


def _merge(base: dict, other: dict, source: str, origins: dict, path: tuple = ()) -> None:
    for k, v in other.items():
        key = (*path, str(k).lower())
        if isinstance(v, dict) and isinstance(base.get(key[-1]), dict):
            _merge(base[key[-1]], v, source, origins, key)
        else:
            base[key[-1]] = copy.deepcopy(v)
            origins[key] = source


def deep_merge(base: dict, other: dict) -> dict:
    """A copy of `base` with `other` merged in, section by section (how the layers combine)."""
    out = copy.deepcopy(base)
    _merge(out, other, "", {})
    return out


def _env_layer(env: dict) -> dict[tuple, tuple[Any, str]]:
    layer = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = tuple(p.lower() for p in name[len(ENV_PREFIX):].split("__") if p)
        if not parts:
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw  # not YAML: the string itself (the model says whether a string fits)
        layer[parts] = (value, name)
    return layer


def load_settings(overrides: dict | None = None, env: dict | None = None) -> Settings:
    """The validated settings of this environment; ConfigError (one line) when any layer is wrong."""
    env = os.environ if env is None else env
    retired = sorted(k for k in env if k in RETIRED_ENV or k.startswith(RETIRED_LLM_PREFIX))
    if retired:
        new = [RETIRED_ENV.get(k) or "REASEQ__LLM__" + k.removeprefix(RETIRED_LLM_PREFIX) for k in retired]
        raise ConfigError(f"{retired[0]} is no longer read: set {new[0]} instead"
                          + (f" (also {', '.join(retired[1:])})" if len(retired) > 1 else ""))
    merged: dict = {}
    origins: dict[tuple, str] = {}
    extra = env.get(CONFIG_FILE_ENV)
    if extra:
        path = Path(extra)
        if not path.exists():
            raise ConfigError(f"{CONFIG_FILE_ENV}={extra}: no such file; give the path of a YAML settings file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{CONFIG_FILE_ENV}={extra}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{CONFIG_FILE_ENV}={extra}: the file must hold a mapping of sections and keys")
        _merge(merged, data, f"{CONFIG_FILE_ENV} file {extra}", origins)
    for parts, (value, name) in sorted(_env_layer(env).items()):
        node = merged
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
        origins[parts] = name
    if overrides:
        _merge(merged, overrides, "the run's parameters", origins)
    try:
        return Settings.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_one_line(e, origins)) from None


def load_config(overrides: dict | None = None, env: dict | None = None) -> dict[str, Any]:
    """The validated settings as plain data (every default filled in): what jobs and Spark closures read."""
    return load_settings(overrides, env).model_dump()


def resolve_path(value: str) -> str:
    """Relative paths are under the project root; URIs (s3a://, file://) pass through."""
    if "://" in value:
        return value
    p = Path(value)
    return str(p if p.is_absolute() else PROJECT_ROOT / p)


# ---------------------------------------------------------------- errors


def _section_type(annotation) -> type | None:
    """The model or dataclass behind a field's annotation (None for a plain value)."""
    for t in (annotation, *typing.get_args(annotation)):
        if isinstance(t, type) and (issubclass(t, BaseModel) or dataclasses.is_dataclass(t)):
            return t
    return None


def _fields(cls) -> dict[str, Any]:
    """name -> annotation of a settings class (pydantic model or dataclass)."""
    if issubclass(cls, BaseModel):
        return {n: f.annotation for n, f in cls.model_fields.items()}
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _keys_at(path: tuple) -> list[str]:
    cls = Settings
    for p in path:
        cls = _section_type(_fields(cls).get(p))
        if cls is None:
            return []
    return list(_fields(cls))


def _source(loc: tuple, origins: dict) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in origins:
            return origins[loc[:n]]
    return "the defaults"


def _env_name(loc: tuple) -> str:
    return ENV_PREFIX + "__".join(str(p).upper() for p in loc)


def _one_line(error: ValidationError, origins: dict) -> str:
    err = error.errors()[0]
    loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
    # Pydantic reports a dataclass section's field errors under the field's name too.
    dotted = ".".join(loc)
    source = _source(loc, origins)
    if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        valid = _keys_at(loc[:-1])
        near = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.6)
        hint = f"did you mean {'.'.join((*loc[:-1], near[0]))} ({_env_name((*loc[:-1], near[0]))})?" if near else \
            f"valid keys here: {', '.join(valid)}"
        more = f" ({len(error.errors()) - 1} more problems)" if len(error.errors()) > 1 else ""
        return f"unknown setting {dotted} from {source}: {hint}{more}"
    value = err.get("input")
    below = [k for k in origins if k[:len(loc)] == loc and len(k) > len(loc)]
    if len(below) == 1:  # a check of the whole section (a model's own validation) tripped on one key
        loc, dotted, source = below[0], ".".join(below[0]), origins[below[0]]
        node = value
        for p in loc[len(err["loc"]):]:
            node = node.get(p) if isinstance(node, dict) else node
        value = node
    msg = err["msg"].replace("\n", " ").removeprefix("Value error, ")
    more = f" ({len(error.errors()) - 1} more problems)" if len(error.errors()) > 1 else ""
    return f"setting {dotted}={value!r} from {source}: {msg}; set it with {_env_name(loc)} or in the {CONFIG_FILE_ENV} file{more}"


# ---------------------------------------------------------------- docs


def _comments(cls) -> dict[str, str]:
    """The trailing comment or the comment lines above each field of a class, its documentation."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in lines[1:]:
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+)\s*:[^=]*=?.*?(?:#\s*(.*))?$", s)
        if m and not s.startswith(("def ", "@", "return", "class ")):
            text = m.group(2) or " ".join(above)
            if text:
                out.setdefault(m.group(1), text)
        above = []
    return out


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation)).replace("NoneType", "null")
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin is not None:
        return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def _rows(cls, instance, path: tuple) -> list[tuple[str, str, str, str, str]]:
    rows, comments = [], _comments(cls)
    for name, annotation in _fields(cls).items():
        value = getattr(instance, name)
        sub = _section_type(annotation)
        if sub is not None and value is not None and not isinstance(value, str):
            rows += _rows(sub, value, (*path, name))
            continue
        desc = ""
        if issubclass(cls, BaseModel):
            desc = cls.model_fields[name].description or ""
        desc = desc or comments.get(name, "")
        shown = "null" if value is None else (str(value).lower() if isinstance(value, bool) else str(value))
        rows.append((".".join((*path, name)), _env_name((*path, name)), _type_name(annotation), shown, desc))
    return rows


def markdown() -> str:
    """docs/configuration.md: every key, its variable, type, default and meaning, from the model."""
    settings = Settings()
    out = ["# Configuration", "",
           "Generated from `jobs/config.py` by `python -m jobs.config --markdown > docs/configuration.md` "
           "(a test fails when the two differ). Every default lives in the settings model; the sections "
           "that belong to a model are that model's config class.", "",
           f"Layers, later ones winning: these defaults, a YAML file named by `{CONFIG_FILE_ENV}`, environment "
           f"variables `{ENV_PREFIX}<SECTION>__<KEY>` (values parsed as YAML scalars: `null`, `true`, `3`), "
           "a run's parameters. An unknown key or a wrongly typed value stops the run with one line naming "
           "the key, where it came from and the nearest valid key (exit 2). `python -m jobs.config` prints "
           "the settings this environment resolves to.", ""]
    sections: dict[str, list] = {}
    for row in _rows(Settings, settings, ()):
        sections.setdefault(row[0].split(".")[0] if "." in row[0] else "", []).append(row)
    for section, rows in sections.items():
        annotation = _fields(Settings).get(section)
        cls = _section_type(annotation) if section else Settings
        doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "").split("\n\n")[0].replace("\n", " ") if cls else ""
        out += [f"## {section or 'paths and dataset'}", ""]
        if section and doc and not doc.startswith(cls.__name__ + "("):
            out += [doc, ""]
        out += ["| key | variable | type | default | meaning |", "|---|---|---|---|---|"]
        out += [f"| `{k}` | `{v}` | {t} | `{d}` | {m.replace('|', '/')} |" for k, v, t, d, m in rows]
        out.append("")
    out += ["## Retired variables", "",
            "These bypassed the configuration in earlier versions; setting one now stops the run and names "
            "its replacement.", "", "| retired | use |", "|---|---|"]
    out += [f"| `{old}` | `{new}` |" for old, new in RETIRED_ENV.items()]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.config", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", action="store_true", help="print docs/configuration.md (generated from the model)")
    args = p.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
        return 0
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
