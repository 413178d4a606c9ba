# Two commands do all the set-up on a fresh machine:
#   make quick   the main job: a quick, real reproduction of the paper and its analyses on the CPU (~7 min on 2 cores)
#   make test    the test suite
# Both create .venv on first use and reinstall only when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
# The PyTorch build to install first. The default is the CPU wheel; pick your own, e.g.
#   make test TORCH="torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124"
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: quick test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

quick: $(STAMP)
	$(BIN)/distrep data fetch mnist
	$(BIN)/distrep reproduce quick --out runs/quick
	$(BIN)/distrep analyze runs/quick

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

clean:
	rm -rf $(VENV) runs
