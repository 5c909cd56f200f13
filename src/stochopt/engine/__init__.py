"""The contract between an algorithm's math and its execution (see EngineOptimizer)."""

from stochopt.engine.fused import stage_boundary
from stochopt.engine.layout import STEP, StateSpec, state_nbytes
from stochopt.engine.optimizer import ENGINE_DEFAULTS, EngineOptimizer, NonFiniteGradientError
from stochopt.engine.scalars import scalar
from stochopt.engine.tensorlist import TensorList
from stochopt.engine.update import MatrixUpdate, centralize

__all__ = [
    "ENGINE_DEFAULTS",
    "STEP",
    "EngineOptimizer",
    "MatrixUpdate",
    "NonFiniteGradientError",
    "StateSpec",
    "TensorList",
    "centralize",
    "scalar",
    "stage_boundary",
    "state_nbytes",
]
