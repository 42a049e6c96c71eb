"""Data-parallel training of a PyTorch CNN on CPU ranks with cbn.torch.SyncBatchNorm.

usage: mpiexec -n N python -m mpi4py mpi_examples/torch_train.py [--epochs 8] [--batch 64]
                                                                  [--check] [--threads 1]
       e.g. mpiexec -n 4 python -m mpi4py mpi_examples/torch_train.py --check

The model is plain ``torch.nn``:

    conv 3x3 (1 -> 16) -> BatchNorm2d -> ReLU -> conv 3x3 (16 -> 32) -> BatchNorm2d -> ReLU
    -> max-pool 2x2 -> linear (512 -> 64) -> BatchNorm1d -> ReLU -> linear (64 -> 10)

and ``cbn.torch.convert_sync_batchnorm`` turns its batch-norm layers into
``cbn.torch.SyncBatchNorm`` (``torch.nn.SyncBatchNorm`` refuses CPU tensors).
Each rank takes an uneven shard of every global batch (rank r gets a share
proportional to r + 1), its loss is its share of the global batch's mean
loss, and ``cbn.torch.allreduce_gradients`` sums the gradients in one
Allreduce per step.  Data: scikit-learn's handwritten digits (no download;
synthetic fallback).

``--check`` trains in float64 three ways from the same initial weights on
the same global batches: N ranks with SyncBatchNorm, N ranks with the
unconverted model (local BatchNorm), and one process with the unconverted
model on the whole batch.  It proves that the first equals the third (loss,
parameters, running statistics, on every rank) and that the second does not.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cbn  # noqa: E402
import cbn.torch  # noqa: E402
from data import load_dataset, uneven_shard  # noqa: E402
from torch_model import build_model, state  # noqa: E402

nn = torch.nn


def train(model, data, args, comm, shard, progress):
    """Train on this rank's shard of every global batch; returns per-epoch history.

    ``comm`` sums gradients and metrics (None: a single process).  A history
    entry is (mean loss, train accuracy, test accuracy, seconds, step times).
    """
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in data[:4])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    history = []
    for epoch in range(args.epochs):
        model.train()
        start = time.perf_counter()
        order = np.random.default_rng(100 + epoch).permutation(len(y_train))
        totals = np.zeros(3)  # loss sum, correct, count
        steps = []
        for first in range(0, len(order) - args.batch + 1, args.batch):
            batch = order[first:first + args.batch]
            lo, hi = shard(len(batch))
            x, y = x_train[batch[lo:hi]], y_train[batch[lo:hi]]
            step_start = time.perf_counter()
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            (loss / len(batch)).backward()  # this rank's share of the global mean loss
            if comm is not None:
                cbn.torch.allreduce_gradients(model, comm, average=False)
            optimizer.step()
            optimizer.zero_grad()
            steps.append(time.perf_counter() - step_start)
            totals += [loss.item(), (logits.argmax(1) == y).sum().item(), hi - lo]
        if comm is not None:
            comm.Allreduce(MPI.IN_PLACE, totals)
        model.eval()
        with torch.no_grad():  # every rank holds the same model: no need to split the test set
            test_accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
        history.append((totals[0] / totals[2], totals[1] / totals[2], test_accuracy,
                        time.perf_counter() - start, steps))
        progress(epoch, history[-1])
    return history


def max_difference(a, b, keys=None):
    keys = a.keys() if keys is None else keys
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in keys)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--check", action="store_true",
                        help="prove (in float64) that N ranks equal 1 process on the global batch")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads per rank for torch and for cbn (default 1)")
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    # One thread each by default: ranks may outnumber cores, this model is too
    # small to gain from threads, and torch's and cbn's OpenMP runtimes
    # spinning for the same cores slow each other down (4 ms vs 20 ms a step
    # with 2 threads each on 2 busy cores).
    threads = args.threads
    torch.set_num_threads(threads)
    cbn.set_num_threads(threads)
    dtype = torch.float64 if args.check else torch.float32
    x_train, y_train, x_test, y_test, name = load_dataset()
    images = np.float64 if args.check else np.float32
    data = (x_train.astype(images), y_train, x_test.astype(images), y_test)

    def shard(n):
        return uneven_shard(n, rank, size)

    def say(*text):
        if rank == 0:
            print(*text, flush=True)

    def progress(epoch, h):
        say(f"epoch {epoch + 1:2d}/{args.epochs}  loss {h[0]:.4f}  train acc {100 * h[1]:5.1f}%  "
            f"test acc {100 * h[2]:5.1f}%  {h[3]:5.2f} s  (step {1e3 * np.median(h[4]):.1f} ms)")

    say(f"cbn {cbn.__version__} + torch {torch.__version__}: {size} rank(s), "
        f"{threads} thread(s) each; data: {name}")
    say(f"{len(y_train)} train / {len(y_test)} test images, global batch {args.batch} "
        f"(shards {[hi - lo for lo, hi in world.allgather(shard(args.batch))]}), "
        f"{args.epochs} epochs, {str(dtype).split('.')[1]}")

    say(f"\n== {size} rank(s), cbn.torch.SyncBatchNorm")
    model = cbn.torch.convert_sync_batchnorm(build_model(dtype))
    history = train(model, data, args, world, shard, progress)
    steps = np.concatenate([h[4] for h in history[1:]] or [history[0][4]])  # skip warm-up
    say(f"one training step (forward, backward, gradient Allreduce, SGD), global batch "
        f"{args.batch} on {size} rank(s): median {1e3 * np.median(steps):.1f} ms")
    if args.check:
        check(model, history, data, args, world, shard, say)


def check(model, history, data, args, world, shard, say):
    """Rank 0 compares the SyncBatchNorm run with the global batch; every rank learns it."""
    quiet = lambda epoch, h: None  # noqa: E731
    say(f"\n== {world.Get_size()} rank(s), torch.nn.BatchNorm on the shards (no conversion)")
    local = build_model(torch.float64)
    local_history = train(local, data, args, world, shard, quiet)
    say(f"final loss {local_history[-1][0]:.4f}")
    synced_on_every_rank = world.gather(state(model), root=0)
    ok = True
    if world.Get_rank() == 0:
        say("\n== 1 process, torch.nn.BatchNorm on the whole global batch")
        single = build_model(torch.float64)
        single_history = train(single, data, args, None, lambda n: (0, n), quiet)
        say(f"final loss {single_history[-1][0]:.4f}")
        synced, reference = state(model), state(single)
        statistics = [k for k in reference if "running" in k]
        parameters = [k for k in reference if k not in statistics]
        d_loss = max(abs(a[0] - b[0]) for a, b in zip(history, single_history))
        d_params = max_difference(synced, reference, parameters)
        d_stats = max_difference(synced, reference, statistics)
        d_local = max_difference(state(local), reference, parameters)
        same = all(np.array_equal(other[k], synced[k])
                   for other in synced_on_every_rank for k in synced)
        say("\n== --check (float64): SyncBatchNorm on the shards vs 1 process on the global batch")
        say(f"largest difference over {args.epochs} epochs: loss {d_loss:.3e}, "
            f"parameters {d_params:.3e}, running statistics {d_stats:.3e}")
        say(f"parameters and running statistics identical on every rank: {same}")
        say(f"local BatchNorm on the shards vs 1 process: parameters differ by {d_local:.3e}")
        ok = max(d_loss, d_params, d_stats) < 1e-8 and same and d_local > 1e-3
        say("CHECK PASSED: SyncBatchNorm equals the global batch; local BatchNorm does not"
            if ok else "CHECK FAILED")
    if not world.bcast(ok, root=0):
        world.Abort(1)


if __name__ == "__main__":
    main()
