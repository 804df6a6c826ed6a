"""Check CUDA artifacts on a real GPU: compile here (no GPU needed), run and time them on a machine that has one.

    python scripts/gpu_check.py prepare DIR [--arch sm_90] [--verify M ...] [--verify-fp16 M ...] [--time M ...]
    python3 scripts/gpu_check.py run DIR [--json F] [--repeat 100] [--deadline-s 420]      # on the GPU machine

``prepare`` (this x86 host) compiles each model with ``compile --target cuda --cuda-arch ARCH`` (cubins from
NVRTC, ahead of time) and writes DIR/payload.tar.xz, one file to copy to the GPU machine, holding:

- ``verify/NAME.tar``: bundles exactly as ``python -m pipeline package`` writes them, run there as a user
  would (``tar xf NAME.tar && python3 NAME/run.py``): every file's sha256, the outputs against the PyTorch
  reference computed here, the latency. Their weights are seeded random ones rounded to 31 levels per tensor
  (a ``--weights`` checkpoint), so that params.npz compresses about 6x and full-size models fit the transfer;
  the reference outputs still vary, so the check can fail.
- ``time/NAME/``: the library and the shapes of its weights only, timed there with random weights (the
  time does not depend on their values).
- ``site/``: the TVM runtime (apache-tvm without its 240 MB compiler library, run with TVM_USE_RUNTIME_LIB=1)
  and apache-tvm-ffi for the GPU machine's Python (``--python-version``, downloaded with pip).

``run`` (the GPU machine: numpy, torch with CUDA and the CUDA 13 runtime library libcudart.so.13 installed;
no pipeline install, no compiler) unpacks the payload, runs every bundle's run.py and times every library
in child processes with the TVM runtime, then times the same models in PyTorch eager on the same GPU
(float32 with TF32 off, as TVM's float32 kernels compute, and float16) with CUDA events, and prints one table.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = "payload.tar.xz"
QUANT_LEVELS = 15  # weights rounded to k * 2**-m, |k| <= 15: 31 values per tensor


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="compile here and write DIR/payload.tar.xz")
    p.add_argument("dir", type=Path)
    p.add_argument("--arch", default="sm_90", help="GPU architecture (sm_90: H100/H200)")
    p.add_argument("--verify", nargs="*", default=["test_cyclemlp", "test_mixer", "test_resmlp", "test_convmixer",
                                                   "test_gmlp", "cyclemlp_b1"], help="models run and checked there")
    p.add_argument("--verify-fp16", nargs="*", default=["cyclemlp_b1"], help="models also built --fp16 and checked")
    p.add_argument("--time", nargs="*", default=["mixer_s16_224", "resmlp_12_224", "convmixer_768_32", "gmlp_s16_224"],
                   help="models only timed there (random weights)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for apache-tvm-ffi's wheel")
    r = sub.add_parser("run", help="on the GPU machine: unpack DIR/payload.tar.xz, run, time, compare")
    r.add_argument("dir", type=Path)
    r.add_argument("--json", type=Path, help="write every result here")
    r.add_argument("--repeat", type=int, default=100, help="timed runs per model and runtime")
    r.add_argument("--deadline-s", type=float, default=420.0, help="skip what is left after this long")
    t = sub.add_parser("time-library", help=argparse.SUPPRESS)  # child process of `run`, in the TVM environment
    t.add_argument("dir", type=Path)
    t.add_argument("--repeat", type=int, default=100)
    return ap.parse_args(argv)


# ---------------------------------------------------------------- prepare (here)

def _quantized_checkpoint(name: str, path: Path, seed: int = 0) -> None:
    """Seeded random weights (zero-initialised matrices re-drawn, as compile does) rounded to few levels."""
    import torch

    from pipeline.stages.model import load_model

    model, _, _ = load_model(name, None, seed)
    state, parameters = model.state_dict(), dict(model.named_parameters())
    for key, value in state.items():
        if key in parameters and value.numel() > 1 and float(value.std()) > 0:
            # (constant tensors, LayerNorm's ones, stay as they are)
            scale = 2.0 ** torch.floor(torch.log2(3 * value.std() / QUANT_LEVELS))
            state[key] = torch.round(value / scale).clamp(-QUANT_LEVELS, QUANT_LEVELS) * scale
    torch.save(state, path)


def _compile(name: str, arch: str, out: Path, weights: Path | None, fp16: bool = False) -> Path:
    from pipeline.run import compile_model
    from pipeline.spec import BuildSpec

    start = time.perf_counter()
    art, manifest = compile_model(BuildSpec(model=name, target="cuda", cuda_arch=arch, weights=weights, fp16=fp16), out)
    kernels = manifest["target"]["build"]["cuda"]["kernels"]
    print(f"  {out.name}: {len(kernels)} kernels, max {max(k['registers'] for k in kernels)} registers, "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    return art


def _runtime_site(site: Path, python_version: str) -> None:
    """TVM's Python package without its compiler library, and apache-tvm-ffi for the GPU machine's Python."""
    from importlib import metadata

    import tvm

    skip = shutil.ignore_patterns("libtvm_compiler.so", "3rdparty", "src", "__pycache__", "*.pyc")
    shutil.copytree(Path(tvm.__file__).parent, site / "tvm", ignore=skip)
    with tempfile.TemporaryDirectory() as wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python_version, "--implementation", "cp",
                        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
                        "-d", wheels, f"apache-tvm-ffi=={metadata.version('apache-tvm-ffi')}"], check=True)
        (wheel,) = Path(wheels).glob("*.whl")
        shutil.unpack_archive(wheel, site, format="zip")


def prepare(opts) -> None:
    import numpy as np

    from pipeline.bundle import make_bundle

    opts.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        payload = tmp / "payload"
        for sub in ("verify", "time", "site"):
            (payload / sub).mkdir(parents=True)
        builds = [(m, False) for m in opts.verify] + [(m, True) for m in opts.verify_fp16]
        for name, fp16 in builds:
            checkpoint = tmp / f"{name}.pt"
            if not checkpoint.exists():
                _quantized_checkpoint(name, checkpoint)
            label = f"{name}-cuda-{opts.arch}{'-fp16' if fp16 else ''}"
            art = _compile(name, opts.arch, tmp / "artifacts" / label, checkpoint, fp16)
            make_bundle(art, payload / "verify" / f"{label}.tar")
        for name in opts.time:
            label = f"{name}-cuda-{opts.arch}"
            art = _compile(name, opts.arch, tmp / "artifacts" / label, None)
            dest = payload / "time" / label
            dest.mkdir()
            shutil.copy(art / "lib.so", dest)
            manifest = json.loads((art / "manifest.json").read_text())
            with np.load(art / "params.npz") as params:
                manifest["param_specs"] = [{"shape": list(params[k].shape), "dtype": str(params[k].dtype)}
                                           for k in manifest["params"]]
            (dest / "manifest.json").write_text(json.dumps(manifest))
        _runtime_site(payload / "site", opts.python_version)
        print("compressing ...", flush=True)
        with tarfile.open(opts.dir / PAYLOAD, "w:xz", preset=6) as tar:
            tar.add(payload, arcname=".")
    print(f"{opts.dir / PAYLOAD}: {(opts.dir / PAYLOAD).stat().st_size / 2**20:.1f} MiB")


# ---------------------------------------------------------------- run (the GPU machine)

def _tvm_env(site: Path) -> dict:
    """The environment that runs TVM's runtime from ``site`` with CUDA: libcudart.so.13 from a pip package."""
    patterns = [os.path.join(entry, "nvidia", "**", "libcudart.so.13*") for entry in sys.path if entry]
    found = sorted({os.path.dirname(p) for pattern in [*patterns, "/usr/local/cuda*/lib64/libcudart.so.13*"]
                    for p in glob.glob(pattern, recursive=True)})
    env = dict(os.environ, PYTHONPATH=str(site), TVM_USE_RUNTIME_LIB="1")
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*found, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    return env


