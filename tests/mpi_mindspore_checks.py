"""Checks of cbn.mindspore.SyncBatchNorm run under ``mpiexec -n K`` by test_mindspore.py.

usage: mpiexec -n 3 python -m mpi4py tests/mpi_mindspore_checks.py CHECK [CHECK ...]

Every rank of a process group builds the group's global batch from a shared
seed and keeps its own (uneven, possibly empty) shard; SyncBatchNorm on the
shards must equal one cbn.mindspore.BatchNorm on the group's whole batch.  A
failed check raises, so mpiexec fails; rank 0 prints "OK <check>" per check.
"""

import numpy as np

import cbn
import cbn.mindspore as ms
from mpi_sync_checks import TOL

from mpi_common import RANK, SIZE, WORLD, run_checks, shard_bounds


def compare(shape, process_groups=None, use_batch_statistics=None, training=True, steps=3):
    """SyncBatchNorm on this rank's shard == the plain layer on its group's batch."""
    group = next((sorted(g) for g in process_groups if RANK in g), None) if process_groups \
        else list(range(SIZE))
    rank_in_group = group.index(RANK)
    rng = np.random.default_rng(1000 + group[0])  # one batch per group, different between groups
    c = shape[1]
    init = dict(momentum=0.7, gamma_init=rng.uniform(0.5, 2, c), beta_init=rng.uniform(-1, 1, c),
                moving_mean_init=rng.uniform(-1, 1, c), moving_var_init=rng.uniform(0.5, 2, c),
                use_batch_statistics=use_batch_statistics, dtype=np.float64)
    sync = ms.SyncBatchNorm(c, process_groups=process_groups, timeout=60, **init)
    ref = (ms.BatchNorm1d if len(shape) == 2 else ms.BatchNorm2d)(c, **init)
    sync.set_train(training)
    ref.set_train(training)
    lo, hi = shard_bounds(shape[0], len(group), rank_in_group)
    for _ in range(steps):
        spread = rng.uniform(0.5, 2, c).reshape((1, c) + (1,) * (len(shape) - 2))
        x = rng.standard_normal(shape) * spread + 3
        dy = rng.standard_normal(shape)
        np.testing.assert_allclose(sync(x[lo:hi]), ref(x)[lo:hi], **TOL[np.float64])
        np.testing.assert_allclose(sync.backward(dy[lo:hi]), ref.backward(dy)[lo:hi],
                                   **TOL[np.float64])
        grads = WORLD.allgather((sync.grad_gamma, sync.grad_beta))
        for i, (name, expected) in enumerate((("gamma", ref.grad_gamma), ("beta", ref.grad_beta))):
            total = sum(grads[r][i] for r in group)
            np.testing.assert_allclose(total, expected, err_msg=f"grad_{name}", **TOL[np.float64])
        np.testing.assert_allclose(sync.moving_mean, ref.moving_mean, **TOL[np.float64])
        np.testing.assert_allclose(sync.moving_variance, ref.moving_variance, **TOL[np.float64])
    return sync


def check_world():
    compare((23, 3, 4, 5))
    compare((17, 4))
    compare((23, 3, 2, 3), use_batch_statistics=True, training=False)  # syncs when inferring too


def check_process_groups():
    groups = [[r for r in range(SIZE) if r % 2 == 0], [r for r in range(SIZE) if r % 2 == 1]]
    layer = compare((19, 3, 4, 2), process_groups=groups)
    moving = WORLD.allgather(layer.moving_mean)
    if SIZE >= 2 and np.allclose(moving[0], moving[1]):
        raise AssertionError("the two process groups did not synchronise separately")


def check_inference_does_not_communicate():
    """Ranks calling a different number of times would time out if anything were sent."""
    for use_batch_statistics in (None, False):
        layer = ms.SyncBatchNorm(3, use_batch_statistics=use_batch_statistics, timeout=5)
        layer.set_train(use_batch_statistics is False)
        plain = ms.BatchNorm2d(3, use_batch_statistics=use_batch_statistics)
        plain.set_train(use_batch_statistics is False)
        for _ in range(RANK + 1):
            x = np.random.default_rng(RANK).standard_normal((2, 3, 2, 2)).astype(np.float32)
            np.testing.assert_array_equal(layer(x), plain(x))
            np.testing.assert_array_equal(layer.backward(x), plain.backward(x))


def expect_everywhere(error, call, what):
    try:
        call()
    except error:
        return
    raise AssertionError(f"rank {RANK}: {what} did not raise {error.__name__}")


def check_bad_input_on_one_rank():
    layer = ms.SyncBatchNorm(3, timeout=60).set_train()
    good = np.ones((4, 3, 2, 2), np.float32)
    bad = np.ones((4, 5, 2, 2), np.float32) if RANK == 0 else good
    expect_everywhere(ValueError, lambda: layer(bad), "a wrong channel count on rank 0")
    layer(good + np.arange(4).reshape(4, 1, 1, 1))
    bad_dy = np.ones((4, 3, 2, 3)) if RANK == SIZE - 1 else np.ones((4, 3, 2, 2))
    expect_everywhere(ValueError, lambda: layer.backward(bad_dy), "a wrong dy on the last rank")
    expect_everywhere(ValueError, lambda: layer(np.ones((4, 3, 2), np.float32)),
                      "a 3-D input (MindSpore's SyncBatchNorm takes 2-D and 4-D)")
    compare((11, 3, 2, 2))  # the layer still works afterwards


if __name__ == "__main__":
    run_checks(globals())
