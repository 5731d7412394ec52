"""Imports go down the layer list (STYLE.md section 3), never up; library code never prints."""

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
    "models": 2,
    "tasks": 2,
    "tasks.base": 2,
    "tasks.labels": 2,
    "tasks.classification": 2,
    "tasks.token": 2,
    "tasks.qa": 2,
    "quant.modules": 2,
    "hessian.sensitivity": 3,
    "allocate": 3,
    "quant.apply": 3,
    "quant.profile": 3,
    "export": 3,
    "evaluate": 3,
    "landscape": 3,
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
    "cli": 5,
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


@pytest.mark.parametrize("path", [p for p in MODULES if p.stem != "cli"], ids=_module_name)
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
