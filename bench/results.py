"""The long-format results table: one row per (section, case, provider, mode), and its JSON/CSV files.

Sections: "op" (one concat, every provider), "overhead" (the fixed cost of one call on a tiny input),
"crossover" (low-rank vs FFT by threshold), "unet" (one U-Net step). ``host_us`` (CUDA only) is the median
host-side time of a call (dispatch and launches). ``peak_extra_bytes`` and ``aten_ops`` come from one
untimed call (bench/memory.py): the most memory the call held at once above what was allocated when it
started (its output included), and the aten operators it issued. ``default_backend`` is the backend
``fused_concat``'s automatic choice runs for the case on this machine. ``isa`` names the host CPU's
instruction set and the copy the cpu kernel runs (bench/environment.py).
Derived columns are computed from rows measured in the same run only:

    gbps                  bytes / median time                         (op, crossover)
    pct_of_copy           copy median / this median * 100              same case and mode
    vs_torch_cat          this median / torch.cat median               same case and mode (overhead
                          section: host time on CUDA, as vs_trivial_op)
    speedup_vs_diffusers  diffusers median / this median               same case and mode
    vs_trivial_op         this time / the trivial custom op's time     overhead section; host time on CUDA
    overhead_pct          FreeU step / no-FreeU step - 1, in %         same model and mode (unet): the
                          median over rounds of the per-round ratio (paired: both were timed in the same
                          round, under the same background load); overhead_p20_pct / overhead_p80_pct are
                          the 20th/80th percentiles of those per-round values, the noise of the estimate
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, TextIO

from .cases import SHORT_DTYPE, Case
from .names import COPY, DIFFUSERS, NO_FREEU, TORCH_CAT, TRIVIAL_OP
from .timing import Timing, quantile

__all__ = ["COLUMNS", "ROWS_LOG", "RowLog", "result_row", "add_derived_metrics", "write_json", "write_csv", "find_rows"]

COLUMNS = [
    "section", "case", "families", "provider", "mode", "dtype", "x_shape", "h_shape", "threshold", "mask",
    "bytes", "median_us", "p20_us", "p80_us", "reps", "host_us", "gbps", "pct_of_copy", "vs_torch_cat",
    "speedup_vs_diffusers", "vs_trivial_op", "overhead_pct", "overhead_p20_pct", "overhead_p80_pct",
    "peak_extra_bytes", "aten_ops", "default_backend", "check", "note", "method", "device", "isa", "torch",
    "triton", "cuda", "date", "commit",
]

# The file a run appends its rows to while it goes (RowLog), beside report.md, results.json and results.csv.
ROWS_LOG = "results.jsonl"

# Columns every row carries from the run's environment.
ENVIRONMENT_COLUMNS = ("device", "isa", "torch", "triton", "cuda", "date", "commit")


def _shape_text(shape) -> str:
    return "(" + ",".join(str(d) for d in shape) + ")"


def result_row(section: str, case: Optional[Case], provider: str, mode: str, timing: Optional[Timing],
               environment: Dict, *, check: str = "", note: str = "", case_name: Optional[str] = None,
               **extra) -> Dict:
    """One results row. ``timing`` None records a provider that could not run (``note`` says why)."""
    row = {column: None for column in COLUMNS}
    row.update(section=section, provider=provider, mode=mode, check=check, note=note)
    if case is not None:
        row.update(
            case=case.name, families=" ".join(case.families), dtype=SHORT_DTYPE[case.dtype],
            x_shape=_shape_text(case.x_shape), h_shape=_shape_text(case.h_shape), threshold=case.threshold,
            mask=case.mask, bytes=case.bytes_moved,
        )
    if case_name is not None:
        row["case"] = case_name
    if timing is not None:
        row.update(median_us=timing.median_s * 1e6, p20_us=timing.p20_s * 1e6, p80_us=timing.p80_s * 1e6,
                   reps=timing.reps, method=timing.method,
                   host_us=None if timing.host_median_s is None else timing.host_median_s * 1e6,
                   round_medians_us=[t * 1e6 for t in timing.round_medians_s])
        if row["bytes"]:
            row["gbps"] = row["bytes"] / timing.median_s / 1e9
    row.update({key: environment.get(key) for key in ENVIRONMENT_COLUMNS})
    unknown = set(extra) - set(COLUMNS)
    if unknown:
        raise ValueError(f"extra must name results columns, got {sorted(unknown)}")
    row.update(extra)
    return row


def _group_key(row: Dict):
    return (row["section"], row["case"], row["dtype"], row["x_shape"], row["h_shape"], row["threshold"],
            row["mask"], row["mode"])


def find_rows(rows: Iterable[Dict], **criteria) -> List[Dict]:
    """Rows whose columns equal every given criterion (e.g. provider='torch.cat', mode='eager')."""
    return [row for row in rows if all(row.get(key) == value for key, value in criteria.items())]


def add_derived_metrics(rows: List[Dict]) -> List[Dict]:
    """Fill pct_of_copy, vs_torch_cat, speedup_vs_diffusers, vs_trivial_op and overhead_pct from rows of the
    same group."""
    groups: Dict[tuple, Dict[str, Dict]] = {}
    for row in rows:
        if row["median_us"] is not None:
            groups.setdefault(_group_key(row), {})[row["provider"]] = row
    for row in rows:
        median = row["median_us"]
        if median is None:
            continue
        peers = {name: peer["median_us"] for name, peer in groups[_group_key(row)].items()}
        if COPY in peers:
            row["pct_of_copy"] = peers[COPY] / median * 100
        if row["section"] == "overhead" and TORCH_CAT in peers:
            row["vs_torch_cat"] = _call_cost(row) / _call_cost(groups[_group_key(row)][TORCH_CAT])
        elif TORCH_CAT in peers:
            row["vs_torch_cat"] = median / peers[TORCH_CAT]
        if DIFFUSERS in peers:
            row["speedup_vs_diffusers"] = peers[DIFFUSERS] / median
        if row["section"] == "overhead" and TRIVIAL_OP in peers:
            row["vs_trivial_op"] = _call_cost(row) / _call_cost(groups[_group_key(row)][TRIVIAL_OP])
        if row["section"] == "unet" and NO_FREEU in peers:
            _add_overhead(row, groups[_group_key(row)][NO_FREEU])
    return rows


def _call_cost(row: Dict) -> float:
    """The per-call cost the overhead section compares: host time on CUDA (the GPU side of a tiny call is
    a few microseconds of launch latency), the wall time on a CPU."""
    return row["host_us"] if row.get("host_us") is not None else row["median_us"]


def _add_overhead(row: Dict, baseline: Dict) -> None:
    """overhead_pct from per-round ratios when both rows have the same rounds, else from the medians."""
    mine, theirs = row.get("round_medians_us") or [], baseline.get("round_medians_us") or []
    if mine and len(mine) == len(theirs):
        per_round = sorted((a / b - 1) * 100 for a, b in zip(mine, theirs))
        row.update(overhead_pct=quantile(per_round, 0.5), overhead_p20_pct=quantile(per_round, 0.2),
                   overhead_p80_pct=quantile(per_round, 0.8))
    else:
        row["overhead_pct"] = (row["median_us"] / baseline["median_us"] - 1) * 100


def write_json(path: Path, environment: Dict, settings: Dict, rows: List[Dict], summary: Dict) -> None:
    """results.json: the environment, the run's settings, every row and the summary (targets, crossover)."""
    payload = {"environment": environment, "settings": settings, "columns": COLUMNS, "rows": rows,
               "summary": summary}
    Path(path).write_text(json.dumps(payload, indent=1, default=str) + "\n")


