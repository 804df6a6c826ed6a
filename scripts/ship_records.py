"""Ship a tuning database's records for a target class: re-time each workload's best record beside its default
schedule on this machine, in interleaved rounds, and write those that win into the repository's shipped records
(``tvm_schedules/records/<target>-<hash>/``, which ``compile`` applies). See pipeline/ship_records.py.

    python scripts/ship_records.py --db DIR [--target x86] [--rounds 5] [--margin 0.03] [--out DIR]

Run it on an idle machine of the target class: the verdicts are only as good as the quiet they were timed in.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    from pipeline import paths
    from pipeline.errors import PipelineError
    from pipeline.ship_records import ship_records
    import targets

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", type=Path, required=True, help="the tuning database to ship from (tune --db)")
    ap.add_argument("--target", default="x86", help="the target it was tuned for")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per record and default")
    ap.add_argument("--margin", type=float, default=0.03, help="how much faster than the default a record must be")
    ap.add_argument("--out", type=Path, default=paths.shipped_records_dir(), help="shipped records root")
    opts = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        target = targets.get_target(opts.target)
    except targets.UnknownTargetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out, verdicts = ship_records(opts.db, target, opts.out, rounds=opts.rounds,
                                     margin=opts.margin, listener=lambda line: print(line, flush=True))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"{'workload':18s} {'record us':>11s} {'default us':>11s}  verdict")
    for v in sorted(verdicts, key=lambda v: -(v.default_us or 0)):
        record = f"{v.record_us:11.1f}" if v.record_us is not None else f"{'-':>11s}"
        default = f"{v.default_us:11.1f}" if v.default_us is not None else f"{'-':>11s}"
        print(f"{v.workload:18s} {record} {default}  {'shipped: ' if v.shipped else 'kept default: '}{v.why}")
    print(f"{sum(v.shipped for v in verdicts)} of {len(verdicts)} record(s) shipped to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
