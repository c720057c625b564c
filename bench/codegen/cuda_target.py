"""The CUDA target of the codegen report: compile what ``freeu_fused_concat`` would launch, without a GPU.

For a case, :func:`build`

1. asks the kernel's own planner for the launch: ``freeu_plan`` (csrc/freeu_fused_concat.cu, host code
   shared with the launcher, compiled here into the kernel's CPU emulator library with g++), called through
   the very argument filling of the "cuda" backend (``freeu_kernels.backends.c_abi.launch``) on CPU tensors
   of the case's shapes and layout (never written: the planning library launches nothing), with the SM
   count of an H100 / H200 (132). The plan cannot drift from the launcher: it is the launcher's code;
2. compiles csrc/freeu_fused_concat.cu once per architecture with nvcc (``-O3``, as setup.py builds it,
   plus ``-DFREEU_CODEGEN``, which adds analysis-only ``__global__`` wrappers: each runs one path of the
   shipped kernel through the same device functions, so each role's SASS holds its path only), reads
   registers and spills from ``-Xptxas -v`` (the shipped ``freeu_fused_concat_kernel<T>``'s are the
   build's) and disassembles with nvdisasm (Triton's wheel ships one);
3. returns one RoleCode per role of the plan (skip, backbone) with the trip count of every loop in its SASS
   from that plan.

Loop trips per path (the paths of csrc/README.md). Flat (the backbone, and the skip of an empty band) and
the register-tile filter are fully unrolled except, in the tile: the twiddle-table loop ((H + W) / 256 trips,
the mean over a block's threads), the moment butterfly (log2 min(Tp, 32) levels) and the sum over a plane's
warps (Tp / 32 when a plane spans several warps, else not entered). Loops are told apart by what they hold
(shuffles; shared loads only; the rest), and a count that does not match raises.

The generic filter (the shared-memory and two-sweep paths: bands wider than 3 frequencies, channels-last
planes without 16-byte channel vectors, planar planes of 128x128 and up, odd sizes) is compiled per
specialisation (``filter_variant<T, V, ON_CHIP, CL, TAB>``, the one the shipped kernel branches to), and the
channel-vector filter (``clvec_filter_task<T, NF, CENTRED>``: channels-last planes the tile does not take)
as one function per template. Their runtime loops are kept rolled (``#pragma unroll 1`` in the shipped
source too), so each source loop is one SASS loop. The SASS loops, nested by body containment in address
order, are matched to the source's loop nest (_filter_nest, _CLVEC_NEST; a loop must hold what its source
does: a barrier, a shuffle, a global load or store) and a mismatch raises. Trips are each loop's iterations
summed over every thread and block of the plan (the source's loop bounds evaluated in closed form from
freeu_plan's lanes, tile rows, group size and table choice; checked against a literal thread-by-thread
execution in tests/test_cuda_backend.py) divided by its parent's. Both sides of a branch inside a loop are
counted (an upper bound). The generic elementwise path (plane groups, any strides: no report case takes it)
is not counted: freeu_plan does not report its group size and rows per task.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from freeu_kernels.backends import c_abi

from . import devices, sass
from .model import CodegenCase, KernelBuild, RoleCode

__all__ = ["build", "launch_plan", "PlanningLibrary"]

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
SOURCE = CSRC / "freeu_fused_concat.cu"
THREADS = 256  # kThreads of the kernel (the plan reports it too)
NUM_SMS = devices.DEVICES["h100"].sms  # H100 SXM and H200 both have 132

# Itanium-mangled template arguments of the kernel's element types.
_TYPE_CODES = {"fp32": "f", "fp16": "6__half", "bf16": "13__nv_bfloat16"}
_PATHS = c_abi.PlanInfo.PATHS


def _nvcc() -> str:
    found = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if found is None:
        raise FileNotFoundError("nvcc (the CUDA target compiles csrc/freeu_fused_concat.cu)")
    return found


def _source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(CSRC.glob("*.h")) + [SOURCE] + sorted((CSRC / "emulate").glob("*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _cache_dir() -> Path:
    folder = Path(os.environ.get("FREEU_CODEGEN_CACHE", tempfile.gettempdir())) / f"freeu_codegen_cuda_{_source_hash()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.lru_cache(maxsize=None)
def _compiled(arch: int) -> Tuple[Path, str, float]:
    """(cubin, ptxas -v log, compile seconds) of the .cu with the analysis wrappers, all dtypes, one arch."""
    folder = _cache_dir()
    cubin, log = folder / f"sm{arch}.cubin", folder / f"sm{arch}.log"
    seconds_file = folder / f"sm{arch}.seconds"  # written last: marks a complete entry
    if not seconds_file.exists():
        # Built in a private folder and moved into place, so parallel workers never read a partial file.
        work = Path(tempfile.mkdtemp(dir=folder))
        started = time.perf_counter()
        cmd = [_nvcc(), "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-DFREEU_CODEGEN",
               "-gencode", f"arch=compute_{arch},code=sm_{arch}", f"-I{CSRC}", "-cubin", "-o",
               str(work / cubin.name), str(SOURCE)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"nvcc failed for sm_{arch}:\n{result.stderr[-3000:]}")
        (work / log.name).write_text(result.stdout + result.stderr)
        (work / seconds_file.name).write_text(f"{time.perf_counter() - started:.2f}")
        for path in (cubin, log, seconds_file):
            os.replace(work / path.name, path)
        shutil.rmtree(work, ignore_errors=True)
    return cubin, log.read_text(), float(seconds_file.read_text())


@functools.lru_cache(maxsize=None)
def _functions(arch: int) -> Dict[str, str]:
    return sass.disassemble(_compiled(arch)[0])


@functools.lru_cache(maxsize=None)
def _resources(arch: int) -> Dict[str, Dict[str, int]]:
    """{mangled name: {"registers", "spill_stores", "spill_loads", "stack"}} from ptxas -v."""
    usage: Dict[str, Dict[str, int]] = {}
    name = None
    for line in _compiled(arch)[1].splitlines():
        entry = re.search(r"Compiling entry function '([^']+)'", line)
        if entry:
            name = entry.group(1)
            usage[name] = {}
            continue
        if name is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            usage[name].update(stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                               spill_loads=int(frame.group(3)))
        regs = re.search(r"Used (\d+) registers", line)
        if regs:
            usage[name]["registers"] = int(regs.group(1))
    return usage


def _find(names, *parts: str) -> str:
    found = [name for name in names if all(part in name for part in parts)]
    if len(found) != 1:
        raise LookupError(f"expected one compiled function with {parts}, found {found}")
    return found[0]


@functools.lru_cache(maxsize=None)
def _planner() -> ctypes.CDLL:
    """The kernel's host code (freeu_plan) compiled for the CPU: csrc/emulate/freeu_emu.cpp, once."""
    lib = _cache_dir() / "libfreeu_plan.so"
    if not lib.exists():
        work = Path(tempfile.mkdtemp(dir=lib.parent))
        cxx = os.environ.get("CXX", "g++")
        subprocess.run([cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas", "-o",
                        str(work / lib.name), str(CSRC / "emulate" / "freeu_emu.cpp")], check=True,
                       capture_output=True)
        os.replace(work / lib.name, lib)
        shutil.rmtree(work, ignore_errors=True)
    return c_abi.load_library(lib)


