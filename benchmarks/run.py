"""cbn against PyTorch and NumPy: ``make bench``, or ``python benchmarks/run.py --help``.

For each case of ``cases.py`` and each thread count, cbn, PyTorch (when
installed) and a plain NumPy twin are timed in this one process, interleaved:
after a warm-up, every round calls each implementation once, in a random
order, until the case's time budget is spent; the table shows the median.  Calls shorter than 0.2 ms are timed in batches of several calls.
Alongside: effective GB/s under the byte model of ``cases.py``, its share of
the copy bandwidth (``np.copyto`` of 200 MB, measured in this run before every
row), minor page faults per call (``getrusage``), and the speed-up over
PyTorch.  Outputs: the table on the terminal, ``benchmarks/results/bench.json``,
``bench.md`` (the table in Markdown) and ``bench.png`` (when matplotlib
imports), and which of the issue's targets (``targets.py``) are met.

Threads: ``cbn.set_num_threads(n)`` and ``torch.set_num_threads(n)``; NumPy's
elementwise code is single-threaded whatever ``n`` is.

OpenMP: PyTorch wheels ship their own ``libgomp.so.1`` and cbn links the
system's.  Both have the same soname, so the dynamic loader keeps whichever is
loaded first and both libraries share that one runtime (checked in
/proc/self/maps): there are not two runtimes fighting in this process.  We
import torch before cbn, so torch runs with the runtime it was built with; the
loaded libgomp is printed and recorded in the JSON.

What did bite is spin-waiting. With libgomp's default policy an idle worker
spins for a while after each parallel region. On this 2-core machine, shared
with other processes, runs at 2 threads were intermittently 5-15x slower than
usual, for cbn and torch alike and whether or not the other library was
interleaved: cbn train forward (32,64,56,56) took 24 ms instead of about 2.2
ms, torch 32 ms instead of about 7 ms. Under the same background load,
2-thread rows took 25-72 ms with the default policy and 12-16 ms with
``OMP_WAIT_POLICY=PASSIVE`` (idle workers sleep at once; each parallel region
then pays a futex wake-up, in both libraries alike). So the script sets
``OMP_WAIT_POLICY=PASSIVE`` before anything loads OpenMP, unless the caller
already set it (``--omp-wait-policy default`` keeps libgomp's own). Each run
also times cbn and torch alone and interleaved on one case and prints both,
and reports how much CPU other processes took during the run: above 10% the
numbers are flagged as unreliable.

The price of PASSIVE: on a quiet machine the large rows time the same under
both policies, but a small call at 2 threads pays the wake-up.  Eval of
(1,64,56,56) at 2 threads took 99 us (cbn) and 82 us (torch) with PASSIVE,
20 us and 32 us with the default.  On a dedicated machine,
``--omp-wait-policy default`` shows those.
"""
import argparse
import gc
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

