"""Shared fixtures: one Spark session per test session (starting one costs seconds), tmp lakehouses."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

def pytest_addoption(parser):
    parser.addoption(
        "--engine", choices=("with", "only", "without"), default="with",
        help="the tests marked `engine` (the real llama.cpp engine answers): run them with the others "
        "(default), only them, or all but them. make test runs `only` alone, then `without` on two "
        "workers: the engine ran 15-30x slower beside a Spark job on this 2-core machine.")


def pytest_collection_modifyitems(config, items):
    phase = config.getoption("--engine")
    if phase == "with":
        return
    keep, drop = [], []
    for item in items:
        (keep if (item.get_closest_marker("engine") is not None) == (phase == "only") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# Small, fast settings for end-to-end runs of the real stages.
SMALL = {
    "synthetic": {"n_items": 240, "n_users": 160, "seed": 11},
    "quantizer": {"levels": 3, "codebook_size": 16, "mpq_experts": 3, "mpq_codebook_size": 16, "seed": 0},
    # The offline heuristic unless a test asks for a model: the real engine has tests of its own.
    "llm": {"backend": "offline", "partitions": 2, "max_concurrency": 8, "samples_k": 1},
    "sequences": {"max_len": 20},
    "beyond_log": {"diffusion": {"d_model": 16, "n_layers": 1, "n_heads": 2, "epochs": 2, "slots": 2}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_overrides(conf: dict, prefix: str = "REASEQ") -> dict[str, str]:
    """A nested config as the REASEQ__SECTION__KEY environment variables jobs.config reads, for tests that
    run the pipeline in another process (Airflow, spark-submit)."""
    out = {}
    for k, v in conf.items():
        key = f"{prefix}__{k.upper()}"
        out.update(env_overrides(v, key) if isinstance(v, dict) else {key: json.dumps(v)})
    return out


@pytest.fixture(scope="session")
def spark():
    from jobs.spark import get_spark

    s = get_spark("local[2]", app_name="reaseq-tests", extra={"spark.sql.shuffle.partitions": "2"})
    yield s
    s.stop()


def make_ctx(root: Path, ds: str = "2026-11-22", spark=None, **overrides):
    from jobs.config import deep_merge
    from jobs.context import RunContext

    conf = {"lakehouse": str(root / "lakehouse"), "artifacts": str(root / "artifacts"),
            "reports": str(root / "reports")}
    conf = deep_merge(deep_merge(SMALL, conf), overrides)
    ctx = RunContext.create(ds=ds, overrides=conf)
    ctx._spark = spark
    return ctx


@pytest.fixture
def ctx_factory(tmp_path, spark):
    def factory(ds: str = "2026-11-22", root: Path | None = None, **overrides):
        return make_ctx(root or tmp_path, ds=ds, spark=spark, **overrides)

    return factory


@pytest.fixture(scope="session")
def built():
    """The local LLM engine's binary, built with its model by `make llm-engine` (make test does it first):
    a test that needs it fails without it, since a missing engine in CI is a setup defect."""
    from llm_agents import local_engine

    if not local_engine.server_binary().exists() or not local_engine.model_path().exists():
        pytest.fail("the local engine is not built: run `make llm-engine` (make test does it first)")
    return local_engine.server_binary()
