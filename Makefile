# The book's commands. `make book` and `make test` are the two a new reader runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
# Thread counts: the notebooks' kernels (OMP_NUM_THREADS) and the pytest process. Both follow
# OMP_NUM_THREADS when it is set, so `OMP_NUM_THREADS=1 make test` runs everything on one thread.
NB_THREADS ?= $(or $(OMP_NUM_THREADS),2)
TEST_THREADS ?= $(or $(OMP_NUM_THREADS),1)

.PHONY: setup test book site-test lab notebooks bench gpu-check pointer-checkpoints clean

setup: $(STAMP)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

BUILD_BOOK := $(VENV)/bin/jupyter-book build notebooks --config $(CURDIR)/book.yml \
	--toc $(CURDIR)/notebooks/_toc.yml --path-output $(CURDIR) -W --keep-going

# Unit tests, kernels (TRITON_INTERPRET=1 without CUDA, set in tests/conftest.py), the mirror test
# and strict nbval over every notebook, in one pytest run; then the book is built and every page
# checked in headless Chromium (site/site_test.py). Where Chromium is missing and cannot be
# installed (no root), the browser checks are skipped with a message saying how to run them.
test: setup
	OMP_NUM_THREADS=$(NB_THREADS) REFIMPL_TEST_THREADS=$(TEST_THREADS) $(PY) -m pytest tests $(NOTEBOOKS) --nbval \
		--nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env -p no:cacheprovider
	$(BUILD_BOOK) --quiet
	$(PY) site/site_test.py --if-chromium _build/html

# The static site from the notebooks' stored outputs; open _build/html/index.html.
book: setup
	$(BUILD_BOOK)
	@echo "Open _build/html/index.html"

# Open every page of the built book in headless Chromium, offline, at a 1280 x 900 and an 800 px
# window (installs Debian's chromium if missing). Fails on console errors, missing images, math
# not typeset, a $ or prose swallowed into math, code, output, tables or equations wider than the
# column, figures shown below 70% of their width, the same image twice in a row, chapter pages
# without headings; screenshots of each page as the window shows it go to _build/screenshots/.
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

# For a reader with an NVIDIA GPU: the kernel tests on CUDA (where conftest leaves TRITON_INTERPRET
# unset) with the ahead-of-time compile test, every decoding algorithm on CUDA against the CPU, then each kernel timed against its torch path
# (figures/bench_kernels_gpu.json and .png). Without CUDA it says so and fails at once.
gpu-check: setup
	@$(PY) -c "import sys, torch; torch.cuda.is_available() or sys.exit('make gpu-check needs an NVIDIA GPU with CUDA: torch.cuda.is_available() is False here')"
	$(PY) -m pytest -p no:cacheprovider $(wildcard tests/test_kernels_*.py) tests/test_devices.py
	$(PY) -m refimpl.benchmarks.kernels

# Chapter 1's checkpoints and experiment records (refimpl/assets/pointer/), one CPU thread each;
# the exact commands that made the committed files. About 2 h of CPU in all, plus about 3 h for the
# two label-free attention models (`rl`: POMO at n = 20 and n = 50, Held-Karp/LKH test scores).
PTR := $(PY) -m refimpl.pointer train
RL := $(PY) -m refimpl.pointer rl
pointer-checkpoints: setup
	$(PTR) --task tsp --n 5 --steps 8000 --pool-size 100000 --eval-every 500 --beam 1 3 --name tsp5
	$(PTR) --task tsp --n 10 --steps 25000 --pool-size 200000 --eval-every 1000 --beam 1 3 10 --name tsp10
	$(PTR) --task tsp --n 5 --n-max 10 --steps 20000 --pool-size 50000 --eval-every 1000 --beam 1 3 --test-n 10 20 --test-instances 200 --name tsp5-10
	$(PTR) --task hull --n 10 --steps 12000 --eval-every 1000 --beam 1 3 --name hull10
	for n in 5 10 15; do \
	  $(PTR) --task sort --n $$n --steps 2500 --mask-chosen false --encoder lstm --no-save --name sort$${n}_lstm; \
	  for p in 0 1 5 10; do \
	    $(PTR) --task sort --n $$n --steps 2500 --mask-chosen false --encoder rpw --process-steps $$p --no-save --name sort$${n}_rpw$$p; \
	  done; \
	done
	$(PTR) --task sort --n 10 --steps 10000 --eval-every 1000 --mask-chosen false --encoder rpw --process-steps 5 --name sort10_rpw5_10k
	$(PTR) --task sort --n 10 --steps 10000 --eval-every 1000 --mask-chosen false --encoder lstm --name sort10_lstm_10k
	$(PTR) --task sort --n 10 --steps 10000 --eval-every 1000 --mask-chosen false --glimpses 1 --encoder lstm --name sort10_lstm_g1_10k
	$(PTR) --task sort --n 10 --steps 10000 --eval-every 1000 --mask-chosen false --glimpses 1 --encoder rpw --process-steps 5 --name sort10_rpw5_g1_10k
	$(PTR) --task sort --n 10 --steps 10000 --eval-every 1000 --mask-chosen false --glimpses 1 --encoder lstm --seed 1 --no-save --name sort10_lstm_g1_10k_seed1
	$(PTR) --task sort --n 10 --steps 10000 --eval-every 1000 --mask-chosen false --glimpses 1 --encoder rpw --process-steps 5 --seed 1 --no-save --name sort10_rpw5_g1_10k_seed1
	$(PTR) --task sort --n 10 --steps 2500 --mask-chosen true --name sort10_lstm_masked
	$(PTR) --task hull --n 10 --steps 5000 --input-order random --no-save --name order_input_random
	$(PTR) --task hull --n 10 --steps 5000 --input-order angle --no-save --name order_input_angle
	$(PTR) --task hull --n 10 --steps 5000 --output-order random --no-save --name order_output_random
	$(RL) --n 20 --steps 13000 --lr 3e-4 --eval-every 250 --name tsp20
	$(RL) --n 50 --steps 3400 --batch-size 32 --lr 3e-4 --eval-every 200 --eval-instances 100 --test-instances 200 --name tsp50

clean:
	rm -rf _build
