"""Imports go down the layer list (STYLE.md section 3), never up, for modules and for folders; library code never
prints.

Two rules hold the layering:

- **Modules**: a module imports only modules of a lower layer in ``LAYERS``, or of its own layer listed before it.
- **Folders**: read each folder (``hessian/``, ``quant/``, ``tasks/``, ``deploy/``) as one node and each root module
  as its own node; the imports between nodes form no cycle. So no root module both imports from a folder and is
  imported by a module of that folder (``models`` using ``hessian.kernels`` while ``hessian.sensitivity`` used
  ``models`` was such a cycle: the folder spanned an arrow back up), nor through a chain of other modules.
  A folder may still hold modules of several layers, as long as everything outside it that it imports sits below
  everything outside it that imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "qbert_hessian"
LAYERS = {
    "errors": 0,
    "names": 0,
    "config": 0,
    "packed_format": 0,
    "onnx_format": 0,
    "artifacts": 0,
    "hub": 0,
    "interrupt": 0,
    "run_folder": 0,
    "distributed": 1,
    "hessian.vec": 1,
    "hessian.hvp": 1,
    "hessian.lanczos": 1,
    "hessian.eigen": 1,
    "hessian.trace": 1,
    "hessian.density": 1,
    "hessian.kernels": 1,
    "hessian.memory": 1,
    "quant.ranges": 1,
    "quant.functional": 1,
    "quant.gptq": 1,
    "models": 2,
    "tasks": 2,
    "tasks.base": 2,
    "tasks.labels": 2,
    "tasks.classification": 2,
    "tasks.token": 2,
    "tasks.qa": 2,
    "quant.modules": 2,
    "sensitivity": 3,
    "allocate": 3,
    "quant.rounding": 3,
    "quant.apply": 3,
    "quant.profile": 3,
    "export": 3,
    "evaluate": 3,
    "landscape": 3,
    "run_config": 3,
    "deploy.layout": 1,
    "deploy.output": 1,
    "train": 4,
    "qat": 4,
    "report": 4,
    "deploy.onnx": 4,
    "deploy.compressed": 4,
    "deploy.runtime": 4,
    "stages": 5,
    "pipeline": 5,
    "cli.common": 5,
    "cli.finetune": 5,
    "cli.sensitivity": 5,
    "cli.plan": 5,
    "cli.quantize": 5,
    "cli.evaluate": 5,
    "cli.export": 5,
    "cli.landscape": 5,
    "cli.density": 5,
    "cli.run": 5,
    "cli.demo": 5,
    "cli.main": 5,
    "cli": 5,
    "cli.__main__": 5,
    "__main__": 5,
}
ORDER = list(LAYERS)


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PKG).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    mod = _module_name(path)
    package = mod.rsplit(".", 1)[0] if "." in mod else ""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [f"{target}.{a.name}".strip(".") for a in node.names]
            out.update(n if n in LAYERS else target for n in names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("qbert_hessian."):
            out.add(node.module.removeprefix("qbert_hessian."))
    return {o for o in out if o}


MODULES = [p for p in PKG.rglob("*.py") if p.name != "__init__.py"]


@pytest.mark.parametrize("path", MODULES, ids=_module_name)
def test_imports_go_down_the_layers(path):
    mod = _module_name(path)
    assert mod in LAYERS, f"{mod} has no layer in LAYERS; add it"
    for dep in _imports(path):
        assert dep in LAYERS, f"{mod} imports unknown module {dep}"
        # Down the layers, or to a module listed earlier within the same layer (artifacts -> errors).
        down = LAYERS[dep] < LAYERS[mod] or (LAYERS[dep] == LAYERS[mod] and ORDER.index(dep) < ORDER.index(mod))
        assert down, f"{mod} (layer {LAYERS[mod]}) imports {dep} (layer {LAYERS[dep]})"


def _node(mod: str) -> str:
    """The folder a module sits in (``hessian`` for ``hessian.eigen``), or the root module itself."""
    return mod.split(".", 1)[0]


def _folder_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the node graph, as the list of nodes walked (first == last), or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _node_edges(modules: dict[str, set[str]]) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    """Imports between nodes, and for each node edge the module imports that make it (for the message)."""
    edges: dict[str, set[str]] = {}
    why: dict[tuple[str, str], list[str]] = {}
    for mod, deps in modules.items():
        for dep in deps:
            a, b = _node(mod), _node(dep)
            if a != b:
                edges.setdefault(a, set()).add(b)
                why.setdefault((a, b), []).append(f"{mod} -> {dep}")
    return edges, why


def test_no_folder_spans_an_upward_arrow():
    edges, why = _node_edges({_module_name(p): _imports(p) for p in MODULES})
    cycle = _folder_cycle(edges)
    links = [", ".join(sorted(why[a, b])) for a, b in zip(cycle, cycle[1:], strict=False)] if cycle else []
    assert cycle is None, f"folder-level import cycle {' -> '.join(cycle)} ({'; '.join(links)})"


def test_the_folder_check_finds_a_cycle_through_a_root_module():
    """The check itself: a folder module above ``models`` importing it while ``models`` imports that folder."""
    edges, why = _node_edges({"models": {"hessian.kernels"}, "hessian.protocol": {"models"}, "hessian.kernels": set()})
    assert _folder_cycle(edges) == ["hessian", "models", "hessian"]
    assert why["hessian", "models"] == ["hessian.protocol -> models"]
    assert (
        _folder_cycle(_node_edges({"models": {"hessian.kernels"}, "sensitivity": {"models", "hessian.eigen"}})[0])
        is None
    )


@pytest.mark.parametrize("path", [p for p in MODULES if _node(_module_name(p)) != "cli"], ids=_module_name)
def test_library_code_does_not_print(path):
    calls = [
        n
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"
    ]
    assert not calls, f"{_module_name(path)} calls print; use logging"


def test_every_public_name_resolves_to_what_it_names():
    import qbert_hessian

    for name in qbert_hessian.__all__:
        obj = getattr(qbert_hessian, name)
        assert not isinstance(obj, type(qbert_hessian)), f"qbert_hessian.{name} is a module, not the object"
