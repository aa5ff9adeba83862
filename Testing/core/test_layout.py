"""The package's layout (README "Layout"): sub-packages by what the parts do, each importing only what is below it.

Read from the source's imports (those inside functions too), not by importing anything."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "MetaSegCore" / "metaseg"
FOLDERS = ("method", "space", "io", "train", "cohort")
API = {"segmenter", "segmentation", "options", "images", "runtime", "evaluate"}
CLI = {"cli", "__main__", "pipeline"}


def module_name(path: Path) -> str:
    parts = ["metaseg", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py")) if "__pycache__" not in p.parts}


def imports_of(name: str) -> set:
    """The package's modules that `name` imports (`from . import x` of a module counts as importing that module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "metaseg"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "metaseg":
                target = node.module
            else:
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found |= set(subs) if subs else {target}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def part(name: str) -> str:
    """metaseg.method.fit -> 'method'; a module at the top is its own part ('segmenter')."""
    rest = name.split(".")[1:]
    return rest[0] if rest else "__init__"


def circles(graph: dict) -> list:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_is_read():
    assert len(MODULES) > 40
    assert all(f"metaseg.{f}" in MODULES for f in FOLDERS)
    assert "metaseg.method.fit" in GRAPH["metaseg.method.segment"]  # the reading works


def test_no_import_circle_between_files():
    assert circles(GRAPH) == []


def test_no_import_circle_between_folders():
    """With each folder one node (and each top-level module its own), the imports still run one way."""
    folded = {}
    for name, deps in GRAPH.items():
        folded.setdefault(part(name), set()).update(part(d) for d in deps if part(d) != part(name))
    assert circles(folded) == []


def below(folder: str, forbidden: set) -> list:
    return sorted(f"{name} -> {dep}" for name, deps in GRAPH.items() if part(name) == folder
                  for dep in deps if part(dep) in forbidden)


def test_method_imports_nothing_above_it():
    """The method (the paper) knows nothing of scans in space, training, cohorts, the API or the command line."""
    assert below("method", {"space", "cohort", "train", "__init__"} | API | CLI) == []


def test_io_imports_nothing_of_the_method():
    assert below("io", {"method", "space", "cohort", "train", "__init__"} | API | CLI) == []


@pytest.mark.parametrize("folder", ["space", "train", "cohort"])
def test_folders_do_not_import_the_command_line(folder):
    assert below(folder, {"cli", "__main__"}) == []


def test_space_imports_neither_training_nor_cohorts():
    assert below("space", {"train", "cohort"}) == []


def test_nothing_below_imports_the_package_face():
    """metaseg/__init__.py imports the API; a part below that needs the version takes it from version.py."""
    assert sorted(name for name, deps in GRAPH.items() if "metaseg" in deps) == []


def test_exit_codes_and_progress_events_are_shared_not_borrowed():
    """Batch takes the exit codes from exit_codes.py, not from the CLI's pipeline; the reporting owns FitProgress."""
    assert "metaseg.exit_codes" in GRAPH["metaseg.cohort.batch"]
    assert "metaseg.exit_codes" in GRAPH["metaseg.pipeline"]
    assert "metaseg.io.progress" in GRAPH["metaseg.method.fit"]
    fit = PKG / "method" / "fit.py"
    progress = PKG / "io" / "progress.py"
    assert "class FitProgress" in progress.read_text(encoding="utf-8")
    assert "class FitProgress" not in fit.read_text(encoding="utf-8")
    from metaseg.exit_codes import EXIT_CANCELLED, EXIT_ERROR, EXIT_OK, EXIT_USAGE

    assert (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CANCELLED) == (0, 1, 2, 3)
