# lesionsynth: `make demo` sets up, fetches the demo's sample data and runs the main job; `make test` fetches the
# tests' sample datasets and runs the tests; `make data` fetches every sample dataset (the benchmarks' too).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DATA   ?= $(CURDIR)/.cache/data
DEMO   ?= $(CURDIR)/.cache/demo
JOBS   ?= 2
export LESIONSYNTH_DATA = $(DATA)

.PHONY: venv data test-data demo-data demo test check-install bench clean-demo

# torch is pinned so pip takes the local CPU build (an unpinned torch pulls a multi-GB CUDA build);
# nnunetv2 is installed to check the output with its own verify_dataset_integrity.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' 'torch==2.13.0' nnunetv2
	touch $@

venv: $(VENV)/.installed

# every sample dataset (the tests' and the held-out evaluation sets that the benchmarks read)
data: venv
	$(PY) scripts/fetch_data.py --cache $(DATA)

# only what the tests read (not the held-out sets: the tests never see them)
test-data: venv
	$(PY) scripts/fetch_data.py --cache $(DATA) --tests

# only what the demo (and check-install) read: mni_lesions, from the nilearn wheel and the shared lesion masks
demo-data: venv
	$(PY) scripts/fetch_data.py --cache $(DATA) --demo

demo: demo-data
	rm -rf $(DEMO)
	$(VENV)/bin/lesionsynth build-bank $(DATA)/mni_lesions --out $(DEMO)/bank --jobs $(JOBS)
	$(VENV)/bin/lesionsynth generate $(DEMO)/bank --out $(DEMO)/Dataset900_LesionsynthDemo \
		--n 12 --load high --seed 0 --jobs $(JOBS)
	$(VENV)/bin/lesionsynth report $(DEMO)/Dataset900_LesionsynthDemo
	@echo "demo output: $(DEMO)/Dataset900_LesionsynthDemo (nnU-Net v2 raw dataset; see manifest.jsonl and report/report.html)"

# the test modules run in TEST_WORKERS processes, each module whole in one (its fixtures are built once)
TEST_WORKERS ?= 2

# -rs: every skipped test is listed with its reason
test: test-data
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile

# the install as a user gets it: sdist + wheel, the wheel alone in a fresh environment, every command
check-install: demo-data
	PYTHON=$(PYTHON) scripts/check_install.sh $(DATA)/mni_lesions

bench: demo-data
	$(PY) benchmarks/bench_generate.py
