"""Data-parallel training of a small NumPy CNN with cbn.SyncBatchNorm.

usage: mpiexec -n 4 python -m mpi4py mpi_examples/train.py [--epochs 8] [--batch 16]
                                                          [--check] [--plot PATH]

Each rank takes a shard of every global batch (shards may be uneven: with 4
ranks and a global batch of 16, ranks hold 2, 3, 5 and 6 samples),
SyncBatchNorm normalises with the statistics of the global batch, and the
parameter gradients are summed with one Allreduce.  The network:

    conv 3x3 (1 -> 16) -> BatchNorm2d -> ReLU -> avg-pool 2x2
    -> linear (256 -> 64) -> BatchNorm1d -> ReLU -> linear (64 -> 10)

on scikit-learn's handwritten digits (no download; synthetic fallback).
Three runs train from the same initial weights on the same global batches:
N ranks with SyncBatchNorm, N ranks with plain local BatchNorm, and one
process with the whole batch.  Per-rank batches this small are where local
statistics hurt: local BatchNorm ends with a visibly lower test accuracy,
while SyncBatchNorm follows the one-process run.  ``--check`` proves (in
float64) that the first run equals the third and the second does not.

The plot (training loss and test accuracy per epoch, needs matplotlib) goes
to ``--plot`` (default: loss_curves.png beside this script; ``--plot ''``
draws none).
"""
import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # data.py sits beside this script
import cbn  # noqa: E402
from data import load_dataset, uneven_shard  # noqa: E402


class Conv3x3:
    """3x3 convolution, padding 1, via im2col; its output is channels-last in memory."""

    def __init__(self, c_in, c_out, rng, dtype):
        scale = np.sqrt(2.0 / (9 * c_in))
        self.weight = (rng.standard_normal((c_out, c_in * 9)) * scale).astype(dtype)
        self.bias = np.zeros(c_out, dtype)

    def forward(self, x):
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
        n, c, h, w = x.shape
        self.cols = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * 9)
        out = self.cols @ self.weight.T + self.bias           # (N*H*W, C_out)
        return np.moveaxis(out.reshape(n, h, w, -1), -1, 1)   # (N, C, H, W), channels-last

    def backward(self, dy):
        dy = np.moveaxis(dy, 1, -1).reshape(-1, self.weight.shape[0])
        self.grads = [dy.T @ self.cols, dy.sum(axis=0)]

    def params(self):
        return [self.weight, self.bias]


class Linear:
    def __init__(self, c_in, c_out, rng, dtype):
        self.weight = (rng.standard_normal((c_out, c_in)) * np.sqrt(2.0 / c_in)).astype(dtype)
        self.bias = np.zeros(c_out, dtype)

    def forward(self, x):
        self.x = x
        return x @ self.weight.T + self.bias

    def backward(self, dy):
        self.grads = [dy.T @ self.x, dy.sum(axis=0)]
        return dy @ self.weight

    def params(self):
        return [self.weight, self.bias]


class Net:
    """The CNN; ``norm(num_features, dtype, dims)`` builds its batch-norm layers
    (``dims`` 2 after the convolution, 1 after the linear layer)."""

    def __init__(self, norm, dtype, seed=0):
        rng = np.random.default_rng(seed)
        self.conv = Conv3x3(1, 16, rng, dtype)
        self.bn2d = norm(16, dtype, 2)
        self.fc1 = Linear(16 * 4 * 4, 64, rng, dtype)
        self.bn1d = norm(64, dtype, 1)
        self.fc2 = Linear(64, 10, rng, dtype)

    def forward(self, x):
        h = self.bn2d(self.conv.forward(x))
        self.mask2d = h > 0
        h = h * self.mask2d
        n = h.shape[0]
        h = h.reshape(n, 16, 4, 2, 4, 2).mean(axis=(3, 5)).reshape(n, -1)  # avg-pool 2x2
        h = self.bn1d(self.fc1.forward(h))
        self.mask1d = h > 0
        return self.fc2.forward(h * self.mask1d)

    def backward(self, dlogits):
        dh = self.fc2.backward(dlogits) * self.mask1d
        dh = self.fc1.backward(self.bn1d.backward(dh))
        n = dh.shape[0]
        dh = np.repeat(np.repeat(dh.reshape(n, 16, 4, 1, 4, 1), 2, axis=3), 2, axis=5) / 4
        dh = dh.reshape(n, 16, 8, 8) * self.mask2d
        self.conv.backward(self.bn2d.backward(dh))

    def params(self):
        return (self.conv.params() + [self.bn2d.weight, self.bn2d.bias] + self.fc1.params()
                + [self.bn1d.weight, self.bn1d.bias] + self.fc2.params())

    def grads(self):
        return (self.conv.grads + [self.bn2d.grad_weight, self.bn2d.grad_bias] + self.fc1.grads
                + [self.bn1d.grad_weight, self.bn1d.grad_bias] + self.fc2.grads)

    def statistics(self):
        return [self.bn2d.running_mean, self.bn2d.running_var,
                self.bn1d.running_mean, self.bn1d.running_var]

    def train(self, mode=True):
        self.bn2d.train(mode), self.bn1d.train(mode)


