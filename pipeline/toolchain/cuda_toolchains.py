"""The CUDA compilers that make device code here, ahead of time: the facts of each, as data.

A target names one by key (``targets.CudaSpec.toolchain``): the board's CUDA major decides which, since
its driver must accept the cubins. The pip packages that provide a toolchain are pinned once, in
pyproject.toml; :func:`pinned` reads those pins back from the installed distribution's metadata.
Only the standard library is imported here.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ARCH_PATTERN = re.compile(r"sm_(\d+)\Z")


class CudaToolchainError(Exception):
    """A CUDA toolchain, library or architecture needed for ahead-of-time compilation is unavailable."""


@dataclass(frozen=True)
class CudaToolchain:
    name: str  # registry key, e.g. "nvrtc-12"
    compiler: str  # "nvrtc"
    version: str  # major.minor the pinned pip package provides (checked at load)
    cuda_major: int
    supported_archs: tuple[str, ...]  # real archs this NVRTC emits cubins for
    min_driver: str  # what the board must run to load the cubins
    pip_packages: tuple[str, ...]  # the distributions that provide it (their pins: pyproject.toml)
    nvrtc_lib: str  # soname of libnvrtc
    nvrtc_builtins: str  # file of libnvrtc-builtins that libnvrtc dlopens by soname
    options: tuple[str, ...] = ()  # extra NVRTC options
    # Header dirs (relative to site-packages/nvidia) whose headers work with this NVRTC.
    include_dirs: tuple[str, ...] = ("cuda_cccl/include",)

    def install_hint(self) -> str:
        return f"pip install {' '.join(pinned(p) for p in self.pip_packages)}"


_SM = lambda *n: tuple(f"sm_{x}" for x in n)  # noqa: E731

# Supported archs are what nvrtcGetSupportedArchs() returned for these exact versions.
TOOLCHAINS: dict[str, CudaToolchain] = {
    "nvrtc-12": CudaToolchain(
        name="nvrtc-12",
        compiler="nvrtc",
        version="12.6",
        cuda_major=12,
        supported_archs=_SM(50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90),
        min_driver="a CUDA 12.x driver",
        pip_packages=("nvidia-cuda-nvrtc-cu12", "nvidia-cuda-cccl-cu12", "nvidia-cuda-runtime-cu12",
                      "nvidia-cuda-nvcc-cu12"),
        nvrtc_lib="libnvrtc.so.12",
        nvrtc_builtins="libnvrtc-builtins.so.12.6",
        # cuda_runtime/include gives cuda_fp16.h / cuda_bf16.h, which TVM includes for
        # half-precision kernels, and mma.h for tensor-core (wmma) ones; NVRTC has no built-in
        # copy. mma.h includes crt/mma.h, which only the nvcc package ships.
        include_dirs=("cuda_cccl/include", "cuda_runtime/include", "cuda_nvcc/include"),
    ),
    "nvrtc-11": CudaToolchain(
        name="nvrtc-11",
        compiler="nvrtc",
        version="11.8",
        cuda_major=11,
        supported_archs=_SM(35, 37, 50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90),
        min_driver="a CUDA 11.x driver (11.4 and later: minor-version compatibility with the 11.8 cubins)",
        pip_packages=("nvidia-cuda-nvrtc-cu11", "nvidia-cuda-cccl-cu12", "nvidia-cuda-runtime-cu12",
                      "nvidia-cuda-nvcc-cu12"),
        nvrtc_lib="libnvrtc.so.11.2",
        nvrtc_builtins="libnvrtc-builtins.so.11.8",
        # NVRTC 11.8's default dialect is too old for CCCL 12.6's libcu++ ("requires C++11"). CUDA 12.6's
        # cuda_fp16.h (and the cuda_bf16.h and mma.h of half-precision and tensor-core kernels) compile under it
        # once <nv/target> is included first: NVRTC 12 provides it implicitly, 11.8 does not, and libcu++ includes
        # cuda_fp16.h before anything else would include it (NV_IF_ELSE_TARGET undefined).
        options=("-std=c++17", "--pre-include=nv/target"),
        include_dirs=("cuda_cccl/include", "cuda_runtime/include", "cuda_nvcc/include"),
    ),
}


class UnknownToolchain(KeyError):
    def __str__(self) -> str:
        return f"unknown CUDA toolchain {self.args[0]!r}; known: {', '.join(sorted(TOOLCHAINS))}"


def get_toolchain(name: str) -> CudaToolchain:
    try:
        return TOOLCHAINS[name]
    except KeyError:
        raise UnknownToolchain(name) from None


def arch_problem(arch: str, toolchain: CudaToolchain) -> str | None:
    """Why ``toolchain`` cannot compile for ``arch`` (malformed, or an arch it does not emit), or None."""
    if not ARCH_PATTERN.match(arch):
        return f"arch must look like 'sm_87', got {arch!r}"
    if arch not in toolchain.supported_archs:
        others = [f"{t.name} ({t.min_driver})" for t in TOOLCHAINS.values() if arch in t.supported_archs]
        return (f"{toolchain.name} (NVRTC {toolchain.version}) cannot compile for {arch}; it supports "
                f"{', '.join(toolchain.supported_archs)}; toolchains that can: {', '.join(others) or 'none'}")
    return None


def pinned(package: str) -> str:
    """``package`` with the pin pyproject.toml gives it (as installed), else the bare name."""
    try:
        requirements = metadata.requires("pipeline") or []
    except metadata.PackageNotFoundError:
        return package
    for requirement in requirements:
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
        if name.lower() == package.lower():
            return requirement.split(";")[0].strip()
    return package


def _nvidia_dirs() -> list[Path]:
    """Roots of the `nvidia` namespace package (nvidia-* wheels install below it)."""
    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def find_in_nvidia(rel: str) -> Path | None:
    """``rel`` under the pip-installed NVIDIA packages (e.g. ``cuda_nvrtc/lib``), or None."""
    for root in _nvidia_dirs():
        if (root / rel).exists():
            return root / rel
    return None
