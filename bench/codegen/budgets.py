"""The issue-10 budgets of the codegen report, as data, and the check CI runs on the report's rows.

Budgets are on counted quantities only (instructions, widths, spills, bytes in flight and the model built on
them), never on wall time. A row that failed to build violates every budget that applies to it.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["Budget", "BUDGETS", "applicable", "evaluate", "check", "layout_vector_bits"]


@dataclass(frozen=True)
class Budget:
    """Limits for the rows whose case name matches ``cases`` (globs), dtype ``dtypes`` and arch ``archs``.

    ``vector_width``: load and store widths must reach :func:`layout_vector_bits` (what the layout allows)
    instead of a fixed ``min_access_bits``.
    """

    name: str
    cases: Tuple[str, ...]
    dtypes: Tuple[str, ...] = ("fp16", "bf16", "fp32")
    archs: Tuple[int, ...] = (90,)
    max_instructions_per_element: Optional[float] = None
    min_access_bits: Optional[int] = None
    vector_width: bool = False
    max_spill_bytes: Optional[int] = None
    min_bytes_in_flight_per_sm: Optional[float] = None
    min_fraction_of_copy: Optional[float] = None
    compile_seconds_reported: bool = False


BUDGETS: Tuple[Budget, ...] = (
    Budget("sdxl-t1-floor",
           cases=("sdxl-32x32-1280+1280", "sdxl-32x32-1280+640", "sdxl-64x64-640+640"),
           dtypes=("fp16", "bf16"),
           max_instructions_per_element=20, min_access_bits=128,
           min_bytes_in_flight_per_sm=32 * 1024, min_fraction_of_copy=0.85),
    Budget("small-planes-layouts-variants",
           cases=("sd15-8x8-*", "sd15-16x16-*", "*-cl", "video*", "*-v2", "*-t2radial"),
           max_instructions_per_element=35, vector_width=True),
    Budget("threshold-8", cases=("*-t8",), archs=(90, 80), compile_seconds_reported=True),
    # "No spills" belongs to every group of the issue (threshold 8 included): one budget for every row.
    Budget("no-spills", cases=("*",), archs=(90, 80), max_spill_bytes=0),
)


def layout_vector_bits(row: Dict) -> int:
    """The widest global access (<= 128 bits) the case's layout allows one thread.

    The contiguous run is a whole plane (H W elements) for contiguous tensors and the channel vector (C) for
    channels_last; the access width is the largest power of two of bits dividing that run's size in bits
    (both inputs and the output count: the smallest wins), capped at 128.
    """
    bits_per_element = 8 * row["element_size"]
    runs = []
    for shape in (row["x_shape"], row["h_shape"]):
        if row["channels_last"]:
            runs += [shape[1]]
        else:
            runs += [math.prod(shape[-2:])]
    if row["channels_last"]:
        runs.append(row["x_shape"][1] + row["h_shape"][1])
    width = 128
    for run in runs:
        bits = run * bits_per_element
        while width > bits_per_element and bits % width:
            width //= 2
    return width


def applicable(row: Dict) -> List[Budget]:
    """The budgets that apply to one report row."""
    return [
        budget for budget in BUDGETS
        if row["arch"] in budget.archs and row["dtype"] in budget.dtypes
        and any(fnmatch.fnmatch(row["case"], pattern) for pattern in budget.cases)
    ]


def _limit_violations(budget: Budget, row: Dict) -> List[str]:
    found = []
    ipe = row.get("instructions_per_element")
    if budget.max_instructions_per_element is not None and not ipe <= budget.max_instructions_per_element:
        found.append(f"{ipe:.1f} instructions per element > {budget.max_instructions_per_element:g}")
    width = layout_vector_bits(row) if budget.vector_width else budget.min_access_bits
    if width is not None:
        for kind in ("load", "store"):
            bits = row.get(f"{kind}_bits_min")
            if bits is None or bits < width:
                found.append(f"{kind}s of {bits} bits < {width}")
    if budget.max_spill_bytes is not None and not row.get("spill_bytes", math.inf) <= budget.max_spill_bytes:
        found.append(f"{row.get('spill_bytes')} spill bytes > {budget.max_spill_bytes}")
    if budget.min_bytes_in_flight_per_sm is not None:
        inflight = row.get("bytes_in_flight_per_sm") or 0
        if inflight < budget.min_bytes_in_flight_per_sm:
            found.append(f"{inflight / 1024:.1f} KiB in flight per SM < {budget.min_bytes_in_flight_per_sm / 1024:g}")
    if budget.min_fraction_of_copy is not None:
        for device in ("h100", "h200"):
            fraction = row.get(f"modelled_fraction_of_copy_{device}")
            if fraction is None or fraction < budget.min_fraction_of_copy:
                shown = "none" if fraction is None else f"{fraction:.0%}"
                found.append(f"modelled {shown} of the {device.upper()} copy ceiling "
                             f"< {budget.min_fraction_of_copy:.0%}")
    if budget.compile_seconds_reported and not (row.get("compile_seconds") or 0) > 0:
        found.append("compile time not reported")
    return found


def evaluate(row: Dict) -> List[Dict]:
    """One verdict per applicable budget: {"budget", "ok", "violations": [text, ...]}."""
    verdicts = []
    for budget in applicable(row):
        if row.get("error"):
            violations = [f"build failed: {row['error'].splitlines()[0]}"]
        else:
            violations = _limit_violations(budget, row)
        verdicts.append({"budget": budget.name, "ok": not violations, "violations": violations})
    return verdicts


def check(rows: Sequence[Dict]) -> List[str]:
    """Every violated budget of every row, one line each: "triton sdxl-64x64-640+640 fp16 sm_90 [budget]: ...".

    A row that failed to build gives one line naming all the budgets it therefore misses.
    """
    lines = []
    for row in rows:
        where = f"{row['backend']} {row['case']} {row['dtype']} sm_{row['arch']}"
        verdicts = evaluate(row)
        if row.get("error") and verdicts:
            names = ",".join(verdict["budget"] for verdict in verdicts)
            lines.append(f"{where} [{names}]: {verdicts[0]['violations'][0]}")
            continue
        for verdict in verdicts:
            lines += [f"{where} [{verdict['budget']}]: {text}" for text in verdict["violations"]]
    return lines