class PlanningLibrary:
    """Stands in for a kernel library in ``c_abi.launch``: records ``freeu_plan``'s answer for the arguments,
    then launches through the library when ``launch`` (the emulator in the tests), else does nothing."""

    def __init__(self, lib: ctypes.CDLL, launch: bool = False):
        self._lib = lib
        self._launch = launch
        self.plan = None

    def freeu_fused_concat(self, args, stream):  # the signature c_abi.launch calls
        info = c_abi.PlanInfo()
        code = self._lib.freeu_plan(args, ctypes.byref(info))
        self.plan = info
        if code == 0 and self._launch:
            code = self._lib.freeu_fused_concat(args, stream)
        return code

    def __getattr__(self, name):
        return getattr(self._lib, name)


def launch_plan(case: CodegenCase, num_sms: int = NUM_SMS) -> c_abi.PlanInfo:
    """The plan ``freeu_fused_concat`` makes for the case on a GPU with ``num_sms`` SMs (b, s device tensors)."""
    x, h = case.tensors("cpu")  # torch.empty: pages are never touched
    spec = case.spec()
    scale_map = None
    if spec.version == 2 and spec.window[1] > spec.window[0]:
        # what the op passes: (b - 1) structure_map(x) + 1, a contiguous float32 (N, [F,] H, W) map
        scale_map = torch.empty((x.shape[0],) + tuple(x.shape[2:]), dtype=torch.float32)
    planning = PlanningLibrary(_planner())
    b, s = torch.tensor(1.2), torch.tensor(0.6)
    c_abi.launch(planning, x, h, b, s, spec, scale_map, num_sms=num_sms, factors_by_pointer=True)
    if planning.plan is None:
        raise RuntimeError("the launcher made no plan (empty output?)")
    return planning.plan


