# Two commands on a fresh machine: `make train` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# A short real run on the built-in synthetic data set; override with `make train ARGS="loss=focal"`.
ARGS ?=

.PHONY: install train test bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing glint-lightning and its dependencies into $(VENV) (log: $(VENV)/pip.log)"
	$(PY) -m pip install --disable-pip-version-check -e '.[dev,smp,export,sweep,mlflow]' > $(VENV)/pip.log 2>&1 || (tail -n 40 $(VENV)/pip.log; exit 1)
	$(PY) -c "import glint_lightning, torch, lightning, hydra, h5py, torchmetrics"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m glint_lightning.train experiment=quickstart $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Figures, not tests: each script prints its numbers and ratios against a baseline measured in the same run.
# The `bench` extra (MONAI, for predict_vs_monai) is installed on first use; the TTA figures score the checkpoint
# of the quickstart run timed just before (kept in outputs/bench/quickstart).
bench: $(STAMP)
	@$(PY) -c "import monai" 2>/dev/null || { echo "installing the bench extra (MONAI) into $(VENV) (log: $(VENV)/pip.log)"; \
		$(PY) -m pip install --disable-pip-version-check -e '.[bench]' >> $(VENV)/pip.log 2>&1 || { tail -n 40 $(VENV)/pip.log; exit 1; }; }
	$(PY) -m benchmarks.framework_overhead
	$(PY) -m benchmarks.loader_throughput
	$(PY) -m benchmarks.inference_throughput
	$(PY) -m benchmarks.predict_vs_monai --rounds 3
	$(PY) -m benchmarks.speed_options
	$(PY) -m benchmarks.memory
	$(PY) -m benchmarks.model_throughput --sizes 64
	$(PY) -m benchmarks.quickstart --keep outputs/bench/quickstart
	$(PY) -m benchmarks.tta --run-dir outputs/bench/quickstart/quickstart

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) outputs/cache .pytest_cache
