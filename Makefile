# cbn — batch normalization on the CPU.  `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RANKS ?= 4
STAMP := $(VENV)/.cbn-installed

.DEFAULT_GOAL := help
.PHONY: help venv install build test test-slow demo bench clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)  ## create .venv (if missing)

# Build requirements go into the venv so the editable build needs no isolation.
$(STAMP): $(PY) pyproject.toml setup.py
	$(PIP) install -q "setuptools>=64" wheel "Cython>=3.0" "numpy>=1.23"
	$(PIP) install -q --no-build-isolation -e ".[test,mpi]"
	@touch $(STAMP)

install: $(STAMP)  ## install cbn (editable) with its test and MPI extras into .venv

build: $(STAMP)  ## compile the Cython kernels in place (after editing pyx/)
	$(PY) setup.py -q build_ext --inplace

test: build  ## set everything up and run the test suite (without the slow suites)
	$(PY) -m pytest tests -q -m "not slow"

test-slow: build  ## the slow suites only (MPI fault injection, torchrun, export); CI runs them
	$(PY) -m pytest tests -q -m slow || [ $$? -eq 5 ]  # 5: no slow test selected

# The main job: data-parallel training on $(RANKS) local ranks (one OpenMP thread each:
# ranks may outnumber cores).  scikit-learn brings the dataset, matplotlib the plot.
demo: build  ## set everything up and train the MPI example on 4 ranks
	@$(PIP) install -q scikit-learn matplotlib || echo "(examples extras not installed: synthetic data, no plot)"
	$(PY) -m cbn
	OMP_NUM_THREADS=1 $(VENV)/bin/mpiexec -n $(RANKS) $(PY) -m mpi4py mpi_examples/train.py

# matplotlib only draws the chart: without it (e.g. offline) the benchmark still runs.
# The comparison needs torch in the venv: TORCH=torch==2.13.0 is the CPU wheel the
# project is measured against (set TORCH= to skip it and compare with NumPy only).
TORCH ?= torch==2.13.0
bench: build  ## benchmarks against PyTorch and NumPy, and SyncBatchNorm on 1/2/4 ranks (results in benchmarks/results/)
	@$(PIP) install -q matplotlib || echo "matplotlib not installed: the chart will be skipped"
	@if [ -n "$(TORCH)" ]; then $(PIP) install -q "$(TORCH)" || echo "torch not installed: cbn vs NumPy only"; fi
	$(PY) benchmarks/run.py
	$(PY) benchmarks/sync_bench.py

clean:  ## remove build products (keeps .venv)
	rm -rf build *.egg-info cbn/*.so pyx/*.c cbn/*.c .pytest_cache
