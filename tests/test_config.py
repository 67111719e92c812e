"""The one settings model (jobs/config.py): layers, one-line errors naming the key and its source, the
retired variables, the generated docs, and every REASEQ__ variable the code or docs tell people to set."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.config import RETIRED_ENV, ConfigError, Settings, load_config, load_settings, markdown

ROOT = Path(__file__).resolve().parent.parent


def error(**kw) -> str:
    with pytest.raises(ConfigError) as e:
        load_settings(**kw)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_layers_defaults_then_file_then_environment_then_the_runs_parameters(tmp_path):
    assert load_config(env={})["llm"]["samples_k"] == Settings().llm.samples_k == 3
    file = tmp_path / "prod.yaml"
    file.write_text("llm:\n  backend: openai\n  samples_k: 5\nspark:\n  driver_memory: 8g\n")
    env = {"REASEQ_CONFIG": str(file), "REASEQ__LLM__SAMPLES_K": "2", "REASEQ__LLM__LOCAL__SLOTS": "4"}
    s = load_settings(env=env)
    assert (s.llm.backend, s.llm.samples_k, s.llm.local.slots, s.spark.driver_memory) == ("openai", 2, 4, "8g")
    s = load_settings({"llm": {"samples_k": 7}}, env=env)
    assert s.llm.samples_k == 7 and s.llm.local.context_per_slot == 3072  # a sibling keeps its default
    # YAML scalars: null lifts a cap, true/false are booleans
    s = load_settings(env={"REASEQ__LLM__LOCAL__BUDGET_MINUTES": "null", "REASEQ__SPARK__UI": "true"})
    assert s.llm.local.budget_minutes is None and s.spark.ui is True


def test_values_parse_as_their_types_and_infinity_is_no_budget():
    import datetime as dt

    s = load_settings(env={"REASEQ__SYNTHETIC__END_DATE": "2026-11-20", "REASEQ__SOURCE__MAX_DESCRIPTION_TOKENS": "128"})
    assert s.synthetic.end_date == dt.date(2026, 11, 20) and s.source.max_description_tokens == 128
    assert "budget_minutes" in error(env={"REASEQ__LLM__BUDGET_MINUTES": ".inf"})
    # Any variable of the retired single-underscore LLM scheme names its replacement, not only known keys.
    assert error(env={"REASEQ_LLM_SAMPLES_K": "1"}) == \
        "REASEQ_LLM_SAMPLES_K is no longer read: set REASEQ__LLM__SAMPLES_K instead"


def test_a_models_section_is_that_models_own_config_class():
    from models.diffusion import DiffusionConfig
    from models.ranker import RankerConfig

    s = load_settings({"ranker": {"variant": "+catalog", "d_model": 32}}, env={})
    assert isinstance(s.ranker, RankerConfig) and (s.ranker.variant, s.ranker.d_model) == ("+catalog", 32)
    assert isinstance(s.beyond_log.diffusion, DiffusionConfig)


@pytest.mark.parametrize(("env", "expected"), [
    ({"REASEQ__LLM__BACKEDN": "openai"},
     "unknown setting llm.backedn from REASEQ__LLM__BACKEDN: did you mean llm.backend (REASEQ__LLM__BACKEND)?"),
    ({"REASEQ__LAKEHOUS": "/data"},
     "unknown setting lakehous from REASEQ__LAKEHOUS: did you mean lakehouse (REASEQ__LAKEHOUSE)?"),
    ({"REASEQ__RANKER__D_MODLE": "32"},
     "unknown setting ranker.d_modle from REASEQ__RANKER__D_MODLE: did you mean ranker.d_model (REASEQ__RANKER__D_MODEL)?"),
    ({"REASEQ__BEYOND_LOG__DIFFUSION__EPOCS": "3"}, "unknown setting beyond_log.diffusion.epocs from "
     "REASEQ__BEYOND_LOG__DIFFUSION__EPOCS: did you mean beyond_log.diffusion.epochs (REASEQ__BEYOND_LOG__DIFFUSION__EPOCHS)?"),
    ({"REASEQ__LLM__LOCAL__SLOT": "2"},
     "unknown setting llm.local.slot from REASEQ__LLM__LOCAL__SLOT: did you mean llm.local.slots (REASEQ__LLM__LOCAL__SLOTS)?"),
])
def test_an_unknown_key_is_one_line_naming_its_variable_and_the_nearest_key(env, expected):
    assert error(env=env) == expected


@pytest.mark.parametrize(("env", "start"), [
    ({"REASEQ__LLM__BACKEND": "vllm"}, "setting llm.backend='vllm' from REASEQ__LLM__BACKEND: Input should be "
     "'local', 'openai' or 'offline'"),
    ({"REASEQ__SPARK__SHUFFLE_PARTITIONS": "two"}, "setting spark.shuffle_partitions='two' from "
     "REASEQ__SPARK__SHUFFLE_PARTITIONS: Input should be a valid integer"),
    ({"REASEQ__LLM__SAMPLES_K": "true"}, "setting llm.samples_k=True from REASEQ__LLM__SAMPLES_K"),
    ({"REASEQ__RANKER__VARIANT": "+knowledge"}, "setting ranker.variant='+knowledge' from REASEQ__RANKER__VARIANT: "
     "unknown variant '+knowledge'; choose from id_only, +catalog"),
    ({"REASEQ__GENERATIVE__PARS_CATALOG_CREDIT": "1.5"}, "setting generative.pars_catalog_credit=1.5 from "
     "REASEQ__GENERATIVE__PARS_CATALOG_CREDIT: pars_catalog_credit must lie in [0, 1)"),
])
def test_a_wrongly_typed_value_is_one_line_naming_key_value_and_variable(env, start):
    assert error(env=env).startswith(start)


def test_a_file_is_named_as_the_source_of_its_mistakes(tmp_path):
    file = tmp_path / "prod.yaml"
    file.write_text("llm:\n  backend: openai\n  modle: Qwen/Qwen3-8B\n")
    assert error(env={"REASEQ_CONFIG": str(file)}) == (
        f"unknown setting llm.modle from REASEQ_CONFIG file {file}: did you mean llm.model (REASEQ__LLM__MODEL)?")
    file.write_text("- not\n- a mapping\n")
    assert "the file must hold a mapping" in error(env={"REASEQ_CONFIG": str(file)})
    assert error(env={"REASEQ_CONFIG": str(tmp_path / "absent.yaml")}).endswith(
        "no such file; give the path of a YAML settings file")


@pytest.mark.parametrize("old", sorted(RETIRED_ENV))
def test_a_retired_variable_stops_the_run_and_names_its_replacement(old):
    assert error(env={old: "x"}) == f"{old} is no longer read: set {RETIRED_ENV[old]} instead"
    replacement = RETIRED_ENV[old].removeprefix("REASEQ__").lower().split("__")
    assert replacement[-1] in _keys(replacement[:-1]), f"{RETIRED_ENV[old]} is no setting"


def _keys(section: list[str]) -> set[str]:
    from jobs.config import _keys_at

    return set(_keys_at(tuple(section)))


def test_every_reaseq_variable_the_code_and_docs_name_is_a_setting():
    """Messages and docs that tell an operator to set a REASEQ__ variable must name one that works."""
    files = [*ROOT.glob("jobs/**/*.py"), *ROOT.glob("llm_agents/*.py"), *ROOT.glob("dags/*.py"),
             *ROOT.glob("models/*.py"), *ROOT.glob("feature_store/*.py"), *ROOT.glob("docs/*.md"),
             ROOT / "README.md", ROOT / "Makefile", ROOT / "docker-compose.yml"]
    named = {m for f in files for m in re.findall(r"REASEQ__[A-Z0-9_]*[A-Z0-9]", f.read_text())}
    assert len(named) > 20
    bad = []
    for var in sorted(named - {"REASEQ__LLM__BACKEDN"}):  # the docs' example of a misspelling
        parts = var.removeprefix("REASEQ__").lower().split("__")
        if parts[-1] not in _keys(parts[:-1]):
            bad.append(var)
    assert not bad, f"not settings: {bad}"


def test_the_configuration_docs_are_generated_from_the_model():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    assert docs == markdown(), "docs/configuration.md is stale: python -m jobs.config --markdown > docs/configuration.md"
    assert "| `llm.local.budget_minutes` | `REASEQ__LLM__LOCAL__BUDGET_MINUTES` |" in docs


def test_the_cli_stops_on_a_misspelt_setting_in_one_line_before_airflow_starts(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "REASEQ__LLM__BACKEDN": "openai",
           "AIRFLOW_HOME": str(tmp_path / "airflow")}
    p = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "--quiet"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip() == ("error: unknown setting llm.backedn from REASEQ__LLM__BACKEDN: "
                                "did you mean llm.backend (REASEQ__LLM__BACKEND)?")
    assert not (tmp_path / "airflow").exists()  # nothing was started
    good = {k: v for k, v in env.items() if k != "REASEQ__LLM__BACKEDN"} | {"REASEQ__LLM__SAMPLES_K": "2"}
    p = subprocess.run([sys.executable, "-m", "jobs.config"], capture_output=True, text=True, cwd=ROOT, env=good,
                       timeout=120)
    assert p.returncode == 0 and "  samples_k: 2\n" in p.stdout  # the settings this environment resolves to


def test_spark_sessions_take_the_spark_section(monkeypatch):
    from jobs.spark import spark_conf

    monkeypatch.setenv("REASEQ__SPARK__SHUFFLE_PARTITIONS", "3")
    monkeypatch.setenv("REASEQ__SPARK__EXECUTOR_MEMORY", "768m")
    conf = spark_conf(with_jars=False)
    assert (conf["spark.sql.shuffle.partitions"], conf["spark.executor.memory"], conf["spark.driver.memory"]) == \
        ("3", "768m", "4g")
