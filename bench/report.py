"""report.md and the end-of-run summary: tables a person reads, and the targets stated against measurements.

Every number printed here comes from a row measured in this run; a target whose case was not run says
"not measured" instead of borrowing a number from elsewhere.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

from .crossover import crossover_verdict, summarize_crossover
from .providers import COPY, DIFFUSERS, REFERENCE, TORCH_CAT, is_fused
from .results import find_rows
from .timing import format_seconds
from .unet_bench import FUSED_FREEU, NO_FREEU

__all__ = ["build_summary", "render_markdown", "render_summary_text", "evaluate_targets"]

MET, NOT_MET, NOT_MEASURED = "met", "NOT met", "not measured"

# The shapes the targets name (SDXL at 1024 px, batch 2).
SDXL_TARGET_SHAPES = ("(2,1280,32,32)", "(2,640,64,64)")
GPU_CEILING_SHAPE = "(2,640,64,64)"


def _time(us: Optional[float]) -> str:
    return "-" if us is None else format_seconds(us / 1e6)


def _significant(value: float) -> str:
    """Three significant digits without exponents: 0.0123, 1.23, 12.3, 123, 1234."""
    magnitude = abs(value)
    digits = 0 if magnitude >= 100 else 1 if magnitude >= 10 else 2 if magnitude >= 1 else 3 if magnitude >= 0.1 else 4
    return f"{value:.{digits}f}"


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else _significant(value) + "x"


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else _significant(value) + "%"


def _table(headers: Sequence[str], body: Iterable[Sequence[object]]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in body]
    return lines


def _timed(rows: Iterable[Dict]) -> List[Dict]:
    return [row for row in rows if row["median_us"] is not None]


def _fused_backends(rows: Iterable[Dict]) -> List[str]:
    return sorted({row["provider"] for row in rows if is_fused(row["provider"])})


def _target(text: str, provider: str, measured: str, verdict: str) -> Dict:
    return {"target": text, "provider": provider, "measured": measured, "verdict": verdict}


def _where(row: Dict) -> str:
    return f"{row['case']} {row['x_shape']} {row['dtype']} {row['mode']}"


def _limit_target(text: str, provider: str, candidates: Iterable[Dict], column: str, limit: float,
                  at_most: bool, show) -> Dict:
    """Verdict of the worst candidate row's ``column`` against ``limit`` (``at_most``: value <= limit)."""
    measured = [row for row in candidates if row[column] is not None]
    if not measured:
        return _target(text, provider, "-", NOT_MEASURED)
    pick = max if at_most else min
    worst = pick(measured, key=lambda row: row[column])

    def within(value):
        return value <= limit if at_most else value >= limit

    summary = show(worst[column])
    if len(measured) > 1:
        summary = (f"worst {summary} ({_where(worst)}); "
                   f"{sum(within(row[column]) for row in measured)}/{len(measured)} rows within")
    return _target(text, provider, summary, MET if within(worst[column]) else NOT_MET)


def _op_rows_of(rows: List[Dict], provider: str, shape: Optional[str] = None, dtype: Optional[str] = None,
                mode: Optional[str] = None) -> List[Dict]:
    """Timed op rows of one provider, optionally at one x = h shape, dtype and mode."""
    criteria = {"section": "op", "provider": provider}
    criteria.update({key: value for key, value in (("x_shape", shape), ("h_shape", shape), ("dtype", dtype),
                                                   ("mode", mode)) if value is not None})
    return _timed(find_rows(rows, **criteria))


def _cpu_targets(rows: List[Dict]) -> List[Dict]:
    """fp32/bf16, SDXL's (2,1280,32,32)x2 and (2,640,64,64)x2: <= 3x torch.cat, >= 8x faster than diffusers.

    The issue sets them for the torch backend; the fused CPU kernel (backend "cpu"), when it was measured,
    is held to the same limits on the lines after.
    """
    targets = []
    for backend in ("torch", "cpu"):
        provider = f"freeu_kernels[{backend}]"
        if backend != "torch" and not _op_rows_of(rows, provider):
            continue
        for shape in SDXL_TARGET_SHAPES:
            for dtype in ("fp32", "bf16"):
                found = _op_rows_of(rows, provider, shape, dtype, "eager")
                where = f"{shape}x2 {dtype}"
                targets.append(_limit_target(f"{backend} backend <= 3x torch.cat at {where}", provider, found,
                                             "vs_torch_cat", 3.0, True, _ratio))
                targets.append(_limit_target(f"{backend} backend >= 8x faster than diffusers at {where}", provider,
                                             found, "speedup_vs_diffusers", 8.0, False, _ratio))
    return targets


