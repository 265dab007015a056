"""The entry point of one worker: environment -> process group -> Trainer.fit() -> teardown."""

from __future__ import annotations

import os
import time

import torch

from distributed_train import distributed
from distributed_train.config import Config
from distributed_train.distributed import diagnose, shm_allreduce
from distributed_train.engines.tf32 import set_tf32
from distributed_train.training.reporting.metrics import log, setup_logging
from distributed_train.training.trainer import Trainer, default_run_dir
from distributed_train.training.workers import worker_deaths_explained


def run_training(config: Config, env: distributed.DistEnv, debug: bool = False) -> dict:
    """Train `config` as this rank of `env`; returns the run summary (identical on every rank)."""
    setup_logging(env, debug)
    backend = distributed.pick_backend(config.dist.backend)
    device = distributed.pick_device(backend, env)
    distributed.set_cpu_threads(env)
    if config.train.compile:
        distributed.limit_compile_threads(env)
    if device.type == "cpu":
        # Tiny gradients and Adam moments become denormal early in training; on x86 each
        # denormal operation traps to microcode and a step can take 100x longer. Set either
        # way: a process that trains twice must not keep the previous job's choice.
        torch.set_flush_denormal(config.train.flush_denormal)
    if device.type == "cuda":
        set_tf32(config.train.tf32)
    if backend == "nccl":
        use_nccl_error_handling()
    distributed.init(env, group_backend(backend, config), device, config.dist.timeout_s)
    timeout_s = config.dist.timeout_s
    # The heartbeat lets a rank whose collective fails name the ranks that did not arrive.
    heartbeat = diagnose.Heartbeat(env.rank, env.world_size, grace_s=timeout_s + 2 * diagnose.BEAT_S)
    failed = True
    try:
        with heartbeat, diagnose.communication_failures_explained(env.rank, env.world_size, timeout_s), \
                worker_deaths_explained():
            # Rank 0's run_dir wins, so every rank (and every node) writes to the same place; each
            # rank's hash of HASH_PROBE (below) comes with it, so rank 0 can tell unlike hashing.
            gathered = distributed.all_gather_object((config.run_dir or default_run_dir(config.task),
                                                      hash(HASH_PROBE)))
            config.run_dir = gathered[0][0]
            if env.is_main and len({probe for _, probe in gathered}) > 1:
                log.warning(UNLIKE_HASHES)
            trainer = Trainer(config, env, device)
            heartbeat.watch(lambda: trainer.stop.requested)  # a rank stuck after SIGTERM ends itself
            summary = trainer.fit()
            failed = False
            return summary
    except BaseException:
        # Peers waiting for this rank in a shared-memory all-reduce fail now, naming this rank,
        # instead of noticing only when the process is gone (or torchrun's SIGTERM comes first).
        shm_allreduce.leave()
        raise
    finally:
        distributed.teardown(failed)
        # A gloo thread may still be freeing the last collective's tensors, which needs the GIL;
        # the group's destructor (when the trainer goes, right after this) joins those threads
        # while holding it. Let them finish first, or a process that trains again can deadlock.
        time.sleep(0.02)


# Each Python process picks its own string-hash seed unless PYTHONHASHSEED sets one, and a set of
# strings iterates in hash order: a task that builds its data from one would give each rank other
# data, silently. `dtrain launch` sets it for its workers; under another launcher rank 0 says so.
HASH_PROBE = "distributed_train: do the ranks hash strings alike?"
UNLIKE_HASHES = ("the ranks hash strings differently (PYTHONHASHSEED is unset or not alike): a set of strings "
                 "iterates in another order on each rank, so a task that builds its data from one "
                 "(list(set(text))) trains each rank on other data; export PYTHONHASHSEED=0 to every "
                 "worker (dtrain launch does) or sort the set")


def group_backend(backend: str, config: Config) -> str:
    """The default group's backend: with fsdp.cpu_offload the gradient shards live in host memory,
    so the collectives over them (the gradient norm) need gloo beside NCCL."""
    if backend == "nccl" and config.engine == "fsdp" and config.fsdp.cpu_offload:
        return "cpu:gloo,cuda:nccl"
    return backend


# torch's default (1) makes NCCL's watchdog abort the process when a collective times out or a
# peer fails: SIGABRT, exit -6, and no Python code runs. With 2 the watchdog aborts the NCCL
# communicators only; the waiting collective then raises in the training thread, so the failure
# is explained in one line and the worker exits 4. The cost: a rank whose main thread stays
# blocked outside NCCL after the abort is not killed by torch; our heartbeat names it to its peers.
NCCL_ERROR_HANDLING = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def use_nccl_error_handling() -> None:
    """Set NCCL's error handling before the process group exists (a user's own setting wins)."""
    for key, value in NCCL_ERROR_HANDLING.items():
        os.environ.setdefault(key, value)
