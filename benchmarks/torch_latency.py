"""The eval call of ``cbn.torch`` next to torch's own module call, at batch 1 (``make bench``).

usage: python benchmarks/torch_latency.py [--seconds 3]

For (1, 512) and (1, 64, 56, 56), float32, one thread: ``torch.nn.BatchNorm1d/2d``
in eval and the same module converted by ``cbn.torch.convert_sync_batchnorm``,
called under ``torch.no_grad()`` (as a service would) and with parameters that
require grad (as inside a model being trained, then evaluated), interleaved
call by call in one process; the medians, in µs.  Both outputs are compared
before timing.  This row is the per-call overhead of the torch integration.
"""
import argparse
import copy
import time

import numpy as np
import torch

import cbn
import cbn.torch

SHAPES = [(1, 512), (1, 64, 56, 56)]


def modules(shape):
    torch.manual_seed(0)
    c = shape[1]
    native = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(c)
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5)
        native.bias.uniform_(-0.5, 0.5)
        native.running_mean.uniform_(-0.5, 0.5)
        native.running_var.uniform_(0.5, 1.5)
    native.eval()
    converted = cbn.torch.convert_sync_batchnorm(copy.deepcopy(native)).eval()
    return native, converted


def interleaved(calls, seconds):
    """Median µs of each call, alternating call by call (batches of 20) for ``seconds``."""
    for call in calls.values():
        for _ in range(50):
            call()
    samples = {name: [] for name in calls}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(20):
                call()
            samples[name].append((time.perf_counter() - start) / 20)
    return {name: 1e6 * float(np.median(times)) for name, times in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cbn.set_num_threads(1)
    print("\ncbn.torch eval call vs torch's module call, batch 1, float32, 1 thread "
          "(median µs, interleaved)")
    print(f"{'shape':<16} {'autograd':<26} {'torch us':>9} {'cbn.torch us':>13} {'vs torch':>9}")
    for shape in SHAPES:
        native, converted = modules(shape)
        x = torch.randn(shape)
        with torch.no_grad():
            difference = float((native(x) - converted(x)).abs().max())
        assert difference < 1e-5, f"cbn.torch differs from torch by {difference} on {shape}"
        for label, grad in (("no_grad", False), ("parameters require grad", True)):
            def call(module, grad=grad):
                if grad:
                    return lambda: module(x)
                def no_grad_call():
                    with torch.no_grad():
                        return module(x)
                return no_grad_call
            times = interleaved({"torch": call(native), "cbn.torch": call(converted)},
                                args.seconds)
            print(f"{str(shape):<16} {label:<26} {times['torch']:>9.1f} "
                  f"{times['cbn.torch']:>13.1f} {times['torch'] / times['cbn.torch']:>8.2f}x")


if __name__ == "__main__":
    main()
