"""Reports of `bench` and `regress`: tables (shared by the terminal and Markdown), the latency chart, files."""
from __future__ import annotations

import json
from pathlib import Path

from .bundle import stem
from .regress import Comparison

Table = tuple[list[str], list[list[str]]]
COLORS = {"tvm": "#1f77b4", "reference": "#7f7f7f", "onnxruntime": "#2ca02c", "torch": "#d62728"}


def _ms(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def bench_table(result: dict) -> Table:
    """One row per runtime: the median of its quiet samples (of all, when too few are quiet: marked *) with its 95 %
    interval, the spread of all samples."""
    headers = ["runtime", "median ms", "95% CI", "quiet", "p10", "p90", "IQR", "CV", "vs tvm"]
    rows = []
    for name, latency in result["latency_ms"].items():
        spread = result["all_rounds_ms"][name]
        vs = result["vs_tvm"].get(name)
        half = (latency["ci95"][1] - latency["ci95"][0]) / 2 / latency["median"]
        mark = "" if latency["basis"] == "quiet samples" else " *"
        rows.append([name, _ms(latency["median"]) + mark, f"+-{half:.1%}", f"{latency['quiet']}/{spread['n']}",
                     _ms(spread["p10"]),
                     _ms(spread["p90"]), _ms(spread["iqr"]), f"{spread['cv']:.0%}",
                     f"{vs['median']:.3g}x" if vs else ""])
    return headers, rows


def measured_on(result: dict) -> str:
    device = result["device"]
    if "board" in device:
        return f"board {device['board']} (its TVM runtime's threads)"
    return f"{device['cpu']} x{device['cores']}, {result['threads']} thread(s)"


def bench_summary(result: dict) -> str:
    m = result["method"]
    busy = (f" BUSY: some runtime has fewer than {m['budget']['min_rounds']} quiet samples; its median (*) is over "
            "all its samples, slowed by other jobs: rerun when the machine is quieter." if m["busy"] else "")
    return (f"{result['model']} on {result['target']} (batch {result['batch']}, build {result['build_id'][:12]}), "
            f"{measured_on(result)}: {m['rounds']} interleaved rounds in {m['seconds']:.0f} s, stopped: "
            f"{m['stopped']}; load average {result['loadavg']['start']:.1f} -> {result['loadavg']['end']:.1f}.{busy} "
            f"Median and its 95% interval: "
            f"over the quiet samples (within {m['quiet_slack']:.0%} of the fastest; other jobs only add time); "
            f"p10, p90, IQR (ms) and CV: over all samples. vs tvm: median over the TVM library's (> 1: slower). "
            f"tvm / reference: {result['normalized']['median']:.4g}.")


def kernel_table(kernels: list[dict], tvm_ms: float, top: int = 10) -> Table:
    rows, cumulative = [], 0.0
    for k in kernels[:top]:
        cumulative += k["share"]
        rows.append([k["kernel"][:60], str(k["calls"]), _ms(k["ms"]), f"{k['share']:.1%}", f"{cumulative:.1%}"])
    total = sum(k["ms"] for k in kernels)
    rows.append([f"all {len(kernels)} ({total / tvm_ms:.0%} of the model)", "", _ms(total), "100%", ""])
    return ["kernel (timed alone)", "calls", "ms/run", "share", "cumul."], rows


def regress_table(comparisons: list[Comparison], target: str) -> Table:
    """Per model: median ms at baseline and now, the reference kernel's, and the verdict on tvm / reference."""
    headers = ["model", "target", "base ms", "now ms", "reference ms", "now/base", "95% CI", "verdict"]
    rows = []
    for c in comparisons:
        v, now = c.verdict, c.now
        if v.status in ("recorded", "unrecorded"):
            rows.append([c.model, target, "-", _ms(now["tvm_ms"]["median"]), _ms(now["reference_ms"]["median"]), "-",
                         "-", v.status.upper()])
            continue
        rows.append([c.model, target, _ms(c.baseline["tvm_ms"]["median"]), _ms(now["tvm_ms"]["median"]),
                     f"{_ms(c.baseline['reference_ms']['median'])}->{_ms(now['reference_ms']['median'])}",
                     f"{v.ratio:.3f}", f"{v.low:.2f}-{v.high:.2f}", v.status.upper()])
    return headers, rows


def kernel_diff_table(comparison: Comparison, top: int = 8) -> Table:
    rows = [[k["kernel"][:60], "-" if k["baseline_ms"] is None else _ms(k["baseline_ms"]),
             "-" if k["now_ms"] is None else _ms(k["now_ms"]),
             f"{k['now_ms'] / k['baseline_ms']:.2f}x" if k["now_ms"] and k["baseline_ms"] else "new" if k["now_ms"]
             else "gone"] for k in comparison.kernels[:top]]
    return ["kernel (largest change first)", "baseline ms", "now ms", "change"], rows


def markdown_table(table: Table) -> str:
    headers, rows = table
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_bench(result: dict, path: Path) -> Path:
    """The latency chart: distribution per runtime (left), every sample in round order (right), and the top
    kernels (bottom, with --per-layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples_ms"]
    names = list(samples)
    slack = 1 + result["method"]["quiet_slack"]
    kernels = result["kernels"]
    fig = plt.figure(figsize=(13, 8.5 if kernels else 5), layout="constrained")
    grid = fig.add_gridspec(2 if kernels else 1, 2, height_ratios=[1, 0.9] if kernels else [1])
    dist, trace = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    spread = max(max(v) for v in samples.values()) / min(min(v) for v in samples.values())
    for ax in (dist, trace):
        ax.grid(True, which="both", axis="x" if ax is dist else "y", alpha=0.3)
        if spread > 20:
            (ax.set_xscale if ax is dist else ax.set_yscale)("log")

    dist.boxplot([samples[n] for n in names], vert=False, whis=(10, 90), showfliers=False, widths=0.5,
                 medianprops={"color": "black"})
    for y, name in enumerate(names, start=1):
        values = samples[name]
        for is_quiet, marker in ((False, "x"), (True, "o")):
            xs = [v for v in values if (v <= min(values) * slack) == is_quiet]
            dist.scatter(xs, [y + 0.3] * len(xs), s=10, marker=marker, alpha=0.6,
                         color=COLORS.get(name, "#9467bd") if is_quiet else "#bbbbbb")
        median = result["latency_ms"][name]["median"]
        dist.scatter([median], [y], marker="D", s=40, color="black", zorder=3)
        dist.annotate(f"{_ms(median)} ms", (median, y - 0.33), ha="center", fontsize=9)
    dist.margins(x=0.08)  # room for the labels of the outermost medians
    dist.set_yticks(range(1, len(names) + 1), names)
    dist.invert_yaxis()
    dist.set_xlabel("ms per call. All samples: box IQR, whiskers p10-p90. Dots: quiet samples\n"
                    f"(within {slack - 1:.0%} of the fastest), x: others. Diamond: the reported median (of all samples where too few are quiet).",
                    fontsize=9)
    dist.set_title("latency per runtime")

    rounds = range(1, len(samples[names[0]]) + 1)
    for name in names:
        line, = trace.plot(rounds, samples[name], marker=".", lw=0.8, ms=4, label=name, color=COLORS.get(name))
        trace.axhline(result["latency_ms"][name]["median"], ls="--", lw=0.8, color=line.get_color())
    trace.set_xlabel("round (dashed: the reported median)", fontsize=9)
    trace.set_ylabel("ms per call")
    trace.set_title("every sample, in order")
    trace.legend(fontsize=8, loc="best", framealpha=0.7)

    if kernels:
        ax = fig.add_subplot(grid[1, :])
        top = kernels[:12][::-1]
        ax.barh([k["kernel"][:60] + (f" x{k['calls']}" if k["calls"] > 1 else "") for k in top],
                [k["ms"] for k in top], color=COLORS["tvm"])
        for y, k in enumerate(top):
            ax.annotate(f" {_ms(k['ms'])} ms ({k['share']:.0%})", (k["ms"], y), va="center", fontsize=8)
        ax.set_xlabel("ms per run (kernel timed alone, with the arguments of a real run)")
        ax.set_title(f"top kernels of {len(kernels)}")
        ax.tick_params(axis="y", labelsize=8)
        ax.margins(x=0.15)
    busy = " - BUSY: too few quiet samples, medians unreliable" if result["method"]["busy"] else ""
    fig.suptitle(f"{result['model']} on {result['target']}, batch {result['batch']}: {measured_on(result)}, "
                 f"{result['method']['rounds']} interleaved rounds, {result['measured_at']}{busy}", fontsize=10,
                 color="#b00000" if busy else "black")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_bench_report(result: dict, out_dir: Path) -> dict[str, Path]:
    """NAME.json (everything, samples included), NAME.png (the chart) and NAME.md (tables + chart) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = stem(Path(result["artifact"]))
    paths = {"json": out_dir / f"{name}.bench.json", "png": out_dir / f"{name}.bench.png",
             "md": out_dir / f"{name}.bench.md"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    plot_bench(result, paths["png"])
    sections = [f"# Latency: {result['model']} on {result['target']}", bench_summary(result),
                markdown_table(bench_table(result)), f"![latency chart]({paths['png'].name})"]
    if result["kernels"]:
        tvm_ms = result["latency_ms"]["tvm"]["median"]
        sections += ["## Kernels", markdown_table(kernel_table(result["kernels"], tvm_ms))]
    sections.append("Runtimes: " + "; ".join(f"**{k}**: {v}" for k, v in result["method"]["runtimes"].items()) + ".")
    paths["md"].write_text("\n\n".join(sections) + "\n")
    return paths


def write_regress_report(comparisons: list[Comparison], data: dict, baselines: Path, out_dir: Path) -> dict[str, Path]:
    """regress-TARGET.json and regress-TARGET.md in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = data["target"]
    paths = {"json": out_dir / f"regress-{target}.json", "md": out_dir / f"regress-{target}.md"}
    paths["json"].write_text(json.dumps({
        "baselines": str(baselines), "device": data["device"], "threads": data["threads"],
        "tolerance": data["tolerance"], "machine_tolerance": data["machine_tolerance"],
        "models": [{"model": c.model, "verdict": c.verdict.__dict__, "baseline": c.baseline, "now": c.now,
                    "kernels": c.kernels} for c in comparisons]}, indent=1) + "\n")
    sections = [f"# Latency regression check: {target}",
                f"Baselines: `{baselines}` ({data['threads']} thread(s)); a model fails when tvm / reference is more "
                f"than {data['tolerance']:.0%} above its baseline and its 95% interval lies above 1; not judged when "
                f"the reference kernel is more than {data['machine_tolerance']:.0%} off its baseline time.",
                markdown_table(regress_table(comparisons, target))]
    for c in comparisons:
        if c.verdict.status == "slower":
            sections += [f"## {c.model}: where the time went", markdown_table(kernel_diff_table(c))]
    paths["md"].write_text("\n\n".join(sections) + "\n")
    return paths
