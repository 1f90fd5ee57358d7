# Two commands: `make demo` runs the main job, `make test` runs the tests.
# Each creates .venv if missing and installs mtplab with CPU PyTorch (torch==2.13.0, pinned) and
# the exact versions in constraints.txt, so a fresh machine tests what was tested.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NEWEST := $(VENV)/newest

.PHONY: demo test test-newest install constraints clean figures tour

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mtplab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The HF tests again, against the newest transformers release (and what it pulls in), installed
# beside the tested set: an upstream change fails here before it reaches a user.
test-newest: $(STAMP)
	rm -rf $(NEWEST)
	$(BIN)/python -m pip install --quiet --upgrade --target $(NEWEST) transformers
	PYTHONPATH=$(NEWEST) $(BIN)/python -m pytest -q -m hf

# Every figure the README quotes, regenerated (runs/figures/; ~40 min on 2 CPU cores).
figures: $(STAMP)
	bash benchmarks/figures.sh

# Every runnable command of the README's tour, in order, in a scratch copy of the repository
# (after `make demo`; 25-30 min on 2 busy CPU cores): benchmarks/tour.py, not part of `make test`.
tour: $(STAMP)
	$(BIN)/python benchmarks/tour.py

# Pin what is installed now (after changing pyproject.toml: pip install -e '.[dev]' first).
constraints: $(STAMP)
	{ echo "# The exact versions \`make test\` and \`make demo\` install (pip -c): what was tested."; \
	  echo "# Regenerate after changing pyproject.toml: make constraints"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^torch==' -e '^mtplab'; } > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
