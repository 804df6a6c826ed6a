"""AOT CUDA: cubins (not source) for Jetson archs, built on a host with no GPU or driver."""
import ctypes.util
import dataclasses
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import tvm  # imported first on purpose: the pipeline imports tvm before it knows the target
from tvm import relax

from pipeline.toolchain import cuda_runtime, cuda_toolchains
from pipeline.toolchain.cubin import cubin_info, cuda_device_code, cuda_device_code_format, kernel_resources
from pipeline.toolchain.cuda_aot import aot_cuda
from pipeline.toolchain.cuda_toolchains import CudaToolchainError, find_in_nvidia

pytestmark = pytest.mark.skipif(
    find_in_nvidia("cuda_nvrtc/lib/libnvrtc.so.12") is None,
    reason="NVRTC 12 missing: pip install " + " ".join(cuda_toolchains.TOOLCHAINS["nvrtc-12"].pip_packages),
)

JETSON = tvm.target.Target(
    "nvidia/jetson-orin-nano", host={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}
)
SM87_X86 = tvm.target.Target({"kind": "cuda", "arch": "sm_87"}, host={"kind": "llvm"})
SM72_X86 = tvm.target.Target({"kind": "cuda", "arch": "sm_72"}, host={"kind": "llvm"})


def matmul_relu(dtype="float32", rows=64):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, 128), dtype))
    w = relax.Var("w", relax.TensorType((128, 256), dtype))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.relu(relax.op.matmul(x, w)))
            gv = bb.emit_output(relax.op.nn.softmax(y))
        bb.emit_func_output(gv)
    return bb.get()


def build(target, dtype="float32", rows=64):
    return tvm.compile(matmul_relu(dtype, rows), target, relax_pipeline=relax.get_default_pipeline(target))


def assert_sane(resources, n_kernels):
    assert len(resources) == n_kernels
    for k in resources:
        assert 0 < k["registers"] <= 255, k
        assert 0 <= k["shared_bytes"] <= 48 * 1024, k
        assert k["local_bytes"] == 0, k  # these kernels neither spill nor use a stack
        assert k["max_threads"] and k["max_threads"] <= 1024, k
    assert any(k["shared_bytes"] > 0 for k in resources)  # dlight's matmul tiles in shared memory


def test_source_without_context():
    # Without aot_cuda the GPU-less build keeps CUDA source (compiled on the board at load),
    # before and after the CUDA runtime has been loaded into this process by aot_cuda.
    assert cuda_device_code_format(build(SM87_X86)) == "cuda"
    with aot_cuda("sm_87", "nvrtc-12"):
        pass
    assert cuda_device_code_format(build(SM87_X86)) == "cuda"


def test_sm87_cubin_exported(tmp_path):
    with aot_cuda("sm_87", "nvrtc-12") as s:
        ex = build(SM87_X86)
    lib = tmp_path / "sm87.so"
    ex.export_library(str(lib))

    assert s.compiler_version == "12.6"
    assert len(s.outputs) == 1
    cubin = s.outputs[0].cubin
    assert cubin[:4] == b"\x7fELF" and cubin[0x12:0x14] == (190).to_bytes(2, "little")  # EM_CUDA
    assert cubin_info(cubin) == {"arch": "sm_87", "abi_version": 7, "toolkit": 126}
    assert cubin[0x30] == 87  # e_flags low byte: SM of an ABI-7 cubin
    assert_sane(s.outputs[0].kernel_resources(), 2)

    # The exported library carries exactly that cubin, no source.
    assert cuda_device_code_format(lib) == "cubin"
    assert cuda_device_code(lib) == [("cubin", cubin)]
    # And it loads back without any JIT (the runtime is registered now).
    assert tvm.runtime.load_module(str(lib)).kind == "relax.VMExecutable"


def test_jetson_orin(tmp_path):
    with aot_cuda("sm_87", "nvrtc-12") as s:
        ex = build(JETSON)
    # Linking a .so needs an aarch64 linker; the in-memory executable holds the same blob.
    assert cuda_device_code_format(ex) == "cubin"
    (fmt, code), = cuda_device_code(ex)
    assert code == s.outputs[0].cubin and cubin_info(code)["arch"] == "sm_87"
    assert_sane(kernel_resources(code), 2)
    # A .tar export needs no linker: its devc.o (aarch64 ELF) is what gets linked on the board.
    ex.export_library(str(tmp_path / "jetson.tar"))
    with tarfile.open(tmp_path / "jetson.tar") as tar:
        tar.extract("devc.o", tmp_path)
    assert cuda_device_code(tmp_path / "devc.o") == [("cubin", code)]


def test_sm72_nvrtc11():
    if find_in_nvidia("cuda_nvrtc/lib/libnvrtc.so.11.2") is None:
        pytest.skip("pip install " + " ".join(cuda_toolchains.TOOLCHAINS["nvrtc-11"].pip_packages))
    with aot_cuda("sm_72", "nvrtc-11") as s:
        ex = build(SM72_X86)
    assert cuda_device_code_format(ex) == "cubin"
    assert cubin_info(s.outputs[0].cubin) == {"arch": "sm_72", "abi_version": 7, "toolkit": 118}
    assert_sane(s.outputs[0].kernel_resources(), 2)
    # float16 on tensor cores (Xavier's Volta HMMA): CUDA 12.6's cuda_fp16.h and mma.h under NVRTC 11.8
    with aot_cuda("sm_72", "nvrtc-11") as s:
        build(SM72_X86, "float16", rows=128)
    assert "nvcuda::wmma" in s.outputs[0].source and "__half" in s.outputs[0].source
    assert cubin_info(s.outputs[0].cubin)["toolkit"] == 118
    assert_sane(s.outputs[0].kernel_resources(), 2)


