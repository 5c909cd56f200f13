"""Training techniques that wrap a model or an optimizer: weight averaging (SWA, EMA)."""

from stochopt.training.averaging import EMA, SWA

__all__ = ["EMA", "SWA"]
