"""The shape of the codebase, held by walking its source (ast): who may import whom.

- the core (``dynamo`` outside ``dynamo.pipeline``) never imports ``analyses``, ``figures`` or
  the pipeline;
- ``analyses`` imports only the core's data contract and stepping;
- ``figures`` imports only the vocabulary (never torch, a model, or the pipeline);
- no import cycle among modules at module level, and no function-local import of a project
  module from another package (the usual way to dodge a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dynamo", "analyses", "figures")
DATA_CONTRACT = {"dynamo.layout", "dynamo.partition", "dynamo.store", "dynamo.stepping", "dynamo.metrics", "dynamo.heads",
                 "dynamo.progress", "dynamo.serialize", "dynamo.blocks", "dynamo.dictionary"}
VOCABULARY = {"dynamo.layout", "dynamo.partition"}
MODEL_LIBRARIES = {"torch", "timm", "torchvision"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _layer(module: str) -> str:
    """core, pipeline, analyses or figures."""
    if module == "dynamo.pipeline" or module.startswith("dynamo.pipeline."):
        return "pipeline"
    return {"dynamo": "core"}.get(module.split(".")[0], module.split(".")[0])


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import statement of a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    local = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
             for node in ast.walk(function) if node is not function}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from dynamo import zoo` imports the submodule dynamo.zoo
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                     for alias in node.names]
        else:
            continue
        found += [(name, id(node) not in local, node.lineno) for name in names]
    return found


def _project(name: str) -> str | None:
    """The project module an import names (its longest known prefix), or None."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return None


def _allowed(importer: str, imported: str) -> bool:
    source, target = _layer(importer), _layer(imported)
    if source == "core":
        return target == "core"
    if source == "analyses":
        return target == "analyses" or imported in DATA_CONTRACT
    if source == "figures":
        return target == "figures" or imported in VOCABULARY
    return True  # the pipeline ties everything together


def test_the_walker_sees_the_real_imports_across_layers():
    """The rules below judge what the walker resolves: it must see known imports of each layer (else all would pass)."""
    seen = {module: {_project(name) for name, _, _ in _imports(MODULES[module])} - {None}
            for module in ("dynamo.pipeline.registry", "analyses.perturbation", "figures.basins")}
    assert {"analyses.basins", "figures.basins", "dynamo.partition"} <= seen["dynamo.pipeline.registry"]
    assert "dynamo.stepping" in seen["analyses.perturbation"]
    assert {_layer(target) for target in seen["figures.basins"]} <= {"figures", "core"}
    assert {_layer(m) for m in MODULES} == {"core", "pipeline", "analyses", "figures"}
    assert "dynamo.surrogates.raptor" in MODULES


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layers(module):
    broken = []
    for name, top_level, line in _imports(MODULES[module]):
        if _layer(module) == "figures" and name.split(".")[0] in MODEL_LIBRARIES:
            broken.append(f"line {line}: figures import {name}")
        target = _project(name)
        if target is None:
            continue
        if not _allowed(module, target):
            broken.append(f"line {line}: {_layer(module)} imports {target}")
        if not top_level and _layer(module) != _layer(target) and module not in ("dynamo.pipeline.cli", "dynamo.pipeline.arguments"):  # the CLI imports late
            broken.append(f"line {line}: function-local import of {target} from another package")
    assert not broken, f"{module}: " + "; ".join(broken)


def test_no_import_cycles_at_module_level():
    graph = nx.DiGraph()
    for module, path in MODULES.items():
        graph.add_node(module)
        for name, top_level, _ in _imports(path):
            target = _project(name)
            if top_level and target is not None and target != module and not module.startswith(target + "."):
                graph.add_edge(module, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_the_rules_catch_a_broken_import(tmp_path):
    """The walker sees a core module importing figures, and a function-local cross-package import."""
    path = tmp_path / "bad.py"
    path.write_text("import figures.similarity\n\ndef f():\n    from analyses import phases\n")
    found = _imports(path)
    assert ("figures.similarity", True, 1) in found and ("analyses.phases", False, 4) in found
    assert not _allowed("dynamo.store", "figures.similarity")
    assert not _allowed("analyses.swap", "dynamo.surrogates.evaluate")
    assert not _allowed("figures.similarity", "analyses.phases")
    assert _allowed("dynamo.pipeline.cli", "figures.similarity")
