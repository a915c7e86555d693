"""The shape of the code: imports point down the layers, and the installed wheel is one namespace."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Lowest first. A module may import modules of its own package and of any lower layer, never of a
# higher one, nor of another package of its own layer.
LAYERS: list[set[str]] = [
    {"engramflow.home"},
    {"engramflow.editors", "engramflow.storage"},
    {"engramflow.data"},
    {"engramflow.organism"},
    {"engramflow.middle"},  # the modules in MIDDLE: what tasks use besides editors and storage
    {"engramflow.tasks"},
    {"engramflow.flows"},
    {"engramflow.cli"},
]
MIDDLE = {"engramflow.models", "engramflow.ledger", "engramflow.runtime", "engramflow.report", "engramflow.progress"}
# Packages that import nothing of engramflow but themselves: usable on their own, in any environment.
SELF_CONTAINED = {"engramflow.editors", "engramflow.storage"}
# Third-party packages a layer must not import (editors is plain torch: usable without the pipeline).
FORBIDDEN = {"engramflow.editors": ("prefect", "prefect_ray", "ray"), "engramflow.storage": ("prefect", "prefect_ray", "ray")}


def _unit(module: str) -> str:
    """The layer unit a module belongs to: its package under engramflow, or the middle layer."""
    parts = module.split(".")
    top = ".".join(parts[:2])
    if top == "engramflow.__main__":  # `python -m engramflow` is the CLI
        return "engramflow.cli"
    return "engramflow.middle" if top in MIDDLE else top


def _rank(unit: str) -> int:
    for rank, units in enumerate(LAYERS):
        if unit in units:
            return rank
    raise AssertionError(f"{unit} is in no layer of tests/test_structure.py: give it one")


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in a file, lazy ones inside functions included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from engramflow import home` imports the submodule engramflow.home (`__version__` is the root's)
            out += [(node.lineno, f"{base}.{alias.name}" if base == "engramflow" and not alias.name.startswith("__")
                     else base) for alias in node.names]
    return out


def import_violations(root: Path) -> list[str]:
    """Every import under `root/engramflow` that runs against the layers."""
    problems = []
    for path in sorted((root / "engramflow").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if module == "engramflow":
            continue
        unit = _unit(module)
        for line, imported in _imports(path, module):
            top = imported.split(".")[0]
            if top in FORBIDDEN.get(unit, ()):
                problems.append(f"{path.relative_to(root)}:{line}: {unit} imports {imported}")
            if top != "engramflow" or imported == "engramflow":
                continue
            target = _unit(imported)
            if target == unit:
                continue
            if unit in SELF_CONTAINED:
                problems.append(f"{path.relative_to(root)}:{line}: {unit} imports {imported} (it imports only itself)")
            elif _rank(target) >= _rank(unit):
                problems.append(f"{path.relative_to(root)}:{line}: {unit} imports {imported} ({target} is not below it)")
    return problems


def test_imports_point_down_the_layers() -> None:
    assert import_violations(REPO) == []


def test_a_wrong_import_is_caught(tmp_path: Path) -> None:
    """The check is real: an editor importing a task, storage importing the home and editors importing
    Prefect are each reported."""
    shutil.copytree(REPO / "engramflow", tmp_path / "engramflow", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "engramflow" / "editors" / "bad.py").write_text(
        "from engramflow.tasks.edit import edit_batch\nimport prefect\n")
    (tmp_path / "engramflow" / "storage" / "bad.py").write_text("def f():\n    from engramflow import home\n")
    found = import_violations(tmp_path)
    assert len(found) == 3, found
    assert any("editors/bad.py:1" in p and "engramflow.tasks" in p for p in found)
    assert any("editors/bad.py:2" in p and "prefect" in p for p in found)
    assert any("storage/bad.py:2" in p and "engramflow.home" in p for p in found)


def test_the_pipeline_never_branches_on_a_method_name() -> None:
    for folder in ("flows", "tasks"):
        for path in (REPO / "engramflow" / folder).rglob("*.py"):
            assert '"scen"' not in path.read_text(), path


def test_the_wheel_installs_one_top_level_package_and_the_cli_starts(tmp_path: Path) -> None:
    """Build the wheel from a clean copy of the tracked files, install it into a fresh virtualenv (its
    dependencies come from this environment's site-packages, read but not installed), and check that
    `engramflow` is the only top-level name and that the CLI starts outside the checkout."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in tracked:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(wheels),
                    str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("engramflow-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()))
    (site / "_deps.pth").write_text(f"{deps}\n")  # a plain path: this environment's .pth files are not run
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    top_level = sorted(p.name for p in site.iterdir()
                       if not p.name.endswith((".dist-info", ".pth")) and p.name not in ("__pycache__", "bin"))
    assert top_level == ["engramflow"]

    run_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ENGRAMFLOW_HOME")}
    probe = subprocess.run(
        [str(python), "-c", "import engramflow, engramflow.editors.methods as m; print(engramflow.__file__); "
                            "print(sorted(m.load_all()))\n"
                            "for name in ('tasks', 'flows', 'storage', 'editors'):\n"
                            "    try:\n        __import__(name)\n    except ImportError:\n        continue\n"
                            "    raise SystemExit(f'generic top-level module {name} is importable')"],
        cwd=tmp_path, env=run_env, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert str(site) in probe.stdout and "memit" in probe.stdout
    cli = subprocess.run([str(python), "-m", "engramflow", "--help"], cwd=tmp_path, env=run_env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "sequential" in cli.stdout or "run" in cli.stdout


@pytest.mark.parametrize("layer", sorted(u for units in LAYERS for u in units if u != "engramflow.middle"))
def test_every_layer_exists(layer: str) -> None:
    path = REPO / Path(*layer.split("."))
    assert path.is_dir() or path.with_suffix(".py").is_file(), layer