def cross_entropy(logits, labels, global_batch):
    """(sum of losses, correct count, dlogits of the mean loss over the global batch)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(len(labels))
    grad = np.exp(log_p)
    grad[rows, labels] -= 1
    return -log_p[rows, labels].sum(), (log_p.argmax(axis=1) == labels).sum(), grad / global_batch


def train(net, data, args, comm, shard):
    """Train ``net`` on this rank's shard of every global batch; returns per-epoch history.

    ``comm`` sums gradients and metrics (None: a single process).
    """
    x_train, y_train = data[0], data[1]
    history = []
    lr, beta = args.lr, 0.9
    velocity = [np.zeros_like(p) for p in net.params()]
    for epoch in range(args.epochs):
        start = time.perf_counter()
        order = np.random.default_rng(100 + epoch).permutation(len(y_train))
        totals = np.zeros(3)  # loss sum, correct, count
        for first in range(0, len(order) - args.batch + 1, args.batch):
            batch = order[first:first + args.batch]
            lo, hi = shard(len(batch))
            x, y = x_train[batch[lo:hi]], y_train[batch[lo:hi]]
            loss, correct, dlogits = cross_entropy(net.forward(x), y, len(batch))
            net.backward(dlogits.astype(x.dtype))
            grads = np.concatenate([g.ravel() for g in net.grads()]
                                   + [np.array([loss, correct, hi - lo])]).astype(np.float64)
            if comm is not None:
                comm.Allreduce(MPI.IN_PLACE, grads)
            totals += grads[-3:]
            offset = 0
            for p, v in zip(net.params(), velocity):
                g = grads[offset:offset + p.size].reshape(p.shape)
                offset += p.size
                v *= beta
                v += g
                p -= (lr * v).astype(p.dtype)
        history.append((totals[0] / totals[2], totals[1] / totals[2],
                        time.perf_counter() - start, evaluate(net, data)))
        if args.progress is not None:
            args.progress(epoch, history[-1])
    return history


def evaluate(net, data):
    net.train(False)
    logits = net.forward(data[2])
    net.train(True)
    return float((logits.argmax(axis=1) == data[3]).mean())


def max_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(p, np.float64) - q))) for p, q in zip(a, b))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="global batch size")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--check", action="store_true",
                        help="prove (in float64) that SyncBatchNorm on N ranks equals 1 process")
    parser.add_argument("--plot", default=os.path.join(HERE, "loss_curves.png"),
                        help="where to write the plot ('' for none; default: beside this script)")
    args = parser.parse_args()
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    smallest = min(hi - lo for lo, hi in (uneven_shard(args.batch, r, size) for r in range(size)))
    if smallest < 2:  # local BatchNorm cannot train on one sample per channel
        parser.error(f"--batch {args.batch} gives a rank of {size} only {smallest} sample(s); "
                     f"use at least {-(-3 * size * (size + 1) // 4)}")
    cbn.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dtype = np.float64 if args.check else np.float32
    data = load_dataset()
    data = (data[0].astype(dtype), data[1], data[2].astype(dtype), data[3], data[4])

    def shard(n):
        return uneven_shard(n, rank, size)

    def say(*text):
        if rank == 0:
            print(*text, flush=True)

    say(f"cbn {cbn.__version__}: {size} ranks, data: {data[4]}; "
        f"{len(data[1])} train / {len(data[3])} test images, global batch {args.batch}, "
        f"{args.epochs} epochs, {np.dtype(dtype).name}")
    say(f"samples per rank in a global batch of {args.batch}: "
        f"{[hi - lo for lo, hi in world.allgather(shard(args.batch))]}")
    local_norm = {1: cbn.BatchNorm1d, 2: cbn.BatchNorm2d}
    runs = {}
    plans = [
        ("single", "1 process, whole batch",
         lambda c, d, dims: local_norm[dims](c, dtype=d), None, lambda n: (0, n)),
        ("sync", f"{size} ranks, SyncBatchNorm",
         lambda c, d, dims: cbn.SyncBatchNorm(c, dtype=d), world, shard),
        ("local", f"{size} ranks, local BatchNorm",
         lambda c, d, dims: local_norm[dims](c, dtype=d), world, shard),
    ]
    for key, title, norm, comm, split in plans:
        if comm is not None or rank == 0:  # the single-process run happens on rank 0 alone
            say(f"\n== {title}")
            args.progress = lambda epoch, h: say(
                f"epoch {epoch + 1:2d}/{args.epochs}  loss {h[0]:.4f}  "
                f"train acc {100 * h[1]:5.1f}%  test acc {100 * h[3]:5.1f}%  {h[2]:.2f} s")
            net = Net(norm, dtype)
            history = train(net, data, args, comm, split)
            runs[key] = (net, history, history[-1][3])
            say(f"test accuracy {100 * history[-1][3]:.1f}%")
        if comm is None:
            wait_for_all(world)  # the other ranks sleep while rank 0 trains alone

    say("\n== test accuracy after training (the test set is evaluated with running statistics)")
    for key, title, *_ in plans:
        if key in runs:
            say(f"{title:<30} {100 * runs[key][2]:5.1f}%")
    if args.check:
        check(runs, say, world)
    if rank == 0 and args.plot:
        plot(runs, plans, args, say)


def wait_for_all(world):
    """A barrier that sleeps instead of spinning, so waiting ranks leave the cores free."""
    request = world.Ibarrier()
    while not request.Test():
        time.sleep(0.005)


def check(runs, say, world):
    """Rank 0 compares the runs; every rank learns the verdict."""
    sync, local = runs["sync"][0], runs["local"][0]
    every_rank = world.gather(sync.statistics(), root=0)
    ok = True
    if world.Get_rank() == 0:
        single = runs["single"][0]
        loss = max(abs(a[0] - b[0]) for a, b in zip(runs["sync"][1], runs["single"][1]))
        d_params = max_difference(sync.params(), single.params())
        d_stats = max_difference(sync.statistics(), single.statistics())
        d_local = max_difference(local.params(), single.params())
        same = all(np.array_equal(a, b) for stats in every_rank
                   for a, b in zip(stats, every_rank[0]))
        say("\n== --check (float64): SyncBatchNorm on the shards vs 1 process on the global batch")
        say(f"largest difference: loss {loss:.3e}, parameters {d_params:.3e}, "
            f"running statistics {d_stats:.3e}; statistics identical on every rank: {same}")
        say(f"local BatchNorm vs 1 process: parameters differ by {d_local:.3e}")
        ok = max(loss, d_params, d_stats) < 1e-8 and d_local > 1e-3 and same
        say("CHECK PASSED: SyncBatchNorm equals the global batch; local BatchNorm does not"
            if ok else "CHECK FAILED")
    if not world.bcast(ok, root=0):
        world.Abort(1)


STYLES = {  # SyncBatchNorm lies on the one-process curve: dashes and markers keep both visible
    "single": dict(color="0.35", linestyle="-", linewidth=4, alpha=0.45),
    "sync": dict(color="tab:blue", linestyle="--", linewidth=1.6, marker="o", markersize=4),
    "local": dict(color="tab:red", linestyle="-", linewidth=1.6, marker="s", markersize=4),
}


def plot(runs, plans, args, say):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("(matplotlib not installed: no plot; pip install matplotlib)")
        return
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, title, *_ in plans:
        history = runs[key][1]
        epochs = range(1, len(history) + 1)
        loss_ax.plot(epochs, [h[0] for h in history], label=title, **STYLES[key])
        acc_ax.plot(epochs, [100 * h[3] for h in history], label=title, **STYLES[key])
    loss_ax.set(xlabel="epoch", ylabel="training loss", yscale="log",
                title="training loss (batch statistics)")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (%)",
               title="test accuracy (running statistics)")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    size = MPI.COMM_WORLD.Get_size()
    shards = [hi - lo for lo, hi in (uneven_shard(args.batch, r, size) for r in range(size))]
    fig.suptitle(f"cbn: global batch {args.batch}, {shards} samples per rank")
    fig.tight_layout()
    try:
        fig.savefig(args.plot, dpi=100)
    except OSError as exc:
        say(f"(could not write the plot to {args.plot}: {exc})")
    else:
        say(f"plot: {os.path.abspath(args.plot)}")
    plt.close(fig)


if __name__ == "__main__":
    main()
