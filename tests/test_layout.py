"""The folders tell the architecture: sd/ and sd3/ (the networks and their checkpoints) know nothing of
segmentation; method/ is the paper's method only (no post-processing, filter, evaluation, pictures or
files); crf/ (the dense CRF) stands alone; explorer/ (the web page's state, views and page) is used by
the command line only; and no library module depends on the command line. Checked on the import
statements of every module, so a forbidden import fails here even if it is never executed by another test."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minidiffseg"


def imported_packages(path: Path, source: str | None = None) -> set[str]:
    """The absolute dotted names of every module that `path` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # the package a relative import starts from (for __init__.py too)
    names = set()
    tree = ast.parse(source if source is not None else path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # `from .. import cli` imports a module too
    return names


def modules(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py")) if folder else sorted(PACKAGE.rglob("*.py"))


def forbidden(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(n for n in imported_packages(path) if n.startswith(prefixes))


def under(*modules: str) -> tuple[str, ...]:
    """The dotted prefixes of minidiffseg's `modules`."""
    return tuple(f"minidiffseg.{m}" for m in modules)


@pytest.mark.parametrize("path", modules("sd") + modules("sd3"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_sd_knows_nothing_of_segmentation(path):
    bad = forbidden(path, under("method", "cli", "filter", "evaluation", "crf", "explorer", "outputs",
                                "class_source", "viz"))
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}: minidiffseg/sd and sd3 must stand alone"


@pytest.mark.parametrize("path", modules("method"), ids=lambda p: p.name)
def test_method_is_the_paper_only(path):
    bad = forbidden(path, under("crf", "explorer", "filter", "evaluation", "cli", "outputs", "class_source", "viz"))
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}: minidiffseg/method is DiffSegmenter itself"


@pytest.mark.parametrize("path", modules("crf"), ids=lambda p: p.name)
def test_the_crf_stands_alone(path):
    bad = sorted(n for n in imported_packages(path)
                 if n.startswith("minidiffseg") and not n.startswith(under("crf", "errors")))
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}: minidiffseg/crf needs only errors.py"


@pytest.mark.parametrize("path", [p for p in modules("") if p.relative_to(PACKAGE).parts[0] not in ("cli", "explorer")],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_only_the_command_line_imports_the_explorer(path):
    bad = forbidden(path, under("explorer"))
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}: the explorer is an app of the command line"


@pytest.mark.parametrize("path", [p for p in modules("") if p.relative_to(PACKAGE).parts[0] not in ("cli", "__main__.py")],
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_library_does_not_import_the_command_line(path):
    bad = forbidden(path, ("minidiffseg.cli",))
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}: only minidiffseg/cli may import cli"


def test_the_import_resolver_sees_a_forbidden_import():
    """The checks above can fail: imports written every way resolve to the module they name."""
    path = PACKAGE / "method" / "segmenter.py"
    source = "from ..cli import options\nfrom .. import cli\nimport minidiffseg.cli.segment\nfrom .fusion import fuse\n"
    names = imported_packages(path, source)
    assert {"minidiffseg.cli", "minidiffseg.cli.options", "minidiffseg.cli.segment", "minidiffseg.method.fusion"} <= names
    assert forbidden(path, ("minidiffseg.cli",)) == []  # the real file is clean
    assert imported_packages(PACKAGE / "sd" / "__init__.py", "from .checkpoint import load_sd") == \
        {"minidiffseg.sd.checkpoint", "minidiffseg.sd.checkpoint.load_sd"}


def test_sd_modules_import_no_circle():
    """No module of sd/ reaches itself through its imports (ldm.py and openclip.py once imported each other
    for one helper, now in names.py): each module sits above the ones it uses."""
    mods = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts): p
            for p in modules("sd") if p.name != "__init__.py"}
    graph = {m: sorted(n for n in imported_packages(p) if n in mods and n != m) for m, p in mods.items()}
    done: set[str] = set()

    def circle(module: str, path: list[str]) -> list[str] | None:  # depth first: a module met again on the path
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        found = next((c for n in graph[module] if (c := circle(n, path + [module]))), None)
        done.add(module)
        return found

    found = next((c for m in graph if (c := circle(m, []))), None)
    assert found is None, f"import circle in minidiffseg/sd: {' -> '.join(found)}"
