# Two commands on a fresh machine: `make figures` (main job) and `make test`.
# `make figures` writes only to paper_figs/out/ (ignored by git), so the tracked tree stays untouched;
# `make gallery` refreshes the README's pictures in docs/img/figures/ from it (an explicit, reviewed change).
# Both create .venv on first use. The CPU build of torch is installed first, so that
# the loose torch range in pyproject.toml never pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: venv test figures figures-paper gallery bench bad-inputs lint verify clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,hf,crosscheck]"
	$(PY) -m pip install --quiet --no-deps curvlinops-for-pytorch==3.0.1 \
	  && $(PY) -m pip install --quiet einops einconv linear_operator opt-einsum \
	  || echo "curvlinops not installed: its cross-check tests will be skipped"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(or $(PYTEST_WORKERS),auto)

figures: $(STAMP)
	$(PY) -m paper_figs --quick --out paper_figs/out

# Copy the pictures, summary and report of `make figures` into the README gallery (tracked files change).
gallery: figures
	mkdir -p docs/img/figures
	cp paper_figs/out/*.png paper_figs/out/summary.json paper_figs/out/report.md docs/img/figures/

figures-paper: $(STAMP)
	$(PY) -m paper_figs --paper --out paper_figs/out-paper

verify: $(STAMP)
	$(PY) -m energy verify

bench: $(STAMP)
	$(PY) -m benchmarks --json benchmarks/results.json

# ruff (style + Google docstrings) and mypy (files and options in pyproject.toml); both run, either failing fails.
bad-inputs: $(STAMP)
	$(PY) -m tests.bad_inputs.census

lint: $(STAMP)
	$(VENV)/bin/ruff check . ; r=$$? ; $(VENV)/bin/mypy ; m=$$? ; test $$r -eq 0 -a $$m -eq 0

# The documentation site (mkdocs.yml, pages in docs/): the `docs` extra into .venv once, then a strict build (every
# warning an error) into the ignored site/. Serve while editing: .venv/bin/python -m mkdocs serve
.PHONY: docs
DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
