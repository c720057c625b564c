"""``torch.ops.freeu.fused_concat``: one schema, its fake, its autograd and the backend choice, in one place.

The schema is defined with ``torch.library.Library`` (define + impl + register_fake); backends only
supply kernels. The op is opaque to torch.compile (the fake gives the compiler the output's shape, dtype
and strides), so a compiled U-Net keeps one node per concat, and ``b``/``s`` stay tensors: a FreeU
schedule that changes them every step neither recompiles nor gets baked into a CUDA graph. It is not
registered with ``torch.library.custom_op`` because that wraps every kernel in torch._dynamo.disable,
which imports torch._dynamo (about a second) on the first call and costs a few microseconds on every one.

Schema (what ``torch.ops.freeu.fused_concat`` takes; :func:`fused_concat` accepts the Python forms):
``fused_concat(Tensor x, Tensor h, Tensor b, Tensor s, *, int threshold=1, int threshold_cols=-1,
int version=1, int[]? backbone_channels=None, float high_gain=1.0, str mask='box', str backend='auto')``.
``threshold_cols`` >= 0 makes the box per axis, ``(threshold, threshold_cols)``; -1 means equal to
``threshold``. ``backbone_channels`` is a flat list of (start, stop) pairs, ``[s0, e0, s1, e1, ...]``
(``[]``: no channel scaled; None: the first half). Thresholds must fit int64 here; the wrapper clamps
them to the plane first (spec.clamp_threshold), so any Python int works through it.

Autograd (the filter is linear and self-adjoint): for an output gradient g,
    grad_h = filter(g[:, Cx:])                      Re(F^-1 diag(G) F) is symmetric for real gains G
    grad_x = g[:, :Cx] * scale                      version 1: scale = b on the windows, 1 elsewhere
so version 1's backward is the op itself applied to g, saves no tensor, and is itself differentiable
(double backward, gradgradcheck). Version 2's scale depends on x through the mean map and its
min/max; its backward differentiates reference.scale_backbone (the same math in PyTorch ops) with
``create_graph`` when grad mode is on, so second-order gradients flow to x and to g.
Forward mode (torch.func.jvp, torch.autograd.forward_ad): the tangent of version 1 is the op applied
to the tangents (linearity); version 2's is the linearisation of the map (_scale_backbone_jvp).
Gradients and tangents do not flow to b and s (they are schedule constants, not parameters).

Several backbone ranges: the kernels take one window (spec.window, the first range); the op writes
every further range (spec.extra_windows) with one scaled multiply each, into the kernel's output.

Per-call cost: validation (spec.cached_spec), the backend choice and the backend's binding (registry.bind:
launch plans, tables, the packed C arguments) are memoised per (shapes, strides, dtype, device, layout,
options) key in a _CallPlan, so a repeated call re-validates nothing (tests/test_overhead.py counts it); a
key is stored only after the full checks accepted it. On top of that, ``fused_concat`` has an eager fast
path: a call seen before, with plain tensors (no subclass, no extra dispatch keys such as a negative
view), nothing active that acts at the dispatcher (modes, torch.func transforms, forward AD, the jit
tracer, the autograd profiler) and no gradient to record, runs its _CallPlan directly, which is what the
dispatcher would reach (the op's CPU/CUDA kernel, _fused_concat_impl) minus the dispatch. Everything
else, and ``torch.ops.freeu.fused_concat`` itself, goes through the dispatcher. tests/test_fast_path.py
checks that both give the same bits and that the fast path is taken exactly where it may be.

Tracing with symbolic shapes (torch.compile dynamic=True or automatic dynamic, torch.export with Dims,
make_fx symbolic): the wrapper and the fake skip those caches and check only what needs no concrete
size (spec.check_tensors, spec.check_options: types, ranks, dtypes, devices, option values; a size
comparison there is a guard of the trace, not a specialisation), pass thresholds capped at
spec.SIZE_FREE_THRESHOLD_CAP instead of clamped to the plane, and the fake allocates (N, Cx + Ch, ...)
from x's sizes in x's memory format. The kernel, which runs on concrete tensors, validates and clamps
in full. tests/test_dynamic_shapes.py covers it.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Dict, List, Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad

from .backends import registry
from .reference import scale_backbone, structure_map
from .spec import (SIZE_FREE_THRESHOLD_CAP, Backend, FreeUSpec, _plain_key, allocate_output, cached_spec, check_factor,
                   check_options, check_tensors, has_symbolic_sizes, output_memory_format, parse_backbone_channels)

__all__ = ["fused_concat", "available_backends", "resolve_backend", "ENV_BACKEND"]

ENV_BACKEND = "FREEU_KERNELS_BACKEND"

def available_backends(device: Optional[torch.device | str] = None) -> List[str]:
    """Names of the backends that can run here, best first for ``device`` (default: cuda if present).

    "torch" runs everywhere. "cpu" needs the compiled CPU kernel library and CPU tensors. "triton" needs
    Triton and a CUDA device (or TRITON_INTERPRET=1, which runs its kernels on CPU tensors). "cuda" needs
    the compiled extension and a CUDA device.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    preferred = registry.auto_order(device)
    order = list(preferred) + [name for name in registry.PREFERENCE_ORDER if name not in preferred]
    return [name for name in order if registry.is_available(name, device)]


