# Everything a fresh machine needs: `make demo` and `make test` create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ./data
MODEL_DIR ?= ./runs/demo
STAMP := $(VENV)/.installed
export NO_GCE_CHECK := true
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: setup test demo data clean

setup: $(STAMP)

$(STAMP): requirements.lock setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e ".[corpora,test]"
	touch $(STAMP)

data: $(STAMP)
	$(PY) -m lifelong_moe_jax.data.prepare --data_dir $(DATA_DIR)

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

demo: data
	$(PY) -m lifelong_moe_jax.demo --data_dir $(DATA_DIR) --model_dir $(MODEL_DIR)

clean:
	rm -rf $(VENV) $(MODEL_DIR)
