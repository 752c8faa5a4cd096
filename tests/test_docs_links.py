"""The README and the pages under docs/ link only to what exists.

Every relative link and image in README.md and docs/*.md must name an existing file (or folder),
and a `#anchor` into a markdown file must name one of its headings (GitHub's slugs). Links
inside code blocks and code spans are text, not links; links with a scheme are not followed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans (a code span's text stays for headings)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(path.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    problems = []
    for target in LINK.findall(CODE_SPAN.sub("", prose(page.read_text()))):
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            problems.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            problems.append(f"{target}: no heading with the anchor #{anchor} in {linked.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_image_resolves(page):
    assert not broken_links(page), "\n".join(broken_links(page))


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_each_page_opens_with_its_title_and_what_it_covers(page):
    lines = page.read_text().splitlines()
    assert lines[0].startswith("# ") and not lines[1].strip()
    assert lines[2].strip() and not lines[2].startswith(("#", "|", "```", "-", "!")), \
        f"{page.name}: the title is followed by a paragraph saying what the page covers"


def test_the_readme_lists_every_page():
    readme = (ROOT / "README.md").read_text()
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme] == []


def test_the_check_finds_what_is_broken(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Routes and `keys`\n\n## Routes and `keys`\n")
    (tmp_path / "img.png").write_bytes(b"")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\nIntro [ok](other.md#routes-and-keys) [ok too](other.md#routes-and-keys-1) ![img](img.png)\n"
        "[here](#page) [web](https://example.com/x.md) `[in code](nowhere.md)`\n\n"
        "```\n[in a block](nowhere.md)\n```\n\n"
        "[gone](missing.md) ![gone](img/missing.png) [bad anchor](other.md#nope) [self](#nope)\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "img/missing.png: no such file",
        "other.md#nope: no heading with the anchor #nope in other.md",
        "#nope: no heading with the anchor #nope in page.md",
    ]
