"""Build step of freeu_kernels: the kernel libraries of csrc/, compiled when that makes sense.

All metadata lives in pyproject.toml; this file only adds the build of two plain shared libraries with
the C ABI of csrc/freeu_fused_concat.h, loaded with ctypes (freeu_kernels/backends/c_abi.py), so they
need no torch headers and one binary serves every torch and Python version:

  freeu_kernels/_lib/libfreeu_kernels_cpu.so   csrc/freeu_cpu.cpp, the "cpu" backend, built with the
      system C++ compiler ($CXX, else c++, g++, clang++; C++17 with _Float16: g++ >= 12, clang++ >= 15).
      Skipped with FREEU_KERNELS_SKIP_CPU_BUILD=1; a failure warns (FREEU_KERNELS_REQUIRE_CPU_BUILD=1
      makes it an error) and the torch backend serves CPU tensors instead.
  freeu_kernels/_lib/libfreeu_kernels_cuda.so  csrc/freeu_fused_concat.cu, the "cuda" backend, with nvcc.

When the CUDA library is built:
  * FREEU_KERNELS_SKIP_CUDA_BUILD=1            never;
  * no nvcc ($CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin)  never;
  * the torch that will run is a CPU-only build  never (the library could not run). pip's isolated build
    environment hides the installed torch, so when torch cannot be imported here setup.py reads
    torch/version.py of the environment being installed into (its site-packages) without importing it;
  * otherwise (torch with CUDA, or no torch installed at all, e.g. when pip installs it as a dependency)  yes.
FREEU_KERNELS_REQUIRE_CUDA_BUILD=1 builds it whatever torch is installed (for another machine, say) and
turns a failure into an error. A failed compilation otherwise prints a warning and the package installs
without it; the "cuda" backend then reports why it is unavailable and the other backends work as before.
pip shows these messages (and the compiler's progress) only with `pip install -v`.

Architectures: $FREEU_KERNELS_CUDA_ARCH_LIST, else $TORCH_CUDA_ARCH_LIST (both "8.0;8.6;9.0+PTX" style),
else the visible GPUs' compute capabilities (torch, else nvidia-smi), else 8.0, 8.6, 8.9, 9.0. The highest
architecture is also embedded as PTX so newer GPUs can JIT it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUDA_EXTENSION = "freeu_kernels._lib.libfreeu_kernels_cuda"
CUDA_SOURCES = ["csrc/freeu_fused_concat.cu"]
CPU_EXTENSION = "freeu_kernels._lib.libfreeu_kernels_cpu"
CPU_SOURCES = ["csrc/freeu_cpu.cpp"]
DEFAULT_ARCHS = ["8.0", "8.6", "8.9", "9.0"]


def _log(message: str) -> None:
    print(f"freeu_kernels setup: {message}", file=sys.stderr, flush=True)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return str(fallback) if fallback.is_file() else None


def _installed_torch_cuda():
    """The installed torch's CUDA version as torch/version.py records it, read without importing torch.

    pip builds in an isolated environment whose sys.path hides the target environment's packages, but
    sys.prefix is still that environment, so its site-packages (and the user site) can be looked at.
    Returns ("cuda" | "cpu", path) for the first torch/version.py found, or (None, None).
    """
    import ast
    import site
    import sysconfig

    places = [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    try:
        places.append(site.getusersitepackages())
    except Exception:
        pass
    for place in dict.fromkeys(p for p in places if p):
        version_file = Path(place) / "torch" / "version.py"
        if not version_file.is_file():
            continue
        try:
            tree = ast.parse(version_file.read_text())
        except (OSError, SyntaxError):
            continue
        for node in tree.body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None)
            if isinstance(target, ast.Name) and target.id == "cuda" and isinstance(node.value, ast.Constant):
                return ("cpu" if node.value.value is None else "cuda"), version_file
    return None, None


def _torch_state():
    """("cuda" | "cpu" | "absent", visible compute capabilities as "X.Y" strings)."""
    try:
        import torch  # noqa: F401  (optional: pip's isolated build environment has no torch)
    except Exception:
        kind, where = _installed_torch_cuda()
        if kind is not None:
            _log(f"torch is not importable in the build environment; {where} says a {kind.upper()} build is installed")
            return kind, []
        return "absent", []
    if torch.version.cuda is None:
        return "cpu", []
    caps = []
    try:
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            caps.append(f"{major}.{minor}")
    except Exception:
        pass
    return "cuda", caps


def _nvidia_smi_caps():
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
    except Exception:
        return []
    return [line.strip() for line in out.splitlines() if re.fullmatch(r"\d+\.\d+", line.strip())]


def parse_arch_list(text: str):
    """"8.0;8.6 9.0+PTX" / "80,90" / "sm_90" -> [("80", False), ("86", False), ("90", True)] (True: also PTX)."""
    archs = []
    for item in re.split(r"[;,\s]+", text.strip()):
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        core = item[:-4] if ptx else item
        core = core.lower().replace("sm_", "").replace("compute_", "")
        digits = core.replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", digits):
            raise ValueError(f"cannot read CUDA architecture {item!r} in {text!r}")
        archs.append((digits, ptx))
    return archs


def arch_list(torch_caps):
    for var in ("FREEU_KERNELS_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST"):
        if os.environ.get(var, "").strip():
            archs = parse_arch_list(os.environ[var])
            _log(f"architectures from ${var}: {os.environ[var]}")
            break
    else:
        caps = torch_caps or _nvidia_smi_caps()
        archs = parse_arch_list(";".join(sorted(set(caps)))) if caps else parse_arch_list(";".join(DEFAULT_ARCHS))
        _log(f"architectures {'of the visible GPUs' if caps else '(default, no GPU visible)'}: "
             f"{', '.join(a for a, _ in archs)}")
    if archs and not any(ptx for _, ptx in archs):
        top = max(archs, key=lambda a: int(re.sub(r"\D", "", a[0])))
        archs = [(a, ptx or (a, ptx) == top) for a, ptx in archs]
    return archs


def gencode_flags(archs):
    flags = []
    for arch, ptx in dict.fromkeys(archs):
        codes = f"sm_{arch}" + (f",compute_{arch}" if ptx else "")
        flags += ["-gencode", f"arch=compute_{arch},code=[{codes}]"]
    return flags


def cuda_build_plan():
    """(nvcc path or None, reason it is None, visible capabilities)."""
    if _truthy("FREEU_KERNELS_SKIP_CUDA_BUILD"):
        return None, "FREEU_KERNELS_SKIP_CUDA_BUILD is set", []
    nvcc = find_nvcc()
    if nvcc is None:
        return None, "nvcc was not found", []
    state, caps = _torch_state()
    if state == "cpu" and not _truthy("FREEU_KERNELS_REQUIRE_CUDA_BUILD"):
        return None, ("torch is a CPU-only build (torch.version.cuda is None); set FREEU_KERNELS_REQUIRE_CUDA_BUILD=1 "
                      "to build it anyway"), []
    return nvcc, "", caps


def find_cxx():
    """The C++ compiler for the CPU library: $CXX, else c++, g++, clang++ on PATH."""
    if os.environ.get("CXX", "").strip():
        return os.environ["CXX"].strip()
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


class NvccLibrary(Extension):
    """A shared library compiled by nvcc alone (not a Python extension module)."""

    def __init__(self, name, sources, nvcc, caps):
        super().__init__(name, sources=sources, depends=["csrc/freeu_fused_concat.h"])
        self.nvcc = nvcc
        self.caps = caps


class HostLibrary(Extension):
    """A plain C++ shared library for the host (not a Python extension module)."""

    def __init__(self, name, sources, cxx):
        super().__init__(name, sources=sources, depends=["csrc/freeu_fused_concat.h", "csrc/freeu_cpu_kernels.h"])
        self.cxx = cxx


class BuildExt(build_ext):
    """Builds the kernel libraries; a failure warns and drops that library instead of failing the install."""

    def get_ext_filename(self, fullname):
        # Called with the dotted name and with its last part alone: a plain "lib....so", no ABI suffix.
        parts = fullname.split(".")
        if parts[-1] in (CUDA_EXTENSION.split(".")[-1], CPU_EXTENSION.split(".")[-1]):
            return os.path.join(*parts[:-1], parts[-1] + ".so")
        return super().get_ext_filename(fullname)

    def build_extensions(self):
        kept = []
        for ext in self.extensions:
            if isinstance(ext, NvccLibrary):
                if self._build_nvcc(ext):
                    kept.append(ext)
            elif isinstance(ext, HostLibrary):
                if self._build_host(ext):
                    kept.append(ext)
            else:
                self.build_extension(ext)
                kept.append(ext)
        # Later steps (copy to the source tree for --inplace / editable installs, the wheel's file list)
        # walk self.extensions: leave out what was not built.
        self.extensions = kept

    def copy_extensions_to_source(self):
        # --inplace and editable installs copy the library into freeu_kernels/_lib/, which git does not hold.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            package = ".".join(self.get_ext_fullname(ext.name).split(".")[:-1])
            Path(build_py.get_package_dir(package)).mkdir(parents=True, exist_ok=True)
        super().copy_extensions_to_source()

    def _build_nvcc(self, ext) -> bool:
        output = Path(self.get_ext_fullpath(ext.name))
        output.parent.mkdir(parents=True, exist_ok=True)
        try:
            archs = arch_list(ext.caps)
        except ValueError as exc:
            return self._failed(str(exc))
        sources = [str(ROOT / s) for s in ext.sources]
        cmd = [ext.nvcc, "-std=c++17", "-O3", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
               "--threads", "0", f"-I{ROOT / 'csrc'}", *gencode_flags(archs), "-o", str(output), *sources]
        return self._compile(cmd, output, "CUDA", "cuda")

    def _build_host(self, ext) -> bool:
        output = Path(self.get_ext_fullpath(ext.name))
        output.parent.mkdir(parents=True, exist_ok=True)
        sources = [str(ROOT / s) for s in ext.sources]
        # -fopenmp-simd: the kernels' "omp simd" loops, without linking an OpenMP runtime next to torch's.
        cmd = [ext.cxx, "-std=c++17", "-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread",
               "-fopenmp-simd", "-Wno-psabi", f"-I{ROOT / 'csrc'}", "-o", str(output), *sources]
        return self._compile(cmd, output, "CPU", "cpu")

    def _compile(self, cmd, output: Path, kind: str, backend: str) -> bool:
        _log(f"building the {kind} kernel library: " + " ".join(cmd))
        try:
            subprocess.run(cmd, check=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            if output.exists():
                output.unlink()
            return self._failed(f"{cmd[0]} failed ({exc})", kind, backend)
        _log(f"built {output}")
        return True

    def _failed(self, why: str, kind: str = "CUDA", backend: str = "cuda") -> bool:
        if _truthy(f"FREEU_KERNELS_REQUIRE_{kind}_BUILD"):
            raise RuntimeError(f"freeu_kernels: the {kind} kernel library was not built: {why}")
        _log(f"WARNING: the {kind} kernel library was not built ({why}); the '{backend}' backend will be unavailable")
        return False


def ext_modules():
    modules = []
    cxx = None if _truthy("FREEU_KERNELS_SKIP_CPU_BUILD") else find_cxx()
    if cxx is None:
        reason = "FREEU_KERNELS_SKIP_CPU_BUILD is set" if _truthy("FREEU_KERNELS_SKIP_CPU_BUILD") else "no C++ compiler"
        if _truthy("FREEU_KERNELS_REQUIRE_CPU_BUILD"):
            raise RuntimeError(f"freeu_kernels: the CPU kernel library was not built: {reason}")
        _log(f"skipping the CPU kernel library: {reason}")
    else:
        modules.append(HostLibrary(CPU_EXTENSION, CPU_SOURCES, cxx))
    nvcc, reason, caps = cuda_build_plan()
    if nvcc is None:
        _log(f"skipping the CUDA kernel library: {reason}")
    else:
        modules.append(NvccLibrary(CUDA_EXTENSION, CUDA_SOURCES, nvcc, caps))
    return modules


setup(ext_modules=ext_modules(), cmdclass={"build_ext": BuildExt})
