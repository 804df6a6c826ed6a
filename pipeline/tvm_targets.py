"""A target spec (data, ``targets``) as the TVM Target it compiles for: the one place that makes one."""
from __future__ import annotations

import tvm

from targets import TargetSpec


def to_tvm_target(target: TargetSpec) -> tvm.target.Target:
    return tvm.target.Target(target.tvm_target, host=target.tvm_host)
