"""What a CUDA kernel may use on its target's GPU, checked against what its cubin and launch say it uses.

Held for every build (``stages.build``) and every tuning candidate (``tuning.measure``): a kernel over a limit fails
at launch on the board, or is never launched right (too many registers or threads per block), or spills to local
memory; MetaSchedule's own check (VerifyGPUCode) knows neither registers, local memory nor the opt-in shared memory.
"""
from __future__ import annotations

from targets import CudaSpec


def kernel_limit_violations(kernels: list[dict], cuda: CudaSpec) -> list[str]:
    """Each limit a kernel exceeds: its registers, static shared memory, threads, local memory, and its static +
    dynamic shared memory (``dynamic_shared_bytes``, a kernel without it has none) against the arch's opt-in limit."""
    limits = (("registers", cuda.max_registers_per_thread), ("shared_bytes", cuda.max_shared_bytes),
              ("max_threads", cuda.max_threads_per_block), ("local_bytes", 0))
    violations = [f"{k['name']}: {what} {k[what]} > {limit}"
                  for k in kernels for what, limit in limits if k[what] is not None and k[what] > limit]
    for k in kernels:
        dynamic = k.get("dynamic_shared_bytes", 0)
        if dynamic is None:
            violations.append(f"{k['name']}: dynamic shared memory is not a constant, cannot be checked")
        elif k["shared_bytes"] + dynamic > cuda.max_shared_bytes_optin:
            violations.append(f"{k['name']}: shared_bytes {k['shared_bytes']} + dynamic_shared_bytes {dynamic} > "
                              f"{cuda.max_shared_bytes_optin} ({cuda.arch}'s opt-in limit per block)")
    return violations


def with_dynamic_shared_bytes(kernels: list[dict], dynamic: dict[str, int | None]) -> list[dict]:
    """Each kernel's resources with the dynamic shared bytes it is launched with beside its static ones."""
    return [{**{key: value for key, value in k.items() if key != "local_bytes"},
             "dynamic_shared_bytes": dynamic.get(k["name"], 0), "local_bytes": k["local_bytes"]} for k in kernels]
