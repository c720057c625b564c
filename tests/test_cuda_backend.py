"""The CUDA C++ backend (csrc/): compile check, the kernel run on CPU through its emulator, GPU-only checks.

Three layers, so CI without a GPU still executes the kernel's logic:
- ``test_check_compile``: csrc/check_compile.sh (nvcc for sm_80 and sm_90, zero spills). Needs nvcc only;
  marked slow (about a minute): deselect with ``-m "not slow"``.
- ``emu``: the very kernel source compiled for the CPU (csrc/emulate/, g++ >= 12) and driven through the
  same ctypes wrapper as the GPU library, on CPU tensors, against the float64 FFT reference.
- GPU tests (skipped without a CUDA device and the built library): backend="cuda" end to end, CUDA graph
  capture with b and s changed between replays, side streams, the kernel's register report. The shared
  matrix of tests/test_fused_concat.py also runs "cuda" wherever it is available.
"""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import freeu_kernels
from freeu_kernels import fused_concat_reference
from freeu_kernels.backends import c_abi, cuda_backend
from freeu_kernels.reference import structure_map
from freeu_kernels.spec import make_spec

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"

# |out - ref| <= atol * max|ref| + rtol * |ref|, ref computed in float64 from the inputs as rounded to dtype.
TOL = {
    torch.float32: (1e-5, 2e-6),
    torch.float16: (1e-3, 2e-5),
    torch.bfloat16: (8e-3, 2e-4),
}


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    out64 = out.double().cpu()
    ref = ref.cpu()
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isnan(out64), torch.isnan(ref)), "NaN pattern differs from the reference"
    scale = ref[finite].abs().max().item() if finite.any() else 1.0
    err = (out64 - ref).abs()[finite]
    bound = (atol * scale + rtol * ref.abs())[finite]
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"max error {err.max().item():.3e} exceeds the {dtype} bound (scale {scale:.3e})"


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def make_case(xshape, ch, dtype, device, *, layout="contiguous", seed=0):
    """x, h in dtype on device (layout: contiguous, channels_last or strided) and their float64 copies."""
    g = torch.Generator().manual_seed(seed)
    hshape = (xshape[0], ch) + tuple(xshape[2:])
    if layout == "strided":  # every other channel and column of a larger tensor: no 16-byte vectors
        bigx = torch.randn(xshape[:-1] + (2 * xshape[-1],), generator=g, dtype=torch.float64)
        bigx = torch.cat([bigx, bigx], dim=1)
        bigh = torch.randn(hshape[:-1] + (2 * hshape[-1],), generator=g, dtype=torch.float64)
        bigh = torch.cat([bigh, bigh], dim=1)
        x = bigx.to(device=device, dtype=dtype)[:, ::2, ..., ::2]
        h = bigh.to(device=device, dtype=dtype)[:, ::2, ..., ::2]
    else:
        x = torch.randn(xshape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        h = torch.randn(hshape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        if layout == "channels_last":
            x, h = _cl(x), _cl(h)
    return x, h, x.double().cpu(), h.double().cpu()


# (name, x shape, Ch, dtype, layout, options). Each exercises a path of the launch plan: several tiny
# planes per block, odd sizes (scalar loads), H = 1 and 1x1, Cx != Ch, 5-D, channels_last with and
# without 16-byte channel vectors, strided views, one 64x64 plane per block, thresholds 0..3, both masks,
# version 2, high_gain, a channel window.
CASES = [
    ("tiny8x8", (2, 3, 8, 8), 5, torch.float32, "contiguous", {}),
    ("tiny8x8_f16", (2, 16, 8, 8), 16, torch.float16, "contiguous", {}),
    ("one_by_one", (2, 3, 1, 1), 2, torch.float32, "contiguous", {}),
    ("h1", (2, 2, 1, 9), 3, torch.float32, "contiguous", dict(threshold=2)),
    ("odd7x5_t2", (1, 3, 7, 5), 4, torch.float32, "contiguous", dict(threshold=2)),
    ("odd_t3_radial", (1, 2, 11, 13), 3, torch.float32, "contiguous", dict(threshold=3, mask="radial")),
    ("t0_high_gain", (2, 3, 6, 6), 2, torch.float32, "contiguous", dict(threshold=0, high_gain=1.3)),
    ("high_gain_radial", (1, 4, 16, 16), 4, torch.bfloat16, "contiguous",
     dict(threshold=2, mask="radial", high_gain=0.8)),
    ("five_d_v2", (1, 4, 3, 8, 8), 3, torch.float32, "contiguous", dict(version=2)),
    ("window", (2, 6, 8, 8), 2, torch.float16, "contiguous", dict(backbone_channels=(1, 4))),
    ("cl_vector_f16", (2, 16, 8, 8), 8, torch.float16, "channels_last", {}),
    ("cl_scalar_f32", (2, 3, 5, 6), 5, torch.float32, "channels_last", dict(version=2)),
    ("cl_five_d", (1, 8, 2, 4, 4), 8, torch.bfloat16, "channels_last", dict(threshold=2, mask="radial")),
    ("strided", (2, 3, 8, 8), 3, torch.float32, "strided", {}),
    ("plane64_bf16", (1, 2, 64, 64), 2, torch.bfloat16, "contiguous", dict(threshold=1)),
    # H + W > 3072: twiddles from sincospif instead of shared tables; an axis > 65536: 64-bit residues.
    # The register-tile filter (contiguous rows of 16-byte vectors, nx = ny <= 3): the centred bands of
    # threshold 1 (box and radial) and an uncentred one; the flat g_hi copy of an empty band; the
    # channels-last flat backbone with the v2 map.
    ("tile_radial_t1", (1, 2, 16, 16), 3, torch.float32, "contiguous", dict(threshold=1, mask="radial")),
    ("tile_uncentred", (1, 2, 4, 4), 3, torch.float32, "contiguous", dict(threshold=3)),
    ("t0_flat_skip", (2, 4, 8, 8), 4, torch.float16, "contiguous", dict(threshold=0, high_gain=1.3)),
    ("cl_v2_flat", (2, 16, 8, 8), 8, torch.float16, "channels_last", dict(version=2, backbone_channels=(4, 12))),
    # The channels-last register tile: two channel groups (the second partial), planes spanning two warps
    # (float32 32x32), 5-D.
    ("cl_tile_groups", (2, 8, 16, 16), 40, torch.bfloat16, "channels_last", dict(threshold=2, mask="radial")),
    ("cl_tile_f32_warps", (1, 4, 32, 32), 8, torch.float32, "channels_last", {}),
    ("cl_tile_five_d", (1, 8, 2, 8, 8), 16, torch.float16, "channels_last", dict(version=2)),
    ("long_row_no_table", (1, 2, 1, 3100), 2, torch.float32, "contiguous", dict(threshold=2)),
    ("long_col_no_table", (1, 1, 3080, 3), 2, torch.float16, "contiguous", dict(threshold=2, mask="radial")),
    ("row_over_65536", (1, 1, 1, 70001), 1, torch.float32, "contiguous", dict(threshold=3)),
    # The channels-last channel-vector filter (planes the register tile cannot stage): two 16-byte vectors
    # per pixel at 64x64 (the SDXL shape, 2 x 2 centred band), odd planes with partial passes, one vector
    # per pixel in 5-D with the v2 map, a 3 x 3 radial band over 3 channel groups, an uncentred frequency.
    ("clvec_f16_64", (1, 16, 64, 64), 16, torch.float16, "channels_last", {}),
    ("clvec_odd_f32", (2, 4, 5, 7), 8, torch.float32, "channels_last", dict(high_gain=0.9)),
    ("clvec_five_d", (1, 8, 3, 5, 5), 8, torch.bfloat16, "channels_last", dict(version=2)),
    ("clvec_radial_t2", (1, 8, 12, 12), 24, torch.float16, "channels_last", dict(threshold=2, mask="radial")),
    ("clvec_uncentred", (1, 8, 4, 4), 8, torch.float16, "channels_last", dict(threshold=3)),
]


def run_reference(x64, h64, b, s, options):
    return fused_concat_reference(x64, h64, b, s, options.get("threshold", 1), version=options.get("version", 1),
                                  backbone_channels=options.get("backbone_channels"),
                                  high_gain=options.get("high_gain", 1.0), mask=options.get("mask", "box"))


# ------------------------------------------------------------------------------------------------
# 1. nvcc compile check
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_check_compile():
    result = subprocess.run(["bash", str(CSRC / "check_compile.sh")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no spills" in result.stdout


# ------------------------------------------------------------------------------------------------
# 2. the kernel on CPU through its emulator
# ------------------------------------------------------------------------------------------------


def _gxx_ok() -> bool:
    gxx = shutil.which("g++")
    if gxx is None:
        return False
    version = subprocess.run([gxx, "-dumpversion"], capture_output=True, text=True).stdout.strip()
    return version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 12


@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """The kernel compiled for the CPU (csrc/emulate/freeu_emu.cpp), loaded with the backend's loader."""
    if not _gxx_ok():
        pytest.skip("the kernel emulator needs g++ >= 12 (C++20 <barrier>, _Float16)")
    lib = tmp_path_factory.mktemp("emu") / "libfreeu_emu.so"
    subprocess.run(["g++", "-std=c++20", "-O2", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
                    "-o", str(lib), str(CSRC / "emulate" / "freeu_emu.cpp")], check=True)
    return cuda_backend.load_library(lib)


def emu_run(lib, x, h, b, s, options, *, factors_by_pointer=False, factor_dtype=torch.float32):
    spec = make_spec(x, h, options.get("threshold", 1), options.get("version", 1),
                     options.get("backbone_channels"), options.get("high_gain", 1.0), options.get("mask", "box"))
    bt, st = torch.tensor(b, dtype=factor_dtype), torch.tensor(s, dtype=factor_dtype)
    scale_map = None
    start, stop = spec.window
    if spec.version == 2 and stop > start:
        scale_map = (bt.float() - 1) * structure_map(x).float() + 1
    return cuda_backend.launch(lib, x, h, bt, st, spec, scale_map, num_sms=4, factors_by_pointer=factors_by_pointer)


@pytest.mark.parametrize("name,xshape,ch,dtype,layout,options", CASES, ids=[c[0] for c in CASES])
def test_emulated_kernel_matches_reference(emu, monkeypatch, name, xshape, ch, dtype, layout, options):
    # Poison the output allocation: every element the kernel fails to write stays NaN and fails the test.
    real_allocate = c_abi.allocate_output
    monkeypatch.setattr(c_abi, "allocate_output", lambda x, c: real_allocate(x, c).fill_(float("nan")))
    x, h, x64, h64 = make_case(xshape, ch, dtype, "cpu", layout=layout)
    b, s = 1.3, 0.7
    out = emu_run(emu, x, h, b, s, options)
    ref = run_reference(x64, h64, b, s, options)
    assert out.shape == ref.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" and x.dim() == 4
                             else torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format)
    assert not out.isnan().any(), "an output element was not written"
    assert_matches(out, ref, dtype)


# The launch path each role of a case takes (freeu_plan, FREEU_PATH_* of csrc/freeu_fused_concat.h): every
# path of the kernel is run by at least one case above.
EXPECTED_PATHS = {
    "tiny8x8": ("tile", "flat"),
    "plane64_bf16": ("tile", "flat"),          # a plane spans 4 warps: the cross-warp moment sum
    "high_gain_radial": ("tile", "flat"),      # 3 x 3 frequencies
    "tile_radial_t1": ("tile", "flat"),        # 1 x 1, centred
    "tile_uncentred": ("tile", "flat"),        # 1 x 1 at (1, 1)
    "five_d_v2": ("tile", "flat"),             # 5-D planes, the planar v2 map
    "t0_flat_skip": ("flat", "flat"),
    "cl_v2_flat": ("tile", "flat"),
    "cl_tile_groups": ("tile", "flat"),
    "cl_tile_f32_warps": ("tile", "flat"),
    "cl_tile_five_d": ("tile", "flat"),
    "t0_high_gain": ("planes", "planes"),
    "cl_scalar_f32": ("on_chip", "planes"),
    "odd7x5_t2": ("on_chip", "planes"),
    "long_col_no_table": ("two_sweep", "planes"),
    "clvec_f16_64": ("cl_vectors", "flat"),
    "clvec_odd_f32": ("cl_vectors", "flat"),
    "clvec_five_d": ("cl_vectors", "flat"),
    "clvec_radial_t2": ("cl_vectors", "flat"),
    "clvec_uncentred": ("cl_vectors", "flat"),
}


def test_emulated_cases_cover_every_launch_path(emu):
    from bench.codegen.cuda_target import PlanningLibrary

    seen = {}
    for name, xshape, ch, dtype, layout, options in CASES:
        if name not in EXPECTED_PATHS:
            continue
        x, h, _, _ = make_case(xshape, ch, dtype, "cpu", layout=layout)
        planning = PlanningLibrary(emu)
        emu_run(planning, x, h, 1.3, 0.7, options)
        paths = c_abi.PlanInfo.PATHS
        seen[name] = (paths[planning.plan.skip_path], paths[planning.plan.backbone_path])
    assert seen == EXPECTED_PATHS
    assert {p for pair in seen.values() for p in pair} == set(c_abi.PlanInfo.PATHS.values()) - {"none"}


@pytest.mark.slow
@pytest.mark.parametrize("dtype,size,threshold", [(torch.float32, 130, 8), (torch.float16, 200, 1)],
                         ids=["f32_130_t8_two_tiles", "f16_200_vectors"])
def test_emulated_two_sweep_path(emu, dtype, size, threshold):
    """Planes too large for shared memory: moments in row tiles, outputs in a second sweep."""
    x, h, x64, h64 = make_case((1, 1, size, size + 8), 1, dtype, "cpu")
    out = emu_run(emu, x, h, 1.1, 0.6, dict(threshold=threshold))
    assert_matches(out, run_reference(x64, h64, 1.1, 0.6, dict(threshold=threshold)), dtype)


@pytest.mark.parametrize("factor_dtype", [torch.float32, torch.float64])
def test_emulated_factors_by_pointer(emu, factor_dtype):
    """b and s read through pointers (the device-tensor path), float32 and float64."""
    x, h, x64, h64 = make_case((2, 4, 8, 8), 4, torch.float32, "cpu")
    out = emu_run(emu, x, h, 1.4, 0.3, {}, factors_by_pointer=True, factor_dtype=factor_dtype)
    assert_matches(out, run_reference(x64, h64, 1.4, 0.3, {}), torch.float32)


def test_emulated_nan_stays_in_its_plane(emu):
    """A NaN in one skip plane must not reach the other planes processed by the same block."""
    x, h, x64, h64 = make_case((2, 4, 8, 8), 6, torch.float32, "cpu")
    h[1, 2, 3, 4] = float("nan")
    h64[1, 2, 3, 4] = float("nan")
    out = emu_run(emu, x, h, 1.2, 0.5, {})
    ref = run_reference(x64, h64, 1.2, 0.5, {})
    assert out[1, 4 + 2].isnan().all()
    mask = torch.ones(out.shape, dtype=torch.bool)
    mask[1, 4 + 2] = False
    assert torch.isfinite(out[mask]).all()
    assert_matches(out, ref, torch.float32)


def test_emulated_empty_backbone(emu):
    x, h, x64, h64 = make_case((2, 0, 5, 5), 3, torch.float32, "cpu")
    out = emu_run(emu, x, h, 1.2, 0.5, {})
    assert_matches(out, run_reference(x64, h64, 1.2, 0.5, {}), torch.float32)


def test_emulated_is_deterministic(emu):
    x, h, _, _ = make_case((2, 8, 16, 16), 8, torch.float16, "cpu")
    first = emu_run(emu, x, h, 1.2, 0.5, dict(threshold=2))
    assert torch.equal(first, emu_run(emu, x, h, 1.2, 0.5, dict(threshold=2)))


# ------------------------------------------------------------------------------------------------
# Argument errors (no GPU needed: raised before any launch)
# ------------------------------------------------------------------------------------------------


def test_float64_is_a_type_error_naming_torch_backend(emu):
    x, h, _, _ = make_case((1, 2, 4, 4), 2, torch.float32, "cpu")
    spec = make_spec(x.double(), h.double())
    with pytest.raises(TypeError, match=r"float64.*backend='torch'"):
        cuda_backend.launch(emu, x.double(), h.double(), torch.tensor(1.0), torch.tensor(1.0), spec)


def test_cuda_kernel_rejects_cpu_tensors():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cuda_backend.fused_concat_cuda(x, x, torch.tensor(1.0), torch.tensor(1.0), make_spec(x, x))


def test_plane_axis_over_2_30_is_a_value_error(emu):
    x = torch.zeros(1, 1, 1, 1).expand(1, 1, 1, (1 << 30) + 1)  # stride 0: no memory behind it
    with pytest.raises(ValueError, match="2\\^30"):
        cuda_backend.launch(emu, x, x, torch.tensor(1.0), torch.tensor(1.0), make_spec(x, x))


def test_load_error_explains_itself():
    error = cuda_backend.load_error()
    if torch.cuda.is_available() and error is None:
        return
    assert isinstance(error, str) and error


# ------------------------------------------------------------------------------------------------
# 3. on a GPU
# ------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or cuda_backend.load_error() is not None,
    reason=f"needs a CUDA device and the built kernel library ({cuda_backend.load_error()})",
)

GPU_CASES = CASES + [
    ("plane256_two_sweeps", (2, 4, 256, 256), 4, torch.float16, "contiguous", {}),
    ("plane96_f32", (1, 3, 96, 96), 2, torch.float32, "contiguous", dict(threshold=3, mask="radial")),
    ("sd15_8x8", (2, 1280, 8, 8), 1280, torch.float16, "contiguous", {}),
    ("sdxl_64", (2, 640, 64, 64), 640, torch.float16, "contiguous", dict(version=2)),
    ("sdxl_cx_ne_ch", (2, 1280, 32, 32), 640, torch.bfloat16, "channels_last", {}),
]


@gpu
@pytest.mark.parametrize("name,xshape,ch,dtype,layout,options", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_gpu_matches_reference(name, xshape, ch, dtype, layout, options):
    x, h, x64, h64 = make_case(xshape, ch, dtype, "cuda", layout=layout)
    b, s = 1.3, 0.7
    out = freeu_kernels.fused_concat(x, h, b, s, backend="cuda", **options)
    ref = run_reference(x64, h64, b, s, options)
    assert out.device.type == "cuda" and out.dtype == dtype
    assert not out.isnan().any()
    assert_matches(out, ref, dtype)


@gpu
@pytest.mark.parametrize("threshold", [0, 1, 2, 3])
@pytest.mark.parametrize("mask", ["box", "radial"])
def test_gpu_thresholds_and_masks(threshold, mask):
    x, h, x64, h64 = make_case((2, 5, 12, 10), 3, torch.float32, "cuda")
    out = freeu_kernels.fused_concat(x, h, 1.2, 0.4, threshold=threshold, mask=mask, backend="cuda")
    assert_matches(out, run_reference(x64, h64, 1.2, 0.4, dict(threshold=threshold, mask=mask)), torch.float32)


@gpu
def test_gpu_graph_capture_reads_b_and_s_at_replay():
    x, h, x64, h64 = make_case((2, 8, 16, 16), 8, torch.float16, "cuda")
    b = torch.tensor(1.2, device="cuda")
    s = torch.tensor(0.6, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (module loading, caches)
        freeu_kernels.fused_concat(x, h, b, s, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = freeu_kernels.fused_concat(x, h, b, s, backend="cuda")
    for bv, sv in [(1.2, 0.6), (1.5, 0.2), (0.9, 1.0)]:
        b.fill_(bv)
        s.fill_(sv)
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, run_reference(x64, h64, bv, sv, {}), torch.float16)


@gpu
def test_gpu_side_stream():
    x, h, x64, h64 = make_case((2, 4, 32, 32), 4, torch.float32, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = freeu_kernels.fused_concat(x, h, 1.1, 0.5, backend="cuda")
    stream.synchronize()
    assert_matches(out, run_reference(x64, h64, 1.1, 0.5, {}), torch.float32)


@gpu
def test_gpu_poisoned_output_is_fully_written(monkeypatch):
    real_allocate = c_abi.allocate_output
    monkeypatch.setattr(c_abi, "allocate_output", lambda x, c: real_allocate(x, c).fill_(float("nan")))
    for layout in ("contiguous", "channels_last", "strided"):
        x, h, x64, h64 = make_case((2, 8, 9, 16), 8, torch.float16, "cuda", layout=layout)
        out = freeu_kernels.fused_concat(x, h, 1.3, 0.7, backend="cuda")
        assert not out.isnan().any(), layout
        assert_matches(out, run_reference(x64, h64, 1.3, 0.7, {}), torch.float16)


@gpu
def test_gpu_kernel_registers_and_no_local_memory():
    lib = cuda_backend.load_library(cuda_backend.library_path())
    import ctypes

    for code in (0, 1, 2):
        regs, local, threads = ctypes.c_int32(), ctypes.c_int32(), ctypes.c_int32()
        assert lib.freeu_kernel_info(code, ctypes.byref(regs), ctypes.byref(local), ctypes.byref(threads)) == 0
        assert 0 < regs.value <= 128 and local.value == 0 and threads.value >= 256


# ------------------------------------------------------------------------------------------------
# 3. the codegen report's trip counts of the generic filter (bench/codegen/cuda_target.py)
# ------------------------------------------------------------------------------------------------


def _literal_filter_iterations(plan, H, W, g_eff, V, on_chip):
    """The generic filter's loop bounds (csrc/freeu_fused_concat.cu, filter_variant) executed literally,
    thread by thread, counting each loop's iterations: the reference for the target's closed forms."""
    T = 256
    count = {}

    def hit(key, n=1):
        count[key] = count.get(key, 0) + n

    lr, lc, tile, nx, ny = plan.lanes_row, plan.lanes_col, plan.tile_rows, plan.nx, plan.ny
    v_row = 1 if on_chip else V
    for t in range(T):
        hit("root")
        hit("info", len(range(t, g_eff, T)))
        if plan.use_tab:
            hit("table_x", len(range(t, W, T)))
            hit("table_y", len(range(t, H, T)))
        hit("ri_init", len(range(t, g_eff * ny * nx, T)))
        if on_chip:
            hit("stage", len(range(t, g_eff * H * W // V, T * 4)))
        sub_r, gid_r, groups_r = t % lr, t // lr, T // lr
        sub_c, gid_c, groups_c = t % lc, t // lc, T // lc
        for y_lo in range(0, H, tile):
            rows = min(tile, H - y_lo)
            hit("sweep1")
            for _ in range(0, nx, 4):
                hit("row_j0")
                items = g_eff * rows
                for it in range(-(-items // groups_r)):
                    hit("row_it")
                    for k in range(8):
                        hit(f"row_shfl{k}", int(math.log2(lr)))
                    if gid_r + it * groups_r < items:
                        hit("row_x", len(range(sub_r * v_row, W, lr * v_row)))
            items_c = g_eff * ny * nx
            for it in range(-(-items_c // groups_c)):
                hit("col_it")
                for k in range(2):
                    hit(f"col_shfl{k}", int(math.log2(lc)))
                if gid_c + it * groups_c < items_c and sub_c < rows:
                    hit("col_y", len(range(sub_c, rows, lc)))
        for y_lo in range(0, H, tile):
            rows = min(tile, H - y_lo)
            hit("sweep2")
            for _ in range(t, g_eff * rows * nx, T):
                hit("upd_item")
                hit("upd_i", ny)
            for _ in range(t, g_eff * rows * W // V, T):
                hit("write_v")
                hit("write_j", nx)
    return count


@pytest.mark.parametrize("H,W,g_eff,V,on_chip,tile,lanes,use_tab",
                         [(7, 5, 3, 1, True, 7, (2, 2), 1), (130, 138, 1, 4, False, 128, (8, 32), 1),
                          (64, 64, 1, 8, True, 64, (16, 16), 0)],
                         ids=["odd_on_chip", "two_tiles", "no_table"])
def test_codegen_filter_trip_counts_match_the_loops(H, W, g_eff, V, on_chip, tile, lanes, use_tab):
    from types import SimpleNamespace

    from bench.codegen.cuda_target import _filter_iterations

    plan = SimpleNamespace(nx=5, ny=3, lanes_row=lanes[0], lanes_col=lanes[1], tile_rows=tile, use_tab=use_tab)
    closed = {key: value for key, value in _filter_iterations(plan, H, W, g_eff, V, on_chip).items() if value}
    literal = {key: value for key, value in _literal_filter_iterations(plan, H, W, g_eff, V, on_chip).items() if value}
    assert closed == literal


def _literal_clvec_iterations(plan, H, W, V):
    """clvec_filter_task's loop bounds executed literally, thread by thread (see above)."""
    T, nf, ch, lpr, lc = 256, plan.nx, plan.skip_planes_per_block, plan.lanes_row, plan.lanes_col
    cv = ch // V
    rows_per_pass, groups = T // cv // lpr, T // lc
    items = nf * nf * ch
    count = {}

    def hit(key, n=1):
        count[key] = count.get(key, 0) + n

    for t in range(T):
        hit("root")
        hit("tables", len(range(t, W + H, T)))
        xl, row = (t // cv) % lpr, (t // cv) // lpr
        for sweep, inner in (("sweep1", "row_x"), ("sweep2", "write_x")):
            for y0 in range(0, H, rows_per_pass):
                hit(sweep)
                if sweep == "sweep1":
                    hit("row_shfl", int(math.log2(lpr)))
                if y0 + row < H:
                    hit(inner, len(range(xl, W, lpr * (4 if V == 8 else 8))))
        for it in range(-(-items // groups)):
            hit("col_it")
            hit("col_shfl", int(math.log2(lc)))
            if t // lc + it * groups < items:
                hit("col_y", len(range(t % lc, H, lc)))
        hit("upd_item", len(range(t, H * nf * ch, T)))
    return count


@pytest.mark.parametrize("H,W,V,ch,nf,lpr,lc", [(64, 64, 8, 16, 2, 8, 4), (5, 7, 4, 8, 2, 1, 8),
                                                 (12, 12, 8, 8, 3, 2, 16)],
                         ids=["sdxl64_f16", "odd_f32", "radial_3x3"])
def test_codegen_clvec_trip_counts_match_the_loops(H, W, V, ch, nf, lpr, lc):
    from types import SimpleNamespace

    from bench.codegen.cuda_target import _clvec_iterations

    plan = SimpleNamespace(nx=nf, skip_planes_per_block=ch, lanes_row=lpr, lanes_col=lc)
    closed = {key: value for key, value in _clvec_iterations(plan, H, W, V).items() if value}
    literal = {key: value for key, value in _literal_clvec_iterations(plan, H, W, V).items() if value}
    assert closed == literal
