"""The package's import picture, by area, and a check that imports point down the layers only.

    python tools/import_graph.py            # edges between areas, with the number of import statements
    python tools/import_graph.py --check    # exit 1 on an import that points up (CI runs it: tests/test_layering.py)

Areas and layers (README, "Layout"): 1 the math (scaling, rescale, precision, spectrum, elastic, pieces;
and deepspeed_import, a leaf that imports nothing of the package), 2 methods, 3 zero and checkpoint
(checkpoint never imports zero), 4 train, export, bench; the package's ``__init__`` (the public API)
re-exports from below. Imports inside functions count too (they are still dependencies).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ds_scalora"
LAYERS = {"math": 1, "methods": 2, "zero": 3, "checkpoint": 3, "train": 4, "export": 4, "bench": 4, "api": 5}
FORBIDDEN = {("checkpoint", "zero")}  # same layer, one direction only


def area(parts: tuple[str, ...]) -> str:
    """The area of a module given by its path parts under the package (``ds_scalora/__init__.py``, the
    public names re-exported, sits above everything)."""
    if parts in ((), ("__init__",)):
        return "api"
    return parts[0] if parts[0] in LAYERS else "math"


def edges() -> Counter:
    out = Counter()
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        here = area(parts)
        package = parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = (*base, *(node.module.split(".") if node.module else ()))
                names = [target] if node.module else [(*base, alias.name) for alias in node.names]
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                mods = [module] if module else [alias.name for alias in node.names]
                names = [tuple(m.split(".")[1:]) for m in mods if m and m.split(".")[0] == PACKAGE.name]
            else:
                continue
            for target in names:
                there = area(target)
                if there != here:
                    out[(here, there)] += 1
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    a = p.parse_args(argv)
    found = edges()
    bad = []
    for (src, dst), n in sorted(found.items(), key=lambda e: (-LAYERS[e[0][0]], e[0])):
        up = LAYERS[dst] > LAYERS[src] or (src, dst) in FORBIDDEN
        print(f"{src:>10} ({LAYERS[src]}) -> {dst:<10} ({LAYERS[dst]}) {n:3d}{'   UP: not allowed' if up else ''}")
        if up:
            bad.append((src, dst))
    if a.check and bad:
        print(f"imports pointing up: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
