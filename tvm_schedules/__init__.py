"""Our TVM side below the pipeline: TensorIR kernels (cyclefc.py), Relax passes (passes/, one per file), the
default CPU schedule rules (cpu/) and the mark of a scheduled function (scheduled.py). Imports TVM, never pipeline."""
