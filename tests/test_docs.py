"""The docs hold together: README.md stays a short front page, links and anchors resolve, named paths exist."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

from stainbridge.daemon.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`]*`")
REPO_PATH = re.compile(r"(?<![\w./-])((?:daemon|models|tests|config|migrations)/[\w./-]*)")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(page: Path) -> list[tuple[int, str]]:
    """The page's lines outside ``` blocks, numbered from 1."""
    lines, fenced = [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def github_slug(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading anchor of a page, with GitHub's -1, -2 ... suffixes for repeated titles."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in prose_lines(page):
        match = re.match(r"#{1,6} (.+)", line)
        if not match:
            continue
        slug = github_slug(match.group(1))
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def test_readme_stays_a_short_front_page() -> None:
    """README.md is under 220 lines: details belong in docs/."""
    lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move details to a page in docs/"


def test_relative_links_resolve_to_files_and_headings() -> None:
    """Every relative link in README.md and docs/*.md names an existing file, and every #anchor a heading there."""
    broken = []
    for page in pages():
        for number, line in prose_lines(page):
            for target in LINK.findall(INLINE_CODE.sub("", line)):
                if re.match(r"[a-z]+:", target):
                    continue
                path_part, _, anchor = target.partition("#")
                linked = (page.parent / path_part).resolve() if path_part else page
                where = f"{page.relative_to(ROOT)}:{number}: {target}"
                if not linked.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                    broken.append(f"{where} (no heading with that anchor in {linked.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_paths_named_in_the_docs_exist() -> None:
    """Every repository path a page names in inline code (daemon/..., models/..., tests/...) exists."""
    missing = []
    for page in pages():
        for number, line in prose_lines(page):
            for code in INLINE_CODE.findall(line):
                for path in REPO_PATH.findall(code):
                    if not (ROOT / path.rstrip(".,")).exists():
                        missing.append(f"{page.relative_to(ROOT)}:{number}: {path}")
    assert not missing, "paths that do not exist (moved or renamed?):\n" + "\n".join(missing)


def test_configuration_page_names_every_setting() -> None:
    """docs/configuration.md's table of sections has a row per section naming each of its keys."""
    rows = {line.split("|")[1].strip(): line for line in (ROOT / "docs" / "configuration.md").read_text(
        encoding="utf-8").splitlines() if line.startswith("| `[")}
    absent = [f"[{section}] {field.name}" for section, settings in SECTIONS.items() for field in fields(settings)
              if f"`{field.name}`" not in rows.get(f"`[{section}]`", "")]
    assert not absent, f"docs/configuration.md does not name: {', '.join(absent)}"
