"""Checks of cbn over torch.distributed (gloo), run under ``torchrun`` by test_torchrun.py.

usage: torchrun --nproc_per_node 3 tests/torchrun_checks.py CHECK [CHECK ...]

``equality``: cbn.torch.SyncBatchNorm and cbn.SyncBatchNorm with the default
process group (torch.distributed's WORLD) on uneven shards (with 3 processes
rank 1's is empty) equal one process on the global batch, over several
training steps.  ``ddp``: DistributedDataParallel for the gradients and
cbn.torch.SyncBatchNorm for the statistics equal one process.  ``bad_input``:
a wrong input on one rank raises on every rank.  ``guard`` runs WITHOUT
init_process_group: the first training forward must raise, naming WORLD_SIZE.
Rank 0 prints "OK <check> on <size> processes" and the largest differences.
"""
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cbn  # noqa: E402
import cbn.torch as ct  # noqa: E402

torch.set_num_threads(1)
cbn.set_num_threads(1)


def shard_bounds(n, size, rank, empty=True):
    """Uneven shards (rank r holds a share ~ r + 1); with 3+ processes rank 1 holds nothing."""
    weights = np.arange(1, size + 1, dtype=float)
    if size >= 3 and empty:
        weights[1] = 0
    cuts = np.concatenate([[0], np.round(np.cumsum(weights) / weights.sum() * n)]).astype(int)
    return int(cuts[rank]), int(cuts[rank + 1])


def differences(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.size == 0:
        return 0.0, 0.0
    abs_err = float(np.abs(actual - expected).max())
    return abs_err, abs_err / max(float(np.abs(expected).max()), 1e-300)


class Worst:
    def __init__(self):
        self.abs = self.rel = 0.0

    def add(self, actual, expected, tol, what):
        a, r = differences(actual, expected)
        assert r <= tol, f"rank {dist.get_rank()}: {what}: relative difference {r:.3g} > {tol}"
        self.abs, self.rel = max(self.abs, a), max(self.rel, r)

    def report(self, name):
        worst = torch.tensor([self.abs, self.rel], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if dist.get_rank() == 0:
            print(f"OK {name} on {dist.get_world_size()} processes: max abs diff "
                  f"{worst[0]:.3g}, max rel diff {worst[1]:.3g}", flush=True)


def check_equality():
    rank, size = dist.get_rank(), dist.get_world_size()
    worst = Worst()
    n, c = 13, 4
    lo, hi = shard_bounds(n, size, rank)
    gen = torch.Generator().manual_seed(0)
    sync = ct.SyncBatchNorm(c, momentum=0.3).double()
    ref = torch.nn.BatchNorm2d(c, momentum=0.3).double()
    numpy_sync = cbn.SyncBatchNorm(c, momentum=0.3, dtype=np.float64)  # default group too
    numpy_ref = cbn.BatchNorm2d(c, momentum=0.3, dtype=np.float64)
    with torch.no_grad():
        for layer in (sync, ref):
            layer.weight.copy_(torch.linspace(0.5, 1.5, c))
            layer.bias.copy_(torch.linspace(-1, 1, c))
    for step in range(3):
        x = torch.randn(n, c, 3, 5, generator=gen, dtype=torch.float64) * 2 + 3
        dy = torch.randn(n, c, 3, 5, generator=gen, dtype=torch.float64)
        x_ref = x.clone().requires_grad_()
        shard = x[lo:hi].clone().requires_grad_()
        y = sync(shard)
        y_ref = ref(x_ref)
        (y * dy[lo:hi]).sum().backward()
        (y_ref * dy).sum().backward()
        worst.add(y.detach(), y_ref.detach()[lo:hi], 1e-12, f"output step {step}")
        worst.add(shard.grad, x_ref.grad[lo:hi], 1e-12, f"input gradient step {step}")
        for name in ("weight", "bias"):
            total = getattr(sync, name).grad.clone()
            dist.all_reduce(total)
            worst.add(total, getattr(ref, name).grad, 1e-12, f"summed grad {name}")
            getattr(sync, name).grad = None
            getattr(ref, name).grad = None
        for name in ("running_mean", "running_var"):
            worst.add(getattr(sync, name), getattr(ref, name), 1e-12, name)
        assert int(sync.num_batches_tracked) == step + 1
        # The NumPy layer over the same torch.distributed group.
        xn = x.numpy()
        out = numpy_sync(xn[lo:hi])
        out_ref = numpy_ref(xn)
        worst.add(out, out_ref[lo:hi], 1e-12, "cbn.SyncBatchNorm output")
        dx = numpy_sync.backward(dy.numpy()[lo:hi])
        worst.add(dx, numpy_ref.backward(dy.numpy())[lo:hi], 1e-12, "cbn.SyncBatchNorm dx")
        worst.add(numpy_sync.running_var, numpy_ref.running_var, 1e-12, "numpy running_var")
    worst.report("equality")


def build(seed=0):
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 8), nn.BatchNorm1d(8), nn.ReLU(),
                         nn.Linear(8, 3)).double()


