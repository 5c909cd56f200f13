"""AlgoPerf-style benchmark: time to a validation target on small workloads, scored by performance profiles."""
