"""docker-compose.yml describes the cluster stack; Docker's engine does not run here, so the file is
parsed and its properties checked: services present, images pinned, health checks, start order."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
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
    assert env["REASEQ__AIRFLOW__SUBMIT"] == "spark-submit"  # every task is the provider's SparkSubmitOperator
    assert env["AIRFLOW_CONN_SPARK_REASEQ"] == "spark://spark-master:7077?deploy-mode=client"
    assert env["REASEQ__LAKEHOUSE"].startswith("s3a://")
    assert env["REASEQ_S3_ENDPOINT"] == env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env["REASEQ__LLM__BACKEND"] == "openai" and "vllm:8000" in env["REASEQ__LLM__BASE_URL"]


def test_vllm_serves_with_prefix_caching_on_a_gpu_and_a_model_variable():
    vllm = SERVICES["vllm"]
    assert "--enable-prefix-caching" in vllm["command"]
    assert any("VLLM_MODEL" in c for c in vllm["command"])
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_minio_holds_the_lakehouse_bucket():
    assert "mc mb" in " ".join(SERVICES["minio-bucket"]["entrypoint"])
    assert SERVICES["minio-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_airflow_and_spark_share_the_project_image_built_from_the_lock_file():
    # PySpark needs the driver's Python and libraries on the executors too.
    for name in ("airflow-scheduler", "airflow-apiserver", "airflow-dag-processor", "spark-master",
                 "spark-worker-1", "spark-worker-2"):
        assert SERVICES[name]["image"] == SERVICES["spark-master"]["image"], name
        assert SERVICES[name]["build"]["dockerfile"] == "Dockerfile", name
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements.lock" in dockerfile and "jobs.spark --resolve --s3a" in dockerfile
    assert dockerfile.splitlines()[next(i for i, x in enumerate(dockerfile.splitlines())
                                        if x.startswith("FROM"))].split(":")[1][0].isdigit()  # pinned base


def test_executors_get_the_object_store_credentials():
    for w in ("spark-worker-1", "spark-worker-2"):
        env = SERVICES[w]["environment"]
        assert env["REASEQ_S3_ENDPOINT"] == "http://minio:9000"
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env)


def test_airflow_services_call_the_airflow_cli_the_project_image_has_no_airflow_entrypoint():
    for name, sub in (("airflow-apiserver", "api-server"), ("airflow-scheduler", "scheduler"),
                      ("airflow-dag-processor", "dag-processor")):
        assert SERVICES[name]["command"] == ["airflow", sub], name
    assert "airflow db migrate" in " ".join(SERVICES["airflow-init"]["command"])
