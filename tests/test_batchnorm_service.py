"""What a service needs from a layer: a cache that is never stale, out=, threads."""
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import cbn
from cbn import functional as F


def expected_eval(layer, x):
    """The eval output computed from scratch by the functional API (no cache)."""
    return F.batch_norm(x, layer.running_mean.copy(), layer.running_var.copy(),
                        layer.weight, layer.bias, False, eps=layer.eps)


def test_eval_cache_is_never_stale():
    rng = np.random.default_rng(0)
    layer = cbn.BatchNorm2d(4, dtype=np.float64).eval()
    x = rng.standard_normal((3, 4, 5, 5))

    def check(what):
        np.testing.assert_allclose(layer(x), expected_eval(layer, x), rtol=1e-13, atol=1e-13,
                                   err_msg=what)

    check("fresh")
    layer.running_var[2] = 9.0                         # in-place write
    check("in-place running_var")
    layer.running_mean += 1.0
    check("in-place running_mean")
    layer.weight[0] = -3.0
    check("in-place weight")
    layer.bias = np.full(4, 0.5)                       # attribute assignment
    check("assigned bias")
    layer.eps = 0.5
    check("eps")
    state = cbn.BatchNorm2d(4, dtype=np.float64).state_dict()
    state["running_var"] = np.arange(1.0, 5.0)
    layer.load_state_dict(state)
    check("load_state_dict")
    layer.train()(rng.standard_normal((3, 4, 5, 5)) * 5)  # a training step moves the stats
    layer.eval()
    check("after a training step")
    np.testing.assert_allclose(layer(x.astype(np.float32)),
                               expected_eval(layer, x.astype(np.float32)), rtol=1e-6)
    layer.reset_running_stats()
    check("reset_running_stats")


def test_out_receives_the_result():
    rng = np.random.default_rng(1)
    layer = cbn.BatchNorm2d(3)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    out = np.empty_like(x)
    y = layer(x, out=out)
    assert y is out
    np.testing.assert_array_equal(out, cbn.BatchNorm2d(3)(x))
    layer.eval()
    out_cl = np.moveaxis(np.empty((2, 4, 4, 3), np.float32), -1, 1)   # other layout: staged
    assert layer(x, out=out_cl) is out_cl
    np.testing.assert_array_equal(out_cl, layer(x))
    dx = np.empty_like(x)
    assert layer.backward(np.ones_like(x), out=dx) is dx
    np.testing.assert_array_equal(dx, layer.backward(np.ones_like(x)))


@pytest.mark.parametrize("out, error, words", [
    (np.empty((2, 3, 4, 5), np.float32), ValueError, "shape"),
    (np.empty((2, 3, 4, 4), np.float64), ValueError, "dtype"),
    ([0.0] * 96, TypeError, "NumPy array"),
])
def test_bad_out_is_rejected_and_state_untouched(out, error, words):
    layer = cbn.BatchNorm2d(3)
    x = np.ones((2, 3, 4, 4), np.float32)
    with pytest.raises(error, match=words):
        layer(x, out=out)
    assert layer.num_batches_tracked == 0 and np.all(layer.running_mean == 0)


def test_read_only_out_is_rejected():
    x = np.ones((2, 3, 4, 4), np.float32)
    out = np.empty_like(x)
    out.setflags(write=False)
    with pytest.raises(ValueError, match="read-only"):
        cbn.BatchNorm2d(3)(x, out=out)


@pytest.mark.parametrize("training", [True, False])
def test_in_place_normalisation(training):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    expected = cbn.BatchNorm1d(3).train(training)(x)
    layer = cbn.BatchNorm1d(3).train(training)
    y = layer(x, out=x)
    assert y is x
    np.testing.assert_array_equal(x, expected)
    with pytest.raises(RuntimeError, match="over its input"):
        layer.backward(np.ones_like(x))


def test_eval_with_out_allocates_nothing_per_call():
    layer = cbn.BatchNorm2d(64).eval()
    x = np.random.default_rng(3).standard_normal((8, 64, 28, 28)).astype(np.float32)
    out = np.empty_like(x)
    layer(x, out=out)  # warm the cache
    tracemalloc.start()
    for _ in range(20):
        layer(x, out=out)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 1024, f"{peak} bytes traced for calls on a {x.nbytes}-byte input"


def test_sixteen_threads_share_one_eval_layer():
    rng = np.random.default_rng(4)
    layer = cbn.BatchNorm2d(16).eval()
    layer.running_mean[...] = rng.standard_normal(16)
    inputs = [rng.standard_normal((4, 16, 32, 32)).astype(np.float32) for _ in range(16)]
    serial = [layer(x) for x in inputs]
    results = [None] * 16

    def work(i):
        for _ in range(5):
            results[i] = layer(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial):
        np.testing.assert_array_equal(got, want)


