"""Thread counts: process-wide, per Python thread, and after fork."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cbn
from cbn import _config


@pytest.fixture(autouse=True)
def restore_threads():
    before = cbn.get_num_threads()
    yield
    cbn.set_num_threads(before)


def test_set_and_get_num_threads():
    cbn.set_num_threads(1)
    assert cbn.get_num_threads() == 1 and _config.kernel_threads() == 1
    cbn.set_num_threads(2)
    expected = 2 if cbn._threads.openmp_enabled() else 1
    assert cbn.get_num_threads() == expected


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None])
def test_bad_thread_counts_are_rejected(bad):
    with pytest.raises(ValueError, match="integer >= 1"):
        cbn.set_num_threads(bad)
    with pytest.raises(ValueError, match="integer >= 1"):
        with cbn.threads(bad):
            pass


def test_threads_context_limits_only_this_python_thread():
    cbn.set_num_threads(2)
    full = _config.kernel_threads()
    with cbn.threads(1):
        assert _config.kernel_threads() == 1
        with cbn.threads(4):  # nested limits never raise the cap
            assert _config.kernel_threads() == 1
        seen = []
        import threading
        t = threading.Thread(target=lambda: seen.append(_config.kernel_threads()))
        t.start(), t.join()
        assert seen == [full]
    assert _config.kernel_threads() == full


def test_omp_num_threads_is_honoured():
    code = "import cbn; print(cbn.get_num_threads())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""}, timeout=60, check=True)
    assert out.stdout.strip() == "1"


def test_python_m_cbn_reports_the_build():
    out = subprocess.run([sys.executable, "-m", "cbn"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert f"cbn {cbn.__version__}" in out
    assert "OpenMP:" in out and "threads:" in out and "MPI:" in out


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_kernels_run_in_a_child_forked_after_the_pool_started():
    # GNU libgomp hangs in such a child unless cbn runs it serially: run it in a
    # subprocess with a timeout, so a regression fails instead of hanging the suite.
    code = textwrap.dedent("""
        import multiprocessing as mp
        import numpy as np
        import cbn
        cbn.set_num_threads(2)
        x = np.random.default_rng(0).standard_normal((16, 32, 64, 64)).astype(np.float32)
        layer = cbn.BatchNorm2d(32)
        expected = layer(x)            # starts the OpenMP pool in the parent

        def child(queue):
            layer.eval()
            y = layer.train()(x)
            dx = layer.backward(np.ones_like(x))
            queue.put((float(np.abs(y - expected).max()), cbn.get_num_threads()))

        ctx = mp.get_context("fork")
        queue = ctx.Queue()
        process = ctx.Process(target=child, args=(queue,))
        process.start()
        process.join(60)
        assert process.exitcode == 0, process.exitcode
        err, threads = queue.get(timeout=5)
        print("child ok", err, threads)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "child ok 0.0 1" in done.stdout, done.stdout
