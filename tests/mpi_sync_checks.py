"""Checks of cbn.SyncBatchNorm run under ``mpiexec -n K`` by test_sync_batchnorm.py.

usage: mpiexec -n 3 python -m mpi4py tests/mpi_sync_checks.py CHECK [CHECK ...]

(``-m mpi4py`` aborts the whole job when a rank raises, instead of leaving
the other ranks blocked.)

Every rank builds the same global batch from a shared seed, keeps its own
(uneven, possibly empty) shard, and compares SyncBatchNorm on the shards with
one plain BatchNorm on the whole batch.  A failed check raises, so the rank
exits non-zero and mpiexec fails; rank 0 prints "OK <check>" per check.
"""
import os
import sys
import time

import numpy as np
from mpi4py import MPI

import cbn
from cbn.comm import split_world

from mpi_common import RANK, SIZE, WORLD, CountingComm, run_checks, shard_bounds
TOL = {np.float32: dict(rtol=2e-4, atol=2e-5), np.float64: dict(rtol=1e-9, atol=1e-11)}


def channels_last(a):
    """The same values with channels-last memory (for 4-D and 5-D arrays)."""
    if a.ndim < 4:
        return a
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def gathered(comm, value):
    return comm.allgather(np.array(value, copy=True))


def assert_identical_on_every_rank(comm, value, what):
    values = gathered(comm, value)
    for r, other in enumerate(values):
        if not np.array_equal(other, values[0], equal_nan=True):
            raise AssertionError(f"{what} differs between rank 0 and rank {r}")


def compare(shape, dtype, momentum=0.1, layout="contiguous", track=True, steps=3,
            comm=WORLD, affine=True):
    """SyncBatchNorm on shards == BatchNorm on the whole batch, over several steps."""
    rng = np.random.default_rng(1234)
    c = shape[1]
    size, rank = comm.Get_size(), comm.Get_rank()
    counting = CountingComm(comm)
    sync = cbn.SyncBatchNorm(c, momentum=momentum, track_running_stats=track, affine=affine,
                             process_group=counting, dtype=dtype, timeout=60)
    ref = cbn.BatchNorm3d(c, momentum=momentum, track_running_stats=track, affine=affine,
                          dtype=dtype)
    ref._ndims = None  # the reference takes any rank
    if affine:
        for layer in (sync, ref):
            layer.weight[...] = np.linspace(0.5, 1.5, c)
            layer.bias[...] = np.linspace(-1, 1, c)
    lo, hi = shard_bounds(shape[0], size, rank)
    per_call = 1 if size > 1 else 0  # a group of one is plain batch norm
    for step in range(steps):
        x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        shard = x[lo:hi] if layout == "contiguous" else channels_last(x[lo:hi])
        calls = counting.calls
        y = sync(shard)
        handshake = per_call if step == 0 else 0  # a layer's first collective: the header alone
        assert counting.calls == calls + per_call + handshake, \
            "one Allreduce per training forward"
        y_ref = ref(x)
        np.testing.assert_allclose(y, y_ref[lo:hi], **TOL[dtype], err_msg=f"output step {step}")
        assert y.shape == shard.shape and y.dtype == dtype
        if layout == "channels_last" and x.ndim >= 4 and hi > lo:
            assert np.moveaxis(y, 1, -1).flags.c_contiguous, "channels-last output"
        dx = sync.backward(dy[lo:hi])
        assert counting.calls == calls + 2 * per_call + handshake, \
            "one Allreduce per training backward"
        dx_ref = ref.backward(dy)
        np.testing.assert_allclose(dx, dx_ref[lo:hi], **TOL[dtype], err_msg=f"dx step {step}")
        if affine:
            for name in ("grad_weight", "grad_bias"):
                total = comm.allreduce(getattr(sync, name).astype(np.float64))
                np.testing.assert_allclose(total, getattr(ref, name), **TOL[dtype],
                                           err_msg=f"summed {name} step {step}")
        if track:
            for name in ("running_mean", "running_var"):
                np.testing.assert_allclose(getattr(sync, name), getattr(ref, name),
                                           **TOL[dtype], err_msg=f"{name} step {step}")
                assert_identical_on_every_rank(comm, getattr(sync, name), name)
            assert sync.num_batches_tracked == ref.num_batches_tracked == step + 1
    # Eval mode communicates nothing: it uses the running statistics, or
    # without them the local batch (as torch.nn.SyncBatchNorm does).
    sync.eval(), ref.eval()
    calls = counting.calls
    x = rng.standard_normal(shape).astype(dtype)
    expected = ref(x)[lo:hi] if track else ref(x[lo:hi])  # local statistics
    np.testing.assert_allclose(sync(x[lo:hi]), expected, **TOL[dtype], err_msg="eval")
    sync.backward(np.ones_like(x[lo:hi]))
    assert counting.calls == calls, "eval mode must not communicate"


