"""What a compile is asked to do, and the canonical hashing used by manifests."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .runtime import MANIFEST_SCHEMA, sha256_file  # noqa: F401 - the runtime's, so a board hashes alike


@dataclass(frozen=True)
class BuildSpec:
    model: str
    target: str
    batch: int = 1
    weights: Path | None = None  # a state_dict checkpoint; None means seeded random weights
    seed: int = 0  # seeds random weights and the reference inputs
    cuda_arch: str | None = None  # overrides the generic cuda target's arch
    fp16: bool = False  # compute in float16 (inputs, outputs and params stay float32 at the boundary)


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

