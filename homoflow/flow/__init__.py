"""Gradient flow d theta/dt = -grad L(theta), in original time and then in log-polar time.

Phase 1 (``phase1``): an adaptive diffrax solve in original time until t0, when L falls
below the separability threshold. Phase 2 (DESIGN §3): the exact log-polar system
(``polar``: field, state, Lemma 5.1's rates) integrated by a Rosenbrock W-method and its
controller (``ros2``, configured by ``PolarConfig``), sliding along the kinks of (leaky)
ReLU first layers (``sliding``); ``audit`` holds Lemma 5.1's check and the recorder, and
``driver`` the entry points ``flow`` and ``flow_batch``.

``euler`` (explicit Euler = descent with a constant step) lives in ``homoflow.descent`` and
``align`` in ``homoflow.compare``; both stay importable from here.
"""

from ..compare import align
from .audit import polar_rates
from .driver import flow, flow_batch
from .phase1 import Phase1Config
from .ros2 import PolarConfig

__all__ = ["Phase1Config", "PolarConfig", "align", "euler", "flow", "flow_batch",
           "polar_rates"]


def __getattr__(name):
    # euler is descent with a constant step; imported on use so that the flow package
    # does not import the descent engine
    if name == "euler":
        from ..descent import euler
        return euler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
