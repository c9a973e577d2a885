"""The README and docs/ are one document set: every relative link and image in them resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {github_anchor(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def relative_links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())  # a code block's brackets are code, not links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


def test_the_pages_exist() -> None:
    names = {page.name for page in PAGES[1:]}
    assert {"training.md", "evaluation.md", "benchmarks.md", "reliability.md", "testing.md", "model.md"} <= names


def broken_links(page: Path) -> list[str]:
    """Each relative link or image of `page` whose file (or heading) does not exist, with why."""
    broken = []
    for target in relative_links(page):
        path_part, _, anchor = target.partition("#")
        destination = (page.parent / path_part).resolve() if path_part else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading #{anchor} in {destination.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page: Path) -> None:
    broken = broken_links(page)
    assert not broken, f"{page.name} has broken links: " + "; ".join(broken)


def test_the_link_check_finds_missing_files_and_headings(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# A Title\n[ok](page.md#a-title) [bad anchor](#nowhere) ![gone](missing.png) [web](https://example.org)\n"
        "```\n[code](x)\n```\n"
    )
    assert relative_links(page) == ["page.md#a-title", "#nowhere", "missing.png"]
    assert broken_links(page) == ["#nowhere: no heading #nowhere in page.md", "missing.png: no such file"]


def test_the_readme_stays_a_front_door() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
