"""A task may give `criterion` instead of `loss`: loss = criterion(model(inputs), targets)."""

import pytest
import torch
from torch import nn

from distributed_train.errors import UsageError
from distributed_train.task import load_task
from tests.helpers import REPO

TASKS = str(REPO / "tests" / "tasks" / "criterion_tasks.py")


def task(attr):
    return load_task(f"{TASKS}:{attr}")


def first_batch(loaded, n=12):
    x, y = loaded.train_dataset()[:n]
    return x, y


@pytest.mark.parametrize("attr", ["WithCriterion", "CriterionFunction", "CriterionFactory", "FunctionalClassAttribute"])
def test_criterion_gives_the_same_loss_as_the_loss_method(attr):
    reference, loaded = task("WithLoss"), task(attr)
    torch.manual_seed(0)
    model = loaded.model()
    batch = first_batch(loaded)
    loss = loaded.loss(model, batch)
    assert loss.dim() == 0 and loss.requires_grad
    assert torch.equal(loss, reference.loss(model, batch))
    assert callable(loaded.criterion) and not isinstance(loaded.criterion, type)


def test_loss_wins_when_a_task_has_both():
    loaded = task("LossAndCriterion")
    model = loaded.model()
    batch = first_batch(loaded)
    assert loaded.criterion is None
    assert torch.allclose(loaded.loss(model, batch), 2 * nn.CrossEntropyLoss()(model(batch[0]), batch[1]))


def test_criterion_buffers_follow_the_outputs_without_moving_the_original():
    loaded = task("WithCriterion")
    x, y = first_batch(loaded)
    with torch.device("meta"):
        model = loaded.model()  # FLOP counting runs the loss on the meta device
    loss = loaded.loss(model, (x.to("meta"), y.to("meta")))
    assert loss.device.type == "meta"
    assert loaded.criterion.weight.device.type == "cpu"  # the task's own criterion is untouched
    assert torch.equal(loaded.criterion.weight, torch.tensor([1.0, 2.0, 0.5]))


def test_criterion_buffers_take_float64_for_a_float64_model():
    # train.precision=fp64: class weights in float64 too (a float32 weight fails in cross_entropy)
    loaded = task("WithCriterion")
    x, y = first_batch(loaded)
    model = loaded.model().double()
    loss = loaded.loss(model, (x.double(), y))
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, nn.functional.cross_entropy(model(x.double()), y, weight=torch.tensor(
        [1.0, 2.0, 0.5], dtype=torch.float64)), rtol=0, atol=1e-12)
    assert loaded.criterion.weight.dtype == torch.float32  # the task's own criterion is untouched
    assert loaded.loss(model.float(), (x, y)).dtype == torch.float32  # and float32 still works


@pytest.mark.parametrize("attr, needle", [
    ("NeitherLossNorCriterion", r"has no loss\(\); a task needs .* \(or a criterion, for batches of "
                                r"\(inputs, targets\)\)"),
    ("CriterionWithParameters", r"task\.criterion \(Sequential\) has parameters \(0\.weight, 0\.bias\) "
                                r"that dtrain would neither train nor keep in sync"),
    ("CriterionNotCallable", r"task\.criterion must be an nn\.Module or a function of \(outputs, targets\), "
                             r"got str"),
])
def test_criterion_mistakes_are_refused_when_the_task_loads(attr, needle):
    with pytest.raises(UsageError, match=needle):
        task(attr)


def test_criterion_mistakes_in_a_step_name_the_criterion():
    loaded = task("DictBatches")
    batch = torch.utils.data.default_collate(list(loaded.train_dataset())[:4])
    with pytest.raises(UsageError, match=r"task\.criterion needs batches of \(inputs, targets\), "
                                         r"got a dict with keys \['x', 'y'\]"):
        loaded.loss(loaded.model(), batch)
    with pytest.raises(UsageError, match=r"got a tuple of 3"):
        loaded.loss(loaded.model(), (batch["x"], batch["y"], batch["y"]))
    per_sample = task("PerSampleCriterion")
    with pytest.raises(UsageError, match=r"task\.criterion must return a scalar tensor \(the mean loss\), "
                                         r"got \(4,\)"):
        per_sample.loss(per_sample.model(), (batch["x"], batch["y"]))
