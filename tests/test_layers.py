"""The package's layer picture in the README holds: every module imports only lower layers, at import time."""

import ast
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "improved_diffusion")


def _layers() -> dict:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    table = readme.split("<!-- layers:begin -->", 1)[1].split("<!-- layers:end -->", 1)[0]
    layers = {}
    for row in re.findall(r"^\| (\d+) \| (.+) \|$", table, flags=re.M):
        for name in re.findall(r"`(\w+)`", row[1]):
            layers[name] = int(row[0])
    return layers


def _imports(path: str):
    """(package modules imported at module level, those imported inside functions)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top, inner = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            (top if node in tree.body else inner).update(names)
    return top, inner


def test_every_module_has_a_layer():
    modules = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(PACKAGE, "*.py"))} - {"__init__"}
    assert set(_layers()) == modules


def test_imports_point_only_downward_and_none_is_lazy():
    layers = _layers()
    assert layers, "README.md lost its layer table"
    for name, layer in layers.items():
        top, inner = _imports(os.path.join(PACKAGE, f"{name}.py"))
        upward = sorted(m for m in top if layers[m] >= layer)
        assert not upward, f"{name} (layer {layer}) imports {upward} of the same or a higher layer"
        assert not inner, f"{name} imports {sorted(inner)} inside a function"
