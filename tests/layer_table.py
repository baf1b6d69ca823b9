"""
The package's layers, computed from its imports: a module's layer is 1 + the highest layer of the
package modules it imports at module level (0 for none). ``python tests/layer_table.py`` rewrites the
README's layer table; ``tests/test_layers.py`` checks that the README holds exactly this table.
"""

import ast
import functools
import glob
import os
import re
import sys
from typing import Dict, Set, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "improved_diffusion")
README = os.path.join(REPO, "README.md")
BEGIN, END = "<!-- layers:begin -->\n", "<!-- layers:end -->"


def package_imports() -> Dict[str, Tuple[Set[str], Set[str]]]:
    """Per module: (package modules imported at module level, those imported inside functions)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(PACKAGE, "*.py"))):
        name = os.path.basename(path)[:-3]
        if name == "__init__":
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        top: Set[str] = set()
        inner: Set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                (top if node in tree.body else inner).update(names)
        out[name] = (top, inner)
    return out


def layers() -> Dict[str, int]:
    """Module -> layer (raises RecursionError on an import cycle)."""
    imports = package_imports()

    @functools.lru_cache(maxsize=None)
    def layer(name: str) -> int:
        return 1 + max((layer(m) for m in imports[name][0]), default=-1)

    return {name: layer(name) for name in imports}


def table() -> str:
    """The markdown table, highest layer first."""
    by_layer: Dict[int, list] = {}
    for name, layer in layers().items():
        by_layer.setdefault(layer, []).append(name)
    rows = ["| layer | modules |", "|---|---|"]
    rows += [
        f"| {n} | " + ", ".join(f"`{m}`" for m in sorted(by_layer[n])) + " |" for n in sorted(by_layer, reverse=True)
    ]
    return "\n".join(rows) + "\n"


def readme_table() -> str:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return text.split(BEGIN, 1)[1].split(END, 1)[0]


if __name__ == "__main__":
    with open(README, encoding="utf-8") as f:
        text = f.read()
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: BEGIN + table() + END, text, flags=re.S)
    with open(README, "w", encoding="utf-8") as f:
        f.write(text)
    sys.stdout.write(table())
