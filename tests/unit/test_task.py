"""Loading tasks (built-in name, module:attr, file.py:attr, class, factory) and checking results."""

from pathlib import Path

import pytest
import torch
from torch import nn

from distributed_train.config import load_config
from distributed_train.errors import UsageError
from distributed_train.task import config_defaults, load_task

TOY = str(Path(__file__).resolve().parents[1] / "tasks" / "toy.py")


def toy(attr):
    return f"{TOY}:{attr}"


def test_builtin_tasks_load_by_name():
    digits = load_task("digits")
    assert type(digits.obj).__name__ == "DigitsTask"
    assert config_defaults("digits")["train"]["epochs"] == 20
    assert config_defaults("lm")["eval"]["max_samples"] == 2048  # bounded evaluation by default
    assert isinstance(digits.model(), nn.Module)


@pytest.mark.parametrize("spec", [
    toy("Regression"), toy("NoArgs"), toy("make_regression"), toy("make_with_config"),
    toy("regression_instance"), "tests.tasks.toy:Regression",
])
def test_task_loads_from_any_spelling(spec):
    config = load_config(None, ["--task_args.n_eval=7"])
    task = load_task(spec, config)
    assert type(task.obj).__name__ in {"Regression", "NoArgs"}
    batch = next(iter(torch.utils.data.DataLoader(task.train_dataset(), batch_size=4)))
    loss = task.loss(task.model(), batch)
    assert loss.dim() == 0 and loss.requires_grad
    assert task.has_metrics and task.collate_fn() is None and task.optimizer([], config) is None


def test_class_and_factory_receive_the_config():
    config = load_config(None, ["--task_args.n_eval=7"])
    assert len(load_task(toy("Regression"), config).eval_dataset()) == 7
    assert load_task(toy("make_with_config"), config).obj.seen_config is config
    assert len(load_task(toy("NoArgs"), config).eval_dataset()) == 50  # takes no config


@pytest.mark.parametrize("spec, needle", [
    ("nosuchtask", "not a built-in"),
    ("tests/tasks/missing.py:Task", "task file 'tests/tasks/missing.py' does not exist"),
    (toy("Nope"), "has no attribute 'Nope'"),
    ("no_such_module_xyz:Task", "task module 'no_such_module_xyz' cannot be imported"),
    (toy("NoLoss"), r"has no loss\(\)"),
    (toy("NoModel"), r"has no model\(\)"),
    (toy("NoTrainDataset"), r"has no train_dataset\(\)"),
    (toy("FailingConstructor"), "failed to construct: RuntimeError: cannot find the data"),
])
def test_loading_errors_name_the_problem(spec, needle):
    with pytest.raises(UsageError, match=needle):
        load_task(spec)


def test_task_file_that_fails_to_import(tmp_path):
    bad = tmp_path / "bad_task.py"
    bad.write_text("import no_such_package_xyz\n")
    with pytest.raises(UsageError, match="failed to import: ModuleNotFoundError"):
        load_task(f"{bad}:Task")


def test_results_are_checked_and_name_the_method():
    with pytest.raises(UsageError, match=r"task\.train_dataset\(\) returned an empty dataset"):
        load_task(toy("EmptyDataset")).train_dataset()
    with pytest.raises(UsageError, match=r"task\.model\(\) must return a torch\.nn\.Module, got function"):
        load_task(toy("ModelNotModule")).model()
    task = load_task(toy("VectorLoss"))
    batch = task.train_dataset()[:5]
    with pytest.raises(UsageError, match=r"task\.loss\(\) must return a scalar tensor .*got \(5,\)"):
        task.loss(task.model(), batch)


def test_loss_without_grad_and_bad_metrics_are_reported():
    task = load_task(toy("Regression"))
    model = task.model()
    batch = task.train_dataset()[:4]
    with torch.no_grad():
        assert task.loss(model, batch).dim() == 0  # fine in evaluation
    task.obj.loss = lambda model, batch: torch.tensor(1.0)
    with pytest.raises(UsageError, match="without grad"):
        task.loss(model, batch)
    task.obj.metrics = lambda model, batch: {"acc": 0.5}
    with pytest.raises(UsageError, match=r"task\.metrics\(\) must return a dict of name -> \(sum, count\)"):
        task.metrics(model, batch)
