"""cbn.SyncBatchNorm: one process here, and 2/3/4 ranks under mpiexec (mpi_sync_checks.py)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cbn
from launch import run_ranks_script

HERE = Path(__file__).parent
CHECKS = HERE / "mpi_sync_checks.py"
def run_ranks(n, *checks):
    return run_ranks_script(n, CHECKS, *checks)


ALL = ["equality", "local_batchnorm_differs", "bad_input_on_one_rank",
       "large_mean_accuracy", "process_groups", "convert", "header_size"]


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_sync_over_ranks_equals_one_batchnorm_on_the_global_batch(ranks):
    out = run_ranks(ranks, *ALL)
    for check in ALL:
        assert f"OK {check} on {ranks} ranks" in out, out
    assert f"header bytes on {ranks} ranks: 208" in out, out


def test_a_rank_that_never_arrives_times_out():
    out = run_ranks_script(2, CHECKS, "timeout", check=False)  # ends without MPI_Finalize
    assert "OK timeout rank 0" in out, out


# --- one process ---------------------------------------------------------------

@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (4, 3, 5, 6), (2, 3, 4, 5, 6)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_single_process_is_batchnorm_bit_for_bit(shape, dtype):
    rng = np.random.default_rng(0)
    sync = cbn.SyncBatchNorm(3, dtype=dtype)
    plain = cbn.BatchNorm3d(3, dtype=dtype)
    plain._ndims = None
    for _ in range(3):
        x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        assert np.array_equal(sync(x), plain(x))
        assert np.array_equal(sync.backward(dy), plain.backward(dy))
        assert np.array_equal(sync.grad_weight, plain.grad_weight)
        assert np.array_equal(sync.running_var, plain.running_var)
    assert sync.num_batches_tracked == plain.num_batches_tracked == 3


def test_import_cbn_does_not_import_mpi4py():
    code = ("import sys, numpy as np, cbn; cbn.BatchNorm2d(3)(np.ones((2, 3, 2, 2)));"
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        cbn.SyncBatchNorm(3, timeout=0)
    with pytest.raises(ValueError, match="num_features"):
        cbn.SyncBatchNorm(0)
    with pytest.raises(ValueError, match="rank >= 2"):
        cbn.SyncBatchNorm(3)(np.ones(3))


def test_convert_sync_batchnorm_walks_containers_and_objects():
    class Net:
        def __init__(self):
            self.bn = cbn.BatchNorm2d(3, momentum=None, eps=1e-3)
            self.blocks = [cbn.BatchNorm1d(4, affine=False), {"deep": (cbn.BatchNorm3d(2),)}]
            self.me = self  # cycles are fine
            self.np = np    # modules are not searched
    net = Net()
    net.bn.running_mean[...] = 7
    net.bn.num_batches_tracked = 5
    net.bn.eval()
    weight = net.bn.weight
    out = cbn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert out is net
    bn = net.bn
    assert isinstance(bn, cbn.SyncBatchNorm) and bn.weight is weight
    assert bn.momentum is None and bn.eps == 1e-3 and not bn.training
    assert np.all(bn.running_mean == 7) and bn.num_batches_tracked == 5
    assert isinstance(net.blocks[0], cbn.SyncBatchNorm) and net.blocks[0].weight is None
    assert isinstance(net.blocks[1]["deep"][0], cbn.SyncBatchNorm)
    single = cbn.SyncBatchNorm.convert_sync_batchnorm(cbn.BatchNorm1d(2))
    assert isinstance(single, cbn.SyncBatchNorm)
    already = cbn.SyncBatchNorm(2)
    assert cbn.SyncBatchNorm.convert_sync_batchnorm(already) is already
