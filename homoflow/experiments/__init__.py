"""The paper's experiments, as functions with a small configuration and a run directory."""

from . import paper_cnn

EXPERIMENTS = {"paper-cnn": paper_cnn}

__all__ = ["EXPERIMENTS", "paper_cnn"]
