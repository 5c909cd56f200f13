"""The multi-process tests start their ranks from a fork server that has imported torch and stochopt once, so a
rank starts in a fraction of a second instead of importing torch again (seconds of CPU per rank on 2 cores)."""

import torch.multiprocessing as mp

mp.set_forkserver_preload(["torch", "torch.distributed", "stochopt.distributed"])
START = "forkserver"
