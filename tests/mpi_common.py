"""What the MPI check scripts (mpi_*_checks.py) share: the world, shards, counting, the runner."""
import sys

import numpy as np
from mpi4py import MPI

import cbn

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


class CountingComm:
    """An mpi4py communicator that counts the collectives the layers start."""

    def __init__(self, comm):
        self.comm, self.calls = comm, 0

    def Iallreduce(self, *args, **kwargs):
        self.calls += 1
        return self.comm.Iallreduce(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.comm, name)


def shard_bounds(n, size, rank):
    """Uneven shards; with 3+ ranks rank 1 holds nothing."""
    weights = np.arange(1, size + 1, dtype=float)
    if size >= 3:
        weights[1] = 0
    cuts = np.concatenate([[0], np.round(np.cumsum(weights) / weights.sum() * n)]).astype(int)
    return int(cuts[rank]), int(cuts[rank + 1])


def run_checks(namespace):
    """Run the ``check_<name>`` functions of ``namespace`` named on the command line.

    Rank 0 prints "OK <name> on <size> ranks" after each; a failing check
    raises, and ``python -m mpi4py`` aborts the whole job.
    """
    checks = {name[len("check_"):]: f for name, f in namespace.items()
              if name.startswith("check_")}
    cbn.set_num_threads(1)  # ranks may outnumber cores
    for name in sys.argv[1:]:
        checks[name]()
        WORLD.Barrier()
        if RANK == 0:
            print(f"OK {name} on {SIZE} ranks", flush=True)
