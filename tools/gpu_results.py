"""Turn the files a GPU verification run left in $OUT into bench/results/<device>/, ready to commit.

    python tools/gpu_results.py /work/.device/.../out            # -> bench/results/nvidia-h200/
    python tools/gpu_results.py OUT --dest DIR                   # somewhere else

Reads what tools/gpu_verify.sh writes (summary.jsonl, facts.jsonl, correctness.jsonl, op_timing.jsonl,
sanitizer.jsonl, pytest.jsonl, bench_quick.tar.gz) and writes:
  report.md      device, versions, date and commit; every stage's status; the correctness checks
                 (failures first); the op timing tables (time per mode, GB/s, % of copy, vs torch.cat,
                 vs the FFT reference, extra peak memory); sanitizer errors; test failures;
  results.json   every JSON line of every file, by file (the raw evidence);
  op_timing.png  graph-mode time per shape and provider (when matplotlib is installed);
  bench_quick/   the unpacked `python -m bench --quick` output, when the run got that far.
A file the run did not get to write is reported as missing, not an error: a run cut short still gives
a report of what it measured. The device folder name comes from the device name ("NVIDIA H200" ->
nvidia-h200; a dry run -> cpu-dry-run).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
FILES = ("summary", "facts", "correctness", "op_timing", "sanitizer", "pytest")
STAGES = ("facts_build", "correctness", "op_timing", "memcheck", "racecheck", "pytest_cuda", "pytest_triton", "bench_quick")


def read_jsonl(path: Path) -> List[Dict]:
    """The JSON objects of a JSON-lines file; a line cut off mid-write (a killed stage) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def device_slug(facts: List[Dict]) -> str:
    """'NVIDIA H200' -> 'nvidia-h200'; a dry run -> 'cpu-dry-run'; unknown -> 'unknown-device'."""
    versions = next((r for r in facts if r.get("kind") == "versions"), {})
    if versions.get("dry_run"):
        return "cpu-dry-run"
    name = versions.get("device") or versions.get("smi_name") or "unknown device"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _table(headers: List[str], rows: List[List]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines


def stage_rows(summary: List[Dict]) -> List[List]:
    """The last record of each stage (a stage killed with the whole run stays 'started')."""
    last: Dict[str, Dict] = {}
    for record in summary:
        last[record["stage"]] = record
    rows = []
    for stage in STAGES:
        r = last.get(stage)
        rows.append([stage, r["status"], r["seconds"], r["limit_s"], r.get("note", "")] if r else
                    [stage, "not reached", None, None, ""])
    return rows


def correctness_section(records: List[Dict]) -> List[str]:
    """Counts, failures first, then every oracle check, then graph and stream checks."""
    oracle = [r for r in records if r.get("kind") == "oracle"]
    failed = [r for r in records if r.get("kind") in ("oracle", "graph", "stream", "unavailable") and not r.get("ok")]
    lines = ["## Correctness (float64 oracle)", ""]
    if not records:
        return lines + ["Not reached (no correctness.jsonl lines).", ""]
    summary = next((r for r in records if r.get("kind") == "summary"), None)
    warm = next((r for r in records if r.get("kind") == "warmup"), None)
    lines.append(f"{len(oracle)} oracle checks, {sum(1 for r in oracle if r.get('ok'))} ok; "
                 f"{len(failed)} failed check(s) of any kind." + ("" if summary else " The stage did not finish."))
    if warm:
        lines.append(f"Triton warm-up: {warm.get('done')} of {warm.get('items')} kernels in {warm.get('seconds')} s "
                     f"with {warm.get('workers')} processes (longest {_fmt(warm.get('max_item_s'))} s); {warm.get('note')}.")
    lines.append("")
    if failed:
        lines += ["### Failures", ""]
        lines += _table(["kind", "case", "backend", "dtype", "max abs err", "err / bound", "error"],
                        [[r["kind"], r.get("case"), r.get("backend"), r.get("dtype"), r.get("max_abs_err"),
                          r.get("worst_ratio"), (r.get("error") or r.get("reason") or "")[:160]] for r in failed])
        lines.append("")
    lines += ["### Every oracle check", "",
              "Bound per element: atol * max(max|ref|, max|input|) + rtol * |ref| (tests/conftest.py's table); "
              "err / bound <= 1 passes.", ""]
    lines += _table(["case", "backend", "dtype", "layout", "options", "max abs err", "err / bound", "ok"],
                    [[r.get("case"), r.get("backend"), r.get("dtype"), r.get("layout"), json.dumps(r.get("options") or {}),
                      r.get("max_abs_err"), r.get("worst_ratio"), r.get("ok")] for r in oracle])
    others = [r for r in records if r.get("kind") in ("graph", "stream")]
    if others:
        lines += ["", "### CUDA graph replay (b, s changed between replays) and a non-default stream", ""]
        lines += _table(["kind", "case", "backend", "mode", "worst err / bound", "ok"],
                        [[r["kind"], r.get("case"), r.get("backend"), r.get("mode"),
                          max((p.get("worst_ratio") or 0 for p in r.get("replays", [])), default=r.get("worst_ratio")),
                          r.get("ok")] for r in others])
    return lines + [""]


def timing_section(records: List[Dict]) -> List[str]:
    """One table per (shape, dtype): every provider's time per mode and the ratios of the graph mode."""
    lines = ["## Op timing", ""]
    if not records:
        return lines + ["Not reached (no op_timing.jsonl lines).", ""]
    meta = next((r for r in records if r.get("kind") == "meta"), {})
    ceiling = next((r for r in records if r.get("kind") == "ceiling"), None)
    lines.append(f"Method: {meta.get('method')}. Bytes per call: 2 (|x| + |h|). b = {meta.get('b')}, s = {meta.get('s')}.")
    if ceiling:
        lines.append(f"Large device-to-device copy (1 GiB, read + write): {_fmt(ceiling.get('gbps'), 4)} GB/s.")
    if not any(r.get("kind") == "done" for r in records):
        lines.append("The stage did not finish: the tables hold the shapes it got to.")
    lines.append("")
    groups: Dict = {}
    for r in records:
        if r.get("kind") == "timing":
            groups.setdefault((r["shape"], r["dtype"]), {}).setdefault(r["provider"], {})[r.get("mode")] = r
    for (shape, dtype), providers in groups.items():
        any_row = next(iter(next(iter(providers.values())).values()))
        lines += [f"### {shape} {dtype}: x {tuple(any_row['x_shape'])}, h {tuple(any_row['h_shape'])}, "
                  f"{any_row['bytes'] / 1e6:.2f} MB moved", ""]
        rows = []
        for provider, modes in providers.items():
            eager, graph, loop = modes.get("eager", {}), modes.get("graph", {}), modes.get("loop", {})
            best = graph if "median_us" in graph else eager
            error = " ".join(m.get("error", "") for m in modes.values() if m.get("error"))[:120]
            extra = eager.get("extra_peak_bytes")
            rows.append([provider, eager.get("median_us"), graph.get("median_us"), loop.get("median_us"),
                         best.get("gbps"), best.get("pct_of_copy"), best.get("vs_torch_cat"),
                         best.get("speedup_vs_reference"), None if extra is None else extra / 2**20,
                         eager.get("check_vs_reference"), error])
        lines += _table(["provider", "eager us", "graph us", "loop us", "GB/s", "% of copy", "vs torch.cat",
                         "x faster than reference", "extra peak MiB", "diff vs reference (rel.)", "error"], rows)
        lines.append("")
    overhead = [r for r in records if r.get("kind") == "overhead"]
    if overhead:
        lines += ["### Per-call overhead (host time, tiny input)", "",
                  f"x and h {tuple(overhead[0]['x_shape'])} {overhead[0]['dtype']}; {overhead[0]['calls_per_round']} "
                  f"calls back to back per round, the clock stopped before the synchronisation, median of "
                  f"{overhead[0]['rounds']} rounds; target (issue 15): every freeu row <= 2x the trivial custom_op.", ""]
        lines += _table(["provider", "host us per call", "vs trivial custom_op"],
                        [[r["provider"], r.get("host_us"), r.get("vs_trivial_op")] for r in overhead])
        lines.append("")
    lines.append("Ratios use the graph mode where it was measured, else eager. extra peak MiB: peak allocated "
                 "during one call minus what stays allocated (the output). diff vs reference (rel.): max |fused - "
                 "reference| / max |reference| against the reference provider's float32 FFT output, a guard "
                 "(the accuracy check is the correctness section).")
    return lines + [""]


def sanitizer_section(records: List[Dict]) -> List[str]:
    """Per tool: the sanitizer's error count and the driver's failed cases."""
    lines = ["## compute-sanitizer", ""]
    if not records:
        return lines + ["Not reached.", ""]
    for tool in dict.fromkeys(r.get("tool") for r in records if r.get("kind") == "sanitizer"):
        summary = [r for r in records if r.get("kind") == "sanitizer" and r.get("tool") == tool][-1]
        cases = [r for r in records if r.get("kind") == "case" and str(r.get("tool", "")).startswith(tool)]
        bad = [r for r in cases if not r.get("ok")]
        lines.append(f"- {tool}: {_fmt(summary.get('errors'))} sanitizer error(s), exit {summary.get('exit')}; "
                     f"{len(cases)} driver case(s), {len(bad)} failed" + (f" ({summary['note']})" if summary.get("note") else ""))
        lines += [f"  - {r.get('backend')} {r.get('case')}: {r.get('error')}" for r in bad]
    return lines + [""]


def pytest_section(records: List[Dict]) -> List[str]:
    """Counts per pass and every failure."""
    lines = ["## Tests on the device", ""]
    if not records:
        return lines + ["Not reached.", ""]
    for label in dict.fromkeys(r.get("label") for r in records):
        tests = [r for r in records if r.get("kind") == "test" and r.get("label") == label]
        session = next((r for r in records if r.get("kind") == "session" and r.get("label") == label), None)
        counts: Dict[str, int] = {}
        for r in tests:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        state = f"exit {session['exitstatus']}" if session else "cut off at its time limit"
        lines.append(f"- {label}: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + f" ({state})")
    failures = [r for r in records if r.get("kind") == "test" and "failed" in r.get("outcome", "")]
    if failures:
        lines += ["", "### Failures", ""]
        for r in failures:
            last = [line for line in (r.get("longrepr") or "").splitlines() if line.strip()]
            lines.append(f"- `{r['nodeid']}` ({r['outcome']}): {last[-1][:200] if last else ''}")
    return lines + [""]


def plot(records: List[Dict], path: Path) -> Optional[str]:
    """op_timing.png: graph-mode (else eager) microseconds per shape and provider; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in records if r.get("kind") == "timing" and "median_us" in r and r.get("mode") in ("graph", "eager")]
    if not rows:
        return None
    best: Dict = {}
    for r in rows:  # graph wins over eager for the same (shape, dtype, provider)
        key = (f"{r['shape']} {r['dtype']}", r["provider"])
        if key not in best or r["mode"] == "graph":
            best[key] = r["median_us"]
    groups = list(dict.fromkeys(k[0] for k in best))
    providers = list(dict.fromkeys(k[1] for k in best))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        ax.bar([g + i * width for g in range(len(groups))], [best.get((grp, provider), 0) for grp in groups],
               width, label=provider)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("microseconds per call (graph replay where measured)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_results(out_dir: Path, dest: Optional[Path] = None) -> Path:
    """Reads ``out_dir``, writes report.md, results.json (and op_timing.png, bench_quick/) into the device folder."""
    data = {name: read_jsonl(out_dir / f"{name}.jsonl") for name in FILES}
    dest = dest or ROOT / "bench" / "results" / device_slug(data["facts"])
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    versions = next((r for r in data["facts"] if r.get("kind") == "versions"), {})
    library = next((r for r in data["facts"] if r.get("kind") == "library"), {})
    missing = [f"{name}.jsonl" for name in FILES if not (out_dir / f"{name}.jsonl").exists()]
    title = versions.get("device") or ("CPU dry run" if versions.get("dry_run") else "unknown device")
    lines = [f"# GPU verification: {title}", "",
             f"Run {versions.get('date')} (UTC), commit {versions.get('commit')}, by `bash tools/gpu_verify.sh`"
             + (" --dry-run (CPU: Triton interpreter and CUDA emulator; no GPU numbers)" if versions.get("dry_run") else "")
             + "; turned into this folder by `python tools/gpu_results.py`.", ""]
    if missing:
        lines += [f"Missing from the run's output: {', '.join(missing)}.", ""]
    lines += ["## Device and versions", ""]
    keys = ["device", "capability", "sms", "l2_bytes", "total_memory_bytes", "smi_driver_version", "smi_clocks_sm",
            "smi_clocks_max_sm", "smi_clocks_mem", "smi_clocks_max_mem", "smi_power_limit", "smi_pstate", "python",
            "torch", "torch_cuda", "triton", "nvcc", "compute_sanitizer", "diffusers", "cpu_count"]
    lines += _table(["fact", "value"], [[k, versions.get(k)] for k in keys if k in versions])
    lines += ["", "## Stages", ""]
    lines += _table(["stage", "status", "seconds", "limit s", "note"], stage_rows(data["summary"]))
    lines += ["", "## CUDA kernel library", "",
              f"load error: {library.get('load_error')}; available backends: {library.get('available_backends')}", ""]
    if library.get("kernels"):
        lines += _table(["dtype", "registers", "local bytes", "max threads"],
                        [[k["dtype"], k["registers"], k["local_bytes"], k["max_threads"]] for k in library["kernels"]])
        lines.append("")
    lines += correctness_section(data["correctness"])
    lines += timing_section(data["op_timing"])
    picture = plot(data["op_timing"], dest / "op_timing.png")
    if picture:
        lines += [f"![op timing]({picture})", ""]
    lines += sanitizer_section(data["sanitizer"])
    lines += pytest_section(data["pytest"])
    archive = out_dir / "bench_quick.tar.gz"
    lines += ["## python -m bench --quick", ""]
    if archive.exists():
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and not Path(m.name).is_absolute() and ".." not in m.name]
            try:
                tar.extractall(dest, members=members, filter="data")
            except TypeError:  # Python without extraction filters (< 3.11.4); the members are checked above
                tar.extractall(dest, members=members)
        lines.append("Its own report: [bench_quick/report.md](bench_quick/report.md).")
    else:
        lines.append("Not reached (no bench_quick.tar.gz).")
    (dest / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dest


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="the folder a gpu_verify.sh run wrote ($OUT, as fetched)")
    parser.add_argument("--dest", type=Path, help="output folder (default bench/results/<device>/)")
    args = parser.parse_args(argv)
    if not args.out_dir.is_dir():
        parser.error(f"out_dir {args.out_dir} is not a folder")
    dest = write_results(args.out_dir, args.dest)
    print(f"wrote {dest}/report.md and results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
