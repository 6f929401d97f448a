"""The package layout: one `stainbridge` import namespace, and the import rules between its parts."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The networks and the one inference path: what the service loads. They never import training or bench code.
SERVICE_SIDE_MODELS = ["checkpoint", "classifier", "colorization", "colour_generator", "cyclegan", "geometry", "inference",
                       "metrics", "small_resnet"]


def _imports(path: Path) -> set[str]:
    """Every module named by an import statement in one file (at any depth: lazy imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_no_bare_top_level_imports() -> None:
    """No file imports `daemon`, `models` or `migrations` as top-level packages: only `stainbridge.*`."""
    offenders = [f"{path.relative_to(ROOT)}: {name}"
                 for folder in ("daemon", "models", "migrations", "tests")
                 for path in _sources(folder)
                 for name in _imports(path)
                 if name.split(".")[0] in {"daemon", "models", "migrations"}]
    assert offenders == []


def test_models_never_import_daemon() -> None:
    """models/ is a library: nothing in it imports the service."""
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in _sources("models")
                 for name in _imports(path) if name.startswith("stainbridge.daemon")]
    assert offenders == []


def test_daemon_reaches_models_only_through_the_inference_surface() -> None:
    """The service imports `stainbridge.models.inference` and nothing else from models/ (the CLI's command
    table names the training and bench entry points as strings; they run as commands, not as imports)."""
    offenders = [f"{path.relative_to(ROOT)}: {name}" for path in _sources("daemon")
                 for name in _imports(path)
                 if name.startswith("stainbridge.models")
                 and not name.startswith("stainbridge.models.inference")
                 and name != "stainbridge.models"]
    assert offenders == []


def test_service_side_models_never_import_training_or_bench() -> None:
    """The networks and the inference path stand alone, as torchvision's models/ stand apart from its references."""
    offenders = [f"{name}.py: {imported}" for name in SERVICE_SIDE_MODELS
                 for imported in _imports(ROOT / "models" / f"{name}.py")
                 if imported.startswith(("stainbridge.models.training", "stainbridge.models.bench"))]
    assert offenders == []


@pytest.mark.slow
def test_wheel_installs_only_the_stainbridge_namespace(tmp_path: Path) -> None:
    """The built wheel holds `stainbridge/` and its dist-info only, and `stainbridge --help` runs from a
    fresh virtualenv that has that wheel and nothing of the repository on its path."""
    # Build from a copy of what the wheel is made of, so setuptools' build/ folder stays out of the checkout.
    source, dist = tmp_path / "source", tmp_path / "dist"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "daemon", "models", "migrations"):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(source)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr
    wheel = next(dist.glob("stainbridge-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        top = {name.split("/")[0] for name in zf.namelist()}
        names = zf.namelist()
    assert top == {"stainbridge", wheel.name.split("-py3")[0] + ".dist-info"}, top
    assert "stainbridge/migrations/script.py.mako" in names
    assert "stainbridge/models/training/cyclegan.py" in names
    assert "stainbridge/daemon/commands/report.py" in names  # the operator commands ship too
    assert "stainbridge/daemon/templates/report.html.j2" in names

    # A fresh virtualenv without pip; the dependencies come from this environment through a plain path
    # entry (which, unlike a site dir, does not run the editable install's .pth hook).
    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(fresh)
    site = next(fresh.glob("lib/python*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "deps.pth").write_text(f"{deps}\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install",
                              "--no-deps", "-q", str(wheel)], capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "STAINBRIDGE_CONFIG"}}
    helped = subprocess.run([str(fresh / "bin" / "stainbridge"), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "ingest" in helped.stdout
    where = subprocess.run([str(fresh / "bin" / "python"), "-c",
                            "import stainbridge.models.inference as m, importlib.util as u; print(m.__file__); "
                            "print(u.find_spec('daemon'), u.find_spec('models'), u.find_spec('migrations'))"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert where.returncode == 0, where.stderr
    module_file, bare = where.stdout.splitlines()
    assert Path(module_file).is_relative_to(site)
    assert bare == "None None None"
