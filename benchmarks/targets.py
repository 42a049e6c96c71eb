"""The performance targets of the issue, checked against the rows of one run.

Each target names a case key, a thread count, a metric of that row and a
threshold.  Metrics:

* ``speedup``: torch median time / cbn median time (at least the threshold);
* ``copy_share``: cbn GB/s / copy GB/s of the same run (at least the threshold);
* ``cbn_us``: cbn median time per call in microseconds (at most the threshold).
  For the eval of a (1, 512) input the kernel moves 4 KB, so this time is an
  upper bound on cbn's Python-side overhead per call.

Where the issue names a layout or mode without a shape ("channels-last train
forward ≥ 1.0x"), every matching row gets the target.
"""


class Target:
    def __init__(self, key, threads, metric, threshold, label):
        self.key = key
        self.threads = threads
        self.metric = metric
        self.threshold = threshold
        self.label = label

    def value(self, row):
        if self.metric == "speedup":
            return row.get("speedup")
        if self.metric == "copy_share":
            return row.get("copy_share")
        if self.metric == "cbn_us":
            ms = row["cbn"]["median_ms"] if row.get("cbn") else None
            return None if ms is None else ms * 1e3
        raise ValueError(f"unknown metric {self.metric!r}")

    def met(self, value):
        if value is None:
            return None
        if self.metric == "cbn_us":
            return value <= self.threshold
        return value >= self.threshold

    def describe_value(self, value):
        if value is None:
            return "not measured"
        if self.metric == "speedup":
            return f"{value:.3f}x"
        if self.metric == "copy_share":
            return f"{100 * value:.0f}%"
        return f"{value:.1f} us"


def _speedups(key, one_thread, two_threads, what):
    return [Target(key, 1, "speedup", one_thread, f"{what}, 1 thread >= {one_thread:g}x"),
            Target(key, 2, "speedup", two_threads, f"{what}, 2 threads >= {two_threads:g}x")]


TARGETS = (
    _speedups("2d-train-nchw-32", 3.0, 2.0, "train fwd NCHW (32,64,56,56)")
    + [Target("2d-train-nchw-32", 1, "copy_share", 0.75,
              "train fwd NCHW (32,64,56,56), 1 thread >= 75% of copy bandwidth")]
    + _speedups("2d-fwdbwd-nchw-32", 2.0, 1.5, "train fwd+bwd NCHW")
    + _speedups("1d-train-64x256x128", 3.0, 2.0, "BatchNorm1d train (64,256,128)")
    + _speedups("3d-train-8x32x16x32x32", 3.0, 2.0, "BatchNorm3d train (8,32,16,32,32)")
    + _speedups("2d-train-f64-32", 2.0, 1.5, "float64 train fwd NCHW")
    + _speedups("2d-train-cl-32", 1.0, 1.0, "channels-last train fwd (32,...)")
    + _speedups("2d-train-cl-128", 1.0, 1.0, "channels-last train fwd (128,...)")
    + _speedups("2d-fwdbwd-cl-32", 1.0, 1.0, "channels-last train fwd+bwd")
    + _speedups("2d-eval-nchw-32", 1.0, 1.0, "eval fwd NCHW")
    + _speedups("2d-eval-cl-32", 1.0, 1.0, "eval fwd channels-last")
    + [Target("latency-1d-eval-1x512", 1, "speedup", 1.0, "eval latency (1,512), 1 thread >= 1x"),
       Target("latency-2d-eval-1x64x56x56", 1, "speedup", 1.0,
              "eval latency (1,64,56,56), 1 thread >= 1x"),
       Target("latency-1d-eval-1x512", 1, "cbn_us", 5.0,
              "Python-side overhead per call <= 5 us (cbn eval (1,512), 1 thread)")]
)


def check(rows):
    """[(target, value, met)] for every target whose row was measured."""
    by_key = {(row["key"], row["threads"]): row for row in rows}
    results = []
    for target in TARGETS:
        row = by_key.get((target.key, target.threads))
        if row is None:
            continue
        value = target.value(row)
        results.append((target, value, target.met(value)))
    return results


# --- the ResNet-50 sweep and the ResNet-50 model (issue 11) --------------------

