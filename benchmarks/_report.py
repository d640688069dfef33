"""Shared by the benchmark scripts: where results go and how they are written."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import jax

# every benchmark imports this module: float64 for all of them, set at program start
# (homoflow itself changes no JAX setting)
jax.config.update("jax_enable_x64", True)

RESULTS = Path(__file__).resolve().parent / "results"


def write_report(report: dict, out: Path, script: str, argv: list[str]) -> None:
    """Add the device and the exact command to ``report``, write it as JSON, say where."""
    report = {**report, "device": jax.devices()[0].device_kind,
              "jax_backend": jax.default_backend(),
              "command": shlex.join(["python", f"benchmarks/{script}", *argv])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
