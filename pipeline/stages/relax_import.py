"""Stage: ONNX -> TVM Relax, with the weights detached into a named params dict."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.onnx import from_onnx

from ..errors import BuildError


def import_onnx(path: Path, input_shapes: dict[str, tuple[int, ...]]) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Return the Relax module and its weights, ordered as ``main``'s parameters after the inputs.

    Weights stay function parameters (not constants) so the library is small and params ship beside it;
    the optimize stage computes what depends on them alone (layouts, casts) at compile time.
    """
    try:
        mod = from_onnx(onnx.load(str(path)), shape_dict={k: list(v) for k, v in input_shapes.items()},
                        keep_params_in_input=True)
    except Exception as e:  # the importer raises bare errors of many kinds (OpNotImplemented, ValueError, ...)
        raise BuildError(f"TVM could not import {path.name}: {str(e).splitlines()[0]}") from e
    mod, detached = detach_params(mod)
    main = mod["main"]
    weight_vars = main.params[int(main.attrs["num_input"]):]
    return mod, {var.name: value.numpy() for var, value in zip(weight_vars, detached.get("main", []), strict=True)}
