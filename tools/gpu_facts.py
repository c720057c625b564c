"""Stage 1 of tools/gpu_verify.sh: versions and device facts, then what the built CUDA library reports.

    python tools/gpu_facts.py versions --out facts.jsonl    # before the build
    python tools/gpu_facts.py library --out facts.jsonl     # after it: load error, kernel info, backends

``versions``: one JSON line with python, torch (and the CUDA it was built with), Triton, nvcc,
compute-sanitizer, the driver, and the device: name, compute capability, multiprocessors, L2 bytes,
memory, the clocks nvidia-smi reads (current and maximum SM and memory clocks, power limit), date, commit.
``library``: one line with the CUDA kernel library's path and load error, the per-dtype kernel report
(registers, local-memory bytes, max threads: freeu_kernel_info, where the library exports it) and
``available_backends``. In a dry run the device fields are null and ``library`` loads the CPU emulator.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

import gpu_common  # tools/ is sys.path[0] when run as a script
from gpu_common import JsonLines, Target

import torch  # noqa: E402

SMI_FIELDS = ["name", "driver_version", "compute_cap", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem",
              "power.limit", "memory.total", "temperature.gpu", "pstate"]


def _run(cmd: List[str]) -> Optional[str]:
    """stdout of cmd, or None where it is missing or fails (a fact we could not read is null, not an error)."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def nvidia_smi() -> Dict[str, Optional[str]]:
    """The SMI_FIELDS of GPU 0 as nvidia-smi reports them (units stripped), or {} without nvidia-smi."""
    text = _run(["nvidia-smi", f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits", "-i", "0"])
    if not text:
        return {}
    values = [v.strip() for v in text.splitlines()[0].split(",")]
    return {f"smi_{k.replace('.', '_')}": v for k, v in zip(SMI_FIELDS, values)}


def versions(target: Target) -> Dict:
    """Software versions and device facts."""
    record = dict(kind="versions", date=gpu_common.utc_now(), commit=gpu_common.git_commit(), dry_run=target.dry_run,
                  python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                  cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  triton_interpret=os.environ.get("TRITON_INTERPRET"))
    try:
        import triton

        record["triton"] = triton.__version__
    except ImportError as error:
        record["triton"] = f"not importable: {error}"
    nvcc = _run(["nvcc", "--version"])
    record["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    sanitizer = _run(["compute-sanitizer", "--version"])
    record["compute_sanitizer"] = sanitizer.splitlines()[-1] if sanitizer else None
    record["pytest_timeout"] = _has_module("pytest_timeout")
    record["pytest_xdist"] = _has_module("xdist")
    record["diffusers"] = _has_module("diffusers")
    record["matplotlib"] = _has_module("matplotlib")
    record["cpu_count"] = os.cpu_count()
    if target.is_cuda:
        props = torch.cuda.get_device_properties(0)
        record.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                      l2_bytes=getattr(props, "L2_cache_size", None), total_memory_bytes=props.total_memory,
                      device_count=torch.cuda.device_count())
        for name in ("clock_rate", "memory_clock_rate", "memory_bus_width"):  # newer torch only
            if hasattr(props, name):
                record[name] = getattr(props, name)
    else:
        record.update(device=None, capability=None, sms=None, l2_bytes=None)
    record.update(nvidia_smi())
    return record


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def library(target: Target) -> Dict:
    """What the built CUDA library (the emulator in a dry run) reports, and the backends available."""
    import freeu_kernels
    from freeu_kernels.backends import cuda_backend

    record = dict(kind="library", dry_run=target.dry_run)
    if target.dry_run:
        record["library"] = os.environ.get(gpu_common.ENV_EMULATOR)
        record["load_error"] = target.why_unavailable("cuda")
        lib = target.emulator() if record["load_error"] is None else None
    else:
        record["library"] = str(cuda_backend.library_path())
        record["load_error"] = cuda_backend.load_error()
        lib = cuda_backend.load_library(cuda_backend.library_path()) if record["load_error"] is None else None
    kernels = []
    if lib is not None and hasattr(lib, "freeu_kernel_info") and target.is_cuda:
        for code, name in ((0, "float32"), (1, "float16"), (2, "bfloat16")):
            regs, local, threads = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
            rc = lib.freeu_kernel_info(code, ctypes.byref(regs), ctypes.byref(local), ctypes.byref(threads))
            kernels.append(dict(dtype=name, rc=rc, registers=regs.value, local_bytes=local.value,
                                max_threads=threads.value))
    record["kernels"] = kernels
    record["available_backends"] = freeu_kernels.available_backends(target.device)
    record["ok"] = record["load_error"] is None
    return record


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["versions", "library"])
    gpu_common.parse_args_common(parser)
    args = parser.parse_args(argv)
    target = Target(args.dry_run)
    out = JsonLines(args.out)
    record = out.write(versions(target) if args.what == "versions" else library(target))
    out.close()
    return 0 if record.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
