"""The structure: the import graph (every import, the ones inside functions too) has no circle, no module imports
from a layer above its own, and the bottom modules import only what their docstrings promise.

Read from the source with ``ast``, so nothing is imported or run; a new module must find its place in LAYERS.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "targets", "tvm_schedules", "pipeline")

# Bottom first. A module imports only from its own layer or the ones below; the longest matching prefix places it.
LAYERS = (
    # data and the stand-alone board runner: no compiler, no pipeline above them
    ("models", "targets", "pipeline.paths", "pipeline.version", "pipeline.runtime", "pipeline.time_candidates",
     "pipeline.toolchain.elf",
     "pipeline.toolchain.cuda_toolchains"),
    # our TVM kernels and passes; errors, what is asked (spec), TVM targets; build-host toolchains
    ("tvm_schedules", "pipeline.errors", "pipeline.spec", "pipeline.tvm_targets", "pipeline.toolchain"),
    # what the stages use: emulation, bundles, the tuning database / records / measurement
    ("pipeline.emulation", "pipeline.bundle", "pipeline.tuning"),
    ("pipeline.stages",),  # one plain function each
    ("pipeline.run",),  # the stage list
    ("pipeline.tune", "pipeline.deploy", "pipeline.bench", "pipeline.diagnose"),  # commands' libraries, above the stages
    ("pipeline.regress", "pipeline.report", "pipeline.ship_records"),
    ("pipeline.cli", "pipeline.__main__"),
)

# What the bottom modules may import besides the standard library (None: the standard library only).
ALLOWED_THIRD_PARTY = {
    "models": {"torch"},
    "targets": set(),
    "pipeline.paths": set(),
    "pipeline.version": set(),
    "pipeline.toolchain.elf": set(),
    "pipeline.toolchain.cuda_toolchains": set(),
    # ships alone as a bundle's run.py; cryptography only for --public-key (imported then, said when missing)
    "pipeline.runtime": {"numpy", "tvm", "cryptography"},
    "pipeline.time_candidates": {"numpy", "tvm", "runtime"},  # ships in a batch of candidates, runtime.py beside it
}
STDLIB = frozenset(__import__("sys").stdlib_module_names)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Everything ``path`` imports, as absolute module names (a project name is resolved to its module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import module` imports the module
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def layer(name: str) -> int:
    matches = [(len(prefix), i) for i, names in enumerate(LAYERS) for prefix in names
               if name == prefix or name.startswith(prefix + ".")]
    assert matches, f"{name} has no place in LAYERS (tests/test_layering.py): add it where it belongs"
    return max(matches)[1]


def allowed_key(name: str) -> str | None:
    return next((k for k in sorted(ALLOWED_THIRD_PARTY, key=len, reverse=True)
                 if name == k or name.startswith(k + ".")), None)


MODULES = project_modules()
GRAPH = {name: {i for i in imports(name, path, set(MODULES)) if i in MODULES and i != name}
         for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_only_from_its_layer_or_below(name):
    upward = sorted(i for i in GRAPH[name] if layer(i) > layer(name))
    assert not upward, f"{name} (layer {layer(name)}) imports from above: {upward}"


def test_no_circles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in sorted(GRAPH[name]):
            if state.get(other) == 1:
                loop = path[path.index(other):] + [other] if other in path else [name, other]
                pytest.fail("import circle: " + " -> ".join(loop))
            if other not in state:
                visit(other, path + [other])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(n for n in MODULES if allowed_key(n)))
def test_bottom_modules_import_only_what_they_promise(name):
    allowed = ALLOWED_THIRD_PARTY[allowed_key(name)]
    outside = {i.split(".")[0] for i in imports(name, MODULES[name], set(MODULES))} - STDLIB - {"__future__"}
    project = {top for top in outside if top in PACKAGES}
    assert outside - project <= allowed, f"{name} imports {sorted(outside - project - allowed)}"
    if name.startswith(("models", "targets")):
        assert project <= {name.split(".")[0]}, f"{name} imports {sorted(project)}"


def test_tvm_only_in_pipeline_and_tvm_schedules():
    for name, path in MODULES.items():
        tops = {i.split(".")[0] for i in imports(name, path, set(MODULES))}
        if name.startswith(("models", "targets")):
            assert not tops & {"tvm", "tvm_ffi"}, f"{name} imports TVM"
        if name.startswith("tvm_schedules"):
            assert "pipeline" not in tops, f"{name} imports pipeline (it sits below it)"
