"""The GPU benchmark: compile here (no GPU needed), then check and time on a machine that has one, in one run.

    python scripts/gpu_check.py prepare DIR [--arch sm_90] [--time M ...] [--verify M ...] [--verify-fp16 M ...]
    python3 scripts/gpu_check.py run DIR [--out results] [--repeat 100] [--deadline-s 450] [--jobs 4]   # the GPU
    python3 scripts/gpu_check.py run DIR --dry-run            # here, on the CPU: everything but the GPU work

``prepare`` (this x86 host) compiles each model with ``compile --target cuda --cuda-arch ARCH`` (cubins from
NVRTC, ahead of time) and writes DIR/payload.tar.xz, one file to copy to the GPU machine, holding:

- ``verify/NAME.tar``: bundles exactly as ``python -m pipeline package`` writes them, run there as a user
  would (``tar xf NAME.tar && python3 NAME/run.py``): every file's sha256, the outputs against the PyTorch
  reference computed here, the latency. Their weights are seeded random ones rounded to 31 levels per tensor
  (a ``--weights`` checkpoint), so that params.npz compresses about 6x and full-size models fit the transfer;
  the reference outputs still vary, so the check can fail.
- ``time/NAME-cuda-ARCH[-fp16]/``: every zoo model's library, float32 and ``--fp16``, with the shapes of its
  weights only (the weights of 20 full-size models do not fit the transfer), run there with random weights.
- ``site/``: the TVM runtime (apache-tvm without its 240 MB compiler library, run with TVM_USE_RUNTIME_LIB=1)
  and apache-tvm-ffi for the GPU machine's Python (``--python-version``, downloaded with pip).

``prepare`` fails when the payload and the repository's tracked files together exceed ``--budget-mib`` (64: what
travels to the GPU machine with the working tree).

``run`` (the GPU machine: numpy, torch with CUDA (triton for torch.compile) and the CUDA 13 runtime library
libcudart.so.13; no pipeline install, no TVM compiler, no network) unpacks the payload and, per model, batch 1:

- our library, float32 and float16, in a child process with the TVM runtime: its output is checked before it
  is timed (the float16 library's against the float32 library's with the same random weights, at the model's
  float16 tolerance; the float32 one for finite, varying logits; the bundles' run.py against the PyTorch
  reference computed here), then timed with TVM's ``time_evaluator`` (CUDA events on TVM's stream);
- PyTorch eager, float32 (TF32 off for matmuls and convolutions, as our float32 kernels compute) and float16,
  and torch.compile (inductor) in its default and "reduce-overhead" modes, of which the faster is reported and
  named, each output checked against eager's before it is timed, with CUDA events;

medians of ``--repeat`` (>= 100) runs after warm-up, then one table (markdown and JSON, with the date, GPU,
driver and versions) in ``--out``. torch.compile compiles in ``--jobs`` processes at once; every timing holds a
lock, so no two timings share the GPU. What is left at ``--deadline-s`` is reported as skipped.
``--dry-run`` does on this machine's CPU what needs no GPU: unpacking, the TVM runtime's import from the
payload, each library's cubins (arch) and weight specs, PyTorch eager on the CPU with a few runs, the table.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
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
    p.add_argument("--time", nargs="*", default=None, help="models timed there, float32 and --fp16 (default: every "
                   "full-size zoo model)")
    p.add_argument("--budget-mib", type=float, default=64.0, help="most the payload and the tracked files may weigh")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for apache-tvm-ffi's wheel")
    r = sub.add_parser("run", help="on the GPU machine: unpack DIR/payload.tar.xz, check, time, compare")
    r.add_argument("dir", type=Path)
    r.add_argument("--out", type=Path, default=Path("gpu-results"), help="where benchmark.{md,json} go")
    r.add_argument("--repeat", type=int, default=100, help="timed runs per model and runtime (>= 100 on a GPU)")
    r.add_argument("--deadline-s", type=float, default=450.0, help="skip what is left after this long")
    r.add_argument("--jobs", type=int, default=4, help="models compiled by torch.compile at once")
    r.add_argument("--models", nargs="*", help="only these models")
    r.add_argument("--dry-run", action="store_true", help="on this CPU: everything that needs no GPU")
    t = sub.add_parser("time-library", help=argparse.SUPPRESS)  # child process of `run`, in the TVM environment
    t.add_argument("dirs", type=Path, nargs="+", help="the float32 library, then optionally the float16 one")
    t.add_argument("--repeat", type=int, default=100)
    t.add_argument("--lock", type=Path)
    t.add_argument("--dry-run", action="store_true")
    m = sub.add_parser("time-torch", help=argparse.SUPPRESS)  # child process of `run`: one model in PyTorch
    m.add_argument("model")
    m.add_argument("--repeat", type=int, default=100)
    m.add_argument("--lock", type=Path)
    m.add_argument("--dry-run", action="store_true")
    opts = ap.parse_args(argv)
    if opts.command == "run" and not opts.dry_run and opts.repeat < 100:
        ap.error("--repeat must be >= 100 on a GPU (medians of at least 100 runs)")
    return opts


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
    if python_version == f"{sys.version_info.major}.{sys.version_info.minor}":  # this Python's: no download
        import tvm_ffi

        shutil.copytree(Path(tvm_ffi.__file__).parent, site / "tvm_ffi", ignore=skip)
        return
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
        import models

        for name in models.list_models(include_test=False) if opts.time is None else opts.time:
            for fp16 in (False, True):
                label = f"{name}-cuda-{opts.arch}{'-fp16' if fp16 else ''}"
                art = _compile(name, opts.arch, tmp / "artifacts" / label, None, fp16)
                dest = payload / "time" / label
                dest.mkdir()
                shutil.copy(art / "lib.so", dest)
                manifest = json.loads((art / "manifest.json").read_text(encoding="utf-8"))
                with np.load(art / "params.npz") as params:
                    manifest["param_specs"] = [{"name": k, "shape": list(params[k].shape),
                                                "dtype": str(params[k].dtype)} for k in manifest["params"]]
                (dest / "manifest.json").write_text(json.dumps(manifest))
                shutil.rmtree(art)
        _runtime_site(payload / "site", opts.python_version)
        print("compressing ...", flush=True)
        with tarfile.open(opts.dir / PAYLOAD, "w:xz", preset=6) as tar:
            tar.add(payload, arcname=".")
    size = (opts.dir / PAYLOAD).stat().st_size
    tracked = sum(f.stat().st_size for f in map(REPO.joinpath, subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, text=True, check=True).stdout.split("\0"))
        if f.is_file())
    print(f"{opts.dir / PAYLOAD}: {size / 2**20:.1f} MiB; with the {tracked / 2**20:.1f} MiB of tracked files "
          f"{(size + tracked) / 2**20:.1f} MiB of {opts.budget_mib:.0f}")
    if size + tracked > opts.budget_mib * 2**20:
        raise SystemExit(f"the payload does not fit the {opts.budget_mib:.0f} MiB that travel: time fewer models")


# ---------------------------------------------------------------- run (the GPU machine)

def _tvm_env(site: Path) -> dict:
    """The environment that runs TVM's runtime from ``site`` with CUDA: libcudart.so.13 from a pip package."""
    patterns = [os.path.join(entry, "nvidia", "**", "libcudart.so.13*") for entry in sys.path if entry]
    found = sorted({os.path.dirname(p) for pattern in [*patterns, "/usr/local/cuda*/lib64/libcudart.so.13*"]
                    for p in glob.glob(pattern, recursive=True)})
    env = dict(os.environ, PYTHONPATH=str(site), TVM_USE_RUNTIME_LIB="1")
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*found, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    return env