def _gpu_targets(rows: List[Dict]) -> List[Dict]:
    """The GPU targets, one line per freeu_kernels backend measured (worst of eager and graph rows)."""
    targets = []
    for provider in _fused_backends(_timed(find_rows(rows, section="op"))) or ["freeu_kernels"]:
        targets += [
            _limit_target(f"fused op >= 85% of the copy ceiling on {GPU_CEILING_SHAPE}x2 fp16 (42 MB)", provider,
                          _op_rows_of(rows, provider, GPU_CEILING_SHAPE, "fp16"), "pct_of_copy", 85.0, False, _pct),
            _limit_target("<= 1.05x torch.cat on every case", provider, _op_rows_of(rows, provider),
                          "vs_torch_cat", 1.05, True, _ratio),
            _limit_target(">= 20x faster than diffusers' path on every case", provider, _op_rows_of(rows, provider),
                          "speedup_vs_diffusers", 20.0, False, _ratio),
        ]
    targets.append(_unet_target(rows))
    return targets


def _unet_target(rows: List[Dict]) -> Dict:
    text = "FreeU overhead <= 0.5% of an SDXL 1024px step (fp16, batch 2)"
    real = _timed(r for r in find_rows(rows, section="unet", provider=FUSED_FREEU)
                  if r["case"].startswith("SDXL base 1024px"))
    if not real:
        return _target(text, FUSED_FREEU, "-", NOT_MEASURED)
    measured = ", ".join(f"{r['mode']} {r['overhead_pct']:+.2f}%" + (
        "" if r["overhead_p20_pct"] is None else f" (p20..p80 {r['overhead_p20_pct']:+.2f}%..{r['overhead_p80_pct']:+.2f}%)")
        for r in real)
    worst = max(r["overhead_pct"] for r in real)
    return _target(text, FUSED_FREEU, measured, MET if worst <= 0.5 else NOT_MET)


def evaluate_targets(rows: List[Dict], device_type: str) -> List[Dict]:
    """The issue's targets for this device type, each with what was measured and a verdict."""
    return _cpu_targets(rows) if device_type == "cpu" else _gpu_targets(rows)


def _op_summary_rows(rows: List[Dict], mode: str) -> List[List[str]]:
    """One line per op case: the baselines, the best freeu_kernels backend and its ratios."""
    timed = _timed(find_rows(rows, section="op", mode=mode))
    keys = []
    for row in timed:
        key = (row["case"], row["x_shape"], row["h_shape"], row["dtype"])
        if key not in keys:
            keys.append(key)
    table = []
    for case, x_shape, h_shape, dtype in keys:
        group = {r["provider"]: r for r in timed if (r["case"], r["x_shape"], r["h_shape"], r["dtype"]) ==
                 (case, x_shape, h_shape, dtype)}
        fused = [r for name, r in group.items() if is_fused(name)]
        best = min(fused, key=lambda r: r["median_us"]) if fused else None

        def median(name):
            return _time(group[name]["median_us"]) if name in group else "-"

        any_row = next(iter(group.values()))
        table.append([
            case, f"b{any_row['x_shape'].strip('()').split(',')[0]}", dtype, f"{any_row['bytes'] / 1e6:.1f}",
            median(DIFFUSERS), median(REFERENCE), median(TORCH_CAT), median(COPY),
            "-" if best is None else f"{best['provider']} {_time(best['median_us'])}",
            "-" if best is None else _ratio(best["speedup_vs_diffusers"]),
            "-" if best is None else _ratio(best["vs_torch_cat"]),
            "-" if best is None else _pct(best["pct_of_copy"]),
        ])
    return table


_SUMMARY_HEADERS = ("case", "batch", "dtype", "MB moved", "diffusers", "reference", "torch.cat", "copy",
                    "best freeu_kernels", "vs diffusers", "vs torch.cat", "% of copy")


def _unet_rows(rows: List[Dict]) -> List[List[str]]:
    table = []
    for row in find_rows(rows, section="unet"):
        if row["median_us"] is None:
            table.append([row["case"], row["mode"], row["provider"], "-", "-", "-", "-", row["note"]])
            continue
        overhead = noise = "-"
        if row["overhead_pct"] is not None and row["provider"] != NO_FREEU:
            overhead = f"{row['overhead_pct']:+.2f}%"
            if row["overhead_p20_pct"] is not None:
                noise = f"{row['overhead_p20_pct']:+.2f}% .. {row['overhead_p80_pct']:+.2f}%"
        table.append([row["case"], row["mode"], row["provider"], _time(row["median_us"]),
                      f"{_time(row['p20_us'])} - {_time(row['p80_us'])}", overhead, noise, row["check"] or ""])
    return table


