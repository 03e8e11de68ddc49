"""MkDocs hooks: pages that include parts of the README and a verification table generated at build time.

Markers a page may contain (each on its own line):

* ``<!-- readme: HEADING -->`` -- the body of the README section ``## HEADING`` (up to the next ``## ``), with its
  repository-relative image paths rewritten for a page in ``docs/`` (gallery images -> ``img/figures/``);
* ``<!-- verify-table -->`` -- the table of ``python -m energy verify`` (seed 0, 20 trials), computed during the build.

Gallery images are read from ``docs/img/figures/`` (where ``make`` refreshes them); a picture not there yet is taken
from ``paper_figs/out/`` under the same name, so the site builds before and after the images move.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FIGURES = ROOT / "docs" / "img" / "figures"
FIGURES_FALLBACK = ROOT / "paper_figs" / "out"

_README_MARKER = re.compile(r"^<!-- readme: (.+?) -->$", flags=re.M)
_VERIFY_MARKER = "<!-- verify-table -->"
_IMAGE = re.compile(r"(!\[[^\]]*\]\()(?:docs/img/figures/|paper_figs/out/)([^)\s]+\.png)\)")
_verify_cache: dict[str, str] = {}


def readme_section(heading: str) -> str:
    """The body of the README section ``## heading`` (without the heading), images rewritten for ``docs/``."""
    text = README.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    if match is None:
        raise ValueError(f"README.md has no section '## {heading}'; fix the marker <!-- readme: {heading} -->")
    body = _IMAGE.sub(r"\1img/figures/\2)", match.group(1))
    return body.replace("](docs/", "](").strip() + "\n"


def expand_readme(markdown: str) -> str:
    """``markdown`` with every ``<!-- readme: HEADING -->`` marker replaced by that README section."""
    return _README_MARKER.sub(lambda m: readme_section(m.group(1)), markdown)


def verify_table() -> str:
    """The Markdown table of ``python -m energy verify`` (seed 0, 20 trials), computed once per build."""
    if "table" not in _verify_cache:
        from energy.verify import format_table, run

        _verify_cache["table"] = format_table(run(seed=0, trials=20))
    return _verify_cache["table"]


def gallery_images() -> list[str]:
    """Names of the gallery pictures the README's Figures section shows."""
    section = readme_section("Figures").replace("](img/figures/", "](docs/img/figures/")
    return [name for _, name in _IMAGE.findall(section)]


def on_files(files: Any, config: Any, **kwargs: Any) -> Any:
    """Add the gallery pictures not yet under ``docs/img/figures/`` from ``paper_figs/out/``."""
    from mkdocs.structure.files import File

    for name in gallery_images():
        uri = f"img/figures/{name}"
        if files.get_file_from_path(uri) is None and (FIGURES_FALLBACK / name).is_file():
            files.append(File.generated(config, uri, abs_src_path=str(FIGURES_FALLBACK / name)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any, **kwargs: Any) -> str:
    """Expand the markers of one page."""
    markdown = expand_readme(markdown)
    if _VERIFY_MARKER in markdown:
        markdown = markdown.replace(_VERIFY_MARKER, verify_table())
    return markdown
