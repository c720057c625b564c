"""What the GPU verification scripts (tools/gpu_*.py, tools/sanitize_driver.py) share.

- ``Target``: where a run happens. On a GPU (the real run) every backend is called through the public op,
  ``freeu_kernels.fused_concat(..., backend=NAME)``. In a dry run (``--dry-run``: CI, no GPU) the same
  scripts run on CPU tensors: "triton" through the Triton interpreter (TRITON_INTERPRET=1) and "cuda"
  through the CUDA kernel's CPU emulator (csrc/emulate/freeu_emu.cpp, the library tests/test_cuda_backend.py
  builds), so every line of plumbing runs before a GPU is lent.
- ``JsonLines``: results are appended one JSON object per line and flushed at once, so a stage killed by
  its time limit still leaves everything it measured so far.
- ``random_inputs`` and ``compare_with_oracle``: the inputs and the float64 oracle comparison, with the
  per-dtype tolerance table of tests/conftest.py (one table for the tests and for this check).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's freeu_kernels (built in place), when run as tools/<script>.py

import torch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SHORT = {v: k for k, v in DTYPES.items()}
FUSED_BACKENDS = ("cuda", "triton")  # the backends this verification exists for
ENV_DRY_RUN = "FREEU_VERIFY_DRY_RUN"
ENV_EMULATOR = "FREEU_VERIFY_EMULATOR"  # path of the CPU emulator library (dry run only)


def utc_now() -> str:
    """The current time, ISO 8601 UTC to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> Optional[str]:
    """The checkout's commit (None where git or the repository is missing: the device copy may have neither)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class JsonLines:
    """Appends one JSON object per line to ``path`` (None: stdout only) and flushes after every record."""

    def __init__(self, path: Optional[str], echo: bool = True):
        self.file = open(path, "a", encoding="utf-8") if path else None
        self.echo = echo

    def write(self, record: Dict) -> Dict:
        """Writes ``record`` (non-JSON values such as dtypes become strings) and returns it."""
        line = json.dumps(record, default=str, allow_nan=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        if self.echo:
            print(line, flush=True)
        return record

    def close(self) -> None:
        """Closes the file."""
        if self.file is not None:
            self.file.close()


class Target:
    """The device a run uses and how each fused backend is called there (see the module docstring)."""

    def __init__(self, dry_run: bool):
        self.dry_run = dry_run
        if dry_run:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton
            self.device = torch.device("cpu")
        else:
            if not torch.cuda.is_available():
                raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run")
            self.device = torch.device("cuda")
        self._emulator = None

    @property
    def is_cuda(self) -> bool:
        """True on a GPU (graphs, streams, CUDA events and memory statistics exist)."""
        return self.device.type == "cuda"

    def synchronize(self) -> None:
        """Waits for the device (no-op on CPU)."""
        if self.is_cuda:
            torch.cuda.synchronize()

    def emulator(self):
        """The CUDA kernel's CPU emulator library, built by the driver script (dry run only)."""
        if self._emulator is None:
            from freeu_kernels.backends import cuda_backend

            path = os.environ.get(ENV_EMULATOR)
            if not path or not Path(path).exists():
                raise RuntimeError(f"dry run: ${ENV_EMULATOR} must name the built emulator library, got {path!r}")
            self._emulator = cuda_backend.load_library(path)
        return self._emulator

    def why_unavailable(self, backend: str) -> Optional[str]:
        """None if ``backend`` can run in this target, else the reason."""
        import freeu_kernels

        if self.dry_run and backend == "cuda":
            try:
                self.emulator()
            except (RuntimeError, OSError) as error:
                return str(error)
            return None
        if backend in freeu_kernels.available_backends(self.device):
            return None
        from freeu_kernels.backends import registry

        return registry.why_unavailable(backend, self.device) or "not listed by available_backends"

    def kernel(self, backend: str) -> Callable[..., torch.Tensor]:
        """``fn(x, h, b, s, **options) -> out``: the backend through the public op (the emulator in a dry run)."""
        import freeu_kernels

        if self.dry_run and backend == "cuda":
            return self._emulated_cuda
        return lambda x, h, b, s, **options: freeu_kernels.fused_concat(x, h, b, s, backend=backend, **options)

    def _emulated_cuda(self, x, h, b, s, **options) -> torch.Tensor:
        # The op's own steps for the CUDA kernel (ops.py): validate, compute the version-2 scale map with the
        # public structure_map, launch through the same ctypes wrapper the GPU library uses.
        from freeu_kernels import structure_map
        from freeu_kernels.backends import cuda_backend
        from freeu_kernels.spec import make_spec

        spec = make_spec(x, h, options.get("threshold", 1), options.get("version", 1),
                         options.get("backbone_channels"), options.get("high_gain", 1.0), options.get("mask", "box"))
        as_factor = lambda v: v.float() if isinstance(v, torch.Tensor) else torch.tensor(float(v))  # noqa: E731
        b, s = as_factor(b), as_factor(s)
        start, stop = spec.window
        scale_map = (b - 1) * structure_map(x).float() + 1 if spec.version == 2 and stop > start else None
        return cuda_backend.launch(self.emulator(), x, h, b, s, spec, scale_map, num_sms=2)