_UNET_HEADERS = ("model", "mode", "FreeU", "median step", "p20 - p80", "overhead", "overhead p20 .. p80",
                 "output check")


def _unet_noise(rows: List[Dict]) -> List[str]:
    lines = ["- overhead = median over rounds of (FreeU step / no-FreeU step - 1), both timed in the same round; "
             "'overhead p20 .. p80' is the spread of those per-round values. An overhead inside its spread is "
             "not resolved by this run."]
    for row in _timed(find_rows(rows, section="unet", provider=NO_FREEU)):
        spread = (row["p80_us"] - row["p20_us"]) / row["median_us"] * 100
        lines.append(f"- {row['case']} {row['mode']}: the no-FreeU step's own p20-p80 spread is {spread:.1f}% of "
                     f"its median.")
    return lines


def build_summary(rows: List[Dict], environment: Dict) -> Dict:
    """Targets, crossover findings and the op summary tables, as data (also stored in results.json)."""
    crossover = summarize_crossover(rows)
    return {
        "targets": evaluate_targets(rows, environment["device_type"]),
        "crossover": crossover,
        "crossover_verdict": crossover_verdict(crossover),
        "op_summary": {mode: _op_summary_rows(rows, mode) for mode in ("eager", "graph")
                       if find_rows(rows, section="op", mode=mode)},
    }


def _targets_lines(summary: Dict, device_type: str) -> List[str]:
    lines = _table(("target", "provider", "measured", "verdict"),
                   ([t["target"], t["provider"], t["measured"], t["verdict"]] for t in summary["targets"]))
    if device_type == "cpu":
        lines += ["", "The GPU targets (>= 85% of the copy ceiling, <= 1.05x torch.cat, >= 20x faster than "
                      "diffusers, <= 0.5% of an SDXL step) need a CUDA run; this CPU run does not measure them."]
    return lines


def _environment_lines(environment: Dict, settings: Dict) -> List[str]:
    llc = environment.get("cpu_llc_bytes")
    lines = [
        f"- device: {environment['device']}",
        f"- torch {environment['torch']}, triton {environment['triton']}, CUDA {environment['cuda']}, "
        f"diffusers {environment['diffusers']}, Python {environment['python']}",
        f"- date: {environment['date']}; commit: {environment['commit']}",
        f"- settings: {', '.join(f'{k}={v}' for k, v in settings.items())}",
    ]
    if environment["device_type"] == "cpu":
        lines.append(f"- CPU kernel library (backend 'cpu'): {environment.get('cpu_kernel', 'not recorded')}")
        lines += [
            f"- torch threads: {environment['torch_threads']}; 1-minute load average at start "
            f"{environment['load_average_start']}, at end {environment.get('load_average_end')} (other processes "
            "share these CPUs: times are medians of interleaved repetitions, see p20-p80 for the spread)",
            "- timing: time.perf_counter per call after warm-up, no cache flush. Inputs smaller than the last-level "
            f"cache ({'unknown' if llc is None else f'{llc / 2**20:.0f} MiB'}) stay cache-resident between repetitions, "
            "so small cases report cache bandwidth, not DRAM bandwidth.",
            "- CPU allocation: glibc hands allocations above its mmap threshold (at most 32 MiB) back to the OS when "
            "they are freed, so a provider whose output is that large page-faults it in on every call (torch.cat "
            "and the FreeU providers allocate their output; copy writes into a preallocated one). Cases with a "
            "> 32 MiB output therefore show torch.cat well below the copy ceiling.",
        ]
    else:
        lines.append("- timing: CUDA events per call after warm-up, a 256 MiB buffer zeroed before each call (L2 "
                     "flushed); 'graph' rows replay the call captured in a CUDA graph (no launch overhead). 'host' "
                     "is the host-side time of an eager call: where it exceeds the median, the op is launch-bound "
                     "in eager mode and the event time understates it.")
    return lines


