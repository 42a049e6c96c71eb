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
