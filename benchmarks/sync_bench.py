"""SyncBatchNorm rows of ``make bench``: one training call at 1, 2 and 4 ranks.

usage: python benchmarks/sync_bench.py            (launches mpiexec -n 1, 2, 4 itself)
       mpiexec -n 4 python -m mpi4py benchmarks/sync_bench.py --worker

For C = 64, 256 and 2048 with a ResNet-like per-rank batch, each rank times a
training step (forward + backward) of ``cbn.SyncBatchNorm``, median over
repeated calls after warm-up, and separately the two ``Allreduce`` calls of
that step on buffers of the same sizes; their ratio is the communication
share.  Ranks beyond the machine's cores are oversubscribed (4 ranks on 2
cores here): such rows show correctness of the set-up and the cost of the
collectives under contention, not scaling.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CASES = [(64, (16, 64, 28, 28)), (256, (16, 256, 14, 14)), (2048, (16, 2048, 7, 7))]
RANKS = (1, 2, 4)


def median_seconds(call, comm, repeats=30, warmup=3):
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        comm.Barrier()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def worker():
    from mpi4py import MPI

    import cbn
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    cbn.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    rows = []
    for c, shape in CASES:
        rng = np.random.default_rng(comm.Get_rank())
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        layer = cbn.SyncBatchNorm(c)

        def step():
            layer(x)
            layer.backward(dy)

        total = median_seconds(step, comm)
        forward_buffer = np.zeros(size + 1 + 2 * c)
        backward_buffer = np.zeros(size + 2 * c)

        def collectives():
            comm.Allreduce(MPI.IN_PLACE, forward_buffer)
            comm.Allreduce(MPI.IN_PLACE, backward_buffer)

        communication = median_seconds(collectives, comm) if size > 1 else 0.0
        total = comm.allreduce(total, op=MPI.MAX)
        communication = comm.allreduce(communication, op=MPI.MAX)
        rows.append(dict(channels=c, per_rank_batch=list(shape), ranks=size,
                         step_ms=total * 1e3, allreduce_ms=communication * 1e3,
                         communication_share=communication / total))
    if comm.Get_rank() == 0:
        print(json.dumps(rows), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help="run inside mpiexec")
    parser.add_argument("--json", default=str(HERE / "results" / "sync_bench.json"))
    args = parser.parse_args()
    if args.worker:
        return worker()
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else "mpiexec"
    rows = []
    for n in RANKS:
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        done = subprocess.run([mpiexec, "-n", str(n), sys.executable, "-m", "mpi4py",
                               __file__, "--worker"], capture_output=True, text=True,
                              timeout=300, env=env)
        if done.returncode != 0:
            print(f"SyncBatchNorm bench on {n} ranks failed:\n{done.stderr}")
            return 1
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nSyncBatchNorm, one training step (forward + backward), float32, "
          f"{os.cpu_count()} cores (ranks beyond that are oversubscribed)")
    print(f"{'C':>5} {'per-rank batch':>18} {'ranks':>5} {'step ms':>8} "
          f"{'2x Allreduce ms':>15} {'comm share':>10}")
    for r in rows:
        print(f"{r['channels']:>5} {str(tuple(r['per_rank_batch'])):>18} {r['ranks']:>5} "
              f"{r['step_ms']:>8.3f} {r['allreduce_ms']:>15.3f} "
              f"{100 * r['communication_share']:>9.1f}%")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
