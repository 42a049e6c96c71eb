"""Fault injection over MPI: every rank raises, fast, naming the problem; no state changes.

The checks live in mpi_fault_checks.py and run under ``mpiexec -n 2`` and
``-n 3`` (MPICH here); a rank that dies of an uncaught exception under plain
``mpiexec python`` (without ``-m mpi4py``) must end the job within 10 s.
"""
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import ROOT, mpi_env, mpiexec_command, run_ranks_script

CHECKS = Path(__file__).parent / "mpi_fault_checks.py"
FAULTS = ["header_size", "skipped_backward", "two_layers_out_of_step", "num_features", "dtype",
          "layer_order", "process_groups", "error_types", "error_inside_the_step", "backward_error_types", "gradients",
          "bad_timeouts"]

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_fault_raises_on_every_rank(ranks):
    start = time.monotonic()
    out = run_ranks_script(ranks, CHECKS, *FAULTS, timeout=120)
    print(out)
    for check in FAULTS:
        assert f"OK {check} on {ranks} ranks" in out, out
    assert f"header bytes on {ranks} ranks: 208" in out, out
    assert time.monotonic() - start < 90


def run_plain(ranks, **env):
    """``mpiexec -n N python mpi_fault_checks.py die`` (no -m mpi4py); (seconds, result)."""
    command = [*mpiexec_command(ranks), sys.executable, str(CHECKS), "die"]
    start = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60,
                              env=mpi_env(**{"CBN_SYNC_TIMEOUT": "30", **env}), cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the job outlived a dead rank by 60 s:\n{exc.stdout}\n{exc.stderr}")
    return time.monotonic() - start, done


@pytest.mark.parametrize("ranks", [2, 3])
def test_a_rank_dying_under_plain_mpiexec_ends_the_job(ranks):
    # MPI_Abort may kill the ranks before mpiexec forwarded their output: the
    # timing is checked on every run, the messages on one of up to three runs.
    for attempt in range(3):
        seconds, done = run_plain(ranks)
        print(f"{ranks} ranks: job ended {seconds:.1f} s after start, rc {done.returncode}")
        assert done.returncode != 0
        assert seconds < 10, (seconds, done.stdout, done.stderr)
        if "ZeroDivisionError: injected" in done.stderr and "aborting the job" in done.stderr:
            break
    else:
        pytest.fail(f"no traceback and abort message in three runs:\n{done.stderr}")


def test_the_abort_hook_can_be_turned_off():
    seconds, done = run_plain(2, CBN_ABORT_ON_EXCEPTION="0", CBN_SYNC_TIMEOUT="3")
    assert "aborting the job" not in done.stderr, done.stderr
    assert "rank 0 TimeoutError" in done.stdout, (done.stdout, done.stderr)
    assert seconds >= 3


GUARD = """
import sys
sys.modules["mpi4py"] = None  # as if mpi4py were not installed
import numpy as np, cbn
layer = cbn.SyncBatchNorm(3)
try:
    layer(np.ones((4, 3)) * np.arange(4)[:, None])
except RuntimeError as exc:
    assert layer.num_batches_tracked == 0
    print("RAISED", exc, flush=True)
else:
    print("TRAINED ALONE", flush=True)
"""


def test_mpiexec_without_mpi4py_raises_instead_of_local_statistics():
    command = [*mpiexec_command(2), sys.executable, "-c", GUARD]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=mpi_env(),
                          cwd=ROOT)
    assert done.stdout.count("RAISED") == 2, (done.stdout, done.stderr)
    assert "PMI_SIZE=2" in done.stdout or "OMPI_COMM_WORLD_SIZE=2" in done.stdout
    assert "install mpi4py" in done.stdout
