"""The device model of the codegen report: the copy ceiling, the issue budget, occupancy, Little's law.

Nothing here is measured by this code; every constant says where it comes from. The report quotes
:func:`model_text` so the numbers and the words cannot drift apart.

Issue budget. An SM has 4 schedulers, each issuing at most one warp instruction (32 thread-instructions)
per clock, so a chip issues ``SMs x 4 x clock x 32`` thread-instructions per second. A copy at the ceiling
moves ``ceiling / (2 x element size)`` output elements per second (each read once, written once). Their
ratio is the *issue budget*: the thread-instructions per output element a kernel may issue and still keep
up with the copy ceiling.

Memory-level parallelism (Little's law). To sustain a bandwidth B with a memory latency L, B x L bytes must
be outstanding; per SM, ``ceiling x latency / SMs``. The kernels' side of that equation is the load bytes a
thread issues before it waits for any of them (bench/codegen/sass.py :func:`loads_before_first_use`) x
threads per block x resident blocks per SM. The ceiling counts bytes read and written while only loads are
counted in flight, so the requirement is conservative by up to 2x for a pure copy.

Modelled fraction of the copy ceiling (a roofline with a latency-bound memory roof, assuming issue and
memory overlap perfectly, hence an upper bound on what the SASS allows):

    fraction = min(1, issue budget / instructions per element, bytes in flight per SM / required)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

__all__ = [
    "Device",
    "SMLimits",
    "DEVICES",
    "SM_LIMITS",
    "MEMORY_LATENCY_S",
    "blocks_per_sm",
    "modelled_fraction",
    "model_text",
]

# Loaded HBM latency assumed for Little's law. Unloaded DRAM latency on Hopper is roughly 500-700 ns in
# published microbenchmarks; at full bandwidth queueing adds to it. 800 ns is the upper end of the usual
# 600-800 ns range.
MEMORY_LATENCY_S = 800e-9


@dataclass(frozen=True)
class Device:
    """One GPU of the model: SM count, issue rate and the copy ceiling (bytes read + written per second)."""

    key: str
    title: str
    sms: int
    clock_hz: float
    datasheet_bandwidth: float
    copy_ceiling: float
    ceiling_source: str
    schedulers_per_sm: int = 4

    @property
    def issue_rate(self) -> float:
        """Thread-instructions the chip issues per second at most (one warp instruction per scheduler per clock)."""
        return self.sms * self.schedulers_per_sm * self.clock_hz * 32

    def issue_budget(self, element_size: int) -> float:
        """Thread-instructions per output element that keep pace with a copy at the ceiling."""
        if element_size <= 0:
            raise ValueError(f"element_size must be > 0, got {element_size}")
        elements_per_second = self.copy_ceiling / (2 * element_size)
        return self.issue_rate / elements_per_second

    def required_bytes_in_flight_per_sm(self, latency_s: float = MEMORY_LATENCY_S) -> float:
        """Little's law: copy ceiling x latency, shared by the SMs."""
        return self.copy_ceiling * latency_s / self.sms


