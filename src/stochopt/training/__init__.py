"""Training techniques for any torch.optim optimizer in a plain PyTorch loop: learning-rate schedules,
gradient clipping, gradient accumulation, batch-size ramps, mixed precision with master weights, parameter
groups, and weight averaging (SWA, EMA)."""

from stochopt.engine.statistics import flat_statistics, write_statistics
from stochopt.training.accumulation import accumulate_gradients, batch_size, split_batch
from stochopt.training.averaging import EMA, SWA
from stochopt.training.clipping import ClipResult, adaptive_clip_grad_, clip_gradients, unitwise_norm
from stochopt.training.decay_schedule import WeightDecaySchedule
from stochopt.training.in_backward import StepInBackward
from stochopt.training.param_groups import default_no_decay, layer_ids, param_groups
from stochopt.training.precision import MasterWeights, MixedPrecision, TrainingMemory
from stochopt.training.ramp import BatchSizeRamp, RampBatchSampler
from stochopt.training.schedules import (
    SCHEDULES,
    InverseSqrtLR,
    WarmupDecayLR,
    WarmupStableDecayLR,
    inverse_sqrt_factor,
    plot_schedules,
    schedule_curve,
    warmup_decay_factor,
    warmup_stable_decay_factor,
)

__all__ = [
    "EMA", "SWA", "accumulate_gradients", "batch_size", "split_batch", "ClipResult", "adaptive_clip_grad_",
    "clip_gradients", "unitwise_norm", "default_no_decay", "layer_ids", "param_groups", "MasterWeights",
    "MixedPrecision", "TrainingMemory", "BatchSizeRamp", "RampBatchSampler", "SCHEDULES", "InverseSqrtLR",
    "WarmupDecayLR", "WarmupStableDecayLR", "inverse_sqrt_factor", "plot_schedules", "schedule_curve",
    "warmup_decay_factor", "warmup_stable_decay_factor", "StepInBackward", "WeightDecaySchedule",
    "flat_statistics", "write_statistics",
]  # fmt: skip
