"""Print the README's module map from the code itself: the layers of the import-linter contract
(pyproject.toml), each module's first docstring line, and what each layer really imports.

    python docs/module_map.py            # the table README.md's "How it is built" shows
    python docs/module_map.py --write    # put it into README.md and docs/architecture.md
    python docs/module_map.py --check    # exit 1 if README.md's or docs/architecture.md's differs

Drawn from the import graph (every `from flux_flows... import`, inside functions too), so the map
cannot name a module that is not there, leave one out, or claim an edge that does not exist.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flux_flows"
BEGIN, END = "<!-- module-map:begin -->", "<!-- module-map:end -->"


def layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in config["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    return [[part.strip() for part in layer.split("|")] for layer in contract["layers"]]


def modules() -> dict[str, Path]:
    """Dotted name (without `flux_flows.`) -> file, packages by their __init__."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = doc.split("\n\n")[0].replace("\n", " ").strip()
    sentence = first.split(". ")[0].rstrip(".")  # the first sentence says the module's job
    return sentence.replace("|", "\\|")


def top_of(name: str) -> str:
    return name.split(".")[0]


def imports_of(path: Path) -> set[str]:
    """Top-level flux_flows modules/packages this file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("flux_flows."):
                found.add(top_of(node.module.removeprefix("flux_flows.")))
            elif node.module == "flux_flows":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("flux_flows."):
                    found.add(top_of(alias.name.removeprefix("flux_flows.")))
    return found


def table() -> str:
    mods = modules()
    rows = ["| layer | module | what it is for | imports from |", "| --- | --- | --- | --- |"]
    for number, layer in enumerate(layers(), start=1):
        for top in layer:
            members = sorted(n for n in mods if top_of(n) == top)
            uses: set[str] = set()
            for name in members:
                uses |= imports_of(mods[name])
            uses -= {top, "__version__"}
            shown = ", ".join(f"`{u}`" for u in sorted(uses)) or "-"
            for name in members:
                label = f"`{name}/`" if mods[name].name == "__init__.py" else f"`{name}`"
                rows.append(
                    f"| {number} | {label} | {summary(mods[name])} | {shown if name == top else ''} |"
                )
    return "\n".join(rows)


COPIES = ("README.md", "docs/architecture.md")


def copy_in(name: str) -> str:
    text = (ROOT / name).read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def write_copies() -> None:
    """Put the current table between the markers of each copy."""
    for name in COPIES:
        path = ROOT / name
        head, rest = path.read_text().split(BEGIN, 1)
        path.write_text(f"{head}{BEGIN}\n{table()}\n{END}{rest.split(END, 1)[1]}")


def main() -> int:
    if "--check" in sys.argv:
        stale = [name for name in COPIES if copy_in(name) != table()]
        for name in stale:
            print(f"{name}: module map differs from `python docs/module_map.py`", file=sys.stderr)
        return 1 if stale else 0
    if "--write" in sys.argv:
        write_copies()
        return 0
    print(table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
