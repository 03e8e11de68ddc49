"""The index at the end of docs/MATH.md names functions and tests that exist (the docs cannot drift)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _index_rows() -> list[list[str]]:
    text = (ROOT / "docs" / "MATH.md").read_text(encoding="utf-8")
    index = text[text.index("## Index: equation"):]
    rows = []
    for line in index.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and not cells[0].startswith(("§", "---")):
            rows.append(cells)
    return rows


def _resolve(path: str) -> tuple[ModuleType, object]:
    """Import the longest module prefix of a dotted ``path`` and walk the rest as attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        obj: object = module
        for name in parts[i:]:
            assert hasattr(obj, name), f"docs/MATH.md index: {path} does not exist"
            obj = getattr(obj, name)
        return module, obj
    raise AssertionError(f"docs/MATH.md index: no module in {path}")


def test_index_covers_every_section_and_names_existing_functions_and_tests() -> None:
    rows = _index_rows()
    sections = {row[0].split("–")[0] for row in rows}
    assert {"0", "1.1", "1.2", "1.3", "1.4", "1.5", "2.1", "2.2", "3.1", "3.2", "3.3", "3.4", "3.6", "3.7", "4.1",
            "4.2", "5.1", "5.2", "5.3", "5.3a", "5.4", "5.5", "6.1", "6.2", "6.3", "7.1", "7.2", "7.3", "7.4", "7.5",
            "7.6"} <= sections
    for _, _, functions, tests in rows:
        module: ModuleType | None = None
        for token in re.findall(r"`([^`]+)`", functions):
            token = token.split("(")[0].strip()
            if token.startswith(("energy.", "unfold.")):
                module, _ = _resolve(token)
            elif module is not None and re.fullmatch(r"[A-Za-z_][\w.]*", token):
                _resolve(f"{module.__name__}.{token}")
        test_file = None
        for token in re.findall(r"`([^`]+)`", tests):
            if ".py" in token:
                test_file, _, name = token.partition("::")
            else:
                name = token.lstrip(":")
            if test_file and name:
                source = (ROOT / "tests" / test_file).read_text(encoding="utf-8")
                assert f"def {name}(" in source, f"docs/MATH.md index: tests/{test_file}::{name} does not exist"