def _per_case_lines(rows: List[Dict]) -> List[str]:
    lines = []
    op_rows = find_rows(rows, section="op")
    families = []
    for row in op_rows:
        if row["families"].split()[0] not in families:
            families.append(row["families"].split()[0])
    headers = ("provider", "mode", "median", "p20 - p80", "host", "GB/s", "% of copy", "vs torch.cat",
               "vs diffusers", "check", "note")
    for family in families:
        lines += ["", f"### {family}"]
        in_family = [r for r in op_rows if r["families"].split()[0] == family]
        seen = []
        for row in in_family:
            key = (row["case"], row["x_shape"], row["h_shape"], row["dtype"])
            if key in seen:
                continue
            seen.append(key)
            group = [r for r in in_family if (r["case"], r["x_shape"], r["h_shape"], r["dtype"]) == key]
            lines += ["", f"**{row['case']}** x {row['x_shape']} + h {row['h_shape']} {row['dtype']}, "
                          f"{row['bytes'] / 1e6:.1f} MB moved (also in: {row['families']})", ""]
            lines += _table(headers, (
                [r["provider"], r["mode"], _time(r["median_us"]),
                 "-" if r["median_us"] is None else f"{_time(r['p20_us'])} - {_time(r['p80_us'])}",
                 _time(r["host_us"]), "-" if r["gbps"] is None else f"{r['gbps']:.1f}", _pct(r["pct_of_copy"]),
                 _ratio(r["vs_torch_cat"]), _ratio(r["speedup_vs_diffusers"]), r["check"] or "", r["note"] or ""]
                for r in group))
    return lines


def _crossover_lines(summary: Dict) -> List[str]:
    lines = []
    for item in summary["crossover"]:
        lines += ["", f"**{item['provider']} vs fft**, {item['x_shape']} {item['dtype']}, {item['mask']} mask", ""]
        lines += _table(("threshold", "frequencies per axis", "low-rank", "fft", "faster"), (
            [t, f, _time(low), _time(fft), "low-rank" if low <= fft else "fft"]
            for t, f, low, fft in zip(item["thresholds"], item["frequencies"], item["lowrank_us"], item["fft_us"])))
    if summary["crossover_verdict"]:
        lines += [""] + [f"- {line}" for line in summary["crossover_verdict"]]
    return lines


def _problem_lines(rows: List[Dict]) -> List[str]:
    problems = [r for r in rows if r["median_us"] is None or (r["check"] or "").startswith("MISMATCH")]
    return [f"- {r['section']} {r['case']} {r['x_shape'] or ''} {r['dtype'] or ''} {r['provider']} {r['mode']}: "
            f"{r['check'] if (r['check'] or '').startswith('MISMATCH') else r['note']}" for r in problems]


def render_markdown(environment: Dict, settings: Dict, rows: List[Dict], summary: Dict,
                    plots: Sequence[str] = ()) -> str:
    """The whole report.md."""
    device_type = environment["device_type"]
    lines = ["# freeu_kernels benchmark report", ""] + _environment_lines(environment, settings)
    lines += ["", "Bytes moved per case = 2 (|x| + |h|) (inputs read once, output written once); GB/s = bytes / "
                  "median time; '% of copy' = copy-ceiling time / this time, same case and mode; 'vs torch.cat' = "
                  "this time / torch.cat time (1.00x = FreeU for free); 'vs diffusers' = diffusers time / this time."]
    lines += ["", "## Targets", ""] + _targets_lines(summary, device_type)
    for mode, table in summary["op_summary"].items():
        lines += ["", f"## Op summary ({mode})", ""] + _table(_SUMMARY_HEADERS, table)
    unet_table = _unet_rows(rows)
    if unet_table:
        lines += ["", "## U-Net step", ""]
        lines += _table(_UNET_HEADERS, unet_table)
        lines += [""] + _unet_noise(rows)
        notes = sorted({r["note"] for r in find_rows(rows, section="unet") if r["note"]})
        lines += [f"- {note}" for note in notes]
    if summary["crossover"]:
        lines += ["", "## Low-rank vs FFT crossover", ""]
        lines += ["Low-rank = the backend forced onto its low-rank filter at every threshold; fft = the torch "
                  "backend forced onto its FFT path. Same inputs, interleaved repetitions (bench/README.md)."]
        lines += _crossover_lines(summary)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    lines += ["", "## Per-case results"] + _per_case_lines(rows)
    problems = _problem_lines(rows)
    if problems:
        lines += ["", "## Skipped, failed and mismatched", ""] + problems
    return "\n".join(lines) + "\n"


def render_summary_text(environment: Dict, summary: Dict, rows: List[Dict]) -> str:
    """What ``python -m bench`` prints at the end: the op summary, the U-Net overheads, targets, crossover."""
    lines = [f"device: {environment['device']} | torch {environment['torch']} | commit {environment['commit']}"]
    for mode, table in summary["op_summary"].items():
        lines += ["", f"Op summary ({mode}):"] + _table(_SUMMARY_HEADERS, table)
    unet_table = _unet_rows(rows)
    if unet_table:
        lines += ["", "U-Net step:"] + _table(_UNET_HEADERS, unet_table)
    lines += ["", "Targets:"] + _targets_lines(summary, environment["device_type"])
    if summary["crossover_verdict"]:
        lines += ["", "Crossover:"] + [f"- {line}" for line in summary["crossover_verdict"]]
    return "\n".join(lines)
