"""Distributed plumbing: torchrun's environment and the process group (`group`), failure
diagnosis and heartbeats (`diagnose`), SIGTERM/SIGINT handling (`preemption`) and the
single-host shared-memory gradient all-reduce (`shm_allreduce`).

The helpers of `group` are re-exported here, so callers write `distributed.barrier()`.
"""

from distributed_train.distributed.group import (
    DistEnv,
    active,
    all_gather_object,
    barrier,
    broadcast_object,
    cpu_count,
    init,
    limit_compile_threads,
    main_computes,
    on_main,
    pick_backend,
    pick_device,
    read_env,
    reduce_and_read,
    set_cpu_threads,
    teardown,
)

__all__ = [
    "DistEnv", "active", "all_gather_object", "barrier", "broadcast_object",
    "cpu_count", "init", "limit_compile_threads", "main_computes", "on_main", "pick_backend", "pick_device", "read_env",
    "reduce_and_read", "set_cpu_threads", "teardown",
]
