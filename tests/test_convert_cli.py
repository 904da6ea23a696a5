"""tools/convert.py's command line around a failure: the directories a failed export created are removed
when left empty (nothing that existed before is touched), and terminal colour codes are stripped from
the printed error."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("convert_tool", REPO / "tools" / "convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_export_leaves_no_empty_directories(tmp_path):
    tool = _tool()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    out = run / "exports" / "merged-step00000010"
    top = tool._missing_ancestor(str(out))
    assert top == str(run / "exports")
    (run / "exports").mkdir()  # what atomic_dir creates before the export fails
    tool._remove_empty(str(out), top)
    assert not (run / "exports").exists() and (run / "checkpoints").is_dir()
    (run / "exports" / "earlier").mkdir(parents=True)  # not empty: kept
    tool._remove_empty(str(out), tool._missing_ancestor(str(out)))
    assert (run / "exports" / "earlier").is_dir()


def test_colour_codes_are_stripped():
    assert _tool().ANSI.sub("", "\x1b[31mError\x1b[0m: bad \x1b[1;33mthing\x1b[0m") == "Error: bad thing"
