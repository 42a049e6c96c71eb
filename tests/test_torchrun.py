"""cbn over torch.distributed (gloo) under ``torchrun``, and the example trained with it.

Each run binds 127.0.0.1 on a free port and has a subprocess timeout.  The
checks live in torchrun_checks.py: 2 and 3 processes (uneven shards, an empty
one with 3) equal one process on the global batch; DDP + cbn SyncBatchNorm
equals one process; a bad input on one process raises on every process; and
without init_process_group the first training forward raises (WORLD_SIZE).
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import import_torch_or_skip

ROOT = Path(__file__).parent.parent
CHECKS = Path(__file__).parent / "torchrun_checks.py"
EXAMPLE = ROOT / "mpi_examples" / "torchrun_train.py"

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n, script, *args, timeout=240):
    import_torch_or_skip()
    launcher = Path(sys.executable).parent / "torchrun"
    command = [str(launcher) if launcher.exists() else "torchrun", "--nproc_per_node", str(n),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(script), *args]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_")) and k != "WORLD_SIZE"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun -n {n} {script.name} {' '.join(args)} hung for {timeout} s:\n"
                    f"{exc.stdout}\n{exc.stderr}")
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("n", [2, 3])
def test_torchrun_equals_one_process_on_the_global_batch(n):
    checks = ("equality", "ddp", "subgroup_and_gradients", "bad_input")
    out = torchrun(n, CHECKS, *checks)
    print(out)
    for check in checks:
        assert f"OK {check} on {n} processes" in out, out


def test_torchrun_without_a_process_group_raises():
    out = torchrun(2, CHECKS, "guard")
    assert "OK guard" in out and "WORLD_SIZE=2" in out, out


def test_torchrun_example_check():
    out = torchrun(2, EXAMPLE, "--check", "--epochs", "2")
    print(out)
    assert "check passed" in out, out


def test_torchrun_a_process_that_never_arrives_times_out():
    out = torchrun(2, CHECKS, "timeout", timeout=120)
    assert "OK timeout after" in out, out
