"""A rank that dies or stalls makes the others stop with a clear error within a bounded time; bad launch
settings get a clear message before anything waits on the network."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import stochopt
from stochopt.distributed import (
    DistributedError,
    LaunchConfig,
    free_port,
    init_process_group,
    peer_failures,
    register_compression,
    torchrun_rank,
)
from stochopt.distributed.launch import check_port_free, spawn
from tests.distributed.conftest import START

BOUND = 60  # seconds the surviving rank may take to exit


def _worker(rank: int, config: LaunchConfig, fault: str, message_file: str) -> None:
    torch.set_num_threads(1)  # two or more ranks on two cores
    # a small model on random data (no data set to load) under a compression hook, as in training
    init_process_group(rank, config)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
    register_compression(model, "topk", density=0.1)
    opt = stochopt.SGD(model.parameters(), lr=0.01)
    try:
        with peer_failures(rank, config, lambda: " while training"):
            for step in range(1000):
                if rank == 1 and step == 5:
                    if fault == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(10 * BOUND)  # a stall: alive, but never reaching the next collective
                opt.zero_grad()
                model(torch.randn(8, 16)).square().mean().backward()
                opt.step()
    except DistributedError as err:
        with open(message_file, "w") as f:
            f.write(str(err))
        os._exit(3)  # a failed rank leaves at once; tearing down a broken group could wait again
    os._exit(0)


def test_a_dead_or_stalled_rank_stops_the_others(tmp_path):
    # both faults at once, in two process groups, to share the start-up time of the processes
    ctx = mp.get_context(START)
    timeout = 3
    runs = {}
    for fault in ("kill", "stall"):
        config = LaunchConfig(2, master_port=free_port(), timeout=timeout)
        message = tmp_path / f"{fault}.txt"
        runs[fault] = (message, [ctx.Process(target=_worker, args=(r, config, fault, str(message))) for r in range(2)])
    processes = [p for _, ranks in runs.values() for p in ranks]
    for p in processes:
        p.start()
    try:
        deadline = time.monotonic() + BOUND
        for fault, (message, ranks) in runs.items():
            ranks[0].join(max(0.0, deadline - time.monotonic()))
            assert not ranks[0].is_alive(), f"rank 0 still running {BOUND} s after rank 1's {fault}"
            assert ranks[0].exitcode == 3, fault
            text = message.read_text()
            assert f"rank 0 stopped while training: another rank died or stalled for more than {timeout} s" in text
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
            p.join()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(world_size=0), "world_size must be a positive int, got 0"),
        (dict(world_size=2.0), "world_size must be a positive int"),
        (dict(world_size=2, master_port=70000), "master_port must be an int in"),
        (dict(world_size=2, master_addr="no-such-host.invalid"), "master_addr 'no-such-host.invalid' does not resolve"),
        (dict(world_size=2, timeout=0), "timeout must be a positive"),
        (dict(world_size=2, startup_timeout=-1), "startup_timeout must be a positive"),
        (dict(world_size=2, backend="mpi"), "backend must be"),
    ],
)  # fmt: skip
def test_bad_launch_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LaunchConfig(**kwargs)


def test_a_port_in_use_is_named():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match=f"master_port {busy.getsockname()[1]} on 127.0.0.1 is not free"):
            check_port_free(LaunchConfig(2, master_port=busy.getsockname()[1]))


def test_a_group_that_never_forms_times_out_with_a_message():
    # world size 2, but only this rank starts: the rendezvous gives up after the timeout
    with pytest.raises(DistributedError, match="did not form within 1 s.*same world size, address and port"):
        init_process_group(0, LaunchConfig(2, master_port=free_port(), startup_timeout=1))


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK=2 is not in"),
        ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR, MASTER_PORT not set"),
        ({"RANK": "0", "WORLD_SIZE": "two", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "WORLD_SIZE must be"),
    ],
)  # fmt: skip
def test_bad_torchrun_environment_is_named(monkeypatch, env, match):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=match):
        torchrun_rank()


def _fails_on_rank_1(rank: int, config: LaunchConfig) -> None:
    if rank == 1:
        raise ValueError("rank 1 was given a bad shard")


def test_a_failing_spawned_rank_is_reported():
    with pytest.raises(DistributedError, match="a rank failed: ValueError: rank 1 was given a bad shard"):
        spawn(_fails_on_rank_1, LaunchConfig(2, master_port=free_port()), start_method=START)
