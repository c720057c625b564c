"""The Triton target of the codegen report: compile what ``fused_concat_triton`` would launch, without a GPU.

For a case, :func:`build` asks the launcher's own :func:`freeu_kernels.backends.triton_backend.launch_plan`
for the grid, num_warps, runtime integers and constexprs a GPU launch would use (b and s as 0-d float32
tensors on the device, as bench/providers.py and the diffusers integration pass them; version 2 with its
float32 scale map), binds them through Triton's own JIT binder for the target (so the specialisations are
exactly a launch's: integers equal to 1 become constants, integers divisible by 16 and 16-byte aligned
pointers get ``tt.divisibility``; meta tensors stand in for the data, their address 0 being aligned as a
CUDA allocation is) and compiles with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``.

Three compiles per case, of the same kernel source: ``ROLE_BOTH`` (what the launcher launches: its registers,
spills and shared memory are the build's, and its compile time is the JIT time a first call pays), and
``ROLE_SKIP`` / ``ROLE_BACKBONE``, the program-level branch resolved at compile time, so each role's SASS
holds its path only. Loop trip counts are known from the plan: the skip role's runtime loops are the row
chunks (swept planes) and the band's columns and rows (bands past the unrolled size); the backbone role has
no loop.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from freeu_kernels.backends import triton_backend as launcher
from freeu_kernels.backends import triton_kernels as kernels
from freeu_kernels.spec import allocate_output

from . import sass
from .model import CodegenCase, KernelBuild, RoleCode

__all__ = ["build"]


def _plan(case: CodegenCase):
    """(plan, spec, x, h, out) for the case as a GPU launch would see it (meta tensors)."""
    x, h = case.tensors("meta")
    spec = case.spec()
    out = allocate_output(x, spec.skip_channels)
    has_map = spec.version == 2 and spec.window[1] > spec.window[0]
    plan = launcher.launch_plan(spec, launcher.logical_strides(x), launcher.logical_strides(h),
                                launcher.logical_strides(out), "cuda", True, has_map)
    return plan, spec, x, h, out


def _compile(case: CodegenCase, arch: int, role: int):
    """triton.compile of the kernel with the launch's bound arguments and ``ROLE`` = role; (kernel, seconds)."""
    plan, spec, x, h, out = _plan(case)
    return compile_launch(plan, spec, x, h, out, arch, role, factors_in_memory=True)


def compile_launch(plan, spec, x, h, out, arch: int, role: int, factors_in_memory: bool = True):
    """Compile ``plan`` (from launch_plan) for sm_``arch`` as a launch on tensors like x, h, out would bind it.

    The tensors only lend their dtype, strides and an aligned address (meta tensors do). Returns
    (compiled kernel, compile seconds).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    fn = kernels.freeu_concat_kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    table = torch.empty(1, dtype=torch.float32, device="meta")
    scale_map = torch.empty(1, dtype=torch.float32, device="meta")
    factor = torch.empty((), dtype=torch.float32, device="meta")
    kwargs = dict(plan.scalars, **dict(plan.constexprs, ROLE=role), **plan.options)
    factors = (factor, factor, 0.0, 0.0) if factors_in_memory else (x, x, 1.25, 0.5)
    args = (x, h, out, scale_map if plan.constexprs["HAS_MAP"] else x, table, *factors, spec.high_gain)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    # A fresh cache folder: every compile is a real one (its time is a first call's JIT time).
    previous = os.environ.get("TRITON_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            start = time.perf_counter()
            compiled = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
            seconds = time.perf_counter() - start
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous
    return compiled, seconds


def _spill_bytes(compiled, arch: int) -> int:
    """Spill bytes per thread (the larger of stores and loads) from ``ptxas -v`` on the kernel's PTX."""
    ptxas = sass.triton_bin_dir() / "ptxas"
    arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as folder:
        ptx = Path(folder) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        result = subprocess.run([str(ptxas), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch_name}",
                                 str(ptx), "-o", str(Path(folder) / "kernel.o")],
                                capture_output=True, text=True, check=True)
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.stderr)
    return max((max(int(a), int(b)) for a, b in found), default=0)


