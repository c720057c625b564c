"""PNG plots of a run: op time, GB/s and peak memory per case and provider, FreeU per U-Net step, crossover.

In the per-case bar charts the baselines (diffusers, reference, torch.cat, copy) come first in grey tones
and the freeu_kernels backends after a gap in colour; a black triangle above a bar marks the backend the
automatic choice runs for that case (the default, what a user gets).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Dict, List, Sequence

from .names import BASELINES, DIFFUSERS_FREEU, FFT, FUSED_FREEU, NO_FREEU, fused_provider_name, is_fused
from .results import find_rows

__all__ = ["write_plots"]

_BASELINE_COLOURS = ("#4d4d4d", "#7f7f7f", "#a6a6a6", "#c7c7c7", "#e0e0e0", "#999999")
_BACKEND_COLOURS = ("tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def _case_label(row: Dict) -> str:
    """Two lines: the family, then channels@plane, batch and dtype (short enough not to collide)."""
    family, _, shapes = row["case"].partition(" ")
    return f"{family}\n{shapes} b{row['x_shape'].strip('()').split(',')[0]} {row['dtype']}"


def _op_cases(rows: Sequence[Dict]) -> List[str]:
    labels = []
    for row in rows:
        if _case_label(row) not in labels:
            labels.append(_case_label(row))
    return labels


def _provider_slots(providers: Sequence[str]):
    """(provider, offset in bar widths, colour): baselines, a one-bar gap, then the backends."""
    baselines = [name for name in BASELINES if name in providers]
    backends = sorted(name for name in providers if is_fused(name))
    slots = [(name, index, _BASELINE_COLOURS[index % len(_BASELINE_COLOURS)]) for index, name in enumerate(baselines)]
    start = len(baselines) + (1 if baselines and backends else 0)
    slots += [(name, start + index, _BACKEND_COLOURS[index % len(_BACKEND_COLOURS)])
              for index, name in enumerate(backends)]
    return slots, start + len(backends)


def _grouped_bars(path: Path, rows: Sequence[Dict], column: str, ylabel: str, log: bool, title: str) -> None:
    """One group of bars per case (baselines, gap, backends), ``column`` on the y axis, default marked."""
    plt = _pyplot()
    timed = [r for r in rows if r.get(column) is not None]
    cases = _op_cases(timed)
    slots, span = _provider_slots(sorted({r["provider"] for r in timed}))
    width = 0.85 / max(1, span)
    figure, axes = plt.subplots(figsize=(max(9.0, 0.2 * len(cases) * span + 3), 5.5))
    defaults = {_case_label(r): fused_provider_name(r["default_backend"]) for r in timed if r.get("default_backend")}
    marked_x, marked_y = [], []
    for provider, offset, colour in slots:
        values = {_case_label(row): row[column] for row in timed if row["provider"] == provider}
        positions = [i + offset * width for i, case in enumerate(cases) if case in values]
        heights = [values[case] for case in cases if case in values]
        axes.bar(positions, heights, width, label=provider, color=colour,
                 edgecolor="black" if not is_fused(provider) else colour, linewidth=0.4)
        for position, case in zip(positions, (case for case in cases if case in values)):
            if defaults.get(case) == provider:
                marked_x.append(position)
                marked_y.append(values[case])
    if marked_x:
        axes.scatter(marked_x, [y * (1.25 if log else 1.0) + (0 if log else 0.02 * max(marked_y)) for y in marked_y],
                     marker="v", color="black", s=22, zorder=5, label="default backend (automatic choice)")
    axes.set_xticks([i + (span - 1) * width / 2 for i in range(len(cases))])
    axes.set_xticklabels(cases, rotation=35, ha="right", rotation_mode="anchor", fontsize=7)
    axes.set_ylabel(ylabel)
    if log:
        axes.set_yscale("log")
    axes.set_title(title, fontsize=10)
    # Outside the axes, right of them: a legend inside would cover bars of the first cases.
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")  # nothing clipped, whatever the label lengths
    plt.close(figure)


def _unet_overhead(path: Path, rows: Sequence[Dict]) -> None:
    """Left: FreeU's cost per step in % of the step without it; right: peak memory of one step."""
    plt = _pyplot()
    colours = {NO_FREEU: "#a6a6a6", DIFFUSERS_FREEU: "tab:orange", FUSED_FREEU: "tab:blue"}
    groups = []
    for row in rows:
        key = (row["case"], row["mode"])
        if key not in groups:
            groups.append(key)
    labels = ["\n".join(textwrap.wrap(f"{case} ({mode})", 18)) for case, mode in groups]
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(10.0, 2.6 * len(groups) + 4), 5.0))
    width = 0.38
    for index, provider in enumerate((DIFFUSERS_FREEU, FUSED_FREEU)):
        for g, key in enumerate(groups):
            found = [r for r in rows if (r["case"], r["mode"]) == key and r["provider"] == provider
                     and r["overhead_pct"] is not None]
            if not found:
                continue
            row = found[0]
            # Error bars: the 20th..80th percentile of the per-round overheads (the run's noise on this estimate).
            value = row["overhead_pct"]
            low = value - (row["overhead_p20_pct"] if row["overhead_p20_pct"] is not None else value)
            high = (row["overhead_p80_pct"] if row["overhead_p80_pct"] is not None else value) - value
            left.bar(g + (index - 0.5) * width, row["overhead_pct"], width, yerr=[[low], [high]], capsize=3,
                     color=colours[provider], label=f"{provider} FreeU")
            top = row["overhead_pct"] + max(high, 0.0)  # above the error bar, so the two never overlap
            left.annotate(f"{row['overhead_pct']:+.1f}%", (g + (index - 0.5) * width, top),
                          ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    left.axhline(0.0, color="black", linewidth=0.6)
    left.set_xticks(range(len(groups)))
    left.set_xticklabels(labels, fontsize=8)
    left.set_ylabel("FreeU overhead, % of the step without FreeU")
    left.set_title("Time: median over rounds, p20..p80 bars", fontsize=9)
    _dedupe_legend(left)
    width = 0.27
    for index, provider in enumerate((NO_FREEU, DIFFUSERS_FREEU, FUSED_FREEU)):
        xs, ys = [], []
        for g, key in enumerate(groups):
            found = [r for r in rows if (r["case"], r["mode"]) == key and r["provider"] == provider
                     and r.get("peak_extra_bytes") is not None]
            if found:
                xs.append(g + (index - 1) * width)
                ys.append(found[0]["peak_extra_bytes"] / 2**20)
        if xs:
            right.bar(xs, ys, width, color=colours[provider],
                      label="no FreeU" if provider == NO_FREEU else f"{provider} FreeU")
    right.set_ylim(0, max([bar.get_height() for bar in right.patches] + [1e-3]) * 1.3)  # room for the legend
    right.set_xticks(range(len(groups)))
    right.set_xticklabels(labels, fontsize=8)
    right.set_ylabel("peak memory of one step above weights and inputs, MiB")
    right.set_title("Memory: peak of one eager step", fontsize=9)
    right.legend(fontsize=8)
    figure.suptitle("FreeU per U-Net step", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def _dedupe_legend(axes) -> None:
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        axes.legend(unique.values(), unique.keys(), fontsize=8)


def _crossover(path: Path, summaries: Sequence[Dict], cutover: int) -> None:
    """Low-rank and FFT time against the number of masked frequencies per axis, one panel per shape/dtype;
    the FFT line once per mask, the package's cutover as a vertical line."""
    plt = _pyplot()
    panels = sorted({(s["x_shape"], s["dtype"]) for s in summaries})
    figure, axes_list = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for axes, (x_shape, dtype) in zip(axes_list[0], panels):
        fft_drawn = {}
        for item in (s for s in summaries if (s["x_shape"], s["dtype"]) == (x_shape, dtype)):
            axes.plot(item["frequencies"], [us / 1e3 for us in item["lowrank_us"]], marker="o",
                      label=f"{item['provider']} {item['mask']}")
            # The FFT series is measured once per threshold; keep the longest run of it per mask.
            previous = fft_drawn.get(item["mask"])
            if previous is None or len(item["frequencies"]) > len(previous["frequencies"]):
                fft_drawn[item["mask"]] = item
        for mask, item in fft_drawn.items():
            axes.plot(item["frequencies"], [us / 1e3 for us in item["fft_us"]], linestyle="--", marker="x",
                      color="black" if mask == "box" else "grey", label=f"{FFT} {mask}")
        axes.axvline(cutover, color="tab:red", linestyle=":", linewidth=1.2,
                     label=f"cutover: FFT past {cutover} per axis")
        axes.set_xlabel("masked frequencies per axis")
        axes.set_ylabel("median time, ms (log)")
        axes.set_yscale("log")  # the region below the cutover spans a few x, the torch low-rank past it 10x more
        axes.set_title(f"{x_shape} {dtype}", fontsize=9)
        _dedupe_legend(axes)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def write_plots(out_dir: Path, rows: Sequence[Dict], summary: Dict) -> List[str]:
    """Write every plot the run has data for into ``out_dir``; returns the file names written."""
    from freeu_kernels import spec as freeu_spec

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
    with_memory = [dict(r, peak_mib=r["peak_extra_bytes"] / 2**20) for r in op_eager
                   if r.get("peak_extra_bytes") and r["provider"] != "copy"]
    if with_memory:
        _grouped_bars(out_dir / "op_memory.png", with_memory, "peak_mib", "peak extra memory of one call, MiB",
                      True, "FreeU concat: peak memory per call above the inputs (output included)")
        written.append("op_memory.png")
    unet = find_rows(rows, section="unet")
    if any(r["overhead_pct"] is not None for r in unet):
        _unet_overhead(out_dir / "unet_overhead.png", unet)
        written.append("unet_overhead.png")
    if summary.get("crossover"):
        _crossover(out_dir / "crossover.png", summary["crossover"], freeu_spec.MAX_LOWRANK_FREQUENCIES_PER_AXIS)
        written.append("crossover.png")
    return written
