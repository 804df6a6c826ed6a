"""CycleFC layer timings, CPU, batch 1: our TensorIR kernel against TVM's default lowering, ONNX Runtime and
PyTorch, for the CycleMLP-B1 stage-1 (56x56x64) and stage-3 (14x14x320) shapes, both kernel orientations.

    python benchmarks/bench_cyclefc.py [--sample-ms 5] [--max-seconds 60] [--threads 2]

Every implementation is NHWC in and NHWC out (the layout CycleMLP's blocks use), 2 threads each (--threads). All are
timed in one process with ``pipeline bench``'s measurement (``pipeline.bench.measure``): interleaved rounds, each
timing every implementation once (a sample of several calls, ~--sample-ms long), until every median over the quiet
samples is known within +-2 % or --max-seconds pass. The table gives those medians and their ratio to our kernel's
(> 1: slower than ours). Outputs are checked against our kernel before timing.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description="CycleFC layer timings (see the module docstring)")
    ap.add_argument("--sample-ms", type=float, default=5.0, help="approximate length of one sample")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop sampling after this long")
    ap.add_argument("--threads", type=int, default=2, help="threads for TVM, PyTorch and ONNX Runtime")
    return ap.parse_args(argv)


OPTS = _parse_args()
THREADS = OPTS.threads
os.environ["OMP_NUM_THREADS"] = str(THREADS)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.runtime import use_threads  # noqa: E402  (numpy only: TVM is not imported yet)

use_threads(THREADS)  # before TVM's thread pool starts

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from models.cyclemlp import CycleFC  # noqa: E402
from pipeline.bench import QUIET_SLACK, Budget, evaluator_timer, loop_timer, measure, quiet, summarize  # noqa: E402
from tvm_schedules.cyclefc import cyclefc_primfunc, schedule_cyclefc  # noqa: E402

TARGET = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4", "num-cores": THREADS})
# (label, H=W, C=O, kernel): CycleMLP-B1 stage 1 and stage 3; each block has a (1,3) and a (3,1) CycleFC
CASES = [
    ("B1 stage-1 sfc_h", 56, 64, (1, 3)),
    ("B1 stage-1 sfc_w", 56, 64, (3, 1)),
    ("B1 stage-3 sfc_h", 14, 320, (1, 3)),
    ("B1 stage-3 sfc_w", 14, 320, (3, 1)),
]


class ExportForm(torch.nn.Module):
    """models.cyclemlp.CycleFC (one-hot depthwise conv + 1x1 conv, NCHW) wrapped in NHWC<->NCHW permutes."""

    def __init__(self, m: CycleFC):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def torch_shift_linear(x, k: int, along_w: bool, weight2d, bias):
    """NHWC CycleFC by slicing: channels c = g (mod k) move by s(g) along W (or H), zeros enter; then linear."""
    y = torch.zeros_like(x)
    dim = 2 if along_w else 1
    n = x.shape[dim]
    for g in range(k):
        s = (g + k // 2) % k - k // 2
        if abs(s) >= n:
            continue
        dst = [slice(None)] * 4
        src = [slice(None)] * 4
        dst[3] = src[3] = slice(g, None, k)
        dst[dim], src[dim] = (slice(0, n - s), slice(s, n)) if s >= 0 else (slice(-s, n), slice(0, n + s))
        y[tuple(dst)] = x[tuple(src)]
    return F.linear(y, weight2d, bias)


def relax_export_form(n, h, w, c, o, kernel):
    """The export form as Relax: permute -> depthwise one-hot conv2d -> 1x1 conv2d -> + bias -> permute."""
    kh, kw = kernel
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, h, w, c), "float32"))
    sk = relax.Var("shift_kernel", relax.TensorType((c, 1, kh, kw), "float32"))
    wt = relax.Var("weight", relax.TensorType((o, c, 1, 1), "float32"))
    b = relax.Var("bias", relax.TensorType((o,), "float32"))
    with bb.function("main", [x, sk, wt, b]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(x, [0, 3, 1, 2]))
            t = bb.emit(relax.op.nn.conv2d(t, sk, padding=(kh // 2, kw // 2), groups=c))
            t = bb.emit(relax.op.nn.conv2d(t, wt))
            t = bb.emit(relax.op.add(t, relax.op.reshape(b, (1, o, 1, 1))))
            t = bb.emit_output(relax.op.permute_dims(t, [0, 2, 3, 1]))
        bb.emit_func_output(t)
    return bb.get()


def build_case(h, c, kernel, tmpdir):
    n, w, o = 1, h, c
    kh, kw = kernel
    k = kh * kw
    torch.manual_seed(0)
    m = CycleFC(c, o, kernel).eval()
    with torch.no_grad():
        m.weight.normal_(0, 0.02)  # CycleNet's init scale
        m.bias.uniform_(-0.1, 0.1)
    x_t = torch.randn(n, h, w, c)
    x_np = x_t.numpy()
    w2d = m.weight.detach()[:, :, 0, 0].contiguous()
    bias = m.bias.detach().contiguous()
    dev = tvm.cpu()
    impls, outs = {}, {}

    # (a) our kernel
    f = schedule_cyclefc(cyclefc_primfunc(n, h, w, c, o, kernel), TARGET)
    ex = tvm.compile(tvm.IRModule({"cyclefc": f}), target=TARGET)
    args = [tvm.runtime.tensor(a, dev) for a in (x_np, w2d.T.contiguous().numpy(), bias.numpy())]
    y_tvm = tvm.runtime.tensor(np.zeros((n, h, w, o), "float32"), dev)
    ex.mod["cyclefc"](*args, y_tvm)
    outs["ours"] = y_tvm.numpy()
    impls["(a) ours: TensorIR kernel (CPU schedule)"] = evaluator_timer(ex.mod, "cyclefc", dev, *args, y_tvm)

    # (b) TVM default lowering of the export form
    mod = relax_export_form(n, h, w, c, o, kernel)
    rex = tvm.compile(mod, target=TARGET, relax_pipeline=relax.get_default_pipeline(TARGET))
    vm = relax.VirtualMachine(rex, dev)
    rargs = [tvm.runtime.tensor(a, dev) for a in (x_np, m.shift_kernel.numpy(), m.weight.detach().numpy(), bias.numpy())]
    outs["tvm default"] = vm["main"](*rargs).numpy()
    impls["(b) TVM default lowering, Relax export form"] = evaluator_timer(vm, "main", dev, *rargs)

    # (c) ONNX Runtime on the exported export form
    import onnxruntime as ort

    path = os.path.join(tmpdir, f"cyclefc_{h}_{c}_{kh}x{kw}.onnx")
    torch.onnx.export(ExportForm(m), (x_t,), path, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"])
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {"x": x_np}
    outs["ort"] = sess.run(None, feed)[0]
    impls["(c) ONNX Runtime, export form (opset 17)"] = loop_timer(lambda: sess.run(None, feed))

    # (d) PyTorch eager
    ef = ExportForm(m)
    with torch.no_grad():
        outs["torch module"] = ef(x_t).numpy()
        outs["torch slice"] = torch_shift_linear(x_t, k, kh == 1, w2d, bias).numpy()

    def torch_run(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    impls["(d) PyTorch CycleFC module, export form"] = loop_timer(torch_run(lambda: ef(x_t)))
    impls["(d) PyTorch shift-by-slicing + linear, NHWC"] = loop_timer(
        torch_run(lambda: torch_shift_linear(x_t, k, kh == 1, w2d, bias)))

    # (e) torchvision deform_conv2d (the official CycleFC op)
    try:
        import torchvision  # noqa: F401
        from torchvision.ops import deform_conv2d

        offset = m.offset.expand(n, 2 * c, h, w).contiguous()
        wdc = m.weight.detach()

        def dc():
            return deform_conv2d(x_t.permute(0, 3, 1, 2), offset, wdc, bias).permute(0, 2, 3, 1)

        with torch.no_grad():
            outs["deform_conv2d"] = dc().numpy()
        impls["(e) PyTorch torchvision deform_conv2d"] = loop_timer(torch_run(dc))
        dc_note = None
    except Exception as e:  # noqa: BLE001 - any import/runtime failure means "not available here"
        dc_note = f"skipped: torchvision not importable here ({type(e).__name__}: {str(e).splitlines()[0][:80]})"

    errs = {name: float(np.abs(v - outs["ours"]).max()) for name, v in outs.items() if name != "ours"}
    return impls, errs, dc_note


def main():
    opts = OPTS
    torch.set_num_threads(THREADS)

    print(f"TVM {tvm.__version__}, torch {torch.__version__}, target {TARGET}")
    print(f"threads: TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}, torch {torch.get_num_threads()}, "
          f"ORT intra_op {THREADS}; os.cpu_count()={os.cpu_count()}, loadavg {os.getloadavg()[0]:.2f}")
    cases = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for label, h, c, kernel in CASES:
            t0 = time.perf_counter()
            impls, errs, dc_note = build_case(h, c, kernel, tmpdir)
            print(f"built {label} (1x{h}x{h}x{c}, kernel {kernel}) in {time.perf_counter() - t0:.1f} s; "
                  "max |diff| vs ours: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
            cases.append((label, h, c, kernel, impls, dc_note))
        # pipeline bench's measurement: every implementation of every case once per round, in rotating order
        m = measure({(ci, name): timer for ci, case in enumerate(cases) for name, timer in case[4].items()},
                    Budget(sample_ms=opts.sample_ms, max_seconds=opts.max_seconds))

    print(f"\nCycleFC layer, batch 1, NHWC: median ms over the quiet samples (within {QUIET_SLACK:.0%} of the fastest) "
          f"of {m.rounds} interleaved rounds, stopped: {m.stopped}; ratio = median / our median (> 1: slower than ours)")
    width = max(len(n) for case in cases for n in case[4]) + 2
    for ci, (label, h, c, kernel, impls, dc_note) in enumerate(cases):
        print(f"\n{label}: 1x{h}x{h}x{c} -> {c}, kernel {kernel}")
        print(f"  {'implementation':<{width}}{'median':>9}{'quiet':>7}{'ratio':>8}")
        medians = {name: summarize(quiet(m.samples_ms[(ci, name)])) for name in impls}
        ours = medians[next(iter(impls))]["median"]
        for name, stats in medians.items():
            print(f"  {name:<{width}}{stats['median']:9.3f}{stats['n']:7d}{stats['median'] / ours:8.2f}")
        if dc_note:
            print(f"  (e) PyTorch torchvision deform_conv2d: {dc_note}")
    print(f"\nloadavg at end {os.getloadavg()[0]:.2f} (other work shares this machine; compare within one run)")


if __name__ == "__main__":
    main()
