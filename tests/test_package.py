"""The installed package: one import namespace, no bare top-level modules, no upward imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("model", "server", "weights", "kernels")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", FOLDERS)
def test_folders_import_only_under_the_namespace(name, tmp_path):
    # Outside the checkout, the bare name is not ours (`kernels` is a PyPI package transformers requires); the
    # namespaced one is.
    bare = run_python(f"import {name}; print({name}.__file__)", tmp_path)
    if bare.returncode == 0:
        assert Path(bare.stdout.strip()).resolve().parent != REPO / name, bare.stdout
    else:
        assert "No module named" in bare.stderr, bare.stderr
    full = run_python(f"import avatar_forcing.{name}", tmp_path)
    assert full.returncode == 0, full.stderr


@pytest.mark.parametrize("name", ["model", "server", "weights"])
def test_bare_import_from_the_checkout_says_what_to_do(name):
    # Inside the checkout the folder is on sys.path; importing it by its bare name fails with the fix.
    bare = run_python(f"import {name}", REPO)
    assert bare.returncode != 0
    assert f"import avatar_forcing.{name}, not {name}" in bare.stderr


def test_run_from_the_checkout_transformers_finds_its_own_kernels_package():
    # `python -m avatar_forcing.cli` from the checkout puts its root first on sys.path, where kernels/ would shadow
    # the PyPI `kernels` that transformers (>= 5.25) imports while loading wav2vec2.
    done = run_python("import importlib.util, avatar_forcing.model.audio_encoder; "
                      "print(getattr(importlib.util.find_spec('kernels'), 'origin', ''))", REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).resolve() != REPO / "kernels" / "__init__.py", done.stdout


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    package = ["avatar_forcing", *parts[:-1]] if parts[0] in FOLDERS else list(parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return names


@pytest.mark.parametrize("folder, forbidden", [
    ("model", ("avatar_forcing.weights", "avatar_forcing.server", "avatar_forcing.generate",
               "avatar_forcing.bench", "avatar_forcing.cli")),
    ("kernels", ("avatar_forcing.model", "avatar_forcing.weights", "avatar_forcing.server")),
    ("weights", ("avatar_forcing.server", "avatar_forcing.generate", "avatar_forcing.bench")),
])
def test_no_upward_imports(folder, forbidden):
    offenders = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for name in imported_modules(path):
            if name.startswith(forbidden):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_every_public_class_of_the_networks_and_engine_has_a_docstring():
    missing = []
    folders = (REPO / "model", REPO / "model" / "engine", REPO / "kernels")
    files = [path for folder in folders for path in folder.glob("*.py")]
    for path in sorted(files):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and not ast.get_docstring(node):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
    assert not missing, "public classes without a docstring:\n" + "\n".join(missing)
