"""Load a script of ``scripts/`` (its ``main`` and helpers) without running it, for the tests."""

import os
import runpy
import types

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def load_script(name: str) -> types.SimpleNamespace:
    """The globals of ``scripts/<name>`` (``"image_train.py"`` or ``"image_train"``) as attributes.

    A missing script is a failure (FileNotFoundError), never a skip: a renamed script must fail the suite.
    """
    filename = name if name.endswith(".py") else f"{name}.py"
    return types.SimpleNamespace(**runpy.run_path(os.path.join(SCRIPTS, filename), run_name="not_main"))
