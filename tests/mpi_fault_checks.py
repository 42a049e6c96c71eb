"""Fault injection for cbn's collectives, run under ``mpiexec -n 2/3`` by test_faults.py.

usage: mpiexec -n 3 python -m mpi4py tests/mpi_fault_checks.py CHECK [CHECK ...]

Each check makes the ranks disagree in one way (one rank out of step, a
different num_features, dtype, layer order, process_groups, an error of some
type on one rank) and requires that every rank raises, within seconds, an
exception whose message names the problem, and that no layer's state
changed.  Rank 0 prints "OK <check> on <size> ranks: <the message it got>".
"""
import time

import numpy as np

import cbn
import cbn.mindspore as ms
from cbn import comm as _comm

from mpi_common import RANK, SIZE, WORLD, run_checks

LAST = SIZE - 1
TIMEOUT = 20  # no check may need it: each must raise long before


def state(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def assert_same_state(before, layer, what):
    after = state(layer)
    for key in before:
        if not np.array_equal(before[key], after[key]):
            raise AssertionError(f"rank {RANK}: {what} changed {key}")


def expect(kind, call, words, what, layers=()):
    """``call()`` raises ``kind`` on this rank, fast, naming ``words``; layers unchanged."""
    before = [state(layer) for layer in layers]
    start = time.monotonic()
    try:
        call()
    except kind as exc:
        message = str(exc)
    else:
        raise AssertionError(f"rank {RANK}: {what}: no {kind.__name__}")
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"rank {RANK}: {what}: took {elapsed:.1f} s"
    for word in words:
        assert word in message, f"rank {RANK}: {what}: {word!r} not in {message!r}"
    for snapshot, layer in zip(before, layers):
        assert_same_state(snapshot, layer, what)
    report(what, message)
    return message


def report(what, message):
    messages = WORLD.gather(message, root=0)
    if RANK == 0:
        for r, m in enumerate(messages):
            print(f"  [{what}] rank {r}: {m[:260]}", flush=True)


def data(c=3, n=4, seed=None, dtype=np.float32):
    rng = np.random.default_rng(RANK if seed is None else seed)
    return (rng.standard_normal((n, c)) + 1).astype(dtype)


def trained(c=3, dtype=np.float32):
    layer = cbn.SyncBatchNorm(c, dtype=dtype, timeout=TIMEOUT)
    layer(data(c, dtype=dtype))
    layer.backward(np.ones((4, c), dtype))
    return layer


# --- out of step -------------------------------------------------------------------

def check_skipped_backward():
    """One rank skips a backward: its next forward meets the others' backward."""
    layer = trained()
    layer(data())
    if RANK == 0:
        expect(RuntimeError, lambda: layer(data()), ["the collective differs",
               "forward statistics on rank(s) [0]", "backward sums"],
               "skipped backward", [layer])
    else:
        expect(RuntimeError, lambda: layer.backward(np.ones((4, 3), np.float32)),
               ["the collective differs", "backward sums on rank(s)"],
               "skipped backward", [layer])
    # Afterwards every rank is at a forward again: the layer works.
    layer(data())
    layer.backward(np.ones((4, 3), np.float32))


def check_two_layers_out_of_step():
    """Two layers of one width; one rank skips the whole backward pass."""
    a, b = trained(), trained()
    a(data()), b(data())
    if RANK == LAST:
        expect(RuntimeError, lambda: a(data()), ["the collective differs"],
               "skipped backward pass", [a, b])
    else:
        expect(RuntimeError, lambda: b.backward(np.ones((4, 3), np.float32)),
               ["the collective differs"], "skipped backward pass", [a, b])


def check_num_features():
    c = 4 if RANK == LAST else 3
    layer = cbn.SyncBatchNorm(c, timeout=TIMEOUT)
    expect(RuntimeError, lambda: layer(data(c)),
           ["num_features differs", f"4 on rank(s) [{LAST}]", "3 on rank(s) [0"],
           "num_features", [layer])


def check_dtype():
    dtype = np.float64 if RANK == LAST else np.float32
    layer = cbn.SyncBatchNorm(3, dtype=dtype, timeout=TIMEOUT)
    fresh = cbn.SyncBatchNorm(3, dtype=dtype, timeout=TIMEOUT)
    expect(RuntimeError, lambda: fresh(data(dtype=dtype)),
           ["dtype differs", f"float64 on rank(s) [{LAST}]", "float32 on rank(s) [0"],
           "dtype", [fresh, layer])


def check_layer_order():
    a, b = cbn.SyncBatchNorm(3, timeout=TIMEOUT), cbn.SyncBatchNorm(5, timeout=TIMEOUT)
    first = b if RANK == LAST else a
    expect(RuntimeError, lambda: first(data(first.num_features)),
           ["num_features differs"], "layer order", [a, b])


def check_process_groups():
    """Groups that differ between ranks, or are invalid on one rank: every rank raises."""
    evens = [r for r in range(SIZE) if r % 2 == 0]
    odds = [r for r in range(SIZE) if r % 2 == 1]
    groups = [list(range(SIZE))] if RANK == LAST else [evens, odds]
    expect(RuntimeError, lambda: _comm.split_world(groups),
           ["process_groups differs", "Every rank must pass the same process_groups"],
           "different process_groups")
    bad = [[0]] if RANK == LAST else [list(range(SIZE))]
    expect(ValueError, lambda: ms.SyncBatchNorm(3, process_groups=bad, timeout=TIMEOUT),
           ["process_groups", f"[{LAST}]" if RANK != LAST else "partition"],
           "invalid process_groups on one rank")
    layer = ms.SyncBatchNorm(3, process_groups=[list(range(SIZE))], timeout=TIMEOUT)
    layer.set_train()(np.ones((2, 3, 2, 2), np.float32) * RANK)  # the world still works


# --- an error of each type on one rank ----------------------------------------------

class _Custom(Exception):
    pass


def check_error_types():
    """A validation error of any type on one rank raises on every rank, naming that rank."""
    layer = trained()
    cases = [(ValueError, np.ones((4, 5), np.float32), "channels"),
             (TypeError, np.ones((4, 3), np.int32), "floating"),
             (RuntimeError, "runtime", "RuntimeError"),
             (KeyError, "key", "KeyError"),
             (_Custom, "custom", "_Custom")]
    for kind, bad, words in cases:
        def call(bad=bad, kind=kind):
            if RANK != LAST:
                return layer(data())
            if isinstance(bad, np.ndarray):
                return layer(bad)
            original = layer._batch

            def failing(x):
                raise kind(f"injected {kind.__name__}")
            layer._batch = failing
            try:
                return layer(data())
            finally:
                layer._batch = original
        expected = kind if RANK == LAST else (kind if kind in (ValueError, TypeError,
                                                               RuntimeError) else RuntimeError)
        expect(expected, call, [words, f"[{LAST}]" if RANK != LAST else f"rank {LAST}"],
               f"{kind.__name__} on one rank", [layer])
    # A torch tensor that requires grad is accepted (read detached): one rank passing one
    # changes nothing for the others.
    try:
        import torch
    except ImportError:
        return
    x = data()
    y = layer(torch.from_numpy(x).requires_grad_() if RANK == LAST else x)
    everything = np.concatenate(WORLD.allgather(x)).astype(np.float64)
    mean, var = everything.mean(0), everything.var(0)
    expected = (x - mean) / np.sqrt(var + layer.eps) * layer.weight + layer.bias
    assert np.allclose(y, expected, rtol=1e-5, atol=1e-5), f"rank {RANK}: a tensor requiring grad"


def check_error_inside_the_step():
    """Errors raised inside the training step on one rank, before its collective."""
    layer = trained()
    good = layer.running_mean
    if RANK == LAST:
        layer.running_mean = np.zeros(2, np.float32)  # the wrong shape, set by hand
    expect(ValueError, lambda: layer(data()), ["running_mean", f"{LAST}"],
           "running_mean of the wrong shape on one rank", [layer])
    layer.running_mean = good
    original = layer._forward

    def failing(batch, out=None):
        raise MemoryError("injected inside _forward")
    if RANK == 0:
        layer._forward = failing
    expect(MemoryError if RANK == 0 else RuntimeError, lambda: layer(data()),
           ["MemoryError" if RANK != 0 else "injected", "0"],
           "an error inside the step on one rank", [layer])
    layer._forward = original
    layer(data())  # still works
    layer.backward(np.ones((4, 3), np.float32))


def check_backward_error_types():
    layer = trained()
    layer(data())
    dy = np.ones((5, 3), np.float32) if RANK == LAST else np.ones((4, 3), np.float32)
    expect(ValueError, lambda: layer.backward(dy), [f"{LAST}"], "bad dy on one rank", [layer])


# --- gradients ------------------------------------------------------------------------

def check_gradients():
    try:
        import torch
    except ImportError:
        return
    import cbn.torch as ct
    width = 4 if RANK == LAST else 3
    model = torch.nn.Linear(width, 2)
    model(torch.ones(1, width)).sum().backward()
    expect(RuntimeError, lambda: ct.allreduce_gradients(model, WORLD, timeout=TIMEOUT),
           ["the number of gradient values differs", "same model structure"],
           "different models")
    model = torch.nn.Linear(3, 2)
    model(torch.ones(1, 3)).sum().backward()
    ct.allreduce_gradients(model, WORLD, timeout=TIMEOUT)  # then it works


# --- timeouts -------------------------------------------------------------------------

def check_bad_timeouts():
    import os
    for text in ("nan", "-1", "0", "abc", "inf"):
        os.environ["CBN_SYNC_TIMEOUT"] = text
        layer = cbn.SyncBatchNorm(3)
        expect(ValueError, lambda: layer(data()), ["CBN_SYNC_TIMEOUT", repr(text)],
               f"CBN_SYNC_TIMEOUT={text}", [layer])
    del os.environ["CBN_SYNC_TIMEOUT"]
    for value in (float("nan"), -1, 0, float("inf")):
        try:
            cbn.SyncBatchNorm(3, timeout=value)
        except ValueError as exc:
            assert "timeout" in str(exc)
        else:
            raise AssertionError(f"timeout={value!r} accepted")
    report("timeout=nan/-1/0/inf", "ValueError naming timeout")


def check_header_size():
    group = _comm.collective(WORLD, 10)
    sizes = WORLD.allgather(group.buffer(0).nbytes)
    assert len(set(sizes)) == 1 and sizes[0] == _comm.HEADER_BYTES, sizes
    if RANK == 0:
        print(f"  header bytes on {SIZE} ranks: {sizes[0]}", flush=True)


def die():
    """Under plain ``mpiexec python`` (no ``-m mpi4py``): the last rank dies of an exception.

    The others enter the next collective; cbn's exception hook must end the
    job within seconds (CBN_ABORT_ON_EXCEPTION=0: they wait for the timeout).
    """
    import sys
    layer = cbn.SyncBatchNorm(3)
    layer(data())
    layer.backward(np.ones((4, 3), np.float32))
    print(f"rank {RANK} synchronised", flush=True)
    if RANK == LAST:
        raise ZeroDivisionError("injected: this rank dies")
    try:
        layer(data())
    except TimeoutError as exc:
        print(f"rank {RANK} TimeoutError: {exc}", flush=True)
        sys.stdout.flush()
        import os
        os._exit(3)


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["die"]:
        die()
    else:
        run_checks(globals())
