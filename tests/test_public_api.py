"""The package's public surface is one list, and it is what users get.

`flux_flows/__init__.py` maps each public name to its module (`_MODULE_OF`) and repeats the
imports under TYPE_CHECKING for type checkers; these tests fail when the two drift apart, when a
name does not resolve, or when importing the package starts pulling in Prefect.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import flux_flows

INIT = Path(flux_flows.__file__)


def _type_checking_imports() -> dict[str, str]:
    """name -> module of every import inside the `if TYPE_CHECKING:` block of __init__."""
    tree = ast.parse(INIT.read_text())
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), ast.dump(stmt)
                for alias in stmt.names:
                    found[alias.asname or alias.name] = str(stmt.module)
    return found


def test_the_type_checking_imports_are_the_public_list() -> None:
    imported = _type_checking_imports()
    mapped = {name: f"flux_flows.{module}" for name, module in flux_flows._MODULE_OF.items()}
    assert imported == mapped


def test_all_is_the_public_list_and_every_name_resolves() -> None:
    assert sorted(flux_flows.__all__) == sorted(["__version__", *flux_flows._MODULE_OF])  # one list
    assert len(set(flux_flows.__all__)) == len(flux_flows.__all__)
    for name in flux_flows.__all__:
        assert getattr(flux_flows, name) is not None, name
    assert sorted(dir(flux_flows)) == sorted(flux_flows.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        flux_flows.render_windowed  # noqa: B018 - internal, not public
    except AttributeError as exc:
        assert "render_windowed" in str(exc)
    else:
        raise AssertionError("an internal name leaked into the public package")


def test_importing_the_package_imports_no_prefect() -> None:
    code = "import sys, flux_flows; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