def check_ddp():
    """DDP (gradients) + cbn.torch.SyncBatchNorm (statistics) == one process, over SGD steps."""
    rank, size = dist.get_rank(), dist.get_world_size()
    worst = Worst()
    n = 12
    lo, hi = shard_bounds(n, size, rank, empty=False)
    model = ct.convert_sync_batchnorm(build())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ref = build()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64)
        target = torch.randint(0, 3, (n,), generator=gen)
        # DDP averages gradients over processes: scale each shard's summed loss so that
        # the average is the gradient of the global batch's mean loss.
        loss = torch.nn.functional.cross_entropy(ddp(x[lo:hi]), target[lo:hi],
                                                 reduction="sum") * size / n
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_ref = torch.nn.functional.cross_entropy(ref(x), target)
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        for p, p_ref in zip(model.parameters(), ref.parameters()):
            worst.add(p.detach(), p_ref.detach(), 1e-11, f"parameter step {step}")
        for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
            if not name.endswith("num_batches_tracked"):
                worst.add(b, b_ref, 1e-11, f"buffer {name} step {step}")
    worst.report("ddp")


def check_subgroup_and_gradients():
    """A torch.distributed sub-group synchronises only its members; allreduce_gradients over
    the default group (torch's WORLD) averages like dist.all_reduce."""
    rank, size = dist.get_rank(), dist.get_world_size()
    worst = Worst()
    members = [r for r in range(size) if r != 1] if size >= 3 else list(range(size))
    group = dist.new_group(members)  # collective over the world: every process calls it
    if rank in members:
        n, c = 11, 3
        lo, hi = shard_bounds(n, len(members), members.index(rank), empty=False)
        gen = torch.Generator().manual_seed(5)
        layer = ct.SyncBatchNorm(c, process_group=group).double()
        ref = torch.nn.BatchNorm1d(c).double()
        for _ in range(2):
            x = torch.randn(n, c, 4, generator=gen, dtype=torch.float64)
            worst.add(layer(x[lo:hi]).detach(), ref(x)[lo:hi].detach(), 1e-12, "sub-group")
            worst.add(layer.running_var, ref.running_var, 1e-12, "sub-group running_var")
    else:  # alone in its part of the world: an explicit group of one is local statistics
        alone = "local"
        x = torch.randn(5, 3, dtype=torch.float64)
        layer = ct.SyncBatchNorm(3, process_group=alone).double()
        worst.add(layer(x).detach(), torch.nn.BatchNorm1d(3).double()(x).detach(), 1e-12,
                  "local")
    model = torch.nn.Linear(3, 2).double()
    torch.manual_seed(rank)
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for e in expected:
        dist.all_reduce(e)
        e /= size
    ct.allreduce_gradients(model)  # default: torch.distributed's WORLD
    for p, e in zip(model.parameters(), expected):
        worst.add(p.grad, e, 1e-14, "allreduce_gradients")
    worst.report("subgroup_and_gradients")


def check_bad_input():
    rank, size = dist.get_rank(), dist.get_world_size()
    layer = ct.SyncBatchNorm(3, timeout=20)
    x = torch.ones(4, 5) if rank == size - 1 else torch.randn(4, 3)
    try:
        layer(x)
    except RuntimeError as exc:  # torch's type for a wrong channel count, on every rank
        assert f"{size - 1}" in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {rank}: no RuntimeError for a bad input on rank {size - 1}")
    assert int(layer.num_batches_tracked) == 0
    x = torch.randn(4, 3, dtype=torch.float64) if rank == 0 else torch.randn(4, 3)
    try:
        layer(x)
    except RuntimeError as exc:
        assert "dtype differs" in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {rank}: no RuntimeError for mismatched dtypes")
    layer(torch.randn(4, 3))  # still works
    if rank == 0:
        print(f"OK bad_input on {size} processes", flush=True)


def check_timeout():
    """A process that never arrives: TimeoutError on the other after ``timeout`` seconds."""
    import time
    rank = dist.get_rank()
    if rank == 0:
        layer = ct.SyncBatchNorm(3, timeout=1.5)
        start = time.monotonic()
        try:
            layer(torch.randn(4, 3))
        except TimeoutError as exc:
            waited = time.monotonic() - start
            assert 1.4 < waited < 10, waited
            assert "same number of times" in str(exc), str(exc)
            print(f"OK timeout after {waited:.1f} s: {exc}", flush=True)
        else:
            raise AssertionError("expected TimeoutError")
    else:
        time.sleep(4)  # alive, never calling the layer
    sys.stdout.flush()
    os._exit(0)  # the all_reduce stays pending on rank 0: leave without tearing down gloo


def check_guard():
    """Without init_process_group: the launcher says several, the world resolved has one."""
    layer = ct.SyncBatchNorm(3)
    try:
        layer(torch.randn(4, 3))
    except RuntimeError as exc:
        message = str(exc)
        assert "WORLD_SIZE" in message and "init_process_group" in message, message
        assert "'local'" in message, message
    else:
        raise AssertionError("a silent singleton under torchrun")
    assert int(layer.num_batches_tracked) == 0
    local = ct.SyncBatchNorm(3, process_group="local")
    local(torch.randn(4, 3))  # local statistics on purpose
    numpy_layer = cbn.SyncBatchNorm(3)
    try:
        numpy_layer(np.ones((4, 3)))
    except RuntimeError as exc:
        assert "WORLD_SIZE" in str(exc)
    else:
        raise AssertionError("a silent singleton under torchrun (cbn.SyncBatchNorm)")
    if os.environ.get("RANK") == "0":
        print(f"OK guard: {message}", flush=True)


if __name__ == "__main__":
    names = sys.argv[1:]
    if names != ["guard"]:
        dist.init_process_group("gloo")
    for name in names:
        globals()[f"check_{name}"]()
    if names != ["guard"]:
        dist.barrier()
        dist.destroy_process_group()
