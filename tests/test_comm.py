"""cbn.comm: the self-checking collective, on threads standing in for ranks, and its checks.

The protocol (header, error slots, the decisions every rank takes from the
same sums) does not depend on the transport, so an in-process transport whose
"ranks" are threads tests it quickly; MPI and torchrun runs are in
test_faults.py, test_sync_batchnorm.py and test_torchrun.py.
"""
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import cbn
from cbn import comm
from cbn.sync_batchnorm import GlobalStats

ROOT = Path(__file__).parent.parent


class ThreadWorld:
    """``size`` threads summing buffers through shared memory (every buffer the same length)."""

    def __init__(self, size):
        self.size = size
        self.barrier = threading.Barrier(size)
        self.buffers = [None] * size


class ThreadTransport(comm.Transport):
    name = "threads"

    def __init__(self, world, rank):
        self.world, self.size, self.rank = world, world.size, rank
        self.key = ("threads", id(world), rank)  # one process: a counter per "rank"

    def allreduce(self, buf, timeout):
        world = self.world
        world.buffers[self.rank] = buf.copy()
        try:
            world.barrier.wait(timeout)
            total = np.sum(world.buffers, axis=0)
            world.barrier.wait(timeout)
        except threading.BrokenBarrierError:
            raise comm._Timeout() from None
        buf[:] = total


def run_ranks(size, body, timeout=10):
    """``body(rank, Collective)`` on ``size`` threads; returns each rank's result or exception."""
    world = ThreadWorld(size)
    results = [None] * size

    def run(rank):
        try:
            results[rank] = body(rank, comm.Collective(ThreadTransport(world, rank), timeout))
        except Exception as exc:  # noqa: BLE001
            results[rank] = exc
    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


def test_sums_with_the_header():
    def body(rank, group):
        buf = group.buffer(3)
        buf[comm.HEADER:] = rank + 1
        return group.sum(buf, comm.FORWARD, tag=1).copy()
    for out in run_ranks(4, body):
        np.testing.assert_array_equal(out, [10, 10, 10])


@pytest.mark.parametrize("size", [2, 4, 4096])
def test_the_header_does_not_grow_with_the_ranks(size):
    class Sized(comm.Transport):  # only the group's size matters for the buffer
        def allreduce(self, buf, timeout):
            pass
    transport = Sized()
    transport.size = size
    group = comm.Collective(transport, 1)
    assert group.buffer(0).nbytes == comm.HEADER_BYTES == 208
    assert group.buffer(10).size == comm.HEADER + 10


@pytest.mark.parametrize("field, words", [
    ("kind", ["the collective differs", "forward statistics on rank(s) [0, 1, 3]",
              "backward sums on rank(s) [2]"]),
    ("tag", ["num_features differs", "3 on rank(s) [0, 1, 3]", "4 on rank(s) [2]"]),
    ("dtype", ["dtype differs", "float32 on rank(s) [0, 1, 3]", "float64 on rank(s) [2]"]),
])
def test_a_field_that_differs_raises_on_every_rank_naming_it(field, words):
    def body(rank, group):
        odd = rank == 2
        kind = comm.BACKWARD if field == "kind" and odd else comm.FORWARD
        tag = 4 if field == "tag" and odd else 3
        dtype = np.float64 if field == "dtype" and odd else np.float32
        return group.sum(group.buffer(7), kind, tag=tag, dtype=dtype)
    results = run_ranks(4, body)
    for r, result in enumerate(results):
        assert isinstance(result, comm.GroupError), (r, result)
        for word in words:
            assert word in str(result), (word, str(result))


def test_the_call_counter_is_checked():
    def body(rank, group):
        if rank == 1:
            comm.Collective._calls[group.transport.key] = 41  # as after a lost call
        return group.sum(group.buffer(2), comm.FORWARD)
    for result in run_ranks(3, body):
        assert "the call counter differs" in str(result) and "42 on rank(s) [1]" in str(result)


class Strange(Exception):
    def __init__(self, a, b):  # cannot be rebuilt from one message
        super().__init__(a, b)


@pytest.mark.parametrize("error, others", [
    (ValueError("bad channels"), ValueError), (TypeError("bad dtype"), TypeError),
    (RuntimeError("requires grad"), RuntimeError), (KeyError("k"), RuntimeError),
    (Strange(1, 2), RuntimeError)])
def test_an_error_of_any_type_on_one_rank_raises_on_every_rank(error, others):
    def body(rank, group):
        return group.sum(group.buffer(5), comm.FORWARD, error=error if rank == 1 else None)
    results = run_ranks(3, body)
    for r, result in enumerate(results):
        assert isinstance(result, others if r != 1 else (type(error), RuntimeError)), result
        assert ("rank 1" in str(result)), str(result)
        if r != 1:
            assert "[1]" in str(result) and type(error).__name__ in str(result)


