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
"""

from . import data, geometry, losses, models, schedules
from .descent import RunStopped, descent, record_grid
from .diagnostics import Diagnostics, diagnostics
from .losses import Loss, cross_entropy, exp_tailed, exponential, logistic
from .models import HomogeneityError, Model, check_homogeneity, homogeneous_model
from .problem import Problem, make_problem, require_float64
from .trajectory import Trajectory

__version__ = "0.1.0"

__all__ = [
    "Diagnostics", "HomogeneityError", "Loss", "Model", "Problem", "RunStopped", "Trajectory",
    "check_homogeneity", "cross_entropy", "data", "descent", "diagnostics", "exp_tailed",
    "exponential", "geometry", "homogeneous_model", "logistic", "losses", "make_problem", "models",
    "record_grid", "require_float64", "schedules",
]
