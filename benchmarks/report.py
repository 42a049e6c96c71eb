"""Turning measured rows into the terminal table, Markdown, JSON and the chart.

A row is a plain dict (the JSON keeps it as is)::

    {"key", "title", "mode", "threads", "dtype", "latency", "bytes_moved",
     "cbn" / "torch" / "numpy": {"median_ms", "q1_ms", "q3_ms", "min_ms",
                                 "samples", "calls", "faults_per_call", "gbps"} or None,
     "speedup": torch median / cbn median, "copy_share": cbn GB/s / copy GB/s,
     "copy_gbps_before_row": the copy probe just before the row,
     "others_cpu_share": CPU share other processes used during the row,
     "max_abs_diff": {"cbn", "torch", "numpy": max |result - float64 reference|}}
"""
import json

IMPLEMENTATIONS = ("cbn", "torch", "numpy")

COLUMNS = ("case", "thr", "cbn ms", "torch ms", "numpy ms", "vs torch",
           "cbn GB/s", "% copy", "faults cbn", "faults torch", "other load")


def fmt_ms(value):
    if value is None:
        return "-"
    for limit, form in ((100, "{:.0f}"), (10, "{:.1f}"), (1, "{:.2f}"), (0.1, "{:.3f}")):
        if value >= limit:
            return form.format(value)
    return "{:.4f}".format(value)


def fmt_faults(value):
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _cells(row):
    def impl(name, field):
        stats = row.get(name)
        return None if stats is None else stats[field]

    speedup = row.get("speedup")
    share = row.get("copy_share")
    gbps = impl("cbn", "gbps")
    return [
        row["title"],
        str(row["threads"]),
        fmt_ms(impl("cbn", "median_ms")),
        fmt_ms(impl("torch", "median_ms")),
        fmt_ms(impl("numpy", "median_ms")),
        "-" if speedup is None else f"{speedup:.2f}x",
        "-" if gbps is None or row["latency"] else f"{gbps:.1f}",
        "-" if share is None or row["latency"] else f"{100 * share:.0f}%",
        fmt_faults(impl("cbn", "faults_per_call")),
        fmt_faults(impl("torch", "faults_per_call")),
        _fmt_share(row.get("others_cpu_share")),
    ]


def _fmt_share(value):
    """Other processes' CPU share during the row; flagged (!) above 10%."""
    if value is None:
        return "-"
    return f"{100 * value:.0f}%" + (" !" if value > 0.10 else "")


def text_table(rows):
    """The table for the terminal: left-aligned labels, right-aligned numbers."""
    lines = [list(COLUMNS)] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]

    def render(line):
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(line, widths)))

    out = [render(lines[0]), "  ".join("-" * w for w in widths)]
    out += [render(line) for line in lines[1:]]
    return "\n".join(out)


def markdown_table(rows):
    out = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    out += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(out)


def target_lines(results):
    """One line per measured target (✓ or ✗, label, value), then a count of the others."""
    lines = [f"{'✓' if met else '✗'} {target.label}: {target.describe_value(value)}"
             for target, value, met in results if met is not None]
    unmeasured = sum(met is None for _, _, met in results)
    if unmeasured:
        lines.append(f"? {unmeasured} target(s) not measured (speed-ups need PyTorch)")
    return lines


def write_json(path, document):
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")