WARMUP_CALLS = 3          # untimed calls of each implementation before timing
MIN_SAMPLE_SECONDS = 2e-4  # shorter calls are timed in batches of at least this long
MIN_ROUNDS = 5
MAX_ROUNDS = 400
COPY_BYTES = 200_000_000   # the copy-bandwidth probe: np.copyto of this many bytes
COPY_REPEATS = 3
OPENMP_CHECK_CASE = "2d-train-nchw-32"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts to run at (default: 1 2)")
    parser.add_argument("--cases", nargs="+", default=None, metavar="SUBSTRING",
                        help="run only the cases whose key or title contains one of these "
                             "(sweep keys: r50-fwdbwd-cl-256x14 ...; 'resnet' selects the "
                             "ResNet-50 model rows)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="time budget per case and thread count (default: 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 0.3 s per case, fewer rounds")
    parser.add_argument("--sweep-seconds", type=float, default=1.5,
                        help="time budget per ResNet-50 sweep row and thread count (default: 1.5)")
    parser.add_argument("--no-sweep", action="store_true",
                        help="leave out the ResNet-50 shape sweep (the r50-* cases)")
    parser.add_argument("--no-resnet", action="store_true",
                        help="leave out the ResNet-50 model (training step, batch-1 eval)")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--no-numpy", action="store_true", help="leave the NumPy twin out")
    parser.add_argument("--omp-wait-policy", choices=["passive", "active", "default"],
                        default="passive",
                        help="OMP_WAIT_POLICY for both libraries (default: passive, see the "
                             "docstring); an OMP_WAIT_POLICY already in the environment wins")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"directory for bench.json/.md/.png (default: {RESULTS})")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser.parse_args(argv)


def configure_openmp(policy):
    """Set OMP_WAIT_POLICY unless the caller did; must run before libgomp loads."""
    if policy != "default":
        os.environ.setdefault("OMP_WAIT_POLICY", policy.upper())
    return os.environ.get("OMP_WAIT_POLICY", "unset (libgomp default)")


def import_torch(wanted):
    if not wanted:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


def loaded_openmp_runtimes():
    """Paths of the OpenMP runtimes mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return []
    return sorted(p for p in paths if p.startswith("/"))


def machine():
    """The CPU as lscpu names it: model, cores, caches, hypervisor."""
    info = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        output = ""
    wanted = {"Model name": "model", "CPU family": "family", "Model": "model_number",
              "CPU(s)": "cpus", "Thread(s) per core": "threads_per_core",
              "L2 cache": "l2", "L3 cache": "l3", "Hypervisor vendor": "hypervisor"}
    for line in output.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in wanted:
            info[wanted[name.strip()]] = value.strip()
    return info


def describe_machine(info):
    text = f"{info.get('model', platform.processor() or 'unknown CPU')}"
    if "family" in info:
        text += f" (family {info['family']}, model {info.get('model_number', '?')})"
    text += f", {info.get('cpus', info['cpu_count'])} cores"
    if "l2" in info:
        text += f", L2 {info['l2']}"
    if "l3" in info:
        text += f", L3 {info['l3']}"
    if "hypervisor" in info:
        text += f", {info['hypervisor']} guest"
    return text


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(calls, budget, min_rounds=MIN_ROUNDS, max_rounds=MAX_ROUNDS):
    """Time the callables interleaved; {name: stats} for the ones that are not None.

    Each round calls every implementation once (a batch of ``batch[name]``
    calls for very short ones) in a random order.  A fixed rotation would be
    biased: with three implementations, one of them would follow the NumPy
    twin (which evicts the caches with its temporaries) twice as often as
    another.
    """
    names = [name for name, call in calls.items() if call is not None]
    batch = {}
    for name in names:
        for _ in range(WARMUP_CALLS):
            start = time.perf_counter()
            calls[name]()
            elapsed = time.perf_counter() - start
        batch[name] = max(1, int(MIN_SAMPLE_SECONDS / max(elapsed, 1e-9)))
    samples = {name: [] for name in names}
    faults = {name: 0 for name in names}
    rounds = 0
    order = random.Random(0)
    gc.disable()
    try:
        deadline = time.perf_counter() + budget
        while rounds < min_rounds or (rounds < max_rounds and time.perf_counter() < deadline):
            order.shuffle(names)
            for name in names:
                call, n = calls[name], batch[name]
                faults_before = minor_faults()
                start = time.perf_counter()
                for _ in range(n):
                    call()
                elapsed = time.perf_counter() - start
                faults[name] += minor_faults() - faults_before
                samples[name].append(elapsed / n)
            rounds += 1
    finally:
        gc.enable()
    stats = {}
    for name in names:
        times = samples[name]
        q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else times * 3
        stats[name] = {
            "median_ms": statistics.median(times) * 1e3,
            "q1_ms": q1 * 1e3,
            "q3_ms": q3 * 1e3,
            "min_ms": min(times) * 1e3,
            "samples": len(times),
            "calls": len(times) * batch[name],
            "faults_per_call": faults[name] / (len(times) * batch[name]),
        }
    return stats


class OtherLoad:
    """The share of all CPUs that other processes (or the hypervisor) used since ``start``.

    Read from /proc/stat (busy time of every CPU, steal included) minus this
    process's own CPU time.  Timings taken while it is high are unreliable:
    two threads cannot both run when a third process wants a core.
    """

    def __init__(self):
        self.start()

    @staticmethod
    def _now():
        try:
            with open("/proc/stat") as stat:
                ticks = [int(v) for v in stat.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        usage = resource.getrusage(resource.RUSAGE_SELF)
        total = sum(ticks) / hz
        idle = (ticks[3] + ticks[4]) / hz  # idle + iowait
        return total, total - idle, usage.ru_utime + usage.ru_stime

    def start(self):
        self.begin = self._now()

    def share(self):
        end = self._now()
        if end is None or self.begin is None or end[0] <= self.begin[0]:
            return None
        total, busy, ours = (e - b for e, b in zip(end, self.begin))
        return min(1.0, max(0.0, (busy - ours) / total))


class CopyProbe:
    """The copy bandwidth of this machine, measured now: np.copyto of 200 MB (one thread)."""

    def __init__(self, np):
        self.np = np
        self.source = np.ones(COPY_BYTES // 4, np.float32)
        self.target = np.zeros_like(self.source)  # zeros_like touches every page
        self.samples = []

    def measure(self, repeats=COPY_REPEATS):
        """GB/s (bytes read + bytes written) of the best of ``repeats`` copies."""
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            self.np.copyto(self.target, self.source)
            best = min(best, time.perf_counter() - start)
        gbps = 2 * self.source.nbytes / best / 1e9
        self.samples.append(gbps)
        return gbps

    def median(self):
        return statistics.median(self.samples)


def set_threads(n, cbn, torch):
    cbn.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


def as_numpy(np, value):
    """A NumPy view of an implementation's result (torch tensors included)."""
    if hasattr(value, "detach"):
        value = value.detach().numpy()
    return np.asarray(value, dtype=np.float64)


def agreement(np, prepared, expected):
    """{implementation: max |result - expected|} (empty when nothing is expected)."""
    if expected is None:
        return {}
    diffs = {}
    for name, call in prepared.calls.items():
        if call is not None:
            diffs[name] = float(np.max(np.abs(as_numpy(np, call()) - expected)))
    return diffs


def openmp_check(np, case, threads, budget, cbn, torch):
    """cbn and torch timed alone, then interleaved: interference shows as a ratio > 1."""
    set_threads(threads, cbn, torch)
    prepared = case.build(np.random.default_rng(1), torch)
    cbn_call, torch_call = prepared.calls["cbn"], prepared.calls["torch"]
    alone_cbn = measure({"cbn": cbn_call}, budget)["cbn"]["median_ms"]
    alone_torch = measure({"torch": torch_call}, budget)["torch"]["median_ms"]
    both = measure({"cbn": cbn_call, "torch": torch_call}, budget)
    return {
        "case": case.key, "threads": threads,
        "cbn_alone_ms": alone_cbn, "cbn_interleaved_ms": both["cbn"]["median_ms"],
        "torch_alone_ms": alone_torch, "torch_interleaved_ms": both["torch"]["median_ms"],
    }


def make_row(case, threads, prepared, stats, copy_gbps_now, diffs):
    row = {"key": case.key, "title": case.title, "mode": case.mode, "threads": threads,
           "dtype": case.dtype.name, "latency": case.latency, "bytes_moved": prepared.bytes_moved,
           "copy_gbps_before_row": copy_gbps_now, "max_abs_diff": diffs}
    for name in ("cbn", "torch", "numpy", "cbn.torch"):
        entry = stats.get(name)
        if entry is not None:
            entry["gbps"] = prepared.bytes_moved / (entry["median_ms"] * 1e-3) / 1e9
        row[name] = entry
    if row["cbn"] and row["torch"]:
        row["speedup"] = row["torch"]["median_ms"] / row["cbn"]["median_ms"]
    if getattr(case, "sweep", False):
        row.update(sweep=True, layout="CL" if case.channels_last else "NCHW",
                   shape_label=f"C={case.channels} H={case.size}",
                   channels=case.channels, size=case.size)
        if row["cbn.torch"] and row["torch"]:
            row["speedup_cbn_torch"] = row["torch"]["median_ms"] / row["cbn.torch"]["median_ms"]
    return row


def selected_cases(all_cases, substrings):
    if not substrings:
        return list(all_cases)
    wanted = [s.lower() for s in substrings]
    return [case for case in all_cases
            if any(s in case.key.lower() or s in case.title.lower() for s in wanted)]


def main(argv=None):
    args = parse_args(argv)
    wait_policy = configure_openmp(args.omp_wait_policy)
    # Imported only now: libgomp reads OMP_WAIT_POLICY once, when it is loaded,
    # and torch goes first so that its own libgomp is the one in the process.
    import numpy as np
    torch = import_torch(not args.no_torch)
    import cbn
    import cases
    import report
    import sweep
    import targets

    all_cases = list(cases.CASES) + ([] if args.no_sweep else list(sweep.SWEEP))
    todo = selected_cases(all_cases, args.cases)
    want_resnet = (torch is not None and not args.no_resnet
                   and (args.cases is None or any("resnet" in c.lower() for c in args.cases)))
    if args.list or not (todo or want_resnet):
        if not todo:
            print(f"no case matches {args.cases}; the cases are:", file=sys.stderr)
        for case in all_cases:
            print(f"{case.key:30s} {case.title}", file=sys.stdout if args.list else sys.stderr)
        print(f"{'resnet':30s} ResNet-50 training step and batch-1 eval (benchmarks/resnet50.py)",
              file=sys.stdout if args.list else sys.stderr)
        return 0 if args.list else 1
    budget = 0.3 if args.quick else args.seconds
    max_threads = os.cpu_count() or 1
    if max(args.threads) > max_threads:
        print(f"note: {max(args.threads)} threads asked for on {max_threads} CPUs",
              file=sys.stderr)

    info = machine()
    print(f"machine: {describe_machine(info)}")
    torch_version = torch.__version__ if torch else "not installed"
    print(f"cbn {cbn.__version__}, NumPy {np.__version__}, PyTorch {torch_version}, "
          f"Python {platform.python_version()}")
    runtimes = ", ".join(loaded_openmp_runtimes()) or "?"
    print(f"OMP_WAIT_POLICY={wait_policy}; OpenMP runtime: {runtimes}")
    if torch is None and not args.no_torch:
        print("PyTorch is not installed: its columns stay empty "
              "(`.venv/bin/python -m pip install torch` to compare).")

    run_load = OtherLoad()
    probe = CopyProbe(np)
    probe.measure()  # the first copy also warms the allocator and the pages

    check = None
    check_case = next(c for c in cases.CASES if c.key == OPENMP_CHECK_CASE)
    if torch is not None and not args.quick and todo:
        check = openmp_check(np, check_case, max(args.threads), 1.0, cbn, torch)
        print(f"OpenMP interference check ({check_case.title}, {check['threads']} threads): "
              f"cbn {check['cbn_alone_ms']:.2f} ms alone, {check['cbn_interleaved_ms']:.2f} ms "
              f"interleaved; torch {check['torch_alone_ms']:.2f} / "
              f"{check['torch_interleaved_ms']:.2f} ms")

    runs = [(case, t) for case in todo for t in args.threads
            if case.threads is None or t in case.threads]
    rows = []
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for case in todo:
        prepared = case.build(rng, torch)
        if args.no_numpy:
            prepared.calls["numpy"] = None
        expected = as_numpy(np, prepared.reference()) if prepared.reference else None
        row_budget = budget
        if getattr(case, "sweep", False):
            row_budget = 0.3 if args.quick else args.sweep_seconds
        for threads in args.threads:
            if case.threads is not None and threads not in case.threads:
                continue
            set_threads(threads, cbn, torch)
            diffs = agreement(np, prepared, expected)  # checked before timing
            copy_now = probe.measure()
            row_load = OtherLoad()
            stats = measure(prepared.calls, row_budget,
                            min_rounds=3 if args.quick else MIN_ROUNDS)
            others = row_load.share()
            row = make_row(case, threads, prepared, stats, copy_now, diffs)
            row["others_cpu_share"] = others
            rows.append(row)
            print(f"[{len(rows)}/{len(runs)}] {case.title}, {threads} thr: "
                  + ", ".join(f"{name} {report.fmt_ms(s['median_ms'])} ms"
                              for name, s in stats.items()), file=sys.stderr)
        del prepared, expected
        gc.collect()
    resnet_rows, resnet_checks = [], None
    if want_resnet:
        import resnet50
        resnet_rows, resnet_checks = resnet50.run(
            torch, args.threads, quick=args.quick,
            log=lambda line: print(line, file=sys.stderr))
    elapsed = time.perf_counter() - started
    others = run_load.share()

    copy_gbps = probe.median()
    for row in rows:
        if row["cbn"]:
            row["copy_share"] = row["cbn"]["gbps"] / copy_gbps
    results = targets.check(rows)
    kernel_rows = [row for row in rows if not row.get("sweep")]
    sweep_rows = [row for row in rows if row.get("sweep")]
    extra_results = targets.sweep_results(sweep_rows) + targets.resnet_results(resnet_rows)

    print()
    if kernel_rows:
        print(report.text_table(kernel_rows))
    if sweep_rows:
        print()
        print("ResNet-50 batch-norm shapes at batch 32 (speed-up = torch time / that time, "
              "same run; cbn = the NumPy layer)")
        print(report.sweep_table(sweep_rows))
    if resnet_rows:
        import resnet50
        print()
        print(resnet50.table(resnet_rows))
    print("(other load: CPU share other processes took during the row; ! above 10%)")
    print()
    print(f"copy bandwidth (np.copyto 200 MB, one thread, read + write): median {copy_gbps:.1f} "
          f"GB/s over {len(probe.samples)} probes (min {min(probe.samples):.1f}, "
          f"max {max(probe.samples):.1f}); timing took {elapsed:.0f} s")
    if others is not None:
        print(f"other processes and the hypervisor used {100 * others:.0f}% of the CPUs "
              f"during the run")
        if others > 0.10:
            print("WARNING: the machine was busy with other work: the timings are unreliable, "
                  "rerun on a quiet machine")
    tolerance = {"float32": 1e-3, "float64": 1e-9}
    for row in rows:
        for name, diff in row["max_abs_diff"].items():
            if diff > tolerance[row["dtype"]]:
                print(f"WARNING: {name} differs from the float64 reference by {diff:.3g} "
                      f"in {row['title']} ({row['threads']} threads)")
    if results:
        print("\ntargets (speed-up = PyTorch time / cbn time, same run):")
        print("\n".join("  " + line for line in report.target_lines(results)))
    if extra_results:
        print("\nResNet-50 targets (issue 11):")
        print("\n".join("  " + line for line in report.extra_target_lines(extra_results)))

    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "machine_description": describe_machine(info),
        "versions": {"cbn": cbn.__version__, "numpy": np.__version__,
                     "torch": torch.__version__ if torch else None,
                     "python": platform.python_version()},
        "omp_wait_policy": wait_policy,
        "openmp_runtimes": loaded_openmp_runtimes(),
        "openmp_check": check,
        "others_cpu_share": others,
        "budget_seconds_per_row": budget,
        "copy_gbps": copy_gbps,
        "copy_gbps_samples": probe.samples,
        "byte_model": cases.BYTES_PER_ELEMENT,
        "rows": rows,
        "resnet50": {"rows": resnet_rows, "checks": resnet_checks},
        "targets": [{"label": t.label, "key": t.key, "threads": t.threads,
                     "metric": t.metric, "threshold": t.threshold,
                     "value": value, "met": met} for t, value, met in results],
        "resnet50_targets": [{"label": label, "value": value, "met": met}
                             for label, value, met in extra_results],
    }
    report.write_json(args.out / "bench.json", document)
    with open(args.out / "bench.md", "w") as f:
        f.write(f"Machine: {describe_machine(info)}; copy bandwidth {copy_gbps:.1f} GB/s.\n\n")
        if kernel_rows:
            f.write(report.markdown_table(kernel_rows) + "\n\n")
        if sweep_rows:
            f.write(report.sweep_markdown(sweep_rows) + "\n\n")
        if resnet_rows:
            f.write("```\n" + resnet50.table(resnet_rows) + "\n```\n\n")
        f.write("\n".join(f"- {line}" for line in report.target_lines(results)
                          + report.extra_target_lines(extra_results)) + "\n")
    skipped = report.write_chart(args.out / "bench.png", kernel_rows, copy_gbps) \
        if kernel_rows else "no kernel rows"
    written = ["bench.json", "bench.md"] + ([] if skipped else ["bench.png"])
    if sweep_rows:
        sweep_skipped = report.write_sweep_chart(args.out / "sweep.png", sweep_rows)
        if not sweep_skipped:
            written.append("sweep.png")
    print(f"\nwrote {', '.join(str(args.out / name) for name in written)}")
    if skipped and kernel_rows:
        print(f"chart skipped: {skipped} (`.venv/bin/python -m pip install matplotlib`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
