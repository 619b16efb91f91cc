"""The import structure: no import circles between modules, and no lower layer importing a higher one.

Imports are read from the source with ``ast`` (also those inside functions, which are still
dependencies), so this checks the code as written, not what happens to be imported at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import latentforge

ROOT = Path(latentforge.__file__).parent

# Lowest first. A unit is the first name under latentforge (a subpackage or a top-level module); in io/,
# each module (the file readers and writers are leaves, the checkpoint sources know the families).
LAYERS = [
    {"_version", "device", "threads", "allocator", "nn", "demo", "assets", "recipes", "io", "io.tensorfile"}
    | {"io.safetensors_header", "io.writer"}
    | {"io.hashing", "io.folder_files", "io.h5file", "io.embedding_image"},
    {"io.infotext", "io.images", "io.components", "models", "sampling", "convert"},
    {"conditioning", "families", "adapters", "offload", "preview", "io.single_file", "io.diffusers_folder"}
    | {"upscalers"},
    {"pipelines"},
    {"pipeline", "loading"},
    {"train", "cli", "cli_generate", "cli_inpaint", "cli_hires", "cli_train", "cli_serve", "server"}
    | {"__init__", "__main__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "io":
        return f"io.{parts[2]}"
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(LAYER), f"give these a layer in tests/test_layers.py: {sorted(units - set(LAYER))}"


def test_no_lower_layer_imports_a_higher_one():
    upward = [
        f"{a} ({_unit(a)}, layer {LAYER[_unit(a)]}) imports {b} ({_unit(b)}, layer {LAYER[_unit(b)]})"
        for a, targets in _graph().items()
        for b in targets
        if LAYER[_unit(a)] < LAYER[_unit(b)]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circles_between_modules():
    graph = _graph()
    # a package imports its own submodules from __init__; that is containment, not a circle
    edges = {a: {b for b in bs if not (b.startswith(a + ".") and graph.get(a))} for a, bs in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The checks above can fail: the parser finds a known lazy import (pipeline -> pipelines.generate)."""
    graph = _graph()
    assert "latentforge.pipelines" in graph["latentforge.pipeline"] or any(
        t.startswith("latentforge.pipelines") for t in graph["latentforge.pipeline"]
    )
    assert "latentforge.device" in graph["latentforge.loading"]
