"""Import boundaries between the repository's folders: bench/ and tests/ share devkit/, so a
benchmark never depends on a test module; the engine (model/) never depends on the training
recipes (training/); devkit/ stays out of the wheel."""
import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def names_from(path: Path, module: str) -> set[str]:
    """The names a file imports with `from module import ...`."""
    return {a.name for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == module
            for a in node.names}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def importers(folder: str, package: str) -> list[str]:
    """Files under `folder` importing `package` or a submodule of it; code held in strings (a
    child process's script) is searched as text."""
    text_import = re.compile(rf"^\s*(from|import)\s+{re.escape(package)}(\.|\s)", re.M)
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        mods = imported_modules(path)
        if any(m == package or m.startswith(package + ".") for m in mods) or text_import.search(path.read_text()):
            found.append(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("folder", ["bench", "devkit"])
def test_no_tests_imports(folder):
    assert importers(folder, "tests") == []


def test_engine_does_not_import_training():
    assert importers("model", "latentd.training") == []


# The direction between the installed packages (docs/CONTRACTS.md): the API and the workers
# meet only in the job contract; the contract and the engine know nothing of either process.
FORBIDDEN = {"jobs": ("latentd.app", "latentd.worker"), "app": ("latentd.worker",),
             "worker": ("latentd.app",), "model": ("latentd.app", "latentd.worker", "latentd.jobs"),
             "config": ("latentd.app", "latentd.worker", "latentd.jobs", "latentd.model")}


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_package_dependency_direction(folder):
    for package in FORBIDDEN[folder]:
        assert importers(folder, package) == [], f"{folder}/ must not import {package}"


def test_no_import_cycles_between_modules():
    """No two modules of the installed packages import each other, directly or through others."""
    graph = {}
    for folder in ("app", "worker", "jobs", "model", "config", "training", "latentd"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "__init__.py":      # packages: importing one of their modules is no edge
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            graph[".".join(parts if parts[0] == "latentd" else ["latentd", *parts])] = path
    # `from latentd.jobs import keys` names the module latentd.jobs.keys
    edges = {n: {m for imp in imported_modules(p) for m in (imp, *(f"{imp}.{a}" for a in names_from(p, imp)))
                 if m in graph and m != n} for n, p in graph.items()}
    seen, on_path = set(), []

    def visit(n):
        if n in on_path:
            cycle = on_path[on_path.index(n):] + [n]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if n in seen:
            return
        on_path.append(n)
        for m in sorted(edges[n]):
            visit(m)
        on_path.pop()
        seen.add(n)

    for n in sorted(graph):
        visit(n)


def test_every_package_folder_is_in_the_wheel():
    """The wheel lists its packages explicitly (the folders map into latentd.*): a new package
    folder missing from pyproject.toml would import from the source tree and fail when installed."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    where = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for folder in ("app", "worker", "jobs", "model", "config", "training", "latentd"):
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            top = where.get(parts[0], "latentd" if parts[0] == "latentd" else None)
            found.add(".".join([top, *parts[1:]]))
    assert found <= set(cfg["packages"]), sorted(found - set(cfg["packages"]))


def test_devkit_not_in_the_wheel():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert not any("devkit" in p for p in cfg["packages"])
    assert "devkit" not in " ".join(cfg["package-dir"].values())


def test_images_copy_every_package_folder():
    """Both images install the package from /app (editable), which fails on a package-dir folder
    the image lacks."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    text = (ROOT / "Dockerfile").read_text()
    for stage in text.split("\nFROM ")[1:]:
        copied = set(re.findall(r"^COPY (\S+) \./\S+$", stage, re.M))
        missing = {d for d in cfg["package-dir"].values() if d not in copied}
        assert not missing, (stage.split()[2], missing)


def test_bench_script_imports_devkit_from_the_repository():
    """A bench script run as `python bench/x.py` (sys.path[0] is bench/, whatever the working
    directory) finds devkit: --help runs after its module-level devkit imports."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "admission.py"), "--help"], cwd="/",
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