def test_training_from_several_threads_keeps_the_statistics_consistent(monkeypatch):
    # momentum=None makes the running mean the plain average of every batch
    # mean, whatever the order; a lost or torn update (a count read by one
    # thread after another moved it) shows.  The update is slowed down in its
    # middle (read, yield, write) and the switch interval made tiny, so that
    # without the layer's lock the threads interleave inside it.
    update = F.update_running

    def slow_update(running_mean, running_var, *args):
        before = running_mean.copy(), running_var.copy()
        time.sleep(1e-4)
        running_mean[...], running_var[...] = before
        update(running_mean, running_var, *args)

    monkeypatch.setattr(F, "update_running", slow_update)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        x = np.random.default_rng(5).standard_normal((8, 32, 4))
        layer = cbn.BatchNorm1d(32, momentum=None, dtype=np.float64)
        steps, workers = 20, 8

        def work(shift):
            for _ in range(steps):
                layer(x + shift)

        threads = [threading.Thread(target=work, args=(10.0 * i,)) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(previous)
    assert layer.num_batches_tracked == steps * workers
    expected = x.mean(axis=(0, 2)) + 10.0 * np.arange(workers).mean()
    np.testing.assert_allclose(layer.running_mean, expected, rtol=1e-10)
    np.testing.assert_allclose(layer.running_var, x.var(axis=(0, 2), ddof=1), rtol=1e-10)


def test_layers_copy_and_pickle_without_their_lock():
    import copy
    import pickle
    layer = cbn.BatchNorm2d(3)
    layer(np.ones((2, 3, 2, 2)))
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        np.testing.assert_array_equal(clone.running_var, layer.running_var)
        clone(np.ones((2, 3, 2, 2)))
        with pytest.raises(RuntimeError, match="before any forward"):
            type(clone)(3).backward(np.ones((2, 3, 2, 2)))


def address(a):
    return a.__array_interface__["data"][0]


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_dropped_large_output_is_recycled_and_a_held_one_never(channels_last):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((8, 64, 32, 32)).astype(np.float32)   # 2 MiB output
    if channels_last:
        x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    layer = cbn.BatchNorm2d(64).eval()
    first = layer(x)
    kept = first.copy()
    spare = layer._spare
    second = layer(x * 2)                  # `first` is held: fresh memory
    assert layer._spare is not spare
    assert address(second) != address(first)
    np.testing.assert_array_equal(first, kept)
    view = second[:, :3]
    view_values = view.copy()
    address_second = address(second)
    del second
    third = layer(x * 3)                   # a view of `second` is held: fresh memory
    assert address(third) != address_second
    np.testing.assert_array_equal(view, view_values)
    address_third = address(third)
    spare = layer._spare
    del third
    fourth = layer(x * 4)                  # nothing holds `third`: its memory is reused
    assert layer._spare is spare, "not recycled (a fresh block at the same address?)"
    assert address(fourth) == address_third
    np.testing.assert_array_equal(fourth, expected_eval(layer, x * 4))
    assert channels_last == np.moveaxis(fourth, 1, -1).flags.c_contiguous


def test_recycling_threads_never_share_a_buffer():
    rng = np.random.default_rng(7)
    layer = cbn.BatchNorm2d(32).eval()
    inputs = [rng.standard_normal((4, 32, 48, 48)).astype(np.float32) for _ in range(8)]
    expected = [expected_eval(layer, x) for x in inputs]
    failures = []

    def work(i):
        for _ in range(20):
            y = layer(inputs[i])            # dropped at the next iteration: recyclable
            if not np.array_equal(y, expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


@pytest.mark.parametrize("training", [True, False])
def test_out_partly_overlapping_the_input_gives_the_right_answer(training):
    buf = np.random.default_rng(8).random(361).astype(np.float32)
    x = buf[:-1].reshape(3, 4, 5, 6)
    expected = cbn.BatchNorm2d(4).train(training)(x.copy())
    out = buf[1:].reshape(3, 4, 5, 6)       # shares memory with x, shifted by one
    cbn.BatchNorm2d(4).train(training)(x, out=out)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("shift", [1, -1, 7])
@pytest.mark.parametrize("training", [True, False])
def test_backward_out_partly_overlapping_the_gradient_gives_the_right_answer(training, shift):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    buf = rng.standard_normal(360 + abs(shift)).astype(np.float32)
    start = max(0, -shift)
    dy = buf[start + max(0, shift):][:360].reshape(3, 4, 5, 6) if shift > 0 else \
        buf[:360].reshape(3, 4, 5, 6)
    out = buf[:360].reshape(3, 4, 5, 6) if shift > 0 else buf[-shift:][:360].reshape(3, 4, 5, 6)
    assert np.shares_memory(dy, out) and dy.ctypes.data != out.ctypes.data
    reference = cbn.BatchNorm2d(4).train(training)
    reference(x)
    expected = reference.backward(dy.copy())
    layer = cbn.BatchNorm2d(4).train(training)
    layer(x)
    result = layer.backward(dy, out=out)
    assert result is out
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(layer.grad_weight, reference.grad_weight)


@pytest.mark.parametrize("training", [True, False])
def test_backward_out_exactly_the_gradient_is_written_in_place(training):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    dy = rng.standard_normal((3, 4, 5)).astype(np.float32)
    reference = cbn.BatchNorm1d(4).train(training)
    reference(x)
    expected = reference.backward(dy.copy())
    layer = cbn.BatchNorm1d(4).train(training)
    layer(x)
    assert layer.backward(dy, out=dy) is dy
    np.testing.assert_array_equal(dy, expected)
