"""The README is a front page that reads in minutes, and every relative link in it and in docs/ leads somewhere: the
file exists and, for `#anchor`, the page has that heading (GitHub's anchors). Every page under docs/ is reachable
from the README."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def outside_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code."""
    return re.sub(r"`[^`\n]*`", "", outside_code_blocks(text))


def anchors(page: Path) -> set:
    """GitHub's anchor of each heading: lower case, punctuation dropped, spaces as hyphens; repeats get -1, -2."""
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", outside_code_blocks(page.read_text()), flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def relative_links(page: Path) -> list:
    return [target for target in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.relative_to(ROOT)}")
    assert broken == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A `code` heading: here\n\n## Twice\n\n## Twice\n\n[a](#a-code-heading-here) [b](#twice-1) "
                    "[c](other.md#x) `[d](ignored.md)` [e](https://example.com)\n")
    assert anchors(page) == {"a-code-heading-here", "twice", "twice-1"}
    assert relative_links(page) == ["#a-code-heading-here", "#twice-1", "other.md#x"]


def test_the_readme_is_a_front_page_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(ROOT / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []
    assert (ROOT / "BENCHMARKS.md").resolve() in linked
