"""Slurm's environment read as torchrun's (distributed/slurm.py), without a cluster: host lists,
what `dtrain launch` derives in an srun step, and the rank variables of a task srun started."""

import pytest

from distributed_train.distributed import slurm
from distributed_train.errors import UsageError

STEP = {"SLURM_JOB_ID": "4321", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_STEP_NODELIST": "n[1-2]",
        "SLURM_STEP_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("text, hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[1-2,7],gpu-a[01-02]x", ["n1", "n2", "n7", "gpu-a01x", "gpu-a02x"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("node[008-010]", ["node008", "node009", "node010"]),
    ("a,b.example.com", ["a", "b.example.com"]),
])
def test_slurm_host_lists_expand_as_scontrol_show_hostnames_does(text, hosts):
    assert slurm.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, why", [
    ("n[1-3", "unbalanced brackets"),
    ("n1-3]", "unbalanced brackets"),
    ("n[3-1]", "the range '3-1' runs backwards"),
    ("n[a-b]", "'a-b' is not a number or range"),
    ("n 1", "'n 1' is not a host name"),
    ("", "it names no host"),
])
def test_a_malformed_host_list_is_one_line_naming_the_variable(text, why):
    with pytest.raises(UsageError, match=rf"^SLURM_JOB_NODELIST='{__import__('re').escape(text)}' is not a Slurm "
                                         rf"host list: {__import__('re').escape(why)}$"):
        slurm.expand_hostlist(text)


def test_launch_in_an_srun_step_derives_nodes_rank_and_rendezvous_and_given_flags_win():
    args, line = slurm.launch_options(STEP, given=set())
    assert args == ["--nnodes", "2", "--node-rank", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                    "n1:24321", "--rdzv-id", "slurm-4321"]
    assert line == f"dtrain launch: Slurm job 4321: {' '.join(args)} (from SLURM_*; given flags win)"
    args, _ = slurm.launch_options(STEP, given={"--nnodes", "--rdzv-endpoint"})
    assert args == ["--node-rank", "1"]  # the user's own rendezvous: none derived
    other_job = slurm.launch_options({**STEP, "SLURM_JOB_ID": "4322"}, set())[0]
    assert other_job[other_job.index("--rdzv-endpoint") + 1] == "n1:24322"  # two jobs on a node: two ports


def test_outside_a_step_nothing_is_derived_and_one_task_per_gpu_needs_dtrain_train():
    batch_shell = {k: v for k, v in STEP.items() if not k.startswith("SLURM_STEP")}
    assert slurm.launch_options(batch_shell, set()) == ([], "") and slurm.rank_environ(batch_shell) == {}
    assert slurm.launch_options({}, set()) == ([], "")
    with pytest.raises(UsageError, match=r"^dtrain launch under srun needs one task per node"):
        slurm.launch_options({**STEP, "SLURM_STEP_TASKS_PER_NODE": "4(x2)"}, set())


def test_a_task_srun_started_gets_torchruns_rank_variables():
    step = {**STEP, "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_PROCID": "6",
            "SLURM_LOCALID": "2"}
    assert slurm.rank_environ(step) == {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4",
                                        "MASTER_ADDR": "n1", "MASTER_PORT": "24321"}
    assert slurm.rank_environ({**step, "RANK": "0"}) == {}  # torchrun started it: its variables stand
    with pytest.raises(UsageError, match=r"^environment variable SLURM_PROCID must be a whole number, got 'x'$"):
        slurm.rank_environ({**step, "SLURM_PROCID": "x"})
    with pytest.raises(UsageError, match=r"^SLURM_STEP_NODELIST='n\[1-' is not a Slurm host list"):
        slurm.rank_environ({**step, "SLURM_STEP_NODELIST": "n[1-"})


def test_dtrain_launch_in_a_step_runs_torchrun_with_the_derived_rendezvous_and_says_so_once(capsys):
    from distributed_train.cli.launch import build_torchrun_args

    args = build_torchrun_args(["--max-restarts", "2"], ["digits"], environ=STEP)
    assert args[:2] == ["--max-restarts", "2"] and "--standalone" not in args
    assert args[args.index("--rdzv-endpoint") + 1] == "n1:24321" and args[args.index("--nnodes") + 1] == "2"
    assert capsys.readouterr().err.count("dtrain launch: Slurm job 4321: --nnodes 2") == 1
    own = build_torchrun_args(["--nnodes", "3", "--rdzv-endpoint", "head:29400"], ["digits"], environ=STEP)
    assert own.count("--nnodes") == 1 and own.count("--rdzv-endpoint") == 1 and "head:29400" in own
    batch_shell = {k: v for k, v in STEP.items() if not k.startswith("SLURM_STEP")}
    assert "--standalone" in build_torchrun_args([], ["digits"], environ=batch_shell)
    assert "has 2 nodes but this runs on one: start it with srun --ntasks-per-node=1" in capsys.readouterr().err


def test_dtrain_train_in_a_step_reads_its_rank_from_slurm():
    from distributed_train.distributed import read_env

    env = read_env({**STEP, "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_PROCID": "3",
                    "SLURM_LOCALID": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port) == ("n1", 24321)


def test_a_step_without_a_node_list_says_to_run_inside_an_allocation():
    no_list = {k: v for k, v in STEP.items() if "NODELIST" not in k}
    with pytest.raises(UsageError, match=r"^SLURM_JOB_NODELIST is not set: run inside a Slurm allocation"):
        slurm.launch_options(no_list, set())
