"""Packaging hygiene: importing homoflow changes no JAX setting, float32 is refused with the
line that enables float64, every imported third-party package is declared."""

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_NO_X64 = """
import jax
import homoflow
from homoflow import data, losses, models
assert not jax.config.jax_enable_x64, "import homoflow switched on jax_enable_x64"
X, y = data.linearly_separable(8, 3, 0)
try:
    homoflow.make_problem(models.linear(3), losses.exponential(), X, y)
except RuntimeError as e:
    print(e)
else:
    raise SystemExit("make_problem accepted float32 mode")
"""


def test_import_leaves_x64_off_and_make_problem_names_the_line_that_enables_it():
    env = {k: v for k, v in __import__("os").environ.items() if k != "JAX_ENABLE_X64"}
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run([sys.executable, "-c", _NO_X64], env=env, capture_output=True,
                         text=True, timeout=120, check=False, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    assert 'jax.config.update("jax_enable_x64", True)' in res.stdout
    assert "make_problem needs float64" in res.stdout


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    names = set()
    for path in (ROOT / "homoflow").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - stdlib - {"homoflow"}


# import name -> distribution name where they differ
_DIST = {"sklearn": "scikit-learn", "yaml": "pyyaml"}


def test_every_package_homoflow_imports_is_declared_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + sum(project["optional-dependencies"].values(), [])
    names = {d.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0]
             .strip().lower().replace("_", "-") for d in declared}
    missing = sorted(m for m in _third_party_imports()
                     if _DIST.get(m, m).lower().replace("_", "-") not in names)
    assert not missing, f"imported by homoflow/ but not declared in pyproject.toml: {missing}"


def test_the_package_ships_its_license_and_type_marker():
    assert (ROOT / "homoflow" / "py.typed").is_file()
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == \
        {"text": "MIT"}
