"""The documentation site (mkdocs.yml, docs/): its code blocks run as written, and its build helpers work.

Every ```` ```python ```` block of a page in the site's navigation runs here, after the page's
``<!-- readme: ... -->`` markers are expanded exactly as the site build expands them (docs/_ext/hooks.py), so the
README sections the site includes (the tour) are run from the page too. Blocks of one page share a namespace, in
order, like a reader pasting them one after another. ``make docs`` builds the site itself (``mkdocs build
--strict``); the converter tests below need griffe, which the ``docs`` extra installs.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", DOCS / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load("hooks")


def _nav_pages() -> list[str]:
    """The Markdown files the navigation of mkdocs.yml names (read as text: no YAML dependency)."""
    return re.findall(r"^\s*- (?:[^:\n]+: )?([\w./-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), flags=re.M)


PAGES = _nav_pages()


def test_navigation_names_every_page_and_only_existing_ones():
    # docs/_ext/ (build helpers) and docs/img/ (the gallery's generated report.md) are excluded_docs in mkdocs.yml
    on_disk = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if not {"_ext", "img"} & set(p.parts))
    assert sorted(PAGES) == on_disk, "a page is missing from the nav of mkdocs.yml, or the nav names a missing page"


def test_readme_markers_resolve_and_name_real_sections():
    for page in PAGES:
        text = hooks.expand_readme((DOCS / page).read_text(encoding="utf-8"))
        assert "<!-- readme:" not in text, page
    with pytest.raises(ValueError, match="README.md has no section '## No such heading'"):
        hooks.readme_section("No such heading")


def test_gallery_images_exist():
    images = hooks.gallery_images()
    assert len(images) >= 17
    for name in images:
        assert (hooks.FIGURES / name).is_file() or (hooks.FIGURES_FALLBACK / name).is_file(), name


def _python_blocks(page: str) -> list[str]:
    text = hooks.expand_readme((DOCS / page).read_text(encoding="utf-8"))
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_pages_have_code():
    assert sum(len(_python_blocks(page)) for page in PAGES) >= 4


@pytest.mark.parametrize("page", [p for p in PAGES if _python_blocks(p)])
def test_page_code_blocks_run(page):
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(_python_blocks(page)):
        exec(compile(block, f"docs/{page} (python block {i + 1})", "exec"), namespace)


def test_api_pages_name_importable_modules():
    for page in (DOCS / "api").glob("*.md"):
        for module in re.findall(r"^::: ([\w.]+)$", page.read_text(encoding="utf-8"), flags=re.M):
            assert importlib.util.find_spec(module) is not None, f"{page.name}: no module {module}"


# ---------------------------------------------------------------- the docstring converter (needs the docs extra)


@pytest.fixture(scope="module")
def rst():
    pytest.importorskip("griffe")
    return _load("griffe_rst")


def test_math_directive_one_line_and_block(rst):
    one = rst.convert("Text.\n\n.. math:: a = b,\\qquad\n    c = d\n\nAfter.")
    assert "$$\na = b,\\qquad\nc = d\n$$" in one and "After." in one
    block = rst.convert("    .. math::\n\n        x^2\n\n    More.")
    assert "    $$\n    x^2\n    $$" in block and ".. math::" not in block


def test_roles_become_code_or_inline_math(rst):
    out = rst.convert(":func:`energy.core.attention.energy`, :class:`~energy.base.Energy`, "
                      ":meth:`step <energy.base.Energy.step>`, :math:`\\kappa\n  = 1`")
    assert out == "`energy.core.attention.energy`, `Energy`, `step`, $\\kappa\n  = 1$"


def test_doctest_and_literal_blocks_are_fenced(rst):
    out = rst.convert("Example::\n\n    python -m x\n\n>>> 1 + 1\n2\n\nEnd.")
    assert out.splitlines()[:4] == ["Example:", "", "```text", "python -m x"]
    assert "```pycon\n>>> 1 + 1\n2\n```" in out
