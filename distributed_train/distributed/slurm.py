"""Slurm's environment as torchrun's: a job's nodes, this node's place, the rendezvous host and port.

Two ways to run under Slurm:
- `srun --ntasks-per-node=1 dtrain launch ...` (one agent per node, torchrun starts the workers):
  `launch_options` derives `--nnodes`, `--node-rank` and the c10d rendezvous (the first host of
  the step's node list, a port derived from the job id, the job id as rendezvous id) for the
  flags the user did not give;
- `srun --ntasks-per-node=GPUS dtrain train ...` (one task per GPU, no torchrun): `rank_environ`
  gives the worker RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT
  from SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, the tasks on this node, the first host
  and the same port.

Only an `srun` step counts (SLURM_STEP_NUM_TASKS is set): the batch script itself runs on the
first node only, and its SLURM_NTASKS describes the allocation, not this process.
"""

from __future__ import annotations

import re

from distributed_train.errors import UsageError

PORT_BASE, PORT_SPAN = 20000, 10000  # rendezvous ports 20000-29999: two jobs on one node differ
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(text: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """The host names of a Slurm host list: `n[1-3,7],gpu-a[01-02]x` -> n1 n2 n3 n7 gpu-a01x gpu-a02x.
    A malformed list is a UsageError naming the variable."""
    hosts: list[str] = []
    for item in _split_top_level(text, name):
        hosts += _expand_item(item, text, name)
    if not hosts:
        raise UsageError(f"{name}={text!r} is not a Slurm host list: it names no host")
    return hosts


def _split_top_level(text: str, name: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise UsageError(f"{name}={text!r} is not a Slurm host list: unbalanced brackets")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise UsageError(f"{name}={text!r} is not a Slurm host list: unbalanced brackets")
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str, text: str, name: str) -> list[str]:
    """One host or one pattern with bracketed ranges (several brackets: every combination)."""
    match = re.match(r"^([^\[\]]*)\[([^\[\]]*)\](.*)$", item)
    if not match:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", item):
            raise UsageError(f"{name}={text!r} is not a Slurm host list: {item!r} is not a host name")
        return [item]
    prefix, ranges, rest = match.groups()
    numbers = []
    for part in ranges.split(","):
        bounds = _RANGE.match(part.strip())
        if not bounds:
            raise UsageError(f"{name}={text!r} is not a Slurm host list: {part!r} is not a number or range")
        low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
        if int(high) < int(low):
            raise UsageError(f"{name}={text!r} is not a Slurm host list: the range {part!r} runs backwards")
        width = len(low)  # n[01-10] keeps two digits
        numbers += [f"{n:0{width}d}" for n in range(int(low), int(high) + 1)]
    return [host for n in numbers for host in _expand_item(prefix + n + rest, text, name)]


def in_step(environ) -> bool:
    """This process is a task of an `srun` step (not the batch script, not outside Slurm)."""
    return bool(environ.get("SLURM_JOB_ID")) and bool(environ.get("SLURM_STEP_NUM_TASKS"))


def alone_in_a_multi_node_job(environ) -> bool:
    """The batch script of a job with several nodes (outside srun it runs on the first one only)."""
    nodes = environ.get("SLURM_NNODES", "")
    return bool(environ.get("SLURM_JOB_ID")) and not in_step(environ) and nodes.isdigit() and int(nodes) > 1


def rendezvous_port(environ) -> int:
    """A port derived from the job id, so that two jobs sharing a node do not clash."""
    return PORT_BASE + _int(environ, "SLURM_JOB_ID") % PORT_SPAN


def first_host(environ) -> str:
    """The step's first node (where rank 0 runs): the rendezvous host."""
    name = "SLURM_STEP_NODELIST" if environ.get("SLURM_STEP_NODELIST") else "SLURM_JOB_NODELIST"
    if not environ.get(name):
        raise UsageError("SLURM_JOB_NODELIST is not set: run inside a Slurm allocation (sbatch, salloc)")
    return expand_hostlist(environ[name], name)[0]


def _int(environ, name: str) -> int:
    value = environ.get(name, "")
    if not value.isdigit():
        raise UsageError(f"environment variable {name} must be a whole number, got {value!r}")
    return int(value)


def tasks_on_this_node(environ) -> int:
    """How many tasks of this step run on this node, from SLURM_STEP_TASKS_PER_NODE (`2(x3),1`)."""
    counts: list[int] = []
    text = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "")
    for part in filter(None, text.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise UsageError(f"environment variable SLURM_STEP_TASKS_PER_NODE={text!r} is not N or N(xM),...")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    node = _int(environ, "SLURM_NODEID") if environ.get("SLURM_NODEID") else 0
    if node >= len(counts):
        raise UsageError(f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE={text!r} lists {len(counts)} node(s)")
    return counts[node]


def launch_options(environ, given: set[str]) -> tuple[list[str], str]:
    """torchrun options for `dtrain launch` in an srun step (one task per node), for the flags not
    in `given`; and the line that says what was derived ("" outside a step)."""
    if not in_step(environ):
        return [], ""
    if tasks_on_this_node(environ) != 1:
        raise UsageError("dtrain launch under srun needs one task per node (srun --ntasks-per-node=1): it "
                         "starts the node's workers itself; for one task per GPU, run dtrain train under srun")
    derived = {
        "--nnodes": str(_int(environ, "SLURM_STEP_NUM_NODES") if environ.get("SLURM_STEP_NUM_NODES")
                        else _int(environ, "SLURM_NNODES")),
        "--node-rank": str(_int(environ, "SLURM_NODEID")),
        "--rdzv-backend": "c10d",
        "--rdzv-endpoint": f"{first_host(environ)}:{rendezvous_port(environ)}",
        "--rdzv-id": f"slurm-{_int(environ, 'SLURM_JOB_ID')}",
    }
    if given & {"--rdzv-endpoint", "--master-addr", "--standalone"}:  # the user's own rendezvous
        for key in ("--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"):
            derived.pop(key)
    args = [part for key, value in derived.items() if key not in given for part in (key, value)]
    shown = " ".join(args) or "nothing (every option given)"
    return args, f"dtrain launch: Slurm job {environ['SLURM_JOB_ID']}: {shown} (from SLURM_*; given flags win)"


def rank_environ(environ) -> dict[str, str]:
    """torchrun's worker variables for a task of an srun step that torchrun did not start ({}
    when torchrun did, or outside a step)."""
    if not in_step(environ) or "RANK" in environ or "TORCHELASTIC_RUN_ID" in environ:
        return {}
    return {
        "RANK": str(_int(environ, "SLURM_PROCID")),
        "WORLD_SIZE": str(_int(environ, "SLURM_STEP_NUM_TASKS")),
        "LOCAL_RANK": str(_int(environ, "SLURM_LOCALID")),
        "LOCAL_WORLD_SIZE": str(tasks_on_this_node(environ)),
        "MASTER_ADDR": first_host(environ),
        "MASTER_PORT": str(rendezvous_port(environ)),
    }
