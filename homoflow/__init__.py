"""homoflow: gradient flow and gradient descent on homogeneous models, and their margins.

Implements the quantities and algorithms of Lyu & Li, "Gradient Descent Maximizes the
Margin of Homogeneous Neural Networks" (ICLR 2020).

homoflow computes in float64 (the science lives at losses of 10^-800 and below, DESIGN §2)
but, like every JAX library, leaves JAX's global settings alone: enable float64 once where
your program starts, before any array is made,

    import jax
    jax.config.update("jax_enable_x64", True)

(or set JAX_ENABLE_X64=1). The ``homoflow`` command, the notebooks and the tests do this;
``make_problem`` refuses to build a problem without it, naming that line.

The public names load lazily (PEP 562): ``import homoflow`` does not import JAX until a
name that needs it is used, so the ``homoflow`` command answers ``--help`` at once.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_SUBMODULES = ("data", "geometry", "losses", "models", "schedules", "configs", "io", "flow",
               "sweep", "kkt", "plots", "descent", "diagnostics", "problem", "trajectory")
_NAMES = {
    "RunStopped": "descent", "descent": "descent", "record_grid": "descent",
    "Diagnostics": "diagnostics", "diagnostics": "diagnostics",
    "Loss": "losses", "cross_entropy": "losses", "exp_tailed": "losses",
    "exponential": "losses", "logistic": "losses",
    "HomogeneityError": "models", "Model": "models", "check_homogeneity": "models",
    "homogeneous_model": "models",
    "Problem": "problem", "make_problem": "problem", "require_float64": "problem",
    "Trajectory": "trajectory",
}

__all__ = [
    "Diagnostics", "HomogeneityError", "Loss", "Model", "Problem", "RunStopped", "Trajectory",
    "check_homogeneity", "cross_entropy", "data", "descent", "diagnostics", "exp_tailed",
    "exponential", "geometry", "homogeneous_model", "logistic", "losses", "make_problem", "models",
    "record_grid", "require_float64", "schedules",
]


# ``homoflow.descent`` and ``homoflow.diagnostics`` are the functions, as ``from .descent
# import descent`` made them; importing the submodules must not rebind them to the modules
_SHADOWED = ("descent", "diagnostics")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'homoflow' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES) | set(_SUBMODULES))
