"""Every citation of a design document points at something that exists.

The code cites its documentation as `<file>.md §N` or `<file>.md §N.M`, optionally followed by quoted
names of what it means inside that section: `docs/design.md §5 "filter"`, `§3, §5 "BLIP" row`,
`§5 "output", "decision"`. For each citation found in minidiffseg/, bench/ and tests/ (*.py), in
README.md, bench/README.md and docs/*.md, the cited file must exist (a path from the repository root,
or a bare file name that matches exactly one tracked .md file), have a heading `## N.` (and `### N.M`
for a subsection), and every quoted name must occur in that section's text. No file may cite the
original specification (the DESIGN file in ../shared), which is not part of the repository.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CITING = ["minidiffseg/**/*.py", "bench/**/*.py", "tests/**/*.py", "README.md", "bench/README.md", "docs/*.md"]

# `docs/design.md` followed by one or more `§N[.M]`, each optionally followed by quoted names;
# separators between them: spaces, commas and "and"
_SECTION = r'§\d+(?:\.\d+)?'
_NAME = r'"[^"\n]+"'
_SEP = r'\s*(?:,|and)?\s*'
CITATION = re.compile(rf'(?P<file>[\w./-]*\w\.md)(?P<refs>(?:{_SEP}{_SECTION}(?:{_SEP}{_NAME})*)+)')
TOKEN = re.compile(rf'(?P<section>{_SECTION[1:]})|"(?P<name>[^"\n]+)"')
# citations of the original specification, which lives outside the repository
FORBIDDEN = re.compile(r'DESIGN\.md|DESIGN\s+§|\.\./shared/[\w./-]*\.md|shared/DESIGN')


@dataclass
class Citation:
    where: str  # "path:line" of the citing text
    file: str  # the cited .md file as written
    section: str  # "5" or "7.2"
    names: list[str]

    def __str__(self) -> str:
        names = "".join(f' "{n}"' for n in self.names)
        return f"{self.where}: {self.file} §{self.section}{names}"


def citing_files(repo: Path = REPO) -> list[Path]:
    found = {p for pattern in CITING for p in repo.glob(pattern) if p.is_file()}
    return sorted(p for p in found if ".venv" not in p.parts)


def find_citations(text: str, where: str) -> list[Citation]:
    """Every citation in `text`; `where` names the file (line numbers are added)."""
    out = []
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        current = None
        for t in TOKEN.finditer(m.group("refs")):
            if t.group("section"):
                current = Citation(f"{where}:{line}", m.group("file"), t.group("section"), [])
                out.append(current)
            else:
                current.names.append(t.group("name"))
    return out


def markdown_files(repo: Path = REPO) -> list[str]:
    """The repository's .md files (tracked or not yet, but never ignored), relative to the root."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
                                cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every .md outside .venv
        listed = [str(p.relative_to(repo)) for p in repo.rglob("*.md") if ".venv" not in p.parts]
    return sorted(listed)


def resolve(file: str, repo: Path = REPO, docs: list[str] | None = None) -> tuple[Path | None, str]:
    """The cited file, or None and why not."""
    path = repo / file
    if "/" in file:
        return (path, "") if path.is_file() else (None, f"{file} does not exist in the repository")
    docs = markdown_files(repo) if docs is None else docs
    same = [d for d in docs if Path(d).name == file]
    if len(same) == 1:
        return repo / same[0], ""
    if not same:
        return None, f"no .md file named {file} in the repository"
    return None, f"{file} is ambiguous ({', '.join(same)}): cite it by its path"