def resolve_backend(requested: Optional[str], device: torch.device, spec: Optional[FreeUSpec] = None, *,
                    channels_last: bool = False) -> Backend:
    """The backend that will run: the requested one (argument, else $FREEU_KERNELS_BACKEND), else the best.

    An explicitly requested backend that cannot run on ``device`` raises ValueError. The automatic
    choice passes over backends that do not suit the call (registry.suits: the fused kernels for
    float64, the CPU kernel for contiguous planes narrower than 16 columns; ``channels_last`` says the
    output is channels_last). Masks with more
    frequencies than the fused kernels handle (spec.uses_fft_fallback) run on the torch backend's FFT path.
    """
    name = requested if requested not in (None, Backend.AUTO, "auto") else os.environ.get(ENV_BACKEND) or "auto"
    try:
        backend = Backend(name)
    except ValueError:
        raise ValueError(f"backend must be one of {[b.value for b in Backend]}, got {name!r}") from None
    if backend is Backend.AUTO:
        backend = Backend(next(n for n in registry.auto_order(device)
                               if registry.is_available(n, device) and registry.suits(n, spec, channels_last)))
    elif not registry.is_available(backend.value, device):
        raise ValueError(
            f"backend {backend.value!r} is not available for {device.type} tensors "
            f"({registry.why_unavailable(backend.value, device)}); available: {available_backends(device)}"
        )
    if spec is not None and spec.uses_fft_fallback:
        return Backend.TORCH
    return backend


def _factor_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# (spec, device type, requested backend, $FREEU_KERNELS_BACKEND, channels_last) -> backend name.
# Availability does not change within a process (libraries load once), so the choice is a pure function
# of that key. The spec does not hold the device, and the choice depends on its type (auto_order,
# is_available), so the key does.
_BACKEND_CACHE: Dict[tuple, str] = {}


def _backend_for(spec: FreeUSpec, requested: str, device: torch.device, channels_last: bool) -> str:
    """resolve_backend's name for a validated call, memoised."""
    key = (spec, device.type, requested, os.environ.get(ENV_BACKEND) if requested == "auto" else None,
           channels_last)
    name = _BACKEND_CACHE.get(key)
    if name is None:
        name = resolve_backend(requested, device, spec, channels_last=channels_last).value
        if len(_BACKEND_CACHE) >= 4096:
            _BACKEND_CACHE.clear()
        _BACKEND_CACHE[key] = name
    return name


def _threshold_arg(threshold: int, threshold_cols: int):
    """The wrapper's threshold from the schema's pair of ints: -1 columns means "as the rows"."""
    if threshold_cols == -1:
        return threshold
    if threshold_cols < 0:
        raise ValueError(f"threshold_cols must be >= 0, or -1 for the same as threshold, got {threshold_cols}")
    return (threshold, threshold_cols)


def _write_extra_windows(out: torch.Tensor, x: torch.Tensor, b: torch.Tensor, spec: FreeUSpec, scale_map) -> None:
    """out[:, a:c] = x[:, a:c] * factor for every range after the first (the kernels write only the first).

    The factor is the float32 (float64) b, as a host scalar when both are on the CPU, or the v2 scale
    map; the product is rounded once into out, as the kernels round theirs.
    """
    if scale_map is not None:
        factor = scale_map.unsqueeze(1)
    elif b.device.type == "cpu" and x.device.type == "cpu":
        factor = b.item()
    else:
        factor = b
    for start, stop in spec.extra_windows:
        torch.mul(x[:, start:stop], factor, out=out[:, start:stop])


_FLOAT_FACTOR_DTYPES = (torch.float32, torch.float64)


