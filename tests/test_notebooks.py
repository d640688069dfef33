"""The notebooks run top to bottom in a fresh kernel (quick mode, HOMOFLOW_NOTEBOOK_QUICK=1),
and the stored copies carry the outputs of a complete run."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
_spec = importlib.util.spec_from_file_location("notebook_execute", NOTEBOOKS / "execute.py")
runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(runner)
PATHS = runner.notebooks()


@pytest.fixture(scope="module")
def quick_runs():
    # two kernels at a time: most of a quick run is single-threaded XLA compilation
    return runner.execute_all(PATHS, quick=True, workers=2, timeout=600)


def test_there_are_notebooks():
    assert PATHS, f"no notebooks found in {NOTEBOOKS}"


@pytest.mark.slow  # executes all seven notebooks: 160 s of a 1,190-s default run (issue 16)
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_runs_without_a_cell_error_in_quick_mode(path, quick_runs):
    result = quick_runs[path]
    if isinstance(result, Exception):
        raise result
    nb, _ = result
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code)


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_stored_notebook_has_every_output_and_no_error(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), "stored without a full top-to-bottom run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert any(o.get("data", {}).get("image/png") for c in code for o in c.outputs), \
        "no figure stored"