def check_equality():
    shapes = [(23, 4), (17, 3, 5), (11, 3, 4, 5), (9, 2, 3, 4, 5), (7, 3, 2, 2, 2, 2)]
    for shape in shapes:
        for dtype in (np.float32, np.float64):
            compare(shape, dtype)
    compare((11, 3, 4, 5), np.float32, layout="channels_last")
    compare((9, 2, 3, 4, 5), np.float64, layout="channels_last")
    compare((11, 3, 4, 5), np.float64, momentum=None)
    compare((11, 3, 4, 5), np.float64, track=False)
    compare((17, 3, 5), np.float32, affine=False)


def check_local_batchnorm_differs():
    """The point of SyncBatchNorm: plain BatchNorm on the shards gives other outputs."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((24, 3, 4, 4)) + np.arange(24)[:, None, None, None] / 4
    lo, hi = shard_bounds(24, SIZE, RANK)
    ref = cbn.BatchNorm2d(3, dtype=np.float64)(x)[lo:hi]
    local = cbn.BatchNorm2d(3, dtype=np.float64)(x[lo:hi]) if hi - lo > 1 else ref + 1
    synced = cbn.SyncBatchNorm(3, dtype=np.float64)(x[lo:hi])
    np.testing.assert_allclose(synced, ref, rtol=1e-10, atol=1e-12)
    differs = WORLD.allreduce(bool(hi > lo and not np.allclose(local, ref)), op=MPI.LOR)
    assert differs, "local BatchNorm should differ from the global batch"


def check_bad_input_on_one_rank():
    """A wrong input on the last rank raises on every rank; no rank hangs or changes state."""
    layer = cbn.SyncBatchNorm(3, timeout=30)
    bad = SIZE - 1
    cases = [(np.ones((4, 5, 2)), ValueError, "channels"),           # wrong channel count
             (np.ones((4, 3), dtype=np.int32), TypeError, "floating"),  # wrong dtype
             (np.ones(3), ValueError, "rank")]                        # wrong rank
    for bad_x, kind, words in cases:
        x = bad_x if RANK == bad else np.random.default_rng(RANK).standard_normal((4, 3, 2))
        before = layer.state_dict()
        try:
            layer(x)
        except kind as exc:
            message = str(exc)
            if RANK == bad:
                assert f"rank {bad}" in message and words in message, message
            else:
                assert f"[{bad}]" in message, message
        else:
            raise AssertionError(f"rank {RANK}: no {kind.__name__} for a bad input on rank {bad}")
        after = layer.state_dict()
        assert all(np.array_equal(before[k], after[k]) for k in before), "state changed"
    # One value per channel over the whole group: every rank raises PyTorch's error.
    x = np.ones((1, 3)) if RANK == 0 else np.ones((0, 3))
    try:
        layer(x)
    except ValueError as exc:
        assert "Expected more than 1 value per channel" in str(exc)
    else:
        raise AssertionError("one value per channel over the group must raise")
    # A bad gradient on one rank raises on every rank too.
    y = layer(np.random.default_rng(RANK).standard_normal((4, 3)))
    dy = np.ones((5, 3)) if RANK == bad else np.ones_like(y)
    try:
        layer.backward(dy)
    except ValueError as exc:
        assert (f"rank {bad}" in str(exc)) if RANK == bad else (f"[{bad}]" in str(exc))
    else:
        raise AssertionError("a bad gradient on one rank must raise everywhere")
    # A bad out= on one rank raises on every rank.
    x = np.random.default_rng(RANK).standard_normal((4, 3)).astype(np.float32)
    out = np.empty((4, 3), np.float64) if RANK == bad else None
    try:
        layer(x, out=out)
    except ValueError as exc:
        assert (f"rank {bad}" in str(exc)) if RANK == bad else (f"[{bad}]" in str(exc))
    else:
        raise AssertionError("a bad out= on one rank must raise everywhere")
    # out=x on one rank, then backward: the input is gone there; every rank raises.
    x = np.random.default_rng(RANK).standard_normal((4, 3)).astype(np.float32)
    layer(x, out=x if RANK == bad else None)
    try:
        layer.backward(np.ones((4, 3), np.float32))
    except RuntimeError as exc:
        assert (f"rank {bad}" in str(exc)) if RANK == bad else (f"[{bad}]" in str(exc))
    else:
        raise AssertionError("backward after out=x on one rank must raise everywhere")
    # The layer still works afterwards.
    layer(np.random.default_rng(RANK).standard_normal((4, 3)))


def check_timeout():
    """A rank that never arrives turns into TimeoutError on the others."""
    if RANK == 0:
        layer = cbn.SyncBatchNorm(2, timeout=1.0)
        start = time.monotonic()
        try:
            layer(np.ones((4, 2)))
        except TimeoutError as exc:
            waited = time.monotonic() - start
            assert 0.9 < waited < 10, waited
            assert "same number of times" in str(exc)
        else:
            raise AssertionError("expected TimeoutError")
    else:
        time.sleep(4)  # stay alive (without calling the layer) past rank 0's timeout
    print(f"OK timeout rank {RANK}", flush=True)
    # The collective stays pending on rank 0: leave without MPI_Finalize.
    sys.stdout.flush()
    os._exit(0)


def check_large_mean_accuracy():
    """Data with mean 1e4 and std 1, float32, split over ranks: variance to 1e-5."""
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((40, 3, 2500))).astype(np.float32)
    lo, hi = shard_bounds(40, SIZE, RANK)
    layer = cbn.SyncBatchNorm(3, momentum=1.0)
    layer(x[lo:hi])
    ref = x.astype(np.float64).var(axis=(0, 2), ddof=1)
    err = np.abs(layer.running_var - ref) / ref
    assert err.max() < 1e-5, err


def check_process_groups():
    """Two sub-communicators each synchronise on their own."""
    groups = [[r for r in range(SIZE) if r % 2 == 0], [r for r in range(SIZE) if r % 2 == 1]]
    sub = split_world(groups)
    compare((13, 3, 4), np.float64, comm=sub)
    for bad in ([[0]], [[0, 0]] + [[r] for r in range(1, SIZE)], [[r] for r in range(SIZE + 1)],
                "nonsense"):
        try:
            split_world(bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"process_groups {bad!r} should be rejected")


def check_convert():
    model = {"features": [cbn.BatchNorm2d(3), "relu"], "head": (cbn.BatchNorm1d(4),)}
    model["features"][0].running_mean[...] = 5
    converted = cbn.SyncBatchNorm.convert_sync_batchnorm(model)
    layer = converted["features"][0]
    assert isinstance(layer, cbn.SyncBatchNorm) and isinstance(converted["head"][0], cbn.SyncBatchNorm)
    assert np.all(layer.running_mean == 5)
    compare((10, 4, 3), np.float32)


def check_header_size():
    """The header of every collective has one size, whatever the number of ranks."""
    from cbn import comm
    layer = cbn.SyncBatchNorm(3)
    layer(np.random.default_rng(RANK).standard_normal((4, 3)))
    group = layer._global_stats().group
    sizes = WORLD.allgather(group.buffer(0).nbytes)
    assert sizes == [comm.HEADER_BYTES] * SIZE == [208] * SIZE, sizes
    if RANK == 0:
        print(f"header bytes on {SIZE} ranks: {sizes[0]}", flush=True)


if __name__ == "__main__":
    run_checks(globals())
