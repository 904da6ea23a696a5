"""Imports point down the layers only (README, "Layout"): ``tools/import_graph.py --check`` parses every
module of the package (imports inside functions included) and fails on an import that points up, or
from the checkpoint format to the live engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_imports_point_down_only():
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), "--check"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "methods    (2)" in proc.stdout  # the graph was read (not an empty package)


def test_an_upward_import_is_caught(tmp_path):
    """The check itself can fail: a copy of the package with one math module importing a method."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(REPO / "ds_scalora", copy / "ds_scalora", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "tools").mkdir()
    shutil.copy(REPO / "tools" / "import_graph.py", copy / "tools")
    with open(copy / "ds_scalora" / "scaling.py", "a") as f:
        f.write("\n\ndef _up():\n    from .methods.scalora import ScaLoRAConfig  # noqa: F401\n")
    proc = subprocess.run([sys.executable, str(copy / "tools" / "import_graph.py"), "--check"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1 and "('math', 'methods')" in proc.stderr, proc.stdout + proc.stderr
