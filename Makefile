# Two commands on a fresh machine: `make train` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# A short real run on the built-in synthetic data set; override with `make train ARGS="loss=focal"`.
ARGS ?=

# The extras every developer and CI gets; requirements.lock pins all of them (and their dependencies) exactly.
EXTRAS := dev,smp,export,sweep,mlflow,docs

.PHONY: install lock train test test-fast bench lint format docs docs-serve docs-figures clean

install: $(STAMP)

# Exact versions from requirements.lock, then the package itself (editable, no dependency resolution of its own), so
# a new release of anything cannot change what `make test` runs until `make lock` is run and committed.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing glint-lightning and its locked dependencies into $(VENV) (log: $(VENV)/pip.log)"
	{ $(PY) -m pip install --disable-pip-version-check -r requirements.lock && \
		$(PY) -m pip install --disable-pip-version-check --no-deps -e '.[$(EXTRAS)]'; } > $(VENV)/pip.log 2>&1 \
		|| (tail -n 40 $(VENV)/pip.log; exit 1)
	$(PY) -c "import glint_lightning, torch, lightning, hydra, h5py, torchmetrics"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m glint_lightning.train experiment=quickstart $(ARGS)

# Two pytest-xdist workers keep both cores busy (much of the suite waits on one single-threaded subprocess at a
# time), each with one torch thread: two workers of two threads on two cores slow each other down many times.
# The SLURM tests share one worker (--dist loadgroup). JOBS=0 runs everything in one process.
JOBS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --dist loadgroup

test: $(STAMP)
	$(PYTEST) $(PYTEST_ARGS)

# The edit-test loop: everything but the trainings and subprocesses marked slow.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

# Refresh requirements.lock to the newest releases pyproject.toml allows (torch capped by lock-constraints.txt to
# the builds on this machine's disk); commit it with the change that needed it.
lock: $(STAMP)
	$(VENV)/bin/pip-compile --quiet --upgrade --no-strip-extras --no-emit-index-url --no-emit-find-links \
		--extra $(EXTRAS) -c lock-constraints.txt -o requirements.lock pyproject.toml

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

# The documentation site (mkdocs.yml, docs/): built with --strict, so a broken link or API reference fails.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	$(VENV)/bin/mkdocs serve

# Every figure of the docs, regenerated from a real demo run on this machine.
docs-figures: $(STAMP)
	$(PY) docs/make_figures.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) outputs/cache .pytest_cache site