@contextlib.contextmanager
def _gpu_alone(lock: Path | None):
    """Hold the GPU alone while timing: every child of one run times under the same lock file."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _median_ms(call, repeat: int, warmup: int, cuda: bool) -> float:
    """Median ms of ``repeat`` calls after ``warmup``: CUDA events around each call (the CPU clock without a GPU)."""
    import torch

    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            call()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def _check(actual, expected, atol: float, rtol: float) -> dict:
    """The project's allclose rule (pipeline.runtime.compare), as a JSON-able record."""
    from pipeline.runtime import compare

    c = compare("logits", actual, expected, atol, rtol)
    return {"passed": c.passed, "max_abs": c.max_abs, "allclose": c.allclose, "atol": atol, "rtol": rtol}


def _random_weights(specs: list[dict], seed: int = 0) -> dict:
    """Weights for a timed library: N(0, 1/fan_in) matrices and 0.1 N(0, 1) vectors, so activations stay O(1)."""
    import math

    import numpy as np

    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = spec["shape"]
        scale = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.1
        out[spec["name"]] = (rng.standard_normal(shape) * scale).astype("float32")
    return out


def _source_weight(name: str, shape: list[int], weights: dict):
    """The float32 library's weight a float16 library's weight is a cast of (named alike, up to ':transformed')."""
    for key in (name, name.split(":")[0].rstrip("'")):
        if key in weights and list(weights[key].shape) == list(shape):
            return weights[key]
    return None


