"""Starting and stopping a process group: launch settings checked before anything waits on the network, N local
processes spawned (or the ranks torchrun started), and failures of other ranks turned into one clear error.

A rank that dies closes its sockets, so the others' next collective fails at once; a rank that stalls leaves the
others waiting until ``timeout`` (gloo's per-operation timeout, set at ``init_process_group``). Either way every
other rank raises :class:`DistributedError` within a bounded time instead of hanging."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class DistributedError(RuntimeError):
    """A distributed run failed: a rank died or stalled, or the process group could not form."""


@dataclass(frozen=True)
class LaunchConfig:
    """Where the ranks meet. ``timeout``: seconds any collective may wait for the other ranks;
    ``startup_timeout``: seconds the rendezvous waits for every rank to arrive (ranks start unevenly: importing
    torch on a busy machine takes seconds)."""

    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    timeout: float = 60.0
    backend: str = "gloo"
    startup_timeout: float = 300.0
    from_launcher: bool = False  # torchrun's environment: its agent may host the store (env:// knows how)

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or isinstance(self.world_size, bool) or self.world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {self.world_size!r}")
        if not isinstance(self.master_port, int) or not 1 <= self.master_port <= 65535:
            raise ValueError(f"master_port must be an int in [1, 65535], got {self.master_port!r}")
        for name in ("timeout", "startup_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.backend not in ("gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        try:
            socket.getaddrinfo(self.master_addr, self.master_port)
        except (socket.gaierror, UnicodeError) as err:
            raise ValueError(f"master_addr {self.master_addr!r} does not resolve to an address ({err})") from None


def torchrun_rank(timeout: float = 60.0) -> tuple[int, LaunchConfig] | None:
    """This process's rank and launch settings when torchrun (or another launcher setting RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT) started it; None otherwise. ``timeout`` as in :class:`LaunchConfig`."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"launched with only part of the torchrun environment: {', '.join(missing)} not set")
    values = {}
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        try:
            values[name] = int(os.environ[name])
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {os.environ[name]!r}") from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, LaunchConfig(world, os.environ["MASTER_ADDR"], values["MASTER_PORT"], timeout, from_launcher=True)


def check_port_free(config: LaunchConfig) -> None:
    """Before spawning local ranks: the rendezvous port must be free, or rank 0 would fail to listen."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((config.master_addr, config.master_port))
        except OSError as err:
            raise ValueError(
                f"master_port {config.master_port} on {config.master_addr} is not free ({err.strerror}); choose "
                "another port"
            ) from None


def free_port(addr: str = "127.0.0.1") -> int:
    """A port the operating system reports free now (for local runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((addr, 0))
        except OSError as err:
            raise ValueError(f"master_addr {addr!r} is not an address of this machine ({err})") from None
        return sock.getsockname()[1]


def init_process_group(rank: int, config: LaunchConfig) -> None:
    """Join the group; a group that does not form within ``config.startup_timeout`` (a wrong world size, address
    or port) raises :class:`DistributedError` saying so. Collectives then wait at most ``config.timeout``."""
    if config.master_addr in ("127.0.0.1", "localhost"):
        # all ranks on this machine: gloo would otherwise pick the interface of the host name, which may not route
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=config.timeout)
    try:
        if config.from_launcher:
            dist.init_process_group(config.backend, init_method="env://", rank=rank, world_size=config.world_size,
                                    timeout=timeout)  # fmt: skip
        else:  # our own store, so that the rendezvous may wait longer than a collective
            store = dist.TCPStore(
                config.master_addr, config.master_port, config.world_size, is_master=rank == 0,
                timeout=datetime.timedelta(seconds=config.startup_timeout), wait_for_workers=True,
            )  # fmt: skip
            dist.init_process_group(config.backend, store=store, rank=rank, world_size=config.world_size,
                                    timeout=timeout)  # fmt: skip
    except (RuntimeError, OSError) as err:
        raise DistributedError(
            f"rank {rank}: the process group of {config.world_size} ranks at {config.master_addr}:"
            f"{config.master_port} did not form within "
            f"{config.timeout if config.from_launcher else config.startup_timeout:g} s ({_first_line(err)}); check "
            "that every rank was started with the same world size, address and port"
        ) from err


_PEER_FAILURE = ("connection", "timed out", "timeout", "gloo", "nccl", "peer", "broken pipe")


@contextlib.contextmanager
def peer_failures(rank: int, config: LaunchConfig, where: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Turn the error a collective raises when another rank died or stalled into a :class:`DistributedError`
    that says what happened; other errors pass unchanged."""
    try:
        yield
    except RuntimeError as err:
        message = str(err).lower()
        if isinstance(err, DistributedError) or not any(word in message for word in _PEER_FAILURE):
            raise
        raise DistributedError(
            f"rank {rank} stopped{where()}: another rank died or stalled for more than {config.timeout:g} s "
            f"({_first_line(err)})"
        ) from err


def spawn(fn: Callable[..., Any], config: LaunchConfig, args: tuple = (), start_method: str = "spawn") -> None:
    """Run ``fn(rank, config, *args)`` in ``config.world_size`` fresh processes and wait for them; the first rank
    to fail stops the others, and its error comes back as a :class:`DistributedError`. ``start_method``
    "forkserver" starts ranks from a server process that imports torch once (faster when called repeatedly)."""
    check_port_free(config)
    try:
        mp.start_processes(_local_rank, args=(fn, config, args), nprocs=config.world_size, join=True,
                           start_method=start_method)  # fmt: skip
    except mp.ProcessRaisedException as err:
        raise DistributedError(f"a rank failed: {_last_line(err)}") from None
    except mp.ProcessExitedException as err:
        raise DistributedError(f"rank {err.error_index} exited unexpectedly ({err})") from None


def _local_rank(rank: int, fn: Callable[..., Any], config: LaunchConfig, args: tuple) -> None:
    # N ranks on one machine share its cores, as torchrun arranges with OMP_NUM_THREADS; more threads per
    # rank than cores would make them spin against each other
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.world_size))
    fn(rank, config, *args)


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__
