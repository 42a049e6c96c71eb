"""Checks of cbn.torch run under ``mpiexec -n K`` by test_torch_sync.py.

usage: mpiexec -n 3 python -m mpi4py tests/mpi_torch_checks.py CHECK [CHECK ...]

Every rank builds the same model and the same global batch from shared
seeds, keeps its own uneven shard (with 3+ ranks rank 1 holds nothing), and
compares the model converted with ``cbn.torch.convert_sync_batchnorm`` on
the shards with the unconverted torch model on the whole batch.  A failed
check raises, so the rank exits non-zero (``-m mpi4py`` aborts the job) and
mpiexec fails; rank 0 prints "OK <check> on K ranks" per check.
"""

import numpy as np
import torch
from mpi4py import MPI

import cbn
import cbn.torch as ct
from cbn.comm import split_world

from mpi_common import RANK, SIZE, WORLD, CountingComm, run_checks, shard_bounds
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}


def make_model(dtype):
    """Conv2d/BatchNorm2d/ReLU/Linear/BatchNorm1d, the same on every rank."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 6), torch.nn.BatchNorm1d(6, momentum=None),
        torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.to(dtype)


def sgd_step(model, lr=0.1):
    """Plain SGD (torch.optim would import torch._dynamo: seconds per rank)."""
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
            p.grad = None


def close(actual, expected, dtype, what):
    np.testing.assert_allclose(actual.detach().numpy(), expected.detach().numpy(),
                               **TOL[dtype], err_msg=f"rank {RANK}: {what}")


def same_on_every_rank(comm, tensor, what):
    values = comm.allgather(tensor.detach().numpy().copy())
    for r, other in enumerate(values):
        if not np.array_equal(other, values[0]):
            raise AssertionError(f"{what} differs between rank 0 and rank {r}")


def compare(dtype, channels_last=False, steps=3, comm=WORLD, compiled=False):
    """Converted model on the shards == torch model on the whole batch, over SGD steps.

    ``compiled``: the converted model runs under ``torch.compile(fullgraph=True)``
    (the collectives inside cbn's registered operators).
    """
    size, rank = comm.Get_size(), comm.Get_rank()
    counting = CountingComm(comm)
    ref = make_model(dtype)
    sync = module = ct.convert_sync_batchnorm(make_model(dtype), process_group=counting)
    assert isinstance(sync[1], ct.SyncBatchNorm) and isinstance(sync[5], ct.SyncBatchNorm)
    if channels_last:
        ref = ref.to(memory_format=torch.channels_last)
        sync = sync.to(memory_format=torch.channels_last)
    bn2d_outputs = []
    if compiled:
        sync = torch.compile(module, fullgraph=True, backend="aot_eager")
    else:
        module[1].register_forward_hook(lambda m, args, output: bn2d_outputs.append(output))
    data = torch.Generator().manual_seed(1234)
    lo, hi = shard_bounds(13, size, rank)
    per_call = 1 if size > 1 else 0
    for step in range(steps):
        x = torch.randn(13, 3, 5, 5, generator=data, dtype=dtype) * 2 + 1
        cotangent = torch.randn(13, 3, generator=data, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_ref = x.clone().requires_grad_()
        x_shard = x[lo:hi].clone(memory_format=torch.preserve_format).requires_grad_()

        calls = counting.calls
        out = sync(x_shard)
        handshake = 2 * per_call if step == 0 else 0  # each layer's first collective: header only
        assert counting.calls == calls + 2 * per_call + handshake, "one Allreduce per layer forward"
        out_ref = ref(x_ref)
        close(out, out_ref[lo:hi], dtype, f"output, step {step}")
        if channels_last and hi - lo > 1 and not compiled:
            assert bn2d_outputs[-1].is_contiguous(memory_format=torch.channels_last), \
                "the BatchNorm2d output keeps channels-last memory"

        # sum over ranks of the shard losses == the loss of the whole batch
        (out * cotangent[lo:hi]).sum().backward()
        assert counting.calls == calls + 4 * per_call + handshake, "one Allreduce per layer backward"
        (out_ref * cotangent).sum().backward()
        close(x_shard.grad, x_ref.grad[lo:hi], dtype, f"input gradient, step {step}")
        for (name, p), p_ref in zip(module.named_parameters(), ref.parameters()):
            total = torch.from_numpy(comm.allreduce(p.grad.numpy().astype(np.float64)))
            close(total, p_ref.grad.double(), dtype, f"summed gradient of {name}, step {step}")

        ct.allreduce_gradients(module, comm, average=False)
        for (name, p), p_ref in zip(module.named_parameters(), ref.parameters()):
            close(p.grad, p_ref.grad, dtype, f"allreduce_gradients {name}, step {step}")
            same_on_every_rank(comm, p.grad, f"reduced gradient of {name}")
        sgd_step(module), sgd_step(ref)

        for (name, b), b_ref in zip(module.named_buffers(), ref.buffers()):
            if name.endswith("num_batches_tracked"):
                assert int(b) == int(b_ref) == step + 1, (name, b, b_ref)
            else:
                close(b, b_ref, dtype, f"buffer {name}, step {step}")
            same_on_every_rank(comm, b, f"buffer {name}")

    # eval: running statistics, nothing communicated
    module.eval(), ref.eval()
    calls = counting.calls
    x = torch.randn(13, 3, 5, 5, generator=data, dtype=dtype)
    x_shard = x[lo:hi].clone().requires_grad_()
    out = sync(x_shard)
    close(out, ref(x)[lo:hi], dtype, "eval output")
    out.sum().backward()
    assert counting.calls == calls, "eval mode must not communicate"


def check_model_equality():
    compare(torch.float64)
    compare(torch.float32)
    compare(torch.float64, channels_last=True, steps=2)


def check_compiled_model_equality():
    compare(torch.float64, steps=2, compiled=True)


def check_double_backward_refused():
    """create_graph=True through a synchronising step: a RuntimeError on every rank."""
    layer = ct.SyncBatchNorm(3, timeout=30).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    try:
        torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    except RuntimeError as exc:
        assert "double backward" in str(exc), str(exc)
    else:
        raise AssertionError("double backward in a synchronised step must raise")
    layer(x).sum().backward()  # and the layer still works


def check_modified_input_on_one_rank():
    """An input modified in place before backward, on one rank: every rank raises."""
    layer = ct.SyncBatchNorm(3, timeout=30).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    h = x * 1
    y = layer(h)
    if RANK == SIZE - 1:
        with torch.no_grad():
            h.add_(1)
    try:
        y.sum().backward()
    except RuntimeError as exc:
        expected = "modified by an inplace operation" if RANK == SIZE - 1 else f"[{SIZE - 1}]"
        assert expected in str(exc), str(exc)
    else:
        raise AssertionError(f"rank {RANK}: the modified input on rank {SIZE - 1} must raise")
    layer(x).sum().backward()  # and the layer still works


def check_local_batchnorm_differs():
    """The point of it: the unconverted model on the shards gives other outputs."""
    lo, hi = shard_bounds(13, SIZE, RANK)
    x = torch.randn(13, 3, 5, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x = x + torch.arange(13.0, dtype=torch.float64)[:, None, None, None] / 4
    with torch.no_grad():
        ref = make_model(torch.float64)(x)[lo:hi]
        local = make_model(torch.float64)(x[lo:hi]) if hi - lo > 1 else ref + 1
        synced = ct.convert_sync_batchnorm(make_model(torch.float64))(x[lo:hi])
    np.testing.assert_allclose(synced.numpy(), ref.numpy(), rtol=1e-9, atol=1e-11)
    differs = WORLD.allreduce(bool(hi > lo and not torch.allclose(local, ref)), op=MPI.LOR)
    assert differs, "local BatchNorm should differ from the global batch"


def check_bad_input_on_one_rank():
    """A wrong input on the last rank raises on every rank; no state changes, nobody hangs."""
    layer = ct.SyncBatchNorm(3, timeout=30)
    bad = SIZE - 1
    good = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(RANK))
    for bad_x, kind, words in [(torch.ones(4, 5, 2), RuntimeError, "channels"),
                               (torch.ones(4, 3, dtype=torch.int32), TypeError, "floating"),
                               (torch.ones(3), ValueError, "2D")]:
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        try:
            layer(bad_x if RANK == bad else good)
        except kind as exc:
            expected = f"rank {bad}" if RANK == bad else f"[{bad}]"
            assert expected in str(exc) and (RANK != bad or words in str(exc)), str(exc)
        else:
            raise AssertionError(f"rank {RANK}: no {kind.__name__} for a bad input on rank {bad}")
        after = layer.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before), "state changed"
    # one value per channel over the whole group: PyTorch's error on every rank
    try:
        layer(torch.ones(1, 3) if RANK == 0 else torch.ones(0, 3))
    except ValueError as exc:
        assert "Expected more than 1 value per channel" in str(exc), str(exc)
    else:
        raise AssertionError("one value per channel over the group must raise")
    # and the layer still works
    layer(good).sum().backward()
    same_on_every_rank(WORLD, layer.running_mean, "running_mean")


def check_process_groups():
    """Two sub-communicators each synchronise on their own."""
    sub = split_world([[r for r in range(SIZE) if r % 2 == 0],
                       [r for r in range(SIZE) if r % 2 == 1]])
    compare(torch.float64, steps=2, comm=sub)


def check_allreduce_gradients_average():
    """average=True divides by the size; a gradient missing everywhere stays missing."""
    model = torch.nn.Linear(2, 2)
    model.weight.grad = torch.full((2, 2), float(RANK))
    ct.allreduce_gradients(model)
    expected = sum(range(SIZE)) / SIZE
    assert torch.allclose(model.weight.grad, torch.full((2, 2), expected)), model.weight.grad
    assert model.bias.grad is None
    model.bias.grad = torch.ones(2) if RANK == 0 else None  # one rank only: the others get it
    ct.allreduce_gradients(model, average=False)
    assert torch.equal(model.bias.grad, torch.ones(2)), model.bias.grad


if __name__ == "__main__":
    torch.set_num_threads(1)  # ranks may outnumber cores
    run_checks(globals())