def _cubin_facts(compiled) -> Tuple[str, Dict[str, int]]:
    """(SASS text of the kernel's one function, its cuobjdump resource usage)."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        functions = sass.disassemble(cubin)
        usage = sass.resource_usage(cubin)
    if len(functions) != 1:
        raise RuntimeError(f"expected one function in the Triton cubin, found {sorted(functions)}")
    (text,) = functions.values()
    (resources,) = usage.values() if len(usage) == 1 else ({},)
    return text, resources


def _skip_loop_trips(plan) -> List[float]:
    """Trip counts of the skip role's runtime loops, in source (= header address) order.

    Loops whose bound is a specialised constant 1 (or that cannot run: an empty band) fold away at compile
    time and are not listed.
    """
    c = plan.constexprs
    s = plan.scalars
    if c["SWEEP"] == 2:  # column sums: chunks, the x-reduction's loop over the band's columns, chunks
        loops = [s["n_chunks"], s["nx"], s["n_chunks"]]
    elif c["SWEEP"] == 1:  # one-hot moments: chunks { columns { rows } }, twice
        loops = [s["n_chunks"], s["nx"], s["ny"]] * 2
    elif c["STATIC_BAND"]:
        loops = []
    else:  # plane in registers, runtime band: first-reduced axis { other axis }
        loops = [s["ny"], s["nx"]] if c["TRANSPOSE"] else [s["nx"], s["ny"]]
    return [float(t) for t in loops if t != 1]


def _role(name: str, text: str, trips: List[float], programs: int, threads: int, elements: float,
          note: str) -> RoleCode:
    loops = sass.find_loops(sass.parse(text))
    if len(loops) != len(trips):
        # The compiler kept, split or removed a loop against the plan's expectation: no honest count exists,
        # so the build fails (and its row misses every budget) rather than guessing trip counts.
        raise RuntimeError(f"{name} role: the SASS has {len(loops)} loops, the plan expects {len(trips)} "
                           f"(trips {trips}):\n{sass.loop_summary(sass.parse(text))}")
    return RoleCode(role=name, sass=text, loop_trips=trips, programs=programs, threads_per_program=threads,
                    elements_per_program=elements, note=note)


def build(case: CodegenCase, arch: int) -> KernelBuild:
    """Compile the launch ``fused_concat_triton`` would make for ``case`` on an sm_``arch`` GPU."""
    plan, spec, _, _, _ = _plan(case)
    threads = 32 * plan.num_warps
    launched, seconds = _compile(case, arch, kernels.ROLE_BOTH)
    _, resources = _cubin_facts(launched)
    spills = _spill_bytes(launched, arch) if resources.get("LOCAL", 0) or resources.get("STACK", 0) else 0
    plane = spec.frames * spec.height * spec.width
    roles = []
    if plan.skip_programs:
        compiled, _ = _compile(case, arch, kernels.ROLE_SKIP)
        text, _ = _cubin_facts(compiled)
        skip_elements = spec.batch * spec.skip_channels * plane
        c = plan.constexprs
        path = {0: "plane in registers", 1: "two sweeps over row chunks, one-hot moments",
                2: "two sweeps over row chunks, per-thread column sums"}[c["SWEEP"]]
        band = "unrolled band" if c["STATIC_BAND"] else "runtime band loops"
        roles.append(_role("skip", text, _skip_loop_trips(plan), plan.skip_programs, threads,
                           skip_elements / plan.skip_programs,
                           f"{c['BLOCK_P']} planes/program, {path}, {band}"))
    if plan.backbone_programs:
        compiled, _ = _compile(case, arch, kernels.ROLE_BACKBONE)
        text, _ = _cubin_facts(compiled)
        backbone_elements = spec.batch * spec.backbone_channels_total * plane
        mode = {kernels.BACKBONE_PLANES: "flat planes", kernels.BACKBONE_CHANNELS_LAST: "channels_last",
                kernels.BACKBONE_STRIDED: "strided"}[plan.constexprs["BACKBONE_MODE"]]
        roles.append(_role("backbone", text, [], plan.backbone_programs, threads,
                           backbone_elements / plan.backbone_programs, f"scaled copy, {mode}"))
    launch = dict(grid=list(plan.grid), num_warps=plan.num_warps, skip_programs=plan.skip_programs,
                  backbone_programs=plan.backbone_programs, **plan.constexprs,
                  factors="0-d float32 tensors on the device")
    notes = [f"ROLE_BOTH compile (the launched kernel) {seconds:.1f} s; roles compiled alone for counting"]
    return KernelBuild(
        backend="triton", case=case, arch=arch, registers=int(resources.get("REG", 0)), spill_bytes=spills,
        shared_bytes=int(launched.metadata.shared), threads_per_program=threads, compile_seconds=seconds,
        roles=roles, launch=launch, notes=notes,
    )
