"""Shared fixtures: deterministic seeds, and torch for the differential tests.

Tests that compare with PyTorch take the ``torch`` fixture.  Without torch they
are skipped with a visible reason; with ``CBN_REQUIRE_TORCH=1`` in the
environment a missing torch is a failure instead, so a CI job that is meant to
run the differential tests cannot silently skip them.
"""

import importlib
import os
import zlib

import numpy as np
import pytest

REQUIRE_TORCH_VARIABLE = "CBN_REQUIRE_TORCH"


def import_torch_or_skip(module_level=False):
    """Return the torch module, or skip (fail under CBN_REQUIRE_TORCH=1).

    ``module_level``: called while a test module is imported (skips the module).
    """
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        if os.environ.get(REQUIRE_TORCH_VARIABLE) == "1":
            pytest.fail(
                f"{REQUIRE_TORCH_VARIABLE}=1 but torch cannot be imported: {exc}",
                pytrace=False,
            )
        pytest.skip(
            f"torch is not installed ({exc}); differential tests against PyTorch "
            f"skipped (set {REQUIRE_TORCH_VARIABLE}=1 to make this an error)",
            allow_module_level=module_level,
        )


@pytest.fixture
def torch():
    """The torch module (CPU), seeded and on one thread; see `import_torch_or_skip`.

    One thread: the tests' tensors are tiny, and torch's thread pool competing
    with cbn's OpenMP threads made each call ~100x slower on a 2-core machine.
    """
    module = import_torch_or_skip()
    module.manual_seed(0)
    before = module.get_num_threads()
    module.set_num_threads(1)  # (torch's OpenMP runtime is cbn's: this caps cbn too)
    yield module
    module.set_num_threads(before)  # so later tests run cbn on its usual threads


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: long suites (MPI fault injection, torchrun, export); `make test` "
                   "skips them, `make test-slow` and CI run them")


def seed_for(nodeid):
    """A seed that depends only on the test's id, so reruns see the same data."""
    return zlib.crc32(nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_numpy(request):
    np.random.seed(seed_for(request.node.nodeid))


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded from the test's id."""
    return np.random.default_rng(seed_for(request.node.nodeid))
