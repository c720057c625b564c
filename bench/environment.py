"""What a result was measured on: device, library versions, date, commit, CPU threads and load."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Dict, Optional

import torch

__all__ = ["collect_environment", "pick_device", "last_level_cache_bytes", "load_average", "host_isa"]

_REPO_ROOT = Path(__file__).resolve().parent.parent


def pick_device(requested: Optional[str] = None) -> torch.device:
    """The requested device, else cuda when present, else cpu. Raises ValueError for an unusable request."""
    if requested in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {requested!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {requested!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was requested but torch sees no CUDA device")
    return device


def _cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_isa() -> str:
    """The vector instruction set of the host CPU, as the cpu kernel's copies are split: "AVX-512" (the
    x86-64-v4 subset: F, BW, CD, DQ, VL; "+BF16" when AVX512_BF16 is there too), "AVX2" (x86-64-v3: AVX2,
    FMA, BMI2), else "other (<machine>)" (ARM, Apple, older x86)."""
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        return "AVX-512" + ("+BF16" if "avx512_bf16" in flags else "")
    if {"avx2", "fma", "bmi2"} <= flags:
        return "AVX2"
    return f"other ({platform.machine()})"


def last_level_cache_bytes() -> Optional[int]:
    """Size of the largest CPU cache Linux reports (the LLC), or None where it is not exposed."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        multiplier = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * multiplier)
    return max(sizes) if sizes else None


def _git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _commit() -> str:
    commit = _git("rev-parse", "--short=12", "HEAD")
    if commit is None:
        return "unknown"
    # Uncommitted edits to tracked files make the commit an approximate label: say so.
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if dirty else "")


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "unknown")


def collect_environment(device: torch.device) -> Dict[str, object]:
    """Everything the report header and every results row carry about where and when they were measured."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        device_name = f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB)"
    else:
        device_name = f"{_cpu_model_name()} ({os.cpu_count()} logical CPUs)"
    return {
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none",
        "diffusers": _version("diffusers"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "torch_threads": torch.get_num_threads(),
        "cpu_llc_bytes": last_level_cache_bytes(),
        "load_average_start": load_average(),
        "cpu_kernel": _cpu_kernel(),
        "isa": f"{host_isa()}, cpu kernel {_cpu_kernel()}",
    }


def _cpu_kernel() -> str:
    """Which instruction-set copy the CPU kernel library runs, or why it is absent."""
    from freeu_kernels.backends import cpu_backend

    error = cpu_backend.load_error()
    return f"{cpu_backend.isa()} copy" if error is None else f"not available ({error})"


def load_average() -> Optional[float]:
    """1-minute load average (None where the OS has none): other work competing for the CPUs."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
