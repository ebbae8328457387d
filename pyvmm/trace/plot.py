"""The exits-over-time plot of `pyvmm trace FILE --plot OUT` (SVG or PNG, by OUT's suffix).

matplotlib is an optional dependency (the `plot` extra; scripts/setup installs it):
it is imported here only, when a plot is asked for, so pyvmm itself never loads it.
"""
from __future__ import annotations

from pathlib import Path

from pyvmm.trace.fileformat import TraceError
from pyvmm.trace.summary import TraceSummary

PLOT_POINTS = 200            # time bins on the x axis
PLOT_SERIES = 6              # sources drawn one by one; the rest are "other"
FORMATS = (".svg", ".png")


def plot_exits(summary: TraceSummary, out: Path, title: str = "") -> None:
    """A stacked area of exits per second over time, by source (device or exit reason)."""
    if out.suffix.lower() not in FORMATS:
        raise TraceError(f"{out}: the plot is written as SVG or PNG: name it .svg or .png")
    try:
        import matplotlib
        matplotlib.use("Agg")           # no display: files only
        matplotlib.rcParams["svg.fonttype"] = "none"     # SVG text as text: a third the size
        matplotlib.rcParams["svg.hashsalt"] = "pyvmm"    # the same trace, the same SVG
        import matplotlib.pyplot as plt
    except ImportError:
        raise TraceError("--plot needs matplotlib: pip install 'pyvmm[plot]' (or "
                         "matplotlib)") from None
    width, bins = summary.timeline.rebinned(PLOT_POINTS, summary.span_ns)
    totals: dict[str, int] = {}
    for counts in bins:
        for key, n in counts.items():
            totals[key] = totals.get(key, 0) + n
    order = sorted(totals, key=lambda k: (-totals[k], k))
    shown, rest = order[:PLOT_SERIES], order[PLOT_SERIES:]
    per_s = 1e9 / width
    xs = [(i + 0.5) * width / 1e9 for i in range(len(bins))]
    series = [[counts.get(name, 0) * per_s for counts in bins] for name in shown]
    labels = list(shown)
    if rest:
        series.append([sum(counts.get(name, 0) for name in rest) * per_s for counts in bins])
        labels.append("other")
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    try:
        if series:
            ax.stackplot(xs, series, labels=labels, step="mid", linewidth=0)
            ax.legend(loc="upper right", fontsize="small", frameon=False)
        ax.set_xlabel("seconds since the trace started")
        ax.set_ylabel("exits per second")
        ax.set_title(title or f"{summary.exits} exits, {width / 1e6:g} ms bins",
                     fontsize="medium")
        ax.set_xlim(0, max(xs[-1] + width / 2e9, 1e-9) if xs else 1)
        ax.margins(x=0)
        fig.tight_layout()
        fig.savefig(out, metadata={"Date": None} if out.suffix.lower() == ".svg" else None)
    finally:
        plt.close(fig)
