"""The MPI examples run, briefly, under mpiexec (with a timeout each), from any directory."""
import importlib.util
import re

from launch import run_ranks_script


def test_train_check_proves_sync_equals_the_global_batch(tmp_path):
    plot = tmp_path / "loss.png"
    out = run_ranks_script(3, "mpi_examples/train.py", "--epochs", "2", "--check",
                           "--plot", str(plot))
    assert "CHECK PASSED" in out, out
    assert "test accuracy" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.stat().st_size > 0, out


def test_train_runs_from_another_directory_and_survives_an_unwritable_plot(tmp_path):
    """Started outside the checkout, it finds its data module, trains and ends cleanly
    even when the plot cannot be written."""
    out = run_ranks_script(2, "mpi_examples/train.py", "--epochs", "1", "--plot",
                           str(tmp_path / "missing-dir" / "loss.png"), cwd=tmp_path)
    accuracies = dict(re.findall(r"^(\d ranks?, \w+ BatchNorm|1 process, whole batch|"
                                 r"\d ranks, SyncBatchNorm)\s+([\d.]+)%$", out, re.M))
    assert len(accuracies) == 3, out
    if importlib.util.find_spec("matplotlib") is not None:
        assert "could not write the plot" in out, out


def test_uneven_and_groups_example(tmp_path):
    out = run_ranks_script(4, "mpi_examples/uneven_and_groups.py", cwd=tmp_path)
    assert "running statistics identical on every rank: True" in out, out
    assert "2. process groups" in out


def test_torch_train_check_proves_sync_equals_the_global_batch(torch):
    """The PyTorch example under mpiexec: cbn.torch on the shards equals the global batch."""
    out = run_ranks_script(2, "mpi_examples/torch_train.py", "--epochs", "1", "--check")
    assert "CHECK PASSED" in out, out
