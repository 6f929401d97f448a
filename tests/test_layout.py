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


# The daemon's stages in import order (daemon/__init__.py): a module imports only from its own stage and the
# stages before it. "" is the foundation beside the stages (config, logs, store, schema, diskspace).
DAEMON_STAGES = ["", "intake", "versions", "pipeline", "retraining", "lab", "service", "commands", "cli"]


def _daemon_graph() -> dict[str, set[str]]:
    """daemon module -> the daemon modules it imports (any depth: lazy and TYPE_CHECKING imports count)."""
    modules = {}
    for path in _sources("daemon"):
        parts = path.relative_to(ROOT / "daemon").with_suffix("").parts
        name = ".".join(("stainbridge", "daemon", *parts))
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "stainbridge.daemon":
                    graph[name].add(target)
    return graph


def _stage(module: str) -> int:
    parts = module.split(".")[2:]
    first = parts[0] if parts else ""
    return DAEMON_STAGES.index(first) if first in DAEMON_STAGES else 0


def test_daemon_imports_have_no_loops() -> None:
    """No import loop between daemon modules, `if TYPE_CHECKING:` and lazy imports included."""
    graph = _daemon_graph()
    state: dict[str, int] = {}
    loops: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loops.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert loops == []


def test_daemon_stages_import_only_earlier_stages() -> None:
    """intake never imports the pipeline, the pipeline never the service, and so on (daemon/__init__.py)."""
    graph = _daemon_graph()
    offenders = [f"{module} -> {target}" for module, targets in sorted(graph.items()) for target in sorted(targets)
                 if _stage(target) > _stage(module)]
    assert offenders == []


def test_every_daemon_stage_says_what_it_holds_and_may_import() -> None:
    """Each stage package opens with a docstring naming its modules and what it may import."""
    for stage in DAEMON_STAGES[1:-1]:
        init = ROOT / "daemon" / stage / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init} has no docstring"
        if stage != "commands":
            assert "May import" in doc, f"{init}: say what the stage may import"


# The commands a lab runs to look, not to classify: they must answer in a second, without torch (seconds to import).
READ_ONLY_COMMANDS = ["status", "report", "export", "review", "sites", "models", "init", "backup", "restore"]


def test_read_only_commands_do_not_import_torch() -> None:
    """`stainbridge status` on a loaded lab workstation took 12-22 s when it imported torch through a type hint."""
    modules = ", ".join(f"stainbridge.daemon.commands.{name}" for name in READ_ONLY_COMMANDS)
    code = f"import sys, importlib\nfor m in '{modules}'.split(', '): importlib.import_module(m)\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "False"


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
    assert "stainbridge/daemon/lab/templates/report.html.j2" in names
    assert "stainbridge/daemon/pipeline/runner.py" in names  # the stage sub-packages ship too

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
