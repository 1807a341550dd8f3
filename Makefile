# The book's commands. `make book` and `make test` are the two a new reader runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
NB_THREADS := 2

.PHONY: setup test book site-test lab notebooks bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Unit tests, kernels (TRITON_INTERPRET=1 without CUDA, set in tests/conftest.py),
# the mirror test and strict nbval over every notebook, in one pytest run.
test: setup
	OMP_NUM_THREADS=$(NB_THREADS) $(PY) -m pytest tests $(NOTEBOOKS) --nbval \
		--nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env -p no:cacheprovider

# The static site from the notebooks' stored outputs; open _build/html/index.html.
book: setup
	$(VENV)/bin/jupyter-book build notebooks --config $(CURDIR)/book.yml --toc $(CURDIR)/notebooks/_toc.yml \
		--path-output $(CURDIR) -W --keep-going
	@echo "Open _build/html/index.html"

# Open every page of the built book in headless Chromium, offline (installs Debian's chromium if
# missing); fails on console errors, missing images, unrendered math or chapter pages without
# headings; screenshots go to _build/screenshots/.
site-test: book
	$(PY) site/site_test.py _build/html

lab: setup
	$(VENV)/bin/jupyter lab notebooks

# Re-execute every notebook in place (refreshes stored outputs and figures/).
notebooks: setup
	cd notebooks && for nb in $(notdir $(NOTEBOOKS)); do \
		OMP_NUM_THREADS=$(NB_THREADS) ../$(PY) -m jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=600 $$nb || exit 1; done

bench: setup
	$(PY) -m refimpl.bench all

clean:
	rm -rf _build
