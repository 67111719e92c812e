"""docker-compose.yml describes the cluster stack; Docker's engine does not run here, so the file is
parsed and its properties checked: services present, images pinned, health checks, start order."""

from __future__ import annotations

from pathlib import Path

import yaml

COMPOSE = yaml.safe_load((Path(__file__).resolve().parent.parent / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
LONG_RUNNING = ["postgres", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "spark-master",
                "vllm", "minio"]


def test_the_stack_has_every_part():
    for name in LONG_RUNNING + ["spark-worker-1", "spark-worker-2", "airflow-init", "minio-bucket"]:
        assert name in SERVICES, name


def test_images_are_pinned_to_versions():
    for name, svc in SERVICES.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image} is not pinned"


def test_long_running_services_have_health_checks_and_start_in_order():
    for name in LONG_RUNNING:
        assert "healthcheck" in SERVICES[name], name
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor"):
        deps = SERVICES[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["airflow-init"]["condition"] == "service_completed_successfully"
    for w in ("spark-worker-1", "spark-worker-2"):
        assert SERVICES[w]["depends_on"]["spark-master"]["condition"] == "service_healthy"
        assert "spark://spark-master:7077" in SERVICES[w]["command"]


def test_airflow_uses_postgres_and_a_real_executor_and_reaches_the_cluster():
    env = SERVICES["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql")
    assert env["AIRFLOW__CORE__EXECUTOR"] in {"LocalExecutor", "CeleryExecutor", "KubernetesExecutor"}
    assert env["REASEQ__SPARK__MASTER"] == "spark://spark-master:7077"
    assert env["REASEQ__LAKEHOUSE"].startswith("s3a://")
    assert env["REASEQ__LLM__BACKEND"] == "openai" and "vllm:8000" in env["REASEQ__LLM__BASE_URL"]


def test_vllm_serves_with_prefix_caching_on_a_gpu_and_a_model_variable():
    vllm = SERVICES["vllm"]
    assert "--enable-prefix-caching" in vllm["command"]
    assert any("REASEQ_LLM_MODEL" in c for c in vllm["command"])
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_minio_holds_the_lakehouse_bucket():
    assert "mc mb" in " ".join(SERVICES["minio-bucket"]["entrypoint"])
    assert SERVICES["minio-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