def time_library(opts) -> None:
    """Child process: the float32 library and, when given, the float16 one on the same random weights: check, time.

    Prints one JSON line: per library its check and median ms (or, with --dry-run, what was checked statically)."""
    import numpy as np

    sys.path.insert(0, str(REPO))
    import models
    from pipeline.runtime import load_vm, run_vm, time_vm, to_device
    from pipeline.toolchain.cubin import cubin_info, cuda_device_code

    manifests = [json.loads((d / "manifest.json").read_text(encoding="utf-8")) for d in opts.dirs]
    cfg = models.get_model_cfg(manifests[0]["model"]["name"])
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s["shape"]).astype(s["dtype"]) for s in manifests[0]["inputs"]]
    weights = _random_weights(manifests[0]["param_specs"])
    result, reference = {}, None
    for directory, manifest in zip(opts.dirs, manifests):
        precision = "fp16" if "float16" in manifest["passes"].get("precision", "") else "fp32"
        specs = manifest["param_specs"]
        params = [_source_weight(s["name"], s["shape"], weights) for s in specs]
        entry = result[precision] = {"label": directory.name}
        if any(p is None for p in params):  # a weight transformed beyond a cast: its own random values, no check
            missing = [s["name"] for s, p in zip(specs, params) if p is None]
            params = list(_random_weights(specs, seed=1).values())
            entry["check"] = {"passed": None, "why": f"no float32 counterpart of {missing[:3]}"}
        params = [p.astype(s["dtype"]) for p, s in zip(params, specs)]
        if opts.dry_run:  # no GPU: the library's CUDA code and its arguments, read without loading it
            arches = {cubin_info(code)["arch"] for fmt, code in cuda_device_code(directory / "lib.so") if fmt == "cubin"}
            entry["static"] = {"cubin_arches": sorted(arches), "weights": len(params), "inputs": len(inputs)}
            if arches != {manifest["target"]["build"]["cuda"]["arch"]}:
                raise SystemExit(f"{directory.name}: cubins for {sorted(arches)}, manifest says "
                                 f"{manifest['target']['build']['cuda']['arch']}")
            continue
        vm, dev = load_vm(directory / "lib.so", "cuda")
        args = to_device([*inputs, *params], dev)
        names = tuple(o["name"] for o in manifest["outputs"])
        out = run_vm(vm, args, names)[names[0]]
        if reference is None:
            ok = bool(np.all(np.isfinite(out))) and float(out.std()) > 0
            entry["check"] = {"passed": ok, "what": "finite, varying logits (its reference: the bundles' run.py)"}
            reference = out
        elif "check" not in entry:
            entry["check"] = {**_check(out, reference, cfg.fp16_atol, cfg.fp16_rtol),
                              "what": "against the float32 library, same weights"}
        with _gpu_alone(opts.lock):
            seconds = time_vm(vm, dev, args, warmup=10, repeat=opts.repeat)
        entry["ms"] = float(np.median(seconds) * 1e3)
    print(json.dumps(result))