def random_inputs(xshape: Sequence[int], skip_channels: int, dtype: torch.dtype, device, layout: str = "contiguous",
                  seed: int = 0):
    """x, h: random normal data plus a per-channel offset (real features have DC), in ``layout``.

    layout "contiguous", "channels_last" (channels_last or channels_last_3d by rank) or "strided" (every
    other channel and column of larger tensors: no 16-byte vectors, non-unit inner strides).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    hshape = (xshape[0], skip_channels) + tuple(xshape[2:])

    def one(shape):
        big = tuple(shape)
        if layout == "strided":
            big = (shape[0], 2 * shape[1]) + tuple(shape[2:-1]) + (2 * shape[-1],)
        t = torch.randn(big, generator=gen, device=device, dtype=torch.float32)
        t = t + torch.randn(big[:2] + (1,) * (len(big) - 2), generator=gen, device=device)
        t = t.to(dtype)
        if layout == "strided":
            return t[:, ::2, ..., ::2]
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
        if layout != "contiguous":
            raise ValueError(f"layout must be contiguous, channels_last or strided, got {layout!r}")
        return t

    return one(xshape), one(hshape)


def tolerance_table() -> Dict[torch.dtype, Dict[str, float]]:
    """The per-dtype tolerance against the float64 oracle: the test suite's table (tests/conftest.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import conftest  # noqa: E402  (tests/conftest.py: pytest and hypothesis are on every machine that runs this)

    return conftest.TOLERANCES


def oracle(x, h, b: float, s: float, **options) -> torch.Tensor:
    """The float64 FFT reference (the official code path) on the inputs as rounded to their dtype."""
    from freeu_kernels import fused_concat_reference

    options = dict(options)
    threshold = options.pop("threshold", 1)
    return fused_concat_reference(x.double(), h.double(), float(b), float(s), threshold, **options)


def compare_with_oracle(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, input_scale: float,
                        tolerances: Dict) -> Dict:
    """Max error and the tolerance: |out - ref| <= atol * max(max|ref|, input scale) + rtol * |ref| elementwise.

    ``worst_ratio`` is max(|out - ref| / bound): <= 1 passes. NaN in the output never passes (an
    element the kernel did not write, where the output memory was poisoned, or broken math).
    """
    tol = tolerances[dtype]
    got = out.detach().to(torch.float64)
    ref = ref.to(got.device)
    nan = bool(torch.isnan(got).any()) if got.numel() else False
    scale = max(ref.abs().max().item() if ref.numel() else 0.0, input_scale, 1e-30)
    err = (got - ref).abs()
    bound = tol["atol"] * scale + tol["rtol"] * ref.abs()
    max_err = err.max().item() if err.numel() else 0.0
    worst = (err / bound).max().item() if err.numel() else 0.0
    ok = (not nan) and got.shape == ref.shape and not math.isnan(worst) and worst <= 1.0
    return dict(ok=ok, max_abs_err=max_err, worst_ratio=worst, nan=nan, scale=scale, rtol=tol["rtol"],
                atol=tol["atol"], tolerance_at_scale=tol["atol"] * scale)


def poison_next_output(shape: Sequence[int], dtype: torch.dtype, device) -> None:
    """Fill a freed block of the output's size with NaN, so the next allocation of that size likely gets it.

    PyTorch's CUDA caching allocator hands a just-freed block of the same size back to the next request on
    the same stream: the op's output then starts as NaN, and an element no kernel wrote shows up as NaN.
    Only the public API is used, so this is "likely", not certain (a NaN-free output still proves
    nothing on its own; the oracle comparison is the check). No effect on CPU (no caching allocator).
    """
    if torch.device(device).type != "cuda":
        return
    block = torch.empty(math.prod(shape), dtype=dtype, device=device)
    block.fill_(float("nan"))
    del block


def parse_args_common(parser) -> None:
    """Adds the options every verification script takes: --out (JSON lines file) and --dry-run."""
    parser.add_argument("--out", help="JSON lines output file (appended; default: stdout only)")
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get(ENV_DRY_RUN) == "1",
                        help=f"CPU: Triton interpreter and the CUDA emulator (${ENV_EMULATOR}), tiny shapes")


def shapes_of(x: torch.Tensor, h: torch.Tensor) -> Dict[str, List[int]]:
    """x and h shapes as lists (JSON)."""
    return dict(x_shape=list(x.shape), h_shape=list(h.shape))
