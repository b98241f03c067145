"""The architecture the docs draw is the one the code has.

`docs/module_map.py` prints the module map from the import-linter layers and the import graph;
README.md and docs/architecture.md carry copies. The import rules themselves are checked by
`lint-imports` in .ci/run; here, the copies, and that the contract covers every top-level module.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))

import module_map  # noqa: E402  (a script beside the docs, not a package)


def test_the_docs_module_maps_are_the_generated_one() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "module_map.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr + "\nrun: python docs/module_map.py --write"


def test_every_module_is_in_the_map_once() -> None:
    named = [row.split(" | ")[1] for row in module_map.table().splitlines()[2:]]
    expected = [
        f"`{name}/`" if path.name == "__init__.py" else f"`{name}`"
        for name, path in module_map.modules().items()
    ]
    assert sorted(named) == sorted(expected)
    assert len(set(named)) == len(named)


def test_every_top_level_module_has_a_layer() -> None:
    layered = {part for layer in module_map.layers() for part in layer}
    tops = {name.split(".")[0] for name in module_map.modules()}
    assert tops == layered
