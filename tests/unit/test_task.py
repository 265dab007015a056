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


def test_a_loss_given_as_sum_and_count_is_checked_and_its_mean_is_the_loss():
    task = load_task(toy("Regression"))
    model = task.model()
    batch = task.train_dataset()[:4]
    mean = task.loss(model, batch)
    for count in (4, 4.0, torch.tensor(4), torch.tensor([4.0])):  # a number, or a one-element tensor
        task.obj.loss = lambda model, batch, count=count: ((model(batch[0]).squeeze(-1) - batch[1]).pow(2).sum(), count)
        total, counted = task.loss_terms(model, batch)
        assert counted.dtype == torch.float64 and counted.dim() == 0 and float(counted) == 4
        assert torch.allclose(task.loss(model, batch), mean)
    bad = {(mean, 4, 1): r"task\.loss\(\) must return the mean loss or a pair \(sum, count\), got a tuple of 3",
           (mean.repeat(2), 4): r"the sum in task\.loss\(\)'s \(sum, count\) must be a scalar tensor \(the summed "
                                r"loss\), got \(2,\)",
           (torch.tensor(1.0), 4): r"the sum in task\.loss\(\)'s \(sum, count\) is a tensor without grad",
           (mean, -1): r"the count in task\.loss\(\)'s \(sum, count\) must be a number >= 0 or a one-element "
                       r"tensor \(how many terms the sum adds up\), got -1",
           (mean, "4"): r"got '4'", (mean, True): r"got True", (mean, torch.ones(2)): r"got \(2,\)"}
    for result, needle in bad.items():
        task.obj.loss = lambda model, batch, result=result: result
        with pytest.raises(UsageError, match=needle):
            task.loss(model, batch)


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


class _EveryInitialisation(nn.Module):
    """A model that initialises its weights every way torch.nn.init and the Tensor fills offer."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64)
        self.embed = nn.Embedding(50, 32)
        self.head = nn.Linear(32, 50, bias=False)
        self.frozen = nn.Linear(4, 4)
        for init in (nn.init.normal_, nn.init.trunc_normal_, nn.init.xavier_normal_, nn.init.kaiming_normal_,
                     nn.init.orthogonal_, nn.init.zeros_, nn.init.ones_):
            init(self.head.weight)
        nn.init.sparse_(self.head.weight, 0.5)
        nn.init.constant_(tensor=self.frozen.bias, val=0.1)  # by keyword, as torch.nn.init forwards it
        with torch.no_grad():
            self.embed.weight.normal_(0, 0.02).clamp_(-0.04, 0.04)
            self.embed.weight.uniform_().erfinv_().exponential_().log_normal_().cauchy_().geometric_(0.5)
            self.embed.weight.bernoulli_(0.5).random_(0, 3).fill_(1.0).zero_()
        self.frozen.requires_grad_(False)  # not a fill: must not be skipped


def test_meta_build_skips_initialisation_but_keeps_every_parameter_as_built():
    from distributed_train.task import on_meta_device

    with on_meta_device():
        meta = _EveryInitialisation()
    real = _EveryInitialisation()
    described = [(name, p.shape, p.dtype, p.requires_grad) for name, p in real.named_parameters()]
    assert [(name, p.shape, p.dtype, p.requires_grad) for name, p in meta.named_parameters()] == described
    assert all(p.is_meta for p in meta.parameters())
    x = torch.ones(2, 3)
    with on_meta_device():  # only meta tensors are left alone: a real one built inside is still filled
        x.normal_()
    assert not torch.equal(x, torch.ones(2, 3))


def test_the_launcher_builds_a_normal_initialised_model_on_meta_without_importing_dynamo(tmp_path):
    """The meta kernel of normal_ (and of trunc_normal_'s erfinv_/clamp_) imports torch._dynamo, ~1 s
    before any worker could start; almost every transformer initialises with normal_."""
    import subprocess
    import sys

    task = tmp_path / "normal_init.py"
    task.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Task:\n"
        "    def train_dataset(self):\n        return torch.utils.data.TensorDataset(torch.ones(4, 3))\n"
        "    def model(self):\n        m = nn.Linear(3, 3)\n        nn.init.trunc_normal_(m.weight, std=0.02)\n"
        "        m.bias.data.normal_()\n        return m\n"
        "    def loss(self, model, batch):\n        return model(batch[0]).sum()\n\n"
        "class Frozen(Task):\n"
        "    def model(self):\n        return super().model().requires_grad_(False)\n")
    code = ("import sys\nfrom distributed_train.config import load_config\n"
            "from distributed_train.errors import UsageError\n"
            "from distributed_train.task import check_model_before_spawn\n"
            f"check_model_before_spawn({str(task)!r} + ':Task', load_config(None, []))\n"
            "try:\n"
            f"    check_model_before_spawn({str(task)!r} + ':Frozen', load_config(None, []))\n"
            "except UsageError as exc:\n    print(exc)\n"
            "print('dynamo imported:', 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "returned a model without trainable parameters" in out
    assert "dynamo imported: False" in out