def section_text(doc: str, section: str) -> str | None:
    """The text of `## N.` (up to the next `## ` heading), or of `### N.M` inside it; None if absent."""
    top, _, sub = section.partition(".")
    lines = doc.splitlines()
    start = next((i for i, ln in enumerate(lines) if re.match(rf'## {top}(\.|\s)', ln)), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = lines[start:end]
    if sub:
        first = next((i for i, ln in enumerate(body) if re.match(rf'### {top}\.{sub}(\.|\s)', ln)), None)
        if first is None:
            return None
        last = next((i for i in range(first + 1, len(body)) if body[i].startswith("### ")), len(body))
        body = body[first:last]
    return "\n".join(body)


def problems(citations: list[Citation], repo: Path = REPO) -> list[str]:
    """One line per citation that points at nothing: which file:line cites what, and what is missing."""
    docs = markdown_files(repo)
    out = []
    for c in citations:
        path, why = resolve(c.file, repo, docs)
        if path is None:
            out.append(f"{c}: {why}")
            continue
        text = section_text(path.read_text(encoding="utf-8"), c.section)
        if text is None:
            heading = f"## {c.section}." if "." not in c.section else f"### {c.section}"
            out.append(f"{c}: {path.relative_to(repo)} has no heading '{heading}'")
            continue
        for name in c.names:
            if name not in text:
                out.append(f'{c}: "{name}" does not occur in §{c.section} of {path.relative_to(repo)}')
    return out


def all_citations(repo: Path = REPO) -> list[Citation]:
    out = []
    for p in citing_files(repo):
        out += find_citations(p.read_text(encoding="utf-8"), str(p.relative_to(repo)))
    return out


def test_every_citation_points_at_an_existing_section():
    cites = all_citations()
    assert len(cites) >= 20, f"only {len(cites)} citations found: is the pattern still right?"
    assert any(c.file == "docs/design.md" and c.names for c in cites)
    bad = problems(cites)
    assert not bad, f"{len(bad)} citation(s) point at nothing:\n" + "\n".join(bad)


def test_nothing_cites_the_specification_outside_the_repository():
    bad = []
    for p in citing_files():
        if p == Path(__file__).resolve():  # this file spells the forbidden forms out, as examples
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if FORBIDDEN.search(line):
                bad.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not bad, "cite docs/design.md (in the repository) instead:\n" + "\n".join(bad)


S = "\u00a7"  # the section sign, spelled out so that the made-up citations below are not read as real ones


def test_citation_forms_are_parsed():
    md = "docs/design.md"
    text = (f'a ({md} {S}3 "Tokenizer"), b ({md} {S}5, {S}6), c ({md} {S}3, {S}5 "BLIP" row),\n'
            f'd ({md} {S}5 "output", "decision"), e ({md} {S}5 "filter" and\n"BLIP" rows), f (README.md {S}2.1)')
    got = [(c.where, c.file, c.section, c.names) for c in find_citations(text, "x.py")]
    assert got == [("x.py:1", md, "3", ["Tokenizer"]), ("x.py:1", md, "5", []), ("x.py:1", md, "6", []),
                   ("x.py:1", md, "3", []), ("x.py:1", md, "5", ["BLIP"]),
                   ("x.py:2", md, "5", ["output", "decision"]), ("x.py:2", md, "5", ["filter", "BLIP"]),
                   ("x.py:3", "README.md", "2.1", [])]


def test_the_checker_reports_what_is_missing(tmp_path):
    """The check can fail: a missing file, section, subsection and name are each reported with the
    citing file:line; a bare file name is resolved when exactly one .md file has it."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text('# Guide\n\n## 1. Intro\n\nThe "alpha" part.\n\n'
                                                '## 2. More\n\n### 2.1 Detail\n\nbeta\n', encoding="utf-8")
    md = "docs/guide.md"
    text = "\n".join([f'{md} {S}1 "alpha"', f'{md} {S}2.1 "beta"', f"guide.md {S}2",  # these exist
                      f"{md} {S}9", f"{md} {S}2.7", f'{md} {S}1 "beta"', f"docs/absent.md {S}1"])
    report = problems(find_citations(text, "code.py"), tmp_path)
    assert report == [
        f"code.py:4: {md} {S}9: {md} has no heading '## 9.'",
        f"code.py:5: {md} {S}2.7: {md} has no heading '### 2.7'",
        f'code.py:6: {md} {S}1 "beta": "beta" does not occur in {S}1 of {md}',
        f"code.py:7: docs/absent.md {S}1: docs/absent.md does not exist in the repository",
    ], report
    (tmp_path / "guide.md").write_text("## 2. Other\n", encoding="utf-8")
    assert problems(find_citations(f"guide.md {S}2", "c.py"), tmp_path) == \
        [f"c.py:1: guide.md {S}2: guide.md is ambiguous (docs/guide.md, guide.md): cite it by its path"]


@pytest.mark.parametrize("line", [f"see DESIGN.md {S}4", f"(DESIGN {S}7.2)", f"../shared/DESIGN.md {S}6",
                                  "../shared/STYLE" + ".md"])
def test_citations_of_the_specification_are_caught(line):
    assert FORBIDDEN.search(line)
