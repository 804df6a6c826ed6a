"""Ahead-of-time CUDA compilation on a build host without a GPU.

Why this exists: the apache-tvm wheel's CUDA runtime (`libtvm_runtime_cuda.so`) needs
`libcuda.so.1`. On a host without a driver it is silently not loaded, and `tvm.compile`
then stores CUDA *source* in the library, leaving compilation to the board at load time
(see shared/tvm-notes.md §0.1 and §5). To ship machine code instead we

1. load `libcudart.so.13` (pip `nvidia-cuda-runtime`, or a system CUDA 13) and, when no
   real driver is present, a stub `libcuda.so.1` built here with the C compiler, then load
   `libtvm_runtime_cuda.so` ourselves; that registers `ffi.Module.create.cuda`, so codegen
   hands every CUDA source to the `tvm_callback_cuda_compile` callback;
2. register our own callback for the duration of `aot_cuda(...)`: it runs NVRTC of the
   chosen CUDA major version through ctypes (pip `nvidia-cuda-nvrtc-cu12` / `-cu11`), for
   the chosen arch, and returns a cubin. The board's driver must accept that cubin, which
   is why the toolchain is picked by the board's CUDA major (JetPack 6: 12, JetPack 5: 11).

Outside an `aot_cuda` block, builds keep TVM's default GPU-less behaviour (source in the
library): once we loaded the runtime on a driverless host we set
TVM_COMPILE_FORCE_FALLBACK=1, which TVM's codegen reads at each build.

Everything here works after `import tvm` already happened.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


class CudaToolchainError(Exception):
    """A CUDA toolchain, library or architecture needed for AOT compilation is unavailable."""


@dataclass(frozen=True)
class CudaToolchain:
    name: str  # registry key, e.g. "nvrtc-12"
    compiler: str  # "nvrtc"
    version: str  # major.minor the pinned pip package provides (checked at load)
    cuda_major: int
    supported_archs: tuple[str, ...]  # real archs this NVRTC emits cubins for
    min_driver: str  # what the board must run to load the cubins
    pip_packages: tuple[str, ...]  # what provides the compiler (pinned in pyproject)
    nvrtc_lib: str  # soname of libnvrtc
    nvrtc_builtins: str  # file of libnvrtc-builtins that libnvrtc dlopens by soname
    options: tuple[str, ...] = ()  # extra NVRTC options
    # Header dirs (relative to site-packages/nvidia) whose headers work with this NVRTC.
    include_dirs: tuple[str, ...] = ("cuda_cccl/include",)


_SM = lambda *n: tuple(f"sm_{x}" for x in n)  # noqa: E731

# Supported archs are what nvrtcGetSupportedArchs() returned for these exact versions.
TOOLCHAINS: dict[str, CudaToolchain] = {
    "nvrtc-12": CudaToolchain(
        name="nvrtc-12",
        compiler="nvrtc",
        version="12.6",
        cuda_major=12,
        supported_archs=_SM(50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90),
        min_driver="CUDA 12.x driver (JetPack 6)",
        pip_packages=(
            "nvidia-cuda-nvrtc-cu12==12.6.85",
            "nvidia-cuda-cccl-cu12==12.6.77",
            "nvidia-cuda-runtime-cu12==12.6.77",
            "nvidia-cuda-nvcc-cu12==12.6.85",
        ),
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
        min_driver="CUDA 11.x driver (JetPack 5 ships 11.4; cubins are from 11.8)",
        pip_packages=("nvidia-cuda-nvrtc-cu11==11.8.89", "nvidia-cuda-cccl-cu12==12.6.77"),
        nvrtc_lib="libnvrtc.so.11.2",
        nvrtc_builtins="libnvrtc-builtins.so.11.8",
        # NVRTC 11.8's default dialect is too old for CCCL 12.6's libcu++ ("requires C++11").
        options=("-std=c++17",),
        # CCCL 12.6's libcu++ compiles under NVRTC 11.8; CUDA 12.6's cuda_fp16.h does not
        # (NV_IF_ELSE_TARGET errors), and the CUDA 11 headers would overwrite the CUDA 12
        # ones (same pip install path), so half-precision kernels are unsupported here.
        include_dirs=("cuda_cccl/include",),
    ),
}


def get_toolchain(name: str) -> CudaToolchain:
    try:
        return TOOLCHAINS[name]
    except KeyError:
        raise CudaToolchainError(
            f"unknown CUDA toolchain {name!r}; known: {', '.join(sorted(TOOLCHAINS))}"
        ) from None


# ---------------------------------------------------------------------------------------
# Locating pip-installed NVIDIA libraries


def _nvidia_dirs() -> list[Path]:
    """Roots of the `nvidia` namespace package (nvidia-* wheels install below it)."""
    spec = importlib.util.find_spec("nvidia")
    return [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []


def _find_in_nvidia(rel: str) -> Path | None:
    for root in _nvidia_dirs():
        if (root / rel).exists():
            return root / rel
    return None


# ---------------------------------------------------------------------------------------
# NVRTC through ctypes: no cuda-bindings needed, and two NVRTC majors can sit in one
# process because their sonames differ.


class _Nvrtc:
    def __init__(self, tc: CudaToolchain):
        self.tc = tc
        lib_dir = _find_in_nvidia("cuda_nvrtc/lib")
        try:
            if lib_dir and (lib_dir / tc.nvrtc_lib).exists():
                # libnvrtc dlopens its builtins by soname; preloading by path makes that
                # work without LD_LIBRARY_PATH.
                ctypes.CDLL(str(lib_dir / tc.nvrtc_builtins), mode=ctypes.RTLD_GLOBAL)
                self.lib = ctypes.CDLL(str(lib_dir / tc.nvrtc_lib))
            else:
                self.lib = ctypes.CDLL(tc.nvrtc_lib)  # a system CUDA install, if any
        except OSError as e:
            raise CudaToolchainError(
                f"{tc.name}: cannot load {tc.nvrtc_lib} ({e}); "
                f"pip install {' '.join(tc.pip_packages)}"
            ) from None
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = f"{major.value}.{minor.value}"
        if self.version != tc.version:
            raise CudaToolchainError(
                f"{tc.name} is pinned to NVRTC {tc.version} but {tc.nvrtc_lib} is "
                f"{self.version}; pip install {tc.pip_packages[0]}"
            )
        self.includes = []
        for rel in tc.include_dirs:
            inc = _find_in_nvidia(rel)
            if inc is None:
                raise CudaToolchainError(
                    f"{tc.name}: headers nvidia/{rel} missing; pip install {' '.join(tc.pip_packages)}"
                )
            self.includes.append(str(inc))

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
            raise CudaToolchainError(f"{what} failed: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def compile(self, source: str, arch: str) -> tuple[bytes, str]:
        """Compile CUDA C++ to a cubin for `arch` (sm_XY). Returns (cubin, NVRTC log)."""
        prog = ctypes.c_void_p()
        self._check(
            self.lib.nvrtcCreateProgram(ctypes.byref(prog), _NVRTC_PREAMBLE.encode() + source.encode(),
                                        b"tvm_kernels.cu", 0, None, None),
            "nvrtcCreateProgram",
        )
        try:
            # Mirrors TVM's own NVRTC options (tvm/support/nvcc.py); ptxas -v puts the
            # per-kernel resource summary in the log.
            opts = [f"--gpu-architecture={arch}", "-default-device", "--use_fast_math",
                    "--device-int128", "--ptxas-options=-v", *self.tc.options,
                    *(f"-I{p}" for p in self.includes),
                    "-D__NV_SILENCE_DEPRECATION_BEGIN=", "-D__NV_SILENCE_DEPRECATION_END=",
                    "-D__NV_SILENCE_HOST_DEPRECATION_BEGIN=", "-D__NV_SILENCE_HOST_DEPRECATION_END=",
                    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
            copts = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
            rc = self.lib.nvrtcCompileProgram(prog, len(opts), copts)
            size = ctypes.c_size_t()
            self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            self.lib.nvrtcGetProgramLog(prog, buf)
            log = buf.value.decode(errors="replace")
            if rc != 0:
                hint = ""
                if "cuda_fp16.h" in log or "cuda_bf16.h" in log:
                    hint = f" (half-precision headers are not available for {self.tc.name})"
                raise CudaToolchainError(f"NVRTC {self.version} failed for {arch}{hint}:\n{log[-4000:]}")
            self._check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            out = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetCUBIN(prog, out), "nvrtcGetCUBIN")
            return out.raw, log
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


# TVM's generated source covers cstdint/type_traits under __CUDACC_RTC__; INFINITY needs
# host <math.h>, which NVRTC lacks (same fix as tvm/support/nvcc.py).
_NVRTC_PREAMBLE = """#include <cuda/std/limits>
#ifndef INFINITY
#define INFINITY (::cuda::std::numeric_limits<float>::infinity())
#endif
"""

_NVRTC_CACHE: dict[str, _Nvrtc] = {}


def _nvrtc(tc: CudaToolchain) -> _Nvrtc:
    if tc.name not in _NVRTC_CACHE:
        _NVRTC_CACHE[tc.name] = _Nvrtc(tc)
    return _NVRTC_CACHE[tc.name]


# ---------------------------------------------------------------------------------------
# Making TVM's CUDA codegen runtime available without a driver

def _has_cuda_codegen_runtime() -> bool:
    import tvm_ffi

    return tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None


def _stub_cache_dir() -> Path:
    base = os.environ.get("PIPELINE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "pipeline"
    )
    return Path(base) / "cuda-stub"


def _build_libcuda_stub(symbols: list[str]) -> Path:
    """Build (once, cached) a libcuda.so.1 whose functions all report CUDA_ERROR_NO_DEVICE.

    It only has to satisfy the dynamic linker for libtvm_runtime_cuda.so: nothing here
    launches kernels. The symbol list comes from that library's own imports.
    """
    body = ["typedef int CUresult;"]
    for s in symbols:
        if s in ("cuGetErrorName", "cuGetErrorString"):
            body.append(f'CUresult {s}(CUresult e, const char **p) {{ if (p) *p = '
                        f'"CUDA_ERROR_NO_DEVICE (libcuda stub from pipeline.cuda_aot)"; return 0; }}')
        else:
            body.append(f"CUresult {s}(void) {{ return 100; /* CUDA_ERROR_NO_DEVICE */ }}")
    code = "\n".join(body) + "\n"
    out = _stub_cache_dir() / hashlib.sha256(code.encode()).hexdigest()[:16] / "libcuda.so.1"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise CudaToolchainError(
            "building the libcuda.so.1 stub needs a C compiler (gcc); apt-get install gcc"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, tmp_so = Path(tmp) / "stub.c", Path(tmp) / "libcuda.so.1"
        src.write_text(code)
        r = subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(tmp_so), str(src)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise CudaToolchainError(f"building the libcuda.so.1 stub failed: {r.stderr.strip()}")
        os.replace(tmp_so, out)  # atomic: concurrent first uses never see half a file
    return out


def _load_cudart13() -> None:
    lib = _find_in_nvidia("cu13/lib/libcudart.so.13")
    try:
        ctypes.CDLL(str(lib) if lib else "libcudart.so.13", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        raise CudaToolchainError(
            "TVM's CUDA runtime (libtvm_runtime_cuda.so) needs libcudart.so.13; "
            "pip install nvidia-cuda-runtime==13.0.96"
        ) from None


def _load_driver_or_stub(runtime_dir: Path) -> bool:
    """Load libcuda.so.1: the driver, or where there is none a stub that reports no device. True: the stub."""
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)  # a real driver wins
        return False
    except OSError:
        imports = _elf_undefined_symbols((runtime_dir / "libtvm_runtime_cuda.so").read_bytes())
        driver_syms = sorted(s for s in imports if s.startswith("cu") and not s.startswith("cuda"))
        ctypes.CDLL(str(_build_libcuda_stub(driver_syms)), mode=ctypes.RTLD_GLOBAL)
        return True


def ensure_cuda_codegen_runtime() -> None:
    """Make `ffi.Module.create.cuda` available in this process, after `import tvm`.

    Loading order matters: the dynamic linker satisfies libtvm_runtime_cuda.so's NEEDED
    libcudart.so.13 / libcuda.so.1 with libraries already loaded under those sonames.
    """
    import tvm  # noqa: F401  (loads libtvm_runtime, which the CUDA runtime needs)
    from tvm.base import _LOADED_LIBS
    from tvm_ffi.libinfo import load_lib_ctypes

    if _has_cuda_codegen_runtime():
        return
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    _load_cudart13()
    if _load_driver_or_stub(runtime_dir):
        # Keep builds outside aot_cuda() as they were without a driver: CUDA source kept
        # in the library, compiled on the board.
        os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL"
        )
    except (OSError, FileNotFoundError, RuntimeError) as e:
        raise CudaToolchainError(f"cannot load TVM's CUDA runtime library: {e}") from None
    if not _has_cuda_codegen_runtime():
        raise CudaToolchainError("libtvm_runtime_cuda.so loaded but registered no CUDA module factory")


# ---------------------------------------------------------------------------------------
# The AOT context


@dataclass
class CompiledCuda:
    cubin: bytes
    source: str  # the CUDA C++ TVM generated
    log: str  # NVRTC/ptxas log (ptxas -v resource lines included)

    def kernel_resources(self) -> list[dict]:
        return kernel_resources(self.cubin, launch_bounds(self.source))


@dataclass
class AotSession:
    arch: str
    toolchain: CudaToolchain
    compiler_version: str  # the NVRTC version actually used
    outputs: list[CompiledCuda] = field(default_factory=list)

    @property
    def cubins(self) -> list[bytes]:
        return [o.cubin for o in self.outputs]


_ARCH_RE = re.compile(r"^sm_(\d+)$")


@contextlib.contextmanager
def aot_cuda(arch: str, toolchain: str = "nvrtc-12") -> Iterator[AotSession]:
    """Within this block, CUDA builds produce cubins for `arch`, compiled by `toolchain`.

    Use it around `tvm.compile(mod, cuda_target)`; the target's arch should be the same
    (it decides what TVM's codegen may emit). Each compiled cubin is appended to the
    yielded session's `outputs`. `export_library` may happen inside or after the block:
    the cubin is already in the executable.
    """
    import tvm
    import tvm_ffi

    tc = get_toolchain(toolchain)
    if not _ARCH_RE.match(arch):
        raise CudaToolchainError(f"arch must look like 'sm_87', got {arch!r}")
    if arch not in tc.supported_archs:
        others = [f"{t.name} ({t.min_driver})" for t in TOOLCHAINS.values() if arch in t.supported_archs]
        raise CudaToolchainError(
            f"{tc.name} (NVRTC {tc.version}) cannot compile for {arch}; it supports "
            f"{', '.join(tc.supported_archs)}; toolchains that can: {', '.join(others) or 'none'}"
        )
    nvrtc = _nvrtc(tc)
    ensure_cuda_codegen_runtime()
    session = AotSession(arch=arch, toolchain=tc, compiler_version=nvrtc.version)
    errors: list[CudaToolchainError] = []

    def compile_callback(code):
        source = str(code)
        try:
            # tvm.compile does not enter the target, but a caller's `with target:` shows it.
            target = tvm.target.Target.current(allow_none=True)
            target_arch = getattr(target, "arch", None) if target is not None else None
            if isinstance(target_arch, str) and target_arch and target_arch != arch:
                raise CudaToolchainError(f"aot_cuda({arch!r}) used for a target with arch {target_arch!r}")
            cubin, log = nvrtc.compile(source, arch)
        except CudaToolchainError as e:
            errors.append(e)  # crossing TVM's FFI turns it into a RuntimeError
            raise
        session.outputs.append(CompiledCuda(cubin, source, log))
        return bytearray(cubin)  # what TVM's own callback returns

    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    old_env = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_callback, override=True)
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "0"
    try:
        yield session
    except Exception as e:
        if errors and not isinstance(e, CudaToolchainError):
            raise errors[-1] from e
        raise
    finally:
        if old_env is None:
            os.environ.pop("TVM_COMPILE_FORCE_FALLBACK", None)
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = old_env
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)
        else:
            tvm_ffi.remove_global_func("tvm_callback_cuda_compile")


# ---------------------------------------------------------------------------------------
# ELF reading (pure Python, ELF64 little-endian: x86_64, aarch64 and CUDA cubins)


def _elf_section_list(data: bytes) -> list[tuple[str, int, int, int, int, int, int]]:
    """Section headers in index order: (name, sh_type, sh_addr, sh_offset, sh_size, sh_link, sh_info)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    stroff = raw[shstrndx][4]
    return [(_cstr(data, stroff + r[0]), r[1], r[3], r[4], r[5], r[6], r[7]) for r in raw]


def _cstr(data: bytes, off: int) -> str:
    return data[off: data.index(b"\0", off)].decode()


def _elf_sections(data: bytes) -> dict[str, tuple[int, int, int, int, int]]:
    """name -> (sh_type, offset, size, sh_link, sh_info); cubins have unique section names."""
    return {n: (t, off, size, link, info) for n, t, _, off, size, link, info in _elf_section_list(data)}


def _elf_symbols(data: bytes, symtab: str = ".symtab") -> list[tuple[str, int, int, int]]:
    """(name, st_shndx, st_value, st_size) of every symbol in `symtab`."""
    secs = _elf_section_list(data)
    tab = next((s for s in secs if s[0] == symtab), None)
    if tab is None:
        return []
    _, _, _, off, size, link, _ = tab
    strtab_off = secs[link][3]
    out = []
    for i in range(size // 24):
        st_name, _info, _other, shndx, value, sz = struct.unpack_from("<IBBHQQ", data, off + 24 * i)
        out.append((_cstr(data, strtab_off + st_name), shndx, value, sz))
    return out


def _elf_undefined_symbols(data: bytes) -> set[str]:
    return {n for n, shndx, _, _ in _elf_symbols(data, ".dynsym") if shndx == 0 and n}


# ---------------------------------------------------------------------------------------
# Cubin inspection

_EIATTR_FRAME_SIZE, _EIATTR_MAX_THREADS, _EIATTR_REGCOUNT = 0x11, 0x05, 0x2F
_EIFMT_NVAL, _EIFMT_BVAL, _EIFMT_HVAL, _EIFMT_SVAL = 1, 2, 3, 4


def _nv_info(data: bytes, off: int, size: int) -> Iterator[tuple[int, bytes]]:
    """Yield (attribute, payload) records of a .nv.info section."""
    end, p = off + size, off
    while p + 2 <= end:
        fmt, attr = data[p], data[p + 1]
        if fmt == _EIFMT_SVAL:
            n, = struct.unpack_from("<H", data, p + 2)
            yield attr, data[p + 4: p + 4 + n]
            p += 4 + n
        elif fmt == _EIFMT_HVAL:
            yield attr, data[p + 2: p + 4]
            p += 4
        elif fmt == _EIFMT_BVAL:
            yield attr, data[p + 2: p + 3]
            p += 4  # records are 4-byte aligned
        else:  # NVAL
            yield attr, b""
            p += 4


def cubin_info(cubin: bytes) -> dict:
    """Arch and ELF ABI of a cubin: {'arch': 'sm_87', 'abi_version': 7, 'toolkit': 126 | None}.

    CUDA <= 12 cubins have OS/ABI 0x33, ABI version 7, the SM in e_flags bits 0-7 and the
    toolkit (e.g. 126 = 12.6) in e_version; CUDA 13 cubins have OS/ABI 0x41, ABI version 8
    and the SM in e_flags bits 8-15.
    """
    if cubin[:4] != b"\x7fELF":
        raise ValueError("not an ELF cubin")
    osabi, abiver = cubin[7], cubin[8]
    e_machine, = struct.unpack_from("<H", cubin, 0x12)
    e_version, = struct.unpack_from("<I", cubin, 0x14)
    e_flags, = struct.unpack_from("<I", cubin, 0x30)
    if e_machine != 190:  # EM_CUDA
        raise ValueError(f"ELF machine {e_machine} is not EM_CUDA")
    sm = (e_flags >> 8) & 0xFF if osabi == 0x41 else e_flags & 0xFF
    return {"arch": f"sm_{sm}", "abi_version": abiver, "toolkit": e_version if osabi == 0x33 else None}


def launch_bounds(cuda_source: str) -> dict[str, int]:
    """kernel name -> N from TVM's `__global__ void __launch_bounds__(N) name(`."""
    return {m[2]: int(m[1]) for m in re.finditer(r"__launch_bounds__\((\d+)\)\s+(\w+)\s*\(", cuda_source)}


def kernel_resources(cubin: bytes, bounds: dict[str, int] | None = None) -> list[dict]:
    """Per kernel: name, registers (per thread), shared_bytes (static), local_bytes (per
    thread: stack frame + .nv.local), max_threads (EIATTR_MAX_THREADS, i.e. the
    __launch_bounds__ ptxas saw; else `bounds` from the source; else None).

    Read from the cubin's ELF alone, so no CUDA tool is needed; the numbers match
    `cuobjdump --dump-resource-usage` (REG, SHARED, STACK + LOCAL).
    """
    secs = _elf_sections(cubin)
    syms = _elf_symbols(cubin)
    names = [s[0] for s in syms]
    regs: dict[str, int] = {}
    frame: dict[str, int] = {}
    if ".nv.info" in secs:
        _, off, size, _, _ = secs[".nv.info"]
        for attr, val in _nv_info(cubin, off, size):
            if attr in (_EIATTR_REGCOUNT, _EIATTR_FRAME_SIZE) and len(val) >= 8:
                sym, v = struct.unpack_from("<II", val)
                (regs if attr == _EIATTR_REGCOUNT else frame)[names[sym]] = v
    out = []
    for sec, (_, _, _, _, sh_info) in secs.items():
        if not sec.startswith(".text."):
            continue
        k = sec[len(".text."):]
        max_threads = None
        if f".nv.info.{k}" in secs:
            _, off, size, _, _ = secs[f".nv.info.{k}"]
            for attr, val in _nv_info(cubin, off, size):
                if attr == _EIATTR_MAX_THREADS and len(val) >= 12:
                    x, y, z = struct.unpack_from("<III", val)
                    max_threads = x * y * z
        if max_threads is None and bounds:
            max_threads = bounds.get(k)
        out.append({
            "name": k,
            # ptxas also stores the count in the top byte of the .text section's sh_info.
            "registers": regs.get(k, sh_info >> 24),
            "shared_bytes": secs.get(f".nv.shared.{k}", (0, 0, 0, 0, 0))[2],
            "local_bytes": frame.get(k, 0) + secs.get(f".nv.local.{k}", (0, 0, 0, 0, 0))[2],
            "max_threads": max_threads,
        })
    return out


# ---------------------------------------------------------------------------------------
# What device code does a library / executable carry?

_LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"


def _read_u64(b: bytes, p: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", b, p)[0], p + 8


def _parse_library_bin(blob: bytes) -> list[tuple[str, bytes]]:
    """(kind, serialized bytes) of each module in tvm-ffi's packed-imports blob.

    Layout (tvm_ffi/src/ffi/extra/library_module.cc): <nbytes:u64> <import_tree indptr:
    vec<u64>> <child indices: vec<u64>> then per module <kind:str> [<bytes>] ("_lib" has
    none); str/bytes/vec are a u64 count followed by the items.
    """
    nbytes, p = _read_u64(blob, 0)
    end = p + nbytes
    n_indptr, p = _read_u64(blob, p)
    p += 8 * n_indptr
    n_child, p = _read_u64(blob, p)
    p += 8 * n_child
    mods = []
    for _ in range(n_indptr - 1):
        n, p = _read_u64(blob, p)
        kind = blob[p: p + n].decode()
        p += n
        payload = b""
        if kind != "_lib":
            n, p = _read_u64(blob, p)
            payload = blob[p: p + n]
            p += n
        mods.append((kind, payload))
    assert p <= end
    return mods


def _split_cuda_module(payload: bytes) -> tuple[str, bytes]:
    """(fmt, code) of a serialized CUDA module: <fmt:str> <fmap> <code:bytes>.

    fmap is not parsed: code is the trailing length-prefixed field, so find the split point
    whose u64 prefix equals the remaining length.
    """
    n, p = _read_u64(payload, 0)
    fmt = payload[p: p + n].decode()
    for q in range(len(payload) - 8, p + n - 1, -1):
        if struct.unpack_from("<Q", payload, q)[0] == len(payload) - q - 8:
            return fmt, payload[q + 8:]
    raise ValueError("malformed CUDA module payload")


def _library_blob(lib) -> bytes:
    if isinstance(lib, (str, os.PathLike)):
        data = Path(lib).read_bytes()
        for table in (".dynsym", ".symtab"):
            for name, shndx, value, _ in _elf_symbols(data, table):
                if name == _LIBRARY_BIN_SYMBOL and shndx != 0:
                    # st_value is a virtual address: map it through its section header.
                    _, _, addr, off, *_ = _elf_section_list(data)[shndx]
                    return data[off + value - addr:]
        raise ValueError(f"{lib}: no {_LIBRARY_BIN_SYMBOL} symbol (not a TVM-exported library?)")
    # In-memory module or Executable: pack its imports exactly as export_library would.
    import tvm_ffi

    mod = getattr(lib, "mod", lib)
    return bytes(tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes())


def cuda_device_code(lib) -> list[tuple[str, bytes]]:
    """(fmt, code) of every CUDA module in an exported library (path to the .so, or to the
    devc.o inside a .tar export) or an in-memory Executable/Module. fmt is "cuda" (C++
    source, compiled on the board at load time), "cubin", "ptx" or "fatbin".
    Needs no CUDA runtime, and reads aarch64 files as well.
    """
    return [_split_cuda_module(p) for kind, p in _parse_library_bin(_library_blob(lib)) if kind == "cuda"]


def cuda_device_code_format(lib) -> str:
    """"cubin" / "ptx" / "fatbin" / "cuda" (source) for the library's CUDA code; "none" if
    it has no CUDA module; formats joined with "+" if modules differ."""
    fmts = sorted({f for f, _ in cuda_device_code(lib)})
    return "+".join(fmts) if fmts else "none"