def _classify_tile_loops(instrs, plan: c_abi.PlanInfo, case: CodegenCase) -> List[float]:
    """Trip counts of the register-tile filter's loops, told apart by their contents."""
    x_shape = case.x_shape
    H, W = x_shape[-2], x_shape[-1]
    tp = plan.tile_threads_per_plane
    trips = []
    kinds = []
    for loop in sass.find_loops(instrs):
        body = [ins for ins in instrs if loop.holds(ins.addr)]
        bases = {ins.base for ins in body}
        if "SHFL" in bases:
            kinds.append("butterfly")
            trips.append(math.log2(min(tp, 32)))
        elif "LDS" in bases and "STS" not in bases:
            kinds.append("warp sum")
            trips.append(tp / 32 if tp > 32 else 0.0)
        else:
            kinds.append("twiddle table")
            trips.append((H + W) / THREADS)
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"unexpected loops in the tile filter's SASS: {kinds}")
    return trips


# Why a row of the generic elementwise path (plane groups, any strides: not taken by any report case) fails.
_UNMODELLED_PLANES = ("freeu_plan does not report that path's group size and rows per task (FreeuPlanInfo), "
                      "so its loops' trips are not derived; the shipped kernel's registers and spills are "
                      "check_compile.sh's")


def _strided(n: int, first: int, step: int) -> int:
    """Iterations of ``for (i = first; i < n; i += step)``."""
    return max(0, -(-(n - first) // step))


class _Nest:
    """A loop of the generic paths' source: its label, an opcode its SASS body must hold (a check that the
    SASS loop found at this place of the nest is this loop), and the loops nested in it, in source order."""

    def __init__(self, label: str, holds: str = "", children=()):
        self.label, self.holds, self.children = label, holds, list(children)

    def preorder(self):
        yield self
        for child in self.children:
            yield from child.preorder()


def _shuffles(prefix: str, count: int) -> List[_Nest]:
    return [_Nest(f"{prefix}{k}", "SHFL") for k in range(count)]


def _filter_nest(on_chip: bool, use_tab: bool) -> _Nest:
    """The loops of filter_variant (csrc/freeu_fused_concat.cu), kept rolled there by `#pragma unroll 1`."""
    sweep1 = _Nest("sweep1", "BAR", [
        _Nest("row_j0", "", [_Nest("row_it", "", [_Nest("row_x", "")] + _shuffles("row_shfl", 8))]),
        _Nest("col_it", "", [_Nest("col_y", "LDS")] + _shuffles("col_shfl", 2))])
    sweep2 = _Nest("sweep2", "", [_Nest("upd_item", "STS", [_Nest("upd_i", "")]),
                                  _Nest("write_v", "STG", [_Nest("write_j", "")])])
    loops = [_Nest("info", "STS")]
    if use_tab:  # the tables are filled only in the TAB specialisation
        loops += [_Nest("table_x", "STS"), _Nest("table_y", "STS")]
    loops.append(_Nest("ri_init", "STS"))
    if on_chip:
        loops.append(_Nest("stage", "LDG"))
    return _Nest("root", "", loops + [sweep1, sweep2])


def _filter_iterations(plan: c_abi.PlanInfo, H: int, W: int, g_eff: int, V: int, on_chip: bool) -> Dict[str, int]:
    """Iterations of each loop of _filter_nest summed over the 256 threads of one block of g_eff planes,
    from the plan's lanes, tile rows and table choice (the loop bounds of the source, evaluated)."""
    nx, ny, T = plan.nx, plan.ny, THREADS
    lr, lc, tile = plan.lanes_row, plan.lanes_col, plan.tile_rows
    v_row = 1 if on_chip else V  # row_sums reads on-chip planes element by element
    it = {"root": T}
    threads = range(T)
    it["info"] = sum(_strided(g_eff, t, T) for t in threads)
    it["table_x"] = sum(_strided(W, t, T) for t in threads) if plan.use_tab else 0
    it["table_y"] = sum(_strided(H, t, T) for t in threads) if plan.use_tab else 0
    it["ri_init"] = sum(_strided(g_eff * ny * nx, t, T) for t in threads)
    if on_chip:
        it["stage"] = sum(_strided(g_eff * H * W // V, t, T * 4) for t in threads)  # kUnroll = 4
    tiles = [min(tile, H - y) for y in range(0, H, tile)]
    j0 = -(-nx // 4)  # kJChunk = 4
    groups_r, groups_c = T // lr, T // lc
    per_lane_x = sum(_strided(W, sub * v_row, lr * v_row) for sub in range(lr))
    col_items = g_eff * ny * nx
    keys = ("sweep1", "row_j0", "row_it", "row_x", "col_it", "col_y", "sweep2", "upd_item", "upd_i",
            "write_v", "write_j")
    it.update({key: 0 for key in keys})
    for rows in tiles:
        items = g_eff * rows
        iters = -(-items // groups_r)
        it["sweep1"] += T
        it["row_j0"] += T * j0
        it["row_it"] += T * j0 * iters
        it["row_x"] += j0 * sum(_strided(items, g, groups_r) for g in range(groups_r)) * per_lane_x
        iters_c = -(-col_items // groups_c)
        it["col_it"] += T * iters_c
        it["col_y"] += (sum(_strided(col_items, g, groups_c) for g in range(groups_c))
                        * sum(_strided(rows, sub, lc) for sub in range(lc)))
        it["sweep2"] += T
        upd = sum(_strided(rows * nx * g_eff, t, T) for t in threads)
        it["upd_item"] += upd
        it["upd_i"] += upd * ny
        write = sum(_strided(g_eff * rows * W // V, t, T) for t in threads)
        it["write_v"] += write
        it["write_j"] += write * nx
    for k in range(8):
        it[f"row_shfl{k}"] = it["row_it"] * int(math.log2(lr))
    for k in range(2):
        it[f"col_shfl{k}"] = it["col_it"] * int(math.log2(lc))
    return it


def _group_sizes(planes_per_role: int, G: int, cl: bool, channels: int, outer: int) -> List[Tuple[int, int]]:
    """(planes in the group, number of such groups) of a role cut into groups of G planes; channels-last
    groups are runs of channels of one (n, f), so each of the `outer` (n, f) has its own last group."""
    if cl:
        full, last = divmod(channels, G)
        return [(G, full * outer)] + ([(last, outer)] if last else [])
    full, last = divmod(planes_per_role, G)
    return [(G, full)] + ([(last, 1)] if last else [])


def _nest_trips(instrs, nest: _Nest, totals: Dict[str, float], where: str) -> List[float]:
    """Matches the SASS loops (nested by body containment, in address order) to the source nest and returns
    each loop's trips per entry: its total iterations over the launch / those of its parent. Raises when the
    SASS nest does not have the source's shape or a loop lacks what it must hold."""
    loops = sass.find_loops(instrs)
    parent = {}
    for k, loop in enumerate(loops):
        outer = [m for m, other in enumerate(loops) if m != k and loop.body < other.body]
        parent[k] = min(outer, key=lambda m: len(loops[m].body)) if outer else None

    def children(k):
        return [m for m in range(len(loops)) if parent[m] == k]

    trips = [0.0] * len(loops)
    bases = [{ins.base for ins in instrs if loop.holds(ins.addr)} for loop in loops]

    def match(node: _Nest, sass_children: List[int]):
        if len(sass_children) != len(node.children):
            raise ValueError(f"{where}: SASS has {len(sass_children)} loops inside '{node.label}', the source "
                             f"{len(node.children)} ({[c.label for c in node.children]})")
        for k, child in zip(sorted(sass_children, key=lambda m: loops[m].start), node.children):
            if child.holds and child.holds not in bases[k]:
                raise ValueError(f"{where}: the SASS loop at 0x{loops[k].start:x} taken for '{child.label}' holds "
                                 f"no {child.holds}")
            outer_total = totals[node.label]
            trips[k] = totals[child.label] / outer_total if outer_total else 0.0
            match(child, children(k))

    match(nest, children(None))
    return trips


_CLVEC_NEST = _Nest("root", "", [
    _Nest("tables", "STS"),
    _Nest("sweep1", "SHFL", [_Nest("row_x", "LDG"), _Nest("row_shfl", "SHFL")]),
    _Nest("col_it", "SHFL", [_Nest("col_y", "LDS"), _Nest("col_shfl", "SHFL")]),
    _Nest("upd_item", "STS"),
    _Nest("sweep2", "STG", [_Nest("write_x", "STG")])])


def _clvec_iterations(plan: c_abi.PlanInfo, H: int, W: int, V: int) -> Dict[str, int]:
    """Iterations of each loop of the channel-vector filter (clvec_filter_task) summed over one block's 256
    threads; every block runs the same loops (a whole channel group over the plane's pixels)."""
    T, nf, ch = THREADS, plan.nx, plan.skip_planes_per_block  # ch: channels per block
    cv = ch // V                                                # 16-byte vectors per pixel
    lpr, lc = plan.lanes_row, plan.lanes_col
    rows_per_pass = T // cv // lpr
    unroll = 4 if V == 8 else 8  # kClvUnroll of the kernel
    passes = -(-H // rows_per_pass)
    it = {"root": T, "tables": sum(_strided(W + H, t, T) for t in range(T))}
    it["sweep1"] = it["sweep2"] = T * passes
    x_trips = 0  # x0 loop of both sweeps: thread (row in pass, lane) of every pass with y < H
    for t in range(T):
        lane_px = t // cv
        xl, row = lane_px % lpr, lane_px // lpr
        rows = sum(1 for y0 in range(0, H, rows_per_pass) if y0 + row < H)
        x_trips += rows * _strided(W, xl, lpr * unroll)
    it["row_x"] = it["write_x"] = x_trips
    it["row_shfl"] = it["sweep1"] * int(math.log2(lpr))
    items, groups = nf * nf * ch, T // lc
    iters = -(-items // groups)
    it["col_it"] = T * iters
    it["col_y"] = (sum(_strided(items, g, groups) for g in range(groups))
                   * sum(_strided(H, sub, lc) for sub in range(lc)))
    it["col_shfl"] = it["col_it"] * int(math.log2(lc))
    it["upd_item"] = sum(_strided(H * nf * ch, t, T) for t in range(T))
    return it


def _clvec_trips(instrs, plan: c_abi.PlanInfo, case: CodegenCase) -> List[float]:
    """Trips of the channel-vector filter's loops for the case's launch."""
    H, W = case.x_shape[-2], case.x_shape[-1]
    totals = {key: float(value) for key, value in _clvec_iterations(plan, H, W, 16 // case.element_size).items()}
    return _nest_trips(instrs, _CLVEC_NEST, totals, "channel-vector filter")


def _filter_trips(instrs, plan: c_abi.PlanInfo, case: CodegenCase, V: int, on_chip: bool) -> List[float]:
    """Trips of the generic filter's loops for the case's launch (every block of the plan)."""
    H, W = case.x_shape[-2], case.x_shape[-1]
    channels = case.h_shape[1]
    outer = case.h_shape[0] * (case.h_shape[2] if len(case.h_shape) == 5 else 1)
    G = plan.skip_planes_per_block
    totals: Dict[str, float] = {}
    for g_eff, count in _group_sizes(math.prod(case.h_shape[:-2]), G, bool(plan.channels_last) and on_chip,
                                     channels, outer):
        for key, value in _filter_iterations(plan, H, W, g_eff, V, on_chip).items():
            totals[key] = totals.get(key, 0.0) + value * count
    where = f"filter ({'on chip' if on_chip else 'two sweeps'})"
    return _nest_trips(instrs, _filter_nest(on_chip, bool(plan.use_tab)), totals, where)


def _role(name: str, fn_name: str, text: str, trips, blocks: int, elements: int, note: str) -> RoleCode:
    return RoleCode(role=name, sass=text, loop_trips=trips, programs=blocks, threads_per_program=THREADS,
                    elements_per_program=elements / blocks if blocks else 0.0, note=f"{fn_name}: {note}")


def build(case: CodegenCase, arch: int) -> KernelBuild:
    """KernelBuild of the CUDA kernel for one case and architecture (see the module docstring)."""
    started = time.perf_counter()
    plan = launch_plan(case)
    cubin, _, nvcc_seconds = _compiled(arch)
    functions = _functions(arch)
    resources = _resources(arch)
    tcode = _TYPE_CODES[case.dtype]
    shipped = _find(resources, "25freeu_fused_concat_kernelI" + tcode + "E")
    spec = case.spec()
    skip_elements = math.prod(case.h_shape)
    backbone_elements = math.prod(case.x_shape)
    cl = bool(plan.channels_last)
    roles: List[RoleCode] = []
    notes: List[str] = []

    def add_role(role_name: str, parts, trips_of, blocks: int, elements: int, note: str):
        fn = _find(functions, *parts)
        text = functions[fn]
        instrs = sass.parse(text)
        trips = trips_of(instrs)
        if len(trips) != len(sass.find_loops(instrs)):
            raise ValueError(f"{fn}: {len(sass.find_loops(instrs))} loops, {len(trips)} trip counts")
        regs = resources.get(fn, {}).get("registers")
        roles.append(_role(role_name, fn, text, trips, blocks, elements, f"{note}; {regs} registers alone"))

    skip_path, backbone_path = _PATHS[plan.skip_path], _PATHS[plan.backbone_path]
    if plan.skip_blocks:
        if skip_path == "tile":
            nf = plan.nx
            band = spec.band
            centred = band.kx0 == -(band.nx // 2) and band.ky0 == -(band.ny // 2)
            kernel = "20codegen_skip_tile_clI" if cl else "17codegen_skip_tileI"
            add_role("skip", (kernel + tcode + f"Li{nf}ELb{int(centred)}E",),
                     lambda instrs: _classify_tile_loops(instrs, plan, case), plan.skip_blocks, skip_elements,
                     f"register-tile filter{' (channels-last, staged in shared memory)' if cl else ''}, "
                     f"{plan.skip_planes_per_block} planes per block, "
                     f"{plan.tile_threads_per_plane} threads per plane, {plan.tile_lanes} lanes per row")
        elif skip_path == "flat":
            add_role("skip", ("17codegen_flat_skipI" + tcode + f"Lb{int(cl)}E",), lambda instrs: [],
                     plan.skip_blocks, skip_elements, f"flat g_hi copy, {plan.skip_task_vecs} vectors per block")
        elif skip_path == "cl_vectors":
            band = spec.band
            centred = band.kx0 == -(band.nx // 2) and band.ky0 == -(band.ny // 2)
            add_role("skip", ("18codegen_skip_clvecI" + tcode + f"Li{plan.nx}ELb{int(centred)}E",),
                     lambda instrs: _clvec_trips(instrs, plan, case), plan.skip_blocks, skip_elements,
                     f"channel-vector filter, {plan.skip_planes_per_block} channels per block, "
                     f"{plan.lanes_row} lanes per row, {plan.lanes_col} lanes per moment, two sweeps over pixels")
        elif skip_path in ("on_chip", "two_sweep"):
            on_chip = skip_path == "on_chip"
            V = 16 // case.element_size if plan.skip_vec else 1
            flags = "".join(f"Lb{int(flag)}E" for flag in (on_chip, cl and on_chip, bool(plan.use_tab)))
            add_role("skip", ("19codegen_skip_filterI" + tcode + f"Li{V}E" + flags,),
                     lambda instrs: _filter_trips(instrs, plan, case, V, on_chip), plan.skip_blocks, skip_elements,
                     f"generic {'shared-memory' if on_chip else 'two-sweep'} filter, "
                     f"{plan.skip_planes_per_block} planes per block, {V}-element accesses, lanes per row / column "
                     f"{plan.lanes_row} / {plan.lanes_col}, {plan.tile_rows} rows per tile, "
                     f"twiddles {'from shared tables' if plan.use_tab else 'computed'} (a template parameter)")
        else:
            raise NotImplementedError(f"the skip role takes the generic '{skip_path}' path: {_UNMODELLED_PLANES}")
    if plan.backbone_blocks:
        if backbone_path != "flat":
            raise NotImplementedError(f"the backbone role takes the generic '{backbone_path}' path: "
                                      f"{_UNMODELLED_PLANES}")
        v2 = int(plan.version == 2)
        add_role("backbone", ("12codegen_flatI" + tcode + f"Lb{int(cl)}ELb{v2}E",), lambda instrs: [],
                 plan.backbone_blocks, backbone_elements,
                 f"flat scaled copy, {plan.backbone_task_vecs} vectors per block")

    usage = resources[shipped]
    notes.append("CUDA: the plan is freeu_plan's (the launcher's host code); each role is counted in an "
                 "analysis-only __global__ (-DFREEU_CODEGEN) calling the shipped kernel's device function for "
                 "that path; registers/spills are the shipped freeu_fused_concat_kernel's.")
    return KernelBuild(
        backend="cuda", case=case, arch=arch, registers=usage["registers"],
        spill_bytes=max(usage.get("spill_stores", 0), usage.get("spill_loads", 0)),
        shared_bytes=plan.smem_bytes, threads_per_program=plan.threads,
        compile_seconds=nvcc_seconds + (time.perf_counter() - started),
        roles=roles,
        launch={"grid": int(plan.skip_blocks + plan.backbone_blocks), "threads": plan.threads,
                "skip_path": skip_path, "backbone_path": backbone_path, "skip_blocks": int(plan.skip_blocks),
                "backbone_blocks": int(plan.backbone_blocks), "smem_bytes": plan.smem_bytes,
                "skip_planes_per_block": plan.skip_planes_per_block, "tile_lanes": plan.tile_lanes,
                "tile_threads_per_plane": plan.tile_threads_per_plane, "backbone_task_vecs": plan.backbone_task_vecs,
                "num_sms": NUM_SMS, "stack_bytes": usage.get("stack", 0)},
        notes=notes)