def time_torch(opts) -> None:
    """Child process: one model in PyTorch eager and torch.compile, float32 and float16; each output checked
    against eager float32's before it is timed. Prints one JSON line."""
    import torch

    sys.path.insert(0, str(REPO))
    from pipeline.stages.model import load_model  # torch and the zoo only

    cuda = not opts.dry_run
    device = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as our float32 kernels compute it
    torch.backends.cudnn.allow_tf32 = False
    model, cfg, _ = load_model(opts.model, None, 0)  # compile's weights: a zero-initialised head re-drawn
    x = torch.randn(1, *cfg.input_size)
    result = {}
    with torch.inference_mode():
        reference = None
        for precision, dtype, tol in (("fp32", torch.float32, (cfg.atol * 10, cfg.rtol * 10)),
                                      ("fp16", torch.float16, (cfg.fp16_atol, cfg.fp16_rtol))):
            m, xi = model.to(device, dtype), x.to(device, dtype)
            out = m(xi).float().cpu().numpy()
            if reference is None:
                reference = out
            entry = result[precision] = {"eager": {"check": _check(out, reference, *tol) if precision == "fp16" else
                                                   {"passed": True, "what": "the reference"}}}
            with _gpu_alone(opts.lock):
                entry["eager"]["ms"] = _median_ms(lambda: m(xi), opts.repeat, 10, cuda)
            if not cuda:  # torch.compile is timed on the GPU only
                continue
            for mode in ("default", "reduce-overhead"):
                torch._dynamo.reset()
                compiled = torch.compile(m, mode=None if mode == "default" else mode)
                for _ in range(3):  # compile (outside the lock: other models' timings go on) and record graphs
                    got = compiled(xi)
                check = _check(got.float().cpu().numpy(), reference, *tol)
                entry[mode] = {"check": check}
                with _gpu_alone(opts.lock):
                    entry[mode]["ms"] = _median_ms(lambda: compiled(xi), opts.repeat, 10, cuda)
            model = model.float()
    print(json.dumps(result))