def write_csv(path: Path, rows: List[Dict]) -> None:
    """results.csv: the rows in COLUMNS order (empty cells for values that do not apply)."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in COLUMNS})


class RowLog:
    """The rows of a run as its cases finish: kept in memory and, given a path, appended to a JSON-lines file.

    Each finished case (an op case, a crossover point, a U-Net model, the overhead probe) is one ``add``:
    its rows get their derived columns (every group of add_derived_metrics lies inside one case), are
    written one JSON object per line and flushed, so the file holds every finished case even when the
    process is killed before it can write anything else. ``cases`` counts the adds per section.
    """

    def __init__(self, path: Optional[Path] = None):
        self.rows: List[Dict] = []
        self.cases: Dict[str, int] = {}
        self.path = None if path is None else Path(path)
        self._handle: Optional[TextIO] = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(self.path, "w")  # a fresh file per run: no rows of an earlier run

    def add(self, section: str, rows: List[Dict]) -> None:
        """Record one finished case of ``section``: derive its ratios, append its rows, flush them to the file."""
        add_derived_metrics(rows)
        if self._handle is not None:
            # One write per case: an interruption lands between cases' lines, not inside one.
            self._handle.write("".join(json.dumps(row, default=str) + "\n" for row in rows))
            self._handle.flush()
        self.rows += rows
        self.cases[section] = self.cases.get(section, 0) + 1

    def close(self) -> None:
        """Close the file (the rows stay readable in ``rows``)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
