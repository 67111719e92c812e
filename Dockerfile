# The project image of the cluster stack (docker-compose.yml): Airflow's services, the Spark master and
# the Spark workers all run it, so the driver (beside the Airflow worker, client deploy mode) and the
# executors share one Python, one set of libraries and the project's code: PySpark needs the same Python
# on both sides, and executors import jobs/ and models/ inside mapInPandas.
FROM python:3.11.14-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless procps curl tini \
 && rm -rf /var/lib/apt/lists/*
ENV JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/opt/reaseq \
    REASEQ_CACHE=/opt/reaseq-cache \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    GX_ANALYTICS_ENABLED=false \
    OMP_WAIT_POLICY=PASSIVE

WORKDIR /opt/reaseq
COPY requirements.lock ./
RUN pip install --no-cache-dir uv==0.13.9 \
 && uv pip install --system --no-cache -r requirements.lock

COPY . .
# Delta's jars, and hadoop-aws for the s3a:// lakehouse, resolved once at build time into REASEQ_CACHE.
RUN python -m jobs.spark --resolve --s3a

ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "jobs.cli", "--help"]
