"""Memory on counted quantities (CPU): what one forward allocates, and what is saved for backward.

Allocations are the profiler's memory events of one call (bench/memory.py, the same measurement the
benchmark reports as peak_extra_bytes): every allocation and free in time order.

- The fused backends (cpu, and triton through its interpreter) allocate the output and nothing else.
  With Python-number factors the op may also make 0-d factor tensors (8 bytes each); version 2 also
  holds one float32 (N, [F,] H, W) scale map at the peak (low-precision inputs: plus one float32 slab of
  an eighth of x's channels while the channel mean is summed, never a full float32 copy of x).
- The torch backend's temporaries (float32 copies of a low-precision h, moments, small tables) stay
  below TORCH_BACKEND_EXTRA_LIMIT (2.5) float32 copies of h on top of the output. diffusers' path holds 2.5x
  (float32) to 7x (bfloat16) its output on top of it, i.e. 5 to 7 float32 copies of h when Cx = Ch.
- Under no_grad / inference_mode nothing is saved for backward: the saved-tensor hooks see no tensor.
"""

import sys
from pathlib import Path

import pytest
import torch

from conftest import BACKENDS

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import freeu_kernels  # noqa: E402
from freeu_kernels import reference  # noqa: E402
from bench.memory import peak_of_running_sum, profile_call  # noqa: E402

CPU = torch.device("cpu")
FUSED = [name for name in ("cpu", "triton") if name in freeu_kernels.available_backends(CPU)]
# (x shape, h shape): Cx != Ch, a 4-D and a 5-D (N, C, F, H, W) case, planes the cpu kernel vectorises.
SHAPES = {
    "4d": ((2, 8, 16, 16), (2, 6, 16, 16)),
    "5d": ((1, 4, 3, 16, 16), (1, 2, 3, 16, 16)),
}
# Extra bytes the torch backend may hold beyond its output, in float32 copies of h. Measured on
# (2, 64, 32, 32)x2 .. (2, 640, 64, 64)x2 and (2, 1280, 8, 8)x2 (2026-12-01): float32 0.13 to 0.28;
# bfloat16/float16 2.06 to 2.26 (the float32 copy of h and the update's product, which the add reads
# beside it).
TORCH_BACKEND_EXTRA_LIMIT = 2.5


def _inputs(shape_name, dtype, requires_grad=False):
    x_shape, h_shape = SHAPES[shape_name]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=generator).to(dtype).requires_grad_(requires_grad)
    h = torch.randn(h_shape, generator=generator).to(dtype).requires_grad_(requires_grad)
    return x, h


def _factors():
    return torch.tensor(1.3), torch.tensor(0.9)  # 0-d float32: what the kernels take without a conversion


def _output_bytes(x, h):
    return (x.numel() + h.numel()) * x.element_size()


def _measured(call):
    call()  # first call: kernel scratch sized, twiddle tables cached; what every later call reuses
    return profile_call(call, CPU, count_ops=False)


def test_peak_is_the_running_sum_not_the_plain_sum():
    # Two 100-byte temporaries, the first freed before the second: 100 bytes held at once, not 200.
    assert peak_of_running_sum([100, -100, 100, -100, 40]) == 100
    assert peak_of_running_sum([100, 100, -200]) == 200
    assert peak_of_running_sum([-50, 30]) == 0


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", FUSED)
def test_fused_forward_allocates_only_its_output(backend, dtype, shape_name):
    x, h = _inputs(shape_name, dtype)
    b, s = _factors()
    measured = _measured(lambda: freeu_kernels.fused_concat(x, h, b, s, backend=backend))
    assert measured.allocations == (_output_bytes(x, h),)
    assert measured.peak_extra_bytes == _output_bytes(x, h)


@pytest.mark.parametrize("backend", FUSED)
def test_python_number_factors_add_only_zero_dim_tensors(backend):
    x, h = _inputs("4d", torch.float32)
    measured = _measured(lambda: freeu_kernels.fused_concat(x, h, 1.3, 0.9, backend=backend))
    others = list(measured.allocations)
    others.remove(_output_bytes(x, h))
    assert all(size <= 8 for size in others)  # at most float64 0-d factors and their float32 copies
    assert measured.peak_extra_bytes <= _output_bytes(x, h) + sum(others)


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("backend", FUSED)
def test_version2_holds_one_scale_map_beside_its_output(backend, dtype, shape_name):
    x, h = _inputs(shape_name, dtype)
    b, s = _factors()
    measured = _measured(lambda: freeu_kernels.fused_concat(x, h, b, s, version=2, backend=backend))
    map_bytes = x[:, 0].numel() * 4  # (N, [F,] H, W) float32
    # A low-precision x is widened to float32 for its channel mean: on the CPU one slab of
    # ceil(Cx / _CPU_MEAN_SLABS) channels at a time (reference._channel_mean), never all of x.
    slab_bytes = 0
    if dtype != torch.float32:
        slab_bytes = -(-x.shape[1] // reference._CPU_MEAN_SLABS) * map_bytes
    transient = max(map_bytes, slab_bytes)
    assert max(measured.allocations) == _output_bytes(x, h)
    assert all(size <= transient for size in measured.allocations if size != _output_bytes(x, h))
    # The map's statistics (per-sample min and max) are a few bytes per sample; a slab and the running
    # sum may be alive beside the map.
    assert measured.peak_extra_bytes <= _output_bytes(x, h) + map_bytes + slab_bytes + map_bytes * bool(slab_bytes) \
        + 16 * x.shape[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_backend_temporaries_stay_bounded(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 32, 32, generator=generator).to(dtype)
    h = torch.randn(2, 64, 32, 32, generator=generator).to(dtype)
    b, s = _factors()
    measured = _measured(lambda: freeu_kernels.fused_concat(x, h, b, s, backend="torch"))
    extra = measured.peak_extra_bytes - _output_bytes(x, h)
    assert 0 <= extra <= TORCH_BACKEND_EXTRA_LIMIT * h.numel() * 4


class _SavedTensors:
    """Counts what autograd saves for backward (torch.autograd.graph.saved_tensors_hooks)."""

    def __init__(self):
        self.saved = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor):
        self.saved.append(tensor)
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_is_saved_for_backward_without_grad(backend, grad_mode, version):
    x, h = _inputs("4d", torch.float32, requires_grad=True)
    b, s = _factors()
    with _SavedTensors() as hooks, grad_mode():
        out = freeu_kernels.fused_concat(x, h, b, s, version=version, backend=backend)
    assert hooks.saved == []
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_mode_saves_factors_only_for_version1_and_x_for_version2(backend):
    """The control for the test above: with grad enabled the hooks do see what the op saves."""
    x, h = _inputs("4d", torch.float32, requires_grad=True)
    b, s = _factors()
    with _SavedTensors() as hooks:
        freeu_kernels.fused_concat(x, h, b, s, version=1, backend=backend)
    assert hooks.saved and all(t.dim() == 0 for t in hooks.saved)  # b and s: no activation is kept
    with _SavedTensors() as hooks:
        freeu_kernels.fused_concat(x, h, b, s, version=2, backend=backend)
    assert sorted(t.numel() for t in hooks.saved)[-1] == x.numel()  # version 2 recomputes its map from x