def test_global_stats_handshake_names_num_features_and_state_is_untouched():
    def body(rank, group):
        c = 4 if rank == 0 else 3
        stats = GlobalStats(group, c)
        batch = cbn._layout.as_batch(np.ones((2, c)), c, None, "(N, C)")
        return stats.moments(batch)
    for result in run_ranks(2, body):
        assert isinstance(result, comm.GroupError)
        assert "num_features differs (4 on rank(s) [0], 3 on rank(s) [1])" in str(result)


def test_a_rank_that_never_arrives_times_out():
    def body(rank, group):
        if rank == 0:
            return group.sum(group.buffer(1), comm.FORWARD)
    results = run_ranks(2, body, timeout=0.5)
    assert isinstance(results[0], TimeoutError) and "0.5 s" in str(results[0])


# --- arguments and the environment ------------------------------------------------------

def test_check_process_group():
    assert comm.check_process_group(None) is None
    assert comm.check_process_group("local") == comm.LOCAL
    for bad in ([0, 1], "world", 3, object()):
        with pytest.raises(TypeError, match="process_group"):
            comm.check_process_group(bad)
    with pytest.raises(TypeError, match="process_group"):
        cbn.SyncBatchNorm(3, process_group=[0, 1])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, 0])
def test_bad_timeout_arguments(value):
    with pytest.raises(ValueError, match="timeout"):
        cbn.SyncBatchNorm(3, timeout=value)
    with pytest.raises(ValueError, match="timeout"):
        comm.resolve_timeout(value)
    with pytest.raises(TypeError, match="timeout"):
        cbn.SyncBatchNorm(3, timeout="abc")


@pytest.mark.parametrize("text", ["nan", "-1", "0", "abc", "inf"])
def test_bad_cbn_sync_timeout_names_the_variable_at_use(monkeypatch, text):
    monkeypatch.setenv("CBN_SYNC_TIMEOUT", text)
    with pytest.raises(ValueError, match=f"CBN_SYNC_TIMEOUT.*{text!r}"):
        comm.resolve_timeout()
    layer = cbn.SyncBatchNorm(3)  # constructing is fine; training validates
    with pytest.raises(ValueError, match="CBN_SYNC_TIMEOUT"):
        layer(np.ones((4, 3)))
    assert layer.num_batches_tracked == 0


def test_good_cbn_sync_timeout(monkeypatch):
    monkeypatch.setenv("CBN_SYNC_TIMEOUT", "12.5")
    assert comm.resolve_timeout() == 12.5
    assert comm.resolve_timeout(3) == 3.0
    monkeypatch.delenv("CBN_SYNC_TIMEOUT")
    assert comm.resolve_timeout() == comm.DEFAULT_TIMEOUT


def run_python(code, timeout=60, **env):
    environment = {k: v for k, v in os.environ.items()
                   if k not in dict(comm.LAUNCH_VARIABLES)}
    environment.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=environment)


def test_import_cbn_with_a_bad_timeout_variable_imports_neither_torch_nor_mpi4py():
    done = run_python("import sys, cbn; assert 'torch' not in sys.modules; "
                      "assert 'mpi4py' not in sys.modules; print('ok')", CBN_SYNC_TIMEOUT="abc")
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


GUARD = """
import sys
if {hide}:
    sys.modules["mpi4py"] = None  # as if mpi4py were not installed
import numpy as np, cbn
layer = cbn.SyncBatchNorm(3, process_group={group})
try:
    layer(np.ones((4, 3)) * np.arange(4)[:, None])
except RuntimeError as exc:
    assert layer.num_batches_tracked == 0
    print("RAISED", exc)
else:
    print("TRAINED")
"""


@pytest.mark.parametrize("variable", ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                                      "SLURM_STEP_NUM_TASKS"])
@pytest.mark.parametrize("hide", [True, False], ids=["no-mpi4py", "mpi4py"])
def test_no_silent_singleton(variable, hide):
    if not hide:
        pytest.importorskip("mpi4py")
    done = run_python(GUARD.format(hide=hide, group=None), **{variable: "2"})
    assert "RAISED" in done.stdout, (done.stdout, done.stderr)
    assert f"{variable}=2" in done.stdout and "process_group='local'" in done.stdout
    if hide and variable != "WORLD_SIZE":
        assert "install mpi4py" in done.stdout
    local = run_python(GUARD.format(hide=hide, group="'local'"), **{variable: "2"})
    assert "TRAINED" in local.stdout, (local.stdout, local.stderr)


def test_a_single_process_without_launcher_trains():
    done = run_python(GUARD.format(hide=True, group=None))
    assert "TRAINED" in done.stdout, (done.stdout, done.stderr)


def test_an_explicit_group_of_one_is_not_a_silent_singleton():
    pytest.importorskip("mpi4py")
    code = GUARD.replace("import numpy as np, cbn", "import numpy as np, cbn\nfrom mpi4py import MPI")
    done = run_python(code.format(hide=False, group="MPI.COMM_SELF"), PMI_SIZE="2")
    assert "TRAINED" in done.stdout, (done.stdout, done.stderr)
    world = run_python(code.format(hide=False, group="MPI.COMM_WORLD"), PMI_SIZE="2")
    assert "RAISED" in world.stdout and "PMI_SIZE=2" in world.stdout, (world.stdout, world.stderr)
