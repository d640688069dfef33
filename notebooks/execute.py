"""Execute the notebooks in this folder top to bottom in a fresh kernel.

    python notebooks/execute.py               # full size; outputs written back into each .ipynb
    python notebooks/execute.py --quick       # HOMOFLOW_NOTEBOOK_QUICK=1: small sizes, nothing written
    python notebooks/execute.py 02_flow_vs_descent.ipynb   # some of them

Each notebook runs in its own kernel on this interpreter (``sys.executable``, through a
kernel spec written to a temporary folder, so no Jupyter configuration is needed) with a
temporary working directory, so the runs it saves do not land in the repository. A cell
error stops that notebook and makes the command exit with status 1. The test suite
(``tests/test_notebooks.py``) calls ``execute`` in quick mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK_ENV = "HOMOFLOW_NOTEBOOK_QUICK"


def notebooks() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def _kernel_manager(scratch: Path):
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = scratch / "kernels" / "homoflow-python"
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    return KernelManager(kernel_name="homoflow-python",
                         kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def execute(path, *, quick: bool, write: bool = False, timeout: int = 1800):
    """Run the notebook at ``path``; return (executed notebook, wall seconds).

    Raises nbclient's CellExecutionError on the first failing cell. ``quick`` sets
    HOMOFLOW_NOTEBOOK_QUICK=1 in the kernel's environment (passed to the kernel, not set
    here, so several notebooks may run at once from threads); ``write`` stores the
    outputs back into ``path``.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, **{QUICK_ENV: "1" if quick else "0"})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        work = scratch / "work"
        work.mkdir()
        client = NotebookClient(nb, km=_kernel_manager(scratch), timeout=timeout,
                                resources={"metadata": {"path": str(work)}})
        client.execute(env=env)
    wall = time.perf_counter() - start
    if write:
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        nbformat.write(nb, path)
    return nb, wall


def execute_all(paths, *, quick: bool, workers: int = 2, timeout: int = 1800) -> dict:
    """Run several notebooks, ``workers`` at a time (each in its own kernel process);
    return {path: (notebook, wall seconds) or the exception it raised}."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path):
        try:
            return execute(path, quick=quick, timeout=timeout)
        except Exception as e:  # noqa: BLE001 — any failure is reported per notebook by the caller
            return e

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"small sizes ({QUICK_ENV}=1); outputs are not written back")
    args = parser.parse_args(argv)
    paths = [HERE / n for n in args.names] if args.names else notebooks()
    failed = []
    for path in paths:
        try:
            _, wall = execute(path, quick=args.quick, write=not args.quick)
            print(f"{path.name}: ok in {wall:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001 — report every notebook, then fail
            failed.append(path.name)
            print(f"{path.name}: FAILED\n{e}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
