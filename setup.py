"""Build script for offload_kernels.

The native extension ``offload_kernels._C`` is built with pybind11 and never links libtorch: it takes
raw data pointers and CUDA stream handles, so one build serves every torch version.

* With nvcc (found through ``CUDA_HOME``/``CUDA_PATH``, ``PATH`` or ``/usr/local/cuda``) the CUDA
  transfer engine is compiled in and linked against the *static* CUDA runtime, so the module imports on
  machines without a GPU or a CUDA toolkit and simply reports "no devices".
* Without nvcc, or with ``OFFLOAD_KERNELS_NO_CUDA=1``, a host-only build carries the host backend.

Environment switches:
  OFFLOAD_KERNELS_NO_CUDA=1        force the host-only build
  OFFLOAD_KERNELS_CUDA_ARCHS="80;90"  SASS targets (PTX of the newest is always embedded)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pragma: no cover - build isolation always provides pybind11
    sys.exit("offload_kernels needs pybind11 to build: pip install pybind11")

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_cuda_home() -> Path | None:
    """Locate a CUDA toolkit with nvcc and the static runtime, or None."""
    if _truthy("OFFLOAD_KERNELS_NO_CUDA"):
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc_on_path = shutil.which("nvcc")
    if nvcc_on_path:
        candidates.append(str(Path(nvcc_on_path).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for cand in candidates:
        # An nvcc on PATH may be a wrapper outside the toolkit: require the toolkit's runtime beside it.
        if cand and (Path(cand) / "bin" / "nvcc").exists() and find_cudart_static(Path(cand)):
            return Path(cand)
    return None


def find_cudart_static(cuda_home: Path) -> Path | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        lib = cuda_home / sub / "libcudart_static.a"
        if lib.exists():
            return lib
    return None


CUDA_HOME = find_cuda_home()
CUDART_STATIC = find_cudart_static(CUDA_HOME) if CUDA_HOME else None
WITH_CUDA = CUDA_HOME is not None and CUDART_STATIC is not None

host_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cpp"))
cuda_sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*.cu")) if WITH_CUDA else []

define_macros = [("OK_WITH_CUDA", "1" if WITH_CUDA else "0")]
include_dirs = [str(CSRC)]
extra_link_args: list[str] = []
if WITH_CUDA:
    include_dirs.append(str(CUDA_HOME / "include"))
    # Static runtime: no libcudart.so needed at import time; the driver (libcuda.so) is loaded lazily by
    # the runtime itself, so a machine without a driver imports fine and reports zero devices.
    extra_link_args += [str(CUDART_STATIC), "-ldl", "-lrt", "-lpthread"]

ext = Pybind11Extension(
    "offload_kernels._C",
    sources=host_sources,
    include_dirs=include_dirs,
    define_macros=define_macros,
    extra_compile_args=["-O3", "-Wall", "-Wno-unknown-pragmas"],
    extra_link_args=extra_link_args,
    cxx_std=17,
)
ext.cuda_sources = cuda_sources  # compiled by BuildExtWithNvcc


def nvcc_arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("OFFLOAD_KERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    newest = max(archs, key=lambda s: int("".join(ch for ch in s if ch.isdigit())))
    flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]  # PTX for newer GPUs
    return flags


class BuildExtWithNvcc(build_ext):
    """build_ext that first compiles the extension's ``.cu`` files with nvcc into objects."""

    def build_extension(self, extension):
        cu = getattr(extension, "cuda_sources", [])
        if cu:
            nvcc = str(CUDA_HOME / "bin" / "nvcc")
            objdir = Path(self.build_temp) / "cuda"
            objdir.mkdir(parents=True, exist_ok=True)
            objects = []
            for src in cu:
                obj = objdir / (Path(src).stem + ".o")
                cmd = [
                    nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17",
                    "-Xcompiler", "-fPIC", "-DOK_WITH_CUDA=1", f"-I{CSRC}",
                    *nvcc_arch_flags(),
                ]
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd, cwd=str(ROOT))
                objects.append(str(obj))
            extension.extra_objects = list(extension.extra_objects or []) + objects
        super().build_extension(extension)


print(f"offload_kernels: building the native extension {'with CUDA from ' + str(CUDA_HOME) if WITH_CUDA else 'host-only'}",
      flush=True)

setup(
    name="offload_kernels",
    version="0.1.0",
    description="GGUF-quantized GPU kernels and a pinned-memory transfer engine for running PyTorch models "
                "larger than GPU memory",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["offload_kernels", "offload_kernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtWithNvcc},
    install_requires=[
        "torch>=2.11",
        "numpy>=1.24",
        "gguf>=0.10",
        "tqdm>=4.60",
        "triton>=3.6; platform_system == 'Linux'",
    ],
    extras_require={
        "hf": ["transformers>=4.45", "safetensors>=0.4", "accelerate>=0.30"],
        "bench": ["matplotlib>=3.7", "pytest-benchmark>=4.0"],
        "test": [
            "pytest>=7",
            "hypothesis>=6.80",
            "pytest-benchmark>=4.0",
            "transformers>=4.45",
            "safetensors>=0.4",
            "accelerate>=0.30",
            "matplotlib>=3.7",
        ],
    },
    entry_points={"console_scripts": ["offload-kernels=offload_kernels.cli.main:main"]},
    zip_safe=False,
)
