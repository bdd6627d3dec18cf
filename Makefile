# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ./data
MODEL_DIR ?= ./runs/demo
STUDY_DATA_DIR ?= ./data_study
STUDY_DIR ?= ./runs/study
STAMP := $(VENV)/.installed
export NO_GCE_CHECK := true
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup lint test demo data study clean

setup: $(STAMP)

$(STAMP): requirements.lock requirements-harness.lock setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -r requirements-harness.lock  # complete lock; see its header
	$(PY) -m pip install -q --no-deps -e ".[corpora,test,harness]"
	touch $(STAMP)

data: $(STAMP)
	$(PY) -m lifelong_moe_jax.data.prepare --data_dir $(DATA_DIR)

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q --durations=15 tests

demo: data
	$(PY) -m lifelong_moe_jax.demo --data_dir $(DATA_DIR) --model_dir $(MODEL_DIR)

# The issue-11 study (72 min measured from scratch on 2 quiet CPU cores; not part of `make test` or CI). Needs the
# Debian packages fortunes-de fortunes-ru fortunes-zh; stops at once with the install command
# otherwise.
study: $(STAMP)
	$(PY) -m lifelong_moe_jax.study --data_dir $(STUDY_DATA_DIR) --model_dir $(STUDY_DIR) \
	  --claims_method=lifelong_moe_offset2_src

clean:
	rm -rf $(VENV) $(MODEL_DIR)
