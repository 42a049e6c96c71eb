"""Data-parallel training of a PyTorch CNN under torchrun: DDP for gradients, cbn for statistics.

usage: torchrun --nproc_per_node N mpi_examples/torchrun_train.py [--epochs 6] [--batch 64]
                                                                  [--check] [--threads 1]
       e.g. torchrun --nproc_per_node 2 mpi_examples/torchrun_train.py --check

A plain ``torch.nn`` CNN (conv -> BatchNorm2d -> ReLU -> conv -> BatchNorm2d -> ReLU -> pool
-> linear -> BatchNorm1d -> ReLU -> linear) on scikit-learn's digits (synthetic
fallback).  ``torch.distributed.init_process_group("gloo")`` joins the
processes torchrun started; ``cbn.torch.convert_sync_batchnorm`` turns the
batch-norm layers into ``cbn.torch.SyncBatchNorm``, whose default process
group is then torch.distributed's WORLD (no mpi4py needed); and
``DistributedDataParallel`` averages the gradients.  Each process takes an
uneven shard of every global batch (process r a share proportional to r + 1);
its loss is its shard's summed loss times ``world_size / global_batch``, so
that DDP's average is the gradient of the global batch's mean loss.

``--check`` trains in float64 and then, on process 0, trains the unconverted
model in one process on the whole global batches from the same initial
weights, and prints the largest differences in loss, parameters and running
statistics (they must be below 1e-8).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cbn  # noqa: E402
import cbn.torch  # noqa: E402
from data import load_dataset, uneven_shard  # noqa: E402
from torch_model import build_model, state  # noqa: E402

nn = torch.nn


def train(model, data, args, shard, scale, progress):
    """Train on this process's shard of every global batch; per-epoch (loss, accuracy, s)."""
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in data)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    history = []
    for epoch in range(args.epochs):
        model.train()
        start = time.perf_counter()
        order = np.random.default_rng(100 + epoch).permutation(len(y_train))
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        for first in range(0, len(order) - args.batch + 1, args.batch):
            batch = order[first:first + args.batch]
            lo, hi = shard(len(batch))
            x, y = x_train[batch[lo:hi]], y_train[batch[lo:hi]]
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            optimizer.zero_grad()
            (loss * scale / len(batch)).backward()
            optimizer.step()
            totals += torch.tensor([loss.item(), (logits.argmax(1) == y).sum().item(), hi - lo],
                                   dtype=torch.float64)
        if scale > 1:  # several processes: sum the metrics
            dist.all_reduce(totals)
        model.eval()
        with torch.no_grad():
            test_accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
        history.append((float(totals[0] / totals[2]), float(totals[1] / totals[2]),
                        test_accuracy, time.perf_counter() - start))
        progress(epoch, history[-1])
    return history


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--check", action="store_true",
                        help="prove (float64) that N processes equal 1 on the global batch")
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cbn.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    dtype = torch.float64 if args.check else torch.float32
    x_train, y_train, x_test, y_test, name = load_dataset()
    images = np.float64 if args.check else np.float32
    data = (x_train.astype(images), y_train, x_test.astype(images), y_test)

    def say(*text):
        if rank == 0:
            print(*text, flush=True)

    def progress(epoch, h):
        say(f"epoch {epoch + 1:2d}/{args.epochs}  loss {h[0]:.4f}  train acc {100 * h[1]:5.1f}%"
            f"  test acc {100 * h[2]:5.1f}%  {h[3]:5.2f} s")

    sizes = [uneven_shard(args.batch, r, size)[1] - uneven_shard(args.batch, r, size)[0]
             for r in range(size)]
    say(f"cbn {cbn.__version__} + torch {torch.__version__}: {size} process(es) (gloo), "
        f"data: {name}; global batch {args.batch}, shards {sizes}")
    model = cbn.torch.convert_sync_batchnorm(build_model(dtype))  # process_group: WORLD
    ddp = nn.parallel.DistributedDataParallel(model)
    history = train(ddp, data, args, lambda n: uneven_shard(n, rank, size), size, progress)
    if args.check:
        synced = state(model)
        everywhere = [None] * size
        dist.all_gather_object(everywhere, synced)
        if rank == 0:
            say("\n== 1 process, torch.nn.BatchNorm on the whole global batch")
            single = build_model(torch.float64)
            single_history = train(single, data, args, lambda n: (0, n), 1,
                                   lambda epoch, h: None)
            reference = state(single)
            stats = [k for k in reference if "running" in k]
            d_loss = max(abs(a[0] - b[0]) for a, b in zip(history, single_history))
            d_params = max(float(np.abs(synced[k] - reference[k]).max())
                           for k in reference if k not in stats)
            d_stats = max(float(np.abs(synced[k] - reference[k]).max()) for k in stats)
            rel = max(float(np.abs(synced[k] - reference[k]).max()
                            / max(np.abs(reference[k]).max(), 1e-300)) for k in reference)
            same = all(np.array_equal(other[k], synced[k]) for other in everywhere
                       for k in synced)
            say(f"largest difference over {args.epochs} epochs: loss {d_loss:.3e}, parameters "
                f"{d_params:.3e}, running statistics {d_stats:.3e} (max relative {rel:.3e})")
            say(f"parameters and running statistics identical in every process: {same}")
            ok = max(d_loss, d_params, d_stats) < 1e-8 and same
            say("check passed: torchrun + DDP + cbn.torch.SyncBatchNorm equals one process on "
                "the global batch" if ok else "CHECK FAILED")
        else:
            ok = True
        verdict = torch.tensor([0.0 if ok else 1.0])
        dist.all_reduce(verdict)
        if verdict.item():
            sys.exit(1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