def _environment(env: dict, dry_run: bool) -> dict:
    """Date, GPU, driver and versions, for the table's header."""
    import platform

    import torch

    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": platform.python_version(),
            "torch": torch.__version__, "cuda (torch)": torch.version.cuda}
    for package in ("triton", "onnxruntime", "numpy"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if shutil.which("nvidia-smi") and not dry_run:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout.strip().splitlines()
        info["gpu"], info["driver"] = (query[0].split(", ") + [None])[:2] if query else (None, None)
    else:
        info["gpu"], info["driver"] = "none (dry run on the CPU)" if dry_run else None, None
    tvm = subprocess.run([sys.executable, "-c", "import tvm; print(tvm.__version__)"], capture_output=True, text=True,
                         env=env)
    info["tvm runtime"] = tvm.stdout.strip() if tvm.returncode == 0 else f"FAILED: {tvm.stderr.strip()[-300:]}"
    return info


def _child(args: list[str], env: dict | None, deadline: float) -> dict:
    """Run a child of this script; its last stdout line is JSON. Past the deadline it is skipped or stopped."""
    left = deadline - time.perf_counter()
    if left <= 0:
        return {"skipped": "deadline"}
    try:
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, timeout=left)
    except subprocess.TimeoutExpired:
        return {"skipped": "deadline (stopped)"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[-800:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(entry: dict | None) -> str:
    """'1.234' (checked), '1.234 (check FAILED)', or why there is no time."""
    if not entry:
        return "-"
    if "ms" not in entry:
        return entry.get("skipped") or ("error" if "error" in entry else "-")
    passed = entry.get("check", {}).get("passed")
    return f"{entry['ms']:.3f}" + ("" if passed in (True, None) else " (check FAILED)")


def _best_compile(entry: dict) -> dict | None:
    """The faster of torch.compile's modes, with its mode named."""
    modes = [(entry[m]["ms"], m) for m in ("default", "reduce-overhead") if "ms" in entry.get(m, {})]
    if not modes:
        return None
    ms, mode = min(modes)
    return {**entry[mode], "mode": mode}


def _table(results: dict, info: dict, repeat: int) -> str:
    lines = [f"Batch 1, medians of {repeat} runs (CUDA events), {info['date']}; GPU {info['gpu']}, driver "
             f"{info['driver']}; torch {info['torch']} (CUDA {info['cuda (torch)']}), triton {info['triton']}, "
             f"TVM runtime {info['tvm runtime']}, Python {info['python']}. Eager float32 with TF32 off; torch.compile: "
             "inductor, the faster of its default and reduce-overhead (ro) modes. ours/compile <= 1: at or below "
             "torch.compile.", "",
             "| model | ours fp32 ms | eager fp32 | compile fp32 | ours fp16 ms | eager fp16 | compile fp16 | "
             "ours/compile fp32 | ours/compile fp16 | fp32/fp16 (ours) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells, ratios = [name], []
        for precision in ("fp32", "fp16"):
            ours = r.get("library", {}).get(precision)
            torch_ = r.get("torch", {}).get(precision, {})
            best = _best_compile(torch_)
            mode = f" ({'ro' if best['mode'] == 'reduce-overhead' else 'default'})" if best else ""
            cells += [_fmt(ours), _fmt(torch_.get("eager")), _fmt(best) + mode]
            ratios.append(f"{ours['ms'] / best['ms']:.2f}" if ours and "ms" in ours and best else "-")
        lib = r.get("library", {})
        speedup = (f"{lib['fp32']['ms'] / lib['fp16']['ms']:.2f}"
                   if all("ms" in lib.get(p, {}) for p in ("fp32", "fp16")) else "-")
        lines.append("| " + " | ".join(cells + ratios + [speedup]) + " |")
    return "\n".join(lines)


def run(opts) -> int:
    start = time.perf_counter()
    deadline = start + opts.deadline_s
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    with tarfile.open(opts.dir / PAYLOAD) as tar:
        tar.extractall(root, filter="data")
    env = _tvm_env(root / "site")
    lock = root / "gpu.lock"
    flags = ["--repeat", str(opts.repeat), "--lock", str(lock)] + (["--dry-run"] if opts.dry_run else [])
    info = _environment(env, opts.dry_run)
    print(json.dumps(info), f"\nunpacked in {time.perf_counter() - start:.1f} s", flush=True)
    runtime_ok = not info["tvm runtime"].startswith("FAILED")
    failures = 0 if runtime_ok else 1

    bundles = {}
    for bundle in sorted((root / "verify").glob("*.tar")):
        if time.perf_counter() > deadline:
            bundles[bundle.stem] = {"skipped": "deadline"}
            continue
        with tarfile.open(bundle) as tar:
            tar.extractall(root / "verify", filter="data")
        proc = subprocess.run([sys.executable, str(root / "verify" / bundle.stem / "run.py"), "--repeat", str(opts.repeat)],
                              capture_output=True, text=True, env=env, timeout=max(1.0, deadline - time.perf_counter()))
        # run.py exits 1 where this machine cannot run the library (a dry run: no GPU), after its file checks
        ok = proc.returncode == 0 or (opts.dry_run and runtime_ok and proc.returncode == 1)
        print(f"--- {bundle.stem}: run.py exit {proc.returncode}\n{proc.stdout}{proc.stderr}", flush=True)
        bundles[bundle.stem] = {"exit": proc.returncode, "passed": ok, "log": proc.stdout + proc.stderr}
        failures += not ok

    libraries: dict[str, list[Path]] = {}
    for lib in sorted((root / "time").iterdir()):
        name = re.sub(r"-cuda-sm_\d+[a-z]?(-fp16)?$", "", lib.name)
        libraries.setdefault(name, []).append(lib)
    names = [n for n in libraries if not opts.models or n in opts.models]
    results = {name: {} for name in names}
    # torch.compile compiles on the CPU for tens of seconds per model: --jobs models at once, beside the libraries'
    # timings; every timing holds the lock
    with concurrent.futures.ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        torch_jobs = {name: pool.submit(_child, ["time-torch", name, *flags], None, deadline) for name in names}
        for name in names:
            dirs = sorted(libraries[name], key=lambda p: p.name.endswith("-fp16"))  # float32 first
            results[name]["library"] = _child(["time-library", *map(str, dirs), *flags], env, deadline)
            print(f"--- {name}: library {json.dumps(results[name]['library'])[:400]}", flush=True)
        for name, job in torch_jobs.items():
            results[name]["torch"] = job.result()
            print(f"--- {name}: torch {json.dumps(results[name]['torch'])[:400]}", flush=True)
    for r in results.values():
        for part in r.values():
            failures += "error" in part
            failures += any(e.get("check", {}).get("passed") is False for e in part.values() if isinstance(e, dict))
    table = _table(results, info, opts.repeat)
    print(f"\n{table}\n\n{time.perf_counter() - start:.0f} s in all; {failures} failure(s)")
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "benchmark.md").write_text(table + "\n", encoding="utf-8")
    (opts.out / "benchmark.json").write_text(json.dumps({"environment": info, "repeat": opts.repeat,
                                                         "bundles": bundles, "models": results}, indent=1),
                                             encoding="utf-8")
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
    if opts.command == "time-torch":
        time_torch(opts)
        return 0
    return run(opts)


if __name__ == "__main__":
    sys.exit(main())
