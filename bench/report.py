"""report.md and the end-of-run summary: tables a person reads, and the targets stated against measurements.

Every number printed here comes from a row measured in this run; a target whose case was not run says
"not measured" instead of borrowing a number from elsewhere.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .crossover import crossover_verdict, summarize_crossover
from .memory import METHODS as MEMORY_METHODS
from .names import (BASELINES, COPY, DIFFUSERS, FLOAT_FACTORS, FUSED_FREEU, FUSED_PREFIX, NO_FREEU, NOT_SUPPORTED,
                    REFERENCE, TORCH_CAT, TRIVIAL_OP, VIA_DISPATCHER, fused_backend, fused_provider_name, is_fused)
from .results import find_rows
from .timing import format_seconds

__all__ = ["build_summary", "render_markdown", "render_summary_text", "evaluate_targets"]

MET, NOT_MET, NOT_MEASURED = "met", "NOT met", "not measured"

# The shapes the targets name (SDXL at 1024 px, batch 2).
SDXL_TARGET_SHAPES = ("(2,1280,32,32)", "(2,640,64,64)")
GPU_CEILING_SHAPE = "(2,640,64,64)"
# Per-call overhead on the tiny input, x the trivial custom op timed in the same run (host time on CUDA).
OVERHEAD_LIMIT = 2.0


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
                  at_most: bool, show, where=_where) -> Dict:
    """Verdict of the worst candidate row's ``column`` against ``limit`` (``at_most``: value <= limit);
    ``where`` names the worst row when there are several."""
    measured = [row for row in candidates if row[column] is not None]
    if not measured:
        return _target(text, provider, "-", NOT_MEASURED)
    pick = max if at_most else min
    worst = pick(measured, key=lambda row: row[column])

    def within(value):
        return value <= limit if at_most else value >= limit

    summary = show(worst[column])
    if len(measured) > 1:
        summary = (f"worst {summary} ({where(worst)}); "
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


def _overhead_targets(rows: List[Dict]) -> List[Dict]:
    """Per backend in the overhead section: every way of calling it timed there (fused_concat, torch.ops,
    float factors) costs at most OVERHEAD_LIMIT x the trivial custom op; the worst of them decides."""
    text = f"per-call overhead <= {OVERHEAD_LIMIT:g}x {TRIVIAL_OP} (tiny input)"
    overhead = [row for row in find_rows(rows, section="overhead") if is_fused(row["provider"])]
    backends = list(dict.fromkeys(fused_backend(row["provider"]) for row in overhead))  # in the run's order
    if not backends:
        return [_target(text, FUSED_PREFIX, "-", NOT_MEASURED)]
    return [_limit_target(text, fused_provider_name(backend),
                          [row for row in overhead if fused_backend(row["provider"]) == backend],
                          "vs_trivial_op", OVERHEAD_LIMIT, True, _ratio, where=lambda row: row["provider"])
            for backend in backends]


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
    """The issue's targets for this device type, each with what was measured and a verdict: the op-level
    ones of the device type, then the per-call overhead (the same target on every device)."""
    return (_cpu_targets(rows) if device_type == "cpu" else _gpu_targets(rows)) + _overhead_targets(rows)


def _case_key(row: Dict):
    return row["case"], row["x_shape"], row["h_shape"], row["dtype"]


def _case_groups(rows: Iterable[Dict]) -> List[Dict[str, Dict]]:
    """Rows grouped by case (in first-seen order), each group keyed by provider."""
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for row in rows:
        groups.setdefault(_case_key(row), {})[row["provider"]] = row
    return list(groups.values())


def _default_name(group: Dict[str, Dict]) -> Optional[str]:
    """The provider name of the backend the automatic choice picks for this case (None if unknown)."""
    backend = next(iter(group.values())).get("default_backend")
    return None if backend is None else fused_provider_name(backend)


def _batch(row: Dict) -> str:
    return f"b{row['x_shape'].strip('()').split(',')[0]}"


def _op_summary_rows(rows: List[Dict], mode: str) -> List[List[str]]:
    """One line per op case: the baselines, the default backend (what a user gets) with its ratios, and the
    fastest backend measured."""
    table = []
    for group in _case_groups(_timed(find_rows(rows, section="op", mode=mode))):
        fused = [r for name, r in group.items() if is_fused(name)]
        best = min(fused, key=lambda r: r["median_us"]) if fused else None
        default_name = _default_name(group)
        default = group.get(default_name)

        def median(name):
            return _time(group[name]["median_us"]) if name in group else "-"

        any_row = next(iter(group.values()))
        if default is not None:
            default_cells = [f"{default_name} {_time(default['median_us'])}", _ratio(default["speedup_vs_diffusers"]),
                             _ratio(default["vs_torch_cat"]), _pct(default["pct_of_copy"])]
        else:
            default_cells = [f"{default_name or 'unknown'}: not measured", "-", "-", "-"]
        table.append([
            any_row["case"], _batch(any_row), any_row["dtype"], f"{any_row['bytes'] / 1e6:.1f}",
            median(DIFFUSERS), median(REFERENCE), median(TORCH_CAT), median(COPY), *default_cells,
            "-" if best is None else f"{best['provider']} {_time(best['median_us'])}",
        ])
    return table


_SUMMARY_HEADERS = ("case", "batch", "dtype", "MB moved", "diffusers", "reference", "torch.cat", "copy",
                    "default backend (automatic choice)", "vs diffusers", "vs torch.cat", "% of copy",
                    "fastest backend measured")


def _size(count: Optional[float]) -> str:
    """Bytes with a binary unit and 3 significant digits: 512 B, 4.00 KiB, 160 MiB, 1.60 GiB."""
    if count is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= scale:
            return f"{_significant(count / scale)} {unit}"
    return f"{int(count)} B"


def _ordered_providers(groups: Sequence[Dict[str, Dict]], column: str) -> List[str]:
    """Providers with a value in ``column``: the baselines first (in BASELINES order), then the backends."""
    present = {name for group in groups for name, row in group.items() if row.get(column) is not None}
    return [name for name in BASELINES if name in present] + sorted(name for name in present if is_fused(name))


def _memory_rows(rows: List[Dict]) -> Tuple[List[str], List[List[str]]]:
    """Per op case: the output's size and each provider's peak extra memory (x the output)."""
    groups = _case_groups(find_rows(rows, section="op", mode="eager"))
    providers = [name for name in _ordered_providers(groups, "peak_extra_bytes") if name != COPY]
    headers = ["case", "batch", "dtype", "output"] + providers + ["default backend"]
    table = []
    for group in groups:
        any_row = next(iter(group.values()))
        output = any_row["bytes"] / 2  # bytes moved = 2 (|x| + |h|) = 2 |output|

        def cell(name):
            value = group.get(name, {}).get("peak_extra_bytes")
            return "-" if value is None else f"{_size(value)} ({_ratio(value / output)})"

        default_name = _default_name(group)
        table.append([any_row["case"], _batch(any_row), any_row["dtype"], _size(output)]
                     + [cell(name) for name in providers]
                     + [f"{default_name}: {cell(default_name)}" if default_name in group else "-"])
    return headers, table


def _ops_rows(rows: List[Dict]) -> Tuple[List[str], List[List[str]]]:
    """Per op case: the aten operators one call of each provider issues."""
    groups = _case_groups(find_rows(rows, section="op", mode="eager"))
    providers = [name for name in _ordered_providers(groups, "aten_ops") if name != COPY]
    table = []
    for group in groups:
        any_row = next(iter(group.values()))
        default_name = _default_name(group)
        table.append([any_row["case"], _batch(any_row), any_row["dtype"]] + [
            "-" if group.get(name, {}).get("aten_ops") is None
            else str(group[name]["aten_ops"]) + (" (default)" if name == default_name else "")
            for name in providers])
    return ["case", "batch", "dtype"] + providers, table


def _overhead_rows(rows: List[Dict]) -> List[List[str]]:
    table = []
    for row in find_rows(rows, section="overhead"):
        name = row["provider"]
        is_default = row.get("default_backend") and name == fused_provider_name(row["default_backend"])
        label = name + (" (default)" if is_default else "")
        if row["median_us"] is None:
            table.append([label, "-", "-", "-", "-", "-", row["note"] or ""])
            continue
        table.append([label, _time(row["median_us"]), _time(row["host_us"]), _ratio(row["vs_torch_cat"]),
                      _ratio(row["vs_trivial_op"]), "-" if row["aten_ops"] is None else str(row["aten_ops"]), ""])
    return table


_OVERHEAD_HEADERS = ("provider", "median per call", "host", "vs torch.cat", "vs trivial custom_op",
                     "aten ops per call", "note")


def _unet_rows(rows: List[Dict]) -> List[List[str]]:
    table = []
    for row in find_rows(rows, section="unet"):
        if row["median_us"] is None:
            table.append([row["case"], row["mode"], row["provider"], "-", "-", "-", "-", "-", row["note"]])
            continue
        overhead = noise = "-"
        if row["overhead_pct"] is not None and row["provider"] != NO_FREEU:
            overhead = f"{row['overhead_pct']:+.2f}%"
            if row["overhead_p20_pct"] is not None:
                noise = f"{row['overhead_p20_pct']:+.2f}% .. {row['overhead_p80_pct']:+.2f}%"
        table.append([row["case"], row["mode"], row["provider"], _time(row["median_us"]),
                      f"{_time(row['p20_us'])} - {_time(row['p80_us'])}", overhead, noise,
                      _size(row.get("peak_extra_bytes")), row["check"] or ""])
    return table


_UNET_HEADERS = ("model", "mode", "FreeU", "median step", "p20 - p80", "overhead", "overhead p20 .. p80",
                 "peak memory of one step", "output check")


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
    lines.append(f"- instruction set: {environment.get('isa', 'not recorded')} (on every row, column 'isa')")
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
               "vs diffusers", "peak extra memory", "aten ops", "check", "note")
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
            default_name = _default_name({r["provider"]: r for r in group})
            lines += _table(headers, (
                [r["provider"] + (" (default)" if r["provider"] == default_name else ""), r["mode"],
                 _time(r["median_us"]),
                 "-" if r["median_us"] is None else f"{_time(r['p20_us'])} - {_time(r['p80_us'])}",
                 _time(r["host_us"]), "-" if r["gbps"] is None else f"{r['gbps']:.1f}", _pct(r["pct_of_copy"]),
                 _ratio(r["vs_torch_cat"]), _ratio(r["speedup_vs_diffusers"]), _size(r.get("peak_extra_bytes")),
                 "-" if r.get("aten_ops") is None else str(r["aten_ops"]), r["check"] or "", r["note"] or ""]
                for r in group))
    return lines


def _not_supported_lines(rows: List[Dict]) -> List[str]:
    """One line per crossover series whose backend cannot hold the larger masks (a limit, not a failure)."""
    series: Dict[tuple, List[int]] = {}
    for row in find_rows(rows, section="crossover"):
        if (row["note"] or "").startswith(NOT_SUPPORTED):
            series.setdefault((row["provider"], row["x_shape"], row["dtype"], row["mask"]), []).append(row["threshold"])
    return [f"- {provider} {x_shape} {dtype} {mask} mask: threshold{'s' if len(thresholds) > 1 else ''} "
            f"{', '.join(map(str, sorted(thresholds)))} "
            f"{NOT_SUPPORTED} (more frequencies per axis than its kernel holds; the op runs such masks on the FFT path)"
            for (provider, x_shape, dtype, mask), thresholds in series.items()]


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
    problems = [r for r in rows if (r["median_us"] is None and not (r["note"] or "").startswith(NOT_SUPPORTED))
                or (r["check"] or "").startswith("MISMATCH")]
    return [f"- {r['section']} {r['case']} {r['x_shape'] or ''} {r['dtype'] or ''} {r['provider']} {r['mode']}: "
            f"{r['check'] if (r['check'] or '').startswith('MISMATCH') else r['note']}" for r in problems]


def _memory_lines(rows: List[Dict], device_type: str) -> List[str]:
    headers, table = _memory_rows(rows)
    if not table:
        return []
    return ["", "## Peak memory per call", "",
            "Peak extra memory of one call: the most it held at once above what was allocated before it (its "
            "output included, its inputs not); in parentheses, x the output's size. torch.cat's value is its "
            f"output. Method: {MEMORY_METHODS.get(device_type, 'bench/memory.py')}.", ""] + _table(headers, table)


def _ops_lines(rows: List[Dict]) -> List[str]:
    headers, table = _ops_rows(rows)
    if not table:
        return []
    return ["", "## Operators per call", "",
            "aten operators one call issues (torch.profiler, ops not nested in another aten op): on an accelerator "
            "each is at least one kernel launch, on a CPU each compute op is a parallel region.", ""
            ] + _table(headers, table)


def _overhead_lines(rows: List[Dict]) -> List[str]:
    table = _overhead_rows(rows)
    if not table:
        return []
    return ["", "## Per-call overhead", "",
            "A (1,4,8,8) + (1,4,8,8) float32 input, where a call's time is its fixed cost; timed interleaved in this "
            "run. 'trivial custom_op' is a torch.library.custom_op (with a fake and an autograd formula) whose body "
            "is torch.cat: the cost of the custom-op machinery alone. freeu_kernels[NAME] is fused_concat(x, h, b, "
            "s, backend=NAME) with b, s 0-d tensors (as the diffusers integration calls it); "
            f"'{VIA_DISPATCHER}' is torch.ops.freeu.fused_concat called directly (the dispatcher: a traced graph, "
            f"or a user calling the op); '{FLOAT_FACTORS}' is fused_concat(x, h, 1.3, 0.9) with no backend "
            f"named. Target: every row of a backend <= {OVERHEAD_LIMIT:g}x the trivial custom_op. Ratios use the "
            "host time on CUDA.", ""
            ] + _table(_OVERHEAD_HEADERS, table)


def render_markdown(environment: Dict, settings: Dict, rows: List[Dict], summary: Dict,
                    plots: Sequence[str] = (), plot_note: Optional[str] = None) -> str:
    """The whole report.md (``plot_note``: why plots are absent, when they are)."""
    device_type = environment["device_type"]
    lines = ["# freeu_kernels benchmark report", ""]
    if settings.get("partial"):
        lines += [f"**partial: {settings['partial']}.** Everything below comes from the cases that finished; "
                  "targets and summaries whose cases did not run say \"not measured\".", ""]
    lines += _environment_lines(environment, settings)
    lines += ["", "Bytes moved per case = 2 (|x| + |h|) (inputs read once, output written once); GB/s = bytes / "
                  "median time; '% of copy' = copy-ceiling time / this time, same case and mode; 'vs torch.cat' = "
                  "this time / torch.cat time (1.00x = FreeU for free); 'vs diffusers' = diffusers time / this time. "
                  "'default' = the backend fused_concat runs when none is named (freeu_kernels.resolve_backend for "
                  "the case on this machine): what a user gets."]
    lines += ["", "## Targets", ""] + _targets_lines(summary, device_type)
    for mode, table in summary["op_summary"].items():
        lines += ["", f"## Op summary ({mode})", ""] + _table(_SUMMARY_HEADERS, table)
    lines += _memory_lines(rows, device_type)
    lines += _overhead_lines(rows)
    lines += _ops_lines(rows)
    unet_table = _unet_rows(rows)
    if unet_table:
        lines += ["", "## U-Net step", ""]
        lines += _table(_UNET_HEADERS, unet_table)
        lines += [""] + _unet_noise(rows)
        lines += ["- peak memory of one step: above the weights and inputs (its activations included), method as "
                  "in 'Peak memory per call'."]
        notes = sorted({r["note"] for r in find_rows(rows, section="unet") if r["note"]})
        lines += [f"- {note}" for note in notes]
    if summary["crossover"]:
        lines += ["", "## Low-rank vs FFT crossover", ""]
        lines += ["Low-rank = the backend forced onto its low-rank filter at every threshold; fft = the torch "
                  "backend forced onto its FFT path. Same inputs, interleaved repetitions (bench/README.md)."]
        lines += _crossover_lines(summary)
        unsupported = _not_supported_lines(rows)
        if unsupported:
            lines += [""] + unsupported
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    elif plot_note:
        lines += ["", "## Plots", "", plot_note]
    lines += ["", "## Per-case results"] + _per_case_lines(rows)
    problems = _problem_lines(rows)
    if problems:
        lines += ["", "## Skipped, failed and mismatched", ""] + problems
    return "\n".join(lines) + "\n"


def render_summary_text(environment: Dict, summary: Dict, rows: List[Dict]) -> str:
    """What ``python -m bench`` prints at the end: the op summary, overhead, U-Net overheads, targets, crossover."""
    lines = [f"device: {environment['device']} | {environment.get('isa')} | torch {environment['torch']} | "
             f"commit {environment['commit']}"]
    for mode, table in summary["op_summary"].items():
        lines += ["", f"Op summary ({mode}):"] + _table(_SUMMARY_HEADERS, table)
    overhead = _overhead_rows(rows)
    if overhead:
        lines += ["", "Per-call overhead, (1,4,8,8)x2 fp32:"] + _table(_OVERHEAD_HEADERS, overhead)
    unet_table = _unet_rows(rows)
    if unet_table:
        lines += ["", "U-Net step:"] + _table(_UNET_HEADERS, unet_table)
    lines += ["", "Targets:"] + _targets_lines(summary, environment["device_type"])
    if summary["crossover_verdict"]:
        lines += ["", "Crossover:"] + [f"- {line}" for line in summary["crossover_verdict"]]
    return "\n".join(lines)
