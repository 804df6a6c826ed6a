"""Stage: ONNX -> TVM Relax, with the weights detached into a named params dict."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend import detach_params
from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

from tvm_schedules.passes.keep_float32 import binding_name
from ..errors import BuildError


class _NamingImporter(ONNXGraphImporter):
    """TVM's importer, binding each node's result to a variable named after the node (``binding_name``): the
    thread from a Relax binding back to the ONNX node, and so to the PyTorch module (pipeline.stages.layers),
    that keeping layers in float32 follows. It changes names only, not what is computed."""

    def _convert_operator(self, op_name, inputs, attrs, opset):
        converted = super()._convert_operator(op_name, inputs, attrs, opset)
        name = binding_name(attrs["tvm_custom"]["name"])
        if isinstance(converted, relax.Tuple) and converted.fields:  # LayerNormalization: (output, mean, inv_std)
            return relax.Tuple([self._named(converted.fields[0], name), *converted.fields[1:]])
        return self._named(converted, name)

    def _named(self, expr, name: str):
        """A call bound to ``name``; a variable the converter bound already, aliased by ``name``; constants and
        shapes as they are."""
        return self.bb.emit(expr, name_hint=name) if isinstance(expr, (relax.Call, relax.DataflowVar)) else expr


def _from_onnx(model: onnx.ModelProto, shape_dict: dict[str, list[int]]) -> tvm.IRModule:
    """``tvm.relax.frontend.onnx.from_onnx(model, shape_dict, keep_params_in_input=True)`` with the naming
    importer (from_onnx offers no hook for it; the opset is the model's, as from_onnx takes it)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = _NamingImporter(shape_dict, "float32", keep_params_in_input=True, sanitize=True)
    return importer.from_onnx(model.graph, opset)


def import_onnx(path: Path, input_shapes: dict[str, tuple[int, ...]]) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Return the Relax module and its weights, ordered as ``main``'s parameters after the inputs.

    Weights stay function parameters (not constants) so the library is small and params ship beside it;
    the optimize stage computes what depends on them alone (layouts, casts) at compile time.
    """
    try:
        mod = _from_onnx(onnx.load(str(path)), {k: list(v) for k, v in input_shapes.items()})
    except Exception as e:  # the importer raises bare errors of many kinds (OpNotImplemented, ValueError, ...)
        raise BuildError(f"TVM could not import {path.name}: {str(e).splitlines()[0]}") from e
    mod, detached = detach_params(mod)
    main = mod["main"]
    weight_vars = main.params[int(main.attrs["num_input"]):]
    return mod, {var.name: value.numpy() for var, value in zip(weight_vars, detached.get("main", []), strict=True)}