class _CallPlan:
    """One validated call of the op, for every call with the same key (shapes, strides, dtypes, devices,
    options): its spec and the chosen backend's runner bound to those shapes and strides (registry.bind).

    :meth:`forward` is what remains per call: the factors' dtype, the version-2 scale map, the runner and
    the extra channel ranges.
    """

    __slots__ = ("spec", "backend", "run", "factor_dtype", "needs_map", "extra_windows")

    def __init__(self, spec: FreeUSpec, backend: str, x: torch.Tensor, h: torch.Tensor):
        self.spec, self.backend = spec, backend
        self.run = registry.bind(backend, spec, x, h)
        self.factor_dtype = _factor_dtype(x.dtype)
        self.needs_map = spec.version == 2 and bool(spec.windows) and x.numel() > 0
        self.extra_windows = bool(spec.extra_windows)

    def forward(self, x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The op's output for x, h of this plan's key and checked 0-d factors b, s.

        Autocast does not reach the kernels: the output's dtype is x's by definition, and an autocast
        region would otherwise recast the torch backend's GEMMs (and reject their out= buffers)."""
        if _any_autocast_enabled():
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x, h, b, s)
        return self._forward(x, h, b, s)

    def _forward(self, x: torch.Tensor, h: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        factor_dtype = self.factor_dtype
        if b.dtype is not factor_dtype:  # torch.dtype objects are singletons
            b = b.to(factor_dtype)
        if s.dtype is not factor_dtype:
            s = s.to(factor_dtype)
        if not self.needs_map:
            out = self.run(x, h, b, s, None)
            if self.extra_windows:
                _write_extra_windows(out, x, b, self.spec, None)
            return out
        # A CPU 0-d b combines with a device map as a scalar: no host-to-device copy, capture-safe.
        scale_map = (b - 1) * structure_map(x).to(factor_dtype) + 1
        out = self.run(x, h, b, s, scale_map)
        if self.extra_windows:
            _write_extra_windows(out, x, b, self.spec, scale_map)
        return out


def _autocast_query():
    """A function telling whether an autocast region is active for any device type: torch's own single
    query where this torch has it (one C call per op call), else the CUDA and CPU queries."""
    query = getattr(torch._C, "_is_any_autocast_enabled", None)
    return query if query is not None else (lambda: torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled())


_any_autocast_enabled = _autocast_query()


# Validated calls of the op, keyed on everything make_spec, the backend choice and the binding read
# (shapes, strides, dtypes, devices, option values, $FREEU_KERNELS_BACKEND): a _CallPlan. Stored only
# once validated (and bound).
_CALL_PLANS: Dict[tuple, _CallPlan] = {}


def _plain_factor(value: torch.Tensor, device: torch.device) -> bool:
    """The common case check_factor accepts, tested in a few attribute reads: a dense 0-d float32/float64
    tensor on the CPU or on x's device (anything else goes through check_factor for its message)."""
    return (value.dim() == 0 and value.layout is torch.strided and value.dtype in _FLOAT_FACTOR_DTYPES
            and (value.is_cpu or value.device == device))


def _call_plan(x, h, threshold=1, threshold_cols=-1, version=1, backbone_channels=None, high_gain=1.0, mask="box",
               backend="auto") -> _CallPlan:
    """The _CallPlan of a call with the schema's arguments: memoised, else validated in full and bound."""
    device = x.device
    try:
        # The schema has fixed the options' types, so their values key the plan; the tensors' strides
        # decide the memory format and hence the backend.
        key = (x.shape, x.stride(), x.dtype, device, h.shape, h.stride(), h.dtype, h.device, threshold,
               threshold_cols, version, None if backbone_channels is None else tuple(backbone_channels),
               high_gain, mask, backend, os.environ.get(ENV_BACKEND) if backend == "auto" else None)
        plan = _CALL_PLANS.get(key)
    except (RuntimeError, TypeError):  # no strides (sparse, mkldnn) or symbolic sizes: the full path
        key = plan = None
    if plan is None:
        spec = cached_spec(x, h, _threshold_arg(threshold, threshold_cols), version, backbone_channels, high_gain,
                           mask)
        name = _backend_for(spec, backend, device, output_memory_format(x) != torch.contiguous_format)
        plan = _CallPlan(spec, name, x, h)
        if key is not None:
            if len(_CALL_PLANS) >= 4096:
                _CALL_PLANS.clear()
            _CALL_PLANS[key] = plan
    return plan


def _fused_concat_impl(x, h, b, s, *, threshold=1, threshold_cols=-1, version=1, backbone_channels=None,
                       high_gain=1.0, mask="box", backend="auto"):
    """The op's kernel for every device: validate (memoised), choose the backend, run it."""
    return _run_validated(x, h, b, s, threshold, threshold_cols, version, backbone_channels, high_gain, mask,
                          backend)


def _run_validated(x, h, b, s, threshold, threshold_cols, version, backbone_channels, high_gain, mask, backend):
    """_fused_concat_impl with the schema's arguments in order: the plan (memoised, else validated in full),
    the factors checked, the plan run."""
    plan = _call_plan(x, h, threshold, threshold_cols, version, backbone_channels, high_gain, mask, backend)
    # Reached through the dispatcher, below every key that rewrites tensors (a negative view's bit, a
    # functional wrapper, a subclass): only what check_factor asks is left, in a few reads.
    device = x.device
    if not (_plain_factor(b, device) and _plain_factor(s, device)):
        check_factor("b", b, device)
        check_factor("s", s, device)
    return plan.forward(x, h, b, s)


def _fused_concat_fake(x, h, b, s, *, threshold=1, threshold_cols=-1, version=1, backbone_channels=None,
                       high_gain=1.0, mask="box", backend="auto"):
    """The output's shape, dtype, device and strides, for tracing: (N, Cx + Ch, ...) in x's memory format."""
    if has_symbolic_sizes(x, h):
        # Dynamic shapes: the frequency band (and the threshold's clamp) needs the plane's size, so only
        # what needs none is checked here; the real kernel validates the concrete call in full.
        check_tensors(x, h)
        check_options(x.shape[1], _threshold_arg(threshold, threshold_cols), version, backbone_channels, high_gain,
                      mask)
        skip_channels = h.shape[1]
    else:
        skip_channels = cached_spec(x, h, _threshold_arg(threshold, threshold_cols), version, backbone_channels,
                                    high_gain, mask).skip_channels
    # The factors' devices too: a meta b or s with real x and h dispatches here (Meta outranks CPU and
    # CUDA), and without this check the call would return the uninitialised output as its result.
    check_factor("b", b, x.device)
    check_factor("s", s, x.device)
    return allocate_output(x, skip_channels)


def _scale_backbone_jvp(x: torch.Tensor, tangent: torch.Tensor, b: torch.Tensor, windows, compute) -> torch.Tensor:
    """Tangent of reference.scale_backbone(x, b, windows, version=2) at x along ``tangent``.

    With m the channel mean, lo/hi its per-sample min/max, span = hi - lo (1 where it is 0, as the map
    does) and m^ = (m - lo) / span:  dm^ = (dm - dlo) / span - (m - lo) dspan / span^2, where dlo (dhi)
    is dm averaged over the positions attaining the min (max), the derivative autograd gives amin/amax,
    and dspan = dhi - dlo where span > 0, else 0. The window's product x (b - 1) m^ + x has tangent
    dx ((b - 1) m^ + 1) + x (b - 1) dm^; channels outside the windows pass their tangent unchanged.
    """
    xc, tc = x.to(compute), tangent.to(compute)
    mean, dmean = xc.mean(dim=1), tc.mean(dim=1)
    flat, dflat = mean.flatten(1), dmean.flatten(1)
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    at_low, at_high = (flat == low).to(compute), (flat == high).to(compute)
    dlow = (dflat * at_low).sum(1, keepdim=True) / at_low.sum(1, keepdim=True)
    dhigh = (dflat * at_high).sum(1, keepdim=True) / at_high.sum(1, keepdim=True)
    span = high - low
    positive = span > 0
    safe_span = torch.where(positive, span, torch.ones_like(span))
    dspan = torch.where(positive, dhigh - dlow, torch.zeros_like(span))
    normalised = (flat - low) / safe_span
    dnormalised = (dflat - dlow) / safe_span - (flat - low) * dspan / safe_span ** 2
    gain = b.to(device=x.device, dtype=compute) - 1
    scale = (gain * normalised + 1).view(mean.shape).unsqueeze(1)
    dscale = (gain * dnormalised).view(mean.shape).unsqueeze(1)
    out = tc.clone()
    for start, stop in windows:
        out[:, start:stop] = tc[:, start:stop] * scale + xc[:, start:stop] * dscale
    return out.to(x.dtype)


_INSIDE_FUNCTION = threading.local()


class _FusedConcatFunction(torch.autograd.Function):
    """The op's autograd: backward (double-differentiable) and a forward-mode rule (jvp)."""

    # torch.func.vmap (and jacfwd, hessian, which vmap): the forward runs under the transform, where the
    # op has no batching rule and takes PyTorch's per-sample fallback loop (correct, one call per sample).
    generate_vmap_rule = True

    @staticmethod
    def forward(x, h, b, s, options):
        previous = getattr(_INSIDE_FUNCTION, "active", False)
        _INSIDE_FUNCTION.active = True  # under torch.func the op below sees the transform's wrapped tensors
        try:
            with torch._C._AutoDispatchBelowAutograd():
                return _OP(x, h, b, s, **options)
        finally:
            _INSIDE_FUNCTION.active = previous

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, h, b, s, options = inputs
        ctx.options = options
        ctx.cx = x.shape[1]
        ctx.windows = parse_backbone_channels(options.get("backbone_channels"), x.shape[1])
        ctx.version2 = options.get("version", 1) == 2
        ctx.save_for_backward(x if ctx.version2 else None, b, s)
        ctx.save_for_forward(x if ctx.version2 else None, b, s)
        ctx.input_meta = (x.shape, h.shape, x.dtype, x.device)

    @staticmethod
    def backward(ctx, grad):
        x, b, s = ctx.saved_tensors
        cx, options = ctx.cx, ctx.options
        grad_x, grad_h = grad[:, :cx], grad[:, cx:]
        if not ctx.version2:
            both = _apply_op(grad_x, grad_h, b, s, options)
            return both[:, :cx], both[:, cx:], None, None, None
        # Version 2: filter the skip gradient (version 1 with b = 1 leaves grad_x as it is) ...
        filtered = _apply_op(grad_x, grad_h, torch.ones_like(b), s, dict(options, version=1))[:, cx:]
        if x.numel() == 0 or not ctx.windows:  # no map (the forward skips it too): the backbone is copied
            return grad_x.clone(), filtered, None, None, None
        # ... and differentiate the backbone, x * ((b - 1) m^(x) + 1) on the windows, through the map's
        # mean, min and max. Under create_graph (grad mode on here) the result stays differentiable in x
        # and in grad_x.
        compute = _factor_dtype(x.dtype)
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if create_graph and x.requires_grad:
                xd = x.to(compute)
            else:
                xd = x.detach().to(compute).requires_grad_(True)
            backbone = scale_backbone(xd, b.to(device=x.device, dtype=compute), ctx.windows, 2)
            (grad_backbone,) = torch.autograd.grad(backbone, xd, grad_x.to(compute), create_graph=create_graph)
        return grad_backbone.to(x.dtype), filtered, None, None, None

    @staticmethod
    def jvp(ctx, tangent_x, tangent_h, tangent_b, tangent_s, _):
        x, b, s = ctx.saved_tensors
        x_shape, h_shape, dtype, device = ctx.input_meta
        if tangent_x is None:
            tangent_x = torch.zeros(x_shape, dtype=dtype, device=device)
        if tangent_h is None:
            tangent_h = torch.zeros(h_shape, dtype=dtype, device=device)
        options = ctx.options
        if not ctx.version2:
            return _apply_op(tangent_x, tangent_h, b, s, options)
        skip = _apply_op(tangent_x, tangent_h, torch.ones_like(b), s, dict(options, version=1))[:, ctx.cx:]
        if x.numel() == 0 or not ctx.windows:
            return torch.cat([tangent_x, skip], dim=1)
        backbone = _scale_backbone_jvp(x, tangent_x, b, ctx.windows, _factor_dtype(x.dtype))
        return torch.cat([backbone, skip], dim=1)


def _autograd_kernel(keyset, x, h, b, s, *, threshold=1, threshold_cols=-1, version=1, backbone_channels=None,
                     high_gain=1.0, mask="box", backend="auto"):
    """The op at the Autograd key: through _FusedConcatFunction when a gradient or a tangent can flow.

    The options are explicit keywords (not ``**options``): the common branch passes them on without
    building a dict, which is part of every dispatched call's cost."""
    inside_function = False
    if torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0:
        inside_function = getattr(_INSIDE_FUNCTION, "active", False)
        if torch._C._are_functorch_transforms_active() and not inside_function:
            # autograd.Function under torch.func must be applied above the dispatcher (fused_concat does);
            # inside its forward the op runs plainly, the transform applies the Function's rules.
            raise RuntimeError("torch.ops.freeu.fused_concat under torch.func transforms (jvp, grad, vmap): call "
                               "freeu_kernels.fused_concat instead, which applies the op's autograd rules there")
        if not inside_function:
            return _FusedConcatFunction.apply(x, h, b, s, _options_dict(
                threshold, threshold_cols, version, backbone_channels, high_gain, mask, backend))
    grad_mode = torch.is_grad_enabled()
    if grad_mode and (x.requires_grad or h.requires_grad) and not getattr(_INSIDE_FUNCTION, "active", False):
        return _FusedConcatFunction.apply(x, h, b, s, _options_dict(
            threshold, threshold_cols, version, backbone_channels, high_gain, mask, backend))
    plain_below = _PLAIN_BELOW.get(keyset.raw_repr())
    if plain_below is None:
        below = keyset & torch._C._after_autograd_keyset
        plain_below = _PLAIN_BELOW[keyset.raw_repr()] = below.highestPriorityTypeId() in _PLAIN_DEVICE_KEYS
    if plain_below:
        # Nothing but the device kernel below (no mode, no fake or functional tensor): call it directly,
        # which is what the redispatch would reach, minus its Python wrapper. With no input that
        # requires grad, the kernel's own aten ops record nothing, so the below-autograd guard is moot.
        if not (grad_mode and (b.requires_grad or s.requires_grad or inside_function)):
            return _run_validated(x, h, b, s, threshold, threshold_cols, version, backbone_channels, high_gain,
                                  mask, backend)
        with torch._C._AutoDispatchBelowAutograd():
            return _run_validated(x, h, b, s, threshold, threshold_cols, version, backbone_channels, high_gain,
                                  mask, backend)
    with torch._C._AutoDispatchBelowAutograd():
        return _OP.redispatch(keyset & torch._C._after_autograd_keyset, x, h, b, s, **_options_dict(
            threshold, threshold_cols, version, backbone_channels, high_gain, mask, backend))


def _options_dict(threshold, threshold_cols, version, backbone_channels, high_gain, mask, backend) -> dict:
    """The schema's keyword arguments as a dict (what _FusedConcatFunction and a redispatch take)."""
    return dict(threshold=threshold, threshold_cols=threshold_cols, version=version,
                backbone_channels=backbone_channels, high_gain=high_gain, mask=mask, backend=backend)


_PLAIN_DEVICE_KEYS = frozenset((torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA))
# Raw dispatch key set at the Autograd key -> whether the plain CPU/CUDA kernel is all that lies below.
_PLAIN_BELOW: Dict[int, bool] = {}


_LIBRARY = torch.library.Library("freeu", "DEF")
_LIBRARY.define(
    "fused_concat(Tensor x, Tensor h, Tensor b, Tensor s, *, int threshold=1, int threshold_cols=-1, "
    "int version=1, int[]? backbone_channels=None, float high_gain=1.0, str mask='box', "
    "str backend='auto') -> Tensor"
)
_LIBRARY.impl("fused_concat", _fused_concat_impl, "CompositeExplicitAutograd")
_LIBRARY.impl("fused_concat", _autograd_kernel, "Autograd", with_keyset=True)
torch.library.register_fake("freeu::fused_concat", _fused_concat_fake, lib=_LIBRARY)
_OP = torch.ops.freeu.fused_concat.default


# Python-number factors become 0-d CPU tensors (read on the host by the kernels, no device copy). The
# few values a schedule uses are kept (keyed on type, value and dtype), so a call does not build two
# tensors; nothing outside the op ever sees these tensors, and the kernels only read them.
_FACTOR_TENSORS: Dict[tuple, torch.Tensor] = {}


def _fake_or_proxy_mode_active() -> bool:
    """True under a FakeTensorMode (torch.export, fake tracing) or make_fx's proxy mode."""
    return (torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None)


def _factor_key(kind: type, value, dtype: torch.dtype) -> tuple:
    """_FACTOR_TENSORS' key of a Python-number factor (_as_factor stores, the fast path looks up).

    -0.0 == 0.0 (and they hash alike), but x * -0.0 and x * 0.0 differ in the sign of every zero: the
    sign is part of the key."""
    return (kind, value, dtype, math.copysign(1.0, value) if kind is float else 1.0)


def _as_factor(name: str, value, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        check_factor(name, value, like.device)
        return value
    dtype = _factor_dtype(like.dtype) if isinstance(like, torch.Tensor) else torch.float64
    kind = type(value)
    key = _factor_key(kind, value, dtype)
    # Under a fake or make_fx proxy mode the tensor made here is fake, and a cached real one would be
    # refused: no cache there.
    cacheable = (kind is float or kind is int) and not _fake_or_proxy_mode_active()
    if cacheable:
        tensor = _FACTOR_TENSORS.get(key)
        if tensor is not None:
            return tensor
    check_factor(name, value, like.device)
    # On the CPU whatever the default device (a meta or CUDA factor cached under torch.device("meta") or
    # set_default_device would reach later calls), and never an inference tensor, even on a first call
    # under inference_mode: a later call with autograd on saves it for backward, which one refuses.
    with torch.inference_mode(False):
        tensor = torch.tensor(float(value), dtype=dtype, device="cpu")
    if cacheable:
        if len(_FACTOR_TENSORS) >= 256:
            _FACTOR_TENSORS.clear()
        _FACTOR_TENSORS[key] = tensor
    return tensor


def fused_concat(
    x: torch.Tensor,
    h: torch.Tensor,
    b,
    s,
    *,
    threshold=1,
    backend: Optional[str] = None,
    version: int = 1,
    backbone_channels=None,
    high_gain: float = 1.0,
    mask: str = "box",
) -> torch.Tensor:
    """FreeU at one decoder skip concat, fused: ``cat([scaled backbone x, Fourier-filtered skip h], 1)``.

    Args:
        x: backbone features (N, Cx, H, W) or (N, Cx, F, H, W); float16, bfloat16, float32 (float64 on
            the torch backend); a dense (strided) tensor.
        h: skip features (N, Ch, ...) with x's N, trailing dims, dtype and device; any Ch.
        b: backbone factor, a finite float or a 0-d tensor (keep it a tensor on x's device under
            torch.compile / CUDA graphs so a schedule can change it without recompiling or re-capturing).
            A Python number that is inf or NaN is a ValueError; a tensor's value is not inspected (that
            would synchronise with the device): a non-finite tensor factor gives a non-finite output.
        s: skip factor: the gain of the masked low frequencies, finite float or 0-d tensor (as b).
        threshold: mask size: an int t >= 0 (0 leaves h unfiltered), or a pair ``(t_rows, t_cols)`` for a
            rectangular box ``[H//2 - t_rows : H//2 + t_rows] x [W//2 - t_cols : W//2 + t_cols]``. Past the
            plane it clamps like the reference's slices (a radius past the plane's diagonal keeps every
            frequency); any size of int is accepted.
        backend: "torch", "cpu", "triton", "cuda" or None/"auto" (then $FREEU_KERNELS_BACKEND, then the best
            available for x's device). An unavailable backend raises ValueError.
        version: 1 (scale the windows by b) or 2 (scale them by (b - 1) * m^ + 1, m^ the normalised
            channel-mean map; a constant map gives m^ = 0, i.e. no scaling).
        backbone_channels: the scaled channels of x: one ``(start, stop)`` pair, a sequence of pairs
            (several ranges; overlapping or adjacent ones merge, an empty sequence scales nothing), or
            None for ``(0, Cx // 2)``. Each pair satisfies 0 <= start <= stop <= Cx.
        high_gain: finite gain of the frequencies outside the mask (1.0 in the reference).
        mask: "box" (the official code's square) or "radial" (the paper's disc, dy^2 + dx^2 < t^2; takes
            an int threshold or an equal pair).

    Returns:
        (N, Cx + Ch, ...) tensor in x's dtype and memory format. x and h are not modified. Under
        no_grad / inference_mode nothing is saved for backward; otherwise gradients flow to x and h
        (second order too), and forward-mode AD gives tangents for x and h.
    """
    compiling = torch.compiler.is_compiling()
    eager_plain = not compiling and _dispatch_is_plain()
    key = entry = None
    if eager_plain:
        # The fast path: a call seen before (same shapes, strides, dtypes, devices, dispatch keys and
        # options, validated then) with nothing between this function and the kernel that the dispatcher
        # would serve (no mode, transform, tracer, profiler, tensor subclass, and no gradient to record):
        # run its bound plan directly. What runs is what the dispatcher would reach (_fused_concat_impl,
        # whose plan this is), without the dispatch and the re-validation.
        key = _eager_key(x, h, threshold, version, backbone_channels, high_gain, mask, backend)
        try:
            entry = _EAGER_CALLS.get(key) if key is not None else None
        except TypeError:  # an unhashable option (a list of channel ranges, a backend object)
            key = entry = None
        if entry is not None and type(x) is torch.Tensor and type(h) is torch.Tensor:
            fast_b, fast_s = _eager_factor(b, x), _eager_factor(s, x)
            if (fast_b is not None and fast_s is not None and not (torch.is_grad_enabled() and (
                    x.requires_grad or h.requires_grad or fast_b.requires_grad or fast_s.requires_grad))):
                return entry.forward(x, h, fast_b, fast_s)
    backend = "auto" if backend is None else str(getattr(backend, "value", backend))
    if compiling or has_symbolic_sizes(x, h):
        # Traced (Dynamo, torch.export, make_fx), maybe with symbolic sizes: no process-wide caches (their
        # keys hold sizes) and only the checks that need no concrete size, so a trace neither specialises
        # on N, H, W nor recompiles per shape; the op's kernel validates the concrete call when it runs.
        options = _size_free_options(x, h, threshold, version, backbone_channels, high_gain, mask, backend)
        if compiling:
            check_factor("b", b, x.device)
            check_factor("s", s, x.device)
            b = b if isinstance(b, torch.Tensor) else torch.tensor(float(b), dtype=torch.float64)
            s = s if isinstance(s, torch.Tensor) else torch.tensor(float(s), dtype=torch.float64)
        else:
            b = _as_factor("b", b, x)
            s = _as_factor("s", s, x)
    else:
        spec = cached_spec(x, h, threshold, version, backbone_channels, high_gain, mask)
        options = _OPTIONS.get((spec, backbone_channels is None, backend))
        if options is None:
            options = _op_options(spec, backbone_channels, backend)
            if len(_OPTIONS) >= 4096:
                _OPTIONS.clear()
            _OPTIONS[(spec, backbone_channels is None, backend)] = options
        b = _as_factor("b", b, x)
        s = _as_factor("s", s, x)
        if (eager_plain and key is not None and entry is None and _plain_tensor(x) and _plain_tensor(h)
                and x.device.type != "meta"):
            # Validated: bind the plan now (as the op's kernel would) and keep it for the fast path.
            if len(_EAGER_CALLS) >= 4096:
                _EAGER_CALLS.clear()
            _EAGER_CALLS[key] = _call_plan(x, h, **options)
    return _apply_op(x, h, b, s, options)


# The fast path's calls: _eager_key -> the _CallPlan of a validated call (stored by fused_concat's full
# path, only for plain tensors on a real device).
_EAGER_CALLS: Dict[tuple, _CallPlan] = {}


def _dispatch_is_plain() -> bool:
    """True when nothing that acts at the dispatcher is active: no TorchDispatchMode (fake tensors,
    make_fx, FlopCounterMode, ...), no TorchFunctionMode (torch.device contexts, set_default_device), no
    torch.func transform, no forward-AD level, no torch.jit tracer and no autograd profiler (which records
    the op by name)."""
    return (torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
            and not torch._C._are_functorch_transforms_active() and _forward_ad._current_level < 0
            and torch._C._get_tracing_state() is None and not torch._C._autograd._profiler_enabled())


# Raw dispatch key sets of plain tensors, per device: a dense tensor of that device, with and without
# autograd's keys (inference tensors lack them). Anything else (negative or zero-tensor views,
# functionalization wrappers, Python subclasses) has more keys and takes the dispatcher.
_PLAIN_KEYSETS: Dict[torch.device, frozenset] = {}


def _plain_keysets(device: torch.device) -> frozenset:
    keysets = _PLAIN_KEYSETS.get(device)
    if keysets is None:
        with torch.inference_mode(False):
            normal = torch.empty(0, device=device)
        with torch.inference_mode():
            inference = torch.empty(0, device=device)
        keysets = _PLAIN_KEYSETS[device] = frozenset(
            torch._C._dispatch_keys(t).raw_repr() for t in (normal, inference))
    return keysets


def _plain_tensor(t) -> bool:
    """A torch.Tensor (not a subclass) whose dispatch keys are those of a plain tensor of its device."""
    return type(t) is torch.Tensor and torch._C._dispatch_keys(t).raw_repr() in _plain_keysets(t.device)


def _eager_key(x, h, threshold, version, backbone_channels, high_gain, mask, backend) -> Optional[tuple]:
    """The fast path's key of a call: the tensors' shapes, strides, dtypes, devices and dispatch keys, and
    each option by value and type (spec._plain_key: 2 and 2.0, True and 1 differ); None when an argument
    has no such key (not a tensor, symbolic sizes, no strides, an option of another type)."""
    try:
        key = (x.shape, x.stride(), x.dtype, x.device, torch._C._dispatch_keys(x).raw_repr(),
               h.shape, h.stride(), h.dtype, h.device, torch._C._dispatch_keys(h).raw_repr(),
               threshold if type(threshold) is int else _plain_key(threshold),
               version if type(version) is int else _plain_key(version),
               0 if backbone_channels is None else _plain_key(backbone_channels),
               high_gain if type(high_gain) is float else _plain_key(high_gain),
               mask if type(mask) is str else None,
               backend, os.environ.get(ENV_BACKEND) if backend is None or backend == "auto" else None)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return None if None in key[10:15] else key


def _eager_factor(value, x: torch.Tensor) -> Optional[torch.Tensor]:
    """b or s as the fast path takes it: a plain 0-d float32/float64 tensor on the CPU or x's device, or a
    memoised Python-number factor; None for anything else (the full path checks and converts it)."""
    kind = type(value)
    if kind is torch.Tensor:
        return value if _plain_factor_tensor(value, x) else None
    if kind is float or kind is int:
        return _FACTOR_TENSORS.get(_factor_key(kind, value, _factor_dtype(x.dtype)))
    return None


def _plain_factor_tensor(value: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a torch.Tensor factor is what check_factor accepts without a conversion and is plain (no
    extra dispatch keys): decided once per (dispatch keys, dtype), then a few attribute reads."""
    if value.dim() != 0:
        return False
    verdict_key = (torch._C._dispatch_keys(value).raw_repr(), value.dtype)
    verdict = _FACTOR_VERDICTS.get(verdict_key)
    if verdict is None:
        # The keys say the device type and everything else that matters (dense, no negative or
        # zero-tensor bit); only a device tensor's index is left to compare per call.
        plain = _plain_factor(value, value.device) and _plain_tensor(value)
        verdict = _FACTOR_VERDICTS[verdict_key] = ("host" if value.is_cpu else "device") if plain else "no"
    return verdict == "host" or (verdict == "device" and value.device == x.device)


# (raw dispatch keys, dtype) of a 0-d factor tensor -> "host" (a plain CPU float32/float64 tensor),
# "device" (a plain one on an accelerator: its device must be x's) or "no".
_FACTOR_VERDICTS: Dict[tuple, str] = {}


def _apply_op(x, h, b, s, options: dict) -> torch.Tensor:
    """The op; under torch.func transforms (jvp, grad) its autograd.Function applied directly, which is
    where those transforms take an autograd.Function's rules from."""
    if torch._C._are_functorch_transforms_active():
        return _FusedConcatFunction.apply(x, h, b, s, options)
    return _OP(x, h, b, s, **options)


_OPTIONS: Dict[tuple, dict] = {}


def _op_options(spec: FreeUSpec, backbone_channels, backend: str) -> dict:
    """The schema's keyword arguments for a validated call: thresholds clamped to the plane (so they fit
    the schema's int64), the merged channel ranges as a flat list."""
    return _schema_options(spec.threshold, spec.version, None if backbone_channels is None else spec.windows,
                           spec.high_gain, spec.mask.value, backend)


def _size_free_options(x, h, threshold, version, backbone_channels, high_gain, mask, backend: str) -> dict:
    """The schema's keyword arguments for a traced call (sizes possibly symbolic), validated without
    reading a size: thresholds capped at SIZE_FREE_THRESHOLD_CAP (the same selection on any plane, and
    int64), not clamped to the plane; the kernel clamps them when it runs."""
    check_tensors(x, h)
    call = check_options(x.shape[1], threshold, version, backbone_channels, high_gain, mask)
    thresholds = tuple(min(t, SIZE_FREE_THRESHOLD_CAP) for t in call.threshold)
    return _schema_options(thresholds, call.version, None if backbone_channels is None else call.windows,
                           call.high_gain, call.mask.value, backend)


def _schema_options(thresholds, version: int, windows, high_gain: float, mask: str, backend: str) -> dict:
    """Validated options as the schema's keyword arguments; ``windows`` None means the default range."""
    t_rows, t_cols = thresholds
    options = dict(
        threshold=t_rows,
        threshold_cols=-1 if t_rows == t_cols else t_cols,
        version=version,
        backbone_channels=None if windows is None else [v for window in windows for v in window],
        high_gain=high_gain,
        mask=mask,
        backend=backend,
    )
    # Only what differs from the schema's defaults: each keyword costs the dispatcher a parse.
    return {name: value for name, value in options.items() if value != _SCHEMA_DEFAULTS[name]}


_SCHEMA_DEFAULTS = dict(threshold=1, threshold_cols=-1, version=1, backbone_channels=None, high_gain=1.0, mask="box",
                        backend="auto")
