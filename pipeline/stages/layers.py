"""Which PyTorch module each ONNX node and value came from: the layers that `diagnose` compares and
`--keep-fp32` keeps in float32.

The TorchScript exporter (pipeline.stages.export) names every node after the module scope it ran in:
``/blocks/blocks.0/norm1/LayerNormalization`` is module ``blocks.0.norm1``, and the value it produces
``/blocks/blocks.0/norm1/LayerNormalization_output_0``. onnxsim keeps those names, except on the nodes it fuses
(MatMul + Add + reshapes into Gemm, named ``Gemm_1``); such a node is placed by the value it produces when that
kept its name, else by a weight only it reads (``blocks.0.mlp_tokens.fc1.bias``), else with the node that
consumes it (a fused reshape goes with its Gemm).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch.nn as nn

from tvm_schedules.passes.keep_float32 import binding_name
from ..errors import BadInput

TOP = ""  # the model itself: nodes outside any submodule (the head's pooling, say)


def module_kinds(model: nn.Module) -> dict[str, str]:
    """Every module path of ``model`` and its class name (the layer's kind)."""
    return {path: type(module).__name__ for path, module in model.named_modules()}


def scope_module(name: str, modules: dict[str, str]) -> str | None:
    """The module path in an exported node or value name, or None when the name carries no scope.

    Scope parts are attribute names, but a container's items appear with the container's name in front
    (``/network.2/network.2.1/attn``), so each part is tried under the module found so far and under its parent.
    """
    if not name.startswith("/"):
        return None
    path = TOP
    for part in name.split("/")[1:-1]:
        parent = path.rpartition(".")[0]
        for candidate in (f"{path}.{part}" if path else part, f"{parent}.{part}" if parent else part, part):
            if candidate in modules:
                path = candidate
                break
        else:
            return None
    return path


def node_modules(graph: onnx.GraphProto, modules: dict[str, str]) -> dict[str, str]:
    """The module of every node of ``graph`` (by node name; the model's top for what cannot be placed)."""
    initializers = {i.name for i in graph.initializer}
    readers: dict[str, int] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for value in node.input:
            readers[value] = readers.get(value, 0) + 1
            consumers.setdefault(value, []).append(node)
    placed: dict[str, str] = {}
    for node in graph.node:
        named = [scope_module(node.name, modules), *(scope_module(v, modules) for v in node.output),
                 *(v.rpartition(".")[0] for v in node.input if v in initializers and readers[v] == 1
                   and v.rpartition(".")[0] in modules)]
        found = next((m for m in named if m), None)
        if found is not None:
            placed[node.name] = found
    for node in reversed(graph.node):  # the rest go with their first placed consumer
        if node.name not in placed:
            after = [placed.get(c.name) for v in node.output for c in consumers.get(v, [])]
            placed[node.name] = next((m for m in after if m is not None), TOP)
    return placed


def inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


@dataclass(frozen=True)
class KeptLayers:
    """What --keep-fp32 selected in a graph: the Relax bindings to keep (pipeline.stages.relax_import names
    them) and, per module kept, why."""

    bindings: frozenset[str]
    layers: dict[str, tuple[str, str]]  # module path -> (its kind, why)

    def manifest(self) -> list[dict]:
        return [{"layer": path, "kind": kind, "why": why} for path, (kind, why) in self.layers.items()]


def keep_float32_layers(graph: onnx.GraphProto, modules: dict[str, str], patterns: tuple[str, ...],
                        why: dict[str, str] | None = None) -> KeptLayers:
    """The nodes whose module matches a pattern (a module path, an fnmatch pattern over paths, or a kind: the
    module's class name or an ONNX op type); a module path matches its submodules too. ``why``: a reason per
    pattern (default: the option's)."""
    placed = node_modules(graph, modules)
    bindings, layers, matched = set(), {}, set()
    for node in graph.node:
        module = placed[node.name]
        for pattern in patterns:
            if inside(module, pattern) or fnmatch.fnmatchcase(module, pattern) or pattern in (
                    modules.get(module), node.op_type):
                bindings.add(binding_name(node.name))
                layers.setdefault(module, (modules.get(module, ""), (why or {}).get(pattern, f"--keep-fp32 {pattern}")))
                matched.add(pattern)
                break
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        raise BadInput(f"--keep-fp32 {', '.join(unmatched)} matches no layer of the model; give module paths "
                       "(`diagnose` lists them), fnmatch patterns over them, module classes or ONNX op types")
    return KeptLayers(frozenset(bindings), layers)


@dataclass(frozen=True)
class Probe:
    """A module's output, made an output of the graph: the value the compiled model is compared at."""

    value: str  # the ONNX value name
    module: str
    kind: str  # the module's class


def add_probe_outputs(path: Path, modules: dict[str, str], reference: dict[str, np.ndarray],
                      inputs: dict[str, np.ndarray]) -> list[Probe]:
    """Make the output of each module in ``reference`` (PyTorch's, from forward hooks) a graph output of the
    export at ``path`` (rewritten in place); return the probes in execution order.

    A module's output is the value of the last node in its scope, when it has the shape of PyTorch's (else it is
    not the module's output); a value that is the output of nested modules is named after the innermost. Shape
    inference does not pass the export's dynamic reshapes, so shapes are taken from one ONNX Runtime run.
    """
    model = onnx.load(str(path))
    graph = model.graph
    last: dict[str, tuple[int, str]] = {}  # module -> (node index, value)
    for index, node in enumerate(graph.node):
        module = scope_module(node.name, modules)
        if module is None or node.op_type == "Constant" or not node.output:
            continue
        for outer in [m for m in reference if inside(module, m)]:
            last[outer] = (index, node.output[0])
    by_value: dict[str, tuple[int, str]] = {}
    for module, (index, value) in last.items():
        if value not in by_value or len(module) > len(by_value[value][1]):
            by_value[value] = (index, module)
    outputs = len(graph.output)
    values = [v for v in by_value if v not in {o.name for o in graph.output}]
    graph.output.extend(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None) for v in values)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shapes = dict(zip(values, (a.shape for a in session.run(values, inputs)), strict=True))
    del graph.output[outputs:]  # declared again below, with their shapes (onnxsim wants them)
    probes = [Probe(value, module, modules[module])
              for value, (_, module) in sorted(by_value.items(), key=lambda kv: kv[1][0])
              if shapes.get(value, reference[module].shape) == reference[module].shape]
    graph.output.extend(onnx.helper.make_tensor_value_info(p.value, onnx.TensorProto.FLOAT, shapes[p.value])
                        for p in probes if p.value in shapes)
    onnx.save(model, str(path))
    return probes
