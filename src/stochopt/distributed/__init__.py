"""Data-parallel training on torch.distributed: DDP communication hooks that compress gradients (top-k,
random-k and scaled sign with error feedback; PowerSGD through torch's hook), each counting the bytes it moves;
launch helpers that fail clearly; ZeRO optimizer-state sharding with checkpoints; and the digits trainer
behind ``stochopt ddp``."""

from stochopt.distributed.hooks import (
    COMPRESSIONS,
    PowerSGDState,
    compression_hook,
    powersgd_hook,
    register_compression,
)
from stochopt.distributed.launch import (
    DistributedError,
    LaunchConfig,
    free_port,
    init_process_group,
    peer_failures,
    spawn,
    torchrun_rank,
)
from stochopt.distributed.sparse import (
    AllReduceState,
    RandomKState,
    SignState,
    TopKState,
    allreduce_hook,
    randomk_hook,
    sign_hook,
    topk_hook,
)
from stochopt.distributed.state import CommStats, allgather_bytes, allreduce_bytes
from stochopt.distributed.train import (
    DDPPlan,
    Method,
    MethodResult,
    digits_mlp,
    format_table,
    parse_method,
    run_ddp,
    train_method,
    write_results,
)
from stochopt.distributed.zero import load_checkpoint, save_checkpoint, zero_optimizer

__all__ = [
    "COMPRESSIONS", "PowerSGDState", "compression_hook", "powersgd_hook", "register_compression",
    "DistributedError", "LaunchConfig", "free_port", "init_process_group", "peer_failures", "spawn",
    "torchrun_rank", "AllReduceState", "RandomKState", "SignState", "TopKState", "allreduce_hook", "randomk_hook",
    "sign_hook", "topk_hook", "CommStats", "allgather_bytes", "allreduce_bytes", "DDPPlan", "Method",
    "MethodResult", "digits_mlp", "format_table", "parse_method", "run_ddp", "train_method", "write_results",
    "load_checkpoint", "save_checkpoint", "zero_optimizer",
]  # fmt: skip
