"""The package's layer picture in the README holds: every module imports only lower layers, at import time."""

import layer_table


def test_readme_layer_table_is_the_computed_one():
    assert layer_table.readme_table() == layer_table.table(), "stale README layers: python tests/layer_table.py"


def test_imports_point_only_downward_and_none_is_lazy():
    layers = layer_table.layers()
    for name, (top, inner) in layer_table.package_imports().items():
        upward = sorted(m for m in top if layers[m] >= layers[name])
        assert not upward, f"{name} (layer {layers[name]}) imports {upward} of the same or a higher layer"
        assert not inner, f"{name} imports {sorted(inner)} inside a function"
