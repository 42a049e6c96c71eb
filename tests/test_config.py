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


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True, None, 100000, 2**31, 2**64])
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


def test_thread_counts_up_to_the_cap_are_accepted():
    cbn.set_num_threads(cbn.MAX_THREADS)
    assert cbn.get_num_threads() == (cbn.MAX_THREADS if cbn._threads.openmp_enabled() else 1)
    cbn.set_num_threads(np.int64(1))
    assert cbn.get_num_threads() == 1
    assert cbn.MAX_THREADS >= 64
    with pytest.raises(ValueError, match="MAX_THREADS"):
        cbn.set_num_threads(cbn.MAX_THREADS + 1)


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PATH": "", **env}, timeout=60)


@pytest.mark.skipif(not cbn._threads.openmp_enabled(), reason="built without OpenMP")
@pytest.mark.parametrize("value, expected", [("100000", "MAX"), ("2147483648", "MAX"),
                                             ("abc", "PROCS"), ("0", "PROCS"), ("-3", "PROCS"),
                                             ("3,2", "3")])
def test_omp_num_threads_is_validated_never_a_crash(value, expected):
    # A huge OMP_NUM_THREADS used to segfault at the first kernel call.
    code = ("import numpy as np, cbn; from cbn import _config;"
            "cbn.BatchNorm2d(3)(np.ones((2, 3, 4, 4), np.float32));"
            "print(cbn.get_num_threads(), cbn.MAX_THREADS, _config._PROCS)")
    done = _run(code, OMP_NUM_THREADS=value)
    assert done.returncode == 0, done.stderr
    n, cap, procs = map(int, done.stdout.split())
    assert n == {"MAX": cap, "PROCS": procs}.get(expected, int(expected) if expected.isdigit()
                                                 else None)
    if expected != "3":
        assert "OMP_NUM_THREADS" in done.stderr and "cbn" in done.stderr


@pytest.mark.skipif(not cbn._threads.openmp_enabled(), reason="built without OpenMP")
def test_threadpoolctl_caps_cbn_while_in_effect():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    cbn.set_num_threads(2)
    layer = cbn.BatchNorm1d(4)
    layer(np.ones((4, 4), np.float32))  # used before the limit: the old cache kept 2
    assert _config.kernel_threads() == 2
    with threadpoolctl.threadpool_limits(1):
        assert _config.kernel_threads() == 1 and cbn.get_num_threads() == 1
        layer(np.ones((4, 4), np.float32))
        with cbn.threads(2):
            assert _config.kernel_threads() == 1
    assert _config.kernel_threads() == 2 and cbn.get_num_threads() == 2
    # An explicit cbn count and threadpoolctl's limit: the smaller one wins.
    cbn.set_num_threads(1)
    with threadpoolctl.threadpool_limits(2):
        assert _config.kernel_threads() == 1
    cbn.set_num_threads(3)
    with threadpoolctl.threadpool_limits(1):
        assert _config.kernel_threads() == 1
    assert _config.kernel_threads() == 3


@pytest.mark.skipif(not cbn._threads.openmp_enabled(), reason="built without OpenMP")
def test_a_first_call_inside_threadpool_limits_does_not_stick():
    pytest.importorskip("threadpoolctl")
    code = textwrap.dedent("""
        import numpy as np, threadpoolctl
        import cbn  # loads OpenMP: threadpoolctl limits only the libraries already loaded
        from cbn import _config
        with threadpoolctl.threadpool_limits(1):
            cbn.BatchNorm1d(4)(np.ones((4, 4), np.float32))
            inside = _config.kernel_threads()
        print(inside, _config.kernel_threads())
    """)
    done = _run(code, OMP_NUM_THREADS="2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "2"]