def time_library(opts) -> None:
    """Child process: run the library with random weights and print its latency as JSON."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    from pipeline.runtime import latency_stats, load_vm, time_vm, to_device

    manifest = json.loads((opts.dir / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    arrays = [rng.uniform(-0.05, 0.05, spec["shape"]).astype(spec["dtype"])
              for spec in (*manifest["inputs"], *manifest["param_specs"])]
    vm, dev = load_vm(opts.dir / "lib.so", "cuda")
    args = to_device(arrays, dev)
    print(json.dumps(latency_stats(time_vm(vm, dev, args, warmup=5, repeat=opts.repeat))))


def _torch_latency(name: str, dtype, repeat: int) -> float:
    """Median ms of PyTorch eager on the GPU, batch 1, CUDA events around each call."""
    import torch

    import models

    cfg = models.get_model_cfg(name)
    model = models.create_model(name).eval().to("cuda", dtype)
    x = torch.randn(1, *cfg.input_size, device="cuda", dtype=dtype)
    times = []
    with torch.inference_mode():
        for i in range(repeat + 10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            end.synchronize()
            if i >= 10:
                times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _model_of(label: str) -> tuple[str, bool]:
    name, fp16 = re.sub(r"-cuda-sm_\d+[a-z]?(-fp16)?$", "", label), label.endswith("-fp16")
    return name, fp16


def run(opts) -> int:
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    with tarfile.open(opts.dir / PAYLOAD) as tar:
        tar.extractall(root, filter="data")
    env = _tvm_env(root / "site")
    if shutil.which("nvidia-smi"):
        print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
    print(f"unpacked in {time.perf_counter() - start:.1f} s; LD_LIBRARY_PATH={env['LD_LIBRARY_PATH']}", flush=True)
    rows, failures = [], 0
    late = lambda: time.perf_counter() - start > opts.deadline_s  # noqa: E731

    for bundle in sorted((root / "verify").glob("*.tar")):
        if late():
            rows.append({"label": bundle.stem, "skipped": "deadline"})
            continue
        with tarfile.open(bundle) as tar:
            tar.extractall(root / "verify", filter="data")
        proc = subprocess.run([sys.executable, str(root / "verify" / bundle.stem / "run.py"), "--repeat", str(opts.repeat)],
                              capture_output=True, text=True, env=env, timeout=300)
        print(f"--- {bundle.stem}: run.py exit {proc.returncode}\n{proc.stdout}{proc.stderr}", flush=True)
        latency = re.search(r"latency: median ([0-9.]+) ms", proc.stdout)
        rows.append({"label": bundle.stem, "verified": proc.returncode == 0, "exit": proc.returncode,
                     "tvm_ms": float(latency.group(1)) if latency else None, "log": proc.stdout + proc.stderr})
        failures += proc.returncode != 0

    for lib in sorted((root / "time").iterdir()):
        if late():
            rows.append({"label": lib.name, "skipped": "deadline"})
            continue
        proc = subprocess.run([sys.executable, __file__, "time-library", str(lib), "--repeat", str(opts.repeat)],
                              capture_output=True, text=True, env=env, timeout=300)
        ok = proc.returncode == 0
        print(f"--- {lib.name}: timed {'ok' if ok else 'FAILED'}\n{proc.stdout}{'' if ok else proc.stderr}", flush=True)
        rows.append({"label": lib.name, "verified": None, "exit": proc.returncode,
                     "tvm_ms": json.loads(proc.stdout.splitlines()[-1])["median_ms"] if ok else None})
        failures += not ok

    import torch

    sys.path.insert(0, str(REPO))
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as TVM's float32 kernels compute it
    torch.backends.cudnn.allow_tf32 = False
    for row in rows:
        if "skipped" in row or late():
            continue
        name, fp16 = _model_of(row["label"])
        try:
            row["torch_ms"] = _torch_latency(name, torch.float16 if fp16 else torch.float32, opts.repeat)
        except Exception as e:  # noqa: BLE001 - a PyTorch failure is reported beside the TVM result, not fatal
            row["torch_error"] = f"{type(e).__name__}: {e}"

    print(f"\n{'artifact':36s} {'checked':>8s} {'TVM ms':>8s} {'torch ms':>9s} {'torch/TVM':>9s}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['label']:36s} skipped ({row['skipped']})")
            continue
        checked = "FAILED" if row["exit"] else "ok" if row["verified"] else "timed"
        tvm_ms, torch_ms = row.get("tvm_ms"), row.get("torch_ms")
        ratio = f"{torch_ms / tvm_ms:9.2f}" if tvm_ms and torch_ms else f"{'-':>9s}"
        print(f"{row['label']:36s} {checked:>8s} {tvm_ms or float('nan'):8.3f} {torch_ms or float('nan'):9.3f} {ratio}"
              f"{'  ' + row['torch_error'] if 'torch_error' in row else ''}")
    print(f"batch 1; medians of {opts.repeat} runs after warm-up; torch {torch.__version__} eager, TF32 off; "
          f"{time.perf_counter() - start:.0f} s in all")
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))
    return 1 if failures else 0


def main() -> int:
    opts = _parse_args()
    if opts.command == "prepare":
        sys.path.insert(0, str(REPO))
        prepare(opts)
        return 0
    if opts.command == "time-library":
        time_library(opts)
        return 0
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
