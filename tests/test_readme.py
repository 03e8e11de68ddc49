"""The README's tour is code a newcomer copies: it must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks, "README has no python block"
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_readme_shows_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "make figures" in text and "make test" in text
