"""PNG plots of a run: op time and GB/s per case and provider, FreeU overhead per U-Net step, crossover."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from .results import find_rows

__all__ = ["write_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _case_label(row: Dict) -> str:
    return f"{row['case']} b{row['x_shape'].strip('()').split(',')[0]} {row['dtype']}"


def _op_cases(rows: Sequence[Dict]) -> List[str]:
    labels = []
    for row in rows:
        if _case_label(row) not in labels:
            labels.append(_case_label(row))
    return labels


def _grouped_bars(path: Path, rows: Sequence[Dict], column: str, ylabel: str, log: bool, title: str) -> None:
    """One group of bars per case, one bar per provider (eager mode), ``column`` on the y axis."""
    plt = _pyplot()
    timed = [r for r in rows if r[column] is not None]
    cases = _op_cases(timed)
    providers = sorted({r["provider"] for r in timed})
    width = 0.8 / max(1, len(providers))
    figure, axes = plt.subplots(figsize=(max(8.0, 0.9 * len(cases) * max(1, len(providers)) * 0.35), 5.5))
    for index, provider in enumerate(providers):
        values = {_case_label(row): row[column] for row in timed if row["provider"] == provider}
        positions = [i + index * width for i, case in enumerate(cases) if case in values]
        axes.bar(positions, [values[case] for case in cases if case in values], width, label=provider)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    axes.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
    axes.set_ylabel(ylabel)
    if log:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _unet_overhead(path: Path, rows: Sequence[Dict]) -> None:
    """FreeU cost per U-Net step, in % of the no-FreeU step, per model, mode and integration."""
    plt = _pyplot()
    timed = [r for r in rows if r["overhead_pct"] is not None and r["provider"] != "none"]
    labels = [f"{r['case']}\n{r['mode']} {r['provider']}" for r in timed]
    figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(labels)), 4.5))
    # Error bars: the 20th..80th percentile of the per-round overheads (the run's noise on this estimate).
    low = [r["overhead_pct"] - (r["overhead_p20_pct"] if r["overhead_p20_pct"] is not None else r["overhead_pct"])
           for r in timed]
    high = [(r["overhead_p80_pct"] if r["overhead_p80_pct"] is not None else r["overhead_pct"]) - r["overhead_pct"]
            for r in timed]
    bars = axes.bar(range(len(timed)), [r["overhead_pct"] for r in timed], yerr=[low, high], capsize=4,
                    color=["tab:orange" if r["provider"] == "diffusers" else "tab:blue" for r in timed])
    for bar, row in zip(bars, timed):
        axes.annotate(f"{row['overhead_pct']:+.2f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=7)
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_xticks(range(len(timed)))
    axes.set_xticklabels(labels, fontsize=7)
    axes.set_ylabel("FreeU overhead, % of the step without FreeU")
    axes.set_title("FreeU overhead per U-Net step (median over rounds, p20..p80 bars)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _crossover(path: Path, summaries: Sequence[Dict]) -> None:
    """Low-rank and FFT time against the number of masked frequencies per axis, one panel per shape/dtype."""
    plt = _pyplot()
    panels = sorted({(s["x_shape"], s["dtype"]) for s in summaries})
    figure, axes_list = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 4.2), squeeze=False)
    for axes, (x_shape, dtype) in zip(axes_list[0], panels):
        for item in (s for s in summaries if (s["x_shape"], s["dtype"]) == (x_shape, dtype)):
            tag = f"{item['provider']} {item['mask']}"
            axes.plot(item["frequencies"], [us / 1e3 for us in item["lowrank_us"]], marker="o", label=tag)
            axes.plot(item["frequencies"], [us / 1e3 for us in item["fft_us"]], linestyle="--", marker="x",
                      label=f"fft {item['mask']}")
        axes.set_xlabel("masked frequencies per axis")
        axes.set_ylabel("median time, ms")
        axes.set_title(f"{x_shape} {dtype}", fontsize=9)
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plots(out_dir: Path, rows: Sequence[Dict], summary: Dict) -> List[str]:
    """Write every plot the run has data for into ``out_dir``; returns the file names written."""
    out_dir = Path(out_dir)
    written = []
    op_eager = find_rows(rows, section="op", mode="eager")
    if any(r["median_us"] is not None for r in op_eager):
        timed = [dict(r, median_ms=None if r["median_us"] is None else r["median_us"] / 1e3) for r in op_eager]
        _grouped_bars(out_dir / "op_time.png", timed, "median_ms", "median time per call, ms", True,
                      "FreeU concat: time per case and provider (eager)")
        _grouped_bars(out_dir / "op_gbps.png", op_eager, "gbps", "GB/s (2 (|x| + |h|) / time)", False,
                      "FreeU concat: effective bandwidth per case and provider (eager)")
        written += ["op_time.png", "op_gbps.png"]
    if any(r["overhead_pct"] is not None for r in find_rows(rows, section="unet")):
        _unet_overhead(out_dir / "unet_overhead.png", find_rows(rows, section="unet"))
        written.append("unet_overhead.png")
    if summary.get("crossover"):
        _crossover(out_dir / "crossover.png", summary["crossover"])
        written.append("crossover.png")
    return written