def test_fp16_nvrtc12():
    with aot_cuda("sm_87", "nvrtc-12") as s:
        build(SM87_X86, "float16")
    assert_sane(s.outputs[0].kernel_resources(), 2)


def test_fp16_tensor_cores_nvrtc12():
    # dlight puts float16 matmuls with every extent over 64 on tensor cores (wmma, from mma.h)
    with aot_cuda("sm_87", "nvrtc-12") as s:
        build(SM87_X86, "float16", rows=128)
    assert "nvcuda::wmma" in s.outputs[0].source
    assert_sane(s.outputs[0].kernel_resources(), 2)


@pytest.mark.parametrize("arch, toolchain, message", [
    ("sm_87", "nvcc-99", "known: nvrtc-11, nvrtc-12"),
    ("sm_35", "nvrtc-12", "toolchains that can: nvrtc-11"),
    ("sm_100", "nvrtc-12", "toolchains that can: none"),
    ("87", "nvrtc-12", "look like 'sm_87'"),
])
def test_errors(arch, toolchain, message):
    with pytest.raises(CudaToolchainError, match=message):
        with aot_cuda(arch, toolchain):
            pass


def test_missing_toolchain_says_what_to_install(monkeypatch):
    missing = dataclasses.replace(
        cuda_toolchains.TOOLCHAINS["nvrtc-12"], name="nvrtc-x", nvrtc_lib="libnvrtc.so.99",
        pip_packages=("nvidia-cuda-nvrtc-cu99==99.0",),
    )
    monkeypatch.setitem(cuda_toolchains.TOOLCHAINS, "nvrtc-x", missing)
    with pytest.raises(CudaToolchainError, match="pip install nvidia-cuda-nvrtc-cu99"):
        with aot_cuda("sm_87", "nvrtc-x"):
            pass


def test_stub_builds_in_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path))
    so = cuda_runtime._build_libcuda_stub(["cuModuleLoadData", "cuGetErrorName"])
    assert so.parent.parent == tmp_path / "cuda-stub" and so.name == "libcuda.so.1"
    assert b"libcuda.so.1" in so.read_bytes()  # soname, so it satisfies NEEDED libcuda.so.1


def test_ensure_runtime_after_import_tvm_in_fresh_process():
    # The stub/runtime dance must work although `import tvm` already ran without a driver.
    code = (
        "import tvm, tvm_ffi\n"
        "assert tvm_ffi.get_global_func('ffi.Module.create.cuda', allow_missing=True) is None\n"
        "from pipeline.toolchain.cuda_runtime import ensure_cuda_codegen_runtime\n"
        "ensure_cuda_codegen_runtime()\n"
        "assert tvm_ffi.get_global_func('ffi.Module.create.cuda', allow_missing=True) is not None\n"
    )
    if ctypes.util.find_library("cuda"):
        pytest.skip("a real driver is present: TVM's CUDA runtime loads at import")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).parents[1])


def test_runtime_only_tvm_loads_its_cuda_library(tmp_path):
    # Boards run TVM without its compiler library, and such a TVM 0.27 loads no device backend at import:
    # run.py must load libtvm_runtime_cuda.so itself, or every CUDA bundle says "no cuda support".
    if ctypes.util.find_library("cuda"):
        pytest.skip("a real driver is present: the device would be found")
    code = (
        "import os\n"
        "os.environ['TVM_USE_RUNTIME_LIB'] = '1'\n"
        "import tvm\n"
        "from pathlib import Path\n"
        "from pipeline import runtime\n"
        "from pipeline.toolchain import cuda_runtime\n"
        "assert not tvm.runtime.enabled('cuda')\n"
        "cuda_runtime.load_cudart13()\n"  # what a CUDA machine has: its CUDA runtime, a driver (here: the stub)
        "cuda_runtime.load_driver_or_stub(Path(tvm.base._LOADED_LIBS['tvm_runtime']._name).resolve().parent)\n"
        "try:\n"
        "    runtime.load_vm(Path('lib.so'), 'cuda')\n"
        "except runtime.RuntimeUnavailable as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert "finds no cuda device" in out.stdout, out.stdout  # registered; the stub driver has no device


@pytest.mark.skipif(find_in_nvidia("cu13/bin/cuobjdump") is None,
                    reason="cross-check needs pip nvidia-cuda-cuobjdump")
def test_resources_match_cuobjdump(tmp_path):
    with aot_cuda("sm_87", "nvrtc-12") as s:
        build(SM87_X86)
    path = tmp_path / "k.cubin"
    path.write_bytes(s.outputs[0].cubin)
    out = subprocess.run([str(find_in_nvidia("cu13/bin/cuobjdump")), "--dump-resource-usage",
                          str(path)], capture_output=True, text=True, encoding="utf-8", check=True).stdout
    for k in kernel_resources(s.outputs[0].cubin):
        line = out.split(f"Function {k['name']}:")[1].splitlines()[1]
        assert f"REG:{k['registers']} " in line and f"SHARED:{k['shared_bytes']} " in line
        assert "STACK:0 " in line and "LOCAL:0 " in line


def test_a_cuda_modules_code_is_split_off_whatever_its_last_bytes():
    """A serialized CUDA module is <fmt> <fmap> <code>, each length-prefixed; a cubin whose last 16 bytes read as
    [u64 8][8 bytes] once passed for an 8-byte code field (seen on a tuning candidate: "not an ELF cubin")."""
    import struct

    from pipeline.toolchain.cubin import _split_cuda_module

    def field(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    code = b"\x7fELF" + bytes(64) + struct.pack("<Q", 8) + b"12345678"
    assert _split_cuda_module(field(b"cubin") + field(b"fmap: any bytes") + field(code)) == ("cubin", code)
