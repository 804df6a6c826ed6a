"""Time a batch of tuning candidates on a board: the half of offline tuning that runs there.

Like pipeline/runtime.py (a bundle's run.py), it needs only the Python standard library, numpy and the TVM
runtime. ``tune --export-candidates BATCH.tar`` copies this file into the batch as time_candidates.py, with
runtime.py beside it; on the board::

    tar xf BATCH.tar && python3 BATCH/time_candidates.py [--out BATCH.results.json]

It checks every candidate against its sha256 in batch.json before loading anything, checks that this
runtime has the batch's device (and, for CUDA, that the GPU's compute capability is the batch's arch), then
times each candidate as MetaSchedule's runner does (one warm-up run, then ``repeat`` means of ``number`` runs,
each mean over at least ``min_repeat_ms``), on the threads the target has, with arguments drawn as the host's
tuner draws them. It writes the results file ``tune --import-results`` reads: the batch's id, the sha256 of
its batch.json, each candidate's run times or error, and a sha256 over all of that (a file cut short or edited
is refused there). Exit status: 0 written, 1 this machine cannot run the batch, 2 not a batch or tampered.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

try:  # in the repository: pipeline.time_candidates
    from . import runtime
except ImportError:  # in a batch, run as a script: runtime.py lies beside this file (put on sys.path even
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # under PYTHONSAFEPATH, which leaves it off)
    import runtime

BATCH_MANIFEST = "batch.json"
TIMER = "time_candidates.py"  # this file, inside a batch
BATCH_FORMAT = "pipeline tuning candidates 1"
RESULTS_FORMAT = "pipeline tuning results 1"


class BatchError(runtime.BundleError):
    """A batch, or a results file, that is malformed, fails its hash check or belongs to another batch."""


def digest(payload: dict) -> str:
    """The sha256 of ``payload`` in canonical JSON: what a results file's "sha256" holds over the rest of it."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_batch(directory: Path) -> dict:
    """batch.json of the batch in ``directory``, once every candidate matches its sha256 there."""
    try:
        batch = json.loads((directory / BATCH_MANIFEST).read_text())
        if batch.get("format") != BATCH_FORMAT:
            raise ValueError(f"format {batch.get('format')!r}, this script reads {BATCH_FORMAT!r}")
        candidates = batch["candidates"]
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise BatchError(f"{directory} is not a batch of tuning candidates ({e}); make one with "
                         "`python -m pipeline tune --export-candidates`") from None
    bad = [c["file"] for c in candidates
           if not (runtime.PLAIN_NAME.match(c["file"]) and (directory / c["file"]).is_file()
                   and runtime.sha256_file(directory / c["file"]) == c["sha256"])]
    if bad:
        raise BatchError(f"{directory}: {len(bad)} candidate(s) missing or not matching their sha256 in "
                         f"{BATCH_MANIFEST} (first: {bad[0]}); use an intact copy of the batch")
    return batch


def check_device(batch: dict):
    """The device the batch runs on; RuntimeUnavailable when this runtime or GPU cannot run its candidates."""
    return runtime.open_device(batch["device"], batch.get("cuda_arch"))


def arguments(args_info: list, dev) -> list:
    """A candidate's arguments: floats uniform in [0, 1), integers 0 (a valid index into any axis), as
    pipeline.tuning.measure draws them for the host's runners."""
    import tvm

    rng = np.random.default_rng(0)
    return [tvm.runtime.tensor(rng.uniform(size=tuple(shape)).astype(dtype), dev) for shape, dtype in args_info]


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def time_candidate(path: Path, args_info: list, dev, evaluator: dict) -> list[float]:
    module = runtime.load_module(path)
    timer = module.time_evaluator(module.entry_name, dev, number=evaluator["number"], repeat=evaluator["repeat"],
                                  min_repeat_ms=evaluator["min_repeat_ms"])
    args = arguments(args_info, dev)
    dev.sync()
    return [float(s) for s in timer(*args).results]


def time_batch(directory: Path) -> dict:
    """The results of every candidate in the batch ``directory`` (see the module's docstring)."""
    import tvm

    batch = read_batch(directory)
    dev = check_device(batch)
    if runtime.THREADS_ENV not in os.environ and batch.get("threads"):
        runtime.use_threads(int(batch["threads"]))  # read when the pool starts, at the first run below
    results = []
    for candidate in batch["candidates"]:
        try:
            secs = time_candidate(directory / candidate["file"], candidate["args"], dev, batch["evaluator"])
            results.append({"id": candidate["id"], "run_secs": secs})
        except (RuntimeError, ValueError, runtime.PipelineError) as e:  # TVM's errors are RuntimeErrors
            results.append({"id": candidate["id"], "error": _first_line(e)})
    payload = {"format": RESULTS_FORMAT, "batch_id": batch["batch_id"],
               "batch_sha256": runtime.sha256_file(directory / BATCH_MANIFEST),
               "device": f"{batch['device']} ({tvm.get_global_func('runtime.NumThreads')()} threads)",
               "results": results}
    return {**payload, "sha256": digest(payload)}


def write_results(results: dict, out: Path) -> None:
    """Write ``results`` to ``out`` whole or not at all."""
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(partial, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=TIMER, description=__doc__.splitlines()[0])
    parser.add_argument("batch", nargs="?", type=Path, default=Path(__file__).resolve().parent,
                        help="a batch file (.tar) or its extracted directory; default: this file's directory")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: BATCH.results.json in the current directory)")
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="pipeline-batch-") as tmp:
            directory = args.batch if args.batch.is_dir() else runtime.extract_bundle(args.batch, Path(tmp))
            results = time_batch(directory)
        out = args.out or Path(f"{directory.name}.results.json")
        write_results(results, out)
    except runtime.PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: cannot write the results: {e}", file=sys.stderr)
        return 1
    valid = sum("run_secs" in r for r in results["results"])
    print(f"timed {len(results['results'])} candidate(s) ({valid} ran) on {results['device']}: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
