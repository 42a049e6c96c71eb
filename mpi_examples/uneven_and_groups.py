"""Uneven (and empty) local batches, and process groups, with cbn.SyncBatchNorm.

usage: mpiexec -n 4 python -m mpi4py mpi_examples/uneven_and_groups.py

1. Every rank holds a different number of samples; rank 1 holds none.  The
   synchronised layer still normalises with the statistics of the union, and
   the running statistics come out identical on every rank.
2. ``cbn.mindspore.SyncBatchNorm(process_groups=[[0, 2], [1, 3]])``-style
   groups: the world is split so that ranks {0, 2} and {1, 3} each synchronise
   on their own (here with ``cbn.comm.split_world`` and ``cbn.SyncBatchNorm``).
"""
import numpy as np
from mpi4py import MPI

import cbn
from cbn.comm import split_world

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
cbn.set_num_threads(1)

# The same global batch on every rank (same seed); each keeps its own slice.
x = np.random.default_rng(0).normal(3.0, 2.0, size=(4 * size + 2, 3, 5, 5))
counts = [0 if r == 1 else 2 * r + 2 for r in range(size)]
counts[-1] += len(x) - sum(counts)
start = sum(counts[:rank])
shard = x[start:start + counts[rank]]

layer = cbn.SyncBatchNorm(3, momentum=1.0, dtype=np.float64)
y = layer(shard)
whole = cbn.BatchNorm2d(3, momentum=1.0, dtype=np.float64)
y_whole = whole(x)[start:start + counts[rank]]
report = world.gather((rank, len(shard), float(np.abs(y - y_whole).max(initial=0.0)),
                       layer.running_var.copy()), root=0)
if rank == 0:
    print(f"1. uneven batches over {size} ranks (global batch {len(x)}):")
    for r, n, err, running_var in report:
        print(f"   rank {r}: {n:2d} samples, max |sync - global batch| = {err:.1e}, "
              f"running_var = {np.array2string(running_var, precision=4)}")
    same = all(np.array_equal(rv, report[0][3]) for *_, rv in report)
    print(f"   running statistics identical on every rank: {same}")

# Process groups: even ranks and odd ranks synchronise separately.
groups = [list(range(0, size, 2)), list(range(1, size, 2))]
if size >= 2:
    sub = split_world(groups)
    group_layer = cbn.SyncBatchNorm(3, momentum=1.0, process_group=sub, dtype=np.float64)
    local = np.random.default_rng(rank).normal(rank, 1.0, size=(6, 3, 2, 2))
    group_layer(local)
    mine = next(g for g in groups if rank in g)
    union = np.concatenate([np.random.default_rng(r).normal(r, 1.0, size=(6, 3, 2, 2))
                            for r in mine])
    expected = union.mean(axis=(0, 2, 3))
    report = world.gather((rank, mine, group_layer.running_mean.copy(), expected), root=0)
    if rank == 0:
        print(f"2. process groups {groups}:")
        for r, mine, running_mean, expected in report:
            print(f"   rank {r} in group {mine}: running_mean = "
                  f"{np.array2string(running_mean, precision=4)} "
                  f"(mean of its group's batches: {np.array2string(expected, precision=4)})")