def write_chart(path, rows, copy_gbps):
    """GB/s per case for each implementation against the copy bandwidth line.

    Returns None when written, else the reason it was skipped.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    rows = [row for row in rows if not row["latency"]]
    thread_counts = sorted({row["threads"] for row in rows})
    if not rows:
        return "no bandwidth rows to draw"
    titles = list(dict.fromkeys(row["title"] for row in rows))
    fig, axes = plt.subplots(1, len(thread_counts), sharex=True, sharey=True, squeeze=False,
                             figsize=(6 * len(thread_counts) + 3, 0.55 * len(titles) + 1.8))
    height = 0.27
    colors = {"cbn": "tab:blue", "torch": "tab:orange", "numpy": "tab:gray"}
    for ax, threads in zip(axes[0], thread_counts):
        by_title = {row["title"]: row for row in rows if row["threads"] == threads}
        for i, name in enumerate(IMPLEMENTATIONS):
            values = []
            for title in titles:
                stats = by_title.get(title, {}).get(name)
                values.append(stats["gbps"] if stats else 0.0)
            positions = [k + (i - 1) * height for k in range(len(titles))]
            ax.barh(positions, values, height, label=name, color=colors[name])
        ax.axvline(copy_gbps, color="black", linestyle="--",
                   label=f"copy bandwidth {copy_gbps:.0f} GB/s")
        ax.set_title(f"{threads} thread{'s' if threads > 1 else ''}")
        ax.set_xlabel("effective GB/s (byte model)")
    axes[0][0].set_yticks(range(len(titles)))
    axes[0][0].set_yticklabels(titles)
    axes[0][0].invert_yaxis()  # the axes share y: invert once, first case on top
    axes[0][-1].legend(loc="lower right", fontsize="small")
    fig.suptitle("cbn vs PyTorch vs NumPy: batch norm throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --- the ResNet-50 sweep ---------------------------------------------------------

SWEEP_COLUMNS = ("mode", "layout", "C", "H", "thr", "torch ms", "cbn.torch ms", "cbn ms",
                 "cbn.torch vs torch", "cbn vs torch", "cbn GB/s", "other load")


def _sweep_cells(row):
    def ms(name):
        stats = row.get(name)
        return None if stats is None else stats["median_ms"]

    def ratio(key):
        value = row.get(key)
        return "-" if value is None else f"{value:.2f}x"

    gbps = row["cbn"]["gbps"] if row.get("cbn") else None
    return [("fwd+bwd" if row["mode"] == "train+bwd" else "eval"), row["layout"],
            str(row["channels"]), str(row["size"]), str(row["threads"]),
            fmt_ms(ms("torch")), fmt_ms(ms("cbn.torch")), fmt_ms(ms("cbn")),
            ratio("speedup_cbn_torch"), ratio("speedup"),
            "-" if gbps is None else f"{gbps:.1f}", _fmt_share(row.get("others_cpu_share"))]


def _sorted_sweep(rows):
    """fwd+bwd first, then by threads, layout, and the shapes in network order."""
    order = {(c, h): i for i, (c, h) in enumerate(
        [(64, 112), (64, 56), (256, 56), (128, 28), (512, 28), (256, 14), (1024, 14), (512, 7),
         (2048, 7)])}
    return sorted(rows, key=lambda r: (r["mode"] != "train+bwd", r["threads"],
                                       r["layout"] != "NCHW",
                                       order.get((r["channels"], r["size"]), 99)))


def sweep_table(rows):
    lines = [list(SWEEP_COLUMNS)] + [_sweep_cells(row) for row in _sorted_sweep(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(SWEEP_COLUMNS))]
    render = lambda line: "  ".join(  # noqa: E731
        cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
    out = [render(lines[0]), "  ".join("-" * w for w in widths)]
    return "\n".join(out + [render(line) for line in lines[1:]])


def sweep_markdown(rows):
    out = ["| " + " | ".join(SWEEP_COLUMNS) + " |",
           "|" + "|".join(["---"] * 2 + ["---:"] * (len(SWEEP_COLUMNS) - 2)) + "|"]
    out += ["| " + " | ".join(_sweep_cells(row)) + " |" for row in _sorted_sweep(rows)]
    return "\n".join(out)


def extra_target_lines(results):
    """Lines for (label, value text, met) triples; met None is information only."""
    marks = {True: "✓", False: "✗", None: "·"}
    return [f"{marks[met]} {label}: {value}" for label, value, met in results]


def write_sweep_chart(path, rows):
    """Speed-up over torch per ResNet-50 shape: panels mode x threads, bars layout x front end."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    modes = [m for m in ("train+bwd", "eval") if any(r["mode"] == m for r in rows)]
    thread_counts = sorted({r["threads"] for r in rows})
    shapes = sorted({(r["channels"], r["size"]) for r in rows},
                    key=lambda cs: (-cs[1], cs[0]))
    series = [("NCHW", "speedup_cbn_torch", "cbn.torch NCHW", "tab:blue"),
              ("CL", "speedup_cbn_torch", "cbn.torch channels-last", "tab:cyan"),
              ("NCHW", "speedup", "NumPy layer NCHW", "tab:green"),
              ("CL", "speedup", "NumPy layer channels-last", "tab:olive")]
    fig, axes = plt.subplots(len(modes), len(thread_counts), squeeze=False, sharey=True,
                             figsize=(6.5 * len(thread_counts), 3.6 * len(modes)))
    width = 0.2
    for i, mode in enumerate(modes):
        for j, threads in enumerate(thread_counts):
            ax = axes[i][j]
            by = {(r["layout"], r["channels"], r["size"]): r for r in rows
                  if r["mode"] == mode and r["threads"] == threads}
            for k, (layout, key, label, color) in enumerate(series):
                values = [(by.get((layout,) + shape) or {}).get(key) or 0.0 for shape in shapes]
                ax.bar([p + (k - 1.5) * width for p in range(len(shapes))], values, width,
                       label=label, color=color)
            ax.axhline(1.0, color="black", linewidth=1)
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([f"{c}x{h}" for c, h in shapes], rotation=45, fontsize="small")
            ax.set_title(f"{'fwd+bwd' if mode == 'train+bwd' else 'eval'}, {threads} "
                         f"thread{'s' if threads > 1 else ''}")
            if j == 0:
                ax.set_ylabel("speed-up over torch (x)")
    axes[0][-1].legend(fontsize="x-small", loc="upper right")
    fig.suptitle("ResNet-50 batch-norm shapes (C x H, batch 32): torch time / cbn time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
