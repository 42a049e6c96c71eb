"""The only place cbn touches MPI.

mpi4py is imported on first use, never by ``import cbn``.  SyncBatchNorm
needs one thing from MPI: the element-wise sum of a float64 buffer over a
process group, with two guarantees:

* every rank learns if any rank failed (an error code travels in the same
  buffer, one slot per rank), so a bad input on one rank raises everywhere
  instead of leaving the others blocked;
* a rank that never arrives turns into ``TimeoutError`` after ``timeout``
  seconds instead of an endless wait (non-blocking ``Iallreduce``, polled).
"""
import os
import time

import numpy as np

#: Seconds a collective may wait for the slowest rank (env CBN_SYNC_TIMEOUT).
DEFAULT_TIMEOUT = float(os.environ.get("CBN_SYNC_TIMEOUT", "300"))

#: Seconds a collective polls with ``sched_yield`` before it polls with sleeps.
_BUSY_WAIT = 2e-3
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))

# Error codes carried in the buffer: which exception every rank raises.
OK, VALUE_ERROR, TYPE_ERROR, RUNTIME_ERROR = 0.0, 1.0, 2.0, 3.0
_CODES = {ValueError: VALUE_ERROR, TypeError: TYPE_ERROR}
_EXCEPTIONS = {VALUE_ERROR: ValueError, TYPE_ERROR: TypeError, RUNTIME_ERROR: RuntimeError}


def mpi():
    """The mpi4py.MPI module, or None when mpi4py is not installed."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI


def require_mpi():
    MPI = mpi()
    if MPI is None:
        raise ImportError("process groups need mpi4py and an MPI library: "
                          "pip install mpi4py mpich (or `pip install cbn[mpi]`)")
    return MPI


def world():
    """MPI.COMM_WORLD, or None without mpi4py (a single process)."""
    MPI = mpi()
    return None if MPI is None else MPI.COMM_WORLD


def collective(process_group=None, timeout=None):
    """The Collective of ``process_group`` (None: the world), or None for a single process."""
    comm = process_group if process_group is not None else world()
    if comm is None or comm.Get_size() == 1:
        return None
    return Collective(comm, timeout)


def split_world(process_groups):
    """The sub-communicator of this rank for ``process_groups``, a partition of the world.

    ``process_groups`` is a list of lists of world ranks; every rank must call
    this (it is collective over the world) with the same groups.
    """
    MPI = require_mpi()
    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    try:
        groups = [[int(r) for r in group] for group in process_groups]
    except (TypeError, ValueError):
        raise ValueError(f"process_groups must be a list of lists of ranks, "
                         f"got {process_groups!r}") from None
    members = sorted(r for group in groups for r in group)
    if not all(groups) or members != list(range(size)):
        raise ValueError(f"process_groups must partition the world ranks 0..{size - 1} "
                         f"(each rank in exactly one non-empty group), got {process_groups!r}")
    color = next(i for i, group in enumerate(groups) if rank in group)
    return comm.Split(color, sorted(groups[color]).index(rank))


class GroupError(Exception):
    """Raised by ``Collective.sum`` when some rank of the group reported an error."""


class Collective:
    """Sum of float64 buffers over an mpi4py communicator, with error flags and a timeout.

    Buffers handed to ``sum`` start with ``size`` error slots; ``sum`` fills
    this rank's slot and raises on every rank when any slot is set.
    """

    def __init__(self, comm, timeout=None):
        self.comm = comm
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        self._MPI = mpi()

    def buffer(self, length):
        """A zeroed float64 buffer: ``size`` error slots followed by ``length`` values."""
        return np.zeros(self.size + length)

    def sum(self, buf, error=None):
        """Sum ``buf`` over the group in place; return the values after the error slots.

        ``error`` is this rank's exception, if it failed: it joins the
        collective with its code set, so that every rank raises.
        """
        if error is not None:
            buf[:] = 0.0
            buf[self.rank] = _CODES.get(type(error), RUNTIME_ERROR)
        self._allreduce(buf)
        codes = buf[:self.size]
        if codes.any():
            failed = [int(r) for r in np.flatnonzero(codes)]
            if error is not None:
                raise type(error)(f"rank {self.rank} of {self.size}: {error}") from error
            kinds = {_EXCEPTIONS.get(float(codes[r]), RuntimeError) for r in failed}
            kind = kinds.pop() if len(kinds) == 1 else RuntimeError
            raise kind(f"SyncBatchNorm: bad input on rank(s) {failed} of the process group "
                       f"(size {self.size}); every rank raises (see the error on those ranks)")
        return buf[self.size:]

    def _allreduce(self, buf):
        MPI = self._MPI
        request = self.comm.Iallreduce(MPI.IN_PLACE, [buf, MPI.DOUBLE], op=MPI.SUM)
        if request.Test():
            return
        start = time.monotonic()
        deadline = start + self.timeout
        pause = 20e-6
        while not request.Test():
            now = time.monotonic()
            if now - start < _BUSY_WAIT:
                # Ranks may outnumber cores: hand the core to a rank that has
                # work, and come back at once when none has.  Sleeping here
                # instead made every collective cost up to a millisecond.
                _yield()
            else:  # a long wait (a slow rank): stop burning the core
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)
            if now > deadline:
                raise TimeoutError(
                    f"SyncBatchNorm: rank {self.rank} waited {self.timeout:g} s for the other "
                    f"{self.size - 1} rank(s) of its process group. Every rank must call every "
                    f"SyncBatchNorm layer the same number of times in training. The collective "
                    f"stays pending: abort the job (MPI cannot cancel it).")
