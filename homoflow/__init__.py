"""homoflow: gradient flow and gradient descent on homogeneous models, and their margins.

Implements the quantities and algorithms of Lyu & Li, "Gradient Descent Maximizes the
Margin of Homogeneous Neural Networks" (ICLR 2020). float64 is switched on at import.
"""

import jax

# float64 by default: the science lives at losses of 10^-800 and below (DESIGN §2).
jax.config.update("jax_enable_x64", True)

from . import data, geometry, losses, models, schedules  # noqa: E402
from .descent import RunStopped, descent, record_grid  # noqa: E402
from .diagnostics import Diagnostics, diagnostics  # noqa: E402
from .losses import Loss, cross_entropy, exp_tailed, exponential, logistic  # noqa: E402
from .models import HomogeneityError, Model, check_homogeneity, homogeneous_model  # noqa: E402
from .problem import Problem, make_problem  # noqa: E402
from .trajectory import Trajectory  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "Diagnostics", "HomogeneityError", "Loss", "Model", "Problem", "RunStopped", "Trajectory",
    "check_homogeneity", "cross_entropy", "data", "descent", "diagnostics", "exp_tailed",
    "exponential", "geometry", "homogeneous_model", "logistic", "losses", "make_problem", "models",
    "record_grid", "schedules",
]
