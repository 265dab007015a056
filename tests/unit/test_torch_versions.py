"""What the oldest torch the package supports (2.11, pyproject's floor) lacks, checked on the torch
CI runs: torchrun's --shutdown-timeout, which `dtrain slurm` and `dtrain k8s` write."""

import signal

import pytest

from distributed_train.cli import launch
from distributed_train.errors import UsageError


@pytest.fixture
def torchrun_without_shutdown_timeout(monkeypatch):
    """torch.distributed.run's parser as torch 2.11 builds it: no --shutdown-timeout."""
    import torch.distributed.run as torch_run

    newer = torch_run.get_args_parser

    def older():
        parser = newer()
        for action in list(parser._actions):
            if "--shutdown-timeout" in action.option_strings:
                parser._remove_action(action)
                for option in action.option_strings:
                    parser._option_string_actions.pop(option)
        return parser

    monkeypatch.setattr(torch_run, "get_args_parser", older)


class _Workers:
    """What PContext.close needs of its instance; `_close` records the timeout it was given."""

    _tail_logs, filtered_stdout, filtered_stderr = [], None, None

    def __init__(self):
        self.closed_with = None

    def _close(self, death_sig, timeout):
        self.closed_with = (death_sig, timeout)


def _close_inside(parsed) -> tuple:
    from torch.distributed.elastic.multiprocessing import api

    workers = _Workers()
    with launch._shutdown_timeout_for_older_torch(parsed):
        api.PContext.close(workers, signal.SIGTERM)  # as the agent stops its workers on SIGTERM
    after = _Workers()
    api.PContext.close(after, signal.SIGTERM)
    return workers.closed_with[1], after.closed_with[1]


def test_a_shutdown_timeout_written_for_newer_torch_is_applied_by_dtrain_launch(
        torchrun_without_shutdown_timeout, monkeypatch):
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    parsed = launch.torchrun_parser().parse_args(["--shutdown-timeout", "290", "-m", "distributed_train"])
    launch.check_torchrun_options(parsed)
    assert _close_inside(parsed) == (290, 30)  # the workers get 290 s; torch's default is back after
    parsed = launch.torchrun_parser().parse_args(["-m", "distributed_train"])
    assert _close_inside(parsed) == (30, 30)  # not given: torch's own default
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "75")  # what newer torchrun also reads
    assert _close_inside(parsed) == (75, 30)


@pytest.mark.parametrize("args, env, message", [
    (["--shutdown-timeout", "-5"], None, "--shutdown-timeout must be 0 or more seconds, got -5"),
    ([], "soon", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT must be a whole number of seconds, got 'soon'"),
])
def test_a_bad_shutdown_timeout_is_one_line_on_older_torch(torchrun_without_shutdown_timeout, monkeypatch,
                                                           args, env, message):
    if env is None:
        monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", env)
    parsed = launch.torchrun_parser().parse_args([*args, "-m", "distributed_train"])
    with pytest.raises(UsageError, match=message):
        launch.check_torchrun_options(parsed)


def test_newer_torchrun_keeps_its_own_option(monkeypatch):
    parsed = launch.torchrun_parser().parse_args(["--shutdown-timeout", "45", "-m", "distributed_train"])
    if "dtrain_shutdown_timeout" in vars(parsed):
        pytest.skip("this torch's torchrun has no --shutdown-timeout (the tests above cover it)")
    assert parsed.shutdown_timeout == 45
    assert launch._older_torch_shutdown_timeout(parsed) is None
    with pytest.raises(UsageError, match="got -1"):
        launch.check_torchrun_options(launch.torchrun_parser().parse_args(
            ["--shutdown-timeout", "-1", "-m", "distributed_train"]))
