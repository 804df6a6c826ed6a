"""Stage: simplify the exported graph with onnxsim (constant folding, shape inference)."""
from __future__ import annotations

from pathlib import Path

import onnx
import onnxsim

from ..errors import ExportError


def simplify_onnx(src: Path, dst: Path) -> Path:
    simplified, ok = onnxsim.simplify(onnx.load(str(src)))
    if not ok:
        raise ExportError(f"onnxsim could not validate the simplified graph of {src.name}")
    onnx.save(simplified, str(dst))
    return dst
