"""The MPI examples run, briefly, under mpiexec (with a timeout each)."""
import pytest

from launch import run_ranks_script


def test_train_check_proves_sync_equals_the_global_batch(tmp_path):
    out = run_ranks_script(3, "mpi_examples/train.py", "--epochs", "2", "--check",
                           "--plot", str(tmp_path / "loss.png"))
    assert "CHECK PASSED" in out, out
    assert "test accuracy" in out


def test_uneven_and_groups_example():
    out = run_ranks_script(4, "mpi_examples/uneven_and_groups.py")
    assert "running statistics identical on every rank: True" in out, out
    assert "2. process groups" in out