DEVICES: Dict[str, Device] = {
    "h100": Device("h100", "H100 SXM", 132, 1.98e9, 3.35e12, 0.85 * 3.35e12,
                   "85% of the 3.35 TB/s datasheet bandwidth (no measurement here)"),
    "h200": Device("h200", "H200", 132, 1.98e9, 4.8e12, 4.3e12,
                   "device-to-device copy measured at about 4.3 TB/s on this workplace's H200 "
                   "(datasheet 4.8 TB/s)"),
}


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of one architecture (CUDA programming guide, compute capability tables)."""

    arch: int
    shared_per_sm: int
    registers: int = 65536
    max_threads: int = 2048
    max_blocks: int = 32
    max_registers_per_thread: int = 255
    register_unit: int = 256          # registers are allocated per warp in units of 256
    sub_partitions: int = 4           # each scheduler owns a quarter of the register file
    reserved_shared_per_block: int = 1024  # the driver reserves 1 KB of shared memory per block


SM_LIMITS: Dict[int, SMLimits] = {
    90: SMLimits(90, shared_per_sm=228 * 1024),
    80: SMLimits(80, shared_per_sm=164 * 1024),
}


def blocks_per_sm(arch: int, registers: int, shared_bytes: int, threads: int) -> Tuple[int, str]:
    """Resident blocks per SM and what limits them ("registers", "shared", "threads", "blocks").

    Registers: a warp takes ``ceil(registers x 32 / 256) x 256`` of its sub-partition's 16K registers and
    a block's warps spread over the 4 sub-partitions, so ``4 x floor(16384 / per warp)`` warps fit. Shared:
    ``shared_per_sm / (shared_bytes + 1 KB)``. 0 blocks means the launch cannot run.
    """
    if arch not in SM_LIMITS:
        raise ValueError(f"arch must be one of {sorted(SM_LIMITS)}, got {arch}")
    if threads <= 0 or registers < 0 or shared_bytes < 0:
        raise ValueError(f"threads must be > 0 and registers, shared_bytes >= 0, got {threads}, {registers}, "
                         f"{shared_bytes}")
    lim = SM_LIMITS[arch]
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(1, registers) * 32 / lim.register_unit) * lim.register_unit
    warps_by_registers = lim.sub_partitions * ((lim.registers // lim.sub_partitions) // per_warp)
    limits = {
        "registers": warps_by_registers // warps if registers <= lim.max_registers_per_thread else 0,
        "shared": lim.shared_per_sm // (shared_bytes + lim.reserved_shared_per_block),
        "threads": lim.max_threads // (warps * 32),
        "blocks": lim.max_blocks,
    }
    limiter = min(limits, key=lambda key: limits[key])
    return limits[limiter], limiter


def modelled_fraction(device: Device, instructions_per_element: float, element_size: int,
                      bytes_in_flight_per_sm: float, latency_s: float = MEMORY_LATENCY_S) -> Dict[str, float]:
    """The roofline of the module docstring: {"fraction", "issue_limit", "latency_limit"} (limits uncapped)."""
    budget = device.issue_budget(element_size)
    issue_limit = math.inf if instructions_per_element <= 0 else budget / instructions_per_element
    latency_limit = bytes_in_flight_per_sm / device.required_bytes_in_flight_per_sm(latency_s)
    return {
        "fraction": min(1.0, issue_limit, latency_limit),
        "issue_limit": issue_limit,
        "latency_limit": latency_limit,
    }


def model_text() -> str:
    """The device constants and derived budgets, as Markdown lines for the report."""
    lines = []
    for device in DEVICES.values():
        budgets = ", ".join(f"{name} {device.issue_budget(size):.0f}"
                            for name, size in (("fp16/bf16", 2), ("fp32", 4)))
        lines.append(
            f"- {device.title}: {device.sms} SMs x {device.schedulers_per_sm} schedulers x "
            f"{device.clock_hz / 1e9:.2f} GHz x 32 = {device.issue_rate / 1e12:.1f} T thread-instructions/s; "
            f"copy ceiling {device.copy_ceiling / 1e12:.2f} TB/s ({device.ceiling_source}); issue budget "
            f"per output element: {budgets}; Little's law at {MEMORY_LATENCY_S * 1e9:.0f} ns: "
            f"{device.required_bytes_in_flight_per_sm() / 1024:.1f} KiB in flight per SM."
        )
    for lim in SM_LIMITS.values():
        lines.append(
            f"- sm_{lim.arch}: {lim.registers // 1024}K registers, {lim.shared_per_sm // 1024} KB shared memory "
            f"(+{lim.reserved_shared_per_block // 1024} KB reserved per block), {lim.max_threads} threads and "
            f"{lim.max_blocks} blocks per SM."
        )
    return "\n".join(lines)