SWEEP_MIN_SPEEDUP = 1.0      # every sweep row, through cbn.torch
SWEEP_GEOMEAN_FWDBWD = 1.5   # geometric mean over the fwd+bwd rows, through cbn.torch
RESNET_STEP_MIN = 1.0        # torch step time / cbn.torch step time
RESNET_BN_SHARE_MAX = 0.7    # cbn.torch BN time / torch BN time (profiler)
RESNET_EVAL_MIN = 1.0        # torch batch-1 eval latency / cbn.torch latency


def _geomean(values):
    import math
    values = [v for v in values if v]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def sweep_results(rows):
    """[(label, value text, met)] for the sweep rows (those with a cbn.torch speed-up)."""
    rows = [row for row in rows if row.get("sweep")]
    results = []
    groups = {}
    for row in rows:
        groups.setdefault((row["mode"], row["layout"], row["threads"]), []).append(row)
    for (mode, layout, threads), group in sorted(groups.items()):
        measured = [r for r in group if r.get("speedup_cbn_torch") is not None]
        if not measured:
            continue
        worst = min(measured, key=lambda r: r["speedup_cbn_torch"])
        what = "fwd+bwd" if mode == "train+bwd" else "eval"
        results.append((f"sweep {what} {layout}, {threads} thread{'s' if threads > 1 else ''}: "
                        f"every shape >= {SWEEP_MIN_SPEEDUP:g}x through cbn.torch",
                        f"min {worst['speedup_cbn_torch']:.2f}x ({worst['shape_label']}), "
                        f"{sum(r['speedup_cbn_torch'] >= SWEEP_MIN_SPEEDUP for r in measured)}"
                        f"/{len(measured)} met",
                        worst["speedup_cbn_torch"] >= SWEEP_MIN_SPEEDUP))
    fwdbwd = [r["speedup_cbn_torch"] for r in rows
              if r["mode"] == "train+bwd" and r.get("speedup_cbn_torch")]
    if fwdbwd:
        g = _geomean(fwdbwd)
        results.append((f"sweep fwd+bwd geometric mean >= {SWEEP_GEOMEAN_FWDBWD:g}x "
                        f"through cbn.torch ({len(fwdbwd)} rows)", f"{g:.2f}x",
                        g >= SWEEP_GEOMEAN_FWDBWD))
    numpy_fwdbwd = [r["speedup"] for r in rows if r["mode"] == "train+bwd" and r.get("speedup")]
    if numpy_fwdbwd:
        results.append(("(info) sweep fwd+bwd geometric mean through the NumPy layers",
                        f"{_geomean(numpy_fwdbwd):.2f}x", None))
    return results


def resnet_results(rows):
    """[(label, value text, met)] for the ResNet-50 rows of resnet50.py."""
    results = []
    for row in rows:
        t = row["threads"]
        thr = f"{t} thread{'s' if t > 1 else ''}"
        if row["kind"] == "train":
            ratio = row["torch_ms"] / row["cbn_ms"]
            results.append((f"ResNet-50 training step ({row['label']}), {thr}: not slower "
                            f"(torch/cbn.torch >= {RESNET_STEP_MIN:g})", f"{ratio:.3f}x",
                            ratio >= RESNET_STEP_MIN))
            if row.get("torch_bn_ms") and row.get("cbn_bn_ms") is not None:
                share = row["cbn_bn_ms"] / row["torch_bn_ms"]
                results.append((f"ResNet-50 training step, {thr}: BN time <= "
                                f"{RESNET_BN_SHARE_MAX:g}x torch's (profiler)",
                                f"{share:.2f}x ({row['cbn_bn_ms']:.1f} vs "
                                f"{row['torch_bn_ms']:.1f} ms)",
                                share <= RESNET_BN_SHARE_MAX))
        else:
            ratio = row["torch_ms"] / row["cbn_ms"]
            results.append((f"ResNet-50 batch-1 eval latency ({row['label']}), {thr}: not "
                            f"slower (torch/cbn.torch >= {RESNET_EVAL_MIN:g})", f"{ratio:.3f}x",
                            ratio >= RESNET_EVAL_MIN))
    return results
